"""Process-group set-up from torchrun's environment. Parallelism is applied to the model from here, outside it."""

from __future__ import annotations

import atexit
import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from minicpm.errors import MiniCPMError
from minicpm.model.compiling import CompileChoice, CompileCosts, can_compile, choose_compile


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); a plain run is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
        if dev.type != "cuda":
            atexit.unregister(_let_gloo_threads_finish)  # once per process, however often it joins a group
            atexit.register(_let_gloo_threads_finish)
    return DistInfo(rank, world_size, local_rank, dev)


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: on CUDA, and on CPUs where oneDNN has bf16 kernels (AVX-512, AMX). On an
    AVX2-only CPU they are emulated, about 60x slower than fp32 (a 1024^3 matmul: 7.6 s against 0.11 s)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


AUTO_DTYPE_ENV = "MINICPM_AUTO_DTYPE"
"""bf16 | fp32: what `auto` resolves to on every device, e.g. to run the test suite on an AVX2 CPU as it runs where
bf16 is native (`MINICPM_AUTO_DTYPE=bf16 python -m pytest -m auto_dtype`); unset: by the device."""


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """run.dtype for this device: `auto` becomes bf16 where bf16 is fast, else fp32 (or what MINICPM_AUTO_DTYPE
    says); bf16 and fp32 stay."""
    if dtype != "auto":
        return dtype
    forced = os.environ.get(AUTO_DTYPE_ENV, "")
    if forced:
        if forced not in ("bf16", "fp32"):
            raise MiniCPMError(f"{AUTO_DTYPE_ENV}={forced!r}: expected bf16 or fp32 (or unset: by the device)")
        return forced
    return "bf16" if has_fast_bf16(device) else "fp32"


GLOO_EXIT_GRACE_S = 0.25


def _let_gloo_threads_finish() -> None:
    """A gloo worker thread drops each finished collective after the caller's wait() has returned, and dropping one
    that holds tensors with Python objects (a barrier keeps the collectives before it) takes the GIL. If that thread
    is still waiting for the GIL when the interpreter starts finalizing, it is made to exit inside a C++ destructor
    and the whole process aborts ("terminate called without an active exception", SIGABRT) after a run that
    succeeded. Exit handlers run before finalization; sleeping here hands the GIL to such a thread."""
    time.sleep(GLOO_EXIT_GRACE_S)


# ---------------------------------------------------------------- activation checkpointing

ACTIVATION_CHECKPOINTING = ("none", "block", "selective")

# Selective mode saves what is expensive to recompute (matmuls, an MoE's grouped matmuls, attention) and recomputes
# the cheap pointwise ops between them (RMSNorm, SiLU·up, RoPE, the residual scaling, GQA repeats), whose outputs
# are most of a block's saved activations by count.
_SAVED_OPS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_grouped_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(torch.ops.aten, name))


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _save_matmuls_policy)


def _block_checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _selective_checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_SELECTIVE_CONTEXT, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Recompute decoder-block activations in the backward pass instead of keeping them.

    none: keep everything. block: keep only each block's input, recompute the whole block. selective: keep the
    outputs of matmuls and attention, recompute the pointwise ops. The block's `forward` is replaced on the
    instance, so parameter names and state_dict keys stay the official ones, and FSDP's hooks (which run in
    `__call__`, outside `forward`) unshard the parameters before any recomputation.
    """
    if mode not in ACTIVATION_CHECKPOINTING:
        raise MiniCPMError(f"parallel.activation_checkpointing: {mode!r} is not one of "
                           f"{', '.join(ACTIVATION_CHECKPOINTING)}")
    if mode == "none":
        return model
    wrapper = _selective_checkpointed if mode == "selective" else _block_checkpointed
    for layer in _decoder_layers(model):
        if "forward" in vars(layer):
            raise ValueError("activation checkpointing is already applied to this model")
        layer.forward = functools.partial(wrapper, layer.forward)
    return model


# ---------------------------------------------------------------- torch.compile, where it pays

def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each decoder block in place (nn.Module.compile keeps the parameter names).

    Blocks are identical, so one compiled graph serves all of them; the embedding and the chunked loss stay eager.
    """
    for layer in _decoder_layers(model):
        layer.compile()
    return model


COMPILE_COSTS = {
    # measured on a 2-core AVX-512-BF16 CPU, shared, with benchmarks/train_step.py (quickstart shapes, bf16
    # autocast, benchmarks/README.md): first step 59.7 s cold and 12.2 s from a warm cache against ~3.5 s eager;
    # 1.125 -> 0.862 CPU-s per step; eager MFU 32% of the measured matmul peak
    "cpu": CompileCosts(compile_seconds=50.0, cached_compile_seconds=9.0, speedup=1.3, eager_mfu=0.3),
    # not measured here (no GPU in the session that wrote this): torch.compile of Llama blocks as torchtitan
    # reports it; benchmarks/gpu_throughput.py prints the measured figures on a GPU
    "cuda": CompileCosts(compile_seconds=60.0, cached_compile_seconds=15.0, speedup=1.3, eager_mfu=0.35),
}


def compile_choice(setting: bool | str, *, step_flops: float, steps: int, device: torch.device, dtype: torch.dtype,
                   cache_dir: str | os.PathLike | None = None) -> CompileChoice:
    """choose_compile on this device: the eager step time estimated from its FLOPs, the device's peak
    (train/metrics.py) and COMPILE_COSTS; cache_dir is where a compiled run keeps its graphs (found on a resume)."""
    costs = COMPILE_COSTS.get(device.type) if can_compile() else None
    if device.type == "cpu" and dtype != torch.bfloat16:
        # measured only in bf16 autocast; in fp32 the quickstart's compiled steps ran ~4x slower than eager (2-core
        # AVX-512 CPU, shared), so auto stays eager there
        costs = None
    step_seconds = 0.0
    if setting == "auto" and costs is not None:
        from minicpm.train.metrics import device_peak_flops

        step_seconds = step_flops / (device_peak_flops(device, dtype) * costs.eager_mfu)
    cached = cache_dir is not None and os.path.isdir(cache_dir) and any(os.scandir(cache_dir))
    return choose_compile(setting, steps=steps, step_seconds=step_seconds, costs=costs, cached=cached)


def steps_to_train(cfg) -> int:
    """The steps left from where this start begins: the run's latest checkpoint (a resume), else the checkpoint it
    branches from (run.init_from), else step 0."""
    from minicpm.rundir import RunDir, checkpoint_step

    latest = RunDir(cfg.run.out_dir).latest_checkpoint()
    source = latest if latest is not None else cfg.run.init_from
    start = (checkpoint_step(source) or 0) if source else 0
    return max(cfg.schedule.total_steps - start, 0)


def run_compile_choice(cfg, model_config, dist_info: DistInfo) -> CompileChoice:
    """compile_choice for a training run (a TrainConfig with run.dtype resolved): one process's share of each step's
    tokens, the steps this start will train (a resume or a branch has only the rest of schedule.total_steps left:
    a decay of 24 steps branched at step 240 does not earn a compile back), the cache in RUN/compile_cache (kept
    there when the run compiles)."""
    cache = os.path.join(cfg.run.out_dir, "compile_cache")
    tokens = cfg.batch.tokens_per_step / dist_info.world_size
    choice = compile_choice(cfg.parallel.compile, step_flops=model_config.flops_per_token(cfg.batch.seq_len) * tokens,
                            steps=steps_to_train(cfg), device=dist_info.device,
                            dtype=torch.bfloat16 if cfg.run.dtype == "bf16" else torch.float32, cache_dir=cache)
    if choice.compile:
        keep_compile_cache(cache)
    return choice


_USER_COMPILE_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def keep_compile_cache(directory: str | os.PathLike) -> None:
    """Inductor's on-disk cache (FX graphs, AOTAutograd, kernels) in `directory` (the run's), so that a resumed
    run reuses the compiled graphs instead of compiling again; a TORCHINDUCTOR_CACHE_DIR set by the user wins."""
    if _USER_COMPILE_CACHE is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(directory)


# ---------------------------------------------------------------- FSDP2

def apply_fsdp(model: nn.Module, dist_info: DistInfo, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard the model with FSDP2: each decoder block is one all-gather unit, the root holds the rest.

    param_dtype is the dtype of the gathered parameters used in compute (bf16 on GPU); the sharded parameters the
    optimizer steps stay in their own dtype (fp32), so no separate master copy is needed. reduce_dtype is the
    gradient reduce-scatter dtype (fp32). The model must already sit on dist_info.device with identical weights
    on every rank (same seed), since each rank keeps its own slice of its own copy.

    Gradients are summed across ranks, not averaged: each rank must divide its loss by the token count of the
    whole global batch (which every rank knows, as each draws the global batch), so that the gradient equals a
    one-process run's even when ranks hold different numbers of loss tokens.
    """
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method = _fsdp_api()
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root keeps its parameters gathered after the forward: the loss reads the (tied) head weight after
    # hidden_states() has returned. It is resharded after the backward.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, _fsdp_module_class()):
            _sum_gradients(module)
    # The trainer calls hidden_states(), not forward(): give it FSDP's pre/post-forward hooks too.
    register_fsdp_forward_method(model, "hidden_states")
    return model


def _sum_gradients(module: nn.Module) -> None:
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
    else:  # torch < 2.8
        module.set_reduce_scatter_divide_factor(1.0)
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        # a plain SUM collective: gloo has no PREMUL_SUM, and NCCL's zero-copy paths want SUM too
        module.set_force_sum_reduction_for_comms(True)


def fsdp_applied(model: nn.Module) -> bool:
    """True when FSDP2 has been applied to the model."""
    fsdp_module = _fsdp_module_class()
    return fsdp_module is not None and isinstance(model, fsdp_module)


def _fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import (MixedPrecisionPolicy, fully_shard,
                                                        register_fsdp_forward_method)
    return fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the gradients' global L2 norm to max_norm and return the norm before clipping.

    Under FSDP2 the gradients are shards (DTensors), so the norm torch computes is itself a DTensor holding partial
    sums on each rank: full_tensor() reduces it to the norm of the whole model, the same number on every rank.
    """
    grads = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.item()


# ---------------------------------------------------------------- optimizer kernels

def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch.optim.AdamW(fused=True) has a kernel for this device type (CUDA; CPU since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()
