"""What `minicpm reproduce` trains: the sizes, learning-rate grids, token counts and seeds of each part, for the full
run, --quick, and the toy plan the tests run; --scale multiplies every width and every token count.

Every run is a MiniCPM of heads of 16 and d_ff = 2.5·d on the quickstart's standard-library corpus (one mixture, the
same in every run), sequences of 128 tokens, fp32 (the same numbers on every CPU), one thread per run. The μP base
width is the smallest width of part 1: its multiplier m = d / base is 1 there and ≥ 1 everywhere (the paper's
proxies run at m ≥ 1; an m below 1 divides the logits by less than one and multiplies the hidden learning rate).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minicpm.errors import MiniCPMError
from minicpm.model.shapes import WidthRule

HEAD_DIM = 16
SHAPE = WidthRule(head_dim=HEAD_DIM)
SEQ_LEN = 128
PLANS = ("full", "quick", "toy")


@dataclass(frozen=True)
class Decay:
    """One WSD decay of the schedule comparison: its shape and its share of the run's tokens."""

    shape: str
    fraction: float

    @property
    def name(self) -> str:
        return f"wsd-{self.shape}-{self.fraction * 100:g}%"


@dataclass(frozen=True)
class Plan:
    name: str
    vocab_size: int = 1024
    tokens_per_step: int = 1024
    warmup_steps: int = 4
    # part 1: learning-rate transfer across width (μP, SP, μP with the embedding in the hidden group)
    widths: tuple[int, ...] = (32, 64, 128, 256)
    embedding_widths: tuple[int, ...] = (256,)
    """Widths (besides the base width, where every arm is the same model) trained with the embedding in the 2-D
    group."""
    mup_log2_lrs: tuple[int, ...] = (-8, -7, -6, -5, -4)
    sp_log2_lrs: tuple[int, ...] = (-10, -9, -8, -7, -6, -5, -4)
    """SP's optimum falls with the width (its hidden matrices keep the base lr): a grid reaching lower."""
    embedding_log2_lrs: tuple[int, ...] = (-8, -7, -6, -5, -4, -3)
    transfer_steps: int = 160
    transfer_seeds: tuple[int, ...] = (0, 1, 2)
    transfer_depth: int = 2
    # part 2: learning-rate transfer across depth (scale_depth/√L vs CompleteP's 1/L)
    depth_width: int = 32
    depths: tuple[int, ...] = (2, 4, 8)
    depth_log2_lrs: tuple[int, ...] = (-8, -7, -6, -5, -4)
    # part 3: WSD vs cosine at equal tokens; parts 6, 7 and 8 branch from its stable runs
    schedule_width: int = 32
    schedule_depth: int = 2
    multiples: tuple[float, ...] = (10, 20, 40, 80)
    """Run lengths D in multiples of N (non-embedding parameters)."""
    decays: tuple[Decay, ...] = (Decay("exp", 0.025), Decay("exp", 0.1), Decay("exp", 0.2), Decay("1-sqrt", 0.1),
                                 Decay("1-sqrt", 0.2))
    tune_log2_lrs: tuple[int, ...] = (-7, -6, -5, -4, -3)
    """The grid each schedule's learning rate is chosen from (cosine, and the stable run with a 10% decay)."""
    tune_multiple: float = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    # part 4: the WSD scaling law
    law_sizes: tuple[tuple[int, int], ...] = ((32, 1), (32, 2), (48, 2), (64, 2), (96, 2), (128, 2))
    """(width, depth) of each size, smallest to largest: N spans 1.5 decades."""
    law_tokens: tuple[int, ...] = (250_000, 500_000, 1_000_000, 2_000_000, 4_000_000)
    law_decay: float = 0.1
    # part 5: the batch-size law
    batch_sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    """Tokens per step."""
    batch_run_tokens: int = 1_000_000
    batch_evals: int = 16
    # parts 6 and 7: branched from part 3's stable runs at branch_multiple·N
    branch_multiple: float = 40
    branch_fraction: float = 0.2
    sft_steps: int = 60
    chat_share: float = 0.1
    chat_examples: int = 3000
    chat_file_stride: int = 1
    eval_sequences: int = 64

    @property
    def base_width(self) -> int:
        return self.widths[0]

    def arm_log2_lrs(self, arm: str) -> tuple[int, ...]:
        return {"mup": self.mup_log2_lrs, "sp": self.sp_log2_lrs,
                "mup-embedding-2d": self.embedding_log2_lrs}[arm]

    def scaled(self, scale: float) -> "Plan":
        """Every width and token count × scale (widths to whole heads): the same findings on a bigger machine."""
        if not scale > 0:
            raise MiniCPMError(f"--scale: expected a positive number, got {scale!r}")
        if scale == 1:
            return self

        def width(w: int) -> int:
            return max(HEAD_DIM, round(w * scale / HEAD_DIM) * HEAD_DIM)

        def tokens(t: int) -> int:
            return max(SEQ_LEN, round(t * scale / SEQ_LEN) * SEQ_LEN)

        return dataclasses.replace(
            self, widths=tuple(width(w) for w in self.widths),
            embedding_widths=tuple(width(w) for w in self.embedding_widths),
            depth_width=width(self.depth_width), schedule_width=width(self.schedule_width),
            law_sizes=tuple((width(w), d) for w, d in self.law_sizes),
            law_tokens=tuple(tokens(t) for t in self.law_tokens),
            transfer_steps=max(8, round(self.transfer_steps * scale)),
            batch_run_tokens=tokens(self.batch_run_tokens), tokens_per_step=tokens(self.tokens_per_step),
            batch_sizes=tuple(tokens(b) for b in self.batch_sizes),
            sft_steps=max(8, round(self.sft_steps * scale)))


FULL = Plan("full")
QUICK = Plan("quick", widths=(16, 128), embedding_widths=(128,), mup_log2_lrs=(-7, -6, -5, -4),
             sp_log2_lrs=(-9, -8, -7, -6, -5, -4), embedding_log2_lrs=(-7, -6, -5, -4, -3), depths=(2, 8),
             depth_log2_lrs=(-7, -6, -5, -4), multiples=(10, 20),
             decays=(Decay("exp", 0.025), Decay("exp", 0.1), Decay("1-sqrt", 0.2)), tune_multiple=10,
             law_sizes=((32, 1), (32, 2), (48, 2), (64, 2), (96, 2)),
             law_tokens=(125_000, 250_000, 500_000, 1_000_000), batch_sizes=(256, 512, 1024, 2048),
             batch_run_tokens=500_000, branch_multiple=20, sft_steps=40, chat_examples=1500)
TOY = Plan("toy", vocab_size=512, tokens_per_step=256, warmup_steps=2, widths=(16, 32), embedding_widths=(32,),
           mup_log2_lrs=(-7, -5), sp_log2_lrs=(-7, -5), embedding_log2_lrs=(-7, -5), transfer_steps=8, transfer_seeds=(0, 1),
           depth_width=16, depths=(1, 2), depth_log2_lrs=(-7, -5), schedule_width=16, schedule_depth=1,
           multiples=(20, 40), decays=(Decay("exp", 0.1), Decay("1-sqrt", 0.2)), tune_log2_lrs=(-6, -5),
           tune_multiple=20, seeds=(0, 1), law_sizes=((16, 1), (16, 2), (32, 1), (32, 2), (48, 1)),
           law_tokens=(4096, 8192, 12288, 16384), law_decay=0.25, batch_sizes=(256, 512, 1024, 2048), batch_run_tokens=32768,
           batch_evals=8, branch_multiple=20, branch_fraction=0.25, sft_steps=3, chat_examples=60,
           chat_file_stride=40, eval_sequences=4)


def plan_named(name: str, scale: float = 1.0) -> Plan:
    plans = {"full": FULL, "quick": QUICK, "toy": TOY}
    if name not in plans:
        raise MiniCPMError(f"plan: expected one of {', '.join(PLANS)}, got {name!r}")
    return plans[name].scaled(scale)
