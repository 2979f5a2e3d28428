"""Building a model: on the meta device, materialised once, with MiniCPM's μP initialisation (paper Table 7,
DESIGN §3).

With the width multiplier m = hidden_size / dim_model_base:
  2-D hidden weights   N(0, (initializer_range/√m)²)
  1-D weights          (RMSNorm gains) 1
  MoE router           N(0, 0.1²) at every width (MiniCPM-MoE)
  vocabulary matrices  (the embedding, and the head when untied) N(0, initializer_range²): classic μP, where they
                       are "vector-like". `embedding_in_2d_group=True` gives them the 2-D init instead: the literal
                       reading of Table 7 ("each 2-D tensor"), which the coordinate check shows is not width-stable
                       (the embedding output shrinks like 1/√m, tests/test_mup.py); MiniCPM's own init code builds the
                       embedding with the plain initializer_range.
Each module declares its parameters' roles (model/param_roles.py); the learning rates that go with them are in
minicpm/optim/mup.py.
"""

from __future__ import annotations

import math

import torch

from minicpm.model.config import ModelConfig
from minicpm.model.param_roles import GAIN, HIDDEN, ROUTER, ROUTER_INIT_STD, parameter_roles
from minicpm.model.transformer import MiniCPM


def init_std(role: str, config: ModelConfig, embedding_in_2d_group: bool = False) -> float | None:
    """The init std of a parameter of this μP role (model/param_roles.py); None: the gains, filled with 1."""
    if role == GAIN:
        return None
    if role == ROUTER:
        return ROUTER_INIT_STD
    if role == HIDDEN or embedding_in_2d_group:
        return config.initializer_range / math.sqrt(config.width_multiplier)
    return config.initializer_range


@torch.no_grad()
def init_weights(model: MiniCPM, *, embedding_in_2d_group: bool = False,
                 generator: torch.Generator | None = None) -> MiniCPM:
    """μP initialisation in place (also right after `to_empty`, whose memory holds garbage), by the role each module
    declares for its parameters, drawn in parameter order. Returns the model."""
    for _, p, role in parameter_roles(model):
        std = init_std(role, model.config, embedding_in_2d_group)
        if std is None:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=generator)
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
