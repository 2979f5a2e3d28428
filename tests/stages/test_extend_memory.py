"""The extension stage's memory check: selective activation checkpointing in the estimate, between keeping every
activation and recomputing whole blocks, and recommended when it is the lightest mode that fits."""

import pytest

from minicpm.errors import MiniCPMError
from minicpm.model.config import preset
from minicpm.stages.extend import check_memory, lightest_checkpointing, training_memory


def estimates(config, seq_len=32768):
    return {mode: training_memory(config, seq_len=seq_len, micro_batch_size=1, activation_checkpointing=mode)
            for mode in ("none", "selective", "block")}


def test_selective_keeps_less_than_everything_and_more_than_block_inputs():
    by_mode = estimates(preset("minicpm-1.2b"))
    assert by_mode["block"].activations < by_mode["selective"].activations < by_mode["none"].activations
    assert len({e.weights_and_optimizer for e in by_mode.values()}) == 1


def test_the_check_recommends_the_lightest_mode_that_fits():
    config = preset("minicpm-1.2b")
    by_mode = estimates(config)
    between = int((by_mode["selective"].total + by_mode["none"].total) / 2 / 0.9)  # selective fits, none does not
    assert lightest_checkpointing(config, seq_len=32768, micro_batch_size=1, memory=between) == "selective"
    with pytest.raises(MiniCPMError, match="--activation-checkpointing selective would fit") as error:
        check_memory(config, seq_len=32768, micro_batch_size=1, memory=between, where="a test device",
                     activation_checkpointing="none")
    assert "\n" not in str(error.value)
    assert lightest_checkpointing(config, seq_len=32768, micro_batch_size=1, memory=10**9) is None
