"""`minicpm align-demo`: the step after the quickstart, alignment on the Python standard library, no download.

1. data      questions about documented stdlib functions, answered by their docstrings (data/stdlib_chat.py),
             rendered with MiniCPM's chat template into chat shards (5% of the conversations held out)
2. SFT       configs/sft.yaml from the quickstart's decayed model (paper section 5: continue from the decayed
             checkpoint, μP base lr 1e-3 decaying towards 1e-4, loss on the answers only, packed conversations
             kept apart)
3. measure   held-out answer loss before and after SFT, and one held-out question answered by each model
4. DPO       the stages of AFTER_SFT, given the SFT model: DPO on stdlib preference pairs (chosen: the function's
             own summary line, rejected: the same cut mid-sentence), held-out preference accuracy before and after

Run it again with the same --out and it picks up what is there.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.demos.quickstart import Timer

SFT_RECIPE = Path(__file__).parents[1] / "configs" / "sft.yaml"
TEMPLATE = "minicpm"


@dataclass(frozen=True)
class AlignRecipe:
    """What the demo adds to configs/sft.yaml; the defaults fit the quickstart's 1.3M-parameter model."""

    sft_steps: int = 60
    """SFT optimizer steps (8192 tokens each)."""
    examples: int | None = 3000
    """stdlib conversations made (None: every one found)."""
    eval_conversations: int = 128
    """Held-out conversations the answer loss is measured on."""
    file_stride: int = 1
    """Read every n-th stdlib file (a small set for tests)."""
    overrides: tuple[str, ...] = ()
    """Dotted overrides of configs/sft.yaml (tests shrink the run with them)."""
    dpo: bool = True
    """Run the stages of AFTER_SFT (DPO on stdlib preference pairs) after SFT."""


@dataclass
class AlignContext:
    """What a stage after SFT is given: where things are, and the summary to add its numbers to."""

    out: Path
    tokenizer: Path
    template: str
    base_checkpoint: Path
    sft_checkpoint: Path
    device: str
    summary: dict[str, Any] = field(default_factory=dict)
    say: Callable[[str], None] = print


def dpo_stage(ctx: AlignContext) -> dict[str, Any]:
    """DPO on the SFT model (paper section 6, MiniCPM-DPO): stdlib preference pairs (a function's summary line
    chosen, the same cut mid-sentence rejected: minicpm.data.stdlib_pairs) as user/assistant turns of the SFT
    template; held-out preference accuracy per answer token before and after (minicpm.demos.dpo)."""
    from minicpm.demos.dpo import run_dpo_demo

    s = run_dpo_demo(ctx.sft_checkpoint, ctx.out / "dpo", tokenizer=ctx.tokenizer, device=ctx.device,
                     template=ctx.template)
    return {"preference_accuracy_before_dpo": s["before"]["accuracy_per_token"],
            "preference_accuracy_after_dpo": s["after"].get("accuracy_per_token", float("nan")),
            "reward_accuracy_after_dpo": s["after"].get("reward_accuracy", float("nan")),
            "dpo_steps": s["steps"], "dpo_checkpoint": s["final_checkpoint"]}


AFTER_SFT: list[Callable[[AlignContext], dict[str, Any]]] = [dpo_stage]
"""Stages run after SFT, in order (when AlignRecipe.dpo): each takes the AlignContext and returns numbers for the
summary (and prints its own lines through ctx.say). A module listed in STAGE_MODULES, imported before they run,
may append its own."""
STAGE_MODULES: list[str] = []


def _say(line: str) -> None:
    print(f"[align] {line}", flush=True)


def _quickstart_model(out: Path) -> tuple[Path, Path]:
    """(decayed checkpoint, tokenizer.json) of the quickstart under `out`."""
    summary = out / "summary.json"
    if not summary.is_file():
        raise MiniCPMError(f"{summary}: missing; run `minicpm quickstart --out {out}` first (the demo fine-tunes "
                           f"its decayed model)")
    checkpoint = Path(json.loads(summary.read_text(encoding="utf-8"))["final_checkpoint"])
    return checkpoint, out / "tokenizer" / "tokenizer.json"


def sft_config(out: Path, checkpoint: Path, tokenizer: Path, chat: Path, device: str, recipe: AlignRecipe):
    from minicpm.train.config import load_config

    steps = recipe.sft_steps
    return load_config(SFT_RECIPE, [
        f"run.device={device}", f"run.out_dir={out / 'runs' / 'sft'}", f"run.init_weights_from={checkpoint}",
        f"data.stable={{{chat}: 1.0}}", f"data.tokenizer={tokenizer}",
        "batch.tokens_per_step=8192", "batch.seq_len=512", "batch.micro_batch_size=8",
        f"schedule.total_steps={steps}", f"run.eval_every={max(1, steps // 3)}", "run.log_every=5",
        "run.checkpoint_every=0", "run.keep_last=1", "parallel.loss_chunk_size=2048",
        f"evaluators=[{{kind: answer_loss, conversations: {recipe.eval_conversations}}}]", *recipe.overrides])


def _answer(checkpoint: Path, tokenizer: Path, question: str, device: str) -> str:
    from minicpm.data.chat import end_of_turn_id, get_template, render_prompt
    from minicpm.data.tokenizer import load_tokenizer
    from minicpm.infer.chat import stream_answer
    from minicpm.interop.hf import load_model
    from minicpm.train.distributed import init_distributed

    model = load_model(checkpoint, device=init_distributed(device).device).eval()
    tok, template = load_tokenizer(tokenizer), get_template(TEMPLATE)
    ids = render_prompt([{"role": "user", "content": question}], template, tok)
    return "".join(stream_answer(model, tok, template, ids, max_new_tokens=60, temperature=0.0,
                                 repetition_penalty=1.3, stop_id=end_of_turn_id(template, tok))).strip()


def run_align_demo(out: str | Path = "quickstart", *, device: str = "auto", recipe: AlignRecipe = AlignRecipe(),
                   checkpoint: str | Path | None = None, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """SFT (then the AFTER_SFT stages) on the quickstart's decayed model under `out`, or on `checkpoint` with
    `tokenizer`; print and return a summary (also OUT/align/summary.json)."""
    from minicpm.data.prepare_chat import prepare_chat
    from minicpm.data.stdlib_chat import write_stdlib_chat
    from minicpm.train.loop import Trainer

    out = Path(out)
    if checkpoint is None or tokenizer is None:
        found_checkpoint, found_tokenizer = _quickstart_model(out)
        checkpoint, tokenizer = checkpoint or found_checkpoint, tokenizer or found_tokenizer
    checkpoint, tokenizer, root = Path(checkpoint), Path(tokenizer), out / "align"
    timer = Timer()
    source = timer.run("data", write_stdlib_chat, root / "stdlib_chat.jsonl", limit=recipe.examples,
                       file_stride=recipe.file_stride)
    chat = root / "data" / "chat"
    cfg = sft_config(root, checkpoint, tokenizer, chat, device, recipe)
    if not (chat / "meta.json").is_file():
        timer.run("data", prepare_chat, [str(source)], tokenizer, chat, template=TEMPLATE, seq_len=cfg.batch.seq_len,
                  val_fraction=0.05)
    meta = json.loads((chat / "meta.json").read_text(encoding="utf-8"))
    _say(f"chat data: {chat} ({meta['splits']['train']['documents']} conversations to train on, "
         f"{meta['splits'].get('val', {}).get('documents', 0)} held out; template {TEMPLATE})")

    sft_run = Path(cfg.run.out_dir)
    question = json.loads(source.read_text(encoding="utf-8").splitlines()[0])["messages"][0]["content"]
    done = sft_run / "summary.json"
    if done.is_file():
        numbers = json.loads(done.read_text(encoding="utf-8"))
    else:
        trainer = Trainer(cfg)
        trainer.module.load_weights(checkpoint)  # the decayed model, measured before any SFT step
        before = trainer.evaluators[0](trainer.module)["answer_loss"]
        _say(f"held-out answer loss of the decayed model: {before:.3f} nats/token")
        _say(f"SFT: {cfg.schedule.total_steps} steps from {checkpoint} -> {sft_run}")
        result = timer.run("sft", trainer.fit)
        numbers = {"answer_loss_before_sft": before, "answer_loss_after_sft": result.last_eval["eval_answer_loss"],
                   "sft_checkpoint": str(result.checkpoint), "sft_steps": cfg.schedule.total_steps}
        write_atomic(done, json.dumps(numbers, indent=2) + "\n")
    sft_checkpoint = Path(numbers["sft_checkpoint"])
    samples = timer.run("samples", lambda: {"question": question,
                                            "before_sft": _answer(checkpoint, tokenizer, question, device),
                                            "after_sft": _answer(sft_checkpoint, tokenizer, question, device)})
    summary: dict[str, Any] = {**numbers, "sample": samples}

    for module in STAGE_MODULES:
        importlib.import_module(module)
    ctx = AlignContext(out=root, tokenizer=tokenizer, template=TEMPLATE, base_checkpoint=checkpoint,
                       sft_checkpoint=sft_checkpoint, device=device, summary=summary, say=_say)
    for stage in AFTER_SFT if recipe.dpo else []:
        summary.update(timer.run(getattr(stage, "__name__", "stage"), stage, ctx) or {})

    summary["seconds"] = {k: round(v, 1) for k, v in timer.seconds.items()}
    summary["total_seconds"] = round(timer.total(), 1)
    write_atomic(root / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _print_summary(summary, root, checkpoint)
    return summary


def _print_summary(s: dict[str, Any], root: Path, base: Path) -> None:
    minutes, seconds = divmod(int(round(s["total_seconds"])), 60)
    print(f"\nminicpm align-demo: done in {minutes}m{seconds:02d}s "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in s['seconds'].items())})")
    before, after = s["answer_loss_before_sft"], s["answer_loss_after_sft"]
    print(f"held-out answer loss: {before:.3f} nats/token before SFT, {after:.3f} after {s['sft_steps']} SFT steps "
          f"({before - after:.3f} lower)" if after < before else
          f"held-out answer loss: {before:.3f} before SFT, {after:.3f} after (no improvement)")
    if "preference_accuracy_after_dpo" in s:
        print(f"held-out preference accuracy (per answer token): {s['preference_accuracy_before_dpo']:.3f} before "
              f"DPO, {s['preference_accuracy_after_dpo']:.3f} after {s['dpo_steps']} DPO steps (reward accuracy "
              f"{s['reward_accuracy_after_dpo']:.3f})")
    sample = s["sample"]
    print(f"\nheld-out question: {sample['question']}\n  before SFT: {sample['before_sft'][:200]!r}\n"
          f"  after SFT:  {sample['after_sft'][:200]!r}")
    final = s.get("dpo_checkpoint", s["sft_checkpoint"])
    print(f"\nnext:\n  minicpm chat {final}\n"
          f"  minicpm generate {final} --chat --prompt 'What does json.dumps(obj) do?'\n"
          f"summary: {root / 'summary.json'}")
