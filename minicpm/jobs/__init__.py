"""The one job engine: every training that runs in a process of its own (sweep trials, a campaign's stable runs
and decay branches, a schedule comparison's runs) is a Job (job.py) started by a launcher (launchers.py): local
child processes (local.py), torchrun jobs (torchrun.py) or Slurm jobs (slurm.py), each running the one child entry
point (child.py); pool.py runs many, each once it is ready."""
