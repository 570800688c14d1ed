"""``python -m gluon_ft`` is the ``gluon-ft`` command."""

from gluon_ft.cli import main

raise SystemExit(main())
