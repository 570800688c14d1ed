"""The parts a finished run trained and was tested on, read back from its ``split.json``.

Shared by the report (its test and val parts) and int8 calibration (its train part).
"""

from __future__ import annotations

import json
from pathlib import Path

from gluon_ft.data import splits
from gluon_ft.data.recordio import load_pack
from gluon_ft.errors import UsageError


def run_parts(run_dir: Path) -> splits.DatasetParts:
    """The parts a run trained and was tested on, from its ``split.json``.

    Raises
    ------
    UsageError
        The run has no readable ``split.json``, or its files are gone.
    """
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise UsageError(
            f"{run_dir} has no split.json (a run from before it was written): give the images "
            "to report on as --split DIR (DIR/<class>/*)."
        )
    try:
        record = json.loads(split_file.read_text())
        root = record["root"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{split_file} is not a split record: {err}") from None
    if record.get("layout") == splits.PACK:
        train, test = load_pack(root)
        return splits.DatasetParts(Path(root), splits.PACK, train, test)
    return splits.parts_from_record(root, record)
