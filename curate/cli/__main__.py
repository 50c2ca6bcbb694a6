"""``python -m curate.cli``: the same command as ``curate``."""

from curate.cli import main

raise SystemExit(main())
