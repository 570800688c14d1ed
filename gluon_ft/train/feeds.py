"""What a run trains and evaluates on: the dataset's parts and the loaders over them.

One place builds the train and test loaders of a config (:func:`image_loaders`): ``train``,
the feature cache and the notebooks all call it, so the augmentation cannot drift between
them. With ``--cache-features`` the loaders hold the frozen backbone's stored outputs
instead, and each step runs the head alone (:func:`make_feeds`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mxnet import gluon

from gluon_ft.data import splits
from gluon_ft.data.folders import check_dataset, unreadable_in
from gluon_ft.data.hotdog import hotdog_root
from gluon_ft.data.labels import describe_bad_rows, read_labels
from gluon_ft.data.loaders import make_loader
from gluon_ft.data.recordio import load_pack, pack_prefix
from gluon_ft.data.splits import DatasetParts
from gluon_ft.data.transforms import normalize_batch
from gluon_ft.errors import UsageError
from gluon_ft.train.config import TrainConfig


@dataclass(frozen=True)
class LabelsFile:
    """``--labels FILE.csv`` with its ``--label-delim``, and ``--multi-label`` (True: the
    parts are multi-label even when every row has one label; None: the rows decide)."""

    path: str
    delimiter: str = " "
    multi_label: bool | None = None

    @classmethod
    def of(cls, config: TrainConfig) -> LabelsFile | None:
        """The labels file of ``config``; None for folders of classes."""
        if not config.labels:
            return None
        return cls(config.labels, config.label_delim, True if config.multi_label else None)


def load_dataset(
    spec: str,
    val_split: float | None = None,
    test_split: float | None = None,
    seed: int = 0,
    saved: dict | None = None,
    labels: LabelsFile | None = None,
    notes: list[str] | None = None,
) -> DatasetParts:
    """The parts of ``--data hotdog``, ``DIR`` (either layout) or a RecordIO ``PREFIX``.

    ``saved`` is a run's ``split.json``: a resumed run gets the same parts, not a new split.
    A pack (``gluon-ft pack``) gives its train and test splits, with the same interface.
    With ``labels`` the parts are the rows of the labels file, its image paths under ``spec``
    (:func:`gluon_ft.data.splits.split_labels`); the rows left out are described in one
    line appended to ``notes``.

    Raises
    ------
    UsageError
        No dataset there, or fractions the layout cannot use (see
        :func:`gluon_ft.data.splits.split_dataset`).
    """
    if spec != "hotdog" and pack_prefix(spec) is not None:
        if labels is not None:
            raise UsageError(
                f"--data {spec} is a RecordIO pack, which holds its labels; with --labels, "
                "--data names the folder the labels file's image paths are relative to."
            )
        if val_split or test_split:
            raise UsageError(
                f"--data {spec} is a RecordIO pack of a train and a test split: "
                "--val-split and --test-split split image folders only."
            )
        train, test = load_pack(spec)
        return DatasetParts(Path(spec).absolute(), splits.PACK, train, test)
    root = hotdog_root() if spec == "hotdog" else Path(spec).expanduser()
    if saved is not None:
        return splits.parts_from_record(root, saved)
    if labels is not None:
        table = read_labels(labels.path, root, labels.delimiter)
        if table.bad_rows and notes is not None:
            notes.append(f"warning: {labels.path}: {describe_bad_rows(table.bad_rows)}")
        return splits.split_labels(table, val_split, test_split, seed, labels.multi_label)
    return splits.split_dataset(root, val_split, test_split, seed)


def check_batch_fits(batch_size: int, parts: DatasetParts) -> None:
    """Refuse a ``--batch-size`` larger than the train part: its one batch would be smaller
    than asked, with every step's statistics and learning rate set for the larger one."""
    train_size = len(parts.train)
    if batch_size > train_size:
        raise UsageError(
            f"--batch-size {batch_size} is larger than the training set ({train_size} images): "
            f"every epoch would be one batch of {train_size}. Pass --batch-size {train_size} or "
            "less, or add images."
        )


def require_readable(parts: DatasetParts, image_size: int) -> None:
    """``--strict``: refuse a dataset with any unreadable image, listing them."""
    report = check_dataset(parts.root, image_size)
    bad = unreadable_in(report)
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
    book's test transform in order. A distributed worker reads its ``shard`` of each.

    ``test_split`` is whichever split is evaluated each epoch: val when there is one."""
    train_loader = make_loader(
        train_split,
        config.train_transform(),
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        workers=config.workers,
        shard=shard,
        num_shards=num_shards,
        # A multi-label run refuses --sampler balanced (train.run.check_multi_label).
        probabilities=None
        if config.multi_label
        else config.sample_probabilities(train_split.labels()),
    )
    test_loader = make_loader(
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
    eval: object  # evaluated after each epoch: the val split, or test without one
    net: gluon.Block  # the whole network, or its head on cached features
    prepare: Callable = normalize_batch  # a device batch -> the network's input
    cache: object = None  # the feature cache's report (features_cache.CacheReport)
    eval_part: str = "test"  # which part `eval` reads: "val" or "test"
    after_head: Callable | None = None  # --head-epochs: the feeds of the epochs after them
    # What scores `eval` when not `net` and `prepare`: the whole network on images
    eval_net: gluon.Block | None = None
    eval_prepare: Callable | None = None
    train_split: object = None  # the train part behind `train`, to name its unreadable files

    def scorer(self) -> tuple[gluon.Block, Callable]:
        """``(network, prepare)`` that score the ``eval`` batches."""
        if self.eval_net is None:
            return self.net, self.prepare
        return self.eval_net, self.eval_prepare


def make_feeds(
    config: TrainConfig, net, parts: DatasetParts, ctx, dist, first_epoch: int = 0
) -> Feeds:
    """The image loaders, or with ``--cache-features`` the cached features and the head.

    Each epoch evaluates the val part, or the test part when there is no val part. With
    ``--head-epochs E`` (and ``first_epoch`` < E), the first E epochs train the head on cached
    features, one cached view per epoch (exactly the augmentation the images would get), and
    ``after_head()`` gives the image loaders of the rest. With ``--tta`` the head epochs are
    scored as the rest are, on the images' views through the whole network (the cache holds
    the plain view's features only), so that the best epoch is chosen among like scores.
    With ``--bn train`` the head epochs train the BatchNorm layers too, on the images: no cache.
    """
    if config.head_epochs > first_epoch and not config.freeze_plan().live_head:
        head = replace(config, cache_features=True, cache_views=config.head_epochs, tta=1)
        feeds = make_feeds(replace(head, head_epochs=0), net, parts, ctx, dist)
        rest = replace(config, head_epochs=0)
        feeds.after_head = lambda: make_feeds(rest, net, parts, ctx, dist)
        if config.tta > 1:
            evaluated = parts.val if parts.val is not None else parts.test
            loaders = image_loaders(rest, parts.train, evaluated, dist.rank, dist.num_workers)
            feeds.eval, feeds.eval_net, feeds.eval_prepare = loaders[1], net, normalize_batch
        return feeds
    eval_part = "val" if parts.val is not None else "test"
    evaluated = parts.val if parts.val is not None else parts.test
    if not config.cache_features:
        loaders = image_loaders(config, parts.train, evaluated, dist.rank, dist.num_workers)
        return Feeds(*loaders, net, eval_part=eval_part, train_split=parts.train)
    from gluon_ft.train.features_cache import feature_loaders

    train_loader, eval_loader, head_part, cache = feature_loaders(
        net, parts.train, evaluated, ctx, config, dist.rank, dist.num_workers
    )
    return Feeds(
        train_loader,
        eval_loader,
        head_part,
        lambda features: features,
        cache,
        eval_part,
        train_split=parts.train,
    )
