"""SFT: leak-free packing, chat rows in mixtures (alone and in the decay mix), the sft objective, answer loss."""

from __future__ import annotations

import dataclasses
import json
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from minicpm.data import IGNORE_INDEX
from minicpm.data.pretrain import rows_to_batch
from minicpm.model.build import build_model
from minicpm.model.config import preset
from minicpm.model.packing import DocumentMask, document_positions


def tiny_model(vocab=64, kv_heads=2, seed=0):
    cfg = dataclasses.replace(preset("tiny"), vocab_size=vocab, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads)
    return build_model(cfg, device=torch.device("cpu"), seed=seed).eval()


@torch.no_grad()
def test_changing_one_document_leaves_the_other_documents_logits_unchanged():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    a, a2, b, c = (torch.randint(0, 64, (1, n), generator=g) for n in (5, 5, 7, 4))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    first = model(torch.cat([a, b, c], 1), doc_ids=doc_ids)
    second = model(torch.cat([a2, b, c], 1), doc_ids=doc_ids)
    assert torch.equal(first[:, 5:], second[:, 5:])  # bit for bit: no token attends across a boundary
    assert not torch.allclose(first[:, :5], second[:, :5])
    # and each document computes what it computes alone, its positions counted from its own start
    torch.testing.assert_close(first[:, 5:12], model(b), rtol=0, atol=1e-4)
    torch.testing.assert_close(first[:, 12:], model(c), rtol=0, atol=1e-4)


@torch.no_grad()
def test_without_doc_ids_documents_do_see_each_other():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    a, a2, b = (torch.randint(0, 64, (1, n), generator=g) for n in (5, 5, 7))
    assert not torch.allclose(model(torch.cat([a, b], 1))[:, 5:], model(torch.cat([a2, b], 1))[:, 5:])


def test_document_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_flex_block_mask_computes_what_the_sdpa_reference_computes():
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(2)
    doc_ids = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64])
    q = torch.randn(2, 4, 64, 16, generator=g)
    k, v = torch.randn(2, 2, 64, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g)
    reference = DocumentMask(doc_ids, "sdpa").attend(q, k, v, enable_gqa=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on a CPU warns that it is the slow reference path
        flex = DocumentMask(doc_ids, "flex").attend(q, k, v, enable_gqa=True)
    torch.testing.assert_close(flex, reference, rtol=0, atol=1e-5)


def test_held_out_rows_split_into_documents_at_each_eos():
    from minicpm.eval.loss import eos_doc_ids

    assert eos_doc_ids(torch.tensor([[5, 2, 6, 7, 2, 8]]), 2).tolist() == [[0, 0, 1, 1, 1, 2]]


def test_document_packing_switch_for_pretraining(datasets, tmp_path):
    from train_helpers import tiny_config

    from minicpm.train.loop import Trainer

    tokenizer, code, prose = datasets
    cfg = tiny_config(tmp_path / "run", f"data.stable={{{code}: 1.0, {prose}: 1.0}}", f"data.tokenizer={tokenizer}",
                      "data.packing=document", "schedule.total_steps=3", "schedule.warmup_steps=1",
                      "schedule.decay_start=2", "data.eval_sequences=4")
    trainer = Trainer(cfg)
    batch = trainer.data.next_batch(0, 8)
    eos = 2
    ends = (batch["input_ids"] == eos)
    assert ends.any() and torch.equal(batch["doc_ids"][:, 1:] - batch["doc_ids"][:, :-1], ends[:, :-1].long())
    assert (batch["labels"][ends] == IGNORE_INDEX).all()  # nothing is predicted across a document's end
    result = trainer.fit()
    assert result.last_eval["eval_loss"] > 0 and result.step == 3


def test_rows_to_batch_ignores_prompt_tokens_and_labels_across_documents():
    rows = torch.arange(8)[None]
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    batch = rows_to_batch(rows, mask, docs)
    I = IGNORE_INDEX
    assert batch["labels"].tolist() == [[I, 2, 3, I, 5, 6, 7]]  # 4 is a prompt token and starts another document
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert rows_to_batch(rows, mask)["labels"].tolist() == [[I, 2, 3, I, 5, 6, 7]]
    assert rows_to_batch(rows)["labels"].tolist() == [[1, 2, 3, 4, 5, 6, 7]] and "doc_ids" not in rows_to_batch(rows)


# ------------------------------------------------------------------------------------------ chat data

def reverse_task(n, seed):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "value", "index"]
    out = []
    for _ in range(n):
        w = " ".join(rng.sample(words, 3))
        out.append({"messages": [{"role": "user", "content": f"reverse: {w}"},
                                 {"role": "assistant", "content": " ".join(reversed(w.split()))}]})
    return out


@pytest.fixture(scope="module")
def chat_set(datasets, tmp_path_factory):
    from minicpm.data.prepare_chat import prepare_chat

    tokenizer = datasets[0]
    root = tmp_path_factory.mktemp("chat")
    src = root / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in reverse_task(300, 0)))
    return prepare_chat([str(src)], tokenizer, root / "chat", seq_len=64, val_fraction=0.1).out


@pytest.fixture(scope="module")
def varied_chat(datasets, tmp_path_factory):
    """Reversal conversations of 1 to 20 words: from 24 tokens to more than a row of 64."""
    from minicpm.data.prepare_chat import prepare_chat

    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "value", "index"]
    root = tmp_path_factory.mktemp("varied")
    with open(root / "chat.jsonl", "w") as f:
        for _ in range(80):
            w = [rng.choice(words) for _ in range(rng.randint(1, 20))]
            f.write(json.dumps({"prompt": "reverse: " + " ".join(w), "response": " ".join(reversed(w))}) + "\n")
    return prepare_chat([str(root / "chat.jsonl")], datasets[0], root / "chat", seq_len=128, val_fraction=0).out


def test_best_fit_decreasing_puts_each_length_into_the_row_it_fills_most():
    from minicpm.data.chat_rows import best_fit_decreasing

    # 5 opens row 0 (room 3), 4 row 1 (room 4), 3 fills row 0, 3 goes to row 1 (room 1), 2 opens row 2, 1 fills row 1
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert best_fit_decreasing([8, 8], 8) == [[0], [1]]


def epoch_targets(chat_set, seq_len, seed, epochs=1):
    """The answer targets of each conversation-segment of `epochs` epochs of rows, and the rows themselves."""
    from collections import Counter

    from minicpm.data.chat_rows import ConversationRows
    from minicpm.data.mixture import Mixture
    from minicpm.data.shards import TokenDataset

    per_epoch = len(ConversationRows("chat", TokenDataset(chat_set), seq_len))
    mixture = Mixture({str(chat_set): 1.0}, seq_len=seq_len, seed=seed)
    found = []
    for _ in range(epochs):
        rows = mixture.next_rows(per_epoch)
        batch = rows_to_batch(rows["tokens"], rows["loss_mask"], rows["doc_ids"])
        seen = Counter()
        for labels, docs in zip(batch["labels"], batch["doc_ids"]):
            for d in docs.unique().tolist():
                answer = labels[(docs == d) & (labels != IGNORE_INDEX)]
                if len(answer):
                    seen[tuple(answer.tolist())] += 1
        found.append(seen)
    return found, mixture, rows


def test_every_answer_token_of_every_kept_conversation_is_a_target_exactly_once_per_epoch(varied_chat):
    from collections import Counter

    from minicpm.data.shards import TokenDataset

    ds = TokenDataset(varied_chat)
    seq_len = 55
    lengths = ds.document_lengths()
    assert (lengths > seq_len + 1).sum() >= 3 and (lengths <= seq_len + 1).sum() >= 20  # some skipped, most kept
    expected = Counter()
    for i in range(len(ds)):
        if lengths[i] <= seq_len + 1:
            start, stop = int(ds.doc_starts[i]), int(ds.doc_starts[i + 1])
            expected[tuple(ds.document(i)[ds.loss_mask(start, stop)].tolist())] += 1
    (first, second), mixture, rows = epoch_targets(varied_chat, seq_len, seed=3, epochs=2)
    assert first == expected and second == expected
    assert mixture.skipped_too_long == {str(varied_chat): int((lengths > seq_len + 1).sum())}
    assert rows["tokens"].shape[1] == seq_len + 1
    assert len(rows["tokens"]) < sum(expected.values())  # rows hold several conversations
    # filler after the conversations is a document of its own with no target
    eos, fillers = int(ds.meta["tokenizer"]["eos_id"]), 0
    for tokens, mask, docs in zip(rows["tokens"], rows["loss_mask"], rows["doc_ids"]):
        last = docs == docs.max()
        if (tokens[last] == eos).all():
            fillers += 1
            assert not mask[last].any()
    assert fillers > 0


def test_conversation_rows_resume_where_the_state_stopped(chat_set):
    from minicpm.data.mixture import Mixture

    a = Mixture({str(chat_set): 1.0}, seq_len=64, seed=5)
    a.next_rows(7)
    state = a.state_dict()
    after = a.next_rows(200)  # past the end of an epoch
    b = Mixture({str(chat_set): 1.0}, seq_len=64, seed=5)
    b.load_state_dict(state)
    resumed = b.next_rows(200)
    assert b.state_dict()["datasets"][0]["epoch"] >= 1
    for key in ("tokens", "loss_mask", "doc_ids"):
        assert torch.equal(after[key], resumed[key])


def test_realised_decay_mix_of_chat_and_plain_text_from_a_yaml_config_is_within_2_percent(datasets, chat_set,
                                                                                          tmp_path):
    from minicpm.train.config import load_config
    from minicpm.data.pretrain import PretrainData

    tokenizer, code, prose = datasets
    (tmp_path / "two_stage.yaml").write_text(
        f"data:\n  stable: {{{code}: 1.0, {prose}: 1.0}}\n  decay: {{{code}: 0.5, {prose}: 0.2, {chat_set}: 0.3}}\n"
        f"  tokenizer: {tokenizer}\n  packing: document\n"
        "batch: {seq_len: 64, tokens_per_step: 1024, micro_batch_size: 16}\n"
        "schedule: {total_steps: 100, warmup_steps: 0, decay_steps: 90}\n")
    cfg = load_config(tmp_path / "two_stage.yaml")
    data = PretrainData(cfg.data.stable, cfg.data.decay, cfg.schedule.resolve(), seq_len=cfg.batch.seq_len,
                        seed=0, packing=cfg.data.packing)
    targets = 0
    for step in range(10, 100):
        batch = data.next_batch(step, 64)
        assert "doc_ids" in batch
        targets += int((batch["labels"] != IGNORE_INDEX).sum())
    drawn = data.decay.sequences_drawn()
    total = sum(drawn.values())
    for path, weight in cfg.data.decay.items():
        assert abs(drawn[path] / total - weight) < 0.02, (path, drawn)
    assert 0 < targets < 90 * 64 * 64


def test_sft_objective_counts_answer_tokens_only(chat_set):
    from minicpm.data.mixture import Mixture
    from minicpm.train.objectives import OBJECTIVES

    rows = Mixture({str(chat_set): 1.0}, seq_len=64, seed=0).next_rows(8)
    batch = rows_to_batch(rows["tokens"], rows["loss_mask"], rows["doc_ids"])
    model = tiny_model(vocab=512)
    objective = OBJECTIVES.get("sft").cls(None, {})
    with torch.no_grad():
        loss, _ = objective.loss(model, batch)
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"])
    answer = rows["loss_mask"][:, 1:] & (rows["doc_ids"][:, 1:] == rows["doc_ids"][:, :-1])
    expected = F.cross_entropy(logits[answer], rows["tokens"][:, 1:][answer], reduction="sum")
    assert objective.count(batch) == int(answer.sum()) > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


def test_sft_run_from_a_checkpoint_lowers_held_out_answer_loss(datasets, chat_set, tmp_path):
    from train_helpers import tiny_config

    from minicpm.train.loop import Trainer

    tokenizer, code, _ = datasets
    base = tiny_config(tmp_path / "base", f"data.stable={{{code}: 1.0}}", f"data.tokenizer={tokenizer}",
                       "schedule.total_steps=4", "schedule.warmup_steps=1", "schedule.decay_start=2", "data.eval_sequences=0")
    base_ckpt = Trainer(base).fit().checkpoint
    sft = tiny_config(tmp_path / "sft", f"data.stable={{{chat_set}: 1.0}}", f"data.tokenizer={tokenizer}",
                      f"run.init_weights_from={base_ckpt}", "objective.kind=sft", "data.packing=document",
                      "batch.seq_len=64", "optim.lr=0.01", "schedule.total_steps=30", "schedule.warmup_steps=0", "schedule.decay_start=0",
                      "schedule.floor=0.1", "run.eval_every=30", "run.checkpoint_every=0",
                      "evaluators=[{kind: answer_loss, conversations: 32}]")
    trainer = Trainer(sft)
    trainer.module.load_weights(base_ckpt)  # measured on the model SFT starts from
    before = trainer.evaluators[0](trainer.module)["answer_loss"]
    result = trainer.fit()
    after = result.last_eval["eval/answer_loss/answer_loss"]
    assert after < before - 0.5, (before, after)


def test_answer_loss_evaluator_refuses_plain_text(datasets, tmp_path):
    from train_helpers import tiny_config

    from minicpm.errors import MiniCPMError
    from minicpm.train.loop import Trainer

    tokenizer, code, _ = datasets
    cfg = tiny_config(tmp_path / "x", f"data.stable={{{code}: 1.0}}", f"data.tokenizer={tokenizer}",
                      "evaluators=[{kind: answer_loss}]")
    with pytest.raises(MiniCPMError, match="no chat dataset"):
        Trainer(cfg)


# ------------------------------------------------------------------------------------------ demo and chat

@pytest.fixture(scope="module")
def align_demo(datasets, tmp_path_factory):
    """The align demo, scaled down, on a tiny base model trained for a few steps (a stand-in for the quickstart's)."""
    from train_helpers import tiny_config

    from minicpm.demos.align import AlignRecipe, run_align_demo
    from minicpm.train.loop import Trainer

    tokenizer, code, _ = datasets
    root = tmp_path_factory.mktemp("align")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tiny_config(root / "base", f"data.stable={{{code}: 1.0}}", f"data.tokenizer={tokenizer}",
                           "schedule.total_steps=4", "schedule.warmup_steps=1", "schedule.decay_start=2",
                           "data.eval_sequences=0", "model.max_position_embeddings=512")
        checkpoint = Trainer(base).fit().checkpoint
        recipe = AlignRecipe(sft_steps=6, examples=200, eval_conversations=8, file_stride=10, dpo=False, overrides=(
            "batch.seq_len=192", "batch.tokens_per_step=768", "batch.micro_batch_size=4", "run.progress=false",
            "optim.lr=0.01"))
        summary = run_align_demo(root / "qs", device="cpu", recipe=recipe, checkpoint=checkpoint, tokenizer=tokenizer)
    finally:
        torch.set_num_threads(threads)
    return root / "qs", summary


def test_align_demo_fine_tunes_and_lowers_held_out_answer_loss(align_demo, capsys):
    out, summary = align_demo
    assert summary["answer_loss_after_sft"] < summary["answer_loss_before_sft"]
    assert json.loads((out / "align/summary.json").read_text())["answer_loss_after_sft"] == \
        summary["answer_loss_after_sft"]
    config = (out / "align/runs/sft/config.yaml").read_text()
    assert "kind: sft" in config and "packing: document" in config and "init_weights_from" in config
    assert summary["sample"]["question"].startswith("What does ")


def test_after_sft_stages_get_the_sft_model(align_demo, datasets, monkeypatch):
    from minicpm.demos import align as demo

    seen = {}

    def stage(ctx):
        seen["ckpt"] = ctx.sft_checkpoint
        return {"stage_ran": True}

    monkeypatch.setattr(demo, "AFTER_SFT", [stage])
    out, summary = align_demo
    again = demo.run_align_demo(out, device="cpu", recipe=demo.AlignRecipe(examples=200, file_stride=10, overrides=(
        "batch.seq_len=192", "batch.tokens_per_step=768", "batch.micro_batch_size=4")),
        checkpoint=summary["sft_checkpoint"], tokenizer=datasets[0])  # every step is there: only the stage runs
    assert again["stage_ran"] and str(seen["ckpt"]) == summary["sft_checkpoint"]
    assert again["answer_loss_after_sft"] == summary["answer_loss_after_sft"]


@pytest.mark.slow
def test_chat_and_generate_chat_use_the_checkpoints_template(align_demo, cli, minicpm):
    from minicpm.infer.chat import checkpoint_template

    _, summary = align_demo
    ckpt = summary["sft_checkpoint"]
    assert checkpoint_template(ckpt).name == "minicpm"  # from the run's chat data, not the tokenizer's ChatML
    done = cli("generate", ckpt, "--chat", "--prompt", "What does os.walk(top) do?", "--max-new-tokens", "8",
               "--temperature", "0")
    assert done.returncode == 0, done.stderr
    # a terminal session on stdin: its own process
    talk = minicpm("chat", ckpt, "--max-new-tokens", "6", "--seed", "0", input="hello\nagain\n/quit\n")
    assert talk.returncode == 0, talk.stderr
    assert "template: minicpm" in talk.stdout and talk.stdout.count("ai> ") == 2


@pytest.mark.slow
def test_checkpoints_carry_the_chat_template_so_chat_works_after_the_data_is_deleted(datasets, tmp_path, minicpm):
    import shutil

    from train_helpers import tiny_config
    from transformers import AutoTokenizer

    from minicpm.data.chat import MINICPM_TEMPLATE, get_template
    from minicpm.data.prepare_chat import prepare_chat
    from minicpm.infer.chat import checkpoint_template
    from minicpm.train.loop import Trainer

    tokenizer = datasets[0]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in reverse_task(40, 2)))
    data = prepare_chat([str(src)], tokenizer, tmp_path / "chat", template="minicpm", seq_len=64, val_fraction=0).out
    cfg = tiny_config(tmp_path / "sft", f"data.stable={{{data}: 1.0}}", f"data.tokenizer={tokenizer}",
                      "objective.kind=sft", "batch.seq_len=64", "schedule.total_steps=1", "schedule.warmup_steps=0",
                      "schedule.decay_start=0", "data.eval_sequences=0", "run.checkpoint_every=1")
    ckpt = Trainer(cfg).fit().checkpoint
    shutil.rmtree(data)

    shipped = json.loads((ckpt / "tokenizer_config.json").read_text())
    original = json.loads((tokenizer.parent / "tokenizer_config.json").read_text())
    assert original["chat_template"] != MINICPM_TEMPLATE  # the tokenizer ships ChatML; the run trained on MiniCPM's
    assert shipped["chat_template"] == MINICPM_TEMPLATE
    assert {k: v for k, v in shipped.items() if k != "chat_template"} == \
        {k: v for k, v in original.items() if k != "chat_template"}
    template = checkpoint_template(ckpt)
    assert (template.name, template.add_bos) == ("minicpm", True)
    messages = [{"role": "user", "content": "reverse: a b"}, {"role": "assistant", "content": "b a"}]
    rendered = AutoTokenizer.from_pretrained(str(ckpt)).apply_chat_template(messages, tokenize=False)
    assert rendered == get_template("minicpm").render_text(messages) == "<用户>reverse: a b<AI>b a"
    talk = minicpm("chat", str(ckpt), "--max-new-tokens", "3", "--seed", "0", input="hello\n/quit\n")
    assert talk.returncode == 0, talk.stderr
    assert "template: minicpm" in talk.stdout and talk.stdout.count("ai> ") == 1


def test_plain_text_checkpoints_keep_the_tokenizers_own_config(datasets, tmp_path):
    from train_helpers import tiny_config

    from minicpm.train.loop import Trainer

    tokenizer, code, _ = datasets
    cfg = tiny_config(tmp_path / "base", f"data.stable={{{code}: 1.0}}", f"data.tokenizer={tokenizer}",
                      "schedule.total_steps=1", "schedule.warmup_steps=0", "schedule.decay_start=0",
                      "data.eval_sequences=0", "run.checkpoint_every=1")
    ckpt = Trainer(cfg).fit().checkpoint
    assert (ckpt / "tokenizer_config.json").read_bytes() == (tokenizer.parent / "tokenizer_config.json").read_bytes()


def test_chat_session_keeps_history_and_stops_at_the_end_of_turn(align_demo):
    from minicpm.data.chat import get_template
    from minicpm.data.tokenizer import load_tokenizer
    from minicpm.infer.chat import ChatSession
    from minicpm.interop.hf import load_model

    _, summary = align_demo
    model = load_model(summary["sft_checkpoint"]).eval()
    tok = load_tokenizer(f"{summary['sft_checkpoint']}/tokenizer.json")
    session = ChatSession(model, tok, get_template("minicpm"), max_new_tokens=4, temperature=0.0)
    first = "".join(session.reply("one"))
    "".join(session.reply("two"))
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert session.history[1]["content"] == (first.strip() or "…")
    assert "</s>" not in first
    prompt = session.prompt_ids(session.history + [{"role": "user", "content": "three"}])
    assert tok.decode(prompt, skip_special_tokens=False).startswith("<s><用户>one<AI>")


def test_prepare_chat_cli_bad_line_is_one_line_exit_2(datasets, tmp_path, cli):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" +
                   json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    done = cli("prepare", "--format", "chat", src, "--tokenizer", datasets[0], "--out", tmp_path / "out")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"{src}:2: messages[0].role 'wizard' is unknown" in done.stderr
    assert not (tmp_path / "out").exists()
