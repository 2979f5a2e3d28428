"""Where a fine-tuning run's learning rate starts (optim.lr_from_source): the LR its weights were last trained at.

The authors fine-tune from the end of the annealing at its learning rate: base LR 1e-2 -> 1e-3 in the decay, then
SFT 1e-3 -> 1e-4 (OpenBMB/MiniCPM#40, ShengdingHu; research/minicpm-paper.md §3.2). A source run whose decay ended
elsewhere (our 2.4B recipe's ends at ~3.1e-4) would otherwise restart at a higher LR than it left off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from minicpm.rundir import checkpoint_step, run_of


def lr_where_source_ended(checkpoint: str | Path) -> Optional[tuple[float, str]]:
    """(lr, how it was found) of the last update before `checkpoint`: its run's optim.lr x schedule(step - 1), from
    the config.yaml the run recorded; None when the checkpoint is not one of our runs' (official HF weights)."""
    from minicpm.train.config import load_config

    step = checkpoint_step(checkpoint)
    run = run_of(checkpoint)
    if step is None or step < 1 or not run.config_file.is_file():
        return None
    source = load_config(run.config_file)
    lr = source.optim.lr * source.schedule.resolve()(step - 1)
    return lr, f"{run.config_file}: optim.lr {source.optim.lr:g} x its schedule at step {step}"
