"""The batch-size ramp: a smaller global batch early in the run, then batch.tokens_per_step (the paper trains
MiniCPM with 2M tokens per step and then 4M).

    batch:
      tokens_per_step: 4194304            # the batch after the ramp
      ramp:
        - {until_tokens: 20000000000, tokens_per_step: 2097152}   # 2M per step for the first 20B tokens

Each stage's batch is used until the run has seen `until_tokens` tokens (or until step `until_step`), then the
next stage's; after the last stage, batch.tokens_per_step. The optimizer step stays the schedule's unit: WSD's
warmup, stable and decay phases, the decay data mixture, eval/checkpoint intervals and schedule.total_steps all
count steps, whatever their size, so the ramp changes the tokens a step carries and never the learning rate a
step gets. A token boundary must fall on a step boundary (the tokens of a stage are a whole number of its
batches), so the batch is a pure function of the step: a resumed run takes exactly the batches the uninterrupted
run would have, and the tokens counter it restores from the checkpoint agrees with tokens_before(step).
"""

from __future__ import annotations

from dataclasses import dataclass

from minicpm.errors import MiniCPMError


@dataclass(frozen=True)
class BatchRamp:
    stages: tuple[tuple[int, int], ...]
    """(first step after the stage, tokens per step) per stage, in order."""
    final: int
    """batch.tokens_per_step: the batch after the last stage."""

    def tokens_per_step(self, step: int) -> int:
        """The global batch, in tokens, of optimizer step `step` (0-based)."""
        for end, tokens in self.stages:
            if step < end:
                return tokens
        return self.final

    def tokens_before(self, step: int) -> int:
        """Tokens seen by the first `step` steps."""
        total, start = 0, 0
        for end, tokens in self.stages:
            if step <= start:
                return total
            total += (min(step, end) - start) * tokens
            start = end
        return total + max(0, step - start) * self.final

    def sizes(self) -> list[int]:
        return sorted({tokens for _, tokens in self.stages} | {self.final})

    def describe(self) -> str:
        parts, start = [], 0
        for end, tokens in self.stages:
            parts.append(f"{tokens:,} tokens/step for steps {start}..{end - 1}")
            start = end
        return "; ".join([*parts, f"then {self.final:,}"])


def batch_ramp(batch) -> BatchRamp:
    """The ramp of a BatchConfig, checked; each error is one line naming batch.ramp[i] and the field."""
    stages, start, seen = [], 0, 0
    for i, stage in enumerate(batch.ramp):
        where = f"batch.ramp[{i}]"
        tokens = stage.tokens_per_step
        if tokens <= 0 or tokens % batch.seq_len:
            raise MiniCPMError(f"{where}.tokens_per_step: expected a positive multiple of batch.seq_len "
                               f"({batch.seq_len}), got {tokens}")
        if (tokens // batch.seq_len) % batch.micro_batch_size:
            raise MiniCPMError(f"{where}.tokens_per_step: {tokens // batch.seq_len} sequences per step are not "
                               f"a whole number of micro-batches of {batch.micro_batch_size}")
        if (stage.until_tokens is None) == (stage.until_step is None):
            raise MiniCPMError(f"{where}: give one of until_tokens and until_step")
        if stage.until_step is not None:
            end = stage.until_step
            if end <= start:
                raise MiniCPMError(f"{where}.until_step: {end} must be after the previous stage's end (step {start})")
        else:
            more = stage.until_tokens - seen
            if more <= 0:
                raise MiniCPMError(f"{where}.until_tokens: {stage.until_tokens} must be more than the previous "
                                   f"stage's end ({seen} tokens)")
            if more % tokens:
                raise MiniCPMError(f"{where}.until_tokens: the stage's {more} tokens are not a whole number of "
                                   f"its {tokens}-token steps (the switch must fall on a step boundary)")
            end = start + more // tokens
        stages.append((end, tokens))
        seen += (end - start) * tokens
        start = end
    return BatchRamp(tuple(stages), batch.tokens_per_step)
