"""`minicpm prepare` and the shard format: round trips, counts, determinism, dtype switch, and bad input."""

import json
import os
import re
from fractions import Fraction
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from minicpm.cli import main
from minicpm.data.prepare import THREADS_AT_MOST, is_held_out, prepare, uses_processes
from minicpm.data.shards import open_dataset, verify
from minicpm.data.tokenizer import byte_level_tokenizer, load_tokenizer, save_tokenizer, tokenizer_hash, \
    train_tokenizer
from minicpm.errors import MiniCPMError

TRICKY = [
    "def f(x):\n\treturn x + 12345\n\n\n# a comment\n",
    "héllo wörld — naïve café; Ελληνικά, русский, 日本語テキスト, 한국어\n",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 end",
    "\n\n\nleading empty lines\n\n\ttabs\tand  double  spaces   \n",
    "   \t  ",
    "</s> <s> <|im_start|> literal special-token text",
    "\r\nwindows\r\nline endings\r\n",
    "a" * 3000,
    "x",
    "",  # empty: skipped
    "\x00\x01 control bytes \x7f",
]


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    corpus = write_jsonl(tmp_path_factory.mktemp("c") / "c.jsonl", TRICKY * 5)
    return train_tokenizer([str(corpus)], 420, tmp_path_factory.mktemp("tok"))


def decode_split(path, split, tok):
    ds = open_dataset(path, split)
    docs = [ds.document(i) for i in range(len(ds))]
    assert all(d[-1] == 2 for d in docs)
    return [tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in docs]


def test_text_to_shards_to_text_round_trips_tricky_documents(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "docs.jsonl", TRICKY)
    prepare([str(source)], tokenizer, tmp_path / "ds", val_fraction=0.25, workers=1, progress=False)
    tok = load_tokenizer(tmp_path / "ds")  # the copy stored with the shards
    train, val = iter(decode_split(tmp_path / "ds", "train", tok)), iter(decode_split(tmp_path / "ds", "val", tok))
    kept = [t for t in TRICKY if t]
    rebuilt = [next(val) if is_held_out(i, Fraction(1, 4)) else next(train) for i in range(len(kept))]
    assert rebuilt == kept


def test_meta_counts_equal_a_recount_with_tokenizers(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "docs.jsonl", TRICKY * 3)
    result = prepare([str(source)], tokenizer, tmp_path / "ds", val_fraction=0.1, workers=1, progress=False)
    tok = Tokenizer.from_file(str(tokenizer))
    tok.encode_special_tokens = True
    kept = [t for t in TRICKY * 3 if t]
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    splits = meta["splits"]
    assert sum(s["tokens"] for s in splits.values()) == sum(len(tok.encode(t, add_special_tokens=False).ids) + 1
                                                            for t in kept)
    assert sum(s["documents"] for s in splits.values()) == len(kept) == 30
    assert splits["val"]["documents"] == 1 + (30 - 1) // 10
    assert sum(s["bytes"] for s in splits.values()) == sum(len(t.encode()) for t in kept) == result.bytes
    assert meta["tokenizer"]["hash"] == tokenizer_hash(tokenizer) == tokenizer_hash(tmp_path / "ds")
    assert meta["skipped_empty_documents"] == 3 and meta["dtype"] == "uint16"
    assert verify(tmp_path / "ds")["train"]["tokens"] == splits["train"]["tokens"]


def test_output_is_byte_identical_whatever_the_worker_count_and_kind(tmp_path, tokenizer, monkeypatch):
    source = write_jsonl(tmp_path / "docs.jsonl", [f"{i}: {t}" for i in range(40) for t in TRICKY[:4]])
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    runs = {"1": (1, "auto"), "2-threads": (2, "threads"), "3-threads": (3, "auto"), "2-processes": (2, "processes")}
    for name, (workers, parallelism) in runs.items():
        prepare([str(source)], tokenizer, tmp_path / name, workers=workers, parallelism=parallelism,
                val_fraction=0.05, batch_bytes=2000, shard_tokens=1500, progress=False)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # the caller's setting is put back

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    one = files(tmp_path / "1")
    for name in runs:
        assert files(tmp_path / name) == one, name
    assert len([p for p in one if p.suffix == ".bin" and p.parts[0] == "train"]) >= 3  # several shards written


def test_workers_past_the_thread_limit_are_processes():
    assert [uses_processes(n, "auto") for n in (1, THREADS_AT_MOST, THREADS_AT_MOST + 1)] == [False, False, True]
    assert uses_processes(2, "processes") and not uses_processes(64, "threads")


def test_bad_workers_or_parallelism_is_one_line(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "d.jsonl", ["one"])
    with pytest.raises(MiniCPMError, match=r"--workers 0: must be at least 1"):
        prepare([str(source)], tokenizer, tmp_path / "out", workers=0, progress=False)
    with pytest.raises(MiniCPMError, match=r"parallelism 'fibers': must be one of auto, threads, processes"):
        prepare([str(source)], tokenizer, tmp_path / "out", parallelism="fibers", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vocab, dtype", [(65536, "uint16"), (65537, "uint32")])
def test_dtype_switches_from_uint16_to_uint32_at_the_boundary(tmp_path, vocab, dtype):
    spec = json.loads(byte_level_tokenizer().to_str())
    base = len(spec["model"]["vocab"])
    spec["model"]["vocab"].update({f"<filler_{i}>": base + i for i in range(vocab - base - 1)})
    spec["model"]["vocab"]["ab"] = vocab - 1  # the highest id, reached by merging "a" and "b"
    spec["model"]["merges"] = ["a b"]
    tok_path = save_tokenizer(Tokenizer.from_str(json.dumps(spec)), tmp_path / "tok")
    source = write_jsonl(tmp_path / "d.jsonl", ["ab ab", "cab"])
    prepare([str(source)], tok_path, tmp_path / "ds", val_fraction=0, workers=1, progress=False)
    ds = open_dataset(tmp_path / "ds")
    assert ds.meta["dtype"] == dtype and ds.dtype.name == dtype
    assert int(ds.document(0).max()) == vocab - 1
    assert decode_split(tmp_path / "ds", "train", load_tokenizer(tok_path)) == ["ab ab", "cab"]


def run_cli(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"ok\nstill ok\n\xff\xfe\n", r"bad\.txt:3: invalid UTF-8"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": \n', r"bad\.jsonl:2: not valid JSON"),
    ("bad.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', r"bad\.jsonl:2: no field 'text'"),
    ("empty.txt", b"", r"empty\.txt: no documents \(empty corpus\)"),
])
def test_bad_input_is_one_line_naming_file_and_line_and_leaves_no_output(tmp_path, capsys, tokenizer, name,
                                                                          content, message):
    good = write_jsonl(tmp_path / "good.jsonl", [f"document {i} " * 50 for i in range(200)])
    (tmp_path / name).write_bytes(content)
    sources = [str(tmp_path / name)] if name == "empty.txt" else [str(good), str(tmp_path / name)]
    rc, err = run_cli(["prepare", *sources, "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out"),
                       "--workers", "1"], capsys)
    assert rc != 0 and len(err) == 1
    assert re.search(message, err[0]), err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unreadable_file_fails_in_the_command_with_a_non_zero_exit(tmp_path, tokenizer, cli):
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere")
    proc = cli("prepare", f"text:{tmp_path / 'gone.txt'}", "--tokenizer", tokenizer, "--out", tmp_path / "out")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "gone.txt: cannot read" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failure_after_shards_were_written_leaves_nothing(tmp_path, tokenizer):
    docs = [f"document {i} " * 40 for i in range(300)]
    source = tmp_path / "late.jsonl"
    source.write_bytes(write_jsonl(tmp_path / "x.jsonl", docs).read_bytes() + b"not json\n")
    with pytest.raises(MiniCPMError, match=r"late\.jsonl:301: not valid JSON"):
        prepare([str(source)], tokenizer, tmp_path / "out", workers=2, batch_bytes=4000, shard_tokens=2000,
                progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "d.jsonl", ["one", "two", "three"])
    prepare([str(source)], tokenizer, tmp_path / "out", val_fraction=0, workers=1, progress=False)
    with pytest.raises(MiniCPMError, match="already exists"):
        prepare([str(source)], tokenizer, tmp_path / "out", workers=1, progress=False)
    prepare([str(write_jsonl(source, ["four"]))], tokenizer, tmp_path / "out", val_fraction=0, workers=1,
            overwrite=True, progress=False)
    assert open_dataset(tmp_path / "out").num_documents == 1


def test_a_corpus_too_small_to_hold_out_is_an_error(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "d.jsonl", ["only one"])
    with pytest.raises(MiniCPMError, match="all held out by --val-fraction"):
        prepare([str(source)], tokenizer, tmp_path / "out", val_fraction=0.01, workers=1, progress=False)


def test_held_out_split_is_spread_evenly_from_the_first_document():
    picks = [i for i in range(1000) if is_held_out(i, Fraction(1, 100))]
    assert picks == list(range(0, 1000, 100))
    assert [i for i in range(7) if is_held_out(i, Fraction(3, 10))] == [0, 4]  # 1 + floor((7 - 1) * 0.3)


@pytest.fixture()
def small_dataset(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "d.jsonl", TRICKY * 4)
    prepare([str(source)], tokenizer, tmp_path / "ds", val_fraction=0.1, workers=1, progress=False)
    return tmp_path / "ds"


def test_truncated_missing_or_corrupt_shards_are_named(small_dataset):
    shard = small_dataset / "train" / "00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(MiniCPMError, match=r"train/00000\.bin: \d+ bytes, meta.json implies \d+ \(truncated"):
        open_dataset(small_dataset)
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(MiniCPMError, match=r"train/00000\.bin: checksum differs"):
        verify(small_dataset)
    os.remove(small_dataset / "val" / "00000.idx")
    with pytest.raises(MiniCPMError, match=r"val/00000\.idx: missing"):
        open_dataset(small_dataset, "val")
    with pytest.raises(MiniCPMError, match="no 'test' split"):
        open_dataset(small_dataset, "test")
    os.remove(small_dataset / "meta.json")
    with pytest.raises(MiniCPMError, match=r"meta\.json: missing"):
        open_dataset(small_dataset)


def test_inspect_prints_counts_histogram_and_samples(small_dataset, capsys):
    assert main(["data", "inspect", str(small_dataset), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    train = json.loads((small_dataset / "meta.json").read_text())["splits"]["train"]
    assert f"{train['tokens']:,}" in out and "document length in tokens" in out and "#" in out
    assert out.count("tokens: '") == 2
    assert main(["data", "verify", str(small_dataset)]) == 0
    assert ": ok (" in capsys.readouterr().out
