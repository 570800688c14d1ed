"""Which image is in which part: the dataset layouts, the stratified split and ``split.json``.

Two folder layouts are accepted:

- class folders only, ``DIR/<class>/*``: split into train, val and test here, per class
  (stratified), by a seeded permutation, so that the same seed gives the same parts;
- ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``, with an optional ``DIR/val``: a
  validation part may be carved out of train the same way.

A labels file (:mod:`gluon_ft.data.labels`) is split as the first layout when it has no split
column and as the second when it has one. A single-label file gives the parts of a folder
(:class:`ImageFolderSplit`); a multi-label one gives :class:`MultiLabelSplit` parts, split by
iterative stratification (:mod:`gluon_ft.data.multilabel_split`).

A run writes the parts it used as ``split.json`` (relative paths per part and class), and a
resumed run or a report rebuilds them from it rather than splitting again.

Two guards keep the held-out parts honest. A class too small for its share still gives each
carved part one image when it can keep one to train on (three images for val and test);
smaller, it is named (``absent_from``). And byte-identical files under two names are one
unit of the split, so that no part is scored on a copy of a training image (``duplicates``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gluon_ft.data.balance import IMBALANCE_WARNING, imbalance_ratio
from gluon_ft.data.folders import (
    ImageFolderSplit,
    class_folders,
    identical_files,
    missing_folder,
    scan_dataset,
    scan_split,
)
from gluon_ft.data.labels import LabelTable, MultiLabelSplit
from gluon_ft.data.multilabel_split import iterative_stratification
from gluon_ft.errors import UsageError

CLASS_FOLDERS = "class-folders"
TRAIN_TEST = "train-test"
PACK = "pack"
LABELS_CSV = "labels-csv"
PART_NAMES = ("train", "val", "test")
# The defaults of --val-split and --test-split per layout: a folder of classes needs both
# parts made; a train/test folder keeps the book's behaviour (no validation part).
DEFAULT_FRACTIONS = {CLASS_FOLDERS: (0.1, 0.1), TRAIN_TEST: (0.0, 0.0), PACK: (0.0, 0.0)}


Part = ImageFolderSplit | MultiLabelSplit


@dataclass(frozen=True)
class DatasetParts:
    """The train, val (or None) and test parts of a dataset, and where they came from."""

    root: Path
    layout: str
    train: Part
    test: Part
    val: Part | None = None
    # {part: [classes too small to hold out an image for it]}; empty when every class is there
    absent_from: dict = field(default_factory=dict, hash=False)
    # Byte-identical files: {"groups", "files", "across_folders"}; empty when there are none
    duplicates: dict = field(default_factory=dict, hash=False)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def multi_label(self) -> bool:
        """Whether the parts are :class:`MultiLabelSplit` (an image may have several labels)."""
        return isinstance(self.train, MultiLabelSplit)

    def named(self) -> dict[str, Part]:
        """``{"train": ..., "val": ..., "test": ...}`` without an absent val part."""
        parts = {"train": self.train, "val": self.val, "test": self.test}
        return {name: part for name, part in parts.items() if part is not None}

    def record(self, **settings) -> dict:
        """The content of ``split.json``: the layout, ``settings``, the classes, and per part
        ``{class: [paths relative to the dataset root]}``; for multi-label parts ``{path:
        [its classes]}``, and ``"multi_label": true``; where they are not empty,
        ``absent_from`` and ``duplicates``."""
        found = {"absent_from": self.absent_from, "duplicates": self.duplicates}
        record = {
            "layout": self.layout,
            "root": str(self.root),
            **settings,
            "classes": list(self.classes),
            "parts": {
                name: _relative_items(self.root, part, self.layout)
                for name, part in self.named().items()
            },
            **{key: value for key, value in found.items() if value},
        }
        if self.multi_label:
            record["multi_label"] = True
        return record

    def warnings(self) -> list[str]:
        """A line for people per class that a held-out part lacks, and one about
        byte-identical files: what ``split.json`` records, said once when the split is made."""
        lines = []
        sizes = np.sum([class_counts(part) for part in self.named().values()], axis=0)
        missing: dict[str, list[str]] = {}
        for part in (name for name in PART_NAMES if name in self.absent_from):
            for name in self.absent_from[part]:
                missing.setdefault(name, []).append(part)
        for name, parts in missing.items():
            cannot = " or ".join({"val": "validated", "test": "tested"}[p] for p in parts)
            lines.append(
                f"warning: class {name} has {sizes[self.classes.index(name)]} image(s), too "
                f"few to hold one out for {' and '.join(parts)} and keep one to train on: it "
                f"cannot be {cannot} (split.json: absent_from). Add images of it."
            )
        if self.duplicates:
            lines.append(_duplicates_line(self.root, self.duplicates))
        return lines


def _duplicates_line(root: Path, found: dict) -> str:
    """What the split did with byte-identical files, and what it could not do."""
    line = (
        f"note: {found['groups']} group(s) of byte-identical files ({found['files']} files) in "
        f"{root}: each group is kept in one part (split.json: duplicates; `gluon-ft check-data` "
        "lists them)"
    )
    if found.get("across_folders"):
        line += (
            f". warning: {found['across_folders']} of them span the train/ and test/ (or val/) "
            "folders you split yourself, which are not moved: those parts score copies of "
            "training images. Remove the copies."
        )
    return line


def _relative_items(root: Path, part: Part, layout: str) -> dict[str, list[str]]:
    # A pack's items are already names relative to its folder.
    def relative(path: str) -> str:
        return (Path(path) if layout == PACK else Path(path).relative_to(root)).as_posix()

    if isinstance(part, MultiLabelSplit):
        return {relative(path): [part.classes[i] for i in labels] for path, labels in part.items}
    by_class: dict[str, list[str]] = {name: [] for name in part.classes}
    for path, label in part.items:
        by_class[part.classes[label]].append(relative(path))
    return by_class


def stratified_split(
    labels, fractions: dict[str, float], seed: int, groups: list[list[int]] = ()
) -> dict[str, np.ndarray]:
    """Split item indices into parts with the given fractions within every class.

    Each class's items are permuted by a generator seeded with ``(seed, class)``, and the
    first ``round(n * fraction)`` go to each named part in turn; the rest form ``"train"``.
    So every part holds each class's share to within half an image, the parts are disjoint
    and complete, and the same seed gives the same parts. A class whose share rounds to no
    image gets one in each part all the same, where it can keep one to train on
    (:func:`_held_out_counts`).

    Parameters
    ----------
    labels : array of int
        The class of each item.
    fractions : dict
        ``{part name: fraction}`` of the parts to carve out (e.g. ``{"test": 0.1, "val": 0.1}``).
    seed : int
        The split's seed (``--seed``).
    groups : list of list of int, optional
        Items that must share a part (byte-identical files): each group is split as its
        first item, in that item's class, and the others follow it.

    Returns
    -------
    dict
        ``{"train": indices, **{name: indices}}``, each sorted.
    """
    labels = np.asarray(labels)
    leader = {item: group[0] for group in groups for item in group[1:]}
    leads = np.ones(len(labels), dtype=bool)
    leads[list(leader)] = False
    chosen: dict[str, list] = {"train": [], **{name: [] for name in fractions}}
    for label in np.unique(labels):
        members = np.flatnonzero((labels == label) & leads)
        order = np.random.default_rng([seed, int(label)]).permutation(members)
        start = 0
        for name, count in zip(fractions, _held_out_counts(len(members), fractions)):
            chosen[name].extend(order[start : start + count])
            start += count
        chosen["train"].extend(order[start:])
    part_of = {int(i): name for name, indices in chosen.items() for i in indices}
    for item, first in leader.items():
        chosen[part_of[first]].append(item)
    return {name: np.sort(np.array(indices, dtype=np.int64)) for name, indices in chosen.items()}


def _held_out_counts(size: int, fractions: dict[str, float]) -> list[int]:
    """How many of a class's ``size`` items each part takes: ``round(size * fraction)``; the
    parts that round to none take one each when ``size`` leaves one to train on after them
    (all of them or none: three images for val and test)."""
    counts = [math.floor(size * fraction + 0.5) for fraction in fractions.values()]
    short = [i for i, (c, f) in enumerate(zip(counts, fractions.values())) if c == 0 and f > 0]
    if size - sum(counts) - len(short) >= 1:
        for i in short:
            counts[i] = 1
    return counts


def _subset(split: ImageFolderSplit, indices, root: Path | None = None) -> ImageFolderSplit:
    return ImageFolderSplit(
        root or split.root, split.classes, tuple(split.items[i] for i in indices)
    )


def layout_of(root: Path) -> str:
    """:data:`TRAIN_TEST` when ``root`` has a ``train/`` or ``test/`` folder, else
    :data:`CLASS_FOLDERS`."""
    return TRAIN_TEST if (root / "train").is_dir() or (root / "test").is_dir() else CLASS_FOLDERS


def split_dataset(
    root: str | Path, val_split: float | None, test_split: float | None, seed: int
) -> DatasetParts:
    """The parts of the image folder ``root`` in either layout.

    ``None`` fractions take the layout's default (:data:`DEFAULT_FRACTIONS`).

    Raises
    ------
    UsageError
        The folder is not a dataset, a fraction is outside [0, 1) or does not apply to the
        layout, or a part (or the train part of a class) would be empty.
    """
    root = Path(root).absolute()  # split.json names it, for a report run from anywhere
    if not root.is_dir():
        raise UsageError(
            missing_folder(
                root,
                "{root}/<class>/* (split for you), or {root}/train/<class>/* and "
                "{root}/test/<class>/*, or --data hotdog.",
            )
        )
    layout = layout_of(root)
    val, test = _fractions(DEFAULT_FRACTIONS[layout], val_split, test_split)
    given: dict = {}  # the parts in folders of their own (train-test layout)
    if layout == CLASS_FOLDERS:
        whole = _scan_classes(root)
        carve = {"test": test, "val": val}
        if test <= 0:
            raise UsageError(f"{root} holds class folders only: --test-split must be above 0.")
    else:
        whole, given["test"], given["val"] = _scan_train_test(root)
        if test_split:
            raise UsageError(
                f"{root} has a test/ folder; --test-split only splits a folder of classes."
            )
        if given["val"] is not None and val:
            raise UsageError(f"{root} has a val/ folder; leave out --val-split to use it.")
        carve = {"val": val}
    carved = {name: fraction for name, fraction in carve.items() if fraction}
    groups, duplicates = _identical_groups(whole, [part for part in given.values() if part])
    indices = stratified_split(whole.labels(), carved, seed, groups)
    parts = {name: _subset(whole, chosen) for name, chosen in indices.items()}
    for name, part in given.items():
        parts.setdefault(name, part)
    _check_not_empty(parts, carve, root)
    absent = _absent_from(parts, carved)
    val_part = parts.get("val")
    return DatasetParts(root, layout, parts["train"], parts["test"], val_part, absent, duplicates)


def _identical_groups(whole: ImageFolderSplit, given: list[ImageFolderSplit]):
    """``(groups, record)``: the groups of byte-identical files among ``whole``'s items (their
    positions), which the split keeps together, and ``split.json``'s ``duplicates``, counted
    over the folders ``given`` too (``across_folders``: groups the split cannot keep in one
    part, as they span folders that the user split)."""
    folders = [whole, *given]
    paths = [path for folder in folders for path, _ in folder.items]
    folder_of = np.repeat(np.arange(len(folders)), [len(folder) for folder in folders])
    found = identical_files(paths)
    if not found:
        return [], {}
    within = [[i for i in group if i < len(whole)] for group in found]
    record = {
        "groups": len(found),
        "files": sum(map(len, found)),
        "across_folders": sum(len(set(folder_of[group].tolist())) > 1 for group in found),
    }
    return [group for group in within if len(group) > 1], record


def _absent_from(parts: dict, carved: dict) -> dict[str, list[str]]:
    """``{part: [classes]}``: the classes a carved part holds no image of (too small)."""
    absent = {}
    for name in carved:
        present = set(parts[name].labels().tolist())
        missing = [c for i, c in enumerate(parts[name].classes) if i not in present]
        if missing:
            absent[name] = missing
    return absent


def split_labels(
    table: LabelTable,
    val_split: float | None,
    test_split: float | None,
    seed: int,
    multi_label: bool | None = None,
) -> DatasetParts:
    """The parts of a labels file's usable rows (layout :data:`LABELS_CSV`).

    Without a split column the rows are split as class folders are (val and test carved out,
    by default 0.1 each); with one, its train, val and test rows are the parts, as the
    folders of a train/test dataset are, and ``val_split`` may carve a val part out of train.
    Single-label rows are split by :func:`stratified_split` into :class:`ImageFolderSplit`
    parts, their items by class (as ``split.json`` lists them); multi-label rows by
    :func:`~gluon_ft.data.multilabel_split.iterative_stratification` into
    :class:`MultiLabelSplit` parts, in file order.

    Parameters
    ----------
    table : LabelTable
        The rows (:func:`gluon_ft.data.labels.read_labels`).
    val_split, test_split : float or None
        ``--val-split`` and ``--test-split``; None for the default.
    seed : int
        The split's seed (``--seed``).
    multi_label : bool or None
        ``--multi-label``: True makes multi-label parts even when every row has one label;
        None decides by the rows (:attr:`LabelTable.multi_label`).

    Raises
    ------
    UsageError
        A fraction the table cannot use, a part (or a class's training rows) would be empty,
        or ``multi_label=False`` for rows with several labels.
    """
    if multi_label is False and table.multi_label:
        raise UsageError(
            f"{table.source} gives some images two or more labels; train it with --multi-label."
        )
    multi = table.multi_label if multi_label is None else multi_label
    layout_like = CLASS_FOLDERS if table.split is None else TRAIN_TEST
    val, test = _fractions(DEFAULT_FRACTIONS[layout_like], val_split, test_split)
    if table.split is None:
        if test <= 0:
            raise UsageError(f"{table.source} has no split column: --test-split must be above 0.")
        given, pool, carve = {}, np.arange(len(table)), {"test": test, "val": val}
    else:
        given = _column_parts(table, test_split, val)
        pool, carve = given.pop("train"), {"val": val}
    fractions = {name: fraction for name, fraction in carve.items() if fraction}
    chosen = {**given, **_stratified(table, pool, fractions, seed, multi)}
    parts = {name: _table_part(table, indices, multi) for name, indices in chosen.items()}
    _check_not_empty(parts, carve, table.source)
    return DatasetParts(table.root, LABELS_CSV, parts["train"], parts["test"], parts.get("val"))


def _column_parts(table: LabelTable, test_split: float | None, val: float) -> dict:
    """``{part: row indices}`` of the split column; refuses the fractions it cannot use."""
    if test_split:
        raise UsageError(
            f"{table.source} has a split column; --test-split only splits a labels file "
            "without one."
        )
    column = np.array(table.split)
    parts = {name: np.flatnonzero(column == name) for name in PART_NAMES}
    if len(parts["val"]) and val:
        raise UsageError(
            f"{table.source} has val rows in its split column; leave out --val-split to use them."
        )
    for name in ("train", "test"):
        if not len(parts[name]):
            raise UsageError(
                f"The split column of {table.source} has no usable {name} row; with a split "
                "column a labels file needs train and test rows (val rows are optional)."
            )
    if not len(parts["val"]):
        del parts["val"]
    return parts


def _stratified(table: LabelTable, pool: np.ndarray, fractions: dict, seed: int, multi: bool):
    """The rows ``pool`` split into ``"train"`` and the ``fractions``' parts, per class."""
    if multi:
        found = iterative_stratification(table.targets()[pool], fractions, seed)
    else:
        labels = np.array([table.items[i][1][0] for i in pool], dtype=np.int64)
        found = stratified_split(labels, fractions, seed)
    return {name: pool[indices] for name, indices in found.items()}


def _table_part(table: LabelTable, indices: np.ndarray, multi: bool) -> Part:
    if multi:
        return MultiLabelSplit(table.root, table.classes, tuple(table.items[i] for i in indices))
    # By class, in file order within a class: the order split.json lists and rebuilds them in.
    ordered = sorted(indices, key=lambda i: table.items[i][1][0])
    items = tuple((table.items[i][0], table.items[i][1][0]) for i in ordered)
    return ImageFolderSplit(table.root, table.classes, items)


def fractions_used(
    layout: str, val_split: float | None, test_split: float | None
) -> tuple[float | None, float | None]:
    """``(val, test)``: ``--val-split`` and ``--test-split`` as the layout applied them, the
    layout's defaults (:data:`DEFAULT_FRACTIONS`) in place of None; None where the layout
    has no default (a labels file's own split column)."""
    defaults = DEFAULT_FRACTIONS.get(layout, (None, None))
    return (
        defaults[0] if val_split is None else val_split,
        defaults[1] if test_split is None else test_split,
    )


def _fractions(
    defaults: tuple[float, float], val_split: float | None, test_split: float | None
) -> tuple[float, float]:
    """``(val, test)``: the fractions given, or the layout's ``defaults`` for None; checked."""
    val = defaults[0] if val_split is None else val_split
    test = defaults[1] if test_split is None else test_split
    for flag, value in (("--val-split", val), ("--test-split", test)):
        if not (math.isfinite(value) and 0 <= value < 1):
            raise UsageError(f"{flag} must be a fraction in [0, 1), got {value:g}.")
    return val, test


def _scan_classes(root: Path) -> ImageFolderSplit:
    whole = scan_split(root)
    if len(whole.classes) < 2:
        raise UsageError(
            f"{root} has a single class ({whole.classes[0]}); a classifier needs two or more."
        )
    return whole


def _scan_train_test(root: Path):
    """``(train, test, val or None)`` of a train/test folder, checked to share classes."""
    train, test = scan_dataset(root)
    val = scan_split(root / "val") if (root / "val").is_dir() else None
    if val is not None and val.classes != train.classes:
        raise UsageError(
            f"The class folders of {root}/val differ from {root}/train: "
            f"{', '.join(val.classes)} against {', '.join(train.classes)}."
        )
    return train, test, val


def _check_not_empty(parts: dict, carved: dict, root: Path | str) -> None:
    needed = 1 + sum(1 for fraction in carved.values() if fraction)
    for name, fraction in carved.items():
        if fraction and not len(parts[name]):
            raise UsageError(
                f"--{name}-split {fraction:g} leaves the {name} part of {root} empty: no class "
                f"can hold out an image for each part and keep one to train on (that takes "
                f"{needed} images). Add images."
            )
    train_counts = class_counts(parts["train"])
    missing = [c for c, count in zip(parts["train"].classes, train_counts) if not count]
    if missing:
        raise UsageError(
            f"The split of {root} leaves no training image for {', '.join(missing)}; "
            "add images or lower --val-split/--test-split."
        )


def parts_from_record(root: str | Path, record: dict) -> DatasetParts:
    """Rebuild the parts a run used from its ``split.json``, under the dataset ``root``.

    ``root`` may differ from the recorded one (the folder was moved); the relative paths
    must still be there.

    Raises
    ------
    UsageError
        The record is malformed, or a listed file is missing.
    """
    root = Path(root).absolute()
    try:
        classes = tuple(record["classes"])
        listed = {name: record["parts"][name] for name in PART_NAMES if name in record["parts"]}
        layout = record["layout"]
    except (KeyError, TypeError):
        raise UsageError("split.json lacks its layout, classes or parts.") from None
    parts = {}
    multi_label = bool(record.get("multi_label"))
    for name, by_class in listed.items():
        items = _recorded_items(root, classes, by_class, multi_label)
        missing = [path for path, _ in items if not Path(path).is_file()]
        if missing:
            raise UsageError(
                f"split.json lists {len(missing)} file(s) of the {name} part that are not in "
                f"{root}, e.g. {missing[0]}. Restore them, or start a new run."
            )
        parts[name] = (MultiLabelSplit if multi_label else ImageFolderSplit)(
            root, classes, tuple(items)
        )
    if "train" not in parts or "test" not in parts:
        raise UsageError("split.json must list a train and a test part.")
    found = {key: record.get(key) or {} for key in ("absent_from", "duplicates")}
    return DatasetParts(root, layout, parts["train"], parts["test"], parts.get("val"), **found)


def _recorded_items(root: Path, classes: tuple[str, ...], listed: dict, multi_label: bool):
    """The items of one part of ``split.json``: listed by class, or by path when multi-label."""
    if not multi_label:
        return [
            (str(root / path), label)
            for label, cls in enumerate(classes)
            for path in listed.get(cls, [])
        ]
    index = {name: i for i, name in enumerate(classes)}
    try:
        return [
            (str(root / path), tuple(sorted(index[name] for name in names)))
            for path, names in listed.items()
        ]
    except (KeyError, TypeError):
        raise UsageError("split.json gives an image a class that its classes list lacks.") from None


def class_counts(split: Part) -> np.ndarray:
    """Items per class of ``split``, in class order (multi-label: the items with each class)."""
    if isinstance(split, MultiLabelSplit):
        return split.targets().sum(axis=0).astype(np.int64)
    return np.bincount(split.labels(), minlength=len(split.classes))


# A held-out part with fewer images of a class than this scores it too noisily to read.
TINY_SUPPORT = 5


def _how_split(layout: str, val: float | None, test: float | None, seed: int) -> str:
    """How the parts were made, in words; a labels file's fractions may be None."""
    if layout == CLASS_FOLDERS:
        return f"class folders, split with --seed {seed}: val {val:g}, test {test:g}"
    if layout == TRAIN_TEST:
        return "train/ and test/ folders as given" + (
            f"; val {val:g} of train/, --seed {seed}" if val else ""
        )
    if layout == PACK:
        return "a RecordIO pack's train and test splits"
    return f"{layout}, --seed {seed}"


def describe_split(
    parts: DatasetParts, fractions: tuple[float | None, float | None], seed: int
) -> list[str]:
    """What training says of its data at the start: how it was split, the counts per part and
    per class, the imbalance, the classes too rare in the test part to judge, and the files
    the scan left out."""
    how = _how_split(parts.layout, *fractions, seed)
    named = parts.named()
    counts = {name: class_counts(part) for name, part in named.items()}
    lines = [
        f"data: {parts.root} ({how})",
        "data: " + ", ".join(f"{name} {len(part)}" for name, part in named.items()) + " images",
        "data: per class (" + "/".join(named) + "): " + _per_class(parts.classes, counts),
    ]
    lines += _balance_lines(parts.classes, counts)
    left_out = _left_out_files(parts)
    if left_out:
        lines.append(f"data: left out {left_out} (`gluon-ft check-data` lists them)")
    return lines


def _per_class(classes: Sequence[str], counts: dict, shown: int = 8) -> str:
    """``ant 40/5/5, bee 38/5/4``; past ``shown`` classes, the first few and the range."""
    rows = [
        f"{name} " + "/".join(str(int(c[i])) for c in counts.values())
        for i, name in enumerate(classes)
    ]
    if len(rows) <= shown:
        return ", ".join(rows)
    train = counts["train"]
    return (
        ", ".join(rows[: shown // 2])
        + f", ... ({len(rows)} classes; train {int(train.min())} to {int(train.max())} each)"
    )


def _balance_lines(classes: Sequence[str], counts: dict) -> list[str]:
    lines = []
    train = counts["train"]
    ratio = imbalance_ratio(train)
    if ratio > IMBALANCE_WARNING:
        largest, smallest = int(train.argmax()), int(train.argmin())
        lines.append(
            f"warning: the train part is imbalanced: {classes[largest]} has {int(train.max())} "
            f"images, {classes[smallest]} {int(train.min())} (over {IMBALANCE_WARNING:g}x). "
            "Consider --class-weights auto (or --sampler balanced)."
        )
    rare = [f"{classes[i]} {int(n)}" for i, n in enumerate(counts["test"]) if n < TINY_SUPPORT]
    if rare:
        more = f", ... {len(rare) - 6} more" if len(rare) > 6 else ""
        lines.append(
            f"note: classes with fewer than {TINY_SUPPORT} test images (their test scores are "
            f"noisy): {', '.join(rare[:6])}{more}"
        )
    return lines


def _left_out_files(parts: DatasetParts) -> str:
    """``3 hidden and 2 non-image files`` under the class folders of an image-folder dataset."""
    if parts.layout == CLASS_FOLDERS:
        roots = [parts.root]
    elif parts.layout == TRAIN_TEST:
        roots = [parts.root / name for name in PART_NAMES if (parts.root / name).is_dir()]
    else:
        return ""
    found = [contents for root in roots for contents in class_folders(root).values()]
    hidden = sum(len(contents.ignored) for contents in found)
    skipped = sum(len(contents.skipped) for contents in found)
    said = [f"{hidden} hidden" if hidden else "", f"{skipped} non-image" if skipped else ""]
    return " and ".join(word for word in said if word) + " files" if hidden or skipped else ""
