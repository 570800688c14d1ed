"""Loaders: a split with its transform, the epoch's batch order (sharded, resumable), batches."""

from __future__ import annotations

import math

import numpy as np

from gluon_ft.data.decode import UnreadableImageError
from gluon_ft.data.folders import ImageFolderSplit
from gluon_ft.data.transforms import sample_rng


class TransformedSplit:
    """A Gluon dataset over an :class:`ImageFolderSplit`, keyed by ``(index, epoch)``, or
    ``(index, epoch, draw)`` for a draw with replacement (see :class:`EpochBatchSampler`).

    An unreadable file gives ``None`` instead of raising, so that one bad photo never kills an
    epoch; :func:`collate` drops it and counts it. The label of a multi-label split's item
    (:class:`~gluon_ft.data.labels.MultiLabelSplit`) is its multi-hot row.
    """

    def __init__(self, split: ImageFolderSplit, transform, seed: int = 0):
        self.split = split
        self.transform = transform
        self.seed = seed
        targets = getattr(split, "targets", None)  # only a multi-label split has them
        self.targets = targets() if targets is not None else None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        index, epoch, *draw = key if isinstance(key, tuple) else (key, 0)
        label = self.split.items[index][1] if self.targets is None else self.targets[index]
        try:
            img = self.split.load(index)
        except UnreadableImageError:
            return None
        return self.transform(img, sample_rng(self.seed, epoch, index, *draw)), label


def collate(samples: list) -> tuple:
    """Stack decoded samples into ``(uint8 NHWC batch, int32 labels, skipped count)``; the
    labels of multi-label samples are ``(N, C)`` float32 multi-hot rows."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return None, None, skipped
    images = np.stack([image for image, _ in good])
    if isinstance(good[0][1], np.ndarray):
        labels = np.stack([label for _, label in good]).astype(np.float32, copy=False)
    else:
        labels = np.array([label for _, label in good], dtype=np.int32)
    return images, labels, skipped


class EpochBatchSampler:
    """Batches of ``(index, epoch)`` keys: reshuffled per epoch from a shared seed, sharded.

    A draw with replacement (``probabilities``) yields ``(index, epoch, draw)`` keys, ``draw``
    the key's position in the epoch's order: an image drawn twice gets two augmentations,
    the same whatever the shards, and a resumed epoch gives its remaining draws theirs.

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
        return np.array([key[0] for batch in self for key in batch], dtype=np.int64)

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
            end = min(start + self.batch_size, self.size)
            draws = range(start, end)[self.shard :: self.num_shards]
            if self.probabilities is None:
                yield [(int(order[d]), self.epoch) for d in draws]
            else:
                yield [(int(order[d]), self.epoch, d) for d in draws]

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
