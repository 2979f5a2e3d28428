"""The model wind tunnel (paper §3): μP coordinate check, LR transfer, hyper-parameter search, batch-size law."""
