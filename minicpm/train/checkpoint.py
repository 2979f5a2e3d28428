"""Training checkpoints: written atomically, found again after a crash, loaded without unpickling anything.

RUN/checkpoints/step_00001000/ holds, from one process,
  model.safetensors + config.json   the official MiniCPM HF layout (minicpm.interop.hf.save_model)
  optimizer.pt                      torch.save of the optimizer state_dict (tensors and numbers only)
  trainer_state.json                step, tokens, data sampler state, RNG states, log accumulator
or, from several (FSDP2-sharded) processes,
  config.json + dcp/                torch.distributed.checkpoint: each rank's shards of the model weights (official
                                    key names) and of the optimizer moments, with dcp/.metadata
  trainer_state.json                the same trainer state
and RUN/checkpoints/latest names the newest complete one (the layout is minicpm/rundir.py's). Either format
resumes on any number of processes (load_training_state); minicpm/checkpoints/ finds the newest that verifies
(verify.py) and turns either, or an official HF model directory, into the official layout's full state dict
(weights.py), which a weights-only start loads (load_weights_only).
A checkpoint is written into a hidden temporary directory and renamed into place when complete, so a process killed
mid-save leaves the previous checkpoint as the newest complete one; trainer_state.json is written last and marks a
directory as complete.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from minicpm.checkpoints.integrity import file_digests, sealed_state
from minicpm.checkpoints.safe_dcp import load_dcp
from minicpm.checkpoints.weights import consolidate
from minicpm.errors import MiniCPMError
from minicpm.files import publish_directory, temporary_directory_for, write_atomic
from minicpm.model.config import ModelConfig
from minicpm.model.moe import stacked_state
from minicpm.rundir import MODEL_CONFIG_FILE, OPTIMIZER_FILE, SHARDS_DIR, STATE_FILE, RunDir, is_sharded
from minicpm.train.distributed import fsdp_applied


def _with_manifest(trainer_state: dict[str, Any], directory: Path) -> dict[str, Any]:
    """trainer_state plus `files` (SHA-256 and size of everything written into the checkpoint before it) and the
    digest of the whole (state_sha256), which covers the trainer state itself."""
    return sealed_state({**trainer_state, "files": file_digests(directory, exclude=(STATE_FILE,))})


def save_checkpoint(run: RunDir, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], *, keep_last: int = 0, tokenizer: str | Path | None = None,
                    chat_template=None) -> Path:
    """Write RUN/checkpoints/step_N atomically, point `latest` at it, delete all but the newest keep_last.

    tokenizer: the run's tokenizer.json; it and its companion files are copied in, so that a checkpoint is a
    complete model directory (`minicpm generate CHECKPOINT` finds its tokenizer).
    chat_template: the template of the chat data the run trains on (`minicpm.data.chat.ChatTemplate`); it becomes
    the chat_template of the checkpoint's tokenizer_config.json.
    """
    from minicpm.interop.hf import write_model_files

    final = run.checkpoint_dir(step)
    tmp = temporary_directory_for(final, name=run.temporary_checkpoint_name(step))
    try:
        extra: dict[str, str | Path] = dict(_tokenizer_files(tokenizer)) if tokenizer else {}
        if chat_template is not None:
            from minicpm.data.chat import tokenizer_config_with_template

            extra["tokenizer_config.json"] = tokenizer_config_with_template(tokenizer, chat_template)
        write_model_files(tmp, model, extra_files=extra)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        write_atomic(tmp / STATE_FILE, json.dumps(_with_manifest(trainer_state, tmp), indent=1) + "\n")
    except BaseException:  # e.g. ENOSPC: the half-written checkpoint goes, the previous one stays the newest
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(run, tmp, final, keep_last)
    return final


def _publish(run: RunDir, tmp: Path, final: Path, keep_last: int) -> None:
    """Rename a written checkpoint into place (swapping out the same step saved before, e.g. by a run resumed at
    its last step), point `latest` at it, delete all but the newest keep_last."""
    publish_directory(tmp, final)
    run.set_latest(final)
    run.prune_checkpoints(keep_last)


def _tokenizer_files(tokenizer: str | Path) -> dict[str, Path]:
    from minicpm.interop.hf import tokenizer_files

    path = Path(tokenizer)
    if path.is_dir() or path.name in ("tokenizer.json", "tokenizer.model"):
        return tokenizer_files(path if path.is_dir() else path.parent)
    return {"tokenizer.model" if path.suffix == ".model" else "tokenizer.json": path}


def load_model_weights(checkpoint: str | Path, model: torch.nn.Module) -> None:
    """Copy a checkpoint's weights into `model`; its architecture must equal the model's."""
    from minicpm.interop.hf import official_state, read_checkpoint

    saved_config, state = read_checkpoint(checkpoint)
    _check_architecture(checkpoint, saved_config, model.config)
    with torch.no_grad():
        for name, tensor in official_state(model).items():  # an MoE's experts as views into its stacks
            if name not in state:
                raise MiniCPMError(f"{checkpoint}: model.safetensors lacks {name}")
            tensor.copy_(state[name])


def _read_optimizer_state(path: Path) -> dict[str, Any]:
    """optimizer.pt through torch.load(weights_only=True) (tensors, numbers, strings and containers only: nothing in
    it runs); a missing, truncated or foreign file is one line."""
    import pickle

    if not path.is_file():
        raise MiniCPMError(f"{path}: missing (a training checkpoint holds its optimizer state)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            ImportError, IndexError, UnicodeDecodeError) as e:
        raise MiniCPMError(f"{path}: not a readable optimizer state ({_first_line(e)})") from None
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in state["param_groups"])):
        raise MiniCPMError(f"{path}: not an optimizer state_dict (state and param_groups)")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _check_architecture(checkpoint: str | Path, saved: ModelConfig, ours: ModelConfig) -> None:
    differing = [k for k, v in ours.to_hf_dict().items() if k != "torch_dtype" and saved.to_hf_dict().get(k) != v]
    if differing:
        k = differing[0]
        raise MiniCPMError(f"{checkpoint}: model.{k} is {getattr(saved, k)!r} in the checkpoint but "
                           f"{getattr(ours, k)!r} in the run's config")


def load_optimizer(checkpoint: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer's moments and step counts; the hyper-parameters stay those of the current config."""
    path = Path(checkpoint) / OPTIMIZER_FILE
    state = _read_optimizer_state(path)
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if len(state["param_groups"]) != len(current):
        raise MiniCPMError(f"{path}: {len(state['param_groups'])} parameter groups, the run has {len(current)} "
                           f"(was optim.embedding_in_2d_group changed?)")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise MiniCPMError(f"{path}: does not fit the run's optimizer ({_first_line(e)})") from None
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)


# ------------------------------------------------------------------------------------------ sharded checkpoints

def save_sharded_checkpoint(run: RunDir, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], *, keep_last: int = 0,
                            is_main: bool) -> Path:
    """Every process calls this: each writes its shards of the weights and optimizer moments (DCP) into
    RUN/checkpoints/.tmp-step_N/dcp/, then rank 0 adds config.json and trainer_state.json and renames the directory
    into place, as save_checkpoint does. With several nodes, RUN must be on a filesystem they all share."""
    final = run.checkpoint_dir(step)
    name = run.temporary_checkpoint_name(step)
    tmp = final.parent / name
    if is_main:
        temporary_directory_for(final, name=name)
    dist.barrier()
    dcp.save(_dcp_state(model, optimizer)[0], checkpoint_id=tmp / SHARDS_DIR)
    if is_main:
        weights_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        dataclasses.replace(model.config, torch_dtype=weights_dtype).save(tmp / MODEL_CONFIG_FILE)
        write_atomic(tmp / STATE_FILE, json.dumps(_with_manifest(trainer_state, tmp), indent=1) + "\n")
        _publish(run, tmp, final, keep_last)
    dist.barrier()
    return final


def load_training_state(checkpoint: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights and optimizer moments of a checkpoint of either format into a plain or an FSDP2-sharded model.

    Shards written by N processes reload on any M (DCP reshards; M = 1 reads them without a process group); a
    one-process checkpoint loads whole into one process, or into M processes' shards. As with load_optimizer, the
    optimizer's hyper-parameters stay those of the current config.
    """
    checkpoint = Path(checkpoint)
    if is_sharded(checkpoint):
        _check_architecture(checkpoint, ModelConfig.load(checkpoint / MODEL_CONFIG_FILE), model.config)
        _load_shards(checkpoint, model, optimizer)
    elif fsdp_applied(model):
        _load_whole_into_shards(checkpoint, model, optimizer)
    else:
        load_model_weights(checkpoint, model)
        load_optimizer(checkpoint, optimizer)


def load_weights_only(source: str | Path, model: torch.nn.Module) -> None:
    """A weights-only start: the weights of `source` (one of our checkpoints, a sharded one, or an official HF
    model directory) into a plain or FSDP2-sharded model of the same shapes. Nothing else of the source is read —
    no optimizer state, step or data position."""
    _, state = consolidate(source)
    state = stacked_state(state)  # an MoE's experts as the model holds them
    ours = model.state_dict()
    for name, tensor in ours.items():
        if name not in state:
            raise MiniCPMError(f"{source}: has no tensor {name} (the run's model has it; model.* must describe "
                               f"the source's architecture)")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise MiniCPMError(f"{source}: {name} has shape {tuple(state[name].shape)}, the run's model "
                               f"{tuple(tensor.shape)} (model.* must describe the source's architecture)")
    extra = sorted(set(state) - set(ours))
    if extra:
        raise MiniCPMError(f"{source}: tensor {extra[0]} has no place in the run's model")
    state = {name: state[name].to(ours[name].dtype) for name in ours}
    if fsdp_applied(model):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    with torch.no_grad():
        for name, tensor in ours.items():
            tensor.copy_(state[name])


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what DCP saves and loads, the optimizer's state dict): weights and optimizer moments keyed by official
    parameter names. Only tensors go into the shards, and DCP's own .metadata (a pickle torch writes) is read by the
    allow-list unpickler of checkpoints/safe_dcp.py; the param_groups stay out, as a resumed run keeps the current
    config's."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state["state"]}, optim_state


def _load_shards(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    state, optim_state = _dcp_state(model, optimizer)
    # through the allow-list reader: neither .metadata nor a "bytes" entry is ever unpickled
    load_dcp(state, checkpoint / SHARDS_DIR, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={**optim_state, "state": state["optimizer"]})


def _load_whole_into_shards(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A one-process checkpoint into FSDP2 shards: every rank reads the whole files and keeps its slices."""
    from minicpm.interop.hf import read_checkpoint

    saved_config, weights = read_checkpoint(checkpoint)
    _check_architecture(checkpoint, saved_config, model.config)
    weights = stacked_state(weights)
    path = checkpoint / OPTIMIZER_FILE
    saved = _read_optimizer_state(path)
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise MiniCPMError(f"{path}: {len(saved['param_groups'])} parameter groups, the run has "
                           f"{len(optimizer.param_groups)} (was optim.embedding_in_2d_group changed?)")
    # torch.save numbers parameters in param_groups order; the sharded loader wants their names
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**{k: v for k, v in current.items() if k != "params"}, "params": [order[i] for i in stored["params"]]}
              for current, stored in zip(optimizer.param_groups, saved["param_groups"])]
    optim_state = {"state": {order[i]: moments for i, moments in saved["state"].items()}, "param_groups": groups}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------------------ RNG states as JSON

def _tensor_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _b64_to_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Every RNG a run touches, as JSON (no pickles)."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": _tensor_to_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_to_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_b64_to_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = [_b64_to_tensor(s) for s in state["cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
