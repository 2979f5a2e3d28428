"""Reports of runs: plots and a self-contained HTML page (loss, bits per byte, dynamics, MoE routers)."""
