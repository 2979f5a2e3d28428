"""`minicpm reproduce`: the paper's findings at CPU scale in one command."""

from __future__ import annotations

from minicpm.cli.parser import LibraryFunction
from minicpm.cli.scaling import add_launcher_options, launcher_values


def register_reproduce_command(sub) -> None:
    def reproduce(args) -> int:
        from minicpm.reproduce.run import reproduce as run

        result = run(args.out, quick=args.quick, scale=args.scale, data=args.data, workers=args.workers,
                     launcher=launcher_values(args), plan=args.plan)
        print(result.table())
        print(f"results: {result.results}\nreport: {result.report}")
        return 1 if result.failed else 0

    library = LibraryFunction("minicpm.reproduce.run:reproduce")
    p = sub.add_parser("reproduce", help="the paper's findings (μP transfer, WSD vs cosine, the WSD scaling law, "
                                         "batch size, decay dynamics, two-stage pretraining, loss-curve prediction) "
                                         "at CPU scale, each judged against the paper",
                       description="Train every run of the plan on the quickstart's corpus (make it first with "
                                   "`minicpm quickstart`), judge each finding with intervals over seeds, and write "
                                   "OUT/results.json and OUT/report.html. The same command again resumes. Full plan "
                                   "~45 min on 2 CPU cores, --quick ~14 min (docs/guides/reproduce.md).")
    p.add_argument("--out", required=True, help="where the runs, results.json and report.html go")
    p.add_argument("--quick", action="store_true", help="fewer widths, token counts and seeds: the same report")
    p.add_argument("--scale", type=float, default=library.default("scale"),
                   help="multiply every width and token count (a GPU machine; default %(default)s)")
    p.add_argument("--data", default=library.default("data"),
                   help="the quickstart's directory: its prepared corpus and tokenizer (default ./%(default)s)")
    p.add_argument("--workers", type=int, default=library.default("workers"),
                   help="runs at a time, one thread each (default %(default)s)")
    p.add_argument("--plan", choices=("full", "quick", "toy"), default=None,
                   help="a named plan instead of --quick (toy: seconds, for tests)")
    add_launcher_options(p)
    p.set_defaults(handler=reproduce)
