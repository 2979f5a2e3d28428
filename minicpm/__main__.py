"""`python -m minicpm ...` (what `torchrun -m minicpm` runs)."""

from minicpm.cli import main

raise SystemExit(main())
