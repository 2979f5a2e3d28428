"""Scaling and loss-curve laws: fits, tables of runs they read, predictions, their reports and commands."""
