"""Mixture of experts (paper section 6, MiniCPM-MoE): a router picks the top-k of E SwiGLU experts per token.

    probs   = softmax(gate(x)) in fp32                    (Mixtral's and MiniCPM-MoE's order: softmax → top-k →
    w, e    = top-k(probs); w /= Σ w                       renormalise, so identical experts give the dense MLP)
    MoE(x)  = Σ_k w_k · expert_{e_k}(x)

Dropless dispatch: the (token, choice) pairs are sorted by expert once, so that each expert's rows are contiguous;
the experts' weights are stored stacked (`Experts`: gate and up of all experts in one (E, 2I, d) tensor, down in one
(E, d, I)), and two grouped matmuls run every expert, gate and up as one, down as the other (torch's `F.grouped_mm`
where it serves the device and dtype: CUDA bf16, CPU with 16-byte rows; elsewhere the same two matmuls expert by
expert). The routing weights and the combine (one index_add_) follow in fp32.

Checkpoints keep the official MiniCPM-MoE keys, `mlp.gate.weight` (E×d, no bias) and `mlp.experts.{e}.w1/w3/w2.weight`
(gate, up, down): the model's own state_dict holds the stacks (`mlp.experts.gate_up`, `mlp.experts.down`), and the
edges that read and write checkpoints map between the two (`per_expert_state`, `stacked_state`).

What the layer reports through the model's auxiliary channel (`aux_losses`, see transformer.MiniCPM):
  load_balance        Switch's loss (Fedus et al. 2021) per layer, summed over the layers (`balance_loss`,
                      form "per_layer", the default): Σ_l E·Σ_e f_le·P_le with f_le the fraction of layer l's top-k
                      assignments to expert e and P_le its mean router probability; uniform routing gives k per
                      layer. Form "pooled" pools f and P over all layers before the product (transformers'
                      `load_balancing_loss_func` for Mixtral), so that imbalances of different layers cancel and
                      each router gets ~1/L of the gradient. (MiniCPM-MoE, paper §6: "the load balancing loss" of
                      Fedus et al. x 0.01; the paper does not say whether it pools over layers.) Each layer leaves its
                      own routing counts under a scratch key; the model turns them into the loss after its last layer
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

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from minicpm.errors import MiniCPMError
from minicpm.model.config import ModelConfig
from minicpm.model.param_roles import HIDDEN, ROUTER


class Experts(nn.Module):
    """The E SwiGLU experts of one MoE layer, stored stacked so that all of them run as two grouped matmuls:

        gate_up  (E, 2I, d)   expert e's gate projection w1 (rows :I) over its up projection w3 (rows I:)
        down     (E, d, I)    expert e's down projection w2
        expert_e(x) = w2 (silu(w1 x) · w3 x)

    The official checkpoint keys `mlp.experts.{e}.w1/w3/w2.weight` are views into these two tensors
    (`per_expert_state`); `stacked_state` builds them back from the official layout."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.grouped_mm = True
        """Use one grouped matmul where torch has one for the device and dtype (False: always the loop)."""
        if not self.gate_up.is_meta:  # build_model re-initialises by μP role; skipped on meta, where it is slow
            self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default for each expert's matrices: U(±1/√fan_in)
        with torch.no_grad():
            for weight in (self.gate_up, self.down):
                bound = 1.0 / math.sqrt(weight.shape[-1])
                weight.uniform_(-bound, bound)

    def mup_roles(self) -> dict[str, str]:
        return {"gate_up": HIDDEN, "down": HIDDEN}

    def compute_dtype(self) -> torch.dtype:
        """The dtype the experts' matmuls run in: the autocast dtype when autocast is on (grouped_mm is not an
        autocast op, so the cast is made here), else the weights'."""
        device = self.gate_up.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.gate_up.dtype

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert applied to its rows: `rows` (R, d) sorted by expert, counts[e] of them expert e's."""
        dtype = rows.dtype
        gate_up, down = self.gate_up.to(dtype), self.down.to(dtype)
        if self.grouped_mm and grouped_mm_serves(rows.device, dtype, rows.shape[-1], self.intermediate_size):
            offsets = counts.cumsum(0).to(torch.int32)
            # grouped_mm computes rows @ W_e per group with W_e (in, out): the transposed views of (out, in)
            gate, up = F.grouped_mm(rows, gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
            return F.grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offsets)
        # the equal fallback: the same two matmuls, one expert at a time; an expert with no tokens still runs (on
        # zero rows), so that the loop and the grouped matmul give the same (zero) gradient slices
        out = []
        for e, part in enumerate(rows.split(counts.tolist())):
            gate, up = F.linear(part, gate_up[e]).chunk(2, dim=-1)
            out.append(F.linear(F.silu(gate) * up, down[e]))
        return torch.cat(out)


def grouped_mm_serves(device: torch.device, dtype: torch.dtype, hidden_size: int, intermediate_size: int) -> bool:
    """Whether torch's F.grouped_mm runs the experts here: on CUDA in bf16; on CPU in any float dtype (torch >= 2.10),
    where its kernel needs rows of whole 16-byte multiples (hidden and intermediate sizes); under torch.compile in
    bf16 only (the op's meta function, which tracing runs, accepts nothing else)."""
    if not hasattr(F, "grouped_mm") or (torch.compiler.is_compiling() and dtype != torch.bfloat16):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16
    whole_rows = (hidden_size * dtype.itemsize) % 16 == 0 and (intermediate_size * dtype.itemsize) % 16 == 0
    return device.type == "cpu" and whole_rows


class MoE(nn.Module):
    """Top-k routed SwiGLU experts in place of the MLP of one decoder layer."""

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        d, self.num_experts, self.top_k = config.hidden_size, config.num_experts, config.num_experts_per_tok
        self.gate = nn.Linear(d, self.num_experts, bias=False)
        self.experts = Experts(self.num_experts, d, config.intermediate_size)
        self.layer_index = layer_index
        self.router_z_loss, self.jitter = config.router_z_loss, config.router_jitter_noise

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
        flat = chosen.reshape(-1)
        # tokens per expert as a fixed-size tensor (no host sync, one shape under torch.compile); the dispatch and
        # the balance loss both read it
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        out = self._dispatch(x, weights, flat, counts)
        if aux_losses is not None:
            self._report(aux_losses, logits, probs, counts)
        return out.view(shape)

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor,
                  counts: torch.Tensor) -> torch.Tensor:
        # sort the T·k (token, choice) pairs by expert: each expert's rows are contiguous; the tokens are cast to
        # the matmuls' dtype once, before the k-fold gather
        order = torch.argsort(flat, stable=True)
        token = order // self.top_k
        rows = self.experts(x.to(self.experts.compute_dtype()).index_select(0, token), counts)
        rows = (rows.float() * weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, rows)

    def _report(self, aux: dict, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> None:
        # only this layer's own numbers: under activation checkpointing the block's forward runs again in the
        # backward pass, so nothing here may depend on what other layers have put into `aux` (the pooling over
        # layers happens after them, in pool_router_losses)
        assigned = counts.float()
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean() if self.router_z_loss else None
        with torch.no_grad():
            load = assigned / (probs.shape[0] * self.top_k)
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
        """f of the step, given this forward's own top-k assignments (per expert, or per layer and expert) and the
        router rows they came from."""
        own = torch.cat([assigned.detach().float().reshape(-1), assigned.new_tensor([float(rows)])])
        if self.counting:  # the pre-pass: add this forward's routing to the step's
            self.counts = own if self.counts is None else self.counts + own
        elif self.counts is None and self.all_reduce is not None:  # no pre-pass: this forward is the whole step
            self.all_reduce(own)
        counts = own if self.counting or self.counts is None else self.counts
        return (counts[:-1] / counts[-1]).reshape(assigned.shape)


BALANCE_FORMS = ("per_layer", "pooled")
"""per_layer: Switch's loss in each layer, summed (the default); pooled: transformers' Mixtral form."""


def balance_loss(routing: list[_Routing], step: StepBalance | None = None, form: str = "per_layer") -> torch.Tensor:
    """The load-balancing loss of a forward's MoE layers, f over this forward's tokens or, with `step`, over the
    whole optimizer step's (StepBalance).

    per_layer  Σ_l E·Σ_e f_le·P_le (Fedus et al. 2021's Switch loss in each layer, summed over layers): every
               router is pushed to balance its own layer with the full gradient.
    pooled     E·Σ_e f_e·P_e with f and P pooled over all layers' tokens first (transformers'
               `load_balancing_loss_func` for Mixtral): one layer's surplus offsets another's shortfall."""
    if form not in BALANCE_FORMS:
        raise MiniCPMError(f"balance loss form {form!r}: expected one of {', '.join(BALANCE_FORMS)}")
    if form == "pooled":
        rows = sum(r.tokens for r in routing)
        assigned = torch.stack([r.assigned for r in routing]).sum(dim=0)
        fraction = assigned / rows if step is None else step.fraction(assigned, rows)
        mean_prob = torch.stack([r.prob_sums for r in routing]).sum(dim=0) / rows
        return fraction.shape[-1] * (fraction * mean_prob).sum()
    rows = routing[0].tokens  # every layer routes the same tokens
    assigned = torch.stack([r.assigned for r in routing])  # (layers, experts)
    fraction = assigned / rows if step is None else step.fraction(assigned, rows)
    mean_prob = torch.stack([r.prob_sums for r in routing]) / rows
    return fraction.shape[-1] * (fraction * mean_prob).sum()


def pool_router_losses(aux: dict, step: StepBalance | None = None, form: str = "per_layer") -> None:
    """After the layers of a forward: turn their routing into the aux losses (added to any already there).

    load_balance = balance_loss of the `form` asked for; router_z = the mean over layers of each layer's z-loss.
    Also the statistics over all layers: the largest and smallest expert load of any layer, the mean entropy."""
    routing: list[_Routing] = aux.pop(ROUTING_SCRATCH, [])
    if not routing:
        return
    aux["load_balance"] = aux.get("load_balance", 0.0) + balance_loss(routing, step, form)
    with torch.no_grad():
        loads = torch.stack([r.assigned / r.assigned.sum() for r in routing])
        aux["stat/moe/load_max"], aux["stat/moe/load_min"] = loads.max(), loads.min()
        aux["stat/moe/router_entropy"] = torch.stack([r.entropy for r in routing]).mean()
    z = [r.z for r in routing if r.z is not None]
    if z:
        aux["router_z"] = aux.get("router_z", 0.0) + torch.stack(z).mean()


# ---------------------------------------------------------------- the official per-expert layout

GATE, UP, DOWN = "w1", "w3", "w2"
"""MiniCPM-MoE's names for an expert's gate, up and down projections (`mlp.experts.{e}.w1.weight`, ...)."""


def per_expert_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of ours under the official keys: each layer's stacked experts become `{prefix}.{e}.w1.weight`
    (gate), `.w2.weight` (down), `.w3.weight` (up) per expert, in the official order, each a view into the stack (no
    copy: copying into them fills the model). Everything else, and a dense model's state, passes as it is."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix, dot, name = key.rpartition(".experts.")
        if not dot or name not in ("gate_up", "down"):
            out[key] = tensor
            continue
        if name == "down":
            continue  # written beside gate_up, expert by expert
        down = state[f"{prefix}.experts.down"]
        half = tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            out[f"{prefix}.experts.{e}.{GATE}.weight"] = tensor[e, :half]
            out[f"{prefix}.experts.{e}.{DOWN}.weight"] = down[e]
            out[f"{prefix}.experts.{e}.{UP}.weight"] = tensor[e, half:]
    return out


def stacked_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of per_expert_state: official per-expert keys into our stacks (one copy of the experts, in their
    dtype); the other tensors pass as they are. A layer whose experts are numbered 0..E-1 with all three matrices
    each is required (a missing one is a MiniCPMError naming it)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix, dot, rest = key.partition(".experts.")
        if not dot:
            out[key] = tensor
            continue
        if rest != f"0.{GATE}.weight":
            continue  # stacked with its layer's expert 0
        experts = 0
        while f"{prefix}.experts.{experts}.{GATE}.weight" in state:
            experts += 1

        def matrix(e: int, name: str) -> torch.Tensor:
            found = state.get(f"{prefix}.experts.{e}.{name}.weight")
            if found is None:
                raise MiniCPMError(f"MoE weights: missing tensor {prefix}.experts.{e}.{name}.weight")
            return found

        gate = matrix(0, GATE)
        gate_up = gate.new_empty((experts, 2 * gate.shape[0], gate.shape[1]))
        down = gate.new_empty((experts, *matrix(0, DOWN).shape))
        for e in range(experts):
            gate_up[e, :gate.shape[0]], gate_up[e, gate.shape[0]:] = matrix(e, GATE), matrix(e, UP)
            down[e] = matrix(e, DOWN)
        out[f"{prefix}.experts.gate_up"], out[f"{prefix}.experts.down"] = gate_up, down
    return out
