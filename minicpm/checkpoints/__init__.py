"""What every reader of a checkpoint trusts: file digests and manifests, trainer-state schema, safe DCP metadata."""
