"""What a run trains and evaluates on: the dataset's splits and the loaders over them.

One place builds the train and test loaders of a config (:func:`image_loaders`): ``train``,
the feature cache and the notebooks all call it, so the augmentation cannot drift between
them. With ``--cache-features`` the loaders hold the frozen backbone's stored outputs
instead, and each step runs the head alone (:func:`make_feeds`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mxnet import gluon

from gluon_ft import data as gdata
from gluon_ft.errors import UsageError
from gluon_ft.recordio import load_pack, pack_prefix
from gluon_ft.train.config import TrainConfig


def load_dataset(spec: str) -> tuple[gdata.ImageFolderSplit, gdata.ImageFolderSplit]:
    """Return the train and test splits for ``--data hotdog``, ``DIR`` or a RecordIO ``PREFIX``.

    A pack (``gluon-ft pack``) gives splits with the same interface, classes and labels.
    """
    if spec != "hotdog" and pack_prefix(spec) is not None:
        return load_pack(spec)
    root = gdata.hotdog_root() if spec == "hotdog" else Path(spec).expanduser()
    return gdata.scan_dataset(root)


def require_readable(train_split: gdata.ImageFolderSplit, image_size: int) -> None:
    """``--strict``: refuse a dataset with any unreadable image, listing them."""
    report = gdata.check_dataset(train_split.root.parent, image_size)
    bad = gdata.unreadable_in(report)
    if bad:
        shown = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:20])
        more = f"; and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise UsageError(
            f"--strict: {len(bad)} unreadable image file(s) in {report['root']}: {shown}{more}. "
            "Remove or replace them, or leave out --strict to skip them."
        )


def image_loaders(
    config: TrainConfig, train_split, test_split, shard: int = 0, num_shards: int = 1
) -> tuple:
    """The ``(train, test)`` loaders of ``config``: shuffled augmented batches, and the
    book's test transform in order. A distributed worker reads its ``shard`` of each."""
    train_loader = gdata.make_loader(
        train_split,
        config.train_transform(),
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        workers=config.workers,
        shard=shard,
        num_shards=num_shards,
    )
    test_loader = gdata.make_loader(
        test_split,
        config.test_transform(),
        config.batch_size,
        shuffle=False,
        workers=config.workers,
        shard=shard,
        num_shards=num_shards,
    )
    return train_loader, test_loader


@dataclass
class Feeds:
    """The loaders of a run, and what each step runs on what they give."""

    train: object
    test: object
    net: gluon.Block  # the whole network, or its head on cached features
    prepare: Callable = gdata.normalize_batch  # a device batch -> the network's input
    cache: object = None  # the feature cache's report (features_cache.CacheReport)


def make_feeds(config: TrainConfig, net, train_split, test_split, ctx, dist) -> Feeds:
    """The image loaders, or with ``--cache-features`` the cached features and the head."""
    if not config.cache_features:
        loaders = image_loaders(config, train_split, test_split, dist.rank, dist.num_workers)
        return Feeds(*loaders, net)
    from gluon_ft.train.features_cache import feature_loaders

    train_loader, test_loader, head_part, cache = feature_loaders(
        net, train_split, test_split, ctx, config, dist.rank, dist.num_workers
    )
    return Feeds(train_loader, test_loader, head_part, lambda features: features, cache)
