"""Part 7 of `minicpm reproduce`: two-stage pretraining (paper §5). From each seed's stable run (part 3) at
branch_multiple·N, the same decay twice: on the pretraining mixture alone, and with chat-format data (questions
about the standard library answered by its docstrings, minicpm.data.stdlib_chat) mixed in at chat_share; then the
same SFT (configs/sft.yaml: answers only, starting at the decay's last LR) on both; the held-out answer loss of each.
"""

from __future__ import annotations

from pathlib import Path

from minicpm.laws.verdict import at_most
from minicpm.reproduce.findings import Finding, not_measured
from minicpm.reproduce.plan import SEQ_LEN, Plan
from minicpm.reproduce.runs import (SFT_RECIPE, Corpus, Run, after_run, batch, branch_run, final_loss,
                                    last_checkpoint)

PAPER_TWO_STAGE = ("§5, Table 1: mixing high-quality and SFT data into the decay (rather than only into SFT) "
                   "improves the model after the same SFT (A-1 to B-2: C-Eval 40.0 -> 41.2, GSM8K 27.7 -> 34.4).")
TEMPLATE = "minicpm"


def prepare_chat_data(plan: Plan, out: Path, corpus: Corpus) -> Path:
    """OUT/two_stage/chat: the chat shards both arms' SFT train on and one decay mixes in (kept when present)."""
    from minicpm.data.prepare_chat import prepare_chat
    from minicpm.data.stdlib_chat import write_stdlib_chat

    chat = out / "two_stage" / "chat"
    if not (chat / "meta.json").is_file():
        source = write_stdlib_chat(out / "two_stage" / "stdlib_chat.jsonl", limit=plan.chat_examples,
                                   file_stride=plan.chat_file_stride)
        prepare_chat([str(source)], corpus.tokenizer, chat, template=TEMPLATE, seq_len=SEQ_LEN, val_fraction=0.1)
    return chat


def two_stage_runs(plan: Plan, out: Path, stables: dict[int, Run], branch_step: int, corpus: Corpus,
                   chat: Path) -> dict[int, dict[str, tuple[Run, Run]]]:
    steps = max(2, round(plan.branch_fraction * branch_step))
    pretrain = corpus.mixture()
    with_chat = {k: v * (1 - plan.chat_share) for k, v in pretrain.items()} | {str(chat.resolve()): plan.chat_share}
    mixtures = {"without-chat": None, "with-chat": with_chat}
    arms = {}
    for seed, stable in stables.items():
        arms[seed] = {}
        for arm, mixture in mixtures.items():
            name = f"two_stage/s{seed}/{arm}"
            extra = [] if mixture is None else ["data.decay={" + ", ".join(f"{k}: {v!r}" for k, v in mixture.items())
                                                + "}"]
            decay = branch_run(f"{name}/decay", out / name / "decay", stable, branch_step, steps, "exp", extra)
            sft_dir = out / name / "sft"
            sft = after_run(f"{name}/sft", sft_dir, SFT_RECIPE, [
                f"run.init_weights_from={last_checkpoint(decay)}", f"data.stable={{{chat.resolve()}: 1.0}}",
                f"data.tokenizer={corpus.tokenizer.resolve()}", *batch(plan.tokens_per_step), f"batch.seq_len={SEQ_LEN}",
                f"schedule.total_steps={plan.sft_steps}",
                f"run.eval_every={plan.sft_steps}", "run.log_every=4", "run.checkpoint_every=0", "run.keep_last=1",
                "run.progress=false", "run.dtype=fp32", f"run.seed={seed}", "parallel.loss_chunk_size=2048",
                "evaluators=[{kind: answer_loss, conversations: 128}]"], plan.sft_steps, decay, "eval_answer_loss")
            arms[seed][arm] = (decay, sft)
    return arms


def two_stage_finding(plan: Plan, arms: dict[int, dict[str, tuple[Run, Run]]], out: Path) -> Finding:
    title = "Two-stage pretraining: chat data in the decay"
    answer = {arm: {} for arm in ("without-chat", "with-chat")}
    missing = []
    for seed, by_arm in arms.items():
        for arm, (_, sft) in by_arm.items():
            value = final_loss(sft.run_dir, sft.final_step, "eval_answer_loss")
            if value is None:
                missing.append(sft.job.name)
            else:
                answer[arm][seed] = value
    seeds = sorted(set(answer["with-chat"]) & set(answer["without-chat"]))
    if len(seeds) < 2:
        return not_measured(7, "two_stage", title, PAPER_TWO_STAGE, "fewer than two seeds finished both arms",
                            missing)
    verdict = at_most([answer["with-chat"][s] for s in seeds], [answer["without-chat"][s] for s in seeds],
                      claim="chat data in the decay lowers the answer loss after the same SFT: with minus without, "
                            "nats")
    finding = Finding(7, "two_stage", title, PAPER_TWO_STAGE, [verdict], missing=missing, numbers={
        "answer_loss_after_sft": {arm: {str(s): v for s, v in by.items()} for arm, by in answer.items()},
        "chat_share": plan.chat_share, "sft_steps": plan.sft_steps, "seeds": seeds})
    finding.figure = _plot(answer, seeds, out / "two_stage" / "two_stage.png", out)
    finding.notes.append(f"the decay mixes {plan.chat_share:.0%} chat data (the SFT's own training conversations) in "
                         f"place of pretraining data; the answer loss is measured on held-out conversations after "
                         f"{plan.sft_steps} SFT steps.")
    return finding


def _plot(answer, seeds, path: Path, out: Path) -> str:
    from minicpm.plots import figure, save_png

    fig = figure(5, 3.6, dpi=100)
    ax = fig.subplots()
    for s in seeds:
        ax.plot([0, 1], [answer["without-chat"][s], answer["with-chat"][s]], marker="o", label=f"seed {s}")
    ax.set_xticks([0, 1], ["decay without chat", "decay with chat"])
    ax.set(ylabel="held-out answer loss after SFT (nats)", title="the same SFT after two decays")
    ax.legend(fontsize=7)
    save_png(fig, path)
    return str(path.relative_to(out))
