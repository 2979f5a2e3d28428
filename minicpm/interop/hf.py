"""Model directories in the official HF MiniCPM layout: reading them (validated against their config.json) and
writing them atomically. The folded Llama export is interop/llama.py; a fresh checkpoint, interop/initialise.py.

A checkpoint directory holds `config.json` (official field names) and `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. Tensor names are the official keys, which
are our module names, except for an MoE's experts: the model stacks them, the checkpoint holds them one by one
(`official_state` maps them, model/moe.py). Weights are only ever read from safetensors: nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minicpm.errors import MiniCPMError
from minicpm.interop.formats import WEIGHT_DTYPES
from minicpm.files import plain_permissions, publish_directory, read_json_object, safe_relative, temporary_directory_for
from minicpm.model.config import ModelConfig
from minicpm.model.moe import per_expert_state
from minicpm.model.transformer import MiniCPM

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
DTYPE_CHOICES = WEIGHT_DTYPES

PathLike = Union[str, os.PathLike]


def parse_dtype(value: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """torch dtype from 'bf16' / 'bfloat16' / torch.bfloat16 (None stays None); only the three weight dtypes."""
    if value is None or isinstance(value, torch.dtype) and value in _SAFETENSORS_DTYPES.values():
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise MiniCPMError(f"{what} {value!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- reading

@dataclasses.dataclass(frozen=True)
class _Entry:
    file: Path
    key: str  # the name in the file (differs from the model key for a tied head stored as lm_head.weight)
    dtype: str
    shape: tuple[int, ...]


def _read_header(file: Path) -> dict:
    """The JSON header of a safetensors file, every entry checked for its types and against the file's size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise MiniCPMError(f"{file}: not a safetensors file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise MiniCPMError(f"{file}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MiniCPMError(f"{file}: not a safetensors file (its header is not JSON)") from None
    except (ValueError, RecursionError):
        raise MiniCPMError(f"{file}: not a safetensors file (its header is past the JSON parser's limits)") from None
    if not isinstance(header, dict):
        raise MiniCPMError(f"{file}: not a safetensors file")
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        _check_header_entry(file, key, info)
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise MiniCPMError(f"{file}: truncated: the header describes {end} bytes of data, the file holds {size - 8 - n}")
    return header


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_header_entry(file: Path, key: str, info: object) -> None:
    """One tensor's header entry: {"dtype": str, "shape": [int >= 0...], "data_offsets": [begin <= end]}."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise MiniCPMError(f"{file}: not a safetensors file (bad header entry {key!r})")
    if not isinstance(info["dtype"], str):
        raise MiniCPMError(f"{file}: tensor {key}: dtype {info['dtype']!r} is not a string")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise MiniCPMError(f"{file}: tensor {key}: shape {shape!r} is not a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise MiniCPMError(f"{file}: tensor {key}: data_offsets {offsets!r} is not [begin, end] with "
                           f"0 <= begin <= end")


def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MiniCPMError(f"{index}: not a safetensors index (no 'weight_map' object)")
        names = set()
        for key, name in weight_map.items():
            if not isinstance(name, str):
                raise MiniCPMError(f"{index}: weight_map[{key!r}] is {name!r}, not a file name")
            names.add(name)
        return [safe_relative(root, name, where=str(index)) for name in sorted(names)]
    if (root / WEIGHTS).exists():
        return [root / WEIGHTS]
    pickled = sorted(p.name for p in root.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise MiniCPMError(f"{root / pickled[0]}: not safetensors; weights are never unpickled here "
                           f"(convert it with safetensors first)")
    raise MiniCPMError(f"{root}: no {WEIGHTS} or {INDEX}")


def _read_config(root: Path) -> tuple[ModelConfig, dict]:
    path = root / CONFIG
    raw = read_json_object(path, missing=" (a checkpoint directory needs config.json beside the weights)")
    raw.update(_rope_fields(raw))
    model_type = raw.get("model_type", "minicpm")
    if model_type == "llama":
        raw.update(_minicpm_fields_for_llama(raw))
    elif model_type != "minicpm":
        raise MiniCPMError(f"{path}: model_type {model_type!r} is not minicpm or llama")
    stored = raw.pop("dtype", None) or raw.get("torch_dtype") or "float32"
    raw["torch_dtype"] = dtype_name(parse_dtype(stored, what=f"{path}: torch_dtype"))
    return ModelConfig.from_hf_dict(raw, source=str(path)), raw


def _minicpm_fields_for_llama(raw: dict) -> dict:
    # a plain Llama is MiniCPM with neutral multipliers: scale_emb 1, residual scale 1, logit divisor 1
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise MiniCPMError(f"config.json: {key} is true; MiniCPM has no biases")
    head_dim, heads, hidden = raw.get("head_dim"), raw.get("num_attention_heads"), raw.get("hidden_size")
    if head_dim and heads and head_dim * heads != hidden:
        raise MiniCPMError(f"config.json: head_dim {head_dim} is not hidden_size/num_attention_heads")
    return dict(scale_emb=1.0, scale_depth=math.sqrt(raw.get("num_hidden_layers") or 1), dim_model_base=hidden,
                tie_word_embeddings=raw.get("tie_word_embeddings", False))


def _rope_fields(raw: dict) -> dict:
    """rope_theta and rope_scaling from transformers 5's `rope_parameters` (4.x configs hold them top-level)."""
    rope = raw.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    fields = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        fields["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return fields


def official_state(model: MiniCPM, *, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict under the official keys, in its order: an MoE's stacked experts as per-expert views
    (no copy; copying into them, under no_grad, fills the model)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper prefixes every key with _orig_mod.
    return per_expert_state(model.state_dict(keep_vars=keep_vars))


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MiniCPM(config)
    return {k: tuple(v.shape) for k, v in official_state(model).items()}


def _index_checkpoint(root: Path) -> tuple[ModelConfig, dict[str, _Entry]]:
    """Validated plan of where each model tensor lives: every problem is one MiniCPMError naming the file and key."""
    config, _ = _read_config(root)
    stored: dict[str, _Entry] = {}
    for file in _weight_files(root):
        for key, info in _read_header(file).items():
            if key.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some HF versions saved; RoPE is recomputed here
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise MiniCPMError(f"{file}: tensor {key} has dtype {info['dtype']}; expected one of "
                                   f"{', '.join(_SAFETENSORS_DTYPES)}")
            stored[key] = _Entry(file, key, info["dtype"], tuple(info["shape"]))
    if config.tie_word_embeddings and "lm_head.weight" in stored:
        # a tied head saved under its own name (HF drops one of two shared tensors; which one varies), or both
        head = stored.pop("lm_head.weight")
        embed = stored.setdefault("model.embed_tokens.weight", head)
        if embed is not head and not torch.equal(*(t for _, t in _tensors({"a": embed, "b": head}))):
            raise MiniCPMError(f"{head.file}: lm_head.weight differs from model.embed_tokens.weight, but config.json "
                               f"has tie_word_embeddings true")
    expected = _expected_shapes(config)
    for key, shape in expected.items():
        if key not in stored:
            raise MiniCPMError(f"{root}: missing tensor {key}")
        entry = stored[key]
        if entry.shape != shape:
            raise MiniCPMError(f"{entry.file}: tensor {key} has shape {list(entry.shape)}; "
                               f"config.json implies {list(shape)}")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise MiniCPMError(f"{stored[unexpected[0]].file}: unexpected tensor {unexpected[0]} "
                           f"(not part of the model config.json describes)")
    return config, stored


def _checkpoint_dir(path: PathLike) -> Path:
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise MiniCPMError(f"{path}: not safetensors; give a checkpoint directory (config.json + model.safetensors)")
        return path.parent
    if not path.exists():
        raise MiniCPMError(f"{path}: no such checkpoint directory")
    return path


def _tensors(plan: Mapping[str, _Entry], device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for key, entry in plan.items():
        by_file.setdefault(entry.file, []).append(key)
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in keys:  # one tensor at a time in memory
                    yield key, f.get_tensor(plan[key].key)
        except SafetensorError as e:
            raise MiniCPMError(f"{file}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def read_checkpoint(path: PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and every tensor (in its stored dtype) of a checkpoint directory, validated against the config."""
    root = _checkpoint_dir(path)
    config, plan = _index_checkpoint(root)
    return config, dict(_tensors(plan))


def checkpoint_config(path: PathLike) -> ModelConfig:
    """Only the config of a checkpoint directory (or a config.json)."""
    path = Path(path)
    if path.name == CONFIG and path.is_file():
        path = path.parent
    return _read_config(_checkpoint_dir(path))[0]


@torch.no_grad()
def load_model(path: PathLike, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> MiniCPM:
    """A MiniCPM from a checkpoint directory, in `dtype` (default: as stored), one tensor at a time in memory."""
    root = _checkpoint_dir(path)
    config, plan = _index_checkpoint(root)
    dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype)
    with torch.device("meta"):
        model = MiniCPM(config)
    model.to(dtype=dtype).to_empty(device=device)
    params = official_state(model, keep_vars=True)
    for key, tensor in _tensors(plan, device):
        params[key].copy_(tensor)
    return model


# ---------------------------------------------------------------- writing

def model_dtype(model: MiniCPM) -> torch.dtype:
    """The dtype the model's weights are held in (a save keeps it unless told otherwise)."""
    return model.head_weight.dtype


def write_weight_files(directory: Path, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                       max_shard_bytes: int | None) -> list[str]:
    """model.safetensors, or shards of at most max_shard_bytes and their index (huggingface_hub plans the split, in
    the sizes the tensors will have in `dtype`). Returns the names written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    planned = {k: torch.empty(v.shape, dtype=dtype, device="meta") for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(planned, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes or 2**62)
    for name, keys in split.filename_to_tensors.items():
        # converted shard by shard, so a save needs one shard of extra memory, not a second model
        part = {k: tensors[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in keys}
        save_file(part, str(directory / name), metadata={"format": "pt"})
    names = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        names.append(INDEX)
    return names


def _is_weight_file(name: str) -> bool:
    return name == INDEX or (name.startswith("model") and name.endswith(".safetensors"))


def write_files(directory: Path, config: dict, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                max_shard_bytes: int | None, extra_files: Mapping[str, bytes | str | Path] | None) -> list[str]:
    """Weights, extra files and config.json (last) into `directory`, which the caller makes atomic."""
    names = write_weight_files(directory, tensors, dtype, max_shard_bytes)
    for name, content in (extra_files or {}).items():
        if isinstance(content, Path):
            shutil.copyfile(content, directory / name)
        else:
            (directory / name).write_bytes(content.encode() if isinstance(content, str) else content)
        names.append(name)
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return names + [CONFIG]


def write_dir(out_dir: Path, config: dict, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
              max_shard_bytes: int | None, extra_files: Mapping[str, bytes | str | Path] | None) -> Path:
    """A model directory written atomically: a new one appears by one rename; into an existing directory each file
    is renamed into place and stale weight files are removed, so what else it holds stays."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MiniCPMError(f"{out_dir}: exists and is not a directory")
    tmp = temporary_directory_for(out_dir)
    try:
        names = write_files(tmp, config, tensors, dtype, max_shard_bytes, extra_files)
        for name in names:
            plain_permissions(tmp / name)
        if not out_dir.exists():
            return publish_directory(tmp, out_dir)
        for name in names:
            os.replace(tmp / name, out_dir / name)
        for stale in out_dir.iterdir():
            if _is_weight_file(stale.name) and stale.name not in names:
                stale.unlink()
        return out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_state(config: ModelConfig, state: Mapping[str, torch.Tensor], out_dir: PathLike, *,
               dtype: str | torch.dtype | None = None, max_shard_bytes: int | None = None,
               extra_files: Mapping[str, bytes | str | Path] | None = None,
               extra_config: Mapping[str, object] | None = None) -> Path:
    """Write a full state dict (official keys) and its config in the official layout; see save_model.
    extra_config: config.json fields beyond the ModelConfig's (an official auto_map)."""
    dtype = parse_dtype(dtype) or next(iter(state.values())).dtype
    hf = dataclasses.replace(config, torch_dtype=dtype_name(dtype)).to_hf_dict()
    hf.update(extra_config or {})
    return write_dir(Path(out_dir), hf, state, dtype, max_shard_bytes, extra_files)


def _hf_config(model: MiniCPM, dtype: torch.dtype) -> dict:
    return dataclasses.replace(model.config, torch_dtype=dtype_name(dtype)).to_hf_dict()


def write_model_files(directory: Path, model: MiniCPM, *,
                      extra_files: Mapping[str, bytes | str | Path] | None = None) -> list[str]:
    """A model's config.json and weights (in its own dtype) into a directory the caller makes atomic, such as a
    training checkpoint being written."""
    model = getattr(model, "_orig_mod", model)
    dtype = model_dtype(model)
    return write_files(Path(directory), _hf_config(model, dtype), official_state(model), dtype, None, extra_files)


def save_model(model: MiniCPM, out_dir: PathLike, *, dtype: str | torch.dtype | None = None,
               max_shard_bytes: int | None = None, extra_files: Mapping[str, bytes | str | Path] | None = None) -> Path:
    """config.json + model.safetensors (or shards of at most max_shard_bytes + index), written atomically.

    dtype: bf16 / fp16 / fp32 (default: the model's). extra_files: name -> content (bytes, str, or a Path to copy),
    e.g. a tokenizer.json that should appear together with the weights.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper prefixes every key with _orig_mod.
    return save_state(model.config, official_state(model), out_dir, dtype=dtype or model_dtype(model),
                      max_shard_bytes=max_shard_bytes, extra_files=extra_files)


def parse_size(text: str) -> int:
    """Bytes from '500MB', '2GB', '1.5GiB' or a plain number (for --max-shard-size)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("BIKMG")
    unit = text.strip().upper()[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise MiniCPMError(f"size {text!r} is not a number with an optional unit (KB, MB, GB, KiB, MiB, GiB)") from None
    if value <= 0:
        raise MiniCPMError(f"size {text!r} must be positive")
    return int(value)


def tokenizer_files(root: PathLike) -> dict[str, Path]:
    """The tokenizer files that sit in a checkpoint directory, to carry along to a converted copy."""
    root = _checkpoint_dir(root)
    return {name: root / name for name in TOKENIZER_FILES if (root / name).is_file()}


def import_checkpoint(src: PathLike, out_dir: PathLike, *, dtype: str | torch.dtype | None = None,
                      max_shard_bytes: int | None = None, official_rope: bool = False) -> Path:
    """An official HF MiniCPM directory (or a plain Llama one, as MiniCPM with neutral multipliers) → our layout,
    validated, optionally converted to `dtype`, with its tokenizer files (chat template included), and the
    official modeling files with config.json's auto_map where the source has them (so that the copy loads with
    trust_remote_code). official_rope: write only a RoPE the official config accepts (see interop/official.py)."""
    from minicpm.interop.official import carried_config_fields, official_files, official_rope as to_official_rope

    config, tensors = read_checkpoint(src)
    for name, tensor in tensors.items():  # a diverged model copied as if it were one
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MiniCPMError(f"{src}: {name} holds NaN or Inf values; not a usable model")
    root = _checkpoint_dir(src)
    _, raw = _read_config(root)
    if official_rope:
        config = to_official_rope(config)
    return save_state(config, tensors, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                      extra_files={**tokenizer_files(src), **official_files(root)},
                      extra_config=carried_config_fields(raw, root))


def checkpoint_summary(path: PathLike) -> dict:
    """What the weight files hold: tensor count, parameter count and dtypes (for `minicpm info`)."""
    root = _checkpoint_dir(path)
    _, plan = _index_checkpoint(root)
    return {"tensors": len(plan), "parameters": sum(math.prod(e.shape) for e in plan.values()),
            "dtypes": sorted({e.dtype for e in plan.values()}),
            "files": sorted({e.file.name for e in plan.values()})}
