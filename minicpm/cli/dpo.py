"""`minicpm dpo prepare | precompute-ref | demo`: preference pairs, cached reference log-probs, the DPO demo."""

from __future__ import annotations

from minicpm.cli.parser import LibraryFunction


def register_dpo_commands(sub) -> None:
    """dpo prepare | precompute-ref | demo (SFT and DPO issue, DPO half). Training is `minicpm train
    configs/dpo.yaml ...`."""

    dpo = sub.add_parser("dpo", help="preference pairs, cached reference log-probs, and the DPO demo",
                         description="Direct preference optimisation. Prepare pairs, compute the reference's "
                                     "log-probs once, then train with `minicpm train minicpm/configs/dpo.yaml "
                                     "data.stable={PAIRS_DIR: 1.0} run.init_weights_from=CKPT --out RUN`.")
    dsub = dpo.add_subparsers(dest="dpo_command", metavar="COMMAND")

    p = dsub.add_parser(
        "prepare", help="check and tokenize a pairs JSONL into a prepared pairs directory",
        description="Each line: {prompt, chosen, rejected} (text), {messages, chosen, rejected} (a conversation, "
                    "rendered with the chat template), or {prompt_ids, chosen_ids, rejected_ids} (pre-tokenized). "
                    "A bad line (missing or empty field, chosen identical to rejected, a prompt leaving no room for "
                    "an answer within --seq-len) is one error naming FILE:LINE and nothing is written; pairs "
                    "longer than --seq-len are skipped and counted.")
    library = LibraryFunction("minicpm.data.pairs:prepare_pairs")
    p.add_argument("source", metavar="PAIRS.jsonl")
    p.add_argument("--out", required=True, help="the pairs directory to create")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding one (needed for text pairs)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens a pair's prompt + answer may take")
    p.add_argument("--val-fraction", type=float, default=library.default("val_fraction"),
                   help="share of pairs held out for the preference evaluator (default: %(default)s)")
    p.add_argument("--template", help="chat template of messages lines (default: minicpm)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    def prepare(args) -> int:
        from minicpm.data.pairs import prepare_pairs

        result = prepare_pairs(args.source, args.out, seq_len=args.seq_len, tokenizer=args.tokenizer,
                               val_fraction=args.val_fraction, template=args.template, overwrite=args.overwrite)
        print(f"wrote {result.out}: {result.counts['train']:,} train and {result.counts['val']:,} held-out pairs, "
              f"rows of {result.pad_to} tokens")
        if result.skipped:
            print(f"skipped {result.skipped:,} pair(s) longer than --seq-len {args.seq_len}")
        return 0

    p.set_defaults(handler=prepare)

    p = dsub.add_parser(
        "precompute-ref", help="compute the reference model's log-probs of every pair once, next to the data",
        description="Run the reference (the checkpoint DPO starts from) over every pair of a prepared pairs "
                    "directory and store the answers' log-probs in DIR/reference/, so that a DPO run with "
                    "objective.options.reference=cached keeps only the policy in memory and skips the reference "
                    "forward. Use the precision the run trains in (--dtype).")
    p.add_argument("checkpoint", metavar="CKPT", help="the reference: a checkpoint, run directory or HF model")
    library = LibraryFunction("minicpm.train.dpo:precompute_reference")
    p.add_argument("--data", required=True, help="a prepared pairs directory")
    p.add_argument("--batch-size", type=int, default=library.default("batch_size"),
                   help="pairs per forward pass (default: %(default)s)")
    p.add_argument("--device", default=library.default("device"), help="auto | cpu | cuda (default %(default)s)")
    p.add_argument("--dtype", default=library.default("dtype"),
                   help="auto | bf16 | fp32: the DPO run's run.dtype (default %(default)s)")

    def precompute(args) -> int:
        from minicpm.data.pairs import PreparedPairs
        from minicpm.train.dpo import precompute_reference

        path = precompute_reference(args.checkpoint, args.data, batch_size=args.batch_size, device=args.device,
                                    dtype=args.dtype)
        print(f"wrote {path} ({len(PreparedPairs(args.data)):,} train pairs)")
        return 0

    p.set_defaults(handler=precompute)

    p = dsub.add_parser(
        "demo", help="DPO on a checkpoint with stdlib docstring pairs: held-out preference accuracy before/after",
        description="Build preference pairs from the Python standard library (prompt: a function's signature; "
                    "chosen: its docstring's summary line; rejected: the same cut mid-sentence), cache the reference, "
                    "train one epoch of "
                    "DPO from CKPT and print the held-out preference accuracy before and after. No downloads.")
    library = LibraryFunction("minicpm.demos.dpo:run_dpo_demo")
    p.add_argument("checkpoint", metavar="CKPT", help="the model to align (e.g. the quickstart's, after SFT)")
    p.add_argument("--tokenizer", help="its tokenizer.json (default: the one saved with the checkpoint)")
    p.add_argument("--out", default="dpo-demo", help="where the pairs and the run go (default: %(default)s)")
    sizes = LibraryFunction("minicpm.demos.dpo:DemoSizes")
    p.add_argument("--pairs", type=int, default=sizes.default("pairs"), help="pairs to build (default: %(default)s)")
    p.add_argument("--device", default=library.default("device"), help="auto | cpu | cuda (default %(default)s)")
    p.add_argument("--template", help="chat template the checkpoint was fine-tuned with (default: plain-text "
                                      "prompts)")

    def demo(args) -> int:
        from minicpm.demos.dpo import run_dpo_demo

        run_dpo_demo(args.checkpoint, args.out, tokenizer=args.tokenizer, pairs=args.pairs, device=args.device,
                     template=args.template)
        return 0

    p.set_defaults(handler=demo)
    dpo.set_defaults(handler=lambda args: dpo.print_help() or 2)
