"""Export of an MoE model to a Mixtral checkpoint that transformers' MixtralForCausalLM loads with no custom code,
the μP multipliers folded into the weights as for the dense Llama export (interop/llama.py).

MiniCPM-MoE and Mixtral route the same way (fp32 softmax → top-k → renormalise, no router bias) and their experts
are the same SwiGLU under the same names (w1 gate, w3 up, w2 down), so the export is a renaming (`mlp.` →
`block_sparse_moe.`, the Mixtral hub layout) plus the fold: embed × scale_emb, head = embed ÷ (d/dim_model_base)
(untied), o_proj and every expert's w2 × scale_depth/√L. The router reads the normed residual stream, which the fold
leaves as it was, so routing is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from minicpm.errors import MiniCPMError
from minicpm.interop.hf import PathLike, parse_dtype, write_dir
from minicpm.interop.llama import export_source, llama_config
from minicpm.model.config import ModelConfig
from minicpm.model.transformer import MiniCPM


def fold_mup_moe(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral hub-layout weights (fp32) that compute exactly what the MiniCPM-MoE does."""
    folded = {k: v.detach().float() for k, v in state.items()}
    embed = folded["model.embed_tokens.weight"]
    head = embed if config.tie_word_embeddings else folded["lm_head.weight"]
    folded["lm_head.weight"] = head / config.width_multiplier
    folded["model.embed_tokens.weight"] = embed * config.scale_emb
    out = {}
    for key, tensor in folded.items():
        if key.endswith(("self_attn.o_proj.weight", ".w2.weight")):
            tensor = tensor * config.residual_scale
        out[key.replace(".mlp.", ".block_sparse_moe.")] = tensor
    return out


def mixtral_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for transformers' MixtralForCausalLM (the Llama fields plus the experts')."""
    hf = llama_config(config, dtype)
    for key in ("mlp_bias", "attention_bias"):
        hf.pop(key)
    hf.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=config.num_experts,
              num_experts_per_tok=config.num_experts_per_tok, router_jitter_noise=config.router_jitter_noise,
              router_aux_loss_coef=0.01, output_router_logits=False, sliding_window=None)
    return hf


def export_mixtral(model_or_path: MiniCPM | PathLike, out_dir: PathLike, dtype: str | torch.dtype | None = None, *,
                   max_shard_bytes: int | None = None) -> Path:
    """A Mixtral checkpoint (μP folded in) of an MoE model or checkpoint directory."""
    config, state, extra, stored = export_source(model_or_path)
    if not config.num_experts:
        raise MiniCPMError("the model is dense (num_experts 0): export it --to llama, not --to mixtral")
    dtype = parse_dtype(dtype) or stored
    return write_dir(Path(out_dir), mixtral_config(config, dtype), fold_mup_moe(config, state), dtype,
                     max_shard_bytes, extra)
