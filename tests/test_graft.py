"""The graft for every family of the catalogue: the body is the source's, only the head is new.

``make test`` grafts one model per family (the cheapest member); ``make test-all`` (environment
``GLUON_FT_ALL_MODELS=1``) grafts every name that ``gluon-ft models`` lists. Sources are
random (Xavier) networks with 5 classes: the tests are about the mechanism, and offline.
"""

from __future__ import annotations

import functools
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from gluon_ft.errors import UsageError
from gluon_ft.model import zoo
from gluon_ft.model.graft import (
    SourceModel,
    build_model,
    get_head,
    graft_new_head,
    head_outputs,
    split_head,
)

ALL_MODELS = os.environ.get("GLUON_FT_ALL_MODELS") == "1"
SOURCE_CLASSES = 5
TARGET_CLASSES = 3
HEAD_LR_MULT = 10.0

# One model per (zoo, family): the cheapest member. test_sample_covers_every_family proves
# that no family is missing.
FAMILY_SAMPLE = {
    ("gluon", "AlexNet"): "alexnet",
    ("gluon", "DenseNet"): "densenet121",
    ("gluon", "Inception3"): "inceptionv3",
    ("gluon", "MobileNet"): "mobilenet0.25",
    ("gluon", "MobileNetV2"): "mobilenetv2_0.25",
    ("gluon", "ResNetV1"): "resnet18_v1",
    ("gluon", "ResNetV2"): "resnet18_v2",
    ("gluon", "SqueezeNet"): "squeezenet1.1",
    ("gluon", "VGG"): "vgg11",
    ("gluoncv", "ResNeSt"): "resnest26",  # resnest14 has no DropBlock
    ("gluoncv", "ResNetV1"): "se_resnet18_v1",
    ("gluoncv", "ResNetV2"): "se_resnet18_v2",
    ("gluoncv", "ShuffleNetV1"): "shufflenet_v1",
    ("gluoncv", "ShuffleNetV2"): "shufflenet_v2",
    ("gluoncv", "GoogLeNet"): "googlenet",
    ("gluoncv", "Xception65"): "xception",
    ("gluoncv", "Xception71"): "xception71",
    ("gluoncv", "MobileNetV3"): "mobilenetv3_small",
    ("gluoncv", "ResNetV1b"): "resnet18_v1b",
    ("gluoncv", "ResNext"): "resnext50_32x4d",
    ("gluoncv", "SENet"): "senet_154",
    ("gluoncv", "DarknetV3"): "darknet53",
    ("gluoncv", "NASNetALarge"): "nasnet_4_1056",
    ("gluoncv", "ResidualAttentionModel"): "residualattentionnet56",
    ("gluoncv", "DLA"): "dla34",
    ("gluoncv", "HighResolutionClsNet"): "hrnet_w18_small_v1_c",
}
GRAFT_NAMES = zoo.model_names() if ALL_MODELS else list(FAMILY_SAMPLE.values())


@functools.cache
def smallest_input_size(name: str) -> int:
    """The smallest of 32, 64, 128 px the network takes; else its native size."""
    for size in (32, 64, 128):
        try:
            zoo.check_input_size(build_model(name, TARGET_CLASSES, size), name, size)
            return size
        except UsageError:
            pass
    return zoo.lookup(name).input_size


def random_source(name: str, size: int, seed: int = 0) -> SourceModel:
    """A Xavier-initialized source network with every parameter materialized."""
    mx.random.seed(seed)
    net = build_model(name, SOURCE_CLASSES, image_size=size)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    net(mx.nd.zeros((1, 3, size, size)))  # finish deferred initialization
    return SourceModel(name, net, SOURCE_CLASSES, None, "none")


def values(params: dict) -> dict[str, np.ndarray]:
    # After a predict-mode forward, oneDNN may still be reordering weights in place: reading
    # them before waitall() gave scrambled copies (seen with senet_154).
    mx.nd.waitall()
    return {key: p.data().asnumpy().copy() for key, p in params.items()}


@pytest.mark.parametrize("name", GRAFT_NAMES)
def test_graft_keeps_the_body_and_trains_only_the_head(name):
    size = smallest_input_size(name)
    source = random_source(name, size)
    source_split = split_head(source.net)
    source_params = source_split.body_params()
    source_body = values(source_params)

    net = graft_new_head(source, TARGET_CLASSES, head_lr_mult=HEAD_LR_MULT)
    split = split_head(net)
    x = mx.nd.random.uniform(shape=(2, 3, size, size))
    assert net(x).shape == (2, TARGET_CLASSES)

    # The head is new: another block, of the same kind, with the target's class count.
    assert split.head_path == source_split.head_path
    assert split.head is not source_split.head
    assert type(split.head) is type(source_split.head)
    assert head_outputs(split.head) == TARGET_CLASSES
    assert head_outputs(source_split.head) == SOURCE_CLASSES
    # Body and head partition the network's parameters.
    body, head = split.body_params(), split.head_params()
    assert not set(body) & set(head)
    assert set(body) | set(head) == set(net._collect_params_with_prefix())
    assert head and set(head) == set(source_split.head_params())
    # Every non-head parameter is the source's: the same Parameter, the same values.
    assert set(body) == set(source_body)
    grafted_body = values(body)
    for key, param in body.items():
        assert param is source_params[key], key
        np.testing.assert_array_equal(grafted_body[key], source_body[key], err_msg=key)
    assert {p.lr_mult for p in head.values()} == {HEAD_LR_MULT}
    assert {p.lr_mult for p in body.values()} == {1.0}

    # One step with the body frozen: only the trainable head moves (running statistics too).
    for param in body.values():
        param.grad_req = "null"
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "wd": 1e-3})
    before = values(net._collect_params_with_prefix())
    y = mx.nd.array([0, 2])
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(x), y)
    loss.backward()
    trainer.step(2)
    after = values(net._collect_params_with_prefix())
    changed = {key for key in before if not np.array_equal(before[key], after[key])}
    assert changed == {key for key in head if key.endswith("weight")} | (
        {key for key in head if key.endswith("bias")}
    )


def _blocks(net: gluon.Block) -> list[tuple[str, gluon.Block]]:
    return list(net._children.items())


def test_squeezenet_replaces_only_the_1x1_conv_and_keeps_pooling():
    source = random_source("squeezenet1.1", 224)
    net = graft_new_head(source, TARGET_CLASSES)
    assert get_head(net)[0] == "output.0"
    conv = net.output[0]
    assert isinstance(conv, gluon.nn.Conv2D) and conv._kwargs["kernel"] == (1, 1)
    assert conv._channels == TARGET_CLASSES and conv is not source.net.output[0]
    assert net.features is source.net.features
    # What follows the classifier (ReLU, the pool, flatten) is all still there; the pool is
    # global (its 13x13 pool was exactly that at 224 px), so 64 px images work too.
    kinds = [type(block).__name__ for block in net.output._children.values()]
    assert kinds == ["Conv2D", "Activation", "GlobalAvgPool2D", "Flatten"]
    assert net.output[2] is source.net.output[2]
    for size in (224, 64):
        assert net(mx.nd.zeros((1, 3, size, size))).shape == (1, TARGET_CLASSES)


def test_resnet_v1d_replaces_fc_and_shares_every_other_child():
    source = random_source("resnet50_v1d", 32)
    net = graft_new_head(source, TARGET_CLASSES)
    assert not hasattr(net, "features")
    assert get_head(net)[0] == "fc"
    assert net.fc is not source.net.fc and net.fc._units == TARGET_CLASSES
    shared = [name for name, block in _blocks(net) if block is getattr(source.net, name)]
    assert shared == [name for name, _ in _blocks(net) if name != "fc"]
    assert {"conv1", "layer1", "layer4", "avgpool", "flat"} <= set(shared)
    # The deep stem (v1c/v1d) and average-pool downsampling (v1d) come from the source.
    assert isinstance(net.conv1, gluon.nn.HybridSequential) and net.layer2[0].downsample
    assert net(mx.nd.zeros((1, 3, 32, 32))).shape == (1, TARGET_CLASSES)


def test_mobilenet_v3_keeps_its_1280_expansion_and_replaces_only_the_last_conv():
    source = random_source("mobilenetv3_small", 32)
    net = graft_new_head(source, TARGET_CLASSES)
    assert get_head(net)[0] == "output.0"
    assert net.features is source.net.features
    # The head's first layers (1x1 conv to 1280, hard swish, dropout) live in the features.
    expansion = net.features[-3]
    assert expansion._channels == 1280 and expansion.weight.shape[1] == 576
    assert net.output[0]._channels == TARGET_CLASSES
    assert net.output[0].weight.shape[1] == 1280


def test_nasnet_builds_without_its_auxiliary_head():
    net = build_model("nasnet_4_1056", TARGET_CLASSES)
    assert net.out_aux is None  # with it, NASNet returns (scores, aux scores) even in predict
    assert get_head(net)[0] == "out.3"


def test_unknown_architecture_head_is_a_usage_error():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3), gluon.nn.BatchNorm())
    with pytest.raises(UsageError, match="BatchNorm"):
        get_head(net)


# ----------------------------------------------------------------------------- the book's graft


def xavier_bound(weight: np.ndarray) -> float:
    """Xavier's uniform bound with MXNet's defaults (avg fan, magnitude 3)."""
    receptive = int(np.prod(weight.shape[2:])) if weight.ndim > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    return float(np.sqrt(3.0 / ((fan_in + fan_out) / 2)))


def test_book_graft_shares_features_and_builds_a_new_xavier_output():
    source = random_source("resnet18_v2", 32)
    net = graft_new_head(source, 2, head_lr_mult=10)
    assert net.features is source.net.features  # finetune_net.features = pretrained_net.features
    grafted = values(net.features._collect_params_with_prefix())
    for key, value in values(source.net.features._collect_params_with_prefix()).items():
        np.testing.assert_array_equal(grafted[key], value, err_msg=key)
    assert net.output is not source.net.output
    assert net.output._units == 2
    assert {p.lr_mult for p in net.output.collect_params().values()} == {10}
    weight = net.output.weight.data().asnumpy()
    bound = xavier_bound(weight)
    assert np.abs(weight).max() <= bound
    # A uniform(-b, b) sample of 1024 values has std b / sqrt(3) within a few percent.
    assert abs(weight.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)
    assert not net.output.bias.data().asnumpy().any()


@pytest.mark.parametrize(("name", "size"), [("vgg11", 32), ("squeezenet1.1", 224)])
def test_new_head_is_xavier_even_where_the_zoo_sets_its_own_initializer(name, size):
    """VGG's constructor asks for normal(0.01); SqueezeNet's conv head is initialized lazily."""
    net = graft_new_head(random_source(name, size), 4)
    net(mx.nd.zeros((1, 3, size, size)))
    weight = get_head(net)[1].weight.data().asnumpy()
    bound = xavier_bound(weight)
    assert np.abs(weight).max() <= bound
    assert abs(weight.std() - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3)


def test_graft_forward_runs_on_every_context():
    ctx = [mx.cpu(0), mx.cpu(1)]
    net = graft_new_head(random_source("resnet18_v2", 32), 2, ctx=ctx)
    for param in net.collect_params().values():
        assert param.list_ctx() == ctx, param.name
    for c in ctx:
        out = net(mx.nd.zeros((2, 3, 32, 32), ctx=c))
        assert out.shape == (2, 2) and out.context == c


class _Constructed(Exception):
    """Raised by the outermost block's constructor, carrying its class name."""


def constructed_family(name: str) -> tuple[str, str]:
    """``(zoo, family)`` of ``name``, without building its layers (building all takes ~10 s).

    The family is the class of the outermost block (what :func:`zoo.describe` reports), and
    its ``__init__`` reaches ``Block.__init__`` through ``super()`` before it makes any layer:
    the constructor is stopped there.
    """

    def stop(block, *args, **kwargs):
        raise _Constructed(type(block).__name__.lstrip("_"))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gluon.Block, "__init__", stop)
        try:
            zoo.build(name, 1000)
        except _Constructed as built:
            return zoo.lookup(name).zoo, built.args[0]
    raise AssertionError(f"{name} was built without constructing a Block")


def test_sample_covers_every_family():
    families = {}
    for name in zoo.model_names():
        families.setdefault(constructed_family(name), []).append(name)
    assert set(families) == set(FAMILY_SAMPLE)
    for key, name in FAMILY_SAMPLE.items():
        assert name in families[key]


@pytest.mark.skipif(not ALL_MODELS, reason="builds every network: make test-all")
def test_constructed_family_is_the_family_of_the_built_network():
    """What the family check above relies on, for every name of the catalogue."""
    for name in zoo.model_names():
        info = zoo.describe(name)
        assert constructed_family(name) == (info.zoo, info.family), name
