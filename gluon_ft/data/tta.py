"""Test-time augmentation: score each image on several views and average their logits.

The views of ``--tta N`` are the first N of this fixed order (:data:`MAX_VIEWS` at most):

1. the plain evaluation transform (:class:`gluon_ft.data.transforms.TestTransform`: the book's
   square resize to ``round(S * 256 / 224)`` and center crop ``S``);
2. its horizontal flip;
3. the center crop ``S`` of a 1.14x larger square resize; 4. its flip;
5. that resize's top-left crop; 6. its flip; 7. top-right; 8. its flip;
9. bottom-left; 10. its flip; 11. bottom-right; 12. its flip.

``--tta 1`` is the plain transform itself, so its scores are bit for bit those without TTA.
With more views a sample is an ``N x S x S x 3`` array, a batch ``B x N x S x S x 3``, and
:func:`view_logits` runs the network on one view after another and averages the logits: the
forward passes keep the batch size of plain evaluation, so memory does not grow with N.

Used by the training's evaluation, the report, ``predict`` and ``serve``: it sits below
both the training code and the deploy modules.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from gluon_ft.data.transforms import BOOK_RESIZE, TestTransform, normalize_batch
from gluon_ft.errors import UsageError

LARGER = 1.14  # the second scale: a slightly larger resize, so its corner crops differ
CROPS = ("center", "top-left", "top-right", "bottom-left", "bottom-right")
MAX_VIEWS = 2 + 2 * len(CROPS)


def check_views(views: int, flag: str = "--tta") -> None:
    """Refuse a view count outside ``1..MAX_VIEWS`` (a :class:`UsageError`, exit 2)."""
    if not 1 <= views <= MAX_VIEWS:
        raise UsageError(
            f"{flag} must be between 1 (no test-time augmentation) and {MAX_VIEWS} (the plain "
            f"crop, 5 crops of a {LARGER}x larger resize, and the flips of all six); got {views}."
        )


class ViewsTransform:
    """The first ``views`` TTA views of an image, stacked: ``views x S x S x 3`` uint8."""

    def __init__(self, size: int, views: int, resize_ratio: float = BOOK_RESIZE):
        check_views(views)
        self.plain = TestTransform(size, resize_ratio)
        self.size = size
        self.views = views
        self.larger = max(size, int(round(self.plain.resize * LARGER)))

    def crop_box(self, name: str) -> tuple[int, int, int, int]:
        """The ``(left, top, right, bottom)`` of crop ``name`` in the larger resize."""
        span = self.larger - self.size
        left = {"center": span // 2, "top-left": 0, "bottom-left": 0}.get(name, span)
        top = {"center": span // 2, "top-left": 0, "top-right": 0}.get(name, span)
        return left, top, left + self.size, top + self.size

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        plain = self.plain(img)
        unflipped = [plain]
        if self.views > 2:
            larger = img.resize((self.larger, self.larger), Image.BILINEAR)
            crops = CROPS[: (self.views - 1) // 2]
            unflipped += [np.asarray(larger.crop(self.crop_box(c)), np.uint8) for c in crops]
        # Each view followed by its mirror image (a flip of the width axis).
        views = [v for crop in unflipped for v in (crop, crop[:, ::-1])]
        return np.stack(views[: self.views])


def eval_transform(size: int, views: int = 1, resize_ratio: float = BOOK_RESIZE):
    """The evaluation transform of ``--tta views``: the plain one for 1, else the views;
    ``resize_ratio`` is ``--eval-resize`` (the plain view's resize over its crop)."""
    check_views(views)
    if views == 1:
        return TestTransform(size, resize_ratio)
    return ViewsTransform(size, views, resize_ratio)


def view_logits(net, images, prepare=normalize_batch):
    """``net``'s logits for a device batch: ``B x N x S x S x 3`` views as the mean of the N
    views' float32 logits; anything else (plain images, cached features) as it is."""
    if images.ndim != 5:
        return net(prepare(images))
    views = images.shape[1]
    total = None
    for view in range(views):
        one = images.slice_axis(axis=1, begin=view, end=view + 1).squeeze(axis=1)
        logits = net(prepare(one)).astype("float32", copy=False)
        total = logits if total is None else total + logits
    return total / views
