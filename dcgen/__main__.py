"""`python -m dcgen`: the `dcgen` command (also `python -m dcgen.cli`, which torchrun uses)."""

from dcgen.cli import main

raise SystemExit(main())
