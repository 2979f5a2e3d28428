"""Reading checkpoints safely: file digests and manifests, the trainer-state schema, safe DCP metadata, which
checkpoint verifies (verify.py) and a checkpoint's full weights in any layout (weights.py)."""
