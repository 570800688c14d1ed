"""Datasets: the hot-dog download, image-folder splits, the book's transforms, loaders.

Every image is decoded by :func:`load_image` (an opened PIL image by :func:`to_rgb`), with PIL
rather than OpenCV: every mode a user may hand us becomes 8-bit RGB (deep integer and float
modes scaled by their type's range, see :func:`_to_8bit`), photos are turned upright as their
EXIF Orientation says (as a browser shows them), and decompression bombs are refused rather
than loaded. A dataset is every file with an extension Pillow decodes (:func:`image_extensions`)
under its class folders, hidden (dot) names left out at any depth.

The random train augmentation draws from a generator seeded per sample by
``(seed, epoch, index)``: the same run gives the same images whatever the worker count, a
resumed run sees what the uninterrupted one saw, and distributed workers agree on the order.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile

from gluon_ft.errors import UsageError
from gluon_ft.paths import mxnet_home

HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"
HOTDOG_ZIP = "hotdog.zip"
# The zip is 261 MB; a server announcing more than this bound serves some other file.
HOTDOG_MAX_BYTES = 300 * 10**6

# Formats Pillow registers but cannot turn into pixels here: stubs that only identify a file
# (BUFR, GRIB, HDF5, and WMF/EMF off Windows), MPEG (a video's header), and EPS/PS (drawings
# that need Ghostscript). Their files are skipped as non-images, not retried every epoch.
UNDECODED_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS"})
# The book normalizes with ImageNet's statistics, on 0-1 RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hotdog_root(
    cache_dir: str | Path | None = None, url: str | None = None, sha1: str = HOTDOG_SHA1
) -> Path:
    """Return the hot-dog dataset folder (with ``train/`` and ``test/``), downloading it once.

    The zip is cached as ``$MXNET_HOME/datasets/hotdog.zip``; a zip the user put there by hand
    is verified and used.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Where the zip and the extracted folder live; ``$MXNET_HOME/datasets`` by default.
    url : str, optional
        Where to download from: ``$GLUON_FT_HOTDOG_URL`` (a mirror) if set, else the book's.
    sha1 : str
        The zip's expected sha1; a mirror must serve the same file.

    Returns
    -------
    Path
        The folder that holds ``train/`` and ``test/``.
    """
    from gluon_ft.download import DownloadError, extract_zip, fetch

    cache = Path(cache_dir) if cache_dir is not None else mxnet_home() / "datasets"
    url = url or os.environ.get("GLUON_FT_HOTDOG_URL") or HOTDOG_URL
    extracted = cache / "hotdog"
    if not extracted.is_dir():
        try:
            zip_path = fetch(url, cache / HOTDOG_ZIP, sha1, max_bytes=HOTDOG_MAX_BYTES)
            extract_zip(zip_path, extracted)
        except DownloadError as err:
            raise UsageError(
                f"{err} The hot-dog dataset could not be obtained. On an offline machine, "
                f"copy hotdog.zip (sha1 {sha1}, from {HOTDOG_URL}) to "
                f"{cache / HOTDOG_ZIP}, or train on your own folder with --data DIR "
                "(DIR/train/<class>/*, DIR/test/<class>/*)."
            ) from None
    # The book's zip holds a top-level hotdog/ folder; accept a flat layout too.
    nested = extracted / "hotdog"
    return nested if (nested / "train").is_dir() else extracted


class UnreadableImageError(OSError):
    """An image file that cannot be used: not an image, truncated, empty, or a bomb."""


def load_image(path: str | Path | BinaryIO) -> Image.Image:
    """Decode an image file (a path or an open binary file) as upright 8-bit RGB.

    The one decoder of training, check-data, pack, predict, serve and the notebooks, so that
    they all see the same pixels: the EXIF Orientation applied, deep modes scaled by their
    type's range (:func:`_to_8bit`), transparency composited on white.

    Raises
    ------
    UnreadableImageError
        The file is empty, unreadable, not an image, truncated, or larger than PIL's pixel
        limit (a possible decompression bomb, refused before its pixels are decoded). The
        message is the reason, for per-file reports.
    """
    with _unreadable_reasons():
        if isinstance(path, str | Path) and os.path.getsize(path) == 0:
            raise UnreadableImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Beyond MAX_IMAGE_PIXELS PIL only warns; a bomb must be refused, not loaded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return _upright_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An already opened PIL image as upright 8-bit RGB, by the rules of :func:`load_image`.

    Raises
    ------
    UnreadableImageError
        Its pixels cannot be decoded, or there are more than PIL's limit.
    """
    with _unreadable_reasons():
        if img.width * img.height > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
        return _upright_rgb(img)


@contextlib.contextmanager
def _unreadable_reasons():
    """Turn whatever PIL raises on a bad file into :class:`UnreadableImageError` with a reason."""
    # Importing gluoncv sets this process-wide to True (gluoncv/data/mhp.py), and PIL then
    # pads a truncated or damaged file with grey instead of raising: refuse such files.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError("file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImageError(
            f"more than {Image.MAX_IMAGE_PIXELS} pixels: refused as a possible decompression bomb"
        ) from None
    except Image.UnidentifiedImageError:
        raise UnreadableImageError("not an image (no image format recognizes it)") from None
    except Exception as err:  # noqa: BLE001  PIL raises many types on corrupt data
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UnreadableImageError(
            f"cannot decode ({type(err).__name__}{': ' + detail if detail else ''})"
        ) from None


# The transposes that show a photo as its EXIF Orientation (2-8) says it is viewed: those of
# ImageOps.exif_transpose, without its rewriting of the metadata, which can raise on an odd EXIF
# block (and lose a good photo) and which a decoded training image does not keep anyway.
_ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright_rgb(img: Image.Image) -> Image.Image:
    """Decode ``img``'s pixels as 8-bit RGB, turned as its EXIF Orientation says."""
    img.load()
    rgb = _as_rgb(img)
    turn = _ORIENTATION_TRANSPOSES.get(_exif_orientation(img))
    return rgb if turn is None else rgb.transpose(turn)


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) Orientation tag; 1 (as stored) when absent or unreadable."""
    try:
        return img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001  a damaged EXIF block must not lose good pixels
        return 1


def _as_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(img)).convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels have arbitrary colour underneath.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> np.ndarray:
    """The uint8 grey levels of a one-channel integer (``I;16*``, ``I``) or float (``F``) image.

    Scaled by the range of the sample type, never by the image's own extremes, so a dark image
    stays dark and the same pixels give the same result in every file format:

    - integers: the top 8 of the bits the file declares (16-bit: ``>> 8``, which is also what
      Pillow does to 16-bit RGB); for signed types the range is ``0 .. 2**(bits-1) - 1`` and
      negative values are black. See :func:`_integer_depth` for what each format declares.
    - float: ``0 .. 1`` is black to white (the convention of float images in PFM, TIFF and
      scikit-image); values outside are clipped, NaN is black.
    """
    pixels = np.asarray(img)
    if img.mode == "F":
        return np.round(np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    bits, signed = _integer_depth(img)
    if not signed and pixels.dtype == np.int32:
        pixels = pixels.view(np.uint32)  # Pillow holds unsigned 32-bit samples as int32
    shift = max(0, bits - signed - 8)
    return np.clip(pixels >> shift, 0, 255).astype(np.uint8)


def _integer_depth(img: Image.Image) -> tuple[int, bool]:
    """``(bits per sample, signed)`` of an integer-mode image, as its file declares them.

    ``I;16*`` modes hold unsigned 16-bit samples. Pillow widens the others to ``I`` (32-bit
    signed): a TIFF declares its bits and sign in its tags (16 or 32, signed or not); a PGM/PPM
    with a maxval over 255 is rescaled by Pillow to ``0 .. 65535``, so 16 bits; anything else
    in ``I`` (a FITS or IM file, an array made with ``Image.fromarray``) is signed 32-bit.
    """
    if img.format == "TIFF" and hasattr(img, "tag_v2"):
        bits = _first(img.tag_v2.get(258))  # BitsPerSample
        sample_format = _first(img.tag_v2.get(339))  # SampleFormat: 1 unsigned, 2 signed
        if isinstance(bits, int) and 8 < bits <= 32:
            return bits, sample_format == 2
    if img.mode.startswith("I;16") or img.format == "PPM":
        return 16, False
    return 32, True


def _first(value):
    """A TIFF tag's value, or the first of its per-channel values."""
    return value[0] if isinstance(value, tuple) and value else value


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


@functools.cache
def image_extensions() -> frozenset[str]:
    """Every file extension (lower case, with its dot) of a format Pillow decodes here.

    ``.jpg .jpeg .jpe .jfif .png .apng .webp .gif .bmp .tif .tiff .pgm .ppm .pnm .pfm .ico .psd
    .tga .qoi .jp2 .mpo`` and more: every format Pillow opens, less :data:`UNDECODED_FORMATS`;
    save-only ones (``.pdf``) are not among them.
    """
    registered = Image.registered_extensions()  # imports every plugin, which fills Image.OPEN
    # MPO (a stereo camera's JPEG) is registered for saving only; the JPEG plugin opens it.
    decodable = ({*Image.OPEN} | {"MPO"}) - UNDECODED_FORMATS
    return frozenset(ext for ext, fmt in registered.items() if fmt in decodable)


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


def class_folders(root: Path) -> dict[str, FolderContents]:
    """``{class: its contents}`` of ``root/<class>/``, classes sorted; hidden folders are none."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p))
    return {name: folder_contents(root / name) for name in classes}


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
            f"Dataset folder {root} does not exist. Expected {root}/train/<class>/* and "
            f"{root}/test/<class>/*, or --data hotdog for the book's dataset."
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
        "beside_classes": {split: {"ignored": [...], "skipped": [files outside a class]}}}``,
        paths relative to ``root``, a folder's with a trailing ``/``.
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
    for split in folders or (["."] if root.is_dir() else []):
        splits[split] = {
            name: _check_class(contents, root, crop)
            for name, contents in class_folders(root / split).items()
        }
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


def unreadable_in(report: dict) -> list[dict]:
    """Every ``{"path", "reason"}`` of a :func:`check_dataset` report, over splits and classes."""
    return [
        bad
        for classes in report["splits"].values()
        for counts in classes.values()
        for bad in counts["unreadable"]
    ]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Return the generator that draws the augmentation of one sample in one epoch."""
    return np.random.default_rng([seed, epoch, index])


class TrainTransform:
    """The book's train augmentation: ``RandomResizedCrop(S)`` then ``RandomFlipLeftRight``.

    The same semantics as Gluon's transforms (area scale 0.08-1, aspect ratio 3/4-4/3, ten
    tries, then a centre crop), but drawn from a per-sample generator and done in PIL.
    Output: ``S x S x 3`` uint8; ``ToTensor`` and ``Normalize`` run on the device
    (:func:`normalize_batch`), where they are cheap and move 4x fewer bytes.
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size = size
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple:
        """Draw the ``(left, top, right, bottom)`` crop for an image of this size."""
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        side = min(width, height)  # fallback, as Gluon's: the centred square
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        box = self.crop_box(img.width, img.height, rng)
        out = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8)


class TestTransform:
    """The book's test transform: ``Resize(round(S * 256 / 224))`` then ``CenterCrop(S)``.

    Gluon's ``Resize(256)`` without ``keep_ratio`` makes the image square, as the book does.
    """

    def __init__(self, size: int, resize_ratio: float = 256 / 224):
        self.size = size
        self.resize = max(size, int(round(size * resize_ratio)))

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        resized = img.resize((self.resize, self.resize), Image.BILINEAR)
        offset = (self.resize - self.size) // 2
        box = (offset, offset, offset + self.size, offset + self.size)
        return np.asarray(resized.crop(box), dtype=np.uint8)


class TransformedSplit:
    """A Gluon dataset over an :class:`ImageFolderSplit`, keyed by ``(index, epoch)``.

    An unreadable file gives ``None`` instead of raising, so that one bad photo never kills an
    epoch; :func:`collate` drops it and counts it.
    """

    def __init__(self, split: ImageFolderSplit, transform, seed: int = 0):
        self.split = split
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        label = self.split.items[index][1]
        try:
            img = self.split.load(index)
        except UnreadableImageError:
            return None
        return self.transform(img, sample_rng(self.seed, epoch, index)), label


def collate(samples: list) -> tuple:
    """Stack decoded samples into ``(uint8 NHWC batch, int32 labels, skipped count)``."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return None, None, skipped
    images = np.stack([image for image, _ in good])
    labels = np.array([label for _, label in good], dtype=np.int32)
    return images, labels, skipped


class EpochBatchSampler:
    """Batches of ``(index, epoch)`` keys: reshuffled per epoch from a shared seed, sharded.

    ``batch_size`` is the global batch. Every worker of a distributed run draws the same
    permutation, cuts it into the same global batches, and takes every ``num_shards``-th key
    of each from ``shard``: shards are disjoint, their union is the whole set each epoch, the
    workers' batches ``i`` together are exactly the one-worker batch ``i``, and every shard
    has the same number of batches. So a shard's batch may be empty (a last global batch
    smaller than ``num_shards``), and a worker still has to take its part in that step.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        shard: int = 0,
        num_shards: int = 1,
        probabilities: np.ndarray | None = None,
    ):
        self.size = size
        # --sampler balanced: each epoch draws `size` samples with these probabilities, with
        # replacement, from the same (seed, epoch) generator as the shuffle.
        self.probabilities = probabilities
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shard = shard
        self.num_shards = num_shards
        self.epoch = 0
        self.first_batch = 0

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Choose the epoch whose order and augmentation the next iteration yields.

        ``first_batch`` skips the epoch's first batches without decoding them: the steps an
        interrupted run already took before it was resumed.
        """
        self.epoch = epoch
        self.first_batch = first_batch

    def order(self) -> np.ndarray:
        """Return every sample index, in the current epoch's order (the same on every shard)."""
        if self.probabilities is not None:
            rng = np.random.default_rng([self.seed, self.epoch])
            return rng.choice(self.size, size=self.size, replace=True, p=self.probabilities)
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        return np.arange(self.size)

    def indices(self) -> np.ndarray:
        """Return this shard's sample indices for the current epoch, in order."""
        return np.array([i for batch in self for i, _ in batch], dtype=np.int64)

    def global_batch_sizes(self) -> list[int]:
        """Samples in each global batch this iteration yields a part of, over all shards.

        Every worker knows them without asking the others: a distributed step divides the
        summed gradient by its entry.
        """
        starts = range(self.first_batch * self.batch_size, self.size, self.batch_size)
        return [min(self.batch_size, self.size - start) for start in starts]

    def __iter__(self):
        order = self.order()
        for start in range(self.first_batch * self.batch_size, self.size, self.batch_size):
            mine = order[start : start + self.batch_size][self.shard :: self.num_shards]
            yield [(int(i), self.epoch) for i in mine]

    def __len__(self) -> int:
        return max(0, math.ceil(self.size / self.batch_size) - self.first_batch)


def make_loader(
    split: ImageFolderSplit,
    transform,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    workers: int = 0,
    shard: int = 0,
    num_shards: int = 1,
    probabilities: np.ndarray | None = None,
):
    """Return a Gluon ``DataLoader`` whose sampler is an :class:`EpochBatchSampler`.

    Call ``loader._batch_sampler.set_epoch(e)`` (or :func:`set_epoch`) before each epoch.
    ``probabilities`` (per item) makes each epoch a draw with replacement instead.
    """
    from mxnet.gluon.data import DataLoader

    sampler = EpochBatchSampler(
        len(split), batch_size, shuffle, seed, shard, num_shards, probabilities
    )
    dataset = TransformedSplit(split, transform, seed)
    return DataLoader(dataset, batch_sampler=sampler, batchify_fn=collate, num_workers=workers)


def set_epoch(loader, epoch: int, first_batch: int = 0) -> None:
    """Make ``loader`` yield epoch ``epoch``'s order and augmentation, from ``first_batch``."""
    loader._batch_sampler.set_epoch(epoch, first_batch)


def global_batch_sizes(loader) -> list[int]:
    """Samples in each of ``loader``'s coming global batches, over every shard."""
    return loader._batch_sampler.global_batch_sizes()


def normalize_batch(images, dtype: str = "float32"):
    """``ToTensor`` + ``Normalize`` on the device: uint8 NHWC -> normalized float NCHW."""
    from mxnet import nd

    ctx = images.context
    mean = nd.array(IMAGENET_MEAN, ctx=ctx).reshape((1, 3, 1, 1)) * 255.0
    std = nd.array(IMAGENET_STD, ctx=ctx).reshape((1, 3, 1, 1)) * 255.0
    x = images.astype("float32").transpose((0, 3, 1, 2))
    x = nd.broadcast_div(nd.broadcast_sub(x, mean), std)
    return x if dtype == "float32" else x.astype(dtype)
