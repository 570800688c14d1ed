"""RecordIO packs of an image folder: ``gluon-ft pack`` writes them, training reads them.

A pack of ``DIR`` with prefix ``PREFIX`` is three kinds of files::

    PREFIX-train.rec / PREFIX-train.idx   one JPEG record per image, header label = class index
    PREFIX-test.rec  / PREFIX-test.idx
    PREFIX.json                            the manifest: classes, labels, source names, resize

Images are pre-resized so that the shorter side is ``resize`` pixels (never enlarged): a large
photo then decodes several times faster, and the book's transforms see the same content at the
scale they crop to anyway. A JPEG that needs no resizing is stored byte for byte; anything else
is re-encoded as a quality-95 JPEG without chroma subsampling.

:class:`RecordIOSplit` has the interface of :class:`gluon_ft.data.folders.ImageFolderSplit`
(``root``, ``classes``, ``items``, ``labels()``, ``load(index)``), so ``make_loader`` and its
transforms serve both without a second code path.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from gluon_ft.data.decode import UnreadableImageError, load_image
from gluon_ft.data.folders import scan_dataset
from gluon_ft.errors import UsageError
from gluon_ft.paths import write_text

PACK_FORMAT = "gluon-ft-recordio/1"
SPLITS = ("train", "test")
JPEG_QUALITY = 95


def manifest_path(prefix: str | Path) -> Path:
    """``PREFIX.json``: the file that marks ``PREFIX`` as a pack."""
    return Path(f"{prefix}.json")


def split_paths(prefix: str | Path, split: str) -> tuple[Path, Path]:
    """``(PREFIX-split.rec, PREFIX-split.idx)``."""
    return Path(f"{prefix}-{split}.rec"), Path(f"{prefix}-{split}.idx")


def pack_prefix(spec: str | Path) -> Path | None:
    """The pack prefix ``spec`` names (``PREFIX`` or ``PREFIX.json``), or None if it names none."""
    spec = Path(spec).expanduser()
    prefix = spec.with_suffix("") if spec.suffix == ".json" else spec
    return prefix if manifest_path(prefix).is_file() else None


def shorter_side_resize(img: Image.Image, shorter: int) -> Image.Image:
    """Scale ``img`` so that its shorter side is ``shorter`` pixels; never enlarge it."""
    side = min(img.size)
    if shorter <= 0 or side <= shorter:
        return img
    scale = shorter / side
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.BILINEAR)


def encode_record(path: str | Path, resize: int) -> bytes:
    """The JPEG bytes to store for the image file ``path``.

    Raises
    ------
    UnreadableImageError
        The file cannot be decoded (the same rules as training: :func:`load_image`).
    """
    img = load_image(path)
    small = shorter_side_resize(img, resize)
    if small is img:
        with open(path, "rb") as raw:
            head = raw.read(3)
            if head == b"\xff\xd8\xff":  # a JPEG already: keep its bytes, lose nothing more
                return head + raw.read()
    out = io.BytesIO()
    # 4:4:4 (no chroma subsampling): a training copy keeps the colour detail of the source.
    small.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def _pack_split(split, prefix: Path, name: str, resize: int) -> dict:
    import mxnet as mx

    rec, idx = split_paths(prefix, name)
    tmp_rec, tmp_idx = rec.with_name(f".{rec.name}.tmp"), idx.with_name(f".{idx.name}.tmp")
    writer = mx.recordio.MXIndexedRecordIO(str(tmp_idx), str(tmp_rec), "w")
    labels, names, skipped = [], [], []
    try:
        for path, label in split.items:
            try:
                payload = encode_record(path, resize)
            except UnreadableImageError as err:
                skipped.append({"path": path, "reason": str(err)})
                continue
            key = len(labels)
            writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, label, key, 0), payload))
            labels.append(label)
            names.append(os.path.relpath(path, split.root))
    finally:
        writer.close()
    os.replace(tmp_rec, rec)
    os.replace(tmp_idx, idx)
    return {"labels": labels, "names": names, "skipped": skipped}


def pack_dataset(root: str | Path, prefix: str | Path, resize: int = 256) -> dict:
    """Pack ``root/train`` and ``root/test`` into RecordIO files under ``prefix``.

    Parameters
    ----------
    root : str or Path
        An image folder with ``train/<class>/*`` and ``test/<class>/*``.
    prefix : str or Path
        Output prefix; its folder is created.
    resize : int
        The shorter side of the stored images (0 keeps every image at its size).

    Returns
    -------
    dict
        The manifest written to ``PREFIX.json``.

    Raises
    ------
    UsageError
        ``root`` is not a dataset folder, a split has no readable image, or ``prefix`` cannot
        be written.
    """
    if resize < 0:
        raise UsageError(f"--resize must be 0 (keep the size) or a positive side, not {resize}.")
    train, test = scan_dataset(root)
    prefix = Path(prefix).expanduser()
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        splits = {
            name: _pack_split(s, prefix, name, resize) for name, s in zip(SPLITS, (train, test))
        }
    except OSError as err:
        raise UsageError(f"Cannot write the pack {prefix}-*.rec: {err}") from None
    empty = [name for name, s in splits.items() if not s["labels"]]
    if empty:
        raise UsageError(f"{root}: no readable image in the {' and '.join(empty)} split(s).")
    manifest = {
        "format": PACK_FORMAT,
        "source": str(Path(root).resolve()),
        "classes": list(train.classes),
        "resize": resize,
        "splits": splits,
    }
    # Written last: a pack without its manifest is no pack.
    write_text(manifest_path(prefix), json.dumps(manifest) + "\n")
    return manifest


@dataclass(frozen=True)
class RecordIOSplit:
    """One split of a pack, with the interface of :class:`gluon_ft.data.folders.ImageFolderSplit`.

    ``items`` are ``(source file name, label)``; :meth:`load` decodes record ``index``. Each
    process opens the ``.rec`` file for itself, so DataLoader workers never share a file
    offset.
    """

    root: Path  # the .rec file
    classes: tuple[str, ...]
    items: tuple[tuple[str, int], ...]
    _reader: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def pack_files(self) -> tuple[Path, Path]:
        """The ``.rec`` and ``.idx`` files whose bytes make up this split."""
        return self.root, self.root.with_suffix(".idx")

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> np.ndarray:
        """Return the label of every item, in order."""
        return np.array([label for _, label in self.items], dtype=np.int64)

    def _open(self):
        import mxnet as mx

        pid = os.getpid()
        if self._reader.get("pid") != pid:  # first use in this process (or a forked worker)
            rec, idx = self.pack_files
            self._reader.update(
                pid=pid, file=mx.recordio.MXIndexedRecordIO(str(idx), str(rec), "r")
            )
        return self._reader["file"]

    def load(self, index: int) -> Image.Image:
        """Decode record ``index`` as RGB.

        Raises
        ------
        UnreadableImageError
            The record does not hold a decodable image.
        """
        import mxnet as mx

        _, payload = mx.recordio.unpack(self._open().read_idx(index))
        return load_image(io.BytesIO(payload))

    def __getstate__(self) -> dict:
        # A reader holds an open file handle: a pickled copy (spawned workers) opens its own.
        return {"root": self.root, "classes": self.classes, "items": self.items, "_reader": {}}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)


def load_pack(spec: str | Path) -> tuple[RecordIOSplit, RecordIOSplit]:
    """Return the train and test splits of the pack ``spec`` (``PREFIX`` or ``PREFIX.json``).

    Raises
    ------
    UsageError
        No pack there, a manifest of another format, or missing ``.rec``/``.idx`` files.
    """
    prefix = pack_prefix(spec)
    if prefix is None:
        raise UsageError(f"{spec} is not a RecordIO pack: {manifest_path(spec)} does not exist.")
    try:
        manifest = json.loads(manifest_path(prefix).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{manifest_path(prefix)} is not a pack manifest: {err}") from None
    if manifest.get("format") != PACK_FORMAT:
        raise UsageError(
            f"{manifest_path(prefix)} has format {manifest.get('format')!r}, not {PACK_FORMAT!r}; "
            "pack the folder again with `gluon-ft pack`."
        )
    classes = tuple(manifest["classes"])
    splits = []
    for name in SPLITS:
        rec, idx = split_paths(prefix, name)
        missing = [str(p) for p in (rec, idx) if not p.is_file()]
        if missing:
            raise UsageError(f"The pack {prefix} is incomplete: {', '.join(missing)} missing.")
        entry = manifest["splits"][name]
        items = tuple(zip(entry["names"], (int(label) for label in entry["labels"])))
        splits.append(RecordIOSplit(rec, classes, items))
    return splits[0], splits[1]
