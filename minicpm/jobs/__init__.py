"""The one job engine: trainings run as child processes through a launcher (local, torchrun, Slurm)."""
