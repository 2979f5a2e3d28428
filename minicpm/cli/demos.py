"""`minicpm quickstart | align-demo`: the end-to-end demos on the built-in stdlib corpus."""

from __future__ import annotations

from minicpm.cli.parser import LibraryFunction


def register_demo_commands(sub) -> None:
    """quickstart, align-demo."""

    def quickstart(args):
        from minicpm.demos.quickstart import run_quickstart

        run_quickstart(args.out, device=args.device)

    p = sub.add_parser("quickstart", help="tokenizer, data, WSD pretraining with a decay branch, samples and a "
                                          "report, on the built-in stdlib corpus in a few minutes on a CPU")
    library = LibraryFunction("minicpm.demos.quickstart:run_quickstart")
    p.add_argument("--out", default=library.default("out"), help="where everything goes (default: ./%(default)s)")
    p.add_argument("--device", default=library.default("device"), help="auto | cpu | cuda (default %(default)s)")
    p.set_defaults(handler=quickstart)

    def align_demo(args):
        from minicpm.demos.align import AlignRecipe, run_align_demo
        run_align_demo(args.out, device=args.device, recipe=AlignRecipe(sft_steps=args.sft_steps, dpo=not args.no_dpo))

    p = sub.add_parser("align-demo", help="the step after the quickstart: SFT, then DPO, on stdlib docstrings",
                       description="Fine-tune the quickstart's decayed model (under --out) on questions about "
                                   "documented stdlib functions answered by their docstrings (configs/sft.yaml: "
                                   "loss on the answers, packed conversations kept apart, μP lr 1e-3 decaying) and "
                                   "print the held-out answer loss before and after SFT; then DPO on preference "
                                   "pairs (chosen: a function's summary line, rejected: the same cut mid-sentence) and "
                                   "the held-out preference accuracy before and after. No download.")
    library = LibraryFunction("minicpm.demos.align:run_align_demo")
    p.add_argument("--out", default=library.default("out"), help="the quickstart's directory (default %(default)s)")
    p.add_argument("--device", default=library.default("device"), help="auto | cpu | cuda (default %(default)s)")
    recipe = LibraryFunction("minicpm.demos.align:AlignRecipe")
    p.add_argument("--sft-steps", type=int, default=recipe.default("sft_steps"),
                   help="SFT steps of 8192 tokens (default %(default)s)")
    p.add_argument("--no-dpo", action="store_true", help="stop after SFT (by default DPO follows on preference pairs)")
    p.set_defaults(handler=align_demo)
