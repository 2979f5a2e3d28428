"""`minicpm eval tasks | loss | passkey | positions`: a checkpoint's scores."""

from __future__ import annotations

import argparse
import sys

from minicpm.cli.parser import LibraryFunction


def count_or_fraction(text: str) -> int | float:
    """A count (1 and above, whole) or a fraction (below 1), as lm-eval's limit takes them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction below 1, got {text!r}") from None
    return value if value < 1 else int(value)


def register_eval_commands(sub) -> None:
    """eval tasks, loss, passkey, positions."""
    from minicpm.interop.formats import WEIGHT_DTYPES

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint (lm-evaluation-harness tasks)",
                              description="Evaluation of a checkpoint.")
    esub = evaluate.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    evaluate.set_defaults(handler=lambda args: evaluate.print_help() or 2)

    p = esub.add_parser("tasks", help="run lm-evaluation-harness tasks offline (built in: stdlib_names)",
                        description="Run lm-evaluation-harness tasks on CHECKPOINT in this process, offline (local "
                                    "task YAMLs and data, or data already in the HF datasets cache), and print "
                                    "lm-eval's table. Built in: stdlib_names, a 4-way multiple-choice task made from "
                                    "this Python's standard library (name a function from its first lines; 25%% is "
                                    "chance). Needs the eval extra: pip install 'minicpm[eval]'.")
    library = LibraryFunction("minicpm.eval.task_runner:evaluate_tasks")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory (config.json + weights + tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names or globs, e.g. stdlib_names")
    p.add_argument("--include-path", action="append", metavar="DIR", help="a folder of task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, else 0)")
    p.add_argument("--limit", type=count_or_fraction, default=None,
                   help="examples per task (below 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=library.default("batch_size"),
                   help="requests per forward pass (default %(default)s)")
    p.add_argument("--device", default=library.default("device"),
                   help="torch device, e.g. cpu, cuda (default %(default)s)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=None, help="weights dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside CHECKPOINT)")
    p.add_argument("--output", metavar="FILE", default=None, help="also write the results JSON to FILE")

    def tasks(args) -> int:
        from minicpm.eval.task_runner import evaluate_tasks, format_results

        results = evaluate_tasks(args.checkpoint, args.tasks, include_path=args.include_path,
                                 num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                                 device=args.device, output=args.output, tokenizer=args.tokenizer, dtype=args.dtype)
        print(format_results(results))
        if args.output:
            print(f"wrote {args.output}", file=sys.stderr)
        return 0

    p.set_defaults(handler=tasks)
    register_long_context_eval_commands(esub)


# ---------------------------------------------------------------- long context: eval loss, eval passkey, extend


def register_long_context_eval_commands(esub) -> None:
    """eval loss, eval passkey, eval positions (long-context issue), under the `eval` group."""
    from minicpm.interop.formats import WEIGHT_DTYPES

    p = esub.add_parser("loss", help="total and per-token NLL of a text file (compare with other runtimes)",
                        description="Encode FILE with the checkpoint's tokenizer (no BOS added), run one forward "
                                    "pass and print the summed and mean negative log-likelihood in nats of tokens "
                                    "1..n-1; with --per-token also each token's.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint, run or official HF model directory")
    library = LibraryFunction("minicpm.eval.token_loss:text_loss")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    p.add_argument("--per-token", action="store_true", help="also print each token's NLL")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside CHECKPOINT)")
    p.add_argument("--device", default=library.default("device"), help="torch device (default %(default)s)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=library.default("dtype"),
                   help="weights dtype (default %(default)s)")

    def loss(args) -> int:
        import json

        from minicpm.eval.token_loss import format_text_loss, text_loss

        result, codec = text_loss(args.checkpoint, args.text, tokenizer=args.tokenizer, device=args.device,
                                  dtype=args.dtype)
        if args.json:
            print(json.dumps(result.as_dict(per_token=args.per_token, decode=codec.decode)))
        else:
            print(format_text_loss(result, per_token=args.per_token, decode=codec.decode))
        return 0

    p.set_defaults(handler=loss)

    p = esub.add_parser("passkey", help="passkey retrieval accuracy over lengths and depths: heatmap PNG + JSON",
                        description="Hide a random key in [1, 50000] in noise text (Landmark Attention's prompt) at "
                                    "each depth of prompts of each length, decode greedily, and count a trial right "
                                    "when the first integer written is the key. Writes OUT/passkey.json and "
                                    "OUT/passkey.png (accuracy, length against depth).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint, run or official HF model directory")
    library = LibraryFunction("minicpm.eval.passkey:evaluate_passkey_checkpoint")
    p.add_argument("--lengths", type=int, nargs="+", required=True, metavar="N", help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D",
                   help="needle depths as fractions of the noise (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--trials", type=int, default=4, help="keys per cell (default %(default)s)")
    p.add_argument("--seed", type=int, default=library.default("seed"), help="seed of the keys (default %(default)s)")
    p.add_argument("--out", default="passkey", help="directory for passkey.json and passkey.png (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside CHECKPOINT)")
    p.add_argument("--device", default=library.default("device"), help="torch device (default %(default)s)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=library.default("dtype"),
                   help="weights dtype (default %(default)s)")

    def passkey(args) -> int:
        from minicpm.eval.passkey import evaluate_passkey_checkpoint, write_passkey_report

        result = evaluate_passkey_checkpoint(args.checkpoint, lengths=args.lengths, depths=args.depths,
                                             trials=args.trials, seed=args.seed, tokenizer=args.tokenizer,
                                             device=args.device, dtype=args.dtype)
        for n, accuracy in result.by_length().items():
            print(f"length {n}: passkey accuracy {accuracy:.1%}")
        print(f"mean: {result.mean:.1%}")
        for path in write_passkey_report(result, args.out, title=f"passkey: {args.checkpoint}"):
            print(f"wrote {path}", file=sys.stderr)
        return 0

    p.set_defaults(handler=passkey)

    p = esub.add_parser("positions", help="loss by token position of checkpoints on long held-out documents: "
                                          "PNG + JSON",
                        description="The mean next-token loss at each position (in --buckets equal ranges) of each "
                                    "CHECKPOINT on the same held-out documents: the first --seq-len + 1 tokens of "
                                    "held-out documents of the --data datasets at least that long. The curve that "
                                    "shows whether a model uses, or breaks on, context beyond the length it was "
                                    "trained at. Writes OUT/positions.json and OUT/positions.png.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoints or run directories to compare")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="prepared datasets (their val split)")
    library = LibraryFunction("minicpm.eval.position_loss:evaluate_position_checkpoints")
    p.add_argument("--seq-len", type=int, required=True, metavar="N", help="positions per document")
    p.add_argument("--documents", type=int, default=library.default("documents"),
                   help="held-out documents (default %(default)s)")
    p.add_argument("--buckets", type=int, default=library.default("buckets"),
                   help="equal position ranges (default %(default)s)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per checkpoint (default: the paths)")
    p.add_argument("--mark", type=int, default=None, metavar="N",
                   help="draw a dashed line at position N (e.g. the length trained at)")
    p.add_argument("--out", default="positions", help="directory for positions.json/.png (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside each CHECKPOINT)")
    p.add_argument("--device", default=library.default("device"), help="torch device (default %(default)s)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=library.default("dtype"),
                   help="weights dtype (default %(default)s)")

    def positions(args) -> int:
        from minicpm.eval.position_loss import evaluate_position_checkpoints, write_position_report

        report = evaluate_position_checkpoints(args.checkpoints, args.data, seq_len=args.seq_len,
                                               documents=args.documents, buckets=args.buckets, labels=args.labels,
                                               tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)
        print(report.table())
        for path in write_position_report(report, args.out, mark=args.mark):
            print(f"wrote {path}", file=sys.stderr)
        return 0

    p.set_defaults(handler=positions)
