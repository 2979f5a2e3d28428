"""Chat data: conversations, the templates that turn them into text, and their token ids with a loss mask.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`; a JSON line
holds one as `messages`, or as `prompt` and `response` (one user turn and its answer). A template is a Jinja
program over the messages, as in a Hugging Face tokenizer_config.json (`chat_template`):

- `minicpm`: the released MiniCPM-2B/1B sft and dpo template, `<用户>{question}<AI>{answer}` with every content
  stripped, and `<s>` first (the released tokenizer adds BOS). It writes nothing after an answer, so `</s>` ends the
  assistant's turn, as the MiniCPM fine-tuning script appends it (paper section 5; research/minicpm-paper.md).
- `chatml`: `<|im_start|>{role}\\n{content}<|im_end|>\\n` (MiniCPM-2B-128k's; our tokenizers have both tokens).
- `auto`: the tokenizer's own `chat_template` from its tokenizer_config.json.

The loss mask is found by rendering, not by searching the token ids: for each assistant turn the conversation is
rendered up to it with the assistant turn opened (the prompt) and up to its end; the difference is the answer,
which (with the end-of-turn text) is a training target. Text between answers is tokenized piece by piece in the
same way for training (`render_conversation`) and generation (`render_prompt`), so a model sees at inference
exactly the ids it was trained on. Special tokens written by the template (`<|im_start|>`, `</s>`) are parsed as
special tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

from minicpm.errors import MiniCPMError

ROLES = ("system", "user", "assistant")
TEMPLATE_NAMES = ("minicpm", "chatml", "auto")

MINICPM_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{'<用户>' + message['content'].strip() + '<AI>'}}{% else %}{{message['content'].strip()}}"
                    "{% endif %}{% endfor %}")
"""The chat_template of the released MiniCPM-2B-sft/dpo tokenizer_config.json, verbatim."""

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

Message = dict[str, str]


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format: its Jinja source, the text that ends an assistant turn, and whether BOS comes first."""

    name: str
    source: str
    end_of_turn: str
    """The text (a special token in our tokenizers) that ends an assistant turn; generation stops at it."""
    add_bos: bool = False
    bos_token: str = "<s>"
    eos_token: str = "</s>"

    def render_text(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The template's own text of the messages (without BOS and without an end of turn it does not write)."""
        try:
            return _compiled(self.source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.bos_token, eos_token=self.eos_token)
        except MiniCPMError:
            raise
        except Exception as e:  # a template error: jinja2's TemplateError or one the template raises
            raise MiniCPMError(f"chat template {self.name}: {type(e).__name__}: {e}") from None

    def describe(self) -> dict[str, Any]:
        """What a prepared dataset's meta.json records, so that chat and generation use the same format."""
        return {"template": self.name, "source": self.source, "end_of_turn": self.end_of_turn,
                "add_bos": self.add_bos, "bos_token": self.bos_token, "eos_token": self.eos_token}

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> "ChatTemplate":
        return cls(name=str(d["template"]), source=str(d["source"]), end_of_turn=str(d["end_of_turn"]),
                   add_bos=bool(d.get("add_bos", False)), bos_token=str(d.get("bos_token", "<s>")),
                   eos_token=str(d.get("eos_token", "</s>")))


@lru_cache(maxsize=16)
def _compiled(source: str):
    # transformers renders chat templates the same way: a sandbox, trimmed blocks, loop controls
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise MiniCPMError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
    try:
        return env.from_string(source)
    except Exception as e:
        raise MiniCPMError(f"chat template does not compile: {type(e).__name__}: {e}") from None


def _tokenizer_config(tokenizer_dir: str | Path | None) -> dict[str, Any]:
    if tokenizer_dir is None:
        return {}
    root = Path(tokenizer_dir)
    root = root.parent if root.is_file() else root
    path = root / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MiniCPMError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return config if isinstance(config, dict) else {}


def _token_text(value: Any, default: str) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} as older tokenizer configs write it
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def get_template(name: str | None, tokenizer_dir: str | Path | None = None) -> ChatTemplate:
    """The template `name` (minicpm, chatml or auto); None picks auto when the tokenizer (a directory, or a file in
    one) ships a chat_template, else minicpm."""
    config = _tokenizer_config(tokenizer_dir)
    shipped = config.get("chat_template")
    if isinstance(shipped, list):  # [{"name": "default", "template": ...}, ...] (several named templates)
        shipped = next((t.get("template") for t in shipped if isinstance(t, dict) and t.get("name") == "default"), None)
    if name is None:  # a shipped template that is one of ours (a checkpoint trained on it carries it) goes by name
        name = _OURS.get(shipped, "auto") if isinstance(shipped, str) and shipped else "minicpm"
    bos, eos = _token_text(config.get("bos_token"), "<s>"), _token_text(config.get("eos_token"), "</s>")
    if name == "minicpm":
        return ChatTemplate("minicpm", MINICPM_TEMPLATE, end_of_turn=eos, add_bos=True, bos_token=bos, eos_token=eos)
    if name == "chatml":
        return ChatTemplate("chatml", CHATML_TEMPLATE, end_of_turn="<|im_end|>", bos_token=bos, eos_token=eos)
    if name == "auto":
        if not isinstance(shipped, str) or not shipped:
            where = tokenizer_dir if tokenizer_dir is not None else "no tokenizer given"
            raise MiniCPMError(f"chat template auto: {where}: the tokenizer ships no chat_template in "
                               f"tokenizer_config.json (choose --template minicpm or chatml)")
        probe = ChatTemplate("auto", shipped, end_of_turn="", bos_token=bos, eos_token=eos)
        return ChatTemplate("auto", shipped, end_of_turn=_probe_end_of_turn(probe), bos_token=bos, eos_token=eos,
                            add_bos=bool(config.get("add_bos_token", False)) and bos not in shipped)
    raise MiniCPMError(f"chat template {name!r}: unknown (choose one of: {', '.join(TEMPLATE_NAMES)})")


_OURS = {MINICPM_TEMPLATE: "minicpm", CHATML_TEMPLATE: "chatml"}


def tokenizer_config_with_template(tokenizer: str | Path | None, template: ChatTemplate) -> str:
    """tokenizer_config.json of `tokenizer` (a tokenizer file or its directory; {} when it has none) with
    `template` as its chat_template, as transformers' apply_chat_template reads it: what a checkpoint trained on
    chat data carries, so chatting with it needs neither the data nor --template."""
    config = dict(_tokenizer_config(tokenizer))
    config["chat_template"] = template.source
    config.setdefault("bos_token", template.bos_token)
    config.setdefault("eos_token", template.eos_token)
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def _probe_end_of_turn(template: ChatTemplate) -> str:
    """What a template writes after an answer (whitespace stripped); its eos token when it writes nothing."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\x00answer\x00"}]
    prompt = template.render_text(messages[:1], add_generation_prompt=True)
    full = template.render_text(messages)
    tail = full[len(prompt):]
    at = tail.rfind("\x00answer\x00")
    closing = tail[at + len("\x00answer\x00"):].strip() if at >= 0 else ""
    return closing or template.eos_token


# ------------------------------------------------------------------------------------------ messages

def check_messages(messages: Any, where: str, *, need_answer: bool = True) -> list[Message]:
    """A conversation's messages, checked: known roles, string contents, no empty assistant turn; `need_answer`
    asks for at least one assistant turn. Errors name `where` (file:line)."""
    if not isinstance(messages, list) or not messages:
        raise MiniCPMError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MiniCPMError(f"{where}: messages[{i}] is a {type(m).__name__}, expected {{role, content}}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise MiniCPMError(f"{where}: messages[{i}].role {role!r} is unknown (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise MiniCPMError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise MiniCPMError(f"{where}: messages[{i}] is an empty assistant turn")
        checked.append({"role": role, "content": content})
    if need_answer and not any(m["role"] == "assistant" for m in checked):
        raise MiniCPMError(f"{where}: the conversation has no assistant turn to learn from")
    return checked


def example_messages(record: Any, where: str) -> list[Message]:
    """The messages of one chat JSON line: `messages`, or `prompt` + `response` (optional `system`)."""
    if not isinstance(record, dict):
        raise MiniCPMError(f"{where}: expected a JSON object with 'messages' or 'prompt' and 'response'")
    if "messages" in record:
        return check_messages(record["messages"], where)
    if "prompt" in record and "response" in record:
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else [])
        messages += [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        return check_messages(messages, where)
    raise MiniCPMError(f"{where}: no 'messages' and no 'prompt'/'response' (has: {', '.join(record) or 'nothing'})")


def read_chat_jsonl(path: str | Path) -> Iterator[tuple[str, list[Message]]]:
    """(file:line, messages) of every non-blank line of a chat JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise MiniCPMError(f"{path}: no such chat file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MiniCPMError(f"{where}: not valid JSON ({e.msg})") from None
            yield where, example_messages(record, where)


# ------------------------------------------------------------------------------------------ tokens

def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of text, special-token text parsed as special tokens, no BOS/EOS added. Takes an HF `tokenizers`
    Tokenizer or a transformers tokenizer."""
    if not text:
        return []
    if hasattr(tokenizer, "encode_special_tokens"):  # tokenizers.Tokenizer
        before = tokenizer.encode_special_tokens
        tokenizer.encode_special_tokens = False
        try:
            return list(tokenizer.encode(text, add_special_tokens=False).ids)
        finally:
            tokenizer.encode_special_tokens = before
    return list(tokenizer.encode(text, add_special_tokens=False))


def _token_id(tokenizer, token: str) -> int:
    tid = tokenizer.token_to_id(token) if hasattr(tokenizer, "token_to_id") else tokenizer.convert_tokens_to_ids(token)
    if tid is None or (not hasattr(tokenizer, "token_to_id") and tid == getattr(tokenizer, "unk_token_id", None)):
        raise MiniCPMError(f"the tokenizer has no token {token!r}, which the chat template needs")
    return int(tid)


def _pieces(messages: Sequence[Message], template: ChatTemplate, open_turn: bool) -> list[tuple[str, bool]]:
    """The conversation as (text, is_target) pieces: each answer with its end of turn is a target."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render_text(messages[:i], add_generation_prompt=True)
        after = template.render_text(messages[:i + 1])
        if not before.startswith(done) or not after.startswith(before):
            raise MiniCPMError(f"chat template {template.name}: rendering a longer conversation changes the text "
                               f"of an earlier turn, so answers cannot be located (use minicpm or chatml)")
        pieces.append((before[len(done):], False))
        answer = after[len(before):]
        cut = answer.rfind(template.end_of_turn)
        if cut >= 0:
            cut += len(template.end_of_turn)
            pieces += [(answer[:cut], True), (answer[cut:], False)]
        else:  # the template writes nothing after an answer (MiniCPM's): the end of turn is ours to add
            pieces.append((answer + template.end_of_turn, True))
        done = after
    final = template.render_text(messages, add_generation_prompt=open_turn)
    if not final.startswith(done):
        raise MiniCPMError(f"chat template {template.name}: the generation prompt changes earlier text")
    pieces.append((final[len(done):], False))
    return pieces


def render_conversation(messages: Sequence[Message], template: ChatTemplate, tokenizer
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and its loss mask: True exactly on the assistants' answer tokens and the
    end-of-turn token that closes each (the targets of SFT)."""
    messages = check_messages(list(messages), "conversation")
    ids: list[int] = [_token_id(tokenizer, template.bos_token)] if template.add_bos else []
    mask: list[bool] = [False] * len(ids)
    for text, target in _pieces(messages, template, open_turn=False):
        piece = _encode(tokenizer, text)
        ids += piece
        mask += [target] * len(piece)
    return ids, mask


def render_prompt(messages: Sequence[Message], template: ChatTemplate, tokenizer) -> list[int]:
    """Token ids of a conversation with the assistant's turn opened, to generate the answer from (chat, DPO
    prompts); the same ids render_conversation gives the text before that answer."""
    messages = check_messages(list(messages), "prompt", need_answer=False)
    if messages[-1]["role"] == "assistant":
        raise MiniCPMError("prompt: the last message is the assistant's; a prompt ends with a user (or system) turn")
    ids: list[int] = [_token_id(tokenizer, template.bos_token)] if template.add_bos else []
    for text, _ in _pieces(messages, template, open_turn=True):
        ids += _encode(tokenizer, text)
    return ids


def end_of_turn_id(template: ChatTemplate, tokenizer) -> int | None:
    """The id of the end-of-turn text when it is one token (it is for our templates and tokenizers), else None
    (generation then stops at the text)."""
    ids = _encode(tokenizer, template.end_of_turn)
    return ids[0] if len(ids) == 1 else None
