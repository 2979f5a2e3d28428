"""Export to a plain Llama checkpoint that transformers' LlamaForCausalLM loads with no custom code, the μP
multipliers folded into the weights (DESIGN §3, last bullet)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from minicpm.errors import MiniCPMError
from minicpm.interop.hf import (PathLike, dtype_name, model_dtype, official_state, parse_dtype, read_checkpoint,
                                tokenizer_files, write_dir)
from minicpm.model.config import ModelConfig
from minicpm.model.rope import transformers_rope
from minicpm.model.transformer import MiniCPM


def fold_mup(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a plain Llama that computes exactly what the MiniCPM does (DESIGN §3, last bullet).

    embed × scale_emb; lm_head = the original head ÷ (d/dim_model_base), so the head is untied; o_proj and
    down_proj × scale_depth/√L (RMSNorm sees the residual stream only after the branch outputs are added).
    Arithmetic in fp32; tensors come back in fp32.
    """
    folded = {k: v.detach().float() for k, v in state.items()}
    embed = folded["model.embed_tokens.weight"]
    head = embed if config.tie_word_embeddings else folded["lm_head.weight"]
    folded["lm_head.weight"] = head / config.width_multiplier
    folded["model.embed_tokens.weight"] = embed * config.scale_emb
    for i in range(config.num_hidden_layers):
        for key in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            folded[key] = folded[key] * config.residual_scale
    return folded


def llama_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for transformers' LlamaForCausalLM (loads with transformers 4.x and 5.x)."""
    theta, scaling = transformers_rope(config)  # every type transformers' Llama computes, defaults written out
    if scaling:
        scaling["type"] = scaling["rope_type"]  # the transformers 4.x key
    rope_parameters = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
    rope_parameters.pop("type", None)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": rope_parameters, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": config.initializer_range,
        "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, "torch_dtype": dtype_name(dtype),
    }


def export_source(model_or_path: MiniCPM | PathLike) -> tuple[ModelConfig, Mapping[str, torch.Tensor], dict, torch.dtype]:
    """(config, state dict, tokenizer files to carry, stored dtype) of a model in memory or a checkpoint directory:
    what a folded export (Llama, Mixtral) starts from."""
    if isinstance(model_or_path, MiniCPM):
        return model_or_path.config, official_state(model_or_path), {}, model_dtype(model_or_path)
    config, state = read_checkpoint(model_or_path)
    return config, state, tokenizer_files(model_or_path), parse_dtype(config.torch_dtype)


def export_llama(model_or_path: MiniCPM | PathLike, out_dir: PathLike, dtype: str | torch.dtype | None = None, *,
                 max_shard_bytes: int | None = None) -> Path:
    """A plain Llama checkpoint (μP folded in) that LlamaForCausalLM loads with no custom code."""
    config, state, extra, stored = export_source(model_or_path)
    if config.num_experts:
        raise MiniCPMError(f"model has {config.num_experts} experts: a MoE model does not export as a plain Llama")
    dtype = parse_dtype(dtype) or stored
    return write_dir(Path(out_dir), llama_config(config, dtype), fold_mup(config, state), dtype, max_shard_bytes,
                      extra)
