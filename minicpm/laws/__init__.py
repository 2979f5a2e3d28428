"""Scaling and loss-curve laws: fits, tables of runs they read, predictions, their reports and commands."""

BOOTSTRAP_RESAMPLES = 200
"""Resamples of runs behind every bootstrap interval (scaling fit, plan, the wind tunnel's batch-size law)."""
CONFIDENCE = 0.9
"""The level of those intervals."""
