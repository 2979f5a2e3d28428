"""DPO: pairs data and its checks, the objective against the formula written out here, the cached reference against
the frozen one, resume, the preference evaluator, plain learning rates for fine-tuning."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from minicpm.cli import main
from minicpm.train.config import ObjectiveConfig
from minicpm.data.pairs import PairsData, PreparedPairs, pair_rows, prepare_pairs, read_pairs
from minicpm.errors import MiniCPMError
from minicpm.model.build import build_model
from minicpm.model.config import preset
from minicpm.train.dpo import DPO, DPOOptions, precompute_reference, preference_losses

from train_helpers import metrics_without_timing, tiny_config

VOCAB = 512


def _pairs(n: int, seed: int = 0) -> list[dict]:
    """Pre-tokenized pairs: the chosen answer continues the prompt's arithmetic progression, the rejected one not."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, stride = int(torch.randint(0, VOCAB, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        prompt = [(start + stride * i) % VOCAB for i in range(int(torch.randint(3, 9, (1,), generator=g)))]
        m = len(prompt)
        chosen = [(start + stride * (m + i)) % VOCAB for i in range(int(torch.randint(2, 8, (1,), generator=g)))]
        rejected = torch.randint(0, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint (the policy's start and the reference) and a prepared pairs directory with its cache."""
    from minicpm.interop.hf import save_model

    root = tmp_path_factory.mktemp("dpo")
    ckpt = save_model(build_model(preset("tiny"), seed=3), root / "start")
    source = _write_jsonl(root / "pairs.jsonl", _pairs(40))
    prepare_pairs(source, root / "pairs", seq_len=32, val_fraction=0.2)
    precompute_reference(ckpt, root / "pairs", batch_size=4, device="cpu", dtype="fp32")
    return root, ckpt


def _dpo_config(out, ckpt, data, *overrides, reference="cached", **options):
    cfg = tiny_config(out, "run.dtype=fp32", "optim.lr=1e-3", "optim.mup_lr_scaling=false", "schedule.total_steps=4",
                      "schedule.decay_start=null", "schedule.kind=cosine", "schedule.warmup_steps=1",
                      f"run.init_weights_from={ckpt}", *overrides)
    cfg.data.stable = {str(data): 1.0}
    cfg.objective = ObjectiveConfig(kind="dpo", options={"reference": reference, **options})
    cfg.evaluators = [{"kind": "preference"}]
    return cfg


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "checkpoints" / "latest" / "model.safetensors")) \
        if (Path(run_dir) / "checkpoints" / "latest").is_dir() else \
        load_file(str(sorted((Path(run_dir) / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------- the formula

def _formula(pc, pr, rc, rr, nc, nr, loss, beta):
    """DPO and IPO written out from the papers: −log σ(βΔ) = log(1 + exp(−βΔ)); IPO's per-token log-ratios."""
    if loss == "sigmoid":
        delta = (pc - rc) - (pr - rr)
        return torch.log1p(torch.exp(-beta * delta))
    delta = (pc - rc) / nc - (pr - rr) / nr
    return (delta - 1.0 / (2.0 * beta)) ** 2


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_rewards_and_gradients_equal_the_formula(loss):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    nc, nr = (torch.randint(1, 9, (6,), generator=g).double() for _ in range(2))
    pc.requires_grad_(), pr.requires_grad_()
    ours, reward_c, reward_r = preference_losses(pc, pr, rc, rr, nc, nr, loss=loss, beta=0.3)
    grad_ours = torch.autograd.grad(ours.sum(), (pc, pr))
    theirs = _formula(pc, pr, rc, rr, nc, nr, loss, 0.3)
    grad_theirs = torch.autograd.grad(theirs.sum(), (pc, pr))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    for a, b in zip(grad_ours, grad_theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(reward_c, 0.3 * (pc - rc).detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(reward_r, 0.3 * (pr - rr).detach(), atol=1e-6, rtol=0)


def _independent_answer_logps(model, ids, labels):
    """Full logits, log-softmax, gather, mask, sum: the textbook way, through the model's forward()."""
    logp = torch.log_softmax(model(ids).double(), dim=-1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("loss,nll_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_objective_loss_metrics_and_gradients_equal_an_independent_computation(loss, nll_weight):
    policy = build_model(preset("tiny"), seed=1).double()
    reference = build_model(preset("tiny"), seed=2).double().requires_grad_(False)
    pairs = read_pairs(_write_jsonl(Path(__import__("tempfile").mkdtemp()) / "p.jsonl", _pairs(5)), seq_len=32).pairs
    batch = pair_rows(pairs, 16, 0)
    objective = DPO(DPOOptions(loss=loss, beta=0.2, nll_weight=nll_weight, reference="frozen"))
    ours, metrics = objective.loss(policy, batch, reference=reference)
    grads_ours = torch.autograd.grad(ours, list(policy.parameters()))

    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logps, counts = _independent_answer_logps(policy, ids, labels)
    with torch.no_grad():
        ref, _ = _independent_answer_logps(reference, ids, labels)
    n = len(pairs)
    theirs = _formula(logps[:n], logps[n:], ref[:n], ref[n:], counts[:n], counts[n:], loss, 0.2)
    total = theirs.sum() + nll_weight * (-logps[:n] / counts[:n]).sum()
    grads_theirs = torch.autograd.grad(total, list(policy.parameters()))
    torch.testing.assert_close(ours, total, atol=1e-6, rtol=1e-6)
    # to 1e-6 of each gradient's largest entry: inside a double model the norms and RoPE still round through fp32
    for a, b in zip(grads_ours, grads_theirs):
        assert float((a - b).abs().max()) <= 1e-6 * max(float(b.abs().max()), 1.0)
    logps = logps.detach()
    rc, rr = 0.2 * (logps[:n] - ref[:n]), 0.2 * (logps[n:] - ref[n:])
    mean = lambda name: float(metrics[name][0] / metrics[name][1])  # noqa: E731
    assert mean("rewards/chosen") == pytest.approx(float(rc.mean()), abs=1e-6)
    assert mean("rewards/rejected") == pytest.approx(float(rr.mean()), abs=1e-6)
    assert mean("rewards/margins") == pytest.approx(float((rc - rr).mean()), abs=1e-6)
    assert mean("rewards/accuracy") == pytest.approx(float((rc > rr).double().mean()))
    assert mean("logps/chosen") == pytest.approx(float(logps[:n].mean()), abs=1e-6)
    assert mean("logps/rejected") == pytest.approx(float(logps[n:].mean()), abs=1e-6)
    assert mean("accuracy") == pytest.approx(float((logps[:n] > logps[n:]).double().mean()))


def test_metrics_are_pair_weighted_means_whatever_the_accumulation(setup, tmp_path):
    from minicpm.train.config import model_config
    from minicpm.train.distributed import init_distributed
    from minicpm.train.module import TrainModule

    root, ckpt = setup
    data = PairsData(root / "pairs", seed=0, seq_len=32)
    batch = pair_rows(data.pairs[:6], data.prepared.pad_to, 0)
    results = []
    for micro in (6, 2):
        cfg = _dpo_config(tmp_path / f"m{micro}", ckpt, root / "pairs", reference="frozen")
        module = TrainModule.build(cfg, model_config(cfg), init_distributed("cpu"))
        module.load_weights(ckpt)
        module.model.model.layers[0].mlp.up_proj.weight.data.mul_(1.5)  # a policy that differs from its reference
        results.append(module.train_step([{k: v[i:i + micro] for k, v in batch.items()} for i in range(0, 6, micro)],
                                         lr=0.0))
    one, three = results
    assert set(one) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
                        "logps/rejected", "accuracy"}
    for key, value in one.items():
        if key != "applied":
            assert three[key] == pytest.approx(value, abs=1e-5), key
    assert one["rewards/accuracy"] * 6 == pytest.approx(round(one["rewards/accuracy"] * 6))


# ---------------------------------------------------------------------------------------------------- the reference

def test_cached_reference_equals_the_frozen_reference_exactly(setup, tmp_path):
    from minicpm.data.pairs import read_reference, reference_fingerprint
    from minicpm.train.dpo import reference_logps, reference_model
    from minicpm.train.loop import train

    root, ckpt = setup
    cache = read_reference(root / "pairs", reference_fingerprint(ckpt, "fp32"), "train", how="-")
    prepared = PreparedPairs(root / "pairs")
    model = reference_model(ckpt, torch.device("cpu"))
    for start, size in ((0, 3), (5, 8), (17, 1)):  # other batch sizes than the precompute's 4, same bits
        c, r = reference_logps(model, pair_rows(prepared.splits["train"][start:start + size], prepared.pad_to, 0))
        assert torch.equal(c, cache["chosen"][start:start + size])
        assert torch.equal(r, cache["rejected"][start:start + size])
    runs = {}
    for reference in ("frozen", "cached"):
        cfg = _dpo_config(tmp_path / reference, ckpt, root / "pairs", reference=reference)
        train(cfg)
        runs[reference] = tmp_path / reference
    frozen, cached = (metrics_without_timing(runs[r]) for r in ("frozen", "cached"))
    assert frozen == cached
    assert any("rewards/margins" in r and r["rewards/margins"] != 0 for r in frozen)
    wa, wb = _weights(runs["frozen"]), _weights(runs["cached"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_missing_cache_names_the_command_that_makes_it(setup, tmp_path):
    from minicpm.interop.hf import save_model
    from minicpm.train.loop import Trainer

    root, _ = setup
    other = save_model(build_model(preset("tiny"), seed=9), tmp_path / "other")
    with pytest.raises(MiniCPMError, match="minicpm dpo precompute-ref"):
        Trainer(_dpo_config(tmp_path / "run", other, root / "pairs"))


def test_resume_in_the_middle_of_dpo_is_bitwise_exact(setup, tmp_path):
    from minicpm.train.loop import train

    root, ckpt = setup
    whole = _dpo_config(tmp_path / "whole", ckpt, root / "pairs", "run.checkpoint_every=2")
    train(whole)
    first = _dpo_config(tmp_path / "resumed", ckpt, root / "pairs", "run.checkpoint_every=2")
    # stop after step 3 (its checkpoint is step 2's): the same run, interrupted
    from minicpm.train.loop import Trainer

    trainer = Trainer(first)
    original = trainer.module.train_step
    calls = {"n": 0}

    def stop_after_three(*args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(*args, **kwargs)

    trainer.module.train_step = stop_after_three
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    train(first, resume=True)
    assert metrics_without_timing(tmp_path / "whole") == metrics_without_timing(tmp_path / "resumed")
    wa, wb = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------------- the evaluator

def test_preference_evaluator_reports_held_out_accuracy(setup, tmp_path):
    from minicpm.rundir import RunDir
    from minicpm.train.dpo import reference_model
    from minicpm.train.loop import train

    root, ckpt = setup
    cfg = _dpo_config(tmp_path / "run", ckpt, root / "pairs", "optim.lr=3e-3", "schedule.total_steps=6")
    train(cfg)
    final = [r for r in RunDir(tmp_path / "run").read_metrics() if "eval/preference/accuracy" in r][-1]
    # the accuracy computed here, from the trained weights, on the held-out pairs
    prepared = PreparedPairs(root / "pairs")
    val = prepared.splits["val"]
    model = reference_model(tmp_path / "run", torch.device("cpu"))
    batch = pair_rows(val, prepared.pad_to, 0)
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    with torch.no_grad():
        logps, _ = _independent_answer_logps(model, ids, labels)
    n = len(val)
    assert final["eval/preference/accuracy"] == pytest.approx(float((logps[:n] > logps[n:]).double().mean()))
    assert final["eval/preference/reward_accuracy"] > 0.5  # the pattern pairs are easy: DPO learns them
    assert final["eval/preference/margin"] > 0


# ---------------------------------------------------------------------------------------------------- the data

def test_text_pairs_get_the_prompt_format_and_an_end_of_answer(tmp_path):
    from minicpm.data.tokenizer import byte_level_tokenizer, eos_id

    tok = byte_level_tokenizer()
    src = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    pair = read_pairs(src, seq_len=64, tokenizer=tok, prompt_format=lambda p: f"Q: {p}\nA: ").pairs[0]
    assert pair.prompt == tok.encode("Q: 2+2=\nA: ", add_special_tokens=False).ids
    assert pair.chosen == tok.encode("4", add_special_tokens=False).ids + [eos_id(tok)]
    assert pair.rejected[-1] == eos_id(tok) and pair.rejected != pair.chosen


def test_message_pairs_go_through_the_chat_template_api(tmp_path, monkeypatch):
    """The chat module (built beside this one) is reached only through get_template/render_prompt/end_of_turn."""
    from minicpm.data.tokenizer import byte_level_tokenizer

    seen = {}
    chat = types.ModuleType("minicpm.data.chat")
    chat.get_template = lambda name, tokenizer_dir=None: types.SimpleNamespace(name=name, end_of_turn="<END>")

    def render_prompt(messages, template, tokenizer):
        seen["messages"], seen["template"] = messages, template.name
        return [7, 8, 9]

    chat.render_prompt = render_prompt
    monkeypatch.setitem(sys.modules, "minicpm.data.chat", chat)
    tok = byte_level_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    src = _write_jsonl(tmp_path / "p.jsonl", [{"messages": messages, "chosen": "hello", "rejected": [
        {"role": "assistant", "content": "go away"}]}])
    pair = read_pairs(src, seq_len=64, tokenizer=tok, template="chatml").pairs[0]
    assert seen == {"messages": messages, "template": "chatml"}
    assert pair.prompt == [7, 8, 9]
    assert pair.chosen == tok.encode("hello<END>", add_special_tokens=False).ids
    assert pair.rejected == tok.encode("go away<END>", add_special_tokens=False).ids


def test_rows_mask_everything_but_the_answer():
    from minicpm.data.pairs import Pair

    rows = pair_rows([Pair([1, 2, 3], [4, 5], [6])], 8, 0)
    assert rows["chosen_input_ids"].tolist() == [[1, 2, 3, 4, 0, 0, 0, 0]]
    assert rows["chosen_labels"].tolist() == [[-100, -100, 4, 5, -100, -100, -100, -100]]
    assert rows["rejected_input_ids"].tolist() == [[1, 2, 3, 0, 0, 0, 0, 0]]
    assert rows["rejected_labels"].tolist() == [[-100, -100, 6, -100, -100, -100, -100, -100]]


@pytest.mark.parametrize("record,message", [
    ({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [3]}, "identical"),
    ({"prompt_ids": [1, 2], "chosen_ids": [], "rejected_ids": [3]}, "chosen_ids is empty"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt is empty"),
    ({"prompt": "x", "chosen": "", "rejected": "b"}, "chosen is empty"),
    ({"prompt_ids": list(range(1, 20)), "chosen_ids": [3], "rejected_ids": [4]}, "no room for an answer"),
    ({"prompt": "x", "rejected": "b"}, "no 'chosen' field"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_pairs_are_one_line_naming_file_and_line_exit_2_nothing_written(tmp_path, capsys, record, message):
    good = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}
    src = _write_jsonl(tmp_path / "bad.jsonl", [good, record])
    from minicpm.data.tokenizer import byte_level_tokenizer, save_tokenizer

    tok = save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    code = main(["dpo", "prepare", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "out"),
                 "--seq-len", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and f"{src}:2:" in err and message in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_over_long_pairs_are_a_counted_skip(tmp_path, capsys):
    records = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]},
               {"prompt_ids": [1, 2], "chosen_ids": list(range(1, 30)), "rejected_ids": [4]},
               {"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]}]
    src = _write_jsonl(tmp_path / "p.jsonl", records)
    assert main(["dpo", "prepare", str(src), "--out", str(tmp_path / "out"), "--seq-len", "16",
                 "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 pair" in out
    prepared = PreparedPairs(tmp_path / "out")
    assert [p.chosen for p in prepared.splits["train"]] == [[3], [7, 8]]
    assert prepared.meta["skipped"] == 1


def test_data_order_is_a_pure_function_of_the_step(setup):
    root, _ = setup
    a, b = PairsData(root / "pairs", seed=1, seq_len=32), PairsData(root / "pairs", seed=1, seq_len=32)
    n = len(a.pairs)
    assert sorted(i for step in range(n) for i in a.indices(step, 1)) == list(range(n))  # an epoch: each pair once
    assert a.indices(0, n) != a.indices(1, n)  # a fresh order each epoch
    assert all(torch.equal(a.next_batch(s, 4)[k], b.next_batch(s, 4)[k])
               for s in (7, 0, 3) for k in a.next_batch(s, 4))


# ---------------------------------------------------------------------------------------------------- plain lrs

def test_mup_lr_scaling_off_gives_every_group_the_base_lr_and_on_is_unchanged():
    from minicpm.optim.mup import param_groups

    model = build_model(preset("tiny").__class__(**{**preset("tiny").__dict__, "hidden_size": 128,
                                                    "intermediate_size": 320}))
    on = param_groups(model, lr=0.01, weight_decay=0.1)
    off = param_groups(model, lr=0.01, weight_decay=0.1, mup_lr_scaling=False)
    assert {g["name"]: g["lr_scale"] for g in on}["matrices"] == pytest.approx(1 / model.config.width_multiplier)
    assert model.config.width_multiplier != 1
    assert all(g["lr"] == 0.01 and g["lr_scale"] == 1.0 for g in off)
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in on] == \
           [(g["name"], g["weight_decay"], len(g["params"])) for g in off]


def test_dpo_recipe_is_the_papers():
    from minicpm.train.config import load_config
    from minicpm.train.dpo import DPOOptions

    cfg = load_config(Path(__file__).parents[2] / "minicpm" / "configs" / "dpo.yaml")
    assert cfg.optim.lr == 1e-5 and cfg.optim.mup_lr_scaling is False and cfg.schedule.kind == "cosine"
    assert cfg.objective.kind == "dpo" and DPOOptions(**cfg.objective.options).loss == "sigmoid"
    assert cfg.evaluators[0]["kind"] == "preference"


def test_bad_objective_options_are_one_line_errors():
    from minicpm.train.objectives import build_objective

    with pytest.raises(MiniCPMError, match="objective.options.loss"):
        build_objective(ObjectiveConfig(kind="dpo", options={"loss": "hinge"}))
    with pytest.raises(MiniCPMError, match="beta"):
        build_objective(ObjectiveConfig(kind="dpo", options={"beta": 0}))
    assert math.isclose(build_objective(ObjectiveConfig(kind="dpo", options={"beta": 0.5})).options.beta, 0.5)


# ---------------------------------------------------------------------------------------------------- the demo

def test_stdlib_pairs_prefer_the_true_docstring_and_are_reproducible():
    from minicpm.data.stdlib_pairs import stdlib_pairs

    for kind in ("truncated", "mismatched"):
        pairs = stdlib_pairs(30, seed=1, kind=kind)
        assert pairs == stdlib_pairs(30, seed=1, kind=kind) and pairs != stdlib_pairs(30, seed=2, kind=kind)
        assert all(p["chosen"] != p["rejected"] and p["prompt"].startswith(("def ", "async def ")) for p in pairs)
        assert len({p["chosen"] for p in pairs}) == 30
    for p in stdlib_pairs(30, seed=1, kind="truncated"):  # the rejected answer is the chosen one cut short
        chosen, rejected = p["chosen"].removesuffix('"""').split(), p["rejected"].removesuffix('"""').split()
        assert rejected == chosen[:len(chosen) // 2] and len(rejected) >= 2
    with pytest.raises(MiniCPMError, match="kind 'shuffled'"):
        stdlib_pairs(3, kind="shuffled")


def test_dpo_demo_runs_on_a_checkpoint_and_reports_accuracy_before_and_after(tmp_path):
    from minicpm.data.tokenizer import byte_level_tokenizer, save_tokenizer
    from minicpm.interop.hf import save_model
    from minicpm.demos.dpo import DemoSizes, run_dpo_demo

    tok = save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    ckpt = save_model(build_model(preset("tiny"), seed=0), tmp_path / "start")
    summary = run_dpo_demo(ckpt, tmp_path / "demo", tokenizer=tok, device="cpu",
                           sizes=DemoSizes(pairs=40, val_fraction=0.25, seq_len=256, pairs_per_step=4, lr=1e-3))
    assert summary["steps"] == summary["pairs"]["train"] // 4
    assert 0 <= summary["before"]["accuracy"] <= 1 and 0 <= summary["after"]["accuracy"] <= 1
    assert summary["before"]["reward_accuracy"] == 0.0  # the policy is its reference: every margin is exactly 0
    assert summary["after"]["margin"] != 0.0
    assert json.loads((tmp_path / "demo" / "dpo_summary.json").read_text())["steps"] == summary["steps"]


def test_the_documented_commands_prepare_cache_and_train(setup, tmp_path, capsys):
    root, ckpt = setup
    recipe = Path(__file__).parents[2] / "minicpm" / "configs" / "dpo.yaml"
    assert main(["dpo", "prepare", str(root / "pairs.jsonl"), "--out", str(tmp_path / "pairs"), "--seq-len", "32"]) == 0
    assert main(["dpo", "precompute-ref", str(ckpt), "--data", str(tmp_path / "pairs"), "--device", "cpu",
                 "--dtype", "fp32"]) == 0
    assert main(["train", str(recipe), f"data.stable={{{tmp_path / 'pairs'}: 1.0}}", f"run.init_weights_from={ckpt}",
                 "batch.seq_len=32", "batch.tokens_per_step=128", "batch.micro_batch_size=4", "schedule.total_steps=2",
                 "schedule.warmup_steps=1", "run.log_every=1", "run.device=cpu", "run.dtype=fp32", "run.progress=false",
                 "--out", str(tmp_path / "run")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if "loss" in r] == ["dpo", "dpo"]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: −log σ(0)
    assert 0 <= records[-1]["eval/preference/accuracy"] <= 1
    assert "wrote" in capsys.readouterr().out
