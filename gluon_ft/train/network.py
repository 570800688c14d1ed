"""The network a run trains, and its Trainer.

The book's graft (a source model's body under a new head, Xavier-initialized, learning
``--head-lr-mult`` times faster) or the scratch twin, then the freeze plan, a first
predict-mode pass for the shapes, ``hybridize``, the loss and the optimizer (the book's SGD,
or ``--optimizer adamw``).
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet import gluon

from gluon_ft.data.balance import inverse_frequency
from gluon_ft.data.transforms import normalize_batch
from gluon_ft.errors import UsageError
from gluon_ft.model import zoo
from gluon_ft.model.graft import build_model, graft_new_head, load_source_model, scratch_twin
from gluon_ft.train import amp
from gluon_ft.train.adamw import AdamW
from gluon_ft.train.config import TrainConfig
from gluon_ft.train.dist import DistContext
from gluon_ft.train.multilabel_loss import MultiLabelLoss


def check_image_size(config: TrainConfig) -> None:
    """Refuse, before any work, an ``--image-size`` the model cannot take at all (VGG's
    dense layers: :func:`~gluon_ft.model.zoo.check_input_size`), or one below its total
    downsampling."""
    net = build_model(config.model, 2, config.image_size)
    zoo.check_input_size(net, config.model, config.image_size)
    smallest = zoo.min_input_size(config.model)
    if config.image_size < smallest:
        raise UsageError(
            f"--image-size {config.image_size} is below what {config.model} takes: it shrinks "
            f"images {smallest} times, so its last feature map would be less than one pixel "
            f"(mostly padding). Pass --image-size {smallest} or more "
            f"({zoo.lookup(config.model).input_size} is its native size)."
        )


def build_network(config: TrainConfig, num_classes: int, ctx: list[mx.Context]):
    """Return ``(net, source)``: the graft for pretrained weights, else the scratch twin."""
    if config.pretrained == "none":
        return scratch_twin(config.model, num_classes, ctx, config.image_size), None
    source = load_source_model(config.model, config.pretrained, config.image_size)
    return graft_new_head(source, num_classes, config.head_lr_mult, ctx), source


def ready_network(config: TrainConfig, num_classes: int, ctx: list[mx.Context], build=None):
    """Return ``(net, source, plan)``: the network as a run trains it, frozen as planned, its
    shapes inferred, hybridized.

    ``build`` makes ``(net, source)``; :func:`build_network` by default. Seeded by ``--seed``
    first: the new head's initialization draws from ``mx.random``.
    """
    mx.random.seed(config.seed)
    net, source = (build or build_network)(config, num_classes, ctx)
    zoo.check_input_size(net, config.model, config.image_size)  # e.g. SqueezeNet below 224 px
    plan = config.freeze_plan()
    plan.setup(net)
    amp.prepare_network(net, config.dtype)  # bfloat16: the stem stays float32
    infer_shapes(net, config, ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    return net, source, plan


class ClassWeightedLoss:
    """Softmax cross-entropy with each sample's term weighted by its class's weight."""

    def __init__(self, class_weights, ctx: list[mx.Context]):
        self.loss = gluon.loss.SoftmaxCrossEntropyLoss()
        self.weights = {c: mx.nd.array(class_weights, ctx=c) for c in ctx}

    def __call__(self, out, label):
        weights = self.weights[label.context].take(label).reshape((-1, 1))
        return self.loss(out, label, weights)


class SoftTargetLoss:
    """Cross-entropy against dense targets: label smoothing, mixed targets, class weights.

    A target is a row of class probabilities (mixup and CutMix give ``lam * onehot(y) +
    (1 - lam) * onehot(y')``) or a class index (made one-hot). Label smoothing ``F`` then
    makes ``(1 - F) * target + F / K`` over the ``K`` classes: ``1 - F + F / K`` on the class
    and ``F / K`` on each other, the timm and GluonCV convention. Class weights ``w`` weight
    each class's term, ``-sum_k w_k * target_k * log p_k``, as PyTorch's ``CrossEntropyLoss``
    does for probability targets; for a one-hot target that is ``w_y * CE``.
    """

    def __init__(self, num_classes: int, smoothing: float, class_weights, ctx: list[mx.Context]):
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.loss = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=False)
        self.weights = None
        if class_weights is not None:
            self.weights = {c: mx.nd.array(class_weights, ctx=c).reshape((1, -1)) for c in ctx}

    def __call__(self, out, target):
        if target.ndim == 1:
            target = mx.nd.one_hot(target, self.num_classes)
        if self.smoothing:
            target = target * (1.0 - self.smoothing) + self.smoothing / self.num_classes
        if self.weights is not None:
            target = mx.nd.broadcast_mul(target, self.weights[target.context])
        return self.loss(out, target)


def make_loss(config: TrainConfig, train_labels, num_classes: int, ctx: list[mx.Context]):
    """The training loss: plain, or with ``--class-weights auto`` weighted by the inverse
    frequency of each class in the train part.

    Multi-hot ``train_labels`` (``(N, C)``, a multi-label run) give
    :class:`~gluon_ft.train.multilabel_loss.MultiLabelLoss` (:func:`multilabel_loss`).

    With ``--label-smoothing``, ``--mixup`` or ``--cutmix`` it is :class:`SoftTargetLoss`
    (the weights on each class's term); without them the book's sparse-label loss, bit for
    bit, or :class:`ClassWeightedLoss` (the weights as the loss's sample weights).
    """
    if np.ndim(train_labels) == 2:
        return multilabel_loss(config, train_labels, ctx)
    weights = None
    if config.class_weights != "none":
        weights = inverse_frequency(train_labels, num_classes)
    if config.label_smoothing or config.mixup or config.cutmix:
        return SoftTargetLoss(num_classes, config.label_smoothing, weights, ctx)
    if weights is None:
        return gluon.loss.SoftmaxCrossEntropyLoss()
    return ClassWeightedLoss(weights, ctx)


def multilabel_loss(config: TrainConfig, targets, ctx: list[mx.Context]) -> MultiLabelLoss:
    """The sigmoid loss of a multi-label run with ``--label-smoothing``; ``--class-weights
    auto`` weights each class's positive term by its negatives over its positives in the
    train part (``targets``, multi-hot), as PyTorch's ``pos_weight`` is usually set."""
    weights = None
    if config.class_weights != "none":
        positives = np.asarray(targets, dtype=np.float64).sum(axis=0)
        weights = (len(targets) - positives) / np.maximum(positives, 1.0)
    return MultiLabelLoss(config.label_smoothing, weights, ctx)


def make_trainer(
    net: gluon.Block, config: TrainConfig, ctx: list[mx.Context], dist: DistContext | None = None
) -> gluon.Trainer:
    """SGD (or ``--optimizer adamw``: :class:`~gluon_ft.train.adamw.AdamW`) over every
    parameter; ``grad_req='null'`` ones are skipped by the Trainer itself.

    A distributed ``dist`` brings its own kvstore (see :meth:`DistContext.trainer_options`).
    """
    params = {"learning_rate": config.lr, "wd": config.wd}
    if config.optimizer == "adamw":
        optimizer = AdamW.__name__.lower()  # the name its registration gives it
    else:
        optimizer = "sgd"
        if config.momentum:
            params["momentum"] = config.momentum
    if dist is not None and dist.distributed:
        options = dist.trainer_options()
    else:
        # One context needs no kvstore; several aggregate on the device kvstore.
        kvstore = config.kvstore or ("device" if len(ctx) > 1 else None)
        options = {"kvstore": kvstore, **amp.trainer_kwargs(config.dtype)}
    trainer = gluon.Trainer(net.collect_params(), optimizer, params, **options)
    amp.prepare_trainer(trainer, config.dtype)
    if dist is not None:
        dist.broadcast_initial_parameters(trainer)
    return trainer


def infer_shapes(net: gluon.Block, config: TrainConfig, ctx: list[mx.Context]) -> None:
    """Give every deferred parameter its shape with one predict-mode pass of zeros.

    MXNet defers shapes to the first batch; in predict mode no running statistic moves.
    """
    blank = mx.nd.zeros((1, config.image_size, config.image_size, 3), ctx=ctx[0], dtype="uint8")
    net(normalize_batch(blank))  # float32 in: under --dtype, AMP casts inside
