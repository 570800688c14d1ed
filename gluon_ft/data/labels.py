"""CSV labels: ``train --labels FILE.csv`` with ``--data DIR`` as the image root.

The file starts with a header row naming its columns (matched without regard to case or
surrounding spaces; other columns are ignored):

- ``image``: a path relative to DIR (an absolute path is accepted when it lies under DIR);
- ``labels``: one or more class names separated by ``--label-delim`` (a space by default);
- ``split`` (optional): ``train``, ``val`` or ``test``, which wins over split fractions.

A row that cannot be used is left out and named as a :class:`BadRow`: its file missing, of no
format Pillow decodes, or undecodable (:func:`gluon_ft.data.decode.load_image`); no labels; an
unknown split; a second row for an image that an earlier usable row has (the first is kept).
A file that cannot be used at all (unreadable, not UTF-8, a required column missing, no usable
row, fewer than two classes) is a :class:`~gluon_ft.errors.UsageError`. The classes are the
sorted names of the usable rows.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gluon_ft.data.decode import UnreadableImageError, image_extensions, load_image
from gluon_ft.errors import UsageError

IMAGE_COLUMN, LABELS_COLUMN, SPLIT_COLUMN = "image", "labels", "split"
SPLIT_NAMES = ("train", "val", "test")
# The problems of a row (BadRow.problem), in the order a row is checked: cheap checks first.
BAD_PATH = "bad path"
DUPLICATE = "duplicate row"
NO_LABELS = "no labels"
UNKNOWN_SPLIT = "unknown split"
MISSING_FILE = "missing file"
NOT_AN_IMAGE = "not an image file"
UNREADABLE = "unreadable image"


@dataclass(frozen=True)
class BadRow:
    """A row left out: its line in the file (the header is line 1), its image cell as written,
    the problem (one of this module's constants, e.g. :data:`MISSING_FILE`) and why."""

    line: int
    image: str
    problem: str
    detail: str = ""


def multi_hot(label_sets, num_classes: int) -> np.ndarray:
    """``(N, num_classes)`` float32 targets: 1 where item ``n`` has class ``c``, else 0."""
    targets = np.zeros((len(label_sets), num_classes), dtype=np.float32)
    for row, labels in enumerate(label_sets):
        targets[row, list(labels)] = 1.0
    return targets


@dataclass(frozen=True)
class MultiLabelSplit:
    """One part of a multi-label dataset: ``(path, label indices)`` items and the sorted class
    names; :class:`~gluon_ft.data.folders.ImageFolderSplit`'s interface, with
    :meth:`targets` in place of ``labels()``."""

    root: Path
    classes: tuple[str, ...]
    items: tuple[tuple[str, tuple[int, ...]], ...]

    def __len__(self) -> int:
        return len(self.items)

    def targets(self) -> np.ndarray:
        """The ``(N, C)`` multi-hot targets of the items, in order."""
        return multi_hot([labels for _, labels in self.items], len(self.classes))

    def load(self, index: int) -> Image.Image:
        """Decode item ``index`` as RGB.

        Raises
        ------
        UnreadableImageError
            The file cannot be used.
        """
        return load_image(self.items[index][0])


@dataclass(frozen=True)
class LabelTable:
    """The usable rows of a labels file, and the rows left out.

    Attributes
    ----------
    root : Path
        The image root (``--data DIR``), absolute.
    source : Path
        The labels file.
    classes : tuple of str
        The sorted class names of the usable rows.
    items : tuple of (str, tuple of int)
        ``(path under root, sorted label indices)`` of each usable row, in file order.
    split : tuple of str or None
        Each item's ``train``/``val``/``test`` from the split column; None without one.
    bad_rows : tuple of BadRow
        The rows left out, in file order.
    """

    root: Path
    source: Path
    classes: tuple[str, ...]
    items: tuple[tuple[str, tuple[int, ...]], ...]
    split: tuple[str, ...] | None
    bad_rows: tuple[BadRow, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def multi_label(self) -> bool:
        """Whether any usable row has two or more labels."""
        return any(len(labels) > 1 for _, labels in self.items)

    def targets(self) -> np.ndarray:
        """The ``(N, C)`` multi-hot targets of the items, in order."""
        return multi_hot([labels for _, labels in self.items], len(self.classes))

    def bad_counts(self) -> dict[str, int]:
        """``{problem: rows}`` of the rows left out."""
        return dict(Counter(bad.problem for bad in self.bad_rows))


def describe_bad_rows(bad_rows, shown: int = 10) -> str:
    """One sentence for people: how many rows were left out, why, and the first ``shown``.

    ``3 row(s) left out (2 missing file, 1 no labels): line 4 a.jpg (missing file), ...``
    """
    if not bad_rows:
        return "no row left out"
    counts = Counter(bad.problem for bad in bad_rows)
    why = ", ".join(f"{n} {problem}" for problem, n in counts.items())
    named = [
        f"line {bad.line} {bad.image or '(no image)'} ({bad.detail or bad.problem})"
        for bad in bad_rows[:shown]
    ]
    more = f"; and {len(bad_rows) - shown} more" if len(bad_rows) > shown else ""
    return f"{len(bad_rows)} row(s) left out ({why}): {'; '.join(named)}{more}"


def read_labels(
    source: str | Path, root: str | Path, delimiter: str = " ", decode: bool = True
) -> LabelTable:
    """Read a labels file whose ``image`` paths lie under the image root ``root``.

    Parameters
    ----------
    source : str or Path
        The CSV file (UTF-8, a header row, comma-separated).
    root : str or Path
        The folder the ``image`` paths are relative to.
    delimiter : str
        What separates the labels of one row (``--label-delim``).
    decode : bool
        Decode every image once, so that an undecodable file is a bad row rather than an
        image skipped at training time; without it only the existence and the extension of
        each file are checked, as the folder scan does.

    Returns
    -------
    LabelTable
        The usable rows and the bad ones (:func:`describe_bad_rows` tells them to people).

    Raises
    ------
    UsageError
        The file or the root cannot be used (see the module's description).
    """
    source, root = Path(source), Path(root).absolute()
    if not root.is_dir():
        raise UsageError(
            f"Image folder {root} does not exist. With --labels, --data names the folder that "
            "the image paths of the labels file are relative to."
        )
    if not delimiter:
        raise UsageError("--label-delim must be one or more characters, e.g. ' ' or ';'.")
    rows, columns = _read_rows(source)
    checker = _RowChecker(root, delimiter, decode, has_split=SPLIT_COLUMN in columns)
    for line, cells in rows:
        checker.check(line, *(_cell(cells, columns.get(name)) for name in _ROW_COLUMNS))
    table = checker.table(source)
    _check_usable(table)
    return table


_ROW_COLUMNS = (IMAGE_COLUMN, LABELS_COLUMN, SPLIT_COLUMN)


def labelled_images_per_class(source: str | Path, delim: str = " ") -> float | None:
    """The mean number of images a class holds in the train rows of a labels file (those
    whose ``split`` is ``train`` or empty), for ``--recipe best``'s choice by the task's
    shape; None where the file cannot be read (the run's own reading then says why)."""
    try:
        rows, columns = _read_rows(Path(source))
    except UsageError:
        return None
    counts: dict[str, int] = {}
    for _, cells in rows:
        if _cell(cells, columns.get(SPLIT_COLUMN)).lower() not in ("", "train"):
            continue
        labels = _cell(cells, columns[LABELS_COLUMN]).split(delim or " ")
        for name in {name.strip() for name in labels} - {""}:
            counts[name] = counts.get(name, 0) + 1
    return sum(counts.values()) / len(counts) if counts else None


def _cell(cells: list[str], index: int | None) -> str:
    """The cell at ``index`` stripped; empty when the column is absent or the row short."""
    return cells[index].strip() if index is not None and index < len(cells) else ""


def _read_rows(source: Path) -> tuple[list[tuple[int, list[str]]], dict[str, int]]:
    """``([(line, cells)] of the non-blank rows after the header, {column: index})``.

    Raises
    ------
    UsageError
        The file cannot be read or decoded as UTF-8 CSV, or lacks a required column.
    """
    try:
        with open(source, encoding="utf-8-sig", newline="") as file:  # -sig: Excel's BOM
            text = file.read()
    except UnicodeDecodeError as err:
        raise UsageError(
            f"Labels file {source} is not UTF-8 text (byte {err.start} cannot be decoded). "
            "Save it as UTF-8 (in Excel: 'CSV UTF-8'), then run again."
        ) from None
    except OSError as err:
        raise UsageError(
            f"Cannot read the labels file {source}: {err.strerror or err}. Check the path "
            "given to --labels and that the file is readable."
        ) from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        rows = [(reader.line_num, cells) for cells in reader if cells]
    except csv.Error as err:
        raise UsageError(
            f"Labels file {source} is not a readable CSV (line {reader.line_num}: {err}). "
            "Save it as comma-separated text with a header row, then run again."
        ) from None
    return rows, _columns(source, header)


def _columns(source: Path, header: list[str] | None) -> dict[str, int]:
    """``{column name: index}`` of the header, first of each name; the required ones there."""
    columns: dict[str, int] = {}
    for index, name in enumerate(header or []):
        columns.setdefault(name.strip().lower(), index)
    missing = [name for name in (IMAGE_COLUMN, LABELS_COLUMN) if name not in columns]
    if missing:
        found = ", ".join(repr(name) for name in header) if header else "no header row"
        raise UsageError(
            f"Labels file {source} has no {' and no '.join(missing)} column (found: {found}). "
            "Its first row must name the columns, separated by commas: image (a path relative "
            "to --data), labels (separated by --label-delim) and optionally split (train, val "
            "or test)."
        )
    return columns


class _RowChecker:
    """Checks the rows one by one: keeps the usable ones, names the others (:class:`BadRow`)."""

    def __init__(self, root: Path, delimiter: str, decode: bool, has_split: bool):
        self.root, self.delimiter, self.decode, self.has_split = root, delimiter, decode, has_split
        self.kept: dict[str, tuple[int, tuple[str, ...]]] = {}  # path -> (line, labels)
        self.rows: list[tuple[str, tuple[str, ...], str]] = []
        self.bad: list[BadRow] = []

    def check(self, line: int, image: str, labels: str, split: str) -> None:
        """Keep the row ``line`` or name its first problem."""
        names = tuple(sorted({name.strip() for name in labels.split(self.delimiter)} - {""}))
        split = split.lower()
        relative = _relative_path(image, self.root)
        problem = (
            _path_problem(image, relative)
            or self._duplicate(relative, names)
            or self._labels_problem(names, split)
            or _file_problem(self.root / relative, self.decode)
        )
        if problem:
            self.bad.append(BadRow(line, image, *problem))
        else:
            self.kept[relative] = (line, names)
            self.rows.append((str(self.root / relative), names, split))

    def _duplicate(self, relative: str, names: tuple[str, ...]):
        """A row for an image that an earlier usable row has (a bad row claims none)."""
        if relative not in self.kept:
            return None
        first, first_names = self.kept[relative]
        detail = f"already listed on line {first}"
        if names != first_names:
            detail += " with other labels (one row per image, its labels in one cell)"
        return DUPLICATE, detail

    def _labels_problem(self, names: tuple[str, ...], split: str):
        if not names:
            return NO_LABELS, "no labels"
        if self.has_split and split not in SPLIT_NAMES:
            return UNKNOWN_SPLIT, f"split {split!r}; expected train, val or test"
        return None

    def table(self, source: Path) -> LabelTable:
        """The usable rows as a :class:`LabelTable` (classes sorted), and the bad ones."""
        classes = sorted({name for _, names, _ in self.rows for name in names})
        index = {name: i for i, name in enumerate(classes)}
        items = tuple((path, tuple(index[n] for n in names)) for path, names, _ in self.rows)
        split = tuple(split for _, _, split in self.rows) if self.has_split else None
        return LabelTable(self.root, source, tuple(classes), items, split, tuple(self.bad))


def _relative_path(image: str, root: Path) -> str:
    """``image`` as a normalized path relative to ``root`` (``..`` first when outside it)."""
    if not image:
        return ""
    return Path(os.path.relpath(os.path.normpath(root / image), root)).as_posix()


def _path_problem(image: str, relative: str):
    if not image:
        return BAD_PATH, "no image path"
    if relative == ".." or relative.startswith("../"):
        return BAD_PATH, "not under the image folder (--data)"
    return None


def _file_problem(path: Path, decode: bool):
    """What the folder scan and the decoder would say of ``path``; None for a good image."""
    if not path.is_file():
        return MISSING_FILE, "a folder, not a file" if path.is_dir() else "file not found"
    if path.suffix.lower() not in image_extensions():
        return NOT_AN_IMAGE, f"{path.suffix or 'no extension'}: not a format Pillow decodes"
    if decode:
        try:
            load_image(path)
        except UnreadableImageError as err:
            return UNREADABLE, str(err)
    return None


def _check_usable(table: LabelTable) -> None:
    if not table.items:
        raise UsageError(
            f"Labels file {table.source} has no usable row "
            f"({describe_bad_rows(table.bad_rows) if table.bad_rows else 'only a header'}). "
            f"Fix the rows, and check that --data ({table.root}) is the folder that the image "
            "paths are relative to."
        )
    if len(table.classes) < 2:
        raise UsageError(
            f"Labels file {table.source} names a single class ({table.classes[0]}); "
            "a classifier needs two or more."
        )
