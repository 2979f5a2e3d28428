"""`python -m minicpm ...` (what `torchrun -m minicpm` runs)."""

from minicpm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
