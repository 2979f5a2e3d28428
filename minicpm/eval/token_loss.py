"""Per-token negative log-likelihood of a text under a checkpoint (`minicpm eval loss`), so that a user can hold our
numbers against another runtime's (transformers, llama.cpp) token by token.

The text is encoded as the tokenizer encodes it (no BOS added: the first token is context only), run through the
model in one forward pass in fp32 by default, and token t+1 is scored under the logits at t. Longer than
max_position_embeddings is allowed: the RoPE scaling decides what happens there (dynamic NTK grows its base).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minicpm.errors import MiniCPMError


@dataclass
class TextLoss:
    """Summed and mean NLL (nats) of a text's predicted tokens, and each token's."""

    tokens: list[int]
    """Every token id of the text; token 0 is context only."""
    nll: list[float]
    """NLL of tokens[1:], one per predicted token."""

    @property
    def total(self) -> float:
        return float(sum(self.nll))

    @property
    def mean(self) -> float:
        return self.total / max(len(self.nll), 1)

    def as_dict(self, *, per_token: bool, decode=None) -> dict:
        out = {"tokens": len(self.tokens), "predicted": len(self.nll), "total_nll": self.total,
               "mean_nll": self.mean}
        if per_token:
            out["per_token"] = [{"position": i + 1, "id": t, **({"text": decode([t])} if decode else {}), "nll": v}
                                for i, (t, v) in enumerate(zip(self.tokens[1:], self.nll))]
        return out


@torch.no_grad()
def token_nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """NLL in float64 of ids[:, 1:] given the prefix, shape (B, T-1), from one forward pass."""
    logits = model(ids)
    return -torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


def load_eval_model(checkpoint: str | Path, *, device: str = "cpu", dtype: str | None = "fp32"):
    """A checkpoint (ours, an official HF directory, or a run directory's latest) as an eval-mode MiniCPM."""
    from minicpm.interop.hf import load_model
    from minicpm.rundir import is_sharded, resolve_weights

    source = resolve_weights(checkpoint)
    if is_sharded(source):
        raise MiniCPMError(f"{source}: a sharded checkpoint; gather it first with "
                           f"`minicpm export {source} --to minicpm --out DIR`")
    return load_model(source, device=device, dtype=dtype).eval()


def text_loss(checkpoint: str | Path, text_file: str | Path, *, tokenizer: str | Path | None = None,
              device: str = "cpu", dtype: str | None = "fp32") -> tuple[TextLoss, object]:
    """(the loss of the file's text under the checkpoint, the tokenizer's codec)."""
    from minicpm.infer.tokenizer import find_tokenizer, load_codec
    from minicpm.rundir import resolve_weights

    path = Path(text_file)
    if not path.is_file():
        raise MiniCPMError(f"--text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MiniCPMError(f"--text {path}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    codec = load_codec(find_tokenizer(resolve_weights(checkpoint), tokenizer))
    ids = codec.encode(text)
    if len(ids) < 2:
        raise MiniCPMError(f"--text {path}: {len(ids)} token(s); at least 2 are needed to score one")
    model = load_eval_model(checkpoint, device=device, dtype=dtype)
    if max(ids) >= model.config.vocab_size:
        raise MiniCPMError(f"--text {path}: token id {max(ids)} is outside the model's vocabulary "
                           f"({model.config.vocab_size}); wrong --tokenizer?")
    nll = token_nll(model, torch.tensor([ids], device=device))[0]
    return TextLoss(tokens=ids, nll=nll.tolist()), codec


def format_text_loss(loss: TextLoss, *, per_token: bool, decode=None) -> str:
    """The human-readable form: a summary line and, with per_token, one `position id nll text` line each."""
    lines = [f"tokens {len(loss.tokens)}, predicted {len(loss.nll)}: total NLL {loss.total:.6f} nats, "
             f"mean {loss.mean:.6f} nats/token"]
    if per_token:
        for i, (token, value) in enumerate(zip(loss.tokens[1:], loss.nll)):
            piece = repr(decode([token])) if decode else ""
            lines.append(f"{i + 1}\t{token}\t{value:.6f}\t{piece}")
    return "\n".join(lines)
