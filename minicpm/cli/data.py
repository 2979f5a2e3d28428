"""`minicpm tokenizer train | prepare | data inspect | data verify`: corpora into token shards."""

from __future__ import annotations

import argparse
import sys

from minicpm.cli.parser import LibraryFunction


def megabytes_as_bytes(text: str) -> int:
    try:
        return int(float(text) * 1e6)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB, got {text!r}") from None


def register_data_commands(sub) -> None:
    """tokenizer train, prepare, data inspect, data verify."""
    sources_help = (
        "SOURCES: 'stdlib' (this Python's standard-library .py files); a file (.jsonl/.ndjson: one document per "
        "line, .parquet: one per row, anything else: the whole file; .gz is decompressed); a directory (every "
        "file under it, sorted, hidden ones skipped); a glob ('data/**/*.txt'); 'text:P', 'jsonl:P' or "
        "'parquet:P' to force a format; 'hf:NAME[:SPLIT]' for a Hugging Face dataset (needs minicpm[datasets]).")

    def add_source_options(p) -> None:
        source_options = LibraryFunction("minicpm.data.sources:SourceOptions")
        p.add_argument("sources", nargs="+", metavar="SOURCES", help="corpora to read (see above)")
        p.add_argument("--field", default=source_options.default("field"),
                       help="JSON lines and HF datasets: the key holding the text "
                                                       "(default: %(default)s)")
        p.add_argument("--column", default=source_options.default("column"),
                       help="Parquet: the column holding the text (default: %(default)s)")

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
    train.add_argument("--max-mb", dest="max_bytes", type=megabytes_as_bytes, default=None,
                       metavar="MAX_MB",
                       help="train on at most this many MB of text, the start of the corpus (default: all)")

    def run_tokenizer_train(args) -> int:
        import time

        from minicpm.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer, vocab_size
        started = time.perf_counter()
        path = train_tokenizer(args.sources, args.vocab_size, args.out, max_bytes=args.max_bytes,
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
    library = LibraryFunction("minicpm.data.prepare:prepare")
    prepare.add_argument("--out", required=True, help="the dataset directory to create")
    prepare.add_argument("--val-fraction", type=float, default=library.default("val_fraction"),
                         help="share of documents held out for validation, spread evenly (default: %(default)s)")
    prepare.add_argument("--workers", type=int, default=None,
                         help="encoding workers: threads of this process, or processes past 8 "
                              "(default: one per available core)")
    prepare.add_argument("--shard-tokens", type=int, default=library.default("shard_tokens"),
                         help="start a new shard past this many tokens (default: %(default)s)")
    prepare.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once complete)")
    chat = LibraryFunction("minicpm.data.prepare_chat:prepare_chat")
    prepare.add_argument("--format", choices=("text", "chat"), default="text",
                         help="text: documents (default); chat: JSONL conversations ('messages' with roles "
                              "system/user/assistant, or 'prompt'/'response'), rendered with --template and "
                              "stored with a loss mask on the answers (for SFT, alone or in the decay mix)")
    prepare.add_argument("--template", choices=("minicpm", "chatml", "auto"), default=chat.default("template"),
                         help="chat: the chat template (default %(default)s; auto: the tokenizer's own)")
    prepare.add_argument("--seq-len", type=int, default=chat.default("seq_len"),
                         help="chat: longest conversation kept, in tokens (longer ones are skipped and counted; a "
                              "prompt this long is an error); default %(default)s")

    def run_prepare(args) -> int:
        from minicpm.data.prepare import prepare as prepare_dataset
        if args.format == "chat":
            from minicpm.data.prepare_chat import prepare_chat
            result = prepare_chat(args.sources, args.tokenizer, args.out, template=args.template,
                                  seq_len=args.seq_len, val_fraction=args.val_fraction,
                                  shard_tokens=args.shard_tokens, overwrite=args.overwrite)
        else:
            result = prepare_dataset(args.sources, args.tokenizer, args.out, val_fraction=args.val_fraction,
                                     workers=args.workers, options=source_options(args),
                                     shard_tokens=args.shard_tokens, overwrite=args.overwrite)
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
    library = LibraryFunction("minicpm.data.shards:describe")
    inspect.add_argument("dir", metavar="DIR", help="a directory made by `minicpm prepare`")
    inspect.add_argument("--samples", type=int, default=library.default("samples"),
                         help="documents to decode (default: %(default)s)")
    inspect.add_argument("--chars", type=int, default=library.default("sample_chars"),
                         help="characters shown per sample (default: %(default)s)")
    inspect.add_argument("--seed", type=int, default=library.default("seed"),
                         help="which documents to sample (default: %(default)s)")

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
