"""`minicpm info | init | export | import`: a model's facts, a fresh μP init, and conversions to and from the
official layouts."""

from __future__ import annotations

import argparse
import sys

from minicpm.cli.parser import LibraryFunction


def add_overwrite(p) -> None:
    """--overwrite: replace an existing output, once the new one is complete (an input is never replaced)."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists and is not empty, once the new one is complete")


def register_interop_commands(sub) -> None:
    """info, init, export, import."""
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
                              embedding_in_2d_group=args.embedding_in_2d_group, overwrite=args.overwrite,
                              progress=lambda message: print(message, file=sys.stderr, flush=True))
        print(f"wrote {out}")

    def export(args):
        from minicpm.interop.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.out, to=args.to, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, gguf_arch=args.gguf_arch,
                                gguf_type=args.gguf_type, tokenizer=args.tokenizer, overwrite=args.overwrite)
        print(f"wrote {out} ({args.to})")

    def import_(args):
        from minicpm.interop.export import export_checkpoint

        out = export_checkpoint(args.source, args.out, to="minicpm", dtype=args.dtype,
                                max_shard_size=args.max_shard_size, official=False, overwrite=args.overwrite)
        print(f"wrote {out}")

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
    library = LibraryFunction("minicpm.interop.initialise:init_checkpoint")
    p.add_argument("--preset", required=True, help="preset name (see `minicpm info`), e.g. tiny, proxy-9m")
    p.add_argument("--seed", type=int, default=library.default("seed"),
                   help="initialisation seed (default %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or tokenizer.model to put beside the weights (default: byte-level)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="weight dtype (default fp32)")
    p.add_argument("--embedding-in-2d-group", action=argparse.BooleanOptionalAction, default=False,
                   help="init the embedding like the 2-D weights (std initializer_range/√m, the literal reading of "
                        "paper Table 7); the default keeps it at initializer_range (classic μP)")
    add_overwrite(p)
    p.set_defaults(handler=init)

    p = sub.add_parser("export",
                       help="convert a checkpoint to a plain Llama or Mixtral (μP folded in), MiniCPM, or GGUF",
                       description="--to llama writes a checkpoint transformers' LlamaForCausalLM loads without "
                                   "custom code (μP multipliers folded into the weights, head untied); --to mixtral "
                                   "does the same for an MoE model (MixtralForCausalLM); --to minicpm "
                                   "rewrites the official MiniCPM layout (e.g. in another dtype or sharded); --to gguf "
                                   "writes one .gguf file for llama.cpp (the MiniCPM architecture with its μP scales, "
                                   "or the folded Llama), the tokenizer embedded.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint or model directory, or a run directory "
                                                           "(its newest checkpoint that verifies)")
    p.add_argument("out", metavar="OUT", help="a new directory (llama, mixtral, minicpm) or .gguf file (gguf; a "
                                              "directory gets OUT/model.gguf)")
    library = LibraryFunction("minicpm.interop.export:export_checkpoint")
    p.add_argument("--to", choices=EXPORT_FORMATS, required=True, help="target format")
    p.add_argument("--dtype", choices=dtypes, default=None, help="weight dtype (default: as stored)")
    p.add_argument("--max-shard-size", default=None, help="split weights into shards, e.g. 2GB (default: one file)")
    p.add_argument("--gguf-arch", choices=GGUF_ARCHES, default=library.default("gguf_arch"),
                   help="gguf: llama.cpp architecture (default %(default)s; llama folds the μP scales in)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=library.default("gguf_type"),
                   help="gguf: tensor type (default %(default)s; q8_0 falls back to f16 for rows not a multiple of 32)")
    p.add_argument("--tokenizer", default=None, help="gguf: tokenizer to embed (default: the one beside CHECKPOINT)")
    add_overwrite(p)
    p.set_defaults(handler=export)

    p = sub.add_parser("import", help="validate an official HF MiniCPM (or Llama) directory and copy it here",
                       description="Read SOURCE (config.json + *.safetensors, official MiniCPM keys; a plain Llama "
                                   "becomes MiniCPM with neutral multipliers), check every tensor against the config, "
                                   "and write it to OUT in the official layout with its tokenizer files.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--dtype", choices=dtypes, default=None, help="weight dtype (default: as stored)")
    p.add_argument("--max-shard-size", default=None, help="split weights into shards, e.g. 2GB (default: one file)")
    add_overwrite(p)
    p.set_defaults(handler=import_)
