"""The `minicpm` command. Subcommands are thin: parse arguments, call one library function.

Each section below registers the subcommands of one part of the library; nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys

from minicpm.errors import MiniCPMError

# ---------------------------------------------------------------- model: info, init, export, import, generate

def register_model_commands(sub) -> None:
    """info, init, export, import, generate (model issue)."""
    from minicpm.interop.formats import EXPORT_FORMATS, GGUF_ARCHES, GGUF_TYPES, WEIGHT_DTYPES

    def info(args):
        from minicpm.interop.resolve import describe_model

        print(describe_model(args.model, seq_len=args.seq_len))

    def init(args):
        from minicpm.interop.initialise import init_checkpoint
        from minicpm.interop.resolve import with_overrides
        from minicpm.model.config import preset

        config = with_overrides(preset(args.preset), args.overrides)
        out = init_checkpoint(config, args.out, seed=args.seed, dtype=args.dtype, tokenizer=args.tokenizer,
                              embedding_in_2d_group=args.embedding_in_2d_group,
                              progress=lambda message: print(message, file=sys.stderr, flush=True))
        print(f"wrote {out}")

    def export(args):
        from minicpm.interop.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.out, to=args.to, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, gguf_arch=args.gguf_arch,
                                gguf_type=args.gguf_type, tokenizer=args.tokenizer)
        print(f"wrote {out} ({args.to})")

    def import_(args):
        from minicpm.interop.export import export_checkpoint

        out = export_checkpoint(args.source, args.out, to="minicpm", dtype=args.dtype,
                                max_shard_size=args.max_shard_size, official=False)
        print(f"wrote {out}")

    def generate(args):
        from minicpm.infer.generate import stream_text
        from minicpm.infer.tokenizer import find_tokenizer, load_codec
        from minicpm.interop.hf import load_model

        if args.chat:
            from minicpm.infer.chat import chat_answer
            pieces = chat_answer(args.checkpoint, args.prompt, template=args.template, tokenizer=args.tokenizer,
                                 dtype=args.dtype, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                 repetition_penalty=args.repetition_penalty, seed=args.seed)
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return
        codec = load_codec(find_tokenizer(args.checkpoint, args.tokenizer))
        model = load_model(args.checkpoint, dtype=args.dtype)
        for piece in stream_text(model, codec, args.prompt, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                 repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
                                 use_cache=not args.no_cache, compile=args.compile):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    dtypes = WEIGHT_DTYPES
    p = sub.add_parser("info", help="show a model's config, parameter counts and FLOPs per token",
                       description="Show a preset's or a checkpoint's config as a table; parameters (total, "
                                   "embedding, non-embedding N); the μP constants; training FLOPs per token.")
    p.add_argument("model", metavar="PRESET|CHECKPOINT", help="a preset name (e.g. minicpm-2.4b, tiny) or a "
                                                             "checkpoint directory")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for the FLOPs count (default: max_position_embeddings)")
    p.set_defaults(handler=info)

    p = sub.add_parser("init", help="write a freshly μP-initialised model in the official HF layout",
                       description="Write OUT/config.json + model.safetensors (random μP init) and a tokenizer "
                                   "beside them (--tokenizer, else a byte-level tokenizer.json).")
    p.add_argument("out", metavar="OUT", help="new checkpoint directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="model config fields to change, right after OUT: e.g. vocab_size=4096 num_hidden_layers=4")
    p.add_argument("--preset", required=True, help="preset name (see `minicpm info`), e.g. tiny, proxy-9m")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or tokenizer.model to put beside the weights (default: byte-level)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="weight dtype (default fp32)")
    p.add_argument("--embedding-in-2d-group", action=argparse.BooleanOptionalAction, default=False,
                   help="init the embedding like the 2-D weights (std initializer_range/√m, the literal reading of "
                        "paper Table 7); the default keeps it at initializer_range (classic μP)")
    p.set_defaults(handler=init)

    p = sub.add_parser("export", help="convert a checkpoint to a plain Llama or Mixtral (μP folded in), MiniCPM, or GGUF",
                       description="--to llama writes a checkpoint transformers' LlamaForCausalLM loads without "
                                   "custom code (μP multipliers folded into the weights, head untied); --to mixtral "
                                   "does the same for an MoE model (MixtralForCausalLM); --to minicpm "
                                   "rewrites the official MiniCPM layout (e.g. in another dtype or sharded); --to gguf "
                                   "writes one .gguf file for llama.cpp (the MiniCPM architecture with its μP scales, "
                                   "or the folded Llama), the tokenizer embedded.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("out", metavar="OUT", help="a directory (llama, minicpm) or a .gguf file (gguf)")
    p.add_argument("--to", choices=EXPORT_FORMATS, required=True, help="target format")
    p.add_argument("--dtype", choices=dtypes, default=None, help="weight dtype (default: as stored)")
    p.add_argument("--max-shard-size", default=None, help="split weights into shards, e.g. 2GB (default: one file)")
    p.add_argument("--gguf-arch", choices=GGUF_ARCHES, default="minicpm",
                   help="gguf: llama.cpp architecture (default %(default)s; llama folds the μP scales in)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                   help="gguf: tensor type (default %(default)s; q8_0 falls back to f16 for rows not a multiple of 32)")
    p.add_argument("--tokenizer", default=None, help="gguf: tokenizer to embed (default: the one beside CHECKPOINT)")
    p.set_defaults(handler=export)

    p = sub.add_parser("import", help="validate an official HF MiniCPM (or Llama) directory and copy it here",
                       description="Read SOURCE (config.json + *.safetensors, official MiniCPM keys; a plain Llama "
                                   "becomes MiniCPM with neutral multipliers), check every tensor against the config, "
                                   "and write it to OUT in the official layout with its tokenizer files.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--dtype", choices=dtypes, default=None, help="weight dtype (default: as stored)")
    p.add_argument("--max-shard-size", default=None, help="split weights into shards, e.g. 2GB (default: one file)")
    p.set_defaults(handler=import_)

    p = sub.add_parser("generate", help="sample a continuation of a prompt, streamed to stdout",
                       description="Load CHECKPOINT and its tokenizer (tokenizer.json beside it, or --tokenizer) "
                                   "and stream the continuation of --prompt to stdout.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 is off (default)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this fraction of the most likely one's probability; 0 is off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide positive logits of tokens already seen by this (as transformers does); 1 is off")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text, which is not printed (repeatable)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays for long outputs)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the one beside the checkpoint)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="compute dtype (default: as stored)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow)")
    p.add_argument("--chat", action="store_true", help="--prompt is a user's message: answer it in the checkpoint's "
                                                        "chat template, stopping at the end of the assistant's turn")
    p.add_argument("--template", choices=("minicpm", "chatml", "auto"), default=None,
                   help="--chat: chat template (default: the one the checkpoint was fine-tuned with, else the "
                        "tokenizer's own, else minicpm)")
    p.set_defaults(handler=generate)


# ---------------------------------------------------------------- data: tokenizer, prepare, data inspect

def register_data_commands(sub) -> None:
    """tokenizer train, prepare, data inspect (data issue)."""
    sources_help = (
        "SOURCES: 'stdlib' (this Python's standard-library .py files); a file (.jsonl/.ndjson: one document per "
        "line, .parquet: one per row, anything else: the whole file; .gz is decompressed); a directory (every "
        "file under it, sorted, hidden ones skipped); a glob ('data/**/*.txt'); 'text:P', 'jsonl:P' or "
        "'parquet:P' to force a format; 'hf:NAME[:SPLIT]' for a Hugging Face dataset (needs minicpm[datasets]).")

    def add_source_options(p) -> None:
        p.add_argument("sources", nargs="+", metavar="SOURCES", help="corpora to read (see above)")
        p.add_argument("--field", default="text", help="JSON lines and HF datasets: the key holding the text "
                                                       "(default: %(default)s)")
        p.add_argument("--column", default="text", help="Parquet: the column holding the text (default: %(default)s)")

    def source_options(args):
        from minicpm.data.sources import SourceOptions
        return SourceOptions(field=args.field, column=args.column)

    # minicpm tokenizer train
    tokenizer = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                               description="Tokenizer tools.")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    train = tokenizer_sub.add_parser(
        "train", help="train a byte-level BPE on corpora",
        description="Train a byte-level BPE (HF tokenizers; digits split, whitespace runs kept, every byte "
                    "encodable) with special tokens <unk>=0 <s>=1 </s>=2 <pad>=3 <|im_start|>=4 <|im_end|>=5 and "
                    "10 reserved tokens. Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json "
                    "into --out (transformers' PreTrainedTokenizerFast loads the directory). " + sources_help)
    add_source_options(train)
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in all, special tokens included "
                                                                      "(at least 272)")
    train.add_argument("--out", required=True, help="directory to write the tokenizer files into")
    train.add_argument("--max-mb", type=float, default=None,
                       help="train on at most this many MB of text, the start of the corpus (default: all)")

    def run_tokenizer_train(args) -> int:
        import time

        from minicpm.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer, vocab_size
        started = time.perf_counter()
        max_bytes = int(args.max_mb * 1e6) if args.max_mb is not None else None
        path = train_tokenizer(args.sources, args.vocab_size, args.out, max_bytes=max_bytes,
                               options=source_options(args), progress=sys.stderr.isatty())
        tok = load_tokenizer(path)
        print(f"wrote {path}: vocab {vocab_size(tok)}, hash {tokenizer_hash(tok)}, "
              f"{time.perf_counter() - started:.1f} s")
        return 0

    train.set_defaults(handler=run_tokenizer_train)
    tokenizer.set_defaults(handler=lambda args: tokenizer.print_help() or 2)

    # minicpm prepare
    prepare = sub.add_parser(
        "prepare", help="tokenize corpora into token shards",
        description="Tokenize corpora into a token shard set (meta.json, tokenizer.json, train/ and val/ with "
                    "*.bin token ids and *.idx document offsets): each document is its tokens followed by </s>, "
                    "empty documents are skipped, uint16 when the vocabulary fits else uint32. Uses WORKERS "
                    "processes; the same input gives byte-identical output whatever the worker count. The output "
                    "is built under a temporary name and renamed when complete. " + sources_help)
    add_source_options(prepare)
    prepare.add_argument("--tokenizer", required=True,
                         help="tokenizer.json, a directory holding one, or a SentencePiece .model")
    prepare.add_argument("--out", required=True, help="the dataset directory to create")
    prepare.add_argument("--val-fraction", type=float, default=0.01,
                         help="share of documents held out for validation, spread evenly (default: %(default)s)")
    prepare.add_argument("--workers", type=int, default=None,
                         help="encoding workers: threads of this process, or processes past 8 "
                              "(default: one per available core)")
    prepare.add_argument("--shard-tokens", type=int, default=None,
                         help="start a new shard past this many tokens (default: 2^28)")
    prepare.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once complete)")
    prepare.add_argument("--format", choices=("text", "chat"), default="text",
                         help="text: documents (default); chat: JSONL conversations ('messages' with roles "
                              "system/user/assistant, or 'prompt'/'response'), rendered with --template and "
                              "stored with a loss mask on the answers (for SFT, alone or in the decay mix)")
    prepare.add_argument("--template", choices=("minicpm", "chatml", "auto"), default="minicpm",
                         help="chat: the chat template (default %(default)s; auto: the tokenizer's own)")
    prepare.add_argument("--seq-len", type=int, default=2048,
                         help="chat: longest conversation kept, in tokens (longer ones are skipped and counted; a "
                              "prompt this long is an error); default %(default)s")

    def run_prepare(args) -> int:
        from minicpm.data.prepare import prepare as prepare_dataset
        from minicpm.data.shards import DEFAULT_SHARD_TOKENS
        if args.format == "chat":
            from minicpm.data.prepare_chat import prepare_chat
            result = prepare_chat(args.sources, args.tokenizer, args.out, template=args.template,
                                  seq_len=args.seq_len, val_fraction=args.val_fraction,
                                  shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, overwrite=args.overwrite)
        else:
            result = prepare_dataset(args.sources, args.tokenizer, args.out, val_fraction=args.val_fraction,
                                     workers=args.workers, options=source_options(args),
                                     shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, overwrite=args.overwrite)
        for split, s in result.splits.items():
            if s.documents:
                print(f"{split:<5} {s.documents:>9,} documents {s.tokens:>13,} tokens {s.bytes / 1e6:>10.2f} MB")
        if getattr(result, "skipped_too_long", 0):
            print(f"skipped {result.skipped_too_long:,} conversations longer than --seq-len {args.seq_len}")
        print(f"wrote {result.out} ({result.dtype}) in {result.seconds:.1f} s: {result.mb_per_s:.2f} MB/s")
        return 0

    prepare.set_defaults(handler=run_prepare)

    # minicpm data inspect | verify
    data = sub.add_parser("data", help="inspect or verify a prepared dataset", description="Prepared datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    inspect = data_sub.add_parser("inspect", help="counts, sources, document-length histogram, decoded samples",
                                  description="Print a prepared dataset's counts per split, its sources, the "
                                              "histogram of document lengths and a few decoded documents.")
    inspect.add_argument("dir", metavar="DIR", help="a directory made by `minicpm prepare`")
    inspect.add_argument("--samples", type=int, default=3, help="documents to decode (default: %(default)s)")
    inspect.add_argument("--chars", type=int, default=240, help="characters shown per sample (default: %(default)s)")
    inspect.add_argument("--seed", type=int, default=0, help="which documents to sample (default: %(default)s)")

    def run_inspect(args) -> int:
        from minicpm.data.shards import describe
        print(describe(args.dir, samples=args.samples, sample_chars=args.chars, seed=args.seed))
        return 0

    inspect.set_defaults(handler=run_inspect)
    verify = data_sub.add_parser("verify", help="check sizes, checksums and token ids against meta.json",
                                 description="Check every shard of a prepared dataset against meta.json: sizes, "
                                             "SHA-256 checksums, document offsets, token ids below the vocabulary "
                                             "size, and an end-of-document id closing every document.")
    verify.add_argument("dir", metavar="DIR", help="a directory made by `minicpm prepare`")

    def run_verify(args) -> int:
        from minicpm.data.shards import verify as verify_dataset
        counts = verify_dataset(args.dir)
        summary = ", ".join(f"{split} {c['documents']:,} documents / {c['tokens']:,} tokens"
                            for split, c in counts.items())
        print(f"{args.dir}: ok ({summary})")
        return 0

    verify.set_defaults(handler=run_verify)
    data.set_defaults(handler=lambda args: data.print_help() or 2)


# ---------------------------------------------------------------- training: train, quickstart, report

def register_training_commands(sub) -> None:
    """train, quickstart, report (trainer issue)."""

    from minicpm.optim.schedule import DECAYS

    def train(args):
        from minicpm.train.launch import launch_config, split_config_and_overrides
        from minicpm.train.loop import train as run_training

        config, overrides = split_config_and_overrides(args.config_and_overrides)
        cfg = launch_config(config, overrides, out=args.out, resume=args.resume, init_from=args.init_from,
                            decay_steps=args.decay_steps, decay=args.decay, half_life=args.half_life)
        result = run_training(cfg, resume=args.resume)
        if result.is_main:  # under torchrun, rank 0 alone prints the summary
            print(result.summary())

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

    def quickstart(args):
        from minicpm.demos.quickstart import run_quickstart

        run_quickstart(args.out, device=args.device)

    def config_keys() -> str:
        from minicpm.train.config import describe_fields

        return "config keys (section.key = default):\n" + describe_fields()

    p = sub.add_parser(
        "train", help="pretrain (WSD), resume, continue or branch a decay from a checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a MiniCPM from a YAML recipe plus key=value overrides, e.g.\n"
                    "  minicpm train configs/proxy-9m.yaml optim.lr=0.02 --out runs/lr0.02\n"
                    "  minicpm train --resume --out runs/lr0.02\n"
                    "  minicpm train --from runs/lr0.02/checkpoints/step_00000500 --decay-steps 50 --out runs/d500\n"
                    "Under torchrun the same command trains on several processes.",
        epilog=config_keys)
    p.add_argument("config_and_overrides", nargs="*", metavar="CONFIG|KEY=VALUE",
                   help="a YAML recipe (optional with --resume or --from) followed by dotted overrides")
    p.add_argument("--out", help="run directory (run.out_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run directory's latest checkpoint (from step 0 if it has none)")
    p.add_argument("--from", dest="init_from", metavar="CHECKPOINT",
                   help="start from this checkpoint (or a run's latest) in a new --out: weights, optimizer, "
                        "data position and step; the source run is never modified")
    p.add_argument("--decay-steps", type=int, metavar="M",
                   help="with --from: branch a WSD decay of M steps from the checkpoint's step, on data.decay")
    p.add_argument("--decay", choices=DECAYS,
                   help="decay shape (schedule.decay; default exp, the paper's)")
    p.add_argument("--half-life", type=float, metavar="STEPS",
                   help="exponential decay half-life in steps (schedule.half_life; default decay_steps/5)")
    p.set_defaults(handler=train)

    p = sub.add_parser("report", help="plots and a self-contained report.html for one or more runs, or a sweep")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (a stable run and its branches overlay), "
                   "or one sweep directory (with trials.csv: the metric against each parameter, best and failed "
                   "trials)")
    p.add_argument("--out", help="where report.html and the PNGs go (default: the first RUN)")
    p.add_argument("--prediction", metavar="PLAN_OR_FIT",
                   help="draw the first RUN against a prediction (PLAN.yaml of minicpm plan, or the JSON of scaling "
                        "fit-curve or scaling fit) in prediction.png, and print how far its last eval is from it")
    p.set_defaults(handler=report)

    p = sub.add_parser("quickstart", help="tokenizer, data, WSD pretraining with a decay branch, samples and a "
                                          "report, on the built-in stdlib corpus in a few minutes on a CPU")
    p.add_argument("--out", default="quickstart", help="where everything goes (default: ./quickstart)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.set_defaults(handler=quickstart)


# ---------------------------------------------------------------- experiments: scaling

def register_experiment_commands(sub) -> None:
    """scaling fit, fit-curve, predict-curve (scaling-law issue)."""
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
    p.add_argument("inputs", nargs="+", metavar="TABLE_OR_RUN_DIR")
    p.add_argument("--form", choices=FORMS, default="loss",
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
    p.add_argument("--method", choices=("huber", "lsq"), default="huber",
                   help="huber: Chinchilla approach 3, Huber on log loss (default); lsq: least squares on the raw "
                   "loss, as the paper's curve_fit")
    p.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log loss (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of runs (default %(default)s)")
    p.add_argument("--confidence", type=float, default=0.9, help="interval level (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    p.add_argument("--isoflop-tol", type=float, default=0.05,
                   help="runs whose compute agrees within this fraction form one isoFLOP budget (default %(default)s)")
    p.add_argument("--loss-key", default="eval_loss",
                   help="for run directories: the metrics.jsonl key of the loss (default %(default)s; "
                   "eval_bpb is per byte, as paper §4.5)")

    def scaling_fit(args) -> int:
        from minicpm.laws.commands import fit_scaling

        output = fit_scaling(args.inputs, form=args.form, loss_key=args.loss_key, delta=args.delta,
                             bootstrap=args.bootstrap, confidence=args.confidence, seed=args.seed,
                             budgets=args.budget, predictions=args.predict, at_loss=args.at_loss,
                             isoflop_tol=args.isoflop_tol, out=args.out, plot=args.plot, progress=sys.stderr.isatty(),
                             method=args.method)
        print(output.json if args.json else output.text, flush=True)
        for path in output.written:
            print(f"wrote {path}", file=sys.stderr)
        return 0

    p.set_defaults(handler=scaling_fit)

    p = ssub.add_parser("fit-curve", help="fit a loss-curve law (tissue | mpl) to training curves",
                        description="Fit the LR-annealing law (Tissue et al. 2024) or the multi-power law (Luo et al. "
                        "2025) to curves: metrics.jsonl files, run directories or CSVs with step, lr, loss. The LR "
                        "is linear between logged rows and rises linearly from 0 at step 0 before the first one.")
    p.add_argument("curves", nargs="+", metavar="CURVE")
    p.add_argument("--law", choices=CURVE_LAWS, required=True, help="which law")
    p.add_argument("--json", action="store_true", help="print {law, params, ...} as JSON (predict-curve reads it)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument("--plot", metavar="DIR", help="write curve_fit.png (data and fitted curves) into DIR")
    p.add_argument("--loss-key", default="loss", help="which key holds the loss (default %(default)s; e.g. eval_loss)")
    p.add_argument("--min-step", type=int, default=0,
                   help="also leave out points before this step (default %(default)s)")
    p.add_argument("--max-points", type=int, default=200,
                   help="points per curve used, evenly spaced in step (default %(default)s)")
    p.add_argument("--delta", type=float, default=1e-3, help="Huber scale on relative residuals (default %(default)s)")

    def scaling_fit_curve(args) -> int:
        from minicpm.laws.commands import fit_curve

        output = fit_curve(args.curves, law=args.law, loss_key=args.loss_key, delta=args.delta,
                           min_step=args.min_step, max_points=args.max_points, out=args.out, plot=args.plot)
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

    def campaign(args) -> int:
        from minicpm.scaling.campaign import run_campaign

        result = run_campaign(args.spec, args.out, workers=args.workers, fit=not args.no_fit,
                              echo=lambda line: print(line, flush=True))
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

    def compare_schedules(args) -> int:
        from minicpm.scaling.schedules import compare_schedules as run

        result = run(args.spec, args.out, workers=args.workers, echo=lambda line: print(line, flush=True))
        print(result.summary())
        return 0

    p.set_defaults(handler=compare_schedules)


# ---------------------------------------------------------------- evaluation: eval tasks

def register_eval_commands(sub) -> None:
    """eval tasks (evaluation issue)."""
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
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory (config.json + weights + tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names or globs, e.g. stdlib_names")
    p.add_argument("--include-path", action="append", metavar="DIR", help="a folder of task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, else 0)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (below 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default %(default)s)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=None, help="weights dtype (default: as stored)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside CHECKPOINT)")
    p.add_argument("--output", metavar="FILE", default=None, help="also write the results JSON to FILE")

    def tasks(args) -> int:
        from minicpm.eval.task_runner import evaluate_tasks, format_results

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = evaluate_tasks(args.checkpoint, args.tasks, include_path=args.include_path,
                                 num_fewshot=args.num_fewshot, limit=limit, batch_size=args.batch_size,
                                 device=args.device, output=args.output, tokenizer=args.tokenizer, dtype=args.dtype)
        print(format_results(results))
        if args.output:
            print(f"wrote {args.output}", file=sys.stderr)
        return 0

    p.set_defaults(handler=tasks)
    add_long_context_eval_commands(esub)


# ---------------------------------------------------------------- long context: eval loss, eval passkey, extend

def add_long_context_eval_commands(esub) -> None:
    """eval loss, eval passkey, eval positions (long-context issue), under the `eval` group."""
    from minicpm.interop.formats import WEIGHT_DTYPES

    p = esub.add_parser("loss", help="total and per-token NLL of a text file (compare with other runtimes)",
                        description="Encode FILE with the checkpoint's tokenizer (no BOS added), run one forward "
                                    "pass and print the summed and mean negative log-likelihood in nats of tokens "
                                    "1..n-1; with --per-token also each token's.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint, run or official HF model directory")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    p.add_argument("--per-token", action="store_true", help="also print each token's NLL")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside CHECKPOINT)")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="fp32", help="weights dtype (default %(default)s)")

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
    p.add_argument("--lengths", type=int, nargs="+", required=True, metavar="N", help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D",
                   help="needle depths as fractions of the noise (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--trials", type=int, default=4, help="keys per cell (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (default %(default)s)")
    p.add_argument("--out", default="passkey", help="directory for passkey.json and passkey.png (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside CHECKPOINT)")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="fp32", help="weights dtype (default %(default)s)")

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
    p.add_argument("--seq-len", type=int, required=True, metavar="N", help="positions per document")
    p.add_argument("--documents", type=int, default=16, help="held-out documents (default %(default)s)")
    p.add_argument("--buckets", type=int, default=8, help="equal position ranges (default %(default)s)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per checkpoint (default: the paths)")
    p.add_argument("--mark", type=int, default=None, metavar="N",
                   help="draw a dashed line at position N (e.g. the length trained at)")
    p.add_argument("--out", default="positions", help="directory for positions.json/.png (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside each CHECKPOINT)")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="fp32", help="weights dtype (default %(default)s)")

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


def register_long_context_commands(sub) -> None:
    """extend, curriculum (long-context issue)."""
    from minicpm.stages.extend_options import LONG_SHARE, METHODS

    p = sub.add_parser("extend", help="extend a checkpoint's context: untie the head, new RoPE, a training plan",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write OUT/model (head untied, logits unchanged; the new RoPE and "
                                   "max_position_embeddings), OUT/data/synthetic (passkey, key-value and\nfile "
                                   "questions), OUT/train.yaml (one run at the new length, weights-only start) and "
                                   "OUT/curriculum.yaml (sequence-length stages), e.g.\n"
                                   "  minicpm extend runs/stable --to-length 1024 --method yarn --out ext\n"
                                   "  minicpm curriculum ext/curriculum.yaml\n"
                                   "Methods: abf (rope_theta = --base), ntk (static NTK-aware base), yarn, dynamic "
                                   "(inference-time NTK; no training planned).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint or run directory (its latest checkpoint)")
    p.add_argument("--to-length", type=int, required=True, metavar="N", help="the new context length in tokens")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--base", type=float, default=None, help="abf: the new rope_theta (default theta*s^(d/(d-2)))")
    p.add_argument("--factor", type=float, default=None, help="scaling factor s > 1 (default N / trained length)")
    p.add_argument("--out", required=True, help="new directory for the model, data and configs")
    p.add_argument("--stages", type=lambda t: [int(x) for x in t.split(",")], default=None, metavar="N1,N2,..",
                   help="curriculum lengths, increasing, ending at N (default: N/2,N when N/2 exceeds the trained "
                        "length, else N)")
    p.add_argument("--steps-per-stage", type=int, default=100, help="optimizer steps per stage (default %(default)s)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="tokens per step (default max(8N, 8192))")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="sequences of N tokens per forward pass; checked against memory (default %(default)s)")
    p.add_argument("--long-data", nargs="*", default=[], metavar="DIR",
                   help="prepared long-document datasets besides the synthetic one")
    p.add_argument("--short-data", nargs="*", default=None, metavar="DIR[:WEIGHT]",
                   help="short-context datasets (default: the source run's data.stable)")
    p.add_argument("--long-share", type=float, default=LONG_SHARE,
                   help="share of long data in the mix (default %(default)s, MiniCPM-128K's 44/56)")
    p.add_argument("--synthetic-documents", type=int, default=1000,
                   help="synthetic long examples generated (default %(default)s)")
    p.add_argument("--synthetic-tasks", default="passkey,kv,file_qa", metavar="T1,T2",
                   help="synthetic tasks, taken in turn (default %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the source run's, else 0.01)")
    p.add_argument("--device", default="auto", help="where training will run, for the memory check (default auto)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory to plan for, e.g. 80GB (default: the device's)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="training precision assumed by the memory check (default %(default)s)")
    p.add_argument("--activation-checkpointing", choices=("none", "block", "selective"), default="block",
                   help="parallel.activation_checkpointing of the training config (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: beside CHECKPOINT)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the runs (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    def extend(args) -> int:
        from minicpm.stages.extend import extend_checkpoint, parse_memory

        short = None
        if args.short_data is not None:
            short = {}
            for item in args.short_data:
                path, _, weight = item.partition(":")
                try:
                    short[path] = float(weight) if weight else 1.0
                except ValueError:
                    raise MiniCPMError(f"--short-data {item!r}: expected DIR or DIR:WEIGHT") from None
        result = extend_checkpoint(
            args.checkpoint, args.out, to_length=args.to_length, method=args.method, base=args.base,
            factor=args.factor, stages=args.stages, steps_per_stage=args.steps_per_stage,
            tokens_per_step=args.tokens_per_step, micro_batch_size=args.micro_batch_size, long_data=args.long_data,
            short_data=short, long_share=args.long_share, synthetic_documents=args.synthetic_documents,
            synthetic_tasks=args.synthetic_tasks.split(","), lr=args.lr,
            device=args.device, memory=parse_memory(args.memory) if args.memory else None, dtype=args.dtype,
            activation_checkpointing=args.activation_checkpointing, tokenizer=args.tokenizer, seed=args.seed,
            overwrite=args.overwrite)
        print(result.summary())
        return 0

    p.set_defaults(handler=extend)

    p = sub.add_parser("curriculum", help="train a sequence-length curriculum (written by minicpm extend)",
                       description="Train each stage of CURRICULUM in order, each an ordinary run starting from the "
                                   "weights of the previous stage's final checkpoint; finished stages are skipped "
                                   "and a started one resumes, so the same command continues an interrupted "
                                   "curriculum.")
    p.add_argument("curriculum", metavar="CURRICULUM", help="curriculum.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of its training config")

    def curriculum(args) -> int:
        from minicpm.stages.extend import run_curriculum

        for result in run_curriculum(args.curriculum, args.overrides):
            if result.is_main:
                print(result.summary())
        return 0

    p.set_defaults(handler=curriculum)


# ---------------------------------------------------------------- MoE: upcycle

def register_moe_commands(sub) -> None:
    """upcycle (MoE issue)."""

    def upcycle(args):
        from minicpm.stages.upcycle import upcycle as upcycle_checkpoint

        out = upcycle_checkpoint(args.dense_checkpoint, args.out, experts=args.experts, top_k=args.top_k,
                                 seed=args.seed, noise=args.noise, reinit_fraction=args.reinit_fraction)
        print(f"wrote {out} ({args.experts} experts, top-{args.top_k}); continue training with "
              f"`minicpm train CONFIG model.num_experts={args.experts} model.num_experts_per_tok={args.top_k} "
              f"run.init_weights_from={out}`")

    p = sub.add_parser("upcycle", help="turn a dense checkpoint into an MoE one (sparse upcycling)",
                       description="Write an MoE checkpoint in the official MiniCPM-MoE layout: every tensor of "
                                   "DENSE_CKPT copied, each MLP copied into every expert, a fresh router "
                                   "N(0, 0.1²) per layer. Its logits at step 0 equal the dense model's (unless "
                                   "--noise or --reinit-fraction). Identical experts give the router no task "
                                   "gradient at first (a flat start); the two options are the usual remedies.")
    p.add_argument("dense_checkpoint", metavar="DENSE_CKPT",
                   help="a dense checkpoint (ours, sharded, or an official HF MiniCPM directory)")
    p.add_argument("--out", required=True, help="new MoE checkpoint directory")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (default %(default)s, MiniCPM-MoE's)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers and the options' noise (default 0)")
    p.add_argument("--noise", type=float, default=0.0, metavar="S",
                   help="add Gaussian noise of S × each matrix's std to every expert copy (default 0: exact copies)")
    p.add_argument("--reinit-fraction", type=float, default=0.0, metavar="F",
                   help="Drop-Upcycling: re-draw a random fraction F of each expert's intermediate units from the "
                        "dense matrix's mean and std (default 0; the paper's best is 0.5)")
    p.set_defaults(handler=upcycle)

# ---------------------------------------------------------------- wind tunnel: sweeps, coordinate check

def register_windtunnel_commands(sub) -> None:
    """sweep, coordcheck, windtunnel lr-transfer and batch-size (wind-tunnel issue)."""

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
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (runs/, trials.csv, the study)")
    p.add_argument("--storage", metavar="URL", help="an SQLAlchemy URL for the study (e.g. postgresql://...); "
                   "default: DIR/study.journal")
    p.add_argument("--worker", action="store_true",
                   help="join the study and run trials only (no trials.csv): for many machines on one --storage")
    p.add_argument("--workers", type=int, metavar="N", help="parallel trials in this process (default: the spec's)")
    p.add_argument("--stale-after", type=float, default=120.0, metavar="S",
                   help="a trial of another host whose heartbeat is older than S seconds is re-run "
                        "(default %(default)s)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: run here (default); slurm: submit --jobs worker jobs through submitit")
    slurm = p.add_argument_group("slurm (with --launcher slurm)")
    slurm.add_argument("--jobs", type=int, default=1, help="worker jobs to submit (default %(default)s)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--gpus", type=int, default=0, help="GPUs per node (default %(default)s)")
    slurm.add_argument("--time", type=int, default=60, metavar="MIN",
                       help="time limit in minutes (default %(default)s)")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per job (default %(default)s)")
    slurm.add_argument("--cpus", type=int, default=None, help="CPUs per task (default: Slurm's)")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting")

    def sweep(args) -> int:
        if args.launcher == "slurm":
            from minicpm.jobs.slurm import SlurmOptions, sbatch_script, submit_workers

            options = SlurmOptions(jobs=args.jobs, partition=args.partition, gpus=args.gpus, time=args.time,
                                   nodes=args.nodes, cpus=args.cpus)
            if args.dry_run:
                print(sbatch_script(args.spec, args.out, options, storage=args.storage), end="")
                return 0
            for job in submit_workers(args.spec, args.out, options, storage=args.storage):
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

    p = sub.add_parser(
        "coordcheck", help="μP coordinate check: activation scales over widths x steps, μP against SP, a plot",
        description="Train each width a few AdamW steps on one fixed batch and record mean |activation| per layer "
                    "kind (embedding, attention, MLP, residual stream, logits), under μP and under standard "
                    "parametrisation (SP). Prints a verdict per parametrisation, writes coordcheck.png and "
                    "coordcheck.json into --out, and exits 1 when μP is not width-stable.")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512],
                   help="hidden sizes, multiples of the head size (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="AdamW steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.01, help="base learning rate (default %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="layers (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=2.0,
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
    p.add_argument("--widths", type=int, nargs="+", required=True, help="hidden sizes, e.g. 64 128 256")
    p.add_argument("--log2-lr", type=int, nargs=2, required=True, metavar=("FROM", "TO"),
                   help="learning rates 2^FROM ... 2^TO, e.g. -10 -4")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--head-dim", type=int, default=16,
                   help="head size; heads = width / head size (default %(default)s)")
    p.add_argument("--base-width", type=int, help="μP base width (default: the smallest width)")
    p.add_argument("--metric", default="eval_loss", help="metrics.jsonl key to minimise (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="parallel trials (default %(default)s)")
    p.add_argument("--only", choices=("mup", "sp"), help="run one parametrisation only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="run.seed values: each learning rate is trained once per seed and its loss averaged "
                        "(default: %(default)s)")

    def lr_transfer(args) -> int:
        from minicpm.windtunnel.lr_transfer import lr_transfer as run
        from minicpm.train.launch import split_config_and_overrides

        config, overrides = split_config_and_overrides(args.config_and_overrides)
        if config is None:
            raise MiniCPMError("give the proxy's training recipe (a YAML file) first")
        low, high = sorted(args.log2_lr)
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
    p.add_argument("--trials", type=int, default=16, help="finished trials wanted (default %(default)s)")
    p.add_argument("--tokens-per-param", type=float, default=10.0,
                   help="D / N, tokens per non-embedding parameter (default %(default)s, the paper's)")
    p.add_argument("--params", nargs="+", default=["scale_emb", "scale_depth", "init_std", "lr"],
                   choices=["scale_emb", "scale_depth", "init_std", "lr"], help="what to search (default: all)")
    p.add_argument("--range", action="append", default=[], metavar="NAME=LOW:HIGH",
                   help="a log-scale range, e.g. lr=0.002:0.05 (defaults: scale_emb 1:64, scale_depth 0.25:8, "
                        "init_std 0.01:1, lr 0.001:0.1)")
    p.add_argument("--metric", default="eval_loss", help="metrics.jsonl key to minimise (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="parallel trials (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default %(default)s)")

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
    p.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--targets", type=float, nargs="+", metavar="L",
                   help="target losses (default: --count log-spaced between what every run and three runs reach)")
    p.add_argument("--count", type=int, default=6, help="targets when --targets is not given (default %(default)s)")
    p.add_argument("--loss-key", default="eval_loss", help="metrics.jsonl key of the loss (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default %(default)s)")
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


# ---------------------------------------------------------------- planner

def register_planner_commands(sub) -> None:
    """plan (scaling-campaign issue)."""

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
    p.add_argument("--budget", type=float, required=True, metavar="FLOPS", help="training compute, C = 6ND")
    p.add_argument("--campaign", required=True, metavar="DIR", help="a scaling campaign's directory (campaign.csv)")
    p.add_argument("--windtunnel", metavar="DIR",
                   help="where windtunnel batch-size / lr-transfer wrote result.json (DIR or its subdirectories)")
    p.add_argument("--holdout", choices=("largest",),
                   help="largest: also refit without the largest size and report how far it predicts that size")
    p.add_argument("--out", required=True, metavar="PLAN.yaml", help="the training config to write")
    p.add_argument("--batch-tokens", type=int, metavar="N",
                   help="use this batch (tokens per step) instead of a batch-size law")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of runs (default %(default)s)")
    p.add_argument("--confidence", type=float, default=0.9, help="interval level (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    p.set_defaults(handler=plan)


# ---------------------------------------------------------------- chat and SFT: chat, align-demo

def register_chat_commands(sub) -> None:
    """chat, align-demo (SFT half of the SFT/DPO issue)."""

    def chat(args):
        from minicpm.infer.chat import open_session, chat_loop
        session = open_session(args.checkpoint, template=args.template, tokenizer=args.tokenizer, dtype=args.dtype,
                               system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                               seed=args.seed)
        print(f"template: {session.template.name} (a turn ends at {session.template.end_of_turn!r})")
        chat_loop(session)

    p = sub.add_parser("chat", help="chat with a fine-tuned checkpoint in the terminal",
                       description="Talk to CHECKPOINT: each line you type is a user turn; the answer streams until "
                                   "the end of the assistant's turn, and the conversation so far is the context of "
                                   "the next answer (the oldest turns are dropped when it no longer fits). /reset "
                                   "forgets it, /quit or Ctrl-D ends.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--template", choices=("minicpm", "chatml", "auto"), default=None,
                   help="chat template (default: the one the checkpoint was fine-tuned with, else the tokenizer's "
                        "own, else minicpm)")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="softmax temperature; 0 is greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 is off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="as in generate; 1 is off (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the one beside the checkpoint)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: as stored)")
    p.set_defaults(handler=chat)

    def align_demo(args):
        from minicpm.demos.align import AlignRecipe, run_align_demo
        run_align_demo(args.out, device=args.device, recipe=AlignRecipe(sft_steps=args.sft_steps, dpo=not args.no_dpo))

    p = sub.add_parser("align-demo", help="the step after the quickstart: SFT, then DPO, on stdlib docstrings",
                       description="Fine-tune the quickstart's decayed model (under --out) on questions about "
                                   "documented stdlib functions answered by their docstrings (configs/sft.yaml: "
                                   "loss on the answers, packed conversations kept apart, μP lr 1e-3 decaying) and "
                                   "print the held-out answer loss before and after SFT; then DPO on preference "
                                   "pairs (chosen: a function's summary line, rejected: the same cut mid-sentence) and the "
                                   "held-out preference accuracy before and after. No download.")
    p.add_argument("--out", default="quickstart", help="the quickstart's directory (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default %(default)s)")
    p.add_argument("--sft-steps", type=int, default=60, help="SFT steps of 8192 tokens (default %(default)s)")
    p.add_argument("--no-dpo", action="store_true", help="stop after SFT (by default DPO follows on preference pairs)")
    p.set_defaults(handler=align_demo)


# ---------------------------------------------------------------- DPO: prepare pairs, precompute the reference, demo

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
    p.add_argument("source", metavar="PAIRS.jsonl")
    p.add_argument("--out", required=True, help="the pairs directory to create")
    p.add_argument("--tokenizer", help="tokenizer.json or a directory holding one (needed for text pairs)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens a pair's prompt + answer may take")
    p.add_argument("--val-fraction", type=float, default=0.05,
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
    p.add_argument("--data", required=True, help="a prepared pairs directory")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp32: the DPO run's run.dtype (default auto)")

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
    p.add_argument("checkpoint", metavar="CKPT", help="the model to align (e.g. the quickstart's, after SFT)")
    p.add_argument("--tokenizer", help="its tokenizer.json (default: the one saved with the checkpoint)")
    p.add_argument("--out", default="dpo-demo", help="where the pairs and the run go (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=1200, help="pairs to build (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--template", help="chat template the checkpoint was fine-tuned with (default: plain-text "
                                      "prompts)")

    def demo(args) -> int:
        from minicpm.demos.dpo import run_dpo_demo

        run_dpo_demo(args.checkpoint, args.out, tokenizer=args.tokenizer, pairs=args.pairs, device=args.device,
                     template=args.template)
        return 0

    p.set_defaults(handler=demo)
    dpo.set_defaults(handler=lambda args: dpo.print_help() or 2)


# ---------------------------------------------------------------- entry point

REGISTER = [
    # each entry: a function(subparsers) that adds one or more subcommands and sets `handler`
    register_model_commands,
    register_data_commands,
    register_training_commands,
    register_experiment_commands,
    register_eval_commands,
    register_moe_commands,
    register_windtunnel_commands,
    register_long_context_commands,
    register_planner_commands,
    register_chat_commands,
    register_dpo_commands,
]


class _Parser(argparse.ArgumentParser):
    """Takes a function as epilog, called only when help is shown: building the parser for every command then
    imports nothing heavy (`train`'s list of config keys needs omegaconf)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()

    def error(self, message: str):
        # bad input is one line and exit 2, like the project's own errors (argparse would print the usage first)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minicpm", description="Train small language models with the MiniCPM recipe.")
    parser.add_argument("--debug", action="store_true",
                        help="on an unexpected error, print its traceback (also: MINICPM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in REGISTER:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Every failure is one line on stderr and a non-zero exit: 2 for bad input or a failing
    file system (the project's errors, OSError, undecodable text), 1 for an unexpected error (its traceback with
    --debug or MINICPM_DEBUG=1), 130 for an interrupt. Temporary files are removed by the writers themselves
    (write_atomic, atomic_directory, the checkpoint writer) as the exception passes."""
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("MINICPM_DEBUG", "") not in ("", "0")
    lead = f"minicpm {args.command}"
    try:
        result = args.handler(args)
    except MiniCPMError as e:
        print(f"{lead}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{lead}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{lead}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except UnicodeError as e:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{lead}: error: a file is not {getattr(e, 'encoding', 'utf-8')} text "
              f"({_one_line(getattr(e, 'reason', str(e)))} at byte {getattr(e, 'start', '?')})", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (an unexpected error: one line, the traceback on request)
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{lead}: internal error: {type(e).__name__}: {_one_line(str(e)) or 'no message'} "
              f"(rerun with --debug or MINICPM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return int(result or 0)


_OS_HINTS = {
    "ENOSPC": "no space left on the device; free some and rerun (what was written before is intact)",
    "EDQUOT": "disk quota exceeded; free some space and rerun",
    "EEXIST": "already exists; choose another name or remove it",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EISDIR": "is a directory, a file was expected",
    "ENOTDIR": "is not a directory (or a file stands where a directory is needed)",
    "ENOENT": "no such file or directory",
    "EROFS": "read-only file system",
    "ENAMETOOLONG": "file name too long",
    "EMFILE": "too many open files",
}


def describe_os_error(e: OSError) -> str:
    """An OSError as one line naming the file(s) and what went wrong in words a user can act on."""
    import errno as errno_names

    code = errno_names.errorcode.get(e.errno or 0, "")
    what = _OS_HINTS.get(code) or (e.strerror or _one_line(str(e)) or type(e).__name__)
    files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{files}: {what}" if files else what


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


if __name__ == "__main__":
    raise SystemExit(main())
