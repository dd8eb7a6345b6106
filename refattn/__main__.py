"""``python -m refattn``: the same as the ``refattn`` command."""

from ._cli import main

raise SystemExit(main())
