"""From one checkpoint to the next stage: context extension, sparse upcycling to MoE."""
