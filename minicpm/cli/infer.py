"""`minicpm generate | chat`: sample from a checkpoint, one prompt or a conversation in the terminal."""

from __future__ import annotations

import sys

from minicpm.cli.parser import LibraryFunction


def register_infer_commands(sub) -> None:
    """generate, chat."""
    from minicpm.interop.formats import WEIGHT_DTYPES

    def generate(args):
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
        if args.chat:
            from minicpm.infer.chat import chat_answer

            pieces = chat_answer(args.checkpoint, args.prompt, template=args.template, tokenizer=args.tokenizer,
                                 dtype=args.dtype, **sampling)
        else:
            from minicpm.infer.generate import stream_checkpoint_text

            compile = {"on": True, "off": False}.get(args.compile, "auto")
            pieces = stream_checkpoint_text(args.checkpoint, args.prompt, tokenizer=args.tokenizer, dtype=args.dtype,
                                            stop=args.stop, use_cache=not args.no_cache, compile=compile, **sampling)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    dtypes = WEIGHT_DTYPES
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
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the decode step: auto compiles where the tokens left earn the compile time "
                        "back (default %(default)s)")
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
    library = LibraryFunction("minicpm.infer.chat:open_session")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=library.default("max_new_tokens"),
                   help="longest answer in tokens (default: 256, at most half the model's context)")
    p.add_argument("--temperature", type=float, default=0.7, help="softmax temperature; 0 is greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 is off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="as in generate; 1 is off (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the one beside the checkpoint)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: as stored)")
    p.set_defaults(handler=chat)
