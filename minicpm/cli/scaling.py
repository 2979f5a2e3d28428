"""`minicpm scaling fit | fit-curve | predict-curve | campaign | compare-schedules` and `minicpm plan`: scaling
laws, the WSD campaign, and the compute-optimal plan."""

from __future__ import annotations

import argparse
import sys

from minicpm.cli.parser import LibraryFunction


def register_scaling_commands(sub) -> None:
    """scaling fit, fit-curve, predict-curve, campaign, compare-schedules; plan."""
    from minicpm.laws.commands import CURVE_LAWS, FORMS
    scaling = sub.add_parser("scaling", help="scaling laws: fit L(N, D), batch-size and loss-curve laws")
    ssub = scaling.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND")
    scaling.set_defaults(handler=lambda args: scaling.print_help() or 2)

    def pair(text: str) -> tuple[float, float]:
        try:
            n, d = (float(v) for v in text.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected N:D such as 1e9:2e10, got {text!r}") from None
        return n, d

    p = ssub.add_parser("fit", help="fit L(N,D) = E + A/N^alpha + B/D^beta (or the batch law)",
                        description="Fit the scaling law to a table of runs (CSV/JSONL with params, tokens, loss; "
                        "optional flops, run, batch_tokens) or to run directories (their last eval_loss), then "
                        "print intervals, the compute-optimal plan, held-out errors, isoFLOP and envelope fits.")
    library = LibraryFunction("minicpm.laws.commands:fit_scaling")
    p.add_argument("inputs", nargs="+", metavar="TABLE_OR_RUN_DIR")
    p.add_argument("--form", choices=FORMS, default=library.default("form"),
                   help="loss: L(N, D) (default); batch: the optimal batch-size law bs = a/L^b from "
                   "(loss, batch_tokens) rows")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument("--plot", metavar="DIR", help="write loss_vs_tokens.png and compute_optimal.png into DIR")
    p.add_argument("--budget", type=float, nargs="+", metavar="FLOPS",
                   help="compute budgets for the plan (default: four decades from the largest run's)")
    p.add_argument("--predict", type=pair, nargs="+", default=[], metavar="N:D", help="predict the loss at (N, D)")
    p.add_argument("--at-loss", type=float, nargs="+", default=[], metavar="L",
                   help="(--form batch) print the optimal batch at these losses")
    p.add_argument("--method", choices=("huber", "lsq"), default=library.default("method"),
                   help="huber: Chinchilla approach 3, Huber on log loss (default); lsq: least squares on the raw "
                   "loss, as the paper's curve_fit")
    p.add_argument("--law", choices=("chinchilla", "shared", "weighted", "shared-weighted"),
                   help="form of L(N, D): chinchilla (every parameter free), shared (alpha = beta, Gadre et al. "
                   "2024; the default with --method huber: it extrapolates best), weighted (runs weighted by "
                   "compute, E <= the lowest loss), shared-weighted; --method lsq fits chinchilla")
    p.add_argument("--holdout", choices=("largest",),
                   help="also fit without the largest size and report how well (and inside which band) it predicts it")
    p.add_argument("--leave-one-size-out", action="store_true",
                   help="also hold out each size in turn and predict it with each law (a table of errors and bands)")
    p.add_argument("--delta", type=float, default=library.default("delta"),
                   help="Huber delta on log loss (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=library.default("bootstrap"),
                   help="bootstrap resamples of runs (default %(default)s)")
    p.add_argument("--confidence", type=float, default=library.default("confidence"),
                   help="interval level (default %(default)s)")
    p.add_argument("--seed", type=int, default=library.default("seed"), help="bootstrap seed (default %(default)s)")
    p.add_argument("--isoflop-tol", type=float, default=library.default("isoflop_tol"),
                   help="runs whose compute agrees within this fraction form one isoFLOP budget (default %(default)s)")
    p.add_argument("--loss-key", default=library.default("loss_key"),
                   help="for run directories: the metrics.jsonl key of the loss (default %(default)s; "
                   "eval_bpb is per byte, as paper §4.5)")

    def scaling_fit(args) -> int:
        from minicpm.laws.commands import fit_scaling

        output = fit_scaling(args.inputs, form=args.form, loss_key=args.loss_key, delta=args.delta,
                             bootstrap=args.bootstrap, confidence=args.confidence, seed=args.seed,
                             budgets=args.budget, predictions=args.predict, at_loss=args.at_loss,
                             isoflop_tol=args.isoflop_tol, out=args.out, plot=args.plot, progress=sys.stderr.isatty(),
                             method=args.method, law=args.law, holdout=args.holdout,
                             leave_one_size_out=args.leave_one_size_out)
        print(output.json if args.json else output.text, flush=True)
        for path in output.written:
            print(f"wrote {path}", file=sys.stderr)
        return 0

    p.set_defaults(handler=scaling_fit)

    p = ssub.add_parser("fit-curve", help="fit a loss-curve law (tissue | mpl) to training curves",
                        description="Fit the LR-annealing law (Tissue et al. 2024) or the multi-power law (Luo et al. "
                        "2025) to curves: metrics.jsonl files, run directories or CSVs with step, lr, loss. The LR "
                        "is linear between logged rows and rises linearly from 0 at step 0 before the first one.")
    library = LibraryFunction("minicpm.laws.commands:fit_curve")
    p.add_argument("curves", nargs="+", metavar="CURVE")
    p.add_argument("--law", choices=CURVE_LAWS, required=True, help="which law")
    p.add_argument("--json", action="store_true", help="print {law, params, ...} as JSON (predict-curve reads it)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument("--plot", metavar="DIR", help="write curve_fit.png (data and fitted curves) into DIR")
    p.add_argument("--loss-key", default=library.default("loss_key"),
                   help="which key holds the loss (default %(default)s; e.g. eval_loss)")
    p.add_argument("--min-step", type=int, default=library.default("min_step"),
                   help="also leave out points before this step (default %(default)s)")
    p.add_argument("--max-points", type=int, default=library.default("max_points"),
                   help="points per curve used, evenly spaced in step (default %(default)s)")
    p.add_argument("--delta", type=float, default=library.default("delta"),
                   help="Huber scale on relative residuals (default %(default)s)")
    p.add_argument("--method", choices=("optimum", "luo"), default=library.default("method"),
                   help="optimum: the Huber objective's deepest optimum; luo: (mpl only) Luo et al.'s early-stopped "
                   "AdamW, which reproduces their published parameters and predicts their held-out schedules better "
                   "(default: luo for mpl, optimum for the other laws)")

    def scaling_fit_curve(args) -> int:
        from minicpm.laws.commands import fit_curve

        output = fit_curve(args.curves, law=args.law, loss_key=args.loss_key, delta=args.delta,
                           min_step=args.min_step, max_points=args.max_points, out=args.out, plot=args.plot,
                           method=args.method)
        print(output.json if args.json else output.text, flush=True)
        for path in output.written:
            print(f"wrote {path}", file=sys.stderr)
        return 0

    p.set_defaults(handler=scaling_fit_curve)

    p = ssub.add_parser("predict-curve", help="predict a loss curve under an LR schedule",
                        description="Print CSV step,lr,predicted_loss for a schedule, from the JSON of fit-curve. "
                        "SCHEDULE is a CSV of step,lr (same interpolation as fit-curve), a run's config.yaml, or a "
                        "small YAML with lr and the trainer's schedule keys (kind wsd|cosine|constant, total_steps, "
                        "warmup_steps, decay_steps or decay_start, decay exp|linear|cosine|1-sqrt, half_life, floor, "
                        "cosine_period); YAML schedules are evaluated by minicpm/optim/schedule.py.")
    p.add_argument("fit", metavar="FIT_JSON")
    p.add_argument("schedule", metavar="SCHEDULE")
    p.add_argument("--every", type=int, help="print every K-th step (default: about 1000 rows)")
    p.add_argument("--plot", metavar="DIR", help="write predicted_curve.png into DIR")

    def scaling_predict_curve(args) -> int:
        from minicpm.laws.commands import predict_curve

        csv, written = predict_curve(args.fit, args.schedule, every=args.every, plot=args.plot)
        sys.stdout.write(csv)
        sys.stdout.flush()
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
        return 0

    p.set_defaults(handler=scaling_predict_curve)
    register_campaign_commands(ssub)
    register_plan_command(sub)


def register_campaign_commands(ssub) -> None:
    """scaling campaign and compare-schedules (WSD campaign issue)."""
    p = ssub.add_parser("campaign", help="WSD scaling campaign: one stable run per size, decays branched at k*N "
                                         "tokens, the (N, D, loss) table and its fit",
                        description="Train the campaign of SPEC.yaml (see minicpm/experiments/campaign_spec.py): per "
                        "size a stable run with a checkpoint at each decay point and one decay branch from each, in "
                        "parallel processes; write DIR/campaign.csv (size,N,D,flops,loss,bpb,run) and DIR/fit.txt, "
                        "and print the tokens trained against one cosine run per (size, point). Re-running resumes.")
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--workers", type=int, metavar="N", help="runs at once (default: the spec's; 0: in this process)")
    p.add_argument("--no-fit", action="store_true", help="write the table only")
    add_launcher_options(p)

    def campaign(args) -> int:
        from minicpm.scaling.campaign import run_campaign

        result = run_campaign(args.spec, args.out, workers=args.workers, launcher=launcher_values(args),
                              fit=not args.no_fit, echo=lambda line: print(line, flush=True))
        print(result.summary())
        return 0

    p.set_defaults(handler=campaign)

    p = ssub.add_parser("compare-schedules", help="cosine vs WSD (10%%, 2.5%% decay) vs constant LR at equal tokens",
                        description="For each size and run length D of SPEC.yaml: a cosine run (T = D, to 10%% of "
                        "the LR), WSD branches decaying over each of decay_fractions of D from one stable run, and "
                        "the stable run itself (constant LR) at D. Writes DIR/schedules.csv and DIR/schedules.png "
                        "(paper Fig. 5/6). Re-running resumes.")
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--workers", type=int, metavar="N", help="runs at once (default: the spec's; 0: in this process)")
    add_launcher_options(p)

    def compare_schedules(args) -> int:
        from minicpm.scaling.schedules import compare_schedules as run

        result = run(args.spec, args.out, workers=args.workers, launcher=launcher_values(args),
                     echo=lambda line: print(line, flush=True))
        print(result.summary())
        return 0

    p.set_defaults(handler=compare_schedules)


def add_launcher_options(p) -> None:
    """How each run starts (minicpm.jobs), over the spec's launcher, nproc_per_node and slurm keys."""
    from minicpm.jobs.launchers import LAUNCHERS

    p.add_argument("--launcher", choices=LAUNCHERS, help="local: child processes of this one; torchrun: each run a "
                   "torchrun job; slurm: each run a Slurm job through submitit, a decay submitted once its checkpoint "
                   "exists (default: the spec's launcher, else local)")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="processes per run, with --launcher torchrun or slurm (default: the spec's, else 1)")
    slurm = p.add_argument_group("slurm (with --launcher slurm; default: the spec's slurm keys)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--gpus", type=int, help="GPUs per run (default 0)")
    slurm.add_argument("--time", type=int, metavar="MIN", help="time limit of each run in minutes (default 60)")
    slurm.add_argument("--cpus", type=int, help="CPUs per run (default: Slurm's)")


def launcher_values(args) -> dict:
    return dict(kind=args.launcher, nproc_per_node=args.nproc_per_node, partition=args.partition, gpus=args.gpus,
                time=args.time, cpus=args.cpus)


def register_plan_command(sub) -> None:
    """plan."""

    def plan(args) -> int:
        from minicpm.scaling.planner import make_plan, write_plan

        result, cfg = make_plan(args.budget, args.campaign, windtunnel=args.windtunnel, holdout=args.holdout,
                                bootstrap=args.bootstrap, confidence=args.confidence, seed=args.seed,
                                batch_tokens=args.batch_tokens)
        print(result.text(), flush=True)
        for path in write_plan(result, cfg, args.out):
            print(f"wrote {path}")
        return 0

    p = sub.add_parser(
        "plan", help="plan a compute-optimal run from a scaling campaign: model, tokens, batch, lr, WSD, loss",
        description="From DIR/campaign.csv (minicpm scaling campaign): fit L(N, D), take the compute-optimal N for "
                    "the budget snapped to a shape of the campaign's family, D = C/6N, the batch size (the wind "
                    "tunnel's bs law, else the paper's 1.21e9/L^6.24), the lr (the wind tunnel's μP optimum, else "
                    "0.01), WSD with a 10% exponential decay, and the predicted final loss with its bootstrap "
                    "interval and curve. Writes PLAN.yaml, which `minicpm train PLAN.yaml --out RUN` runs as is, and "
                    "PLAN.prediction.json beside it (for `minicpm report RUN --prediction PLAN.yaml`).")
    library = LibraryFunction("minicpm.scaling.planner:make_plan")
    p.add_argument("--budget", type=float, required=True, metavar="FLOPS", help="training compute, C = 6ND")
    p.add_argument("--campaign", required=True, metavar="DIR", help="a scaling campaign's directory (campaign.csv)")
    p.add_argument("--windtunnel", metavar="DIR",
                   help="where windtunnel batch-size / lr-transfer wrote result.json (DIR or its subdirectories)")
    p.add_argument("--holdout", choices=("largest",),
                   help="largest: also refit without the largest size and report how far it predicts that size")
    p.add_argument("--out", required=True, metavar="PLAN.yaml", help="the training config to write")
    p.add_argument("--batch-tokens", type=int, metavar="N",
                   help="use this batch (tokens per step) instead of a batch-size law")
    p.add_argument("--bootstrap", type=int, default=library.default("bootstrap"),
                   help="bootstrap resamples of runs (default %(default)s)")
    p.add_argument("--confidence", type=float, default=library.default("confidence"),
                   help="interval level (default %(default)s)")
    p.add_argument("--seed", type=int, default=library.default("seed"), help="bootstrap seed (default %(default)s)")
    p.set_defaults(handler=plan)
