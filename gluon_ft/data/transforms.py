"""The book's transforms: the random train view, the square test view, normalization.

The random train augmentation draws from a generator seeded per sample by
``(seed, epoch, index)``: the same run gives the same images whatever the worker count, a
resumed run sees what the uninterrupted one saw, and distributed workers agree on the order.
A draw with replacement (``--sampler balanced``) adds its position in the epoch's order, so
an image drawn twice in one epoch gets two views.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# The book normalizes with ImageNet's statistics, on 0-1 RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)
# The book's evaluation resize, as a ratio of the crop: 256 px for a 224 px crop.
BOOK_RESIZE = 256 / 224


def sample_rng(seed: int, epoch: int, index: int, draw: int | None = None) -> np.random.Generator:
    """Return the generator that draws the augmentation of one sample in one epoch.

    ``draw`` is the sample's position in the epoch's order, given only where an image can be
    drawn more than once (``--sampler balanced``); a shuffle keeps ``(seed, epoch, index)``.
    """
    key = [seed, epoch, index] if draw is None else [seed, epoch, index, draw]
    return np.random.default_rng(key)


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
    ``resize_ratio`` 1 (``--eval-resize 1``) resizes to ``S`` and crops nothing: the whole image.
    """

    def __init__(self, size: int, resize_ratio: float = BOOK_RESIZE):
        self.size = size
        self.resize = max(size, int(round(size * resize_ratio)))

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        resized = img.resize((self.resize, self.resize), Image.BILINEAR)
        offset = (self.resize - self.size) // 2
        box = (offset, offset, offset + self.size, offset + self.size)
        return np.asarray(resized.crop(box), dtype=np.uint8)


def normalize_batch(images, dtype: str = "float32"):
    """``ToTensor`` + ``Normalize`` on the device: uint8 NHWC -> normalized float NCHW."""
    from mxnet import nd

    ctx = images.context
    mean = nd.array(IMAGENET_MEAN, ctx=ctx).reshape((1, 3, 1, 1)) * 255.0
    std = nd.array(IMAGENET_STD, ctx=ctx).reshape((1, 3, 1, 1)) * 255.0
    x = images.astype("float32").transpose((0, 3, 1, 2))
    x = nd.broadcast_div(nd.broadcast_sub(x, mean), std)
    return x if dtype == "float32" else x.astype(dtype)
