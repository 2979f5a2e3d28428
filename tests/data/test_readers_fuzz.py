"""Property-based tests (hypothesis) of the readers of user files: whatever the bytes, each either returns or
raises MiniCPMError with one line; never another exception (which the CLI would show as a traceback)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minicpm.errors import MiniCPMError
from minicpm.files import json_object_line, read_json_object
from minicpm.model.config import ModelConfig, preset

FAST = settings(max_examples=60, deadline=None)

json_scalars = (st.none() | st.booleans() | st.integers(-2**40, 2**40)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def only_minicpm_errors(call, *args, **kwargs):
    """call(*args) returns, or raises MiniCPMError with a one-line message; anything else fails the test."""
    try:
        return call(*args, **kwargs)
    except MiniCPMError as e:
        assert "\n" not in str(e), str(e)
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A fresh directory per call (hypothesis runs many examples in one test function)."""
    return lambda: tmp_path_factory.mktemp("case")


# ------------------------------------------------------------------------------------------ JSON readers

@FAST
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | json_values.map(lambda v: json.dumps(v).encode()))
@example(b"[" * 100_000)            # nesting beyond the recursion limit
@example(b"1" * 5000)               # an integer past Python's 4300-digit conversion limit
@example(b"\xef\xbb\xbf{}")         # a UTF-8 byte-order mark
def test_read_json_object_raises_only_minicpm_errors(scratch, data):
    path = scratch() / "file.json"
    path.write_bytes(data)
    result = only_minicpm_errors(read_json_object, path)
    assert result is None or isinstance(result, dict)


@FAST
@given(st.text(max_size=200) | json_values.map(json.dumps))
@example("[" * 100_000)
@example("1" * 5000)
def test_json_object_line_raises_only_minicpm_errors(line):
    result = only_minicpm_errors(json_object_line, line, "data.jsonl:1")
    assert result is None or isinstance(result, dict)


# ------------------------------------------------------------------------------------------ model config.json

MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
TINY = preset("tiny").to_hf_dict()
small_ints = st.integers(-3, 600)


@st.composite
def hf_configs(draw):
    """A tiny model's config.json with some fields replaced by arbitrary JSON values or removed."""
    config = copy.deepcopy(TINY)
    for key in draw(st.lists(st.sampled_from(MODEL_FIELDS + ["rope_scaling", "model_type"]), max_size=4)):
        config[key] = draw(st.one_of(small_ints, json_values, st.dictionaries(
            st.sampled_from(["type", "rope_type", "factor", "original_max_position_embeddings"]), json_scalars,
            max_size=3)))
    for key in draw(st.lists(st.sampled_from(list(config)), max_size=2)):
        config.pop(key, None)
    return config


@FAST
@given(hf_configs())
@example({**TINY, "rope_scaling": "linear"})
@example({**TINY, "rope_scaling": ["linear"]})
@example({**TINY, "scale_depth": "1.4"})
@example({**TINY, "rms_norm_eps": None, "rope_theta": float("nan")})
@example({**TINY, "hidden_size": True, "num_attention_heads": True, "num_key_value_heads": True})
@example({**TINY, "num_experts": -1})
@example({**TINY, "num_experts": 4, "num_experts_per_tok": 9})
@example({**TINY, "tie_word_embeddings": "no"})
def test_model_config_from_hf_dict_raises_only_minicpm_errors(raw):
    config = only_minicpm_errors(ModelConfig.from_hf_dict, raw)
    if config is not None:  # what it accepts is usable: the derived figures compute and are finite
        figures = [config.head_dim, config.width_multiplier, config.residual_scale, config.total_params(),
                   config.active_non_embedding_params(), config.flops_per_token(32), config.rope_theta,
                   config.rms_norm_eps, config.scale_emb, config.initializer_range]
        assert all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in figures)
        assert config.rms_norm_eps > 0 and config.rope_theta > 0
        assert isinstance(config.tie_word_embeddings, bool)


# ------------------------------------------------------------------------------------------ safetensors headers

def write_checkpoint(scratch, header_bytes: bytes, data: bytes = b"") -> Path:
    root = scratch()
    (root / "config.json").write_text(json.dumps(TINY))
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return root


def tensor_entries():
    return st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "F64"]) | json_scalars,
        "shape": st.lists(st.integers(-2, 600), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-10, 10_000), min_size=0, max_size=3) | json_values,
    })


tensor_names = st.sampled_from(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "__metadata__",
                                "x"])
headers = st.dictionaries(tensor_names, tensor_entries() | json_values, max_size=4)


@FAST
@given(st.one_of(headers.map(lambda h: json.dumps(h).encode()), st.binary(max_size=64)), st.binary(max_size=256))
def test_safetensors_header_reading_raises_only_minicpm_errors(scratch, header, data):
    from minicpm.interop.hf import read_checkpoint

    only_minicpm_errors(read_checkpoint, write_checkpoint(scratch, header, data))


EMBED = "model.embed_tokens.weight"
KNOWN_HEADER_FAILURES = {  # each raised something other than MiniCPMError before hf.py checked header types
    "data_offsets an integer": {EMBED: {"dtype": "F32", "shape": [512, 64], "data_offsets": 5}},
    "data_offsets null": {EMBED: {"dtype": "F32", "shape": [512, 64], "data_offsets": None}},
    "data_offsets empty": {EMBED: {"dtype": "F32", "shape": [512, 64], "data_offsets": []}},
    "data_offsets an object": {EMBED: {"dtype": "F32", "shape": [512, 64], "data_offsets": {}}},
    "data_offsets of mixed types": {EMBED: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                    "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}},
    "shape not a list": {EMBED: {"dtype": "F32", "shape": 7, "data_offsets": [0, 4]}},
    "unhashable dtype": {EMBED: {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
}


@pytest.mark.parametrize("case", KNOWN_HEADER_FAILURES)
def test_malformed_safetensors_headers_are_one_line_errors(scratch, case):
    from minicpm.interop.hf import read_checkpoint

    header = json.dumps(KNOWN_HEADER_FAILURES[case]).encode()
    only_minicpm_errors(read_checkpoint, write_checkpoint(scratch, header, b"\0" * 16))


def real_weights(scratch) -> tuple[Path, dict, bytes]:
    """A tiny model saved by safetensors itself: (directory, header, data)."""
    import torch
    from safetensors.torch import save_file

    from minicpm.model.transformer import MiniCPM

    root = scratch()
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in MiniCPM(preset("tiny")).state_dict().items()}, root / "w.safetensors")
    raw = (root / "w.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return root, json.loads(raw[8:8 + n]), raw[8 + n:]


def test_offsets_that_safetensors_rejects_are_one_line_errors(scratch):
    from minicpm.interop.hf import read_checkpoint

    _, header, data = real_weights(scratch)
    header[EMBED]["data_offsets"] = [0, 4]  # shape and dtype right, the byte range too short
    only_minicpm_errors(read_checkpoint, write_checkpoint(scratch, json.dumps(header).encode(), data))


KNOWN_INDEX_FAILURES = {"weight_map a list": ["model.safetensors"], "a file name not a string": {EMBED: 5},
                        "a file name null": {EMBED: None}}


@pytest.mark.parametrize("case", KNOWN_INDEX_FAILURES)
def test_malformed_index_is_a_one_line_error(scratch, case):
    from minicpm.interop.hf import read_checkpoint

    root = write_checkpoint(scratch, b"{}")
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": KNOWN_INDEX_FAILURES[case]}))
    only_minicpm_errors(read_checkpoint, root)


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_index_names_leaving_the_checkpoint_are_refused(scratch, kind):
    from minicpm.interop.hf import read_checkpoint

    elsewhere, header, data = real_weights(scratch)
    root = scratch()
    (root / "config.json").write_text(json.dumps(TINY))
    target = str(elsewhere / "w.safetensors") if kind == "absolute" else f"../{elsewhere.name}/w.safetensors"
    weight_map = {k: target for k in header if k != "__metadata__"}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MiniCPMError, match="outside"):
        read_checkpoint(root)


# ------------------------------------------------------------------------------------------ train config YAML

def config_sections():
    from minicpm.train.config import TrainConfig

    default = TrainConfig()
    return {f.name: [g.name for g in dataclasses.fields(getattr(default, f.name))] for f in dataclasses.fields(default)
            if dataclasses.is_dataclass(getattr(default, f.name))}  # evaluators is a list of sections


SECTIONS = config_sections()
yaml_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=3),
                        st.dictionaries(st.text(max_size=6), json_scalars, max_size=2))


@st.composite
def config_documents(draw):
    """Nested mappings over the real section and field names (and some unknown ones), with arbitrary values."""
    doc = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "extra"]), max_size=3, unique=True)):
        names = SECTIONS.get(section, ["x"]) + ["unknown"]
        doc[section] = draw(st.dictionaries(st.sampled_from(names), yaml_values, max_size=3) | yaml_values)
    return doc


@FAST
@given(st.one_of(config_documents().map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=80)))
@example("42\n")
@example("data:\n  stable: [a, b]\n")
@example("data:\n  stable: {d: .nan}\n")
@example("optim:\n  lr: .nan\n")
@example("optim:\n  eps: .inf\n")
@example("schedule:\n  total_steps: -5\n")
@pytest.mark.slow
def test_load_config_raises_only_minicpm_errors(scratch, text):
    from minicpm.train.config import load_config

    path = scratch() / "config.yaml"
    path.write_text(text, encoding="utf-8")
    only_minicpm_errors(load_config, path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "data:\n  stable: [a, b]\n",
                                  # a mapping where a list belongs, beside an unknown key (found by the fuzz test)
                                  "batch:\n  ramp: {a: 1}\n  unknown: 1\n", "evaluators: {a: 1}\nunknown: 1\n"])
def test_config_yaml_with_a_list_where_a_mapping_belongs_is_one_line(scratch, text):
    from minicpm.train.config import load_config

    path = scratch() / "config.yaml"
    path.write_text(text, encoding="utf-8")
    only_minicpm_errors(load_config, path)


# ------------------------------------------------------------------------------------------ shards meta.json

def prepared_dataset(scratch) -> tuple[Path, dict]:
    """A valid prepared dataset of 3 short documents, written with the real ShardWriter."""
    from minicpm.data.shards import FORMAT, VERSION, ShardWriter, shard_entry

    root = scratch()
    writer = ShardWriter(root / "train", np.dtype("<u2"))
    writer.add(np.array([5, 6, 2, 7, 2, 9, 9, 9, 2], dtype=np.uint16), np.array([3, 2, 4]))
    shards = [shard_entry(s) for s in writer.close()]
    meta = {"format": FORMAT, "version": VERSION, "dtype": "uint16",
            "tokenizer": {"hash": "abc", "vocab_size": 16, "eos_id": 2, "source": "tok.json"},
            "document_format": "tokens + eos", "sources": [{"spec": "x", "documents": 3, "bytes": 30}],
            "val_fraction": 0.0, "skipped_empty_documents": 0,
            "splits": {"train": {"documents": 3, "tokens": 9, "bytes": 30, "shards": shards}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root, meta


META_PATHS = ["dtype", "tokenizer", "tokenizer.vocab_size", "tokenizer.eos_id", "tokenizer.hash", "splits",
              "splits.train", "splits.train.documents", "splits.train.tokens", "splits.train.bytes",
              "splits.train.shards", "splits.train.shards.0", "splits.train.shards.0.name",
              "splits.train.shards.0.tokens", "splits.train.shards.0.documents", "splits.train.shards.0.sha256_bin",
              "sources", "sources.0", "sources.0.documents", "skipped_empty_documents"]


def set_path(meta: dict, path: str, value) -> dict:
    meta = copy.deepcopy(meta)
    *parents, last = path.split(".")
    node = meta
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return meta


meta_values = st.one_of(json_values, st.integers(-5, 20), st.sampled_from(["uint16", "uint32", "../../x", "00000"]))


@FAST
@given(st.lists(st.tuples(st.sampled_from(META_PATHS), meta_values), max_size=3))
@example([("splits.train.shards.0.name", "../../../etc/passwd")])
@example([("splits.train.shards.0.tokens", "9")])
@example([("splits.train.shards", {})])
@example([("splits", [])])
@example([("tokenizer", "x")])
@example([("sources.0", 5)])
def test_prepared_dataset_readers_raise_only_minicpm_errors(scratch, changes):
    from minicpm.data.shards import describe, open_dataset, verify

    root, meta = prepared_dataset(scratch)
    for path, value in changes:
        try:
            meta = set_path(meta, path, value)
        except (KeyError, IndexError, TypeError, ValueError):
            pass  # an earlier change replaced a parent of this path
    (root / "meta.json").write_text(json.dumps(meta))
    only_minicpm_errors(open_dataset, root)
    only_minicpm_errors(verify, root)
    only_minicpm_errors(describe, root, samples=1)


@FAST
@given(st.dictionaries(st.text(max_size=40), json_values | st.text(max_size=40), max_size=6))
def test_index_weight_maps_raise_only_minicpm_errors(scratch, weight_map):
    from minicpm.interop.hf import read_checkpoint

    root = write_checkpoint(scratch, b"{}")
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    only_minicpm_errors(read_checkpoint, root)


# ------------------------------------------------------------------------------------------ JSONL sources

@FAST
@given(st.lists(st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()), max_size=6),
       st.sampled_from(["text", "content"]))
def test_jsonl_sources_raise_only_minicpm_errors(scratch, lines, field):
    from minicpm.data.sources import SourceOptions, iter_documents

    path = scratch() / "docs.jsonl"
    path.write_bytes(b"\n".join(lines))
    only_minicpm_errors(lambda: list(iter_documents(f"jsonl:{path}", SourceOptions(field=field))))


# ------------------------------------------------------------------------------------------ trainer_state.json

def _real_trainer_state():
    import random as python_random

    from minicpm.train.checkpoint import rng_state

    python_random.seed(0)
    return {"step": 3, "tokens": 768, "data": {"drawn": 3}, "rng": rng_state(), "bad_steps": 0, "world_size": 1,
            "interval": {"sums": {"loss": 1.5}, "steps": 1, "skipped": 0}, "schedule": "constant"}


@FAST
@given(st.sampled_from(["step", "tokens", "data", "rng", "interval", "bad_steps", "world_size", "schedule", "files"]),
       json_values)
@pytest.mark.slow
def test_trainer_state_check_raises_only_minicpm_errors(field, value):
    from minicpm.checkpoints.state_schema import check_trainer_state

    state = _real_trainer_state()
    state[field] = value
    only_minicpm_errors(check_trainer_state, state, Path("run/checkpoints/step_3/trainer_state.json"))


@FAST
@given(json_values)
def test_a_whole_trainer_state_of_any_shape_raises_only_minicpm_errors(value):
    from minicpm.checkpoints.state_schema import check_trainer_state

    only_minicpm_errors(check_trainer_state, value, Path("trainer_state.json"))
