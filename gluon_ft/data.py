"""Datasets: the hot-dog download, image-folder splits, the book's transforms, loaders.

Images are decoded with PIL (not OpenCV) so that every mode a user may hand us (grayscale,
palette, RGBA, CMYK, 16-bit) becomes RGB, and decompression bombs are refused rather than
loaded. The random train augmentation draws from a generator seeded per sample by
``(seed, epoch, index)``: the same run gives the same images whatever the worker count, a
resumed run sees what the uninterrupted one saw, and distributed workers agree on the order.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile

from gluon_ft.errors import UsageError
from gluon_ft.paths import mxnet_home

HOTDOG_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
HOTDOG_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"
HOTDOG_ZIP = "hotdog.zip"

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
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
            zip_path = fetch(url, cache / HOTDOG_ZIP, sha1)
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
    """Decode an image file (a path or an open binary file) as 8-bit RGB.

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
                img.load()
                return _as_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An already opened PIL image as 8-bit RGB, by the rules of :func:`load_image`.

    Raises
    ------
    UnreadableImageError
        Its pixels cannot be decoded, or there are more than PIL's limit.
    """
    with _unreadable_reasons():
        if img.width * img.height > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
        img.load()
        return _as_rgb(img)


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


def _as_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits rather than clip to white.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img8 = Image.fromarray(np.clip(arr * 255.0 / peak, 0, 255).astype(np.uint8))
        return img8.convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels have arbitrary colour underneath.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


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


def list_class_files(root: Path) -> dict[str, list[Path]]:
    """``{class: sorted image files}`` of ``root/<class>/``, classes sorted, hidden ones skipped."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {
        name: sorted(
            f
            for f in (root / name).rglob("*")
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
        )
        for name in classes
    }


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
    class_files = list_class_files(root)
    classes = list(class_files)
    if not classes:
        raise UsageError(f"{root} has no class folders; expected {root}/<class>/<image files>.")
    items = []
    empty = []
    for label, name in enumerate(classes):
        files = class_files[name]
        if not files:
            empty.append(name)
        items.extend((str(f), label) for f in files)
    if empty:
        raise UsageError(
            f"{root}: class folder(s) with no image files: {', '.join(empty)}. "
            f"Accepted extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}."
        )
    return ImageFolderSplit(root, tuple(classes), tuple(items))


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
        "size": [w, h]}]}}}}``, paths relative to ``root``.
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
    for split in folders or (["."] if root.is_dir() else []):
        splits[split] = {}
        for name, files in list_class_files(root / split).items():
            unreadable, small = [], []
            for file in files:
                relative = str(file.relative_to(root))
                try:
                    width, height = load_image(file).size
                except UnreadableImageError as err:
                    unreadable.append({"path": relative, "reason": str(err)})
                    continue
                if min(width, height) < crop:
                    small.append({"path": relative, "size": [width, height]})
            splits[split][name] = {"images": len(files), "unreadable": unreadable, "small": small}
    return {"root": str(root), "crop": crop, "problems": problems, "splits": splits}


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
