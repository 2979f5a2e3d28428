"""Context extension (`minicpm extend`, paper section 6, MiniCPM-128K): from a checkpoint to a longer context.

extend_checkpoint:
  1. unties the head: lm_head starts as a copy of the embedding, so the logits at step 0 are unchanged (the 128K
     model "removed tie_embedding", research/family.md section 2.2);
  2. sets the new RoPE and max_position_embeddings, from L0 (the length the source trained at: its run's
     batch.seq_len, else its max_position_embeddings) to N with factor s = N/L0 unless given:
       abf      rope_theta = --base (default 50 x theta, Xiong et al. 2023's 10,000 -> 500,000); no rope_scaling
       ntk      rope_scaling {type ntk, factor s}: the static NTK-aware base change
       yarn     rope_scaling {type yarn, factor s, original_max_position_embeddings L0}
       dynamic  rope_scaling {type dynamic, factor s} with max_position_embeddings kept at L0: dynamic NTK changes
                nothing up to max_position_embeddings and grows the base beyond it, at inference; it is not a
                training-time scaling (transformers computes it from the current length), so no training is planned
       abf-ntk  MiniCPM-128K's path (paper §7.2): OUT/model gets ABF (--base) up to M = --abf-length (default N/4,
                4K -> 32K -> 128K); the curriculum trains the ABF stages (lengths up to M), then the NTK stages
                (rope_scaling {type ntk, factor N/M} on the ABF base, max_position_embeddings N) up to N
  3. writes OUT/model (official layout, tokenizer beside), OUT/data/synthetic (passkey, key-value and file
     questions, minicpm.data.synthetic_long), OUT/train.yaml (one run at N from OUT/model by run.init_weights_from,
     on the long/short mix, 44/56 by default as MiniCPM-128K) and OUT/curriculum.yaml (the sequence-length
     stages, run by run_curriculum / `minicpm curriculum`).

The curriculum is a chain of ordinary runs, one seq_len each (the loop trains one length per run): stage k starts
from the weights of stage k-1's final checkpoint (weights only: a fresh optimizer and warmup), so the loop itself
is unchanged; a stage interrupted resumes exactly (the loop's --resume), a finished one is skipped.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, List, Optional, Sequence

from minicpm.errors import MiniCPMError
from minicpm.model.config import ModelConfig
from minicpm.specs import Accepts, Override, PositiveInt, read_spec

from minicpm.stages.extend_options import ABF_BASE_RATIO, ABF_LENGTH_SHARE, LONG_SHARE, METHODS  # noqa: F401

CURRICULUM_FILE = "curriculum.yaml"
TRAIN_FILE = "train.yaml"


# ------------------------------------------------------------------------------------------ the model

def extended_config(config: ModelConfig, *, from_length: int, to_length: int, method: str,
                    base: float | None = None, factor: float | None = None) -> ModelConfig:
    """The untied config with the new RoPE (see the module docstring); one-line errors for bad input."""
    if method not in METHODS:
        raise MiniCPMError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if to_length <= from_length:
        raise MiniCPMError(f"--to-length {to_length}: must exceed the current length {from_length}")
    factor = to_length / from_length if factor is None else factor
    if not factor > 1 or not math.isfinite(factor):
        raise MiniCPMError(f"--factor {factor}: must be a number > 1")
    if base is not None and method not in ("abf", "abf-ntk"):
        raise MiniCPMError(f"--base is for --method abf or abf-ntk (the RoPE base ABF sets), not {method}")
    if base is not None and not base > config.rope_theta:
        raise MiniCPMError(f"--base {base}: must exceed the current rope_theta {config.rope_theta}")
    if config.rope_scaling:
        raise MiniCPMError(f"the checkpoint already has rope_scaling {config.rope_scaling}; extend a checkpoint "
                           f"with plain RoPE (ABF changes only rope_theta and may be extended again)")
    new = dict(tie_word_embeddings=False, max_position_embeddings=to_length)
    if method in ("abf", "abf-ntk"):  # abf-ntk: the ABF step; ntk_stage_overrides gives the NTK step
        new["rope_theta"] = float(base) if base is not None else ABF_BASE_RATIO * config.rope_theta
    elif method == "ntk":
        new["rope_scaling"] = {"rope_type": "ntk", "factor": float(factor)}
    elif method == "yarn":
        new["rope_scaling"] = {"rope_type": "yarn", "factor": float(factor),
                               "original_max_position_embeddings": from_length}
    else:  # dynamic: scales from max_position_embeddings, so that stays the trained length
        new.update(max_position_embeddings=from_length, rope_scaling={"rope_type": "dynamic", "factor": float(factor)})
    return dataclasses.replace(config, **new)


def untie_head(state: dict, config: ModelConfig) -> dict:
    """The state with lm_head.weight a copy of the embedding when the config ties them (logits unchanged)."""
    if not config.tie_word_embeddings or "lm_head.weight" in state:
        return dict(state)
    return {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}


def trained_length(checkpoint: Path, config: ModelConfig) -> int:
    """L0: batch.seq_len of the run the checkpoint belongs to, else its max_position_embeddings."""
    from minicpm.rundir import run_of

    try:
        seq_len = (run_of(checkpoint).read_config_dict().get("batch") or {}).get("seq_len")
    except MiniCPMError:
        seq_len = None
    if isinstance(seq_len, int) and 0 < seq_len <= config.max_position_embeddings:
        return seq_len
    return config.max_position_embeddings


# ------------------------------------------------------------------------------------------ memory

@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process needs to train (computed, not measured): AdamW with fp32 master weights."""

    weights_and_optimizer: int
    """16 bytes per parameter: fp32 weights, fp32 gradients, two fp32 Adam moments."""
    activations: int
    """Tensors saved for the backward over the micro-batch (SDPA's flash/memory-efficient kernels: no T^2 term)."""
    logits: int
    """The head's fp32 logits and their gradient for the tokens computed at once (parallel.loss_chunk_size)."""

    @property
    def total(self) -> int:
        return self.weights_and_optimizer + self.activations + self.logits


def training_memory(config: ModelConfig, *, seq_len: int, micro_batch_size: int, dtype: str = "bf16",
                    activation_checkpointing: str = "block", loss_chunk_size: int | None = 2048,
                    shards: int = 1) -> MemoryEstimate:
    """A computed estimate of training memory per process (weights and optimizer sharded over `shards` FSDP
    processes). Per token and layer the backward keeps, with h = hidden_size, r = intermediate/h and a = 2 bytes
    (bf16 autocast) or 4: fp32 residual and norm inputs (12h), q and k rotated in fp32 (8h), and in a bytes q, k, v,
    the attention output and the o_proj input (5h) and the MLP's gate, up, silu and product (4rh) plus its input
    (h). Block checkpointing keeps only each block's fp32 input (4h) and recomputes one block at a time; selective
    keeps that input and the outputs of the matmuls and attention (q, k, v, attention, o_proj, down: 6h; gate and
    up: 2rh, in a bytes), and recomputes the norms, RoPE, SiLU and products, one block at a time."""
    h, layers = config.hidden_size, config.num_hidden_layers
    a = 2 if dtype == "bf16" else 4
    per_block = h * (12 + 8 + a * (6 + 4 * config.intermediate_size / h))
    tokens = seq_len * micro_batch_size
    if activation_checkpointing == "block":
        activations = tokens * (layers * 4 * h + per_block)
    elif activation_checkpointing == "selective":
        activations = tokens * (layers * h * (4 + a * (6 + 2 * config.intermediate_size / h)) + per_block)
    else:
        activations = tokens * layers * per_block
    activations += tokens * h * 4 * 3  # embedding output, final norm input and output
    logit_tokens = min(tokens, loss_chunk_size) if loss_chunk_size else tokens
    logits = logit_tokens * config.vocab_size * 4 * 3  # logits, softmax and its gradient, fp32
    weights = 16 * config.total_params() // max(shards, 1)
    return MemoryEstimate(int(weights), int(activations), int(logits))


def device_memory(device: str = "auto") -> tuple[str, int]:
    """(name, bytes) of the memory training would use: the GPU's (auto: cuda when there is one), else this
    machine's RAM."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        index = torch.device(device if device.startswith("cuda") else "cuda").index or 0
        return torch.cuda.get_device_name(index), torch.cuda.get_device_properties(index).total_memory
    return "this machine's RAM", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_memory(text: str) -> int:
    """Bytes from '80GB', '80GiB', '512MB' or a plain number of bytes."""
    from minicpm.interop.hf import parse_size

    return parse_size(text)


def check_memory(config: ModelConfig, *, seq_len: int, micro_batch_size: int, memory: int, where: str,
                 dtype: str = "bf16", activation_checkpointing: str = "block",
                 loss_chunk_size: int | None = 2048) -> MemoryEstimate:
    """A one-line error when the estimate exceeds 90% of `memory` (the rest for the allocator and the runtime)."""
    estimate = training_memory(config, seq_len=seq_len, micro_batch_size=micro_batch_size, dtype=dtype,
                               activation_checkpointing=activation_checkpointing, loss_chunk_size=loss_chunk_size)
    if estimate.total > 0.9 * memory:
        gib = 2 ** 30
        fits = lightest_checkpointing(config, seq_len=seq_len, micro_batch_size=micro_batch_size, memory=memory,
                                      dtype=dtype, loss_chunk_size=loss_chunk_size)
        advice = (f"--activation-checkpointing {fits} would fit" if fits
                  else "shorten the length or the micro-batch, or shard")
        raise MiniCPMError(
            f"--to-length {seq_len} with --micro-batch-size {micro_batch_size}: training needs about "
            f"{estimate.total / gib:.1f} GiB (weights+optimizer {estimate.weights_and_optimizer / gib:.1f}, "
            f"activations {estimate.activations / gib:.1f}, logits {estimate.logits / gib:.1f}; computed), more "
            f"than 90% of {where} ({memory / gib:.1f} GiB); {advice}")
    return estimate


def lightest_checkpointing(config: ModelConfig, *, seq_len: int, micro_batch_size: int, memory: int,
                           dtype: str = "bf16", loss_chunk_size: int | None = 2048) -> str | None:
    """The activation checkpointing that recomputes least (none, then selective, then block) whose estimate fits
    in 90% of `memory`; None when even block does not."""
    for mode in ("none", "selective", "block"):
        estimate = training_memory(config, seq_len=seq_len, micro_batch_size=micro_batch_size, dtype=dtype,
                                   activation_checkpointing=mode, loss_chunk_size=loss_chunk_size)
        if estimate.total <= 0.9 * memory:
            return mode
    return None


# ------------------------------------------------------------------------------------------ the plan

def ntk_stage_overrides(abf_length: int, to_length: int) -> list[str]:
    """The NTK step of abf-ntk, as model.* overrides of a run from ABF weights: NTK by N/M on the ABF base."""
    return [f"model.rope_scaling={{rope_type: ntk, factor: {to_length / abf_length!r}}}",
            f"model.max_position_embeddings={to_length}"]


def abf_length_for(from_length: int, to_length: int, abf_length: int | None) -> int:
    """M, where abf-ntk's ABF step ends: --abf-length, else N/4 (MiniCPM-128K: 4K -> 32K -> 128K)."""
    m = abf_length if abf_length is not None else to_length // ABF_LENGTH_SHARE
    if not from_length < m < to_length:
        raise MiniCPMError(f"--abf-length {m}: the ABF step must end between the trained length {from_length} and "
                           f"--to-length {to_length}" + ("" if abf_length is not None else
                                                         " (default N/4); give --abf-length or use --method abf"))
    return m


def default_stages(from_length: int, to_length: int) -> list[int]:
    """Two stages where halving N stays above L0 (e.g. 256 -> 512 -> 1024, 4K -> 64K -> 128K), else one."""
    half = to_length // 2
    return [half, to_length] if half > from_length else [to_length]


@dataclass
class ExtendResult:
    out: Path
    model: Path
    config: ModelConfig
    from_length: int
    stages: list[int]
    train_config: Path | None
    curriculum: Path | None
    memory: MemoryEstimate | None

    def summary(self) -> str:
        c = self.config
        rope = f"rope_theta {c.rope_theta:g}" + (f", rope_scaling {c.rope_scaling}" if c.rope_scaling else "")
        lines = [f"wrote {self.model} (head untied; {rope}; max_position_embeddings {c.max_position_embeddings}; "
                 f"from {self.from_length} tokens)"]
        if self.curriculum:
            lines.append(f"wrote {self.train_config} and {self.curriculum} (stages: "
                         f"{' -> '.join(map(str, [self.from_length, *self.stages]))})")
            lines.append(f"train: minicpm curriculum {self.curriculum}")
        else:
            lines.append("dynamic NTK acts at inference only: no training planned (evaluate with "
                         f"minicpm eval passkey {self.model} --lengths ...)")
        if self.memory:
            lines.append(f"memory at {self.stages[-1]} tokens (computed): {self.memory.total / 2 ** 30:.2f} GiB")
        return "\n".join(lines)


def _source_run_config(checkpoint: Path) -> dict:
    from minicpm.rundir import run_of

    try:
        return run_of(checkpoint).read_config_dict()
    except MiniCPMError:
        return {}


def _mix(long_sets: Sequence[str], short_sets: dict[str, float], long_share: float) -> dict[str, float]:
    total_short = sum(short_sets.values())
    mix = {str(Path(p).resolve()): long_share / len(long_sets) for p in long_sets}
    for path, weight in short_sets.items():
        key = str(Path(path).resolve())
        mix[key] = mix.get(key, 0) + (1 - long_share) * weight / total_short
    return {k: round(v, 6) for k, v in mix.items()}


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def extend_checkpoint(checkpoint: str | Path, out: str | Path, *, to_length: int, method: str,
                      base: float | None = None, factor: float | None = None, stages: Sequence[int] | None = None,
                      steps_per_stage: int = 100, tokens_per_step: int | None = None, micro_batch_size: int = 1,
                      long_data: Sequence[str] = (), short_data: dict[str, float] | None = None,
                      long_share: float = LONG_SHARE, synthetic_documents: int = 1000,
                      synthetic_tasks: Sequence[str] | None = None, lr: float | None = None,
                      device: str = "auto", memory: int | None = None, dtype: str = "bf16",
                      activation_checkpointing: str = "block", tokenizer: str | Path | None = None,
                      seed: int = 0, overwrite: bool = False, abf_length: int | None = None) -> ExtendResult:
    """See the module docstring. Every check runs before anything is written; OUT appears whole (one rename)."""
    from minicpm.data.synthetic_long import TASKS, write_synthetic_dataset
    from minicpm.files import check_output, output_directory, write_atomic
    from minicpm.infer.tokenizer import find_tokenizer
    from minicpm.checkpoints.verify import resolve_verified_weights, warn_on_stderr
    from minicpm.checkpoints.weights import consolidate
    from minicpm.interop.hf import save_state
    from minicpm.rundir import is_sharded

    source = resolve_verified_weights(checkpoint, warn_on_stderr)  # a run directory: its newest that verifies
    out = check_output(Path(out).resolve(), inputs=[checkpoint, source, tokenizer, *long_data, *(short_data or {})],
                       overwrite=overwrite)
    if is_sharded(source):
        raise MiniCPMError(f"{source}: a sharded checkpoint; gather it first with "
                           f"`minicpm export {source} --to minicpm --out DIR`")
    tasks = list(synthetic_tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise MiniCPMError(f"--synthetic-tasks {unknown[0]!r}: expected some of {', '.join(TASKS)}")
    if not 0 < long_share < 1:
        raise MiniCPMError(f"--long-share {long_share}: must be in (0, 1)")
    if steps_per_stage < 1 or micro_batch_size < 1:
        raise MiniCPMError(f"--steps-per-stage and --micro-batch-size must be >= 1, got {steps_per_stage}, "
                           f"{micro_batch_size}")
    from minicpm.interop.hf import checkpoint_config

    config = checkpoint_config(source)
    from_length = trained_length(source, config)
    two_step = method == "abf-ntk"
    if abf_length is not None and not two_step:
        raise MiniCPMError(f"--abf-length is for --method abf-ntk (where its ABF step ends), not {method}")
    if two_step and factor is not None:
        raise MiniCPMError("--factor: abf-ntk's NTK factor is --to-length / --abf-length; give those instead")
    mid = abf_length_for(from_length, to_length, abf_length) if two_step else to_length
    new_config = extended_config(config, from_length=from_length, to_length=mid, method=method, base=base,
                                 factor=factor)
    tokenizer_file = find_tokenizer(source, tokenizer)
    train = method != "dynamic"
    stages = list(stages) if stages else (default_stages(from_length, mid) + default_stages(mid, to_length)
                                          if two_step else default_stages(from_length, to_length))
    estimate = None
    if train:
        if stages != sorted(set(stages)) or stages[0] <= from_length or stages[-1] != to_length:
            raise MiniCPMError(f"--stages {','.join(map(str, stages))}: expected increasing lengths above "
                               f"{from_length} ending at --to-length {to_length}")
        where, available = device_memory(device)
        estimate = check_memory(dataclasses.replace(new_config, max_position_embeddings=to_length), seq_len=to_length, micro_batch_size=micro_batch_size,
                                memory=memory or available, where=where if memory is None else "--memory",
                                dtype=dtype, activation_checkpointing=activation_checkpointing)
        run_cfg = _source_run_config(source)
        if short_data is None:
            short_data = (run_cfg.get("data") or {}).get("stable") or {}
        if not short_data:
            raise MiniCPMError(f"{source}: no run config names its data; pass --short-data DIR[:WEIGHT] (the "
                               f"short-context data the model keeps training on)")
        for path in [*long_data, *short_data]:
            if not (Path(path) / "meta.json").is_file():
                raise MiniCPMError(f"{path}: not a prepared dataset (no meta.json); make one with minicpm prepare")
        lr = lr or (run_cfg.get("optim") or {}).get("lr") or 0.01
        tokens_per_step = tokens_per_step or max(8 * to_length, 8192)
        if tokens_per_step % to_length:
            raise MiniCPMError(f"--tokens-per-step {tokens_per_step}: must be a multiple of --to-length {to_length}")
    _, state = consolidate(source)  # one of our checkpoints is checked against its manifest first

    inputs = [checkpoint, source, tokenizer_file, *long_data, *(short_data or {})]
    with output_directory(out, inputs=inputs, overwrite=overwrite) as tmp:
        extra = {tokenizer_file.name: tokenizer_file}
        save_state(new_config, untie_head(state, config), tmp / "model", extra_files=extra)
        result = ExtendResult(out, out / "model", new_config, from_length, stages, None, None, estimate)
        if train:
            # examples trained whole (a row holds whole examples): the full length of every stage and a half and a
            # quarter of it, so that the rows of each stage fill up and the needle sits at every distance; and some
            # a little longer than N, held-out long documents for the loss_by_position evaluator
            lengths = sorted({max(n // k - 1, 32) for n in (from_length, *stages) for k in (1, 2, 4)}
                             | {to_length + 16})
            synthetic = write_synthetic_dataset(tokenizer_file, tmp / "data" / "synthetic",
                                                documents=synthetic_documents, lengths=lengths, tasks=tasks, seed=seed)
            _check_examples_fit(synthetic, stages)
            long_sets = [*map(str, long_data), str(out / "data" / "synthetic")]
            train_cfg = _train_config(out, tokenizer_file.name, _mix(long_sets, short_data, long_share), lr=lr,
                                      seq_len=to_length, steps=steps_per_stage, tokens_per_step=tokens_per_step,
                                      micro_batch_size=micro_batch_size, activation_checkpointing=activation_checkpointing,
                                      seed=seed)
            curriculum = {"train": TRAIN_FILE, "start": "model", "runs": "runs",
                          "stages": [{"seq_len": n, "steps": steps_per_stage} for n in stages],
                          "micro_batch_tokens": micro_batch_size * to_length}
            if two_step:
                # train.yaml is the one run at N: NTK on the ABF weights; the curriculum's ABF stages undo that
                ntk = ntk_stage_overrides(mid, to_length)
                train_cfg["model"] = {"rope_scaling": {"rope_type": "ntk", "factor": to_length / mid},
                                      "max_position_embeddings": to_length}
                for stage in curriculum["stages"]:
                    if stage["seq_len"] <= mid:
                        stage["overrides"] = ["model.rope_scaling=null", f"model.max_position_embeddings={mid}"]
                    else:
                        stage["overrides"] = ntk
            write_atomic(tmp / TRAIN_FILE, _TRAIN_HEADER.format(n=to_length, l0=from_length) + _yaml(train_cfg))
            write_atomic(tmp / CURRICULUM_FILE, _CURRICULUM_HEADER + _yaml(curriculum))
            result.train_config, result.curriculum = out / TRAIN_FILE, out / CURRICULUM_FILE
    return result



def _check_examples_fit(synthetic: Path, stages: Sequence[int]) -> None:
    """Every stage trains on whole synthetic examples: it needs some that fit its rows of seq_len + 1 tokens."""
    from minicpm.data.shards import open_dataset

    lengths = open_dataset(synthetic, "train").document_lengths()
    for n in stages:
        if not (lengths <= n + 1).any():
            raise MiniCPMError(f"--stages: no synthetic example fits in {n} tokens (the shortest is "
                               f"{int(lengths.min()) - 1} tokens with this tokenizer); start the curriculum at a "
                               f"longer length")


_TRAIN_HEADER = """\
# Context extension to {n} tokens (from {l0}), written by `minicpm extend`: one run at the full length from the
# extended weights (run.init_weights_from: step 0, fresh optimizer), on the long/short mix (paper section 6).
#   minicpm train train.yaml --out runs/long
# curriculum.yaml trains the same through shorter lengths first (minicpm curriculum curriculum.yaml).
"""

_CURRICULUM_HEADER = """\
# A sequence-length curriculum: each stage is an ordinary run of `train` with batch.seq_len and
# schedule.total_steps of the stage, starting from the weights of the previous stage's final checkpoint (the first
# from `start`); tokens per step stay those of `train`, micro-batches hold micro_batch_tokens tokens.
# Run (or resume) with: minicpm curriculum curriculum.yaml
"""


def _train_config(out: Path, tokenizer_name: str, mix: dict[str, float], *, lr: float, seq_len: int, steps: int,
                  tokens_per_step: int, micro_batch_size: int, activation_checkpointing: str, seed: int) -> dict:
    return {
        # each document attends only to itself: a row packs several synthetic examples, and a question must not
        # find the needle of the example before it (packed rows kept apart as in SFT, family.md 3.3)
        "data": {"stable": mix, "tokenizer": str(out / "model" / tokenizer_name), "eval_sequences": 16,
                 "packing": "document"},
        "optim": {"lr": lr},
        "schedule": {"kind": "wsd", "total_steps": steps, "warmup_steps": max(1, steps // 10),
                     "decay_steps": max(1, steps // 10)},
        "batch": {"tokens_per_step": tokens_per_step, "seq_len": seq_len, "micro_batch_size": micro_batch_size},
        "run": {"init_weights_from": str(out / "model"), "seed": seed, "eval_every": 0,
                "checkpoint_every": steps, "keep_last": 1},
        "parallel": {"activation_checkpointing": activation_checkpointing, "loss_chunk_size": 2048},
        "evaluators": [{"kind": "heldout"},
                       {"kind": "passkey", "lengths": [seq_len], "trials": 2},
                       {"kind": "loss_by_position", "seq_len": seq_len}],
    }


# ------------------------------------------------------------------------------------------ the curriculum

@dataclass
class Stage:
    seq_len: int
    steps: int
    run_dir: Path
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclass(kw_only=True)
class StageSection:
    seq_len: PositiveInt
    steps: PositiveInt
    overrides: List[Override] = dataclasses.field(default_factory=list)
    """key=value overrides of this stage's run (abf-ntk: the ABF stages' RoPE, then the NTK stages')."""


@dataclass(kw_only=True)
class CurriculumFile:
    """curriculum.yaml (written by `minicpm extend`); paths relative to the file."""

    stages: Annotated[List[StageSection], Accepts("a non-empty list of {seq_len, steps}", bool)]
    train: str = TRAIN_FILE
    """The training config every stage starts from."""
    start: str = "model"
    """The weights the first stage starts from."""
    runs: str = "runs"
    """Where the stages' run directories go."""
    micro_batch_tokens: Optional[PositiveInt] = None
    """Tokens per micro-batch at every length (default: the train config's)."""


def curriculum_stages(path: str | Path) -> tuple[CurriculumFile, list[Stage]]:
    """(the curriculum file, its stages with their run directories); one-line errors for a bad file."""
    path = Path(path)
    data = read_spec(path, CurriculumFile, what="curriculum file")
    runs = path.parent / data.runs
    return data, [Stage(s.seq_len, s.steps, runs / f"stage{i + 1}-seq{s.seq_len}", list(s.overrides))
                  for i, s in enumerate(data.stages)]


def stage_config(path: Path, data: CurriculumFile, stage: Stage, start: Path, overrides: Sequence[str] = ()):
    """The TrainConfig of one stage: the curriculum's train config with the stage's length, steps, micro-batch
    (micro_batch_tokens / seq_len sequences), run directory and weights-only start."""
    from minicpm.train.config import load_config, validate

    # the stage's length first: a stage's model.max_position_embeddings (abf-ntk's ABF stages) may lie below the
    # train config's full length
    base = load_config(path.parent / data.train, [f"batch.seq_len={stage.seq_len}", *stage.overrides, *overrides])
    micro_tokens = data.micro_batch_tokens or base.batch.micro_batch_size * base.batch.seq_len
    sequences = base.batch.tokens_per_step // stage.seq_len
    micro = max(1, min(sequences, micro_tokens // stage.seq_len))
    while sequences % micro:
        micro -= 1
    schedule = dataclasses.replace(base.schedule, total_steps=stage.steps,
                                   warmup_steps=min(base.schedule.warmup_steps, stage.steps))
    if schedule.kind == "wsd" and schedule.decay_start is None:
        schedule = dataclasses.replace(schedule, decay_steps=max(1, stage.steps // 10))
    evaluators = []
    for spec in base.evaluators:
        spec = dict(spec)
        if spec.get("kind") == "loss_by_position":
            spec["seq_len"] = stage.seq_len
        elif spec.get("kind") == "passkey":
            spec["lengths"] = [stage.seq_len]
        evaluators.append(spec)
    cfg = dataclasses.replace(
        base, batch=dataclasses.replace(base.batch, seq_len=stage.seq_len, micro_batch_size=micro),
        schedule=schedule, evaluators=evaluators,
        run=dataclasses.replace(base.run, out_dir=str(stage.run_dir), init_weights_from=str(start),
                                checkpoint_every=stage.steps))
    validate(cfg)
    return cfg


def run_curriculum(path: str | Path, overrides: Sequence[str] = (), *, data_sources=None) -> list:
    """Train the curriculum's stages in order; a finished stage (its last checkpoint at its last step) is skipped,
    a started one resumed, so that an interrupted curriculum continues where it stopped. `data_sources` (tests) maps
    a stage index to an in-memory DataSource. Returns the TrainResult of each stage run now."""
    from minicpm.rundir import RunDir, checkpoint_step
    from minicpm.train.loop import train

    path = Path(path).resolve()
    data, stages = curriculum_stages(path)
    start = path.parent / data.start
    results = []
    for i, stage in enumerate(stages):
        run = RunDir(stage.run_dir)
        latest = run.latest_checkpoint()
        if latest is not None and checkpoint_step(latest) == stage.steps:
            start = latest
            continue
        cfg = stage_config(path, data, stage, start, overrides)
        print(f"minicpm curriculum: stage {i + 1}/{len(stages)}: {stage.seq_len} tokens, {stage.steps} steps, "
              f"from {start}", flush=True)
        result = train(cfg, resume=run.has_started(), data=None if data_sources is None else data_sources(i, cfg))
        results.append(result)
        start = result.checkpoint
    return results
