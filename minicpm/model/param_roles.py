"""The μP role of every parameter, declared by the module that owns it (DESIGN §3).

A module lists its parameters' roles in a `mup_roles()` method ({local parameter name: role}); the initialisation
(model/build.py) and the optimizer's groups (optim/mup.py) read the roles from `parameter_roles(model)` instead of
guessing from names and shapes. With the width multiplier m = hidden_size / dim_model_base:

  role        init                                   learning rate   weight decay
  hidden      N(0, (initializer_range/√m)²)          lr/m            yes   (2-D weights inside the blocks)
  vocabulary  N(0, initializer_range²)               lr              yes   (embedding, untied head; classic μP)
  gain        1                                      lr              no    (RMSNorm gains)
  router      N(0, 0.1²), whatever the width         lr/m            yes   (MoE router, MiniCPM-MoE's init)

The router's learning rate follows μP for Adam (lr ∝ 1/fan-in, as every matrix reading the residual stream); its
init is MiniCPM-MoE's fixed std 0.1.
"""

from __future__ import annotations

from torch import nn

from minicpm.errors import MiniCPMError

HIDDEN, VOCABULARY, GAIN, ROUTER = "hidden", "vocabulary", "gain", "router"
ROLES = (HIDDEN, VOCABULARY, GAIN, ROUTER)
ROUTER_INIT_STD = 0.1
"""MiniCPM-MoE's router init std (paper section 6)."""


def parameter_roles(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, role) for every parameter of `model`, in `named_parameters` order. Works on a wrapped model
    (torch.compile, FSDP2, activation checkpointing): the roles are looked up by parameter identity."""
    declared: dict[int, str] = {}
    for module in model.modules():
        roles = getattr(module, "mup_roles", None)
        if roles is None:
            continue
        for local, role in roles().items():
            if role not in ROLES:
                raise MiniCPMError(f"{type(module).__name__}.mup_roles: {local} has role {role!r}, not one of "
                                   f"{', '.join(ROLES)}")
            declared[id(module.get_parameter(local))] = role
    out = []
    for name, param in model.named_parameters():
        if id(param) not in declared:
            raise MiniCPMError(f"parameter {name} has no μP role: the module that owns it must list it in its "
                               f"mup_roles() (one of {', '.join(ROLES)})")
        out.append((name, param, declared[id(param)]))
    return out
