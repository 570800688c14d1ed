"""Image-folder datasets: ``<split>/<class>/*`` scanned, checked and described.

A dataset is every file with an extension Pillow decodes
(:func:`gluon_ft.data.decode.image_extensions`) under its class folders, hidden (dot) names
left out at any depth.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gluon_ft.data.decode import UnreadableImageError, image_extensions, load_image
from gluon_ft.errors import UsageError


@dataclass(frozen=True)
class ImageFolderSplit:
    """One split of an image folder: ``(path, label)`` items and the sorted class names."""

    root: Path
    classes: tuple[str, ...]
    items: tuple[tuple[str, int], ...]

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> np.ndarray:
        """Return the label of every item, in order."""
        return np.array([label for _, label in self.items], dtype=np.int64)

    def load(self, index: int) -> Image.Image:
        """Decode item ``index`` as RGB (a RecordIO split decodes its record instead).

        Raises
        ------
        UnreadableImageError
            The file cannot be used.
        """
        return load_image(self.items[index][0])


def missing_folder(root: Path, layouts: str) -> str:
    """Why ``root`` is no dataset folder (missing, or a file), then the ``layouts`` expected,
    where ``{root}`` stands for the folder: of ``root`` itself, or of the one holding a file."""
    if root.exists():
        return (
            f"{root} is a file, not a folder: a dataset is a folder of image folders. "
            f"Did you mean its folder? Expected {layouts.format(root=root.parent)}"
        )
    return f"Dataset folder {root} does not exist. Expected {layouts.format(root=root)}"


def is_hidden(path: Path) -> bool:
    """A dot-name: ``.DS_Store``, macOS's ``._photo.jpg``, ``.ipynb_checkpoints/``, ``.git/``."""
    return path.name.startswith(".")


@dataclass(frozen=True)
class FolderContents:
    """A class folder's files, each list sorted: its images, and what a scan leaves out."""

    images: tuple[Path, ...]
    ignored: tuple[Path, ...]  # hidden files and folders (a folder's insides are not read)
    skipped: tuple[Path, ...]  # files of no format Pillow decodes: notes, PDFs, videos


def folder_contents(folder: Path) -> FolderContents:
    """Sort every file under ``folder`` (at any depth) into images, ignored and skipped."""
    images, ignored, skipped = [], [], []
    for parent, folders, files in os.walk(folder):
        here = Path(parent)
        subfolders = [here / name for name in folders]
        ignored += [path for path in subfolders if is_hidden(path)]
        folders[:] = [path.name for path in subfolders if not is_hidden(path)]  # never entered
        for path in (here / name for name in files):
            if is_hidden(path):
                ignored.append(path)
            elif path.suffix.lower() in image_extensions():
                images.append(path)
            else:
                skipped.append(path)
    return FolderContents(*(tuple(sorted(found)) for found in (images, ignored, skipped)))


@dataclass(frozen=True)
class ImageArguments:
    """Image files named on a command line, folders expanded (:func:`expand_image_arguments`)."""

    images: tuple[str, ...]
    empty_folders: tuple[str, ...]  # folders given that hold no image file, with what they do
    left_out: int  # hidden and non-image files inside the folders given


def expand_image_arguments(arguments: Sequence[str]) -> ImageArguments:
    """Files as given; each folder as the image files under it, at any depth, sorted.

    Inside a folder, as in a dataset (:func:`folder_contents`): hidden (dot) names and files
    of no format Pillow decodes are left out. A file named directly is kept whatever its
    name, so that the caller reports why it cannot be read.
    """
    images, empty, left_out = [], [], 0
    for argument in arguments:
        path = Path(argument)
        if not path.is_dir():
            images.append(argument)
            continue
        contents = folder_contents(path)
        images += [str(image) for image in contents.images]
        left_out += len(contents.ignored) + len(contents.skipped)
        if not contents.images:
            empty.append(_left_out(argument, contents))
    return ImageArguments(tuple(images), tuple(empty), left_out)


def class_folders(root: Path) -> dict[str, FolderContents]:
    """``{class: its contents}`` of ``root/<class>/``, classes sorted; hidden folders are none."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p))
    return {name: folder_contents(root / name) for name in classes}


def images_per_class(spec: str) -> float | None:
    """The mean number of images a class in the train part of ``--data spec``: ``DIR/train/``
    when there is one, else ``DIR/<class>/`` (before any split); None for anything else (a
    pack, ``hotdog``, a missing folder), or a folder without classes."""
    root = Path(spec).expanduser()
    if (root / "train").is_dir():
        root = root / "train"
    if not root.is_dir():
        return None
    counts = [len(contents.images) for contents in class_folders(root).values()]
    return sum(counts) / len(counts) if counts else None


def scan_split(root: str | Path) -> ImageFolderSplit:
    """List ``root/<class>/*`` image files; classes are the sorted folder names.

    Raises
    ------
    UsageError
        ``root`` is missing, has no class folders, or a class folder has no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder; expected {root}/<class>/<image files>.")
    contents = class_folders(root)
    classes = list(contents)
    if not classes:
        raise UsageError(f"{root} has no class folders; expected {root}/<class>/<image files>.")
    empty = [_left_out(name, found) for name, found in contents.items() if not found.images]
    if empty:
        raise UsageError(
            f"{root}: class folder(s) with no image files: {'; '.join(empty)}. Image files are "
            "those of a format Pillow decodes (.jpg, .png, .webp, .tif, .bmp, .gif, ...); "
            "hidden (dot) names are ignored. `gluon-ft check-data` lists what it leaves out."
        )
    items = [(str(f), label) for label, name in enumerate(classes) for f in contents[name].images]
    return ImageFolderSplit(root, tuple(classes), tuple(items))


def _left_out(name: str, contents: FolderContents, shown: int = 3) -> str:
    """``dog (skipped notes.txt, scan.pdf; ignored .DS_Store)``: why a class has no images."""
    parts = []
    for verb, paths in (("skipped", contents.skipped), ("ignored", contents.ignored)):
        names = [p.name for p in paths[:shown]]
        if len(paths) > shown:
            names.append(f"{len(paths) - shown} more")
        if names:
            parts.append(f"{verb} {', '.join(names)}")
    return f"{name} ({'; '.join(parts)})" if parts else name


def scan_dataset(root: str | Path) -> tuple[ImageFolderSplit, ImageFolderSplit]:
    """Scan ``root/train`` and ``root/test`` and check that they have the same classes.

    Raises
    ------
    UsageError
        A split is missing, fewer than two classes, or the class lists differ.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(
            missing_folder(
                root,
                "{root}/train/<class>/* and {root}/test/<class>/*, or --data hotdog for the "
                "book's dataset.",
            )
        )
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UsageError(
                f"{root} has no {split}/ folder. A dataset folder holds train/<class>/* "
                "and test/<class>/*."
            )
    train, test = scan_split(root / "train"), scan_split(root / "test")
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise UsageError(
            f"The class folders of {root}/train and {root}/test differ: only in train: "
            f"{only_train or 'none'}; only in test: {only_test or 'none'}."
        )
    if len(train.classes) < 2:
        raise UsageError(
            f"{root} has a single class ({train.classes[0]}); a classifier needs two or more."
        )
    return train, test


def identical_files(paths: Sequence[str | Path]) -> list[list[int]]:
    """Groups of byte-identical files: the positions in ``paths`` of each group of two or
    more, each group and the list in order. Only files that share their size are read."""
    by_size = defaultdict(list)
    for position, path in enumerate(paths):
        try:
            by_size[os.stat(path).st_size].append(position)
        except OSError:
            continue  # a missing file is the loaders' to report
    by_content = defaultdict(list)
    for size, positions in by_size.items():
        for position in positions if len(positions) > 1 else ():
            try:
                by_content[size, _sha1(paths[position])].append(position)
            except OSError:
                continue
    return sorted(group for group in by_content.values() if len(group) > 1)


def _sha1(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_dataset(root: str | Path, crop: int) -> dict:
    """Decode every image of a dataset folder; report what training meets.

    Parameters
    ----------
    root : str or Path
        The dataset folder: ``train/<class>/*``, ``test/<class>/*`` (and ``val/``), or class
        folders only (reported as the split ``"."``).
    crop : int
        The training crop (``--image-size``); smaller images are listed, as training upscales
        them.

    Returns
    -------
    dict
        ``{"root", "crop", "problems": [why training would refuse the folder], "splits":
        {split: {class: {"images": n, "unreadable": [{"path", "reason"}], "small": [{"path",
        "size": [w, h]}], "ignored": [hidden paths], "skipped": [non-image paths]}}},
        "beside_classes": {split: {"ignored": [...], "skipped": [files outside a class]}},
        "duplicates": [[byte-identical files], ...]}``, paths relative to ``root``, a
        folder's with a trailing ``/``.
    """
    root = Path(root)
    problems = []
    folders = [split for split in ("train", "val", "test") if (root / split).is_dir()]
    try:
        # Without train/ or test/, the class folders themselves ("."), split at train time.
        scan_dataset(root) if folders else scan_split(root)
    except UsageError as err:
        problems.append(str(err))
    splits: dict = {}
    beside: dict = {}
    images: list[Path] = []
    for split in folders or (["."] if root.is_dir() else []):
        found = class_folders(root / split)
        splits[split] = {
            name: _check_class(contents, root, crop) for name, contents in found.items()
        }
        images += [file for contents in found.values() for file in contents.images]
        entries = sorted((root / split).iterdir())
        beside[split] = {
            "ignored": [_relative(p, root) for p in entries if is_hidden(p)],
            "skipped": [_relative(p, root) for p in entries if not (is_hidden(p) or p.is_dir())],
        }
    return {
        "root": str(root),
        "crop": crop,
        "problems": problems,
        "splits": splits,
        "beside_classes": beside,
        "duplicates": [
            [_relative(images[i], root) for i in group] for group in identical_files(images)
        ],
    }


def _check_class(contents: FolderContents, root: Path, crop: int) -> dict:
    unreadable, small = [], []
    for file in contents.images:
        try:
            width, height = load_image(file).size
        except UnreadableImageError as err:
            unreadable.append({"path": _relative(file, root), "reason": str(err)})
            continue
        if min(width, height) < crop:
            small.append({"path": _relative(file, root), "size": [width, height]})
    return {
        "images": len(contents.images),
        "unreadable": unreadable,
        "small": small,
        "ignored": [_relative(p, root) for p in contents.ignored],
        "skipped": [_relative(p, root) for p in contents.skipped],
    }


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) + ("/" if path.is_dir() else "")


def unreadable_items(split) -> list[str]:
    """The paths of ``split``'s items that cannot be decoded, each file decoded once."""
    bad = []
    for index, (path, _) in enumerate(getattr(split, "items", ())):
        try:
            split.load(index)
        except UnreadableImageError:
            bad.append(str(path))
    return bad


def unreadable_in(report: dict) -> list[dict]:
    """Every ``{"path", "reason"}`` of a :func:`check_dataset` report, over splits and classes."""
    return [
        bad
        for classes in report["splits"].values()
        for counts in classes.values()
        for bad in counts["unreadable"]
    ]
