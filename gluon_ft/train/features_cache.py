"""Cached backbone features: train a head on a frozen backbone without re-running it.

With the whole backbone frozen, BatchNorm included (``--freeze features``, ``--bn freeze``),
its output for an image depends only on the weights, the image and the transform. So
``--cache-features`` runs the backbone once per image and view, and the head's epochs run on
the stored arrays:

- the test split through the test transform, once;
- the train split through the train augmentation, ``--cache-views K`` times: view ``k`` is
  exactly the augmentation the uncached run draws in epoch ``k`` (the per-sample generator is
  seeded by ``(seed, epoch, index)``), and epoch ``e`` uses view ``e % K``. With ``K`` >= the
  epochs, training equals the uncached frozen run. Under ``--sampler balanced`` view ``k``
  holds epoch ``k``'s draws, one row per position (an image drawn twice, two views), and an
  epoch ``e`` >= ``K`` replays view ``e % K``'s draws.

The backbone is what comes before the classifier in the network's run order, or before its
first Dropout; the head part, which every step runs on the stored arrays, is the rest: the
classifier with what follows it (MobileNet V2's Flatten) and any frozen layers after a
Dropout. One probe image checks that the two parts compute what the network does, before any
feature is computed (:func:`cache_split`).

Each view is a file under ``$MXNET_HOME/features/`` named by a digest of the backbone's
weights, the image files (name, size, modification time), the transform, the seed and view,
and the dtype. An lr sweep over the same frozen backbone pays for the features once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

from gluon_ft.data.loaders import EpochBatchSampler, TransformedSplit, collate
from gluon_ft.data.transforms import normalize_batch
from gluon_ft.errors import UsageError
from gluon_ft.model.freeze import is_batchnorm
from gluon_ft.model.graft import contains_block, get_head, walk_blocks
from gluon_ft.paths import mxnet_home, replacing
from gluon_ft.train.devices import split_batch

CACHE_FORMAT = "gluon-ft-features/1"


def cache_dir() -> Path:
    """Where feature files live: ``$MXNET_HOME/features``."""
    return mxnet_home() / "features"


def run_order(net: gluon.Block) -> list[gluon.Block]:
    """``net``'s children in registration order, plain Sequentials opened into theirs.

    For the zoo's ``features`` + ``output`` networks this is the order the forward pass runs
    them in; :func:`cache_split` checks that it is, with one probe image.
    """
    order: list[gluon.Block] = []
    for child in net._children.values():
        opened = type(child) in (nn.HybridSequential, nn.Sequential)
        for block in child._children.values() if opened else [child]:
            if all(block is not seen for seen in order):  # GoogLeNet registers its head twice
                order.append(block)
    return order


def _sequence(net: gluon.Block, blocks: list[gluon.Block]) -> gluon.Block:
    """One block that runs ``blocks`` in order: the network's own container if it is one."""
    if len(blocks) == 1:
        return blocks[0]
    for child in net._children.values():
        held = list(child._children.values())
        if len(held) == len(blocks) and all(a is b for a, b in zip(held, blocks)):
            return child  # net.features, net.output: hybridized with the network
    chain = nn.HybridSequential()
    chain.add(*blocks)  # the blocks stay the network's: the same Parameters
    return chain


def _is_random(block: gluon.Block) -> bool:
    """Dropout, DropBlock: random in training, so their output cannot be stored."""
    return any("Drop" in type(b).__name__ for _, b in walk_blocks(block))


def cache_split(net: gluon.Block, image_size: int, ctx, dtype: str = "float32"):
    """Return ``(backbone, head part)``: what runs once per image, and what runs every step.

    The backbone is the network's blocks in :func:`run_order` up to the first random one
    (Dropout) or the one holding the classifier; the head part is everything from there on:
    the classifier with what follows it (MobileNet V2's Flatten, SqueezeNet's pooling), and
    the frozen layers after a Dropout (VGG's, Inception v3's).

    Raises
    ------
    UsageError
        Before any feature is computed: a backbone parameter trains, a backbone BatchNorm
        uses batch statistics, the network starts with a random block, or the two parts do
        not compute what the whole network does (its forward pass is not a chain of its
        blocks, as in NASNet or DarkNet).
    """
    _, head = get_head(net)
    order = run_order(net)
    first_head = next(i for i, block in enumerate(order) if contains_block(block, head))
    cut = next((i for i, b in enumerate(order[:first_head]) if _is_random(b)), first_head)
    if cut == 0:
        raise UsageError(
            f"--cache-features: {type(net).__name__} has no fixed part before its "
            f"{type(order[0]).__name__} to cache. Train without --cache-features."
        )
    backbone, head_part = _sequence(net, order[:cut]), _sequence(net, order[cut:])
    _check_frozen(backbone)
    _check_same_output(net, backbone, head_part, image_size, ctx[0], dtype)
    return backbone, head_part


def _check_frozen(backbone: gluon.Block) -> None:
    """Refuse a backbone whose output would change during training."""
    trainable = [p.name for p in backbone.collect_params().values() if p.grad_req != "null"]
    blocks = [b for _, b in walk_blocks(backbone)]
    live_bn = [b.name for b in blocks if is_batchnorm(b) and not b._kwargs["use_global_stats"]]
    problems = []
    if trainable:
        problems.append(f"{len(trainable)} backbone parameter(s) train (e.g. {trainable[0]})")
    if live_bn:
        problems.append(f"{len(live_bn)} BatchNorm layer(s) use batch statistics")
    if problems:
        raise UsageError(
            "--cache-features reuses the backbone's output, so the backbone must be frozen "
            f"whole, BatchNorm included: {'; '.join(problems)}. Pass --freeze features "
            "(with the default --bn freeze), or leave out --cache-features."
        )


def _check_same_output(net, backbone, head_part, image_size: int, ctx, dtype: str) -> None:
    """Refuse a split whose two parts, run one after the other, differ from ``net``."""
    pixels = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3))
    x = normalize_batch(mx.nd.array(pixels, ctx=ctx, dtype="uint8"))
    try:  # in predict mode: BatchNorm uses its running statistics, Dropout passes through
        whole = net(x).astype("float32").asnumpy()
        parts = head_part(backbone(x).astype("float32")).astype("float32").asnumpy()
        problem = None if parts.shape == whole.shape else f"shape {parts.shape}, not {whole.shape}"
    except (mx.base.MXNetError, TypeError, ValueError) as err:
        problem = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    if problem is None:
        tolerance = 1e-4 if dtype == "float32" else 3e-2  # bf16/fp16 keep about 3 digits
        scale = 1.0 + float(np.abs(whole).max())
        if not np.allclose(parts, whole, rtol=tolerance, atol=tolerance * scale):
            problem = f"outputs differ by up to {float(np.abs(parts - whole).max()):.3g}"
    if problem is not None:
        raise UsageError(
            f"--cache-features cannot split {type(net).__name__} into a cached backbone and "
            f"a head: its forward pass is not its blocks run in order ({problem}). Train "
            "without --cache-features."
        )


def weights_digest(block) -> str:
    """sha1 of ``block``'s parameters by structural name (``5.0.conv1.weight``), shape, bytes."""
    digest = hashlib.sha1()
    for name, param in sorted(block._collect_params_with_prefix().items()):
        value = param.data(param.list_ctx()[0]).asnumpy()
        digest.update(f"{name}:{value.dtype}:{value.shape}\n".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def files_digest(split) -> str:
    """sha1 of a split's classes, items and source files' size and modification time.

    A RecordIO split names its pack files (``pack_files``); a folder split its image files.
    """
    digest = hashlib.sha1(json.dumps([split.classes, split.items]).encode())
    files = getattr(split, "pack_files", None) or [path for path, _ in split.items]
    for path in files:
        try:
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}:missing\n".encode())
    return digest.hexdigest()


def describe_transform(transform) -> dict:
    """The class and settings of a transform, which decide its output for an image."""
    settings = {k: v for k, v in sorted(vars(transform).items()) if not k.startswith("_")}
    return {"class": f"{type(transform).__module__}.{type(transform).__qualname__}", **settings}


@dataclass
class FeatureKey:
    """Everything a cached view's content depends on."""

    weights: str
    files: str
    transform: dict
    view: int | None  # the train augmentation's epoch, None for a deterministic transform
    seed: int | None
    dtype: str
    draws: str | None = None  # sha1 of --sampler balanced's probabilities: a row per draw

    def digest(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if k != "draws" or v is not None}
        text = json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()

    def path(self, folder: Path) -> Path:
        return folder / f"{self.digest()}.npz"


class _IndexedSamples:
    """A :class:`gluon_ft.data.loaders.TransformedSplit` whose samples carry their row, not label:
    the image's index, or a draw's position in the epoch (``(index, epoch, draw)`` keys).

    :func:`gluon_ft.data.loaders.collate` then stacks the rows where labels would be, so a batch
    with an unreadable file (dropped) still says which rows it holds.
    """

    def __init__(self, samples: TransformedSplit):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        sample = self.samples[key]
        return None if sample is None else (sample[0], key[-1] if len(key) > 2 else key[0])


def compute_features(
    backbone, split, transform, ctx, *, view=0, seed=0, batch_size=64, workers=0, probabilities=None
):
    """Run ``backbone`` (predict mode) over every image of ``split`` through ``transform``;
    with ``probabilities`` (``--sampler balanced``), over epoch ``view``'s draws instead.

    Returns
    -------
    tuple of np.ndarray
        ``(features float32 [N, ...], valid bool [N], images int64 [N])``: row ``r`` holds
        the features of image ``images[r]`` (of draw ``r`` with ``probabilities``, else of
        image ``r``); an unreadable image's row is invalid.
    """
    from mxnet.gluon.data import DataLoader

    sampler = EpochBatchSampler(
        len(split), batch_size, shuffle=False, seed=seed, probabilities=probabilities
    )
    sampler.set_epoch(view)
    dataset = _IndexedSamples(TransformedSplit(split, transform, seed))
    loader = DataLoader(dataset, batch_sampler=sampler, batchify_fn=collate, num_workers=workers)
    features, valid = None, np.zeros(len(split), dtype=bool)
    for images, indices, _ in loader:
        if images is None:
            continue
        xs, parts = split_batch(images, indices, ctx)
        for x, part in zip(xs, parts):
            out = backbone(normalize_batch(x)).astype("float32").asnumpy()
            if features is None:
                features = np.zeros((len(split), *out.shape[1:]), dtype=np.float32)
            rows = part.asnumpy().astype(np.int64)
            features[rows] = out
            valid[rows] = True
    if features is None:
        raise UsageError(f"{split.root}: no readable image to compute features from.")
    return features, valid, sampler.order().astype(np.int64)


def _save(path: Path, features, valid, images, key: FeatureKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"features": features, "valid": valid, "key": np.array(json.dumps(key.__dict__))}
    if key.draws is not None:  # else row r is image r
        arrays["images"] = images
    with replacing(path) as tmp, open(tmp, "wb") as out:  # a concurrent run reads all or none
        np.savez(out, **arrays)


def _load(path: Path, size: int):
    try:
        with np.load(path) as stored:
            features, valid = stored["features"], stored["valid"]
            images = stored["images"] if "images" in stored.files else np.arange(len(valid))
    except (OSError, ValueError, KeyError):
        return None  # unreadable or truncated by hand: compute it again
    return (features, valid, images) if len(valid) == len(images) == size else None


@dataclass
class CacheReport:
    """What :func:`cached_views` found and computed, for ``config.json`` and the log."""

    folder: str
    hits: list[str] = field(default_factory=list)
    built: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"feature cache {self.folder}: {len(self.hits)} view(s) reused, "
            f"{len(self.built)} computed in {self.seconds:.1f}s"
        )


def cached_views(
    backbone,
    split,
    transform,
    ctx,
    views,
    *,
    seed,
    dtype,
    batch_size,
    workers,
    report,
    probabilities=None,
):
    """Return ``[(features, valid, images)]`` for each view in ``views`` (see
    :func:`compute_features`), from the cache or computed.

    ``views`` is a list of train epochs (``[0, 1, ...]``) or ``[None]`` for a deterministic
    transform; ``probabilities`` makes each view its epoch's draws (``--sampler balanced``).
    """
    weights, files = weights_digest(backbone), files_digest(split)
    described = describe_transform(transform)
    draws = None if probabilities is None else hashlib.sha1(probabilities.tobytes()).hexdigest()
    out = []
    for view in views:
        view_seed = None if view is None else seed
        key = FeatureKey(weights, files, described, view, view_seed, dtype, draws)
        path = key.path(Path(report.folder))
        loaded = _load(path, len(split)) if path.is_file() else None
        if loaded is not None:
            report.hits.append(path.name)
        else:
            started = time.perf_counter()
            loaded = compute_features(
                backbone,
                split,
                transform,
                ctx,
                view=view or 0,
                seed=seed,
                batch_size=batch_size,
                workers=workers,
                probabilities=probabilities,
            )
            _save(path, *loaded, key)
            report.seconds += time.perf_counter() - started
            report.built.append(path.name)
        out.append(loaded)
    return out


class FeatureLoader:
    """The batches an image loader would give, with cached features in place of images.

    The same :class:`gluon_ft.data.loaders.EpochBatchSampler` (order, sharding, resume skipping),
    and the same drops: a sample whose image was unreadable is skipped and counted. Epoch
    ``e`` reads view ``e % len(views)``: by image, or by draw (a key's position) where the
    views hold draws, each labelled with the image its row holds.
    """

    def __init__(
        self,
        views,
        labels,
        batch_size,
        *,
        shuffle,
        seed=0,
        shard=0,
        num_shards=1,
        probabilities=None,
    ):
        self.views = views
        # Class indices as int32; a multi-label part's (N, C) multi-hot rows stay float32.
        labels = np.asarray(labels)
        self.labels = labels.astype(np.float32 if labels.ndim == 2 else np.int32)
        self._batch_sampler = EpochBatchSampler(
            len(self.labels), batch_size, shuffle, seed, shard, num_shards, probabilities
        )

    def __len__(self) -> int:
        return len(self._batch_sampler)

    def __iter__(self):
        for keys in self._batch_sampler:
            rows = np.array([key[-1] if len(key) > 2 else key[0] for key in keys], dtype=np.int64)
            features, valid, images = self.views[self._batch_sampler.epoch % len(self.views)]
            ok = rows[valid[rows]]
            skipped = len(rows) - len(ok)
            if not len(ok):
                yield None, None, skipped
                continue
            yield features[ok], self.labels[images[ok]], skipped


def split_labels(split) -> np.ndarray:
    """What a loader labels ``split``'s items with: class indices, or the ``(N, C)``
    multi-hot targets of a multi-label part (:class:`gluon_ft.data.labels.MultiLabelSplit`)."""
    return split.targets() if hasattr(split, "targets") else split.labels()


def feature_loaders(net, train_split, test_split, ctx, config, shard=0, num_shards=1):
    """Return ``(train loader, test loader, head part, report)``.

    The loaders give the features of ``net``'s frozen backbone (:class:`FeatureLoader`); the
    head part runs on them (see :func:`cache_split`).

    Raises
    ------
    UsageError
        The network cannot be split for the cache (see :func:`cache_split`); nothing was
        computed.
    """
    backbone, head_part = cache_split(net, config.image_size, ctx, config.dtype)
    report = CacheReport(str(cache_dir()))
    common = {"seed": config.seed, "dtype": config.dtype, "batch_size": config.batch_size}
    common["workers"] = config.workers
    train_labels = split_labels(train_split)
    # A multi-label run refuses --sampler balanced (train.run.check_multi_label).
    probabilities = None if train_labels.ndim == 2 else config.sample_probabilities(train_labels)
    train_views = cached_views(
        backbone,
        train_split,
        config.train_transform(),
        ctx,
        list(range(config.cache_views)),
        report=report,
        probabilities=probabilities,
        **common,
    )
    test_views = cached_views(
        backbone,
        test_split,
        config.test_transform(),
        ctx,
        [None],
        report=report,
        **common,
    )
    train_loader = FeatureLoader(
        train_views,
        train_labels,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        shard=shard,
        num_shards=num_shards,
        probabilities=probabilities,
    )
    test_loader = FeatureLoader(
        test_views,
        split_labels(test_split),
        config.batch_size,
        shuffle=False,
        shard=shard,
        num_shards=num_shards,
    )
    return train_loader, test_loader, head_part, report
