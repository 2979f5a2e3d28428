"""Synthetic long-context data made locally from the standard library (MiniCPM-128K trains on synthetic long QA,
paper section 6; the task formats follow the field's retrieval tests, research/family.md section 2.3):

  passkey   Landmark Attention's prompt: a task line, a repeated noise text, "The pass key is K. Remember it. K is
            the pass key." at some depth, more noise, "What is the pass key? The pass key is" and the answer " K"
  kv        InfiniteBench's kv_retrieval: a JSON object of random hex key -> value pairs, then one key asked for
  file_qa   several of this Python's standard-library modules concatenated, each under a "# file: NAME" line, and
            "Which file defines `def F`?" answered by the one file that does

Each example is sized to a token count with the tokenizer it will be trained with (filler added or removed until
the encoded text fits), written as JSONL (to read) and as a shard set of whole examples (to train), so it mixes
like any other data.
"""

from __future__ import annotations

import functools
import json
import random
import re
import sysconfig
from pathlib import Path
from typing import Callable, Sequence

from minicpm.errors import MiniCPMError

TASKS = ("passkey", "kv", "file_qa")

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                 "There and back again.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(key: int, noise_sentences: int, depth: float) -> str:
    """The passkey prompt (answer not included) with `noise_sentences` noise sentences, the needle after a
    fraction `depth` (0: first, 1: last) of them."""
    noise = [PASSKEY_NOISE[i % len(PASSKEY_NOISE)] for i in range(noise_sentences)]
    cut = round(depth * noise_sentences)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return "\n".join([PASSKEY_TASK, " ".join(noise[:cut]), needle, " ".join(noise[cut:]), PASSKEY_QUESTION])


def _kv_text(pairs: list[tuple[str, str]], key: str) -> str:
    data = json.dumps(dict(pairs), indent=None)
    return (f"Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{data}\n\n"
            f"Key: \"{key}\"\nThe value associated with the specified key is:")


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(32):08x}"


_DEF = re.compile(r"^def ([A-Za-z_][A-Za-z0-9_]*)\(", re.MULTILINE)


def stdlib_modules() -> list[Path]:
    """This Python's pure-Python standard-library modules outside the test suites, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idle_test", "site-packages", "lib2to3", "turtledemo")
    return sorted(p for p in root.rglob("*.py")
                  if not any(part in skip for part in p.relative_to(root).parts) and p.stat().st_size > 2000)


def _sized(make: Callable[[int], str], count: Callable[[str], int], tokens: int, lo: int, hi: int) -> str:
    """make(n) for the largest n in [lo, hi] whose text has at most `tokens` tokens (make(lo) if none does);
    the token count grows with n."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(make(mid)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


@functools.lru_cache(maxsize=1)
def _module_texts() -> list[tuple[str, str, list[str]]]:
    """(file name, text, names of its top-level functions) of each standard-library module."""
    modules = []
    for path in stdlib_modules():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        modules.append((path.name, text, _DEF.findall(text)))
    if not modules:
        raise MiniCPMError("file_qa: found no standard-library modules to build questions from")
    return modules


class SyntheticTasks:
    """Examples of each task sized to a token budget; `count` gives a text's token count (the tokenizer's)."""

    def __init__(self, count: Callable[[str], int], seed: int = 0):
        self.count = count
        self.rng = random.Random(seed)

    def passkey(self, tokens: int, depth: float | None = None) -> tuple[str, str]:
        key = self.rng.randint(1, 50000)
        depth = self.rng.random() if depth is None else depth
        answer = f" {key}."
        prompt = _sized(lambda n: passkey_prompt(key, n, depth), self.count, tokens - self.count(answer), 0,
                        tokens)
        return prompt, answer

    def kv(self, tokens: int) -> tuple[str, str]:
        pairs = [(_hex(self.rng), _hex(self.rng)) for _ in range(max(tokens // 4, 2))]
        index = self.rng.random()

        def make(n: int) -> str:
            n = max(n, 1)
            return _kv_text(pairs[:n], pairs[min(int(index * n), n - 1)][0])

        prompt = _sized(make, self.count, tokens - 6, 1, len(pairs))
        key = re.search(r'Key: "([0-9a-f]+)"', prompt).group(1)
        return prompt, f" {dict(pairs)[key]}"

    def file_qa(self, tokens: int) -> tuple[str, str]:
        modules = _module_texts()
        picked, names = [], set()
        for module in self.rng.sample(modules, min(24, len(modules))):
            if module[0] not in names and len(picked) < 12:  # a file name answers only if it is unique
                picked.append(module)
                names.add(module[0])
        target = self.rng.randrange(len(picked))
        for _ in range(len(picked)):  # a target file with a function that no other picked file defines
            others = set().union(*(defs for i, (_, _, defs) in enumerate(picked) if i != target))
            unique = sorted(set(picked[target][2]) - others)
            if unique:
                break
            target = (target + 1) % len(picked)
        else:
            return self.passkey(tokens)  # no function defined in exactly one file: rare; any task will do
        function = self.rng.choice(unique)
        name, text, _ = picked[target]
        # the target file cut to a third of the budget, so that it and the question always fit
        sample = text[:4000]
        share = max(int(tokens / 3 * len(sample) / max(self.count(sample), 1)), 64)
        at = text.index(f"def {function}(")
        start = max(0, at - self.rng.randrange(share // 2))
        files = [(n, t[:share // 3]) for n, t, _ in picked]  # small pieces, so that the budget fills up closely
        files[target] = (name, text[start:start + share])
        order = list(range(len(files)))
        self.rng.shuffle(order)

        def make(n: int) -> str:
            chosen = [i for i in order if i == target or i in order[:n]]  # the target file is always in
            return "\n".join(f"# file: {files[i][0]}\n{files[i][1]}" for i in chosen)

        question = f"\n\nQuestion: which file above defines the function `{function}`?\nAnswer:"
        body = _sized(make, self.count, tokens - self.count(question) - 8, 0, len(files))
        return body + question, f" {name}"

    def example(self, task: str, tokens: int) -> tuple[str, str]:
        if task not in TASKS:
            raise MiniCPMError(f"synthetic task {task!r}: expected one of {', '.join(TASKS)}")
        return getattr(self, task)(tokens)


def write_synthetic_dataset(tokenizer: str | Path, out: str | Path, *, documents: int, lengths: Sequence[int],
                            tasks: Sequence[str] = TASKS, seed: int = 0, val_fraction: float = 0.05,
                            overwrite: bool = False) -> Path:
    """Generate the examples as OUT.jsonl beside OUT and write them as the shard set OUT, tokenized with
    `tokenizer`; returns OUT.

    Each example is one document, prompt then answer, each tokenized on its own (the ids a model sees when it is
    asked the prompt and writes the answer), every token a training target. The set carries a loss-mask channel,
    so a run trains it in rows of whole examples (`minicpm.data.chat_rows`): a window cut at a fixed stride would
    keep a question without its needle or a needle without its question, and at a length equal to the row's
    hardly ever the whole example (measured on the quickstart model: with such windows, 819K tokens of 50% passkey
    data taught no retrieval, not even of a key repeated 5 tokens after itself). Examples longer than a run's
    seq_len + 1 are left out of its rows (still held-out documents for `loss_by_position`).
    """
    from minicpm.data.prepare_chat import write_masked_shards
    from minicpm.data.tokenizer import eos_id, load_tokenizer
    from minicpm.files import write_atomic

    if documents < 1 or not lengths or min(lengths) < 32:
        raise MiniCPMError(f"synthetic data: need documents >= 1 and lengths >= 32 tokens, got {documents}, "
                           f"{list(lengths)}")
    tok = load_tokenizer(tokenizer)
    encode = lambda text: tok.encode(text).ids  # noqa: E731
    count = lambda text: len(encode(text))  # noqa: E731
    eos = eos_id(tok)
    out = Path(out)
    jsonl = out.parent / f"{out.name}.jsonl"
    maker = SyntheticTasks(count, seed)
    examples = []
    for i in range(documents):
        task, length = tasks[i % len(tasks)], lengths[(i // len(tasks)) % len(lengths)]
        examples.append((task, length, *maker.example(task, length)))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(jsonl, "".join(json.dumps({"text": prompt + answer, "task": task, "tokens": length}) + "\n"
                                for task, length, prompt, answer in examples))

    def shard_documents():
        for task, _, prompt, answer in examples:
            ids = encode(prompt) + encode(answer) + [eos]
            yield f"synthetic:{task}", ids, [True] * (len(ids) - 1) + [False], len((prompt + answer).encode("utf-8"))

    write_masked_shards(shard_documents(), tok, tokenizer, out, val_fraction=val_fraction, overwrite=overwrite,
                        sources=[f"synthetic:{t}" for t in dict.fromkeys(tasks)], label=str(jsonl),
                        meta={"document_format": "synthetic long-context examples: prompt + answer + eos, every "
                                                 "token a target, trained as whole documents",
                              "synthetic": {"tasks": list(tasks), "lengths": list(lengths), "seed": seed}})
    return out
