"""Mixtures: packing, determinism, exact resume, the realised mix, stage mixtures, held-out rows, mismatches."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from minicpm.data.mixture import Mixture, _WindowOrder, bytes_per_token, validation_batches
from minicpm.data.prepare import prepare
from minicpm.data.shards import open_dataset
from minicpm.data.tokenizer import EOS_ID, SPECIAL_TOKENS, byte_level_tokenizer, save_tokenizer, train_tokenizer
from minicpm.errors import MiniCPMError

A_ID = len(SPECIAL_TOKENS) + ord("a")  # the byte-level tokenizer: one token a byte
B_ID = len(SPECIAL_TOKENS) + ord("b")
SEQ = 16


def make_dataset(root, name, letter, tokenizer, n_docs=60, val_fraction=0.1):
    rng = np.random.default_rng(len(name))
    source = root / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": letter * int(k)}) + "\n" for k in rng.integers(1, 40, n_docs)))
    prepare([str(source)], tokenizer, root / name, val_fraction=val_fraction, workers=1, progress=False)
    return str(root / name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    tok = save_tokenizer(byte_level_tokenizer(), root / "tok")
    return make_dataset(root, "a", "a", tok), make_dataset(root, "b", "b", tok), root


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """200 documents of 50-150 bytes, document i being '<i>' repeated (i as 3 digits): a row names its documents."""
    root = tmp_path_factory.mktemp("numbered")
    tok = save_tokenizer(byte_level_tokenizer(), root / "tok")
    rng = np.random.default_rng(0)
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"<{i:03d}>" * int(k)}) + "\n"
                              for i, k in enumerate(rng.integers(10, 31, 200))))
    prepare([str(source)], tok, root / "numbered", val_fraction=0.2, workers=1, progress=False)
    return str(root / "numbered")


def documents_in(rows: torch.Tensor) -> set[str]:
    """The numbered documents the rows hold a piece of (any 7 bytes of a document name it)."""
    found = set()
    for row in rows:
        text = "".join("|" if t == EOS_ID else chr(t - len(SPECIAL_TOKENS)) for t in row.tolist())
        found |= set(re.findall(r"\d{3}", text))
    return found


def source_of(row: torch.Tensor) -> str:
    letters = set(row.tolist()) - {EOS_ID}
    assert letters in ({A_ID}, {B_ID}), letters
    return "a" if letters == {A_ID} else "b"


def draw(mixture, batches, size=8):
    return [mixture.next_batch(size) for _ in range(batches)]


def test_two_fresh_samplers_and_a_resumed_one_yield_identical_batches(data):
    a, b, _ = data
    weights = {a: 0.6, b: 0.4}
    first, second = Mixture(weights, seq_len=SEQ, seed=7), Mixture(weights, seq_len=SEQ, seed=7)
    reference = draw(first, 6)
    assert all(torch.equal(x, y) for x, y in zip(reference, draw(second, 6)))
    interrupted = Mixture(weights, seq_len=SEQ, seed=7)
    draw(interrupted, 2)
    state = json.loads(json.dumps(interrupted.state_dict()))  # it travels through trainer_state.json
    resumed = Mixture(weights, seq_len=SEQ, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(reference[2:], draw(resumed, 4)))
    other_seed = draw(Mixture(weights, seq_len=SEQ, seed=8), 6)
    assert not all(torch.equal(x, y) for x, y in zip(reference, other_seed))


def test_window_order_is_a_permutation_for_any_count():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        order = [_WindowOrder(n, key=11)[i] for i in range(n)]
        assert sorted(order) == list(range(n))
        if n >= 64:
            assert order != list(range(n)) and order != [_WindowOrder(n, key=12)[i] for i in range(n)]


def test_one_epoch_trains_on_every_token_but_the_last_partial_window_once(numbered):
    ds = open_dataset(numbered)
    mixture = Mixture({numbered: 1.0}, seq_len=SEQ, seed=3)
    windows = (ds.num_tokens - 1) // SEQ
    rows = mixture.next_batch(windows)
    assert rows.shape == (windows, SEQ + 1) and rows.dtype == torch.long
    every = Counter(ds.tokens(0, ds.num_tokens).tolist())
    labels = Counter(rows[:, 1:].flatten().tolist())
    assert not labels - every and (every - labels).total() == ds.num_tokens - windows * SEQ  # < SEQ + 1 skipped
    assert len(documents_in(rows)) >= ds.num_documents - 1  # all but one in the skipped tail, at most
    assert mixture.state_dict()["datasets"][0]["epoch"] == 0
    nxt = mixture.next_batch(windows)  # the next epoch: a fresh document and window order
    assert mixture.state_dict()["datasets"][0]["epoch"] == 1 and not torch.equal(nxt, rows)
    assert not Counter(nxt[:, 1:].flatten().tolist()) - every


def test_consecutive_sequences_of_a_batch_come_from_all_over_the_dataset(numbered):
    mixture = Mixture({numbered: 1.0}, seq_len=SEQ, seed=0)
    for _ in range(3):
        batch = mixture.next_batch(16)
        assert len(documents_in(batch)) >= 8  # consecutive windows of one layout would cover 2-4 documents
        assert sum(torch.equal(batch[i + 1, 0], batch[i, -1]) for i in range(15)) < 12


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, 3.0), (0.51, 0.49)])
def test_realised_mix_over_10k_sequences_is_within_2_percent(data, weights):
    a, b, _ = data
    mixture = Mixture({a: weights[0], b: weights[1]}, seq_len=4, seed=1)
    rows = mixture.next_batch(10_000)
    share_a = sum(source_of(r) == "a" for r in rows) / len(rows)
    assert abs(share_a - weights[0] / sum(weights)) < 0.02
    assert mixture.sequences_drawn() == {a: round(share_a * 10_000), b: 10_000 - round(share_a * 10_000)}


def test_stable_and_decay_mixtures_keep_their_own_state(data):
    a, b, _ = data
    alone = Mixture({a: 0.9, b: 0.1}, seq_len=SEQ, seed=5)
    stable = Mixture({a: 0.9, b: 0.1}, seq_len=SEQ, seed=5)
    decay = Mixture({a: 0.2, b: 0.8}, seq_len=SEQ, seed=5)
    expected = draw(alone, 4)
    got = []
    for _ in range(4):
        got.append(stable.next_batch(8))
        decay.next_batch(8)
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    shares = decay.sequences_drawn()
    assert shares[b] > shares[a]


def test_decay_mixture_can_go_on_reading_where_the_stable_mixture_stopped(data):
    a, b, _ = data
    stable = Mixture({a: 1.0}, seq_len=SEQ, seed=2)
    draw(stable, 3)
    decay = Mixture({a: 1.0, b: 0.0}, seq_len=SEQ, seed=2)
    decay.load_state_dict(stable.state_dict(), streams_only=True)
    assert torch.equal(decay.next_batch(8), stable.next_batch(8))


def test_state_is_plain_json_and_a_mismatched_state_is_refused(data):
    a, b, _ = data
    mixture = Mixture({a: 1.0, b: 1.0}, seq_len=SEQ, seed=0)
    mixture.next_batch(3)
    state = mixture.state_dict()
    assert json.loads(json.dumps(state)) == state
    with pytest.raises(MiniCPMError, match="seq_len 16, this mixture has 8"):
        Mixture({a: 1.0, b: 1.0}, seq_len=8, seed=0).load_state_dict(state)
    with pytest.raises(MiniCPMError, match="sampler state is for datasets"):
        Mixture({b: 1.0, a: 1.0}, seq_len=SEQ, seed=0).load_state_dict(state)
    with pytest.raises(MiniCPMError, match="weights"):
        Mixture({a: 3.0, b: 1.0}, seq_len=SEQ, seed=0).load_state_dict(state)


def test_shards_from_another_tokenizer_are_refused_naming_the_dataset(data, tmp_path):
    a, _, root = data
    corpus = tmp_path / "c.txt"
    corpus.write_text("some other text to train on " * 50)
    other_tok = train_tokenizer([str(corpus)], 300, tmp_path / "tok")
    other = make_dataset(tmp_path, "other", "c", other_tok)
    with pytest.raises(MiniCPMError, match=r"other: made with tokenizer \w+, but .*a with \w+"):
        Mixture({a: 1.0, other: 1.0}, seq_len=SEQ, seed=0)
    with pytest.raises(MiniCPMError, match=r"a: made with tokenizer \w+, but this run's tokenizer is deadbeef"):
        Mixture({a: 1.0}, seq_len=SEQ, seed=0, tokenizer_hash="deadbeef")
    with pytest.raises(MiniCPMError, match="weight -1"):
        Mixture({a: -1.0}, seq_len=SEQ, seed=0)
    with pytest.raises(MiniCPMError, match="no such prepared dataset"):
        Mixture({str(root / "missing"): 1.0}, seq_len=SEQ, seed=0)


def test_validation_batches_are_fixed_rows_from_the_held_out_split(data):
    a, b, _ = data
    rows = validation_batches([a, b], seq_len=4, max_sequences=6)
    assert rows.shape == (6, 5) and torch.equal(rows, validation_batches([a, b], seq_len=4, max_sequences=6))
    assert [source_of(r) for r in rows] == ["a"] * 3 + ["b"] * 3
    val = open_dataset(a, "val")
    windows = (val.num_tokens - 1) // 4
    assert rows[0].tolist() == val.tokens(0, 5).tolist()
    assert rows[2].tolist() == val.tokens(2 * windows // 3 * 4, 2 * windows // 3 * 4 + 5).tolist()
    with pytest.raises(MiniCPMError, match="fewer than one window"):
        validation_batches([a], seq_len=10_000, max_sequences=2)
    expected = (val.num_bytes + open_dataset(b, "val").num_bytes) / (val.num_tokens + open_dataset(b, "val").num_tokens)
    assert bytes_per_token([a, b]) == pytest.approx(expected)
    assert bytes_per_token([a], split="train") == pytest.approx(
        open_dataset(a).num_bytes / open_dataset(a).num_tokens)


def test_validation_rows_are_spread_over_the_whole_held_out_split(numbered):
    rows = validation_batches([numbered], seq_len=SEQ, max_sequences=16)
    assert rows.shape == (16, SEQ + 1) and len(documents_in(rows)) >= 12  # the first 16 windows hold 3-5
    val = open_dataset(numbered, "val")
    last = (val.num_tokens - 1) // SEQ * 15 // 16
    assert rows[-1].tolist() == val.tokens(last * SEQ, last * SEQ + SEQ + 1).tolist()
