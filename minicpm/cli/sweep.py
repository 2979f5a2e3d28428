"""`minicpm sweep`: a hyper-parameter sweep, every trial a run directory."""

from __future__ import annotations

import argparse

from minicpm.cli.parser import LibraryFunction


def register_sweep_commands(sub) -> None:
    """sweep."""

    p = sub.add_parser(
        "sweep", help="hyper-parameter sweep (grid | random | TPE via Optuna); every trial is a run directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the trials of SPEC.yaml, each `minicpm train` in its own process under DIR/runs/, and "
                    "write DIR/trials.csv. Re-running the command resumes: finished trials are kept, interrupted "
                    "ones run again. The study lives in DIR/study.journal, or in --storage URL (PostgreSQL) "
                    "shared by workers on many machines:\n"
                    "  minicpm sweep lr.yaml --out sweeps/lr\n"
                    "  minicpm sweep lr.yaml --out /shared/lr --storage postgresql://u:p@db/optuna --worker\n"
                    "  minicpm sweep lr.yaml --out /shared/lr --launcher slurm --jobs 8 --partition gpu --gpus 1\n"
                    "Spec keys: base {config, overrides}, space {dotted.key: [choices] | {low, high, log}}, "
                    "sampler, trials, metric, direction, workers, threads, pruner (median | hyperband), seed, name "
                    "(see minicpm/experiments/sweep_spec.py).")
    library = LibraryFunction("minicpm.sweep.sweep:run_sweep")
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (runs/, trials.csv, the study)")
    p.add_argument("--storage", metavar="URL", help="an SQLAlchemy URL for the study (e.g. postgresql://...); "
                   "default: DIR/study.journal")
    p.add_argument("--worker", action="store_true",
                   help="join the study and run trials only (no trials.csv): for many machines on one --storage")
    p.add_argument("--workers", type=int, metavar="N", help="parallel trials in this process (default: the spec's)")
    p.add_argument("--stale-after", type=float, default=library.default("stale_after"), metavar="S",
                   help="a trial of another host whose heartbeat is older than S seconds is re-run "
                        "(default %(default)s)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: run here (default); slurm: submit --jobs worker jobs through submitit")
    slurm_options = LibraryFunction("minicpm.jobs.slurm:SlurmOptions")
    slurm = p.add_argument_group("slurm (with --launcher slurm)")
    slurm.add_argument("--jobs", type=int, default=1, help="worker jobs to submit (default %(default)s)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--gpus", type=int, default=slurm_options.default("gpus"),
                       help="GPUs per node (default %(default)s)")
    slurm.add_argument("--time", type=int, default=slurm_options.default("time"), metavar="MIN",
                       help="time limit in minutes (default %(default)s)")
    slurm.add_argument("--nodes", type=int, default=slurm_options.default("nodes"),
                       help="nodes per job (default %(default)s)")
    slurm.add_argument("--cpus", type=int, default=None, help="CPUs per task (default: Slurm's)")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting")

    def sweep(args) -> int:
        if args.launcher == "slurm":
            from minicpm.jobs.slurm import SlurmOptions
            from minicpm.sweep.workers import submit_workers, worker_script

            options = SlurmOptions(partition=args.partition, gpus=args.gpus, time=args.time, nodes=args.nodes,
                                   cpus=args.cpus)
            if args.dry_run:
                print(worker_script(args.spec, args.out, options, storage=args.storage), end="")
                return 0
            for job in submit_workers(args.spec, args.out, options, jobs=args.jobs, storage=args.storage):
                print(f"submitted worker job {job.job_id} (logs: {job.paths.stdout})")
            print(f"then: minicpm sweep {args.spec} --out {args.out}"
                  f"{' --storage URL' if args.storage else ''} writes trials.csv")
            return 0
        from minicpm.sweep.sweep import run_sweep
        from minicpm.sweep.spec import load_spec

        result = run_sweep(args.spec, args.out, storage=args.storage, workers=args.workers, worker=args.worker,
                           stale_after=args.stale_after, echo=lambda line: print(line, flush=True))
        print(result.summary(load_spec(args.spec).metric))
        return 0

    p.set_defaults(handler=sweep)
