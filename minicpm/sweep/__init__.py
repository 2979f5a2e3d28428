"""Hyper-parameter sweeps whose trials are ordinary run directories (Optuna studies)."""
