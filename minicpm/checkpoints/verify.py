"""Which checkpoints can be trusted: a checkpoint verifies when its trainer_state.json passes its schema, matches
its own digest (state_sha256) and every other file matches the SHA-256 manifest written last into it
(minicpm/checkpoints/integrity.py); a resume, a branch or a weights-only start takes the newest one that verifies,
and says which it skipped and why. A checkpoint without manifest or digest (written before them, or stripped of
them) is trusted with a warning naming it, or refused when `strict` (train --strict, run.strict_checkpoints)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from minicpm.checkpoints.integrity import STATE_DIGEST, state_digest, verify_digests
from minicpm.checkpoints.state_schema import check_trainer_state
from minicpm.errors import MiniCPMError
from minicpm.files import read_json_object
from minicpm.rundir import (SHARDS_DIR, STATE_FILE, WEIGHTS_FILE, RunDir, checkpoint_step, has_weights, is_complete,
                            resolve_checkpoint, resolve_weights)


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """trainer_state.json, checked field by field (state_schema); its file manifest is not verified here."""
    path = Path(checkpoint) / STATE_FILE
    return check_trainer_state(read_json_object(path, missing="; not a complete checkpoint"), path)


def verify_checkpoint(checkpoint: str | Path, *, strict: bool = False, warn=None) -> dict[str, Any]:
    """The checked trainer state of a checkpoint whose trainer_state.json matches its digest and whose every other
    file matches the SHA-256 manifest in it (`files`, written last); the first problem is one MiniCPMError naming
    the file. A checkpoint lacking the manifest or the digest is only checked for completeness, and said so
    through warn(message) (default: a line on stderr), or refused when `strict`."""
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    path = checkpoint / STATE_FILE
    if STATE_DIGEST in state and state[STATE_DIGEST] != state_digest(state):
        raise MiniCPMError(f"{path}: its contents differ from its {STATE_DIGEST} (the file was edited or is corrupt)")
    if "files" in state:
        verify_digests(checkpoint, state["files"], source=f"{path}: files")
    if not is_complete(checkpoint):
        raise MiniCPMError(f"{checkpoint}: incomplete (no {WEIGHTS_FILE} or {SHARDS_DIR}/.metadata)")
    missing = [what for key, what in (("files", "file manifest (files)"), (STATE_DIGEST, f"digest ({STATE_DIGEST})"))
               if key not in state]
    if missing:
        unchecked = "none of its files" if "files" not in state else "its trainer state"
        problem = f"{path}: no {' and no '.join(missing)}, so {unchecked} can be verified"
        if strict:
            raise MiniCPMError(f"{problem}; refused (strict: run.strict_checkpoints / --strict)")
        (warn or warn_on_stderr)(f"{problem}; trusting it unverified (--strict refuses it)")
    return state


def warn_on_stderr(message: str) -> None:
    """A warning line on stderr (rank 0 alone under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def newest_verified(run: RunDir, warn=None, *, strict: bool = False) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint a resume (or a branch from a run directory) starts from: the one `latest` names if it
    verifies, else the newest that does. Each one skipped is reported through warn(message); (None, None) if the
    run has no checkpoint directories at all; one MiniCPMError if it has some and none verifies. `strict`: one
    without a manifest does not verify (verify_checkpoint)."""
    skipped = warn or (lambda message: None)
    pointed, problem = run.latest_pointer()
    if problem:
        skipped(f"{problem}; looking for the newest checkpoint that verifies")
    candidates = [pointed] if pointed else []
    candidates += [p for p in run.step_directories() if p != pointed]
    failures = []
    for checkpoint in candidates:
        try:
            return checkpoint, verify_checkpoint(checkpoint, strict=strict, warn=warn)
        except MiniCPMError as e:
            failures.append(str(e))
            skipped(f"skipping checkpoint {checkpoint.name}: {e}")
    if failures:
        raise MiniCPMError(f"{run.checkpoints_dir}: none of its {len(failures)} checkpoint(s) verifies "
                           f"(newest: {failures[0]})")
    return None, None


def resolve_verified(path: str | Path, warn=None, *, strict: bool = False) -> tuple[Path, dict[str, Any]]:
    """A checkpoint named on the command line (`--from`): a checkpoint directory must verify itself (no fallback to
    another step); a run directory gives its newest checkpoint that verifies."""
    path = Path(path)
    if checkpoint_step(path) is not None or (path / STATE_FILE).exists():
        if not path.is_dir():
            raise MiniCPMError(f"{path}: no such checkpoint directory")
        return path, verify_checkpoint(path, strict=strict, warn=warn)
    if RunDir(path).checkpoints_dir.is_dir():
        checkpoint, state = newest_verified(RunDir(path), warn, strict=strict)
        if checkpoint is None:
            raise MiniCPMError(f"{path}: the run has no complete checkpoint")
        return checkpoint, state
    checkpoint = resolve_checkpoint(path)  # its one-line errors for anything else
    return checkpoint, verify_checkpoint(checkpoint, strict=strict, warn=warn)


def resolve_verified_weights(path: str | Path, warn=None, *, strict: bool = False) -> Path:
    """The source of a weights-only start: a run directory gives its newest checkpoint that verifies; anything else
    resolves as resolve_weights does (checkpoints.weights.consolidate then verifies our checkpoints against their
    manifests)."""
    path = Path(path)
    if RunDir(path).checkpoints_dir.is_dir() and not has_weights(path):
        return resolve_verified(path, warn, strict=strict)[0]
    return resolve_weights(path)
