"""`python -m hallm.entrypoints.cli` is the `hallm` command."""

from hallm.entrypoints.cli import main

raise SystemExit(main())
