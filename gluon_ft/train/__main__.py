"""``python -m gluon_ft.train`` is ``gluon-ft train``: the only file here that imports the CLI."""

import sys

from gluon_ft.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
