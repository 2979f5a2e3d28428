"""Fault injection, from one run (issue 17): random SIGKILLs of training, of decay branches, of `minicpm prepare` and
of a `minicpm sweep` (its whole process group: the sweep, its fork server and the trials training), each resumed or
rerun and compared byte for byte with an uninterrupted reference; every checkpoint file corrupted in
every way (truncate, flip bytes, delete, garbage JSON) plus a bad `latest` pointer, each classified as a fallback to
an older checkpoint, a one-line refusal, or silent; what a resume trusts edited by hand (issue 26: the trainer
state's step, tokens and manifest, the run's config); every command that writes a directory pointed at its own
input or at a directory holding something, and the last bad inputs, each counted as refused in one line, an input
destroyed, an internal error, or a leftover; a full disk (ENOSPC injected into the checkpoint writer) and a
second trainer on the same run directory. Every command is the real CLI (a subprocess where it is killed; resumes and
corruption cases call cli.main in this process, which saves an interpreter start each), on one thread, so that a resumed run can
match bitwise; a Python traceback (or the CLI's `internal error` line) anywhere is counted.

    python benchmarks/faults.py            # 20 kills (6 training, 5 decay, 4 prepare, 5 sweep), about 6-8 min on 2 cores
    python benchmarks/faults.py --quick    # 6 kills (3 training, 1 decay, 1 prepare, 1 sweep), about 3 min
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's minicpm, in this process and (PYTHONPATH) in its subprocesses
TIMING_KEYS = ("tokens_per_s", "mfu")
TOTAL_STEPS, DECAY_FROM, DECAY_STEPS = 24, 12, 8
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega value index count total "
         "return yield import class def self print range list dict").split()


@dataclass
class Tally:
    """What the suite saw."""
    kills: dict[str, list[bool]] = field(default_factory=dict)  # kind -> survived bit-identically, per kill
    corruption: dict[str, str] = field(default_factory=dict)    # case -> fallback | one line | silent | traceback
    tracebacks: int = 0
    full_disk: dict[str, bool] = field(default_factory=dict)
    second_writer_refused: bool | None = None
    sweeps_interrupted: int = 0  # sweep kills that left a trial mid-run (the resume said it re-ran one)
    commands: int = 0
    tampering: dict[str, str] = field(default_factory=dict)  # case -> fallback | one line | warned | silent | ...
    outputs: dict[str, str] = field(default_factory=dict)  # case -> refused | input destroyed | leftover | ...
    bad_input: dict[str, str] = field(default_factory=dict)  # case -> one line | internal error | leftover | ...


def env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path, MINICPM_DEBUG="0")


def minicpm(tally: Tally, *args, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "minicpm", *map(str, args)], cwd=cwd, env=env(),
                            capture_output=True, text=True, timeout=600)
    tally.commands += 1
    tally.tracebacks += result.stderr.count("Traceback")
    if check and result.returncode != 0:
        raise SystemExit(f"minicpm {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def minicpm_here(tally: Tally, *args) -> subprocess.CompletedProcess:
    """cli.main in this process (on one thread, as the subprocesses): no interpreter start per case. An exception
    escaping the CLI's one-line handling would print `internal error` and exit 1 (counted as a traceback)."""
    import contextlib
    import io

    import torch

    from minicpm import cli

    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    tally.commands += 1
    tally.tracebacks += err.getvalue().count("Traceback") + err.getvalue().count("internal error")
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_fingerprint(run: Path) -> str:
    """The final weights and the metrics (timing removed) of a finished run."""
    h = hashlib.sha256()
    latest = run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()
    h.update((latest / "model.safetensors").read_bytes())
    h.update((latest / "optimizer.pt").read_bytes())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
        h.update(json.dumps(record, sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ setup

def write_corpus(directory: Path, documents: int, seed: int) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        lines = [f"    {a} = {b}({c}, {rng.randint(0, 9)})" for a, b, c in
                 (rng.sample(WORDS, 3) for _ in range(rng.randint(4, 12)))]
        (directory / f"doc{i:05d}.txt").write_text("\n".join(lines) + "\n")
    return directory


def setup(work: Path, tally: Tally) -> Path:
    """A tokenizer, a prepared dataset and the recipe every training run uses."""
    write_corpus(work / "corpus", 400, seed=1)
    minicpm(tally, "tokenizer", "train", "corpus", "--vocab-size", 320, "--out", "tok", cwd=work, check=True)
    minicpm(tally, "prepare", "corpus", "--tokenizer", "tok", "--out", "data", "--workers", 1, cwd=work, check=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        model: {{preset: tiny}}
        data: {{stable: {{{work / 'data'}: 1.0}}, decay: {{{work / 'data'}: 1.0}}, tokenizer: {work / 'tok'}}}
        batch: {{seq_len: 32, tokens_per_step: 256, micro_batch_size: 4}}
        schedule: {{total_steps: {TOTAL_STEPS}, warmup_steps: 2, decay_start: {TOTAL_STEPS - 4}}}
        run: {{dtype: fp32, progress: false, device: cpu, checkpoint_every: 2, log_every: 1, eval_every: 0,
               keep_last: 0}}
        """))
    return recipe


# ------------------------------------------------------------------------------------------ kills

def kill_at_step(args: list, cwd: Path, step: int, rng: random.Random, tally: Tally) -> None:
    """Start `minicpm ARGS`, SIGKILL it a random moment (0-60 ms) after it logs `step` (or when it ends)."""
    proc = subprocess.Popen([sys.executable, "-m", "minicpm", *map(str, args)], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tally.commands += 1
    for line in proc.stdout:
        if line.startswith(f"step {step} "):
            time.sleep(rng.uniform(0, 0.06))
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tally.tracebacks += proc.stderr.read().count("Traceback")


def kill_training(work: Path, recipe: Path, n: int, rng: random.Random, tally: Tally, reference: str) -> None:
    for i in range(n):
        out = work / f"killed_train_{i}"
        kill_at_step(["train", recipe, "--out", out], work, rng.randrange(1, TOTAL_STEPS), rng, tally)
        minicpm_here(tally, "train", recipe, "--out", out, "--resume")
        tally.kills.setdefault("training", []).append(_fingerprint_or_none(out) == reference)
        shutil.rmtree(out, ignore_errors=True)


def kill_decay(work: Path, source: Path, n: int, rng: random.Random, tally: Tally, reference: str) -> None:
    for i in range(n):
        out = work / f"killed_decay_{i}"
        branch = ["train", "--from", source, "--decay-steps", DECAY_STEPS, "--out", out]
        kill_at_step(branch, work, DECAY_FROM + rng.randrange(1, DECAY_STEPS), rng, tally)
        minicpm_here(tally, *branch, "--resume")
        tally.kills.setdefault("decay branch", []).append(_fingerprint_or_none(out) == reference)
        shutil.rmtree(out, ignore_errors=True)


def kill_prepare(work: Path, n: int, rng: random.Random, tally: Tally, reference: str, seconds: float) -> None:
    command = ["prepare", "big", "--tokenizer", "tok", "--workers", 1, "--shard-tokens", 20000]
    for i in range(n):
        out = work / f"killed_prepare_{i}"
        proc = subprocess.Popen([sys.executable, "-m", "minicpm", *map(str, command), "--out", str(out)], cwd=work,
                                env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tally.commands += 1
        time.sleep(rng.uniform(0.3, seconds))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tally.tracebacks += proc.stderr.read().count("Traceback")
        minicpm(tally, *command, "--out", out, "--overwrite", cwd=work)
        tally.kills.setdefault("prepare", []).append(out.is_dir() and tree_digest(out) == reference)
        shutil.rmtree(out, ignore_errors=True)


SWEEP_GRID = [0.002, 0.004, 0.008, 0.016]  # optim.lr: 4 trials of the same tiny recipe, 2 at a time


def write_sweep_spec(work: Path, recipe: Path, grid: list[float] = SWEEP_GRID) -> Path:
    spec = work / "sweep.yaml"
    spec.write_text(f"base: {{config: {recipe}}}\nspace: {{optim.lr: {grid}}}\nsampler: grid\n"
                    f"metric: loss\nworkers: 2\nthreads: 1\n")
    return spec


def sweep_outcome(out: Path) -> dict | None:
    """Per trial (by its optim.lr): its trials.csv state, its metric, and its run directory's fingerprint."""
    from minicpm.sweep.sweep import read_trials_csv

    try:
        rows = read_trials_csv(out / "trials.csv")
    except OSError:
        return None
    return {row["optim.lr"]: (row["number"], row["state"], row["loss"], row["error"],
                              _fingerprint_or_none(out / "runs" / Path(row["run_dir"]).name))
            for row in rows}


def _trial_log_tracebacks(out: Path) -> int:
    return sum(log.read_text(errors="replace").count("Traceback") for log in (out / "runs").glob("*/job.log"))


def kill_sweep(work: Path, recipe: Path, n: int, rng: random.Random, tally: Tally, reference: dict,
               grid: list[float] = SWEEP_GRID) -> None:
    """Start the sweep, SIGKILL its process group (the sweep, the fork server, the trials training) after a random
    trial start or finish plus 0-1.5 s, run the same command again to resume, and compare with the reference."""
    spec = write_sweep_spec(work, recipe, grid)
    events = 2 * len(grid)  # a start line and a result line per trial
    for i in range(n):
        out = work / f"killed_sweep_{i}"
        proc = subprocess.Popen([sys.executable, "-m", "minicpm", "sweep", str(spec), "--out", str(out)], cwd=work,
                                env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        tally.commands += 1
        kill_after, seen = rng.randrange(1, events), 0
        for line in proc.stdout:
            seen += line.startswith("trial ")
            if seen >= kill_after:
                time.sleep(rng.uniform(0, 1.5))
                break
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        tally.tracebacks += proc.stderr.read().count("Traceback")
        resumed = minicpm(tally, "sweep", spec, "--out", out, cwd=work)
        tally.sweeps_interrupted += "re-running interrupted trial" in resumed.stdout
        tally.tracebacks += _trial_log_tracebacks(out)
        tally.kills.setdefault("sweep (process group)", []).append(sweep_outcome(out) == reference)
        shutil.rmtree(out, ignore_errors=True)


def _fingerprint_or_none(run: Path) -> str | None:
    try:
        return run_fingerprint(run)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ corruption

def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(0, p.stat().st_size // 2)])


def flip_bytes(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for offset in (len(data) // 3, len(data) - 9):  # a byte in the middle and one near the end
        data[offset] ^= 0x5A
    p.write_bytes(bytes(data))


def garbage_json(p: Path) -> None:
    p.write_text('{"step": [1, 2,, garbage')


DAMAGE = {"truncate": truncate, "flip bytes": flip_bytes, "delete": Path.unlink, "garbage JSON": garbage_json}


def corruption(work: Path, recipe: Path, finished: Path, tally: Tally, reference: str) -> None:
    """Damage one file of the newest checkpoint (or the pointer) of a finished run, then resume it: the newest
    checkpoint that verifies must be used (and the run end bit-identical), or the command refuse in one line."""
    newest = finished / "checkpoints" / (finished / "checkpoints/latest").read_text().strip()
    files = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())
    cases = [(name, how) for name in files for how in DAMAGE]
    cases += [("latest", "bad pointer"), ("latest", "pointer to a missing step"), ("latest", "garbage bytes")]
    for name, how in cases:
        copy = work / "corrupt"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(finished, copy)
        if name == "latest":
            pointer = copy / "checkpoints/latest"
            pointer.write_bytes({"bad pointer": b"../../etc/passwd\n", "pointer to a missing step": b"step_00099999\n",
                                 "garbage bytes": b"\xff\xfe\x00junk"}[how])
        else:
            DAMAGE[how](copy / "checkpoints" / newest.name / name)
        result = minicpm_here(tally, "train", recipe, "--out", copy, "--resume")
        tally.corruption[f"{name}: {how}"] = classify(result, copy, reference)
    shutil.rmtree(work / "corrupt", ignore_errors=True)


def classify(result: subprocess.CompletedProcess, run: Path, reference: str) -> str:
    if "Traceback" in result.stderr or "internal error" in result.stderr:
        return "traceback"
    if result.returncode != 0:
        return "one line" if result.stderr.strip().count("\n") == 0 else "several lines"
    if "warning:" in result.stderr and _fingerprint_or_none(run) == reference:
        return "fallback"
    if "warning:" in result.stderr and "no file manifest" in result.stderr:
        return "warned"  # trusted as a checkpoint from before manifests is, the user told which
    return "silent"


# ------------------------------------------------------------------------------------------ what a resume trusts

def edit_state(checkpoint: Path, **changes) -> None:
    """Rewrite trainer_state.json as a hand edit would (a value of None deletes the key)."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps({k: v for k, v in state.items() if v is not None}, indent=1))


def tampering(work: Path, recipe: Path, finished: Path, tally: Tally, reference: str) -> None:
    """Edit what a resume trusts but no file digest covered before issue 26 (the trainer state's step, tokens and
    manifest; the run's config), then resume: an edited state must be caught like a damaged file (the previous
    checkpoint used), a checkpoint stripped of its manifest trusted only with a warning naming it (refused under
    --strict), a changed config refused in one line that leaves config.yaml as it was."""
    newest = finished / "checkpoints" / (finished / "checkpoints/latest").read_text().strip()
    state = json.loads((newest / "trainer_state.json").read_text())
    cases = {
        "step - 1": lambda c: edit_state(c, step=state["step"] - 1),
        "tokens + 1": lambda c: edit_state(c, tokens=state["tokens"] + 1),
        "manifest removed": lambda c: edit_state(c, files=None),
        "manifest and digest removed, weights flipped": lambda c: (edit_state(c, files=None, state_sha256=None),
                                                                   flip_bytes(c / "model.safetensors")),
    }
    copy = work / "tamper"
    for name, damage in cases.items():
        for strict in ((), ("--strict",)) if "digest removed" in name else ((),):
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(finished, copy)
            damage(copy / "checkpoints" / newest.name)
            result = minicpm_here(tally, "train", recipe, "--out", copy, "--resume", *strict)
            tally.tampering[f"trainer_state.json: {name}{' (--strict)' if strict else ''}"] = \
                classify(result, copy, reference)
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "checkpoints" / newest.name)  # a resume with steps left to train
    (copy / "checkpoints/latest").unlink()
    recorded = (copy / "config.yaml").read_bytes()
    result = minicpm_here(tally, "train", recipe, "optim.lr=0.02", "--out", copy, "--resume")
    outcome = classify(result, copy, reference)
    if (copy / "config.yaml").read_bytes() != recorded:
        outcome = "silent"  # the recorded config was rewritten
    tally.tampering["config.yaml: optim.lr changed on --resume"] = outcome
    shutil.rmtree(copy, ignore_errors=True)


# ------------------------------------------------------------------------------------------ outputs and inputs

def tree_files(path: Path) -> dict[str, str]:
    """Every file under `path` (hidden ones included) and the SHA-256 of its bytes."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()} | \
        {p.relative_to(path).as_posix() + "/": "" for p in Path(path).rglob("*") if p.is_dir()}


def judge(result: subprocess.CompletedProcess, before: dict[str, str], after: dict[str, str]) -> str:
    """A refused command: one line and exit 2, every file as it was, nothing new."""
    if "Traceback" in result.stderr or "internal error" in result.stderr:
        return "internal error"
    if any(before.get(name) != digest for name, digest in after.items() if name in before) or set(before) - set(after):
        return "input destroyed"
    if set(after) - set(before):
        return "leftover: " + sorted(set(after) - set(before))[0]
    if result.returncode == 0:
        return "accepted"
    return "one line" if result.returncode == 2 and result.stderr.strip().count("\n") == 0 else "several lines"


def outputs(work: Path, finished: Path, tally: Tally) -> None:
    """Every command that writes a directory, pointed at its own input (the input itself, a directory inside it, one
    that contains it) or at a directory that holds something: each must refuse in one line, --overwrite or not, and
    leave every file as it was."""
    scene = work / "outputs"
    shutil.rmtree(scene, ignore_errors=True)
    scene.mkdir()
    run = Path(shutil.copytree(finished, scene / "run"))
    checkpoint = run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()
    tok = Path(shutil.copytree(work / "tok", scene / "tok"))
    corpus = Path(shutil.copytree(work / "corpus", scene / "corpus"))
    (scene / "pairs").mkdir()
    pairs = scene / "pairs/pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"x = {i}", "chosen": " alpha beta", "rejected": " gamma"}) + "\n"
                             for i in range(8)))
    (scene / "notes").mkdir()
    (scene / "notes/notes.txt").write_text("mine")
    cases = {
        "export --to llama CK CK": ("export", checkpoint, checkpoint, "--to", "llama"),
        "export --to minicpm CK CK/sub": ("export", checkpoint, checkpoint / "sub", "--to", "minicpm"),
        "export --to llama CK RUN (contains CK)": ("export", checkpoint, run, "--to", "llama"),
        "export --to gguf CK CK (CK/model.gguf)": ("export", checkpoint, checkpoint, "--to", "gguf"),
        "export --to llama CK NOTES (not empty)": ("export", checkpoint, scene / "notes", "--to", "llama"),
        "upcycle CK --out CK": ("upcycle", checkpoint, "--out", checkpoint, "--experts", 2, "--top-k", 1),
        "upcycle RUN --out RUN/moe": ("upcycle", run, "--out", run / "moe", "--experts", 2, "--top-k", 1),
        "import CK TOKDIR (not empty)": ("import", checkpoint, tok),
        "import CK CK": ("import", checkpoint, checkpoint),
        "init NOTES (not empty)": ("init", scene / "notes", "--preset", "tiny"),
        "extend CK --out RUN": ("extend", checkpoint, "--to-length", 64, "--method", "yarn", "--out", run),
        "prepare CORPUS --out CORPUS": ("prepare", corpus, "--tokenizer", tok, "--out", corpus, "--workers", 1),
        "prepare CORPUS --out CORPUS/data": ("prepare", corpus, "--tokenizer", tok, "--out", corpus / "data"),
        "prepare CORPUS --out TOKDIR": ("prepare", corpus, "--tokenizer", tok, "--out", tok, "--workers", 1),
        "dpo prepare PAIRS --out its directory": ("dpo", "prepare", pairs, "--out", pairs.parent, "--tokenizer", tok,
                                                  "--seq-len", 32),
    }
    for name, args in cases.items():
        # onto an input: refused with --overwrite too; a non-empty directory is what --overwrite replaces
        for overwrite in ((),) if "not empty" in name else ((), ("--overwrite",)):
            before = tree_files(scene)
            result = minicpm_here(tally, *args, *overwrite)
            tally.outputs[name + (" --overwrite" if overwrite else "")] = judge(result, before, tree_files(scene))
    shutil.rmtree(scene, ignore_errors=True)


def bad_input(work: Path, recipe: Path, finished: Path, tally: Tally) -> None:
    """Issue 26's last rough edges: each must be one line and exit 2, leaving nothing behind."""
    scene = work / "bad_input"
    shutil.rmtree(scene, ignore_errors=True)
    scene.mkdir()
    checkpoint = finished / "checkpoints" / (finished / "checkpoints/latest").read_text().strip()
    model = scene / "model"
    minicpm_here(tally, "export", checkpoint, model, "--to", "minicpm")
    nan_model = Path(shutil.copytree(model, scene / "nan_model"))
    from safetensors.torch import load_file, save_file

    weights = load_file(nan_model / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, nan_model / "model.safetensors", metadata={"format": "pt"})
    (scene / "binary.bin").write_bytes(bytes(range(256)))
    (scene / "list.yaml").write_text("model: [1, 2]\n")
    (scene / "inf.yaml").write_text(recipe.read_text() + "optim: {lr: .inf}\n")
    (scene / "prediction.json").write_text('{"kind": "nonsense"}')
    resumable = Path(shutil.copytree(finished, scene / "resumable"))
    (resumable / ".lock").unlink(missing_ok=True)
    out = scene / "out"
    cases = {
        "generate --max-new-tokens 10**11": ("generate", model, "--prompt", "x", "--max-new-tokens", 10**11),
        "dpo precompute-ref --batch-size 0": ("dpo", "precompute-ref", model, "--data", out, "--batch-size", 0),
        "dpo precompute-ref --dtype fp7": ("dpo", "precompute-ref", model, "--data", out, "--dtype", "fp7"),
        "train optim.lr: .inf": ("train", scene / "inf.yaml", "--out", out),
        "train model: [1, 2]": ("train", scene / "list.yaml", "--out", out),
        "train schedule.decay_steps > total_steps": ("train", recipe, "schedule.decay_start=null",
                                                     f"schedule.decay_steps={10 * TOTAL_STEPS}", "--out", out),
        "import a model with NaN weights": ("import", nan_model, out),
        "info --seq-len -1": ("info", "tiny", "--seq-len", -1),
        "prepare --shard-tokens 0": ("prepare", work / "corpus", "--tokenizer", work / "tok", "--out", out,
                                     "--shard-tokens", 0),
        "windtunnel lr-transfer --log2-lr -3 -9": ("windtunnel", "lr-transfer", recipe, "--widths", 64, "--log2-lr",
                                                   -3, -9, "--out", out),
        "eval loss --text BINARY": ("eval", "loss", model, "--text", scene / "binary.bin"),
        "chat --temperature -1": ("chat", model, "--temperature", -1),
        "train --from a finished run (nothing to train)": ("train", "--from", finished, "--out", out),
        "train --resume with a changed config": ("train", recipe, "optim.lr=0.02", "--out", resumable, "--resume"),
        "report --prediction BAD": ("report", finished, "--out", out, "--prediction", scene / "prediction.json"),
    }
    for name, args in cases.items():
        before = tree_files(scene)
        result = minicpm_here(tally, *args)
        outcome = judge(result, before, tree_files(scene))
        if outcome == "one line" and name == "eval loss --text BINARY" and "binary.bin" not in result.stderr:
            outcome = "does not name the file"
        tally.bad_input[name] = outcome
    shutil.rmtree(scene, ignore_errors=True)


# ------------------------------------------------------------------------------------------ full disk, two writers

ENOSPC_RUN = """
import errno, sys, torch
from minicpm import cli
real = torch.save
def full_disk(obj, path, *args, **kwargs):
    if "step_{step:08d}" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real(obj, path, *args, **kwargs)
torch.save = full_disk
raise SystemExit(cli.main(sys.argv[1:]))
"""


def full_disk(work: Path, recipe: Path, tally: Tally, reference: str) -> None:
    from minicpm.checkpoints.verify import verify_checkpoint

    out = work / "full_disk"
    step = TOTAL_STEPS - 6
    result = subprocess.run([sys.executable, "-c", ENOSPC_RUN.format(step=step), "train", str(recipe), "--out",
                             str(out)], cwd=work, env=env(), capture_output=True, text=True, timeout=600)
    tally.commands += 1
    tally.tracebacks += result.stderr.count("Traceback")
    lines = result.stderr.strip().splitlines()
    tally.full_disk["one line, non-zero exit"] = (result.returncode == 2 and len(lines) == 1
                                                  and "no space left" in lines[0])
    previous = out / "checkpoints" / f"step_{step - 2:08d}"
    try:
        verify_checkpoint(previous)
        intact = (out / "checkpoints/latest").read_text().strip() == previous.name
    except Exception:  # noqa: BLE001
        intact = False
    tally.full_disk["previous checkpoint intact"] = intact and not any(
        p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    minicpm_here(tally, "train", recipe, "--out", out, "--resume")
    tally.full_disk["resume bit-identical"] = _fingerprint_or_none(out) == reference


def second_writer(work: Path, recipe: Path, tally: Tally) -> None:
    out = work / "two_writers"
    long_run = ["schedule.total_steps=1000000", "schedule.decay_start=999990"]  # still training when the second comes
    first = subprocess.Popen([sys.executable, "-m", "minicpm", "train", str(recipe), *long_run, "--out", str(out)],
                             cwd=work, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tally.commands += 1
    for line in first.stdout:
        if line.startswith("step 1 "):
            break
    second = minicpm(tally, "train", recipe, *long_run, "--out", out, "--resume", cwd=work)
    still_running = first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    tally.second_writer_refused = still_running and second.returncode == 2 and "another process" in second.stderr


# ------------------------------------------------------------------------------------------ the run

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 kills instead of --kills")
    parser.add_argument("--kills", type=int, default=20, help="random SIGKILLs in all (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="kill timing seed (default: random)")
    args = parser.parse_args()
    kills = 6 if args.quick else args.kills
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)
    tally = Tally()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="minicpm-faults-"))
    try:
        recipe = setup(work, tally)
        minicpm(tally, "train", recipe, "--out", "ref", cwd=work, check=True)
        train_ref = run_fingerprint(work / "ref")
        source = work / "ref/checkpoints" / f"step_{DECAY_FROM:08d}"
        minicpm(tally, "train", "--from", source, "--decay-steps", DECAY_STEPS, "--out", "decay_ref", cwd=work,
                check=True)
        decay_ref = run_fingerprint(work / "decay_ref")
        write_corpus(work / "big", 3000, seed=2)
        t0 = time.perf_counter()
        minicpm(tally, "prepare", "big", "--tokenizer", "tok", "--workers", 1, "--shard-tokens", 20000, "--out",
                "prepare_ref", cwd=work, check=True)
        prepare_seconds = time.perf_counter() - t0
        prepare_ref = tree_digest(work / "prepare_ref")

        minicpm(tally, "sweep", write_sweep_spec(work, recipe), "--out", "sweep_ref", cwd=work, check=True)
        tally.tracebacks += _trial_log_tracebacks(work / "sweep_ref")
        sweep_ref = sweep_outcome(work / "sweep_ref")
        if not sweep_ref or {state for _, state, *_ in sweep_ref.values()} != {"complete"}:
            raise SystemExit(f"the reference sweep did not complete every trial: {sweep_ref}")

        n_decay, n_sweep, n_prepare = max(1, kills // 4), max(1, kills // 4), max(1, kills // 5)
        kill_training(work, recipe, max(1, kills - n_decay - n_sweep - n_prepare), rng, tally, train_ref)
        kill_decay(work, source, n_decay, rng, tally, decay_ref)
        kill_prepare(work, n_prepare, rng, tally, prepare_ref, prepare_seconds)
        kill_sweep(work, recipe, n_sweep, rng, tally, sweep_ref)
        corruption(work, recipe, work / "ref", tally, train_ref)
        tampering(work, recipe, work / "ref", tally, train_ref)
        outputs(work, work / "ref", tally)
        bad_input(work, recipe, work / "ref", tally)
        full_disk(work, recipe, tally, train_ref)
        second_writer(work, recipe, tally)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(tally, seed, time.perf_counter() - started)


def report(tally: Tally, seed: int, seconds: float) -> None:
    print(f"\nfault injection: {tally.commands} CLI processes, seed {seed}, {seconds:.0f} s\n")
    print(f"{'figure':<60} {'result':>12}")
    for kind, survived in tally.kills.items():
        print(f"{'SIGKILLs of ' + kind + ' survived bit-identically':<60} {sum(survived):>5} of {len(survived):<4}")
    if "sweep (process group)" in tally.kills:
        print(f"{'  of which: left a trial mid-run (re-run on resume)':<60} {tally.sweeps_interrupted:>5}")
    outcomes = list(tally.corruption.values())
    caught = sum(o in ("fallback", "one line") for o in outcomes)
    print(f"{'corruption cases caught (fallback or one line)':<60} {caught:>5} of {len(outcomes):<4}")
    print(f"{'  of which: fallback to an older checkpoint':<60} {outcomes.count('fallback'):>5}")
    print(f"{'  of which: refused in one line':<60} {outcomes.count('one line'):>5}")
    print(f"{'  silent':<60} {outcomes.count('silent'):>5}")
    for check, ok in tally.full_disk.items():
        print(f"{'full disk (ENOSPC injected): ' + check:<60} {'yes' if ok else 'NO':>12}")
    print(f"{'second trainer on one run directory refused':<60} {'yes' if tally.second_writer_refused else 'NO':>12}")
    tamper = list(tally.tampering.values())
    print(f"{'state or config tampering caught (fallback or one line)':<60} "
          f"{sum(o in ('fallback', 'one line') for o in tamper):>5} of {len(tamper):<4}")
    print(f"{'  of which: no manifest: trusted, with a warning naming it':<60} {tamper.count('warned'):>5}")
    print(f"{'silent corruptions (corruption and tampering)':<60} {(outcomes + tamper).count('silent'):>12}")
    refused = [*tally.outputs.values(), *tally.bad_input.values()]
    print(f"{'outputs onto an input or a full directory refused (1 line)':<60} "
          f"{list(tally.outputs.values()).count('one line'):>5} of {len(tally.outputs):<4}")
    print(f"{'bad inputs (issue 26) refused in one line':<60} "
          f"{list(tally.bad_input.values()).count('one line'):>5} of {len(tally.bad_input):<4}")
    print(f"{'inputs destroyed':<60} {refused.count('input destroyed'):>12}")
    print(f"{'leftovers after a refusal':<60} {sum(o.startswith('leftover') for o in refused):>12}")
    print(f"{'Python tracebacks and internal errors':<60} {tally.tracebacks:>12}")
    bad = {case: o for case, o in tally.corruption.items() if o not in ("fallback", "one line")}
    bad |= {case: o for case, o in tally.tampering.items() if o not in ("fallback", "one line", "warned")}
    bad |= {case: o for case, o in (tally.outputs | tally.bad_input).items() if o != "one line"}
    for case, outcome in bad.items():
        print(f"  not caught: {case} -> {outcome}")


if __name__ == "__main__":
    main()
