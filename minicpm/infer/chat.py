"""Chatting with a checkpoint: its chat template, a conversation's history rendered into a prompt, the answer
streamed until the end of the assistant's turn (`minicpm chat`, `minicpm generate --chat`)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

from minicpm.data.chat import ChatTemplate, Message, end_of_turn_id, get_template, render_prompt
from minicpm.errors import MiniCPMError

ANSWER_TOKENS = 256
"""The longest answer a chat gives by default (at most half the model's context)."""


def _run_config(checkpoint: Path) -> Path | None:
    """config.yaml of the run a checkpoint belongs to (RUN, or RUN/checkpoints/step_N)."""
    for folder in (checkpoint, *list(checkpoint.parents)[:3]):
        if (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").exists():
            return folder / "config.yaml"
    return None


def checkpoint_template(checkpoint: str | Path, name: str | None = None, tokenizer: str | Path | None = None
                        ) -> ChatTemplate:
    """The template to chat with a checkpoint in: `name` when given; else the one its chat training data was
    rendered with (the run's datasets' meta.json); else the chat_template of the tokenizer_config.json beside it
    (which a checkpoint trained on chat data carries, so the data may have moved since); else MiniCPM's."""
    from minicpm.infer.tokenizer import find_tokenizer

    tokenizer_path = find_tokenizer(checkpoint, tokenizer)
    if name is not None:
        return get_template(name, tokenizer_path)
    config = _run_config(Path(checkpoint).resolve())
    if config is not None:
        import yaml

        from minicpm.data.prepare_chat import dataset_template

        data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}
        for path in [*(data.get("stable") or {}), *(data.get("decay") or {})]:
            try:
                found = dataset_template(path)
            except MiniCPMError:
                continue  # moved or deleted since: fall back
            if found is not None:
                return found
    return get_template(None, tokenizer_path)


class ChatSession:
    """A model, its tokenizer and template, and the conversation so far; `reply(text)` streams the answer and
    keeps it in the history. Old turns are dropped (the system message kept) when the prompt and the answer
    would not fit in the model's context."""

    def __init__(self, model, tokenizer, template: ChatTemplate, *, system: str | None = None,
                 max_new_tokens: int | None = None, **sampling):
        from minicpm.infer.sampling import Sampling

        # checked before the first prompt, so that a bad option is not reported as a context problem
        Sampling(**{k: v for k, v in sampling.items() if k in {f.name for f in dataclasses.fields(Sampling)}})
        context = model.config.max_position_embeddings
        if max_new_tokens is None:
            max_new_tokens = min(ANSWER_TOKENS, context // 2)
        if not (isinstance(max_new_tokens, int) and 1 <= max_new_tokens < context):
            raise MiniCPMError(f"--max-new-tokens {max_new_tokens}: must be in [1, {context - 1}], leaving the "
                               f"prompt room in the model's {context} positions")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[Message] = []
        self.stop_id = end_of_turn_id(template, tokenizer)

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        limit = self.model.config.max_position_embeddings - self.max_new_tokens
        messages = list(messages)
        ids = render_prompt(self.system + messages, self.template, self.tokenizer)
        while len(ids) > limit and len(messages) > 1:
            messages = messages[2:] if len(messages) > 2 else messages[1:]  # drop the oldest exchange
            ids = render_prompt(self.system + messages, self.template, self.tokenizer)
        if len(ids) > limit:
            raise MiniCPMError(f"the message is {len(ids)} tokens; with --max-new-tokens {self.max_new_tokens} it "
                               f"does not fit the model's {self.model.config.max_position_embeddings} positions")
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to `text`, piece by piece; the exchange joins the history."""
        messages = self.history + [{"role": "user", "content": text}]
        parts: list[str] = []
        for piece in stream_answer(self.model, self.tokenizer, self.template, self.prompt_ids(messages),
                                   max_new_tokens=self.max_new_tokens, stop_id=self.stop_id, **self.sampling):
            parts.append(piece)
            yield piece
        answer = "".join(parts)
        self.history = messages + [{"role": "assistant", "content": answer.strip() or "…"}]


def stream_answer(model, tokenizer, template: ChatTemplate, prompt_ids: list[int], *, max_new_tokens: int,
                  stop_id: int | None = None, **sampling) -> Iterator[str]:
    """The answer's text piece by piece, up to the end of the assistant's turn (its token, or its text)."""
    from minicpm.infer.generate import generate, stream_pieces
    from minicpm.infer.text import TextStream

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    stream = TextStream(decode, [template.end_of_turn])
    tokens = generate(model, prompt_ids, max_new_tokens=max_new_tokens, eos_id=stop_id, **sampling)
    yield from stream_pieces(tokens, stream, stop_id)


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, write=sys.stdout) -> None:
    """The interactive loop: a line in, the answer streamed out; /reset forgets the history, /quit or EOF ends."""
    write.write("chat: /reset forgets the conversation, /quit (or Ctrl-D) ends it\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            session.reset()
            write.write("(conversation forgotten)\n")
            continue
        write.write("ai> ")
        for piece in session.reply(text):
            write.write(piece)
            write.flush()
        write.write("\n")
        write.flush()


def open_session(checkpoint: str | Path, *, template: str | None = None, tokenizer: str | Path | None = None,
                 dtype: str | None = None, system: str | None = None, max_new_tokens: int | None = None,
                 **sampling) -> ChatSession:
    """A ChatSession with a checkpoint: its weights, its tokenizer (beside it, or `tokenizer`) and its template
    (checkpoint_template). max_new_tokens: the longest answer (default ANSWER_TOKENS, at most half the model's
    context)."""
    from minicpm.data.tokenizer import load_tokenizer
    from minicpm.infer.tokenizer import find_tokenizer
    from minicpm.interop.hf import load_model

    chat_template = checkpoint_template(checkpoint, template, tokenizer)
    tok = load_tokenizer(find_tokenizer(checkpoint, tokenizer))
    model = load_model(checkpoint, dtype=dtype).eval()
    return ChatSession(model, tok, chat_template, system=system, max_new_tokens=max_new_tokens, **sampling)


def chat_answer(checkpoint: str | Path, message: str, *, template: str | None = None,
                tokenizer: str | Path | None = None, dtype: str | None = None, max_new_tokens: int | None = None,
                **sampling) -> Iterator[str]:
    """One user message's answer from a checkpoint, streamed (`minicpm generate --chat`)."""
    session = open_session(checkpoint, template=template, tokenizer=tokenizer, dtype=dtype,
                           max_new_tokens=max_new_tokens, **sampling)
    return session.reply(message)
