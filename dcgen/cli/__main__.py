"""`python -m dcgen.cli` (torchrun uses it for multi-GPU fine-tuning)."""

from . import main

raise SystemExit(main())
