"""Building a model: on the meta device, materialised once, with MiniCPM's μP initialisation (paper Table 7,
DESIGN §3).

With the width multiplier m = hidden_size / dim_model_base:
  2-D hidden weights   N(0, (initializer_range/√m)²)
  1-D weights          (RMSNorm gains) 1
  vocabulary matrices  (the embedding, and the head when untied) N(0, initializer_range²): classic μP, where they
                       are "vector-like". `embedding_in_2d_group=True` gives them the 2-D init instead: the literal
                       reading of Table 7 ("each 2-D tensor"), which the coordinate check shows is not width-stable
                       (the embedding output shrinks like 1/√m, tests/test_mup.py); MiniCPM's own init code builds the
                       embedding with the plain initializer_range.
The learning rates that go with this are in minicpm/optim/mup.py.
"""

from __future__ import annotations

import math

import torch

from minicpm.model.config import ModelConfig
from minicpm.model.transformer import MiniCPM

VOCAB_MATRICES = ("model.embed_tokens.weight", "lm_head.weight")


def is_hidden_matrix(name: str, embedding_in_2d_group: bool = False) -> bool:
    """Whether a 2-D parameter is scaled with the width (init/√m, lr/m) rather than kept at the base."""
    # endswith: a wrapped model (torch.compile, FSDP) prefixes the names
    return embedding_in_2d_group or not name.endswith(VOCAB_MATRICES)


@torch.no_grad()
def init_weights(model: MiniCPM, *, embedding_in_2d_group: bool = False,
                 generator: torch.Generator | None = None) -> MiniCPM:
    """μP initialisation in place (also right after `to_empty`, whose memory holds garbage). Returns the model."""
    cfg = model.config
    hidden_std = cfg.initializer_range / math.sqrt(cfg.width_multiplier)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            std = hidden_std if is_hidden_matrix(name, embedding_in_2d_group) else cfg.initializer_range
            p.normal_(0.0, std, generator=generator)
        else:
            p.fill_(1.0)
    return model


def build_model(config: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                seed: int = 0, embedding_in_2d_group: bool = False) -> MiniCPM:
    """A μP-initialised model, built on the meta device and materialised once (no second copy of the weights)."""
    with torch.device("meta"):
        model = MiniCPM(config)
    if dtype is not None:
        model.to(dtype=dtype)  # still on meta: free
    model.to_empty(device=device)
    generator = None if torch.device(device).type == "meta" else torch.Generator(device=device).manual_seed(seed)
    return init_weights(model, embedding_in_2d_group=embedding_in_2d_group, generator=generator)
