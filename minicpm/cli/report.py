"""`minicpm report`: plots and a self-contained report.html for runs or a sweep."""

from __future__ import annotations


def register_report_commands(sub) -> None:
    """report."""

    def report(args):
        from minicpm.sweep.report import is_sweep_dir, summary_lines, write_sweep_report
        from minicpm.report.run import write_report

        if len(args.runs) == 1 and is_sweep_dir(args.runs[0]):  # a sweep directory (trials.csv): draw the sweep
            from minicpm.sweep.report import read_sweep

            print("\n".join(summary_lines(read_sweep(args.runs[0]))))
            written = write_sweep_report(args.runs[0], args.out)
        else:
            written = write_report(args.runs, args.out, prediction=args.prediction)
            if args.prediction:
                from minicpm.scaling.prediction import against_prediction
                from minicpm.report.run import load_run

                print(against_prediction(load_run(args.runs[0]), args.prediction)[0])
        for path in written:
            print(f"wrote {path}")

    p = sub.add_parser("report", help="plots and a self-contained report.html for one or more runs, or a sweep")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (a stable run and its branches overlay), "
                   "or one sweep directory (with trials.csv: the metric against each parameter, best and failed "
                   "trials)")
    p.add_argument("--out", help="where report.html and the PNGs go (default: the first RUN)")
    p.add_argument("--prediction", metavar="PLAN_OR_FIT",
                   help="draw the first RUN against a prediction (PLAN.yaml of minicpm plan, or the JSON of scaling "
                        "fit-curve or scaling fit) in prediction.png, and print how far its last eval is from it")
    p.set_defaults(handler=report)
