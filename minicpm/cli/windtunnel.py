"""`minicpm coordcheck | windtunnel lr-transfer | search | batch-size`: the wind-tunnel experiments of paper §3."""

from __future__ import annotations

from minicpm.cli.parser import LibraryFunction
from minicpm.errors import MiniCPMError


def register_windtunnel_commands(sub) -> None:
    """coordcheck, windtunnel lr-transfer, search, batch-size."""

    p = sub.add_parser(
        "coordcheck", help="μP coordinate check: activation scales over widths x steps, μP against SP, a plot",
        description="Train each width a few AdamW steps on one fixed batch and record mean |activation| per layer "
                    "kind (embedding, attention, MLP, residual stream, logits), under μP and under standard "
                    "parametrisation (SP). Prints a verdict per parametrisation, writes coordcheck.png and "
                    "coordcheck.json into --out, and exits 1 when μP is not width-stable.")
    library = LibraryFunction("minicpm.windtunnel.coordcheck:run_coordcheck")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512],
                   help="hidden sizes, multiples of the head size (default: %(default)s)")
    p.add_argument("--steps", type=int, default=library.default("steps"), help="AdamW steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=library.default("lr"), help="base learning rate (default %(default)s)")
    p.add_argument("--layers", type=int, default=library.default("layers"), help="layers (default %(default)s)")
    p.add_argument("--seed", type=int, default=library.default("seed"),
                   help="seed of the weights and the batch (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=library.default("tolerance"),
                   help="largest ratio across widths still called stable (default %(default)s)")
    p.add_argument("--out", default="coordcheck", help="where the plot and JSON go (default: ./coordcheck)")

    def coordcheck(args) -> int:
        from minicpm.windtunnel.coordcheck import run_coordcheck

        result = run_coordcheck(args.widths, steps=args.steps, lr=args.lr, layers=args.layers, seed=args.seed,
                                tolerance=args.tolerance, out=args.out)
        for verdict in result.verdicts.values():
            print(verdict.line())
        for path in result.written:
            print(f"wrote {path}")
        return 0 if result.mup_stable else 1

    p.set_defaults(handler=coordcheck)

    tunnel = sub.add_parser("windtunnel", help="wind-tunnel experiments on small proxies (paper section 3)")
    wsub = tunnel.add_subparsers(dest="windtunnel_command", metavar="SUBCOMMAND")
    tunnel.set_defaults(handler=lambda args: tunnel.print_help() or 2)
    p = wsub.add_parser(
        "lr-transfer", help="sweep a log2 learning-rate grid at several widths, under μP and SP; optimum per width",
        description="For each width and each parametrisation (μP: dim_model_base = the base width; SP: "
                    "dim_model_base = the width), a grid sweep of optim.lr = 2^k, every trial a run directory under "
                    "DIR/{mup,sp}/wWIDTH/runs/. Prints the optimum per width and its shift in x2 steps; writes "
                    "DIR/lr_transfer.png (the paper's Fig. 3) and DIR/result.json. Re-running resumes.")
    p.add_argument("config_and_overrides", nargs="+", metavar="CONFIG [KEY=VALUE ...]",
                   help="the proxy's training recipe, then dotted overrides")
    library = LibraryFunction("minicpm.windtunnel.lr_transfer:lr_transfer")
    p.add_argument("--widths", type=int, nargs="+", required=True, help="hidden sizes, e.g. 64 128 256")
    p.add_argument("--log2-lr", type=int, nargs=2, required=True, metavar=("FROM", "TO"),
                   help="learning rates 2^FROM ... 2^TO, e.g. -10 -4")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--head-dim", type=int, default=library.default("head_dim"),
                   help="head size; heads = width / head size (default %(default)s)")
    p.add_argument("--base-width", type=int, help="μP base width (default: the smallest width)")
    p.add_argument("--metric", default=library.default("metric"),
                   help="metrics.jsonl key to minimise (default %(default)s)")
    p.add_argument("--workers", type=int, default=library.default("workers"),
                   help="parallel trials (default %(default)s)")
    p.add_argument("--only", choices=("mup", "sp"), help="run one parametrisation only")
    p.add_argument("--seeds", type=int, nargs="+", default=library.default("seeds"),
                   help="run.seed values: each learning rate is trained once per seed and its loss averaged "
                        "(default: %(default)s)")

    def lr_transfer(args) -> int:
        from minicpm.windtunnel.lr_transfer import lr_transfer as run
        from minicpm.train.launch import split_config_and_overrides

        config, overrides = split_config_and_overrides(args.config_and_overrides)
        if config is None:
            raise MiniCPMError("give the proxy's training recipe (a YAML file) first")
        low, high = args.log2_lr
        if low > high:  # a reversed range is a typo more often than a wish: it would start a whole grid
            raise MiniCPMError(f"--log2-lr {low} {high}: FROM must not exceed TO (e.g. --log2-lr {high} {low})")
        result = run(config, overrides, widths=args.widths, log2_lrs=range(low, high + 1), out=args.out,
                     head_dim=args.head_dim, base_width=args.base_width, metric=args.metric, workers=args.workers,
                     parametrisations=(args.only,) if args.only else ("mup", "sp"), seeds=args.seeds,
                     echo=lambda line: print(line, flush=True))
        print(result.table())
        for path in result.written:
            print(f"wrote {path}")
        return 0

    p.set_defaults(handler=lr_transfer)

    p = wsub.add_parser(
        "search", help="TPE search of scale_emb, scale_depth, init_std and lr on a proxy trained for D = 10N tokens",
        description="Paper App. A.1: a Bayesian (TPE, Optuna) sweep over model.scale_emb, model.scale_depth, "
                    "model.initializer_range (init_std) and optim.lr, each on a log scale, on the proxy CONFIG "
                    "with schedule.total_steps set so that it sees D = --tokens-per-param x N tokens (N: "
                    "non-embedding parameters). Every trial is a run directory under DIR/runs/; re-running "
                    "resumes. Writes DIR/search.png (the metric against each hyper-parameter), "
                    "DIR/importance.png (fANOVA importances) and DIR/result.json.")
    p.add_argument("config_and_overrides", nargs="+", metavar="CONFIG [KEY=VALUE ...]",
                   help="the proxy's training recipe, then dotted overrides")
    p.add_argument("--out", required=True, metavar="DIR")
    library = LibraryFunction("minicpm.windtunnel.search:search")
    p.add_argument("--trials", type=int, default=library.default("trials"),
                   help="finished trials wanted (default %(default)s)")
    p.add_argument("--tokens-per-param", type=float, default=library.default("tokens_per_param"),
                   help="D / N, tokens per non-embedding parameter (default %(default)s, the paper's)")
    p.add_argument("--params", nargs="+", default=library.default("params"),
                   choices=["scale_emb", "scale_depth", "init_std", "lr"], help="what to search (default: all)")
    p.add_argument("--range", action="append", default=[], metavar="NAME=LOW:HIGH",
                   help="a log-scale range, e.g. lr=0.002:0.05 (defaults: scale_emb 1:64, scale_depth 0.25:8, "
                        "init_std 0.01:1, lr 0.001:0.1)")
    p.add_argument("--metric", default=library.default("metric"),
                   help="metrics.jsonl key to minimise (default %(default)s)")
    p.add_argument("--workers", type=int, default=library.default("workers"),
                   help="parallel trials (default %(default)s)")
    p.add_argument("--threads", type=int, default=library.default("threads"),
                   help="torch threads per trial (default %(default)s)")
    p.add_argument("--seed", type=int, default=library.default("seed"), help="the sampler's seed (default %(default)s)")

    def search(args) -> int:
        from minicpm.windtunnel.search import parse_ranges
        from minicpm.windtunnel.search import search as run
        from minicpm.train.launch import split_config_and_overrides

        config, overrides = split_config_and_overrides(args.config_and_overrides)
        if config is None:
            raise MiniCPMError("give the proxy's training recipe (a YAML file) first")
        result = run(config, overrides, out=args.out, trials=args.trials, tokens_per_param=args.tokens_per_param,
                     ranges=parse_ranges(args.range), params=args.params, metric=args.metric, workers=args.workers,
                     threads=args.threads, seed=args.seed, echo=lambda line: print(line, flush=True))
        print(result.table())
        for path in result.written:
            print(f"wrote {path}")
        return 0

    p.set_defaults(handler=search)

    p = wsub.add_parser(
        "batch-size", help="the optimal batch size against the loss, bs = a / L^b, from runs (paper App. A.2)",
        description="From runs that differ in batch.tokens_per_step (run directories, or sweep directories whose "
                    "runs/ hold them): the tokens each needed to reach each target loss, the batch size needing the "
                    "fewest per target (a parabola in log batch size), then bs = a / L^b fitted with a bootstrap "
                    "interval. Writes DIR/batch_size.png and DIR/result.json.")
    library = LibraryFunction("minicpm.windtunnel.batch_size:batch_size_law")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--targets", type=float, nargs="+", metavar="L",
                   help="target losses (default: --count log-spaced between what every run and three runs reach)")
    p.add_argument("--count", type=int, default=library.default("count"),
                   help="targets when --targets is not given (default %(default)s)")
    p.add_argument("--loss-key", default=library.default("loss_key"),
                   help="metrics.jsonl key of the loss (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=library.default("bootstrap"),
                   help="bootstrap resamples (default %(default)s)")
    p.add_argument("--out", metavar="DIR", help="where the plot and result.json go")

    def batch_size(args) -> int:
        from minicpm.windtunnel.batch_size import batch_size_law

        result = batch_size_law(args.runs, targets=args.targets, count=args.count, loss_key=args.loss_key,
                                out=args.out, bootstrap=args.bootstrap)
        print(result.table())
        for path in result.written:
            print(f"wrote {path}")
        return 0

    p.set_defaults(handler=batch_size)
