"""The decay-stage dynamics of paper §4.4 (run.dynamics): per training step, from the raw gradient g(t) (before
clipping) and the update v(t) = θ(t+1) − θ(t) the optimizer applied,

  dynamics/grad_cos      cos(g(t), g(t−1))                          consecutive gradients ("mostly positive" in decay)
  dynamics/update_norm   ‖v(t)‖                                      the weight-update norm
  dynamics/d1            D1 = g(t)·v(t−1)/‖v(t−1)‖                   first directional derivative along the update
  dynamics/d2            D2 = (g(t) − g(t−1))·v(t−1)/‖v(t−1)‖²       second directional derivative
  dynamics/curvature     K = |D2| / (1 + D1²)^(3/2)                  the curvature of the loss along the update

(the gradient norm is the loop's own grad_norm). They go to metrics.jsonl with the step's other metrics and
`minicpm report` plots them. Cost: two fp32 copies of the parameters and a few dot products per step. Under FSDP
each process holds its shards, and the partial dot products are summed over the processes.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

METRICS = ("grad_cos", "update_norm", "d1", "d2", "curvature")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded, DTensor) parameter or gradient, flattened in fp32."""
    return getattr(tensor, "to_local", lambda: tensor)().detach().reshape(-1).float()


class DecayDynamics:
    """Tracks g(t−1) and v(t−1) between steps: call gradient() after backward (before clipping), then updated()
    after the optimizer step, or skipped() when the step was not applied."""

    def __init__(self, params: Iterable[torch.nn.Parameter], *, sharded: bool = False):
        self.params = [p for p in params if p.requires_grad]
        self.sharded = sharded and dist.is_available() and dist.is_initialized()
        self._grad: torch.Tensor | None = None  # g(t−1)
        self._update: torch.Tensor | None = None  # v(t−1)
        self._before: torch.Tensor | None = None  # θ(t), until the update is known

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([_local(t) for t in tensors])

    def _sum(self, values: torch.Tensor) -> list[float]:
        values = values.double()
        if self.sharded:
            dist.all_reduce(values)
        return values.tolist()

    @torch.no_grad()
    def gradient(self) -> dict[str, float]:
        """Metrics that need this step's gradient g(t): grad_cos, d1, d2, curvature (once a previous step exists)."""
        grad = self._flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        out: dict[str, float] = {}
        if self._grad is not None:
            prev, v = self._grad, self._update
            products = [grad @ grad, prev @ prev, grad @ prev]
            if v is not None:
                products += [grad @ v, prev @ v, v @ v]
            sums = self._sum(torch.stack(products))
            gg, pp, gp = sums[:3]
            out["dynamics/grad_cos"] = gp / math.sqrt(gg * pp) if gg > 0 and pp > 0 else 0.0
            if v is not None and sums[5] > 0:
                gv, pv, vv = sums[3:]
                d1 = gv / math.sqrt(vv)
                d2 = (gv - pv) / vv
                out.update({"dynamics/d1": d1, "dynamics/d2": d2,
                            "dynamics/curvature": abs(d2) / (1 + d1 * d1) ** 1.5})
        self._grad = grad
        self._before = self._flat(list(self.params))
        return out

    @torch.no_grad()
    def updated(self) -> dict[str, float]:
        """After the optimizer step: v(t) and its norm."""
        self._update = self._flat(list(self.params)) - self._before
        self._before = None
        return {"dynamics/update_norm": math.sqrt(self._sum((self._update @ self._update)[None])[0])}

    def skipped(self) -> None:
        """A step with a NaN/Inf loss or gradient: no update, and the next step has no predecessor to compare."""
        self._grad = self._update = self._before = None
