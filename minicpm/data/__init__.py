"""Training data: tokenizers, prepared token shards, mixtures, chat rows and preference pairs."""

IGNORE_INDEX = -100
"""The label of a position that is no target (a chat prompt, padding, a cross-document step): the batches put it
there and every loss skips it (PyTorch cross_entropy's ignore_index)."""
