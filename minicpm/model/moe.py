"""Mixture of experts (paper section 6, MiniCPM-MoE): a router picks the top-k of E SwiGLU experts per token.

    probs   = softmax(gate(x)) in fp32                    (Mixtral's and MiniCPM-MoE's order: softmax → top-k →
    w, e    = top-k(probs); w /= Σ w                       renormalise, so identical experts give the dense MLP)
    MoE(x)  = Σ_k w_k · expert_{e_k}(x)

Dropless dispatch: the (token, choice) pairs are sorted by expert so that each expert runs its tokens as one matmul
(one grouped matmul for all experts where torch's `F.grouped_mm` serves the device and dtype: CUDA bf16, CPU
fp32; otherwise a loop over the experts).

Parameter names are the official MiniCPM-MoE keys: `mlp.gate.weight` (E×d, no bias) and
`mlp.experts.{e}.w1/w3/w2.weight` (gate, up, down), so a state_dict is the official layout.

What the layer reports through the model's auxiliary channel (`aux_losses`, see transformer.MiniCPM):
  load_balance        E·Σ_e f_e·P_e with f_e the fraction of the top-k assignments and P_e the mean router
                      probability of expert e, both pooled over all the MoE layers before the product (transformers'
                      `load_balancing_loss_func` for Mixtral); uniform routing gives k. Each layer leaves its own
                      routing counts under a scratch key; the model pools them after its last layer
                      (`pool_router_losses`), outside any activation-checkpointed block. Over whose tokens f is
                      counted: the forward's own (a bare forward, Mixtral's) or the whole optimizer step's
                      (`StepBalance`, set by the train module: the same loss for any accumulation and process count).
  router_z            (with config.router_z_loss) ST-MoE's mean over tokens of logsumexp(logits)², averaged over layers.
  stat/moe/...        detached statistics, logged as metrics and never added to the loss: per layer the load of each
                      expert (fraction of assignments), its max and min, and the router entropy (nats, token mean)
                      (moe/layer{i}/...); over all layers the largest and smallest load and the mean entropy
                      (moe/load_max, moe/load_min, moe/router_entropy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minicpm.model.config import ModelConfig
from minicpm.model.param_roles import HIDDEN, ROUTER


class Expert(nn.Module):
    """SwiGLU under MiniCPM-MoE's names: w2(silu(w1 x) · w3 x)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def mup_roles(self) -> dict[str, str]:
        return {f"{name}.weight": HIDDEN for name in ("w1", "w2", "w3")}


def grouped_mm_dtype(rows: torch.Tensor, intermediate_size: int) -> torch.dtype | None:
    """The dtype one grouped matmul over all experts runs in, or None for the loop over experts.

    torch's F.grouped_mm: on CUDA in bf16 (also under bf16 autocast); on CPU in fp32, where its kernel needs rows of
    whole 16-byte multiples (hidden and intermediate sizes multiples of 4)."""
    if not hasattr(F, "grouped_mm"):
        return None
    if rows.is_cuda:
        if rows.dtype == torch.bfloat16:
            return rows.dtype
        autocast_bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        return torch.bfloat16 if autocast_bf16 else None
    aligned = rows.shape[-1] % 4 == 0 and intermediate_size % 4 == 0
    cpu_fp32 = rows.device.type == "cpu" and rows.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    return torch.float32 if aligned and cpu_fp32 else None


class MoE(nn.Module):
    """Top-k routed SwiGLU experts in place of the MLP of one decoder layer."""

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        d, self.num_experts, self.top_k = config.hidden_size, config.num_experts, config.num_experts_per_tok
        self.gate = nn.Linear(d, self.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, config.intermediate_size) for _ in range(self.num_experts))
        self.layer_index = layer_index
        self.router_z_loss, self.jitter = config.router_z_loss, config.router_jitter_noise
        self.intermediate_size = config.intermediate_size
        self.grouped_mm = True
        """Use one grouped matmul where torch has one for the device and dtype (False: always the loop)."""

    def mup_roles(self) -> dict[str, str]:
        return {"gate.weight": ROUTER}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, fp32 probabilities, renormalised top-k weights in fp32, top-k expert ids) for tokens (T, d)."""
        if self.training and self.jitter:
            # Switch Transformer's multiplicative jitter on the router's input only
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return logits, probs, weights / weights.sum(dim=-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor, aux_losses: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs, weights, chosen = self.route(x)
        out = self._dispatch(x, weights, chosen)
        if aux_losses is not None:
            self._report(aux_losses, logits, probs, chosen)
        return out.view(shape)

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        # sort the T·k (token, choice) pairs by expert: each expert's rows are contiguous
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        token = order // self.top_k
        rows = self._experts(x[token], counts)
        rows = (rows.float() * weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, rows)

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = grouped_mm_dtype(rows, self.intermediate_size) if self.grouped_mm else None
        if dtype is not None:
            return self._grouped(rows.to(dtype), counts)
        # an expert with no tokens still runs (on zero rows), so every expert gets a gradient, zero or not
        return torch.cat([expert(part) for expert, part in zip(self.experts, rows.split(counts.tolist()))])

    def _grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        # grouped_mm computes rows @ W_e per group, W_e (in, out); w1 and w3 side by side: one matmul for both
        # (one copy: stacking w1_0, w3_0, w1_1, ... and viewing pairs as (E, 2I, d), not a cat then a stack)
        gate_up = torch.stack([w for e in self.experts for w in (e.w1.weight, e.w3.weight)]).to(rows.dtype)
        gate_up = gate_up.view(self.num_experts, 2 * self.intermediate_size, -1)
        down = torch.stack([e.w2.weight for e in self.experts]).to(rows.dtype)
        gate, up = F.grouped_mm(rows, gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offsets)

    def _report(self, aux: dict, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        # only this layer's own numbers: under activation checkpointing the block's forward runs again in the
        # backward pass, so nothing here may depend on what other layers have put into `aux` (the pooling over
        # layers happens after them, in pool_router_losses)
        assigned = torch.zeros(self.num_experts, dtype=torch.float32, device=probs.device)
        assigned.scatter_add_(0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device))
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean() if self.router_z_loss else None
        with torch.no_grad():
            load = assigned / chosen.numel()
            entropy = torch.special.entr(probs).sum(dim=-1).mean()
            prefix = f"stat/moe/layer{self.layer_index}"
            for e in range(self.num_experts):
                aux[f"{prefix}/load_expert{e}"] = load[e]
            aux[f"{prefix}/load_max"], aux[f"{prefix}/load_min"] = load.max(), load.min()
            aux[f"{prefix}/router_entropy"] = entropy
        aux.setdefault(ROUTING_SCRATCH, []).append(_Routing(assigned, probs.sum(dim=0), probs.shape[0], z, entropy))


ROUTING_SCRATCH = "_moe/routing"


@dataclass
class _Routing:
    """One layer's routing in one forward: top-k assignments per expert (no gradient), summed router probabilities
    per expert, the token count, and the mean squared logsumexp of its logits (with router_z_loss)."""
    assigned: torch.Tensor
    prob_sums: torch.Tensor
    tokens: int
    z: torch.Tensor | None
    entropy: torch.Tensor


class StepBalance:
    """f_e of the balance loss counted over the whole optimizer step: all its micro-batches on all processes.

    Why: E·Σ f_e·P_e is not a mean over tokens (f and P are each one), so a loss computed per micro-batch changes with
    the micro-batch size, and balancing each small micro-batch is a stricter, different constraint than balancing
    the batch (Qiu et al. 2025, "Demons in the Detail: On Implementing Load Balancing Loss for Training Specialized
    Mixture-of-Expert Models": global-batch balancing, f synchronised over the data-parallel group). f has no
    gradient (top-k counts), so given the step's f the loss is E·Σ_e f_e·(Σ_t p_te)/R, a sum over tokens that
    accumulates exactly across micro-batches and processes like the cross-entropy; only f must be known before the
    first backward. The train module gets it exactly:
      one micro-batch per process   this forward's counts, summed over the processes inside the forward (one
                                    all-reduce of E+1 numbers: Qiu et al.'s synchronisation);
      several micro-batches         a no-grad pre-pass of the step's micro-batches counts the routing (`counting`),
                                    summed over processes once; the forwards with gradients then use that f. The
                                    pre-pass costs one extra forward per step, paid only when accumulating.
    Each micro-batch reports E·Σ f_e·P_e^mb with P^mb its own mean probability; the objective weights it by the
    micro-batch's targets, so the step's loss is the global E·Σ f_e·P_e exactly when targets are in proportion to
    tokens (pretraining: every token is a target)."""

    def __init__(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.all_reduce = all_reduce
        """Sums a tensor over the data-parallel processes in place (None: one process)."""
        self.counting = False
        self.counts: torch.Tensor | None = None
        """The step's (E + 1,) counts from the pre-pass: top-k assignments per expert, then router rows."""

    def finish_counting(self) -> None:
        """After the pre-pass: the step's counts summed over the processes."""
        self.counting = False
        if self.counts is not None and self.all_reduce is not None:
            self.all_reduce(self.counts)

    def fraction(self, assigned: torch.Tensor, rows: int) -> torch.Tensor:
        """f_e of the step, given this forward's own top-k assignments and router rows (pooled over its layers)."""
        own = torch.cat([assigned.detach().float(), assigned.new_tensor([float(rows)])])
        if self.counting:  # the pre-pass: add this forward's routing to the step's
            self.counts = own if self.counts is None else self.counts + own
            return own[:-1] / own[-1]
        if self.counts is None:  # no pre-pass: this forward is the process's whole step
            if self.all_reduce is not None:
                self.all_reduce(own)
            return own[:-1] / own[-1]
        return self.counts[:-1] / self.counts[-1]


def pool_router_losses(aux: dict, step: StepBalance | None = None) -> None:
    """After the layers of a forward: turn their routing into the aux losses (added to any already there).

    load_balance = E·Σ_e f_e·P_e with f and P pooled over every layer's tokens before the product, as transformers'
    `load_balancing_loss_func` for Mixtral computes it, f over this forward's tokens or, with `step`, over the
    whole optimizer step's (StepBalance); router_z = the mean over layers of each layer's z-loss.
    Also the statistics over all layers: the largest and smallest expert load of any layer, the mean entropy."""
    routing: list[_Routing] = aux.pop(ROUTING_SCRATCH, [])
    if not routing:
        return
    rows = sum(r.tokens for r in routing)
    assigned = torch.stack([r.assigned for r in routing]).sum(dim=0)
    fraction = assigned / rows if step is None else step.fraction(assigned, rows)
    mean_prob = torch.stack([r.prob_sums for r in routing]).sum(dim=0) / rows
    aux["load_balance"] = aux.get("load_balance", 0.0) + len(fraction) * (fraction * mean_prob).sum()
    with torch.no_grad():
        loads = torch.stack([r.assigned / r.assigned.sum() for r in routing])
        aux["stat/moe/load_max"], aux["stat/moe/load_min"] = loads.max(), loads.min()
        aux["stat/moe/router_entropy"] = torch.stack([r.entropy for r in routing]).mean()
    z = [r.z for r in routing if r.z is not None]
    if z:
        aux["router_z"] = aux.get("router_z", 0.0) + torch.stack(z).mean()
