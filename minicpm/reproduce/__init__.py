"""`minicpm reproduce`: the paper's findings at CPU scale in one command (run.py is the entry point)."""
