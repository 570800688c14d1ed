"""The network a run trains, and its Trainer.

The book's graft (a source model's body under a new head, Xavier-initialized, learning
``--head-lr-mult`` times faster) or the scratch twin, then the freeze plan, a first
predict-mode pass for the shapes, ``hybridize`` and SGD.
"""

from __future__ import annotations

import mxnet as mx
from mxnet import gluon

from gluon_ft import data as gdata
from gluon_ft import zoo
from gluon_ft.balance import inverse_frequency
from gluon_ft.model import graft_new_head, load_source_model, scratch_twin
from gluon_ft.train import amp
from gluon_ft.train.config import TrainConfig
from gluon_ft.train.dist import DistContext


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


def make_loss(config: TrainConfig, train_labels, num_classes: int, ctx: list[mx.Context]):
    """The training loss: plain, or with ``--class-weights auto`` weighted by the inverse
    frequency of each class in the train part (the loss's sample weights)."""
    if config.class_weights == "none":
        return gluon.loss.SoftmaxCrossEntropyLoss()
    return ClassWeightedLoss(inverse_frequency(train_labels, num_classes), ctx)


def make_trainer(
    net: gluon.Block, config: TrainConfig, ctx: list[mx.Context], dist: DistContext | None = None
) -> gluon.Trainer:
    """SGD over every parameter; ``grad_req='null'`` ones are skipped by the Trainer itself.

    A distributed ``dist`` brings its own kvstore (see :meth:`DistContext.trainer_options`).
    """
    params = {"learning_rate": config.lr, "wd": config.wd}
    if config.momentum:
        params["momentum"] = config.momentum
    if dist is not None and dist.distributed:
        options = dist.trainer_options()
    else:
        # One context needs no kvstore; several aggregate on the device kvstore.
        kvstore = config.kvstore or ("device" if len(ctx) > 1 else None)
        options = {"kvstore": kvstore, **amp.trainer_kwargs(config.dtype)}
    trainer = gluon.Trainer(net.collect_params(), "sgd", params, **options)
    amp.prepare_trainer(trainer, config.dtype)
    if dist is not None:
        dist.broadcast_initial_parameters(trainer)
    return trainer


def infer_shapes(net: gluon.Block, config: TrainConfig, ctx: list[mx.Context]) -> None:
    """Give every deferred parameter its shape with one predict-mode pass of zeros.

    MXNet defers shapes to the first batch; in predict mode no running statistic moves.
    """
    blank = mx.nd.zeros((1, config.image_size, config.image_size, 3), ctx=ctx[0], dtype="uint8")
    net(gdata.normalize_batch(blank))  # float32 in: under --dtype, AMP casts inside
