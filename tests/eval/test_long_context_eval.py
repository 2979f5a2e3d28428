"""Synthetic long-context data, the passkey test (CLI and evaluator) and loss by position."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minicpm.cli import main
from minicpm.train.config import load_config
from minicpm.data.mixture import Mixture
from minicpm.data.synthetic_long import PASSKEY_QUESTION, PASSKEY_TASK, SyntheticTasks, write_synthetic_dataset
from minicpm.data.tokenizer import byte_level_tokenizer, save_tokenizer
from minicpm.eval.evaluators import EvalSetup, build_evaluators
from minicpm.eval.passkey import passkey_accuracy, passkey_cases, write_passkey_report
from minicpm.eval.position_loss import long_documents
from minicpm.interop.hf import save_model
from minicpm.model.build import build_model
from minicpm.model.config import ModelConfig

TOK = byte_level_tokenizer()


def encode(text):
    return TOK.encode(text).ids


def decode(ids):
    return TOK.decode(ids)


def count(text):
    return len(encode(text))


@pytest.mark.parametrize("task", ["passkey", "kv", "file_qa"])
def test_synthetic_examples_fit_their_budget_and_hold_their_answer(task):
    maker = SyntheticTasks(count, seed=5)
    for budget in (300, 900):
        prompt, answer = maker.example(task, budget)
        assert 0.7 * budget <= count(prompt + answer) <= budget
        if task == "passkey":
            key = answer.strip(" .")
            assert f"The pass key is {key}. Remember it." in prompt and prompt.endswith(PASSKEY_QUESTION)
        elif task == "kv":
            data = json.loads(prompt.split("JSON data:\n", 1)[1].split("\n\nKey:", 1)[0])
            asked = re.search(r'Key: "([0-9a-f]+)"', prompt).group(1)
            assert data[asked] == answer.strip()
        else:
            function = re.search(r"defines the function `(\w+)`", prompt).group(1)
            files = dict(re.findall(r"# file: (\S+)\n(.*?)(?=\n# file: |\n\nQuestion:)", prompt, re.S))
            defining = [name for name, body in files.items() if re.search(rf"^def {function}\(", body, re.M)]
            assert defining == [answer.strip()]


def test_synthetic_dataset_is_a_prepared_shard_set(tmp_path):
    tokenizer = save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    out = write_synthetic_dataset(tokenizer, tmp_path / "synthetic", documents=12, lengths=[200, 400], seed=1)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"].get("val", {}).get("documents", 0) == 12
    records = [json.loads(line) for line in (tmp_path / "synthetic.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records[:3]] == ["passkey", "kv", "file_qa"]
    # trained as whole examples: a row of a mixture starts at an example's first token and holds only whole ones
    assert meta["loss_mask"] is True
    mixture = Mixture({str(out): 1.0}, seq_len=512, seed=0)
    rows = mixture.next_rows(4)
    texts = {r["text"] for r in records}
    for tokens, docs in zip(rows["tokens"].tolist(), rows["doc_ids"].tolist()):
        pieces = [[t for t, d in zip(tokens, docs) if d == k] for k in sorted(set(docs))[:-1]]  # last: filler
        assert pieces and all(decode(piece[:-1]) in texts for piece in pieces)  # each ends with eos


def test_passkey_prompts_fill_their_length_with_the_needle_at_its_depth():
    cases = passkey_cases(encode, [300, 600], [0.0, 1.0], trials=2, seed=0)
    assert len(cases) == 8
    for case in cases:
        assert case.length - 30 <= len(case.ids) <= case.length
        text = decode(case.ids)
        needle = f"The pass key is {case.key}. Remember it. {case.key} is the pass key."
        if case.depth == 0:  # right after the task line, all the noise after it
            assert text.index(needle) == len(PASSKEY_TASK) + 2
        else:  # all the noise before it, the question right after
            assert text.endswith(f"{needle}\n\n{PASSKEY_QUESTION}")


class Oracle(torch.nn.Module):
    """Reads the key out of the prompt and writes " KEY." one byte at a time: a model that always retrieves."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        text = decode(ids[0].tolist())
        key = re.search(r"The pass key is (\d+)\.", text).group(1)
        written = text.rsplit(PASSKEY_QUESTION, 1)[1]
        target = f" {key}."
        nxt = target[len(written)] if len(written) < len(target) else "."
        logits = torch.zeros(1, ids.shape[1], TOK.get_vocab_size())
        logits[0, -1, encode(nxt)[0]] = 1.0
        return logits


def test_passkey_accuracy_is_one_for_a_retriever_and_low_for_a_random_model(tmp_path):
    result = passkey_accuracy(Oracle(), encode, decode, [300, 400], [0.0, 0.5, 1.0], trials=2)
    assert result.accuracy == [[1.0] * 3] * 2 and result.mean == 1.0
    paths = write_passkey_report(result, tmp_path)
    assert json.loads(paths[0].read_text())["accuracy_by_length"] == {"300": 1.0, "400": 1.0}
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = ModelConfig(vocab_size=263, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    random_model = build_model(config, seed=0)
    assert passkey_accuracy(random_model, encode, decode, [300], [0.5], trials=3, max_new_tokens=4).mean <= 0.2


def test_eval_passkey_cli_writes_json_and_heatmap(tmp_path, capsys):
    tok = save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    config = ModelConfig(vocab_size=263, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    ckpt = save_model(build_model(config), tmp_path / "ckpt", extra_files={"tokenizer.json": tok})
    assert main(["eval", "passkey", str(ckpt), "--lengths", "300", "400", "--depths", "0", "1", "--trials", "1",
                 "--out", str(tmp_path / "pk")]) == 0
    assert "length 300: passkey accuracy" in capsys.readouterr().out
    written = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert written["lengths"] == [300, 400] and len(written["accuracy"]) == 2 and len(written["samples"]) == 4
    assert (tmp_path / "pk" / "passkey.png").is_file()
    assert main(["eval", "passkey", str(ckpt), "--lengths", "10", "--out", str(tmp_path / "pk2")]) == 2
    assert "too short for the prompt" in capsys.readouterr().err


def test_passkey_and_loss_by_position_run_as_training_evaluators(tmp_path):
    tokenizer = save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    synthetic = write_synthetic_dataset(tokenizer, tmp_path / "syn", documents=40, lengths=[160], seed=0,
                                        val_fraction=0.25)
    cfg = load_config(None, ["model.preset=tiny", f"data.tokenizer={tokenizer}", f"data.stable={{{synthetic}: 1.0}}",
                             "batch.seq_len=128", "batch.tokens_per_step=256", "batch.micro_batch_size=2",
                             "evaluators=[{kind: passkey, lengths: [300], depths: [0.5], trials: 1},"
                             "{kind: loss_by_position, documents: 4, buckets: 4}]"])
    evaluators = build_evaluators(cfg.evaluators, EvalSetup(cfg, None))
    model = build_model(ModelConfig(vocab_size=263, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    target = SimpleNamespace(model=model, device=torch.device("cpu"), rank=0, world_size=1,
                             all_reduce=lambda t: t)
    passkey, by_position = (e(target) for e in evaluators)
    assert set(passkey) == {"accuracy", "accuracy@300"}
    assert list(by_position) == ["1-32/loss", "33-64/loss", "65-96/loss", "97-128/loss", "loss"]
    rows = long_documents([str(synthetic)], seq_len=128, documents=4)
    assert len(rows) >= 1
    with torch.no_grad():
        direct = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    direct = direct.view(len(rows), 128).double()
    assert by_position["loss"] == pytest.approx(float(direct.mean()), rel=1e-5)
    assert by_position["97-128/loss"] == pytest.approx(float(direct[:, 96:].mean()), rel=1e-5)


def test_eval_positions_cli_compares_checkpoints_on_the_same_documents(tmp_path, capsys):
    tok = save_tokenizer(byte_level_tokenizer(), tmp_path / "tok")
    synthetic = write_synthetic_dataset(tok, tmp_path / "syn", documents=40, lengths=[160], seed=0,
                                        val_fraction=0.25)
    config = ModelConfig(vocab_size=263, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    models = [build_model(config, seed=s) for s in (0, 1)]
    ckpts = [save_model(m, tmp_path / f"ckpt{i}", extra_files={"tokenizer.json": tok}) for i, m in enumerate(models)]
    out = tmp_path / "pos"
    assert main(["eval", "positions", *map(str, ckpts), "--data", str(synthetic), "--seq-len", "128",
                 "--documents", "4", "--buckets", "4", "--labels", "a", "b", "--mark", "64", "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["positions", "1-32", "33-64", "65-96", "97-128"]
    written = json.loads((out / "positions.json").read_text())
    assert [c["label"] for c in written["curves"]] == ["a", "b"] and written["seq_len"] == 128
    assert (out / "positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each curve is its checkpoint's own loss on the same held-out rows
    rows = long_documents([str(synthetic)], seq_len=128, documents=4)
    for model, curve in zip(models, written["curves"]):
        with torch.no_grad():
            direct = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
        direct = direct.view(len(rows), 128).double()
        assert curve["loss_by_position"]["loss"] == pytest.approx(float(direct.mean()), rel=1e-5)
        assert curve["loss_by_position"]["33-64/loss"] == pytest.approx(float(direct[:, 32:64].mean()), rel=1e-5)
    assert written["curves"][0]["loss_by_position"] != written["curves"][1]["loss_by_position"]
    # bad input: one line, exit 2, nothing written
    assert main(["eval", "positions", str(ckpts[0]), "--data", str(synthetic), "--seq-len", "4000",
                 "--out", str(tmp_path / "none")]) == 2
    assert "no held-out document has 4001 tokens" in capsys.readouterr().err
    assert main(["eval", "positions", *map(str, ckpts), "--data", str(synthetic), "--seq-len", "128",
                 "--labels", "only-one", "--out", str(tmp_path / "none")]) == 2
    assert "--labels: 1 labels for 2 checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
