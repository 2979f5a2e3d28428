"""Training configuration: typed dataclasses, YAML recipes, dotted overrides, one-line errors.

A config is data; the trainer builds objects from it in one place. minicpm/typed_config.py fills these dataclasses
from YAML and `a.b=c` overrides (OmegaConf's type and unknown-key checks, one-line errors); validate() adds the
checks across fields. Each field's docstring is its help text (shown by `minicpm train --help`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from minicpm.errors import MiniCPMError
from minicpm.files import write_atomic
from minicpm.model.config import ModelConfig, preset
from minicpm.optim.schedule import Schedule, resolve_schedule
from minicpm.typed_config import field_docs, load_typed, to_yaml


def _model_section_type() -> type:
    # Every ModelConfig field, optional, so `model.hidden_size=128` overrides the preset and a typo is an error.
    hints = typing.get_type_hints(ModelConfig)
    fields = [("preset", Optional[str], field(default=None))]
    fields += [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(ModelConfig)]
    cls = dataclasses.make_dataclass("ModelSection", fields)
    cls.__doc__ = "A preset name and/or ModelConfig fields that override it (null keeps the preset's value)."
    return cls


ModelSection = _model_section_type()


@dataclass
class DataConfig:
    """Token shard sets (made by `minicpm prepare`) and their weights, per training stage."""

    stable: Dict[str, float] = field(default_factory=dict)
    """Warmup/stable-stage mixture: {dataset_dir: weight}."""
    decay: Optional[Dict[str, float]] = None
    """Decay-stage mixture (paper section 5: high-quality data joins in the decay); null keeps the stable one."""
    tokenizer: Optional[str] = None
    """tokenizer.json the shards were made with; checked against every shard set; sets model.vocab_size."""
    eval_sequences: int = 64
    """Held-out sequences per dataset (validation split) in each evaluation; 0 disables evaluation."""
    packing: str = "concat"
    """How documents share a training row: concat (one stream, attention crosses document boundaries, as in the
    paper's pretraining) | document (each document attends only to itself, positions restart at its start, and no
    label crosses a boundary: SFT and leak-free pretraining)."""


@dataclass
class OptimConfig:
    """AdamW over muP parameter groups (DESIGN section 3)."""

    lr: float = 0.01
    """Base learning rate (paper: 0.01); muP gives 2-D hidden weights lr/m, m = hidden_size/dim_model_base."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on 2-D weights (norm gains are not decayed)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    embedding_in_2d_group: bool = False
    """muP: false (classic muP) keeps the vocabulary matrices at the base lr and init std; true gives them the 2-D
    lr/m and init/sqrt(m) (the literal reading of paper Table 7, not width-stable in the coordinate check)."""
    mup_lr_scaling: bool = True
    """muP learning rates: true gives 2-D hidden weights lr/m; false gives every parameter the plain optim.lr
    (fine-tuning without muP groups: the paper's DPO, lr 1e-5)."""
    lr_from_source: bool = False
    """With run.init_weights_from one of our runs: set lr to the LR its last update was taken at (its optim.lr x its
    schedule at that checkpoint), so fine-tuning starts where the decay ended (the authors' SFT, OpenBMB/MiniCPM#40);
    from other weights (official HF) lr stays as given."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, a pure function of the step (see minicpm/optim/schedule.py)."""

    kind: str = "wsd"
    """wsd | cosine | constant."""
    total_steps: int = 1000
    """Optimizer steps in the run."""
    warmup_steps: int = 10
    """Linear warmup steps: step s < W uses (s+1)/W of the lr."""
    decay_steps: Optional[int] = None
    """wsd: steps of decay at the end of the run (null: 10% of total_steps, the paper's finding)."""
    decay_start: Optional[int] = None
    """wsd: step at which the decay starts (alternative to decay_steps; give one)."""
    decay: str = "exp"
    """wsd decay shape: exp (the paper's) | linear | cosine | 1-sqrt."""
    half_life: Optional[float] = None
    """exp decay half-life in steps (paper: 5000); null: decay_steps/5."""
    floor: Optional[float] = None
    """Lowest lr as a fraction of optim.lr; null: 0.1 for cosine (the paper's), 0 for wsd."""
    cosine_period: Optional[int] = None
    """cosine: steps from warmup end to the floor (null: total_steps); may differ from the run length."""

    def resolve(self) -> Schedule:
        return resolve_schedule(**dataclasses.asdict(self))


@dataclass
class RampStage:
    """One stage of the batch-size ramp (minicpm/train/batch_ramp.py)."""

    tokens_per_step: int = 0
    """This stage's global batch in tokens."""
    until_tokens: Optional[int] = None
    """The stage lasts until the run has seen this many tokens (a whole number of its steps)."""
    until_step: Optional[int] = None
    """Or until this optimizer step (give one of the two)."""


@dataclass
class BatchConfig:
    """Batch geometry; gradient accumulation is derived: tokens_per_step = seq_len·micro_batch_size·accum·ranks."""

    tokens_per_step: int = 65536
    """Tokens per optimizer step (the global batch)."""
    seq_len: int = 512
    """Tokens per training sequence."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on each process."""
    ramp: List[RampStage] = field(default_factory=list)
    """Batch-size ramp (paper: 2M then 4M tokens): [{until_tokens: T, tokens_per_step: B}, ...]; each stage's batch
    until T tokens (or until_step), then tokens_per_step. Steps stay the schedule's unit (see train/batch_ramp.py)."""


@dataclass
class RunConfig:
    """Where the run lives and how it reports."""

    out_dir: Optional[str] = None
    """Run directory (config.yaml, metrics.jsonl, checkpoints/); also --out."""
    seed: int = 0
    """Seed of the initialisation and the data order."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many steps (loss averaged over them)."""
    eval_every: int = 200
    """Run the evaluators every this many steps (and at the end); 0: only at the end."""
    checkpoint_every: int = 1000
    """Save a checkpoint every this many steps (and at the end); 0: only at the end."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted); 0 keeps all."""
    device: str = "auto"
    """auto | cpu | cuda."""
    dtype: str = "auto"
    """bf16: autocast matmuls to bfloat16 over fp32 master weights; fp32: no autocast; auto: bf16 on GPUs and on
    CPUs with native bf16 kernels (AVX-512, AMX), fp32 on others (AVX2 has none: bf16 there is ~60x slower)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a NaN/Inf loss or gradient (each is skipped)."""
    strict_checkpoints: bool = False
    """Refuse a checkpoint whose trainer_state.json holds no SHA-256 manifest or digest (written before them, or
    stripped of them) instead of trusting it with a warning; also `train --strict`."""
    tensorboard: bool = False
    """Also write TensorBoard events to RUN/tensorboard (needs the tensorboard extra)."""
    wandb: bool = False
    """Also log to Weights & Biases in RUN/wandb, offline unless WANDB_MODE says otherwise (`wandb sync` uploads
    it later; needs the wandb extra)."""
    dynamics: bool = False
    """Log the decay dynamics of paper §4.4 every step: cosine of consecutive gradients, update norm, directional
    derivatives D1, D2 and the curvature along the update (dynamics/* in metrics.jsonl; two extra copies of the
    weights in memory)."""
    progress: bool = True
    """Show a progress bar with ETA."""
    init_from: Optional[str] = None
    """Branch: checkpoint whose weights, optimizer, data position and step the run starts from (set by --from)."""
    init_weights_from: Optional[str] = None
    """Weights-only start: a checkpoint, run directory or official HF model directory whose weights the run starts
    from, at step 0 with a fresh optimizer and this run's own data, schedule and objective (SFT, DPO, upcycled MoE
    and context extension start this way). Null model.* fields are taken from its config.json."""
    prediction: Optional[str] = None
    """A plan's prediction (PLAN.yaml of `minicpm plan`, or its PLAN.prediction.json) carried while training: every
    evaluation logs the predicted loss and band at its tokens (eval/prediction/*) and warns on leaving the band."""
    plugins: List[str] = field(default_factory=list)
    """Python modules (dotted names, or .py files) imported before the run is built, to register objectives and
    evaluators of your own."""


@dataclass
class ParallelConfig:
    """Performance and parallelism switches, applied to the model from outside it."""

    compile: Union[bool, str] = "auto"
    """torch.compile each decoder block: true | false | auto (compile when the run is long enough to earn back the
    compile time on this device, train/distributed.py's COMPILE_COSTS; `minicpm train` says which and why)."""
    activation_checkpointing: str = "none"
    """none | block (recompute each decoder block in the backward) | selective (keep matmul and attention outputs,
    recompute the pointwise ops between them)."""
    loss_chunk_size: Optional[int] = None
    """Compute the cross-entropy over this many tokens at a time (saves the full logits); null: all at once."""
    fsdp_param_dtype: Optional[str] = None
    """Under several processes (FSDP2): dtype of the gathered parameters the blocks compute in (bf16 | fp32;
    gradients are reduced in fp32, the optimizer steps fp32 shards); null: run.dtype on GPU, fp32 on CPU."""


@dataclass
class ObjectiveConfig:
    """The training loss, built from the objective registry (minicpm/train/objectives.py)."""

    kind: str = "next_token"
    """Registered objective: next_token (pretraining and decay), or one a plugin registers."""
    aux_loss_weights: Dict[str, float] = field(default_factory=lambda: {"load_balance": 0.01, "router_z": 0.001})
    """Weight of each auxiliary loss the model reports (paper section 6: MoE load balance x 0.01; the router z-loss,
    reported only under model.router_z_loss, x 0.001 as ST-MoE)."""
    options: Dict[str, Any] = field(default_factory=dict)
    """The objective kind's own settings (each kind documents and checks its keys)."""
    balance_over: str = "step"
    """MoE balance loss E·Σ f·P: step (f counted over the whole optimizer step on all processes, global-batch
    balancing: the same loss for any accumulation and process count; costs one no-grad forward per step when
    accumulating) | micro_batch (f of each micro-batch on its own process, as Mixtral's code; free, but the loss
    depends on the micro-batch size)."""
    balance_loss: str = "per_layer"
    """MoE balance loss form: per_layer (Switch's E·Σ f·P in each layer, summed over layers: Fedus et al. 2021, the
    loss the paper's MiniCPM-MoE names) | pooled (f and P pooled over all layers first, transformers' Mixtral form,
    where imbalances of different layers cancel)."""


def _default_evaluators() -> list:
    return [{"kind": "heldout"}]


@dataclass
class TrainConfig:
    """A training run: pretraining, a decay, or a later stage (its objective, data and evaluators)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    evaluators: List[Dict[str, Any]] = field(default_factory=_default_evaluators)
    """Evaluations run every run.eval_every steps and at the end, each {kind, name?, every?, ...options} from the
    evaluator registry (minicpm/eval/evaluators.py); each writes eval/<name>/<metric> to metrics.jsonl."""


# ------------------------------------------------------------------------------------------ load / save

def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from an optional YAML file plus `key=value` overrides, checked and validated."""
    cfg = load_typed(TrainConfig, path, overrides, sections="config sections (data:, model:, optim:, ...)")
    validate(cfg)
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    return to_yaml(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML, atomically."""
    write_atomic(path, config_to_yaml(cfg))


RESUME_FREE_KEYS = frozenset({
    "run.out_dir", "run.progress", "run.keep_last", "run.checkpoint_every", "run.tensorboard", "run.wandb",
    "run.strict_checkpoints", "run.prediction",  # how a run reports and what it keeps: no number it computes
    "run.init_from", "run.init_weights_from",  # read at the first start only; a resume loads its own checkpoint
})


def config_differences(recorded: TrainConfig, current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{section.key: (recorded value, current value)} for every setting a resumed run would change (a section that
    is a list, as evaluators, compares whole); the keys of RESUME_FREE_KEYS change nothing a run computes."""
    old, new = dataclasses.asdict(recorded), dataclasses.asdict(current)
    changes = {}
    for section in new:
        before, after = old.get(section), new[section]
        if isinstance(before, dict) and isinstance(after, dict):
            pairs = {f"{section}.{key}": (before.get(key), after.get(key)) for key in sorted({*before, *after})}
        else:
            pairs = {section: (before, after)}
        changes.update({key: pair for key, pair in pairs.items() if pair[0] != pair[1] and key not in RESUME_FREE_KEYS})
    return changes


# ------------------------------------------------------------------------------------------ plugins and options

def import_plugins(plugins: list[str]) -> None:
    """Import each run.plugins entry (a dotted module name, or a .py file) so that it registers its objectives and
    evaluators; importing one twice does nothing."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin).resolve()
            name = f"minicpm_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
            if name in sys.modules:
                continue
            if not path.is_file():
                raise MiniCPMError(f"run.plugins: {plugin}: no such file")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise MiniCPMError(f"run.plugins: {plugin}: {type(e).__name__}: {e}") from e
            continue
        try:
            importlib.import_module(plugin)
        except ImportError as e:
            raise MiniCPMError(f"run.plugins: cannot import {plugin!r} ({e})") from None


# ------------------------------------------------------------------------------------------ validation

def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MiniCPMError(message)


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks OmegaConf cannot make; each error names the key."""
    for stage in ("stable", "decay"):
        mix = getattr(cfg.data, stage)
        if mix is None:
            continue
        for name, weight in mix.items():
            _check(weight > 0 and math.isfinite(weight),
                   f"data.{stage}: weight of {name!r} must be a positive number, got {weight}")
    _check(cfg.data.packing in ("concat", "document"),
           f"data.packing: expected concat or document, got {cfg.data.packing!r}")
    _check(cfg.data.eval_sequences >= 0, f"data.eval_sequences must be >= 0, got {cfg.data.eval_sequences}")
    for section in ("optim", "schedule"):  # .inf or .nan passes every comparison below, or fails steps later
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            _check(not isinstance(value, float) or math.isfinite(value),
                   f"{section}.{name} must be a finite number, got {value}")
    o = cfg.optim
    _check(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1/beta2 must be in [0, 1), got {o.beta1}, {o.beta2}")
    _check(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
    cfg.schedule.resolve()
    b = cfg.batch
    for name in ("tokens_per_step", "seq_len", "micro_batch_size"):
        _check(getattr(b, name) > 0, f"batch.{name} must be positive, got {getattr(b, name)}")
    _check(b.tokens_per_step % b.seq_len == 0,
           f"batch.tokens_per_step ({b.tokens_per_step}) must be a multiple of batch.seq_len ({b.seq_len})")
    if b.ramp:
        from minicpm.train.batch_ramp import batch_ramp

        batch_ramp(b)
    r = cfg.run
    for name in ("log_every",):
        _check(getattr(r, name) > 0, f"run.{name} must be positive, got {getattr(r, name)}")
    for name in ("eval_every", "checkpoint_every", "keep_last"):
        _check(getattr(r, name) >= 0, f"run.{name} must be >= 0, got {getattr(r, name)}")
    _check(r.max_bad_steps > 0, f"run.max_bad_steps must be positive, got {r.max_bad_steps}")
    _check(r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"),
           f"run.device: expected auto, cpu or cuda, got {r.device!r}")
    _check(r.dtype in ("auto", "bf16", "fp32"), f"run.dtype: expected auto, bf16 or fp32, got {r.dtype!r}")
    p = cfg.parallel
    _check(p.compile in (True, False, "auto"), f"parallel.compile: expected true, false or auto, got {p.compile!r}")
    _check(p.activation_checkpointing in ("none", "block", "selective"),
           f"parallel.activation_checkpointing: expected none, block or selective, got {p.activation_checkpointing!r}")
    _check(p.loss_chunk_size is None or p.loss_chunk_size > 0,
           f"parallel.loss_chunk_size must be positive or null, got {p.loss_chunk_size}")
    _check(p.fsdp_param_dtype in (None, "bf16", "fp32"),
           f"parallel.fsdp_param_dtype: expected bf16, fp32 or null, got {p.fsdp_param_dtype!r}")
    _check(not (r.init_from and r.init_weights_from),
           "run.init_from (--from: a branch with optimizer and data state) and run.init_weights_from (weights only) "
           "are two ways to start; give one")
    _check(cfg.objective.balance_over in ("step", "micro_batch"),
           f"objective.balance_over: expected step or micro_batch, got {cfg.objective.balance_over!r}")
    _check(cfg.objective.balance_loss in ("per_layer", "pooled"),
           f"objective.balance_loss: expected per_layer or pooled, got {cfg.objective.balance_loss!r}")
    for name, weight in cfg.objective.aux_loss_weights.items():
        _check(math.isfinite(weight) and weight >= 0,
               f"objective.aux_loss_weights.{name} must be a finite number >= 0, got {weight}")
    import_plugins(r.plugins)
    from minicpm.eval.evaluators import check_evaluator_specs
    from minicpm.train.objectives import check_objective

    check_objective(cfg.objective)
    check_evaluator_specs(cfg.evaluators)
    if not r.init_weights_from or _model_given(cfg):
        model_config(cfg)  # preset name and field values


def _model_given(cfg: TrainConfig) -> bool:
    return any(getattr(cfg.model, f.name) is not None for f in dataclasses.fields(cfg.model))


def model_config(cfg: TrainConfig, vocab_size: int | None = None, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig a run trains: the preset (or `base`, e.g. the config of the checkpoint a weights-only start
    reads) with the model.* overrides applied.

    vocab_size (the tokenizer's) fills model.vocab_size when the config leaves it null (a checkpoint's stays).
    """
    section = cfg.model
    from_checkpoint = base is not None
    if base is None:
        base = preset(section.preset) if section.preset else ModelConfig()
    overrides = {f.name: getattr(section, f.name) for f in dataclasses.fields(ModelConfig)
                 if getattr(section, f.name) is not None}
    if vocab_size is not None and "vocab_size" not in overrides and not from_checkpoint:
        overrides["vocab_size"] = vocab_size
    try:
        model = dataclasses.replace(base, **overrides)
    except MiniCPMError as e:
        raise MiniCPMError(str(e).replace("model config: ", "model.", 1)) from None
    if vocab_size is not None and model.vocab_size < vocab_size:
        raise MiniCPMError(f"model.vocab_size {model.vocab_size} is smaller than the tokenizer's vocabulary "
                           f"({vocab_size}, data.tokenizer): its ids would index past the embedding")
    if cfg.batch.seq_len > model.max_position_embeddings:
        raise MiniCPMError(f"batch.seq_len ({cfg.batch.seq_len}) exceeds model.max_position_embeddings "
                           f"({model.max_position_embeddings})")
    return model


def with_model(cfg: TrainConfig, model: ModelConfig) -> TrainConfig:
    """The config with every model.* field written out (what a run directory records)."""
    section = ModelSection(preset=cfg.model.preset, **dataclasses.asdict(model))
    return dataclasses.replace(cfg, model=section)


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's sequences are split across processes and micro-batches."""

    sequences: int
    """Sequences in the global batch."""
    per_rank: int
    """Sequences each process handles (its slice of the global batch)."""
    accumulation: int
    """Micro-batches each process accumulates per step."""


def batch_plan(batch: BatchConfig, world_size: int) -> BatchPlan:
    sequences = batch.tokens_per_step // batch.seq_len
    if sequences % world_size:
        raise MiniCPMError(f"batch.tokens_per_step gives {sequences} sequences of {batch.seq_len} tokens, "
                           f"not divisible over {world_size} processes")
    per_rank = sequences // world_size
    if per_rank % batch.micro_batch_size:
        raise MiniCPMError(f"batch.micro_batch_size ({batch.micro_batch_size}) must divide the {per_rank} "
                           f"sequences each of {world_size} process(es) handles per step "
                           f"(batch.tokens_per_step / batch.seq_len / processes)")
    return BatchPlan(sequences, per_rank, per_rank // batch.micro_batch_size)


# ------------------------------------------------------------------------------------------ help text

def describe_fields() -> str:
    """Every config key with its type, default and help, for `minicpm train --help`."""
    default = TrainConfig()
    lines = []
    model_docs = {"preset": "Named architecture (minicpm.model.config.PRESETS), e.g. tiny, proxy-9m, minicpm-1.2b.",
                  **field_docs(ModelConfig)}
    top = field_docs(TrainConfig)
    for section in dataclasses.fields(TrainConfig):
        value = getattr(default, section.name)
        if not dataclasses.is_dataclass(value):  # a list section (evaluators)
            lines.append(f"{section.name} = {json.dumps(value)}\n      {top.get(section.name, '')}")
            continue
        section_cls = type(value)
        docs = model_docs if section.name == "model" else field_docs(section_cls)
        lines.append(f"{section.name}: {section_cls.__doc__.strip().splitlines()[0]}")
        for f in dataclasses.fields(section_cls):
            value = getattr(getattr(default, section.name), f.name)
            shown = "null" if value is None else value
            lines.append(f"  {section.name}.{f.name} = {shown}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
