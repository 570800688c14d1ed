"""``--cache-features``: a frozen backbone's features computed once, and the same training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from mxnet import nd
from mxnet.gluon import nn

from gluon_ft.errors import UsageError
from gluon_ft.train import TrainConfig, train
from gluon_ft.train.features_cache import cache_dir

EPOCHS = 2


def run(data, out, **settings):
    config = {
        "data": str(data),
        "pretrained": "none",  # a seeded random backbone: the mechanism, not the accuracy
        "freeze": "features",
        "epochs": EPOCHS,
        "batch_size": 4,
        "image_size": 32,
        "lr": 0.5,  # large enough that the head moves far from its initialization
        "ctx": "cpu",
        "seed": 7,
        "out": str(out),
        "progress": False,
    }
    result = train(TrainConfig(**{**config, **settings}))
    head = nd.load(str(out / "model.params"))
    resolved = json.loads((out / "config.json").read_text())
    return result["history"], head, resolved["feature_cache"]


def same_training(a, b) -> bool:
    (rows_a, head_a, _), (rows_b, head_b, _) = a, b
    rows_match = all(
        np.isclose(x[key], y[key], rtol=1e-5, atol=1e-6)
        for x, y in zip(rows_a, rows_b)
        for key in ("loss", "train_acc", "test_acc")
    )
    heads_match = all(
        np.allclose(head_a[k].asnumpy(), head_b[k].asnumpy(), rtol=1e-4, atol=1e-6)
        for k in head_a
        if k.startswith("output.")
    )
    return rows_match and heads_match


def test_cached_training_equals_uncached_when_views_cover_the_epochs(tiny_data, tmp_path):
    plain = run(tiny_data, tmp_path / "plain")
    cached = run(tiny_data, tmp_path / "cached", cache_features=True, cache_views=EPOCHS)
    assert cached[2]["built"] and not cached[2]["hits"]
    assert len(cached[2]["built"]) == EPOCHS + 1  # one file per train view, one for test
    assert not np.isclose(plain[0][0]["loss"], plain[0][1]["loss"])  # the head did learn
    assert same_training(plain, cached)
    # One view for two epochs: epoch 2 trains on epoch 1's augmentation, so it differs.
    reused = run(tiny_data, tmp_path / "one-view", cache_features=True, cache_views=1)
    assert np.isclose(reused[0][0]["loss"], plain[0][0]["loss"], rtol=1e-5)
    assert not same_training(plain, reused)
    # ...and view 0 and the test features came from the cache this time.
    assert len(reused[2]["hits"]) == 2 and not reused[2]["built"]


def test_cache_is_reused_across_an_lr_sweep_and_rebuilt_when_images_change(tiny_data, tmp_path):
    first = run(tiny_data, tmp_path / "a", cache_features=True)
    second = run(tiny_data, tmp_path / "b", cache_features=True, lr=0.05)
    assert len(first[2]["built"]) == 2 and not first[2]["hits"]
    assert sorted(second[2]["hits"]) == sorted(first[2]["built"]) and not second[2]["built"]
    assert first[0][-1]["loss"] != second[0][-1]["loss"]  # another lr, another training
    files = sorted(p.name for p in cache_dir().iterdir())
    assert files == sorted(first[2]["built"])

    # A changed image (new bytes, new time) invalidates the train features, not the test ones.
    image = next((tiny_data / "train" / "cat").iterdir())
    image.write_bytes(image.read_bytes())
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = run(tiny_data, tmp_path / "c", cache_features=True)
    assert len(third[2]["built"]) == 1 and len(third[2]["hits"]) == 1


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"freeze": "none"}, "backbone parameter"),
        ({"freeze": "stage4"}, "backbone parameter"),
        ({"bn": "train"}, "BatchNorm"),
    ],
    ids=["not-frozen", "partly-frozen", "batchnorm-trains"],
)
def test_cache_refuses_a_backbone_that_is_not_frozen_whole(tiny_data, tmp_path, settings, problem):
    config = {"cache_features": True, **settings}
    with pytest.raises(UsageError, match=problem) as err:
        run(tiny_data, tmp_path / "x", **config)
    assert "--freeze features" in str(err.value)
    assert not cache_dir().exists()


def test_cache_refuses_gradual_unfreezing():
    with pytest.raises(UsageError, match="--unfreeze-at"):
        TrainConfig(freeze="none", unfreeze_at="0:output", cache_features=True).validate()


def test_mobilenet_v2_trains_on_cached_features_as_without(tiny_data, tmp_path):
    """Its classifier is a 1x1 convolution followed by a Flatten: the head part holds both."""
    one_epoch = {"model": "mobilenetv2_0.25", "epochs": 1}
    plain = run(tiny_data, tmp_path / "plain", **one_epoch)
    cached = run(tiny_data, tmp_path / "cached", cache_features=True, **one_epoch)
    assert cached[2]["built"]
    assert same_training(plain, cached)


class SmallNet(nn.HybridBlock):
    """``features`` + ``output`` as in the zoo; with ``dropout`` a VGG-like Dropout between
    frozen layers, with ``pool_in_forward`` a pooling outside any block, as in DarkNet."""

    def __init__(self, classes: int, dropout: bool = False, pool_in_forward: bool = False):
        super().__init__()
        self.pool_in_forward = pool_in_forward
        with self.name_scope():
            self.features = nn.HybridSequential()
            self.features.add(nn.Conv2D(8, 3, strides=2), nn.BatchNorm(), nn.Activation("relu"))
            if not pool_in_forward:
                self.features.add(nn.GlobalAvgPool2D())
            if dropout:
                self.features.add(nn.Dropout(0.5), nn.Dense(16, activation="relu"))
            self.output = nn.Dense(classes)

    def hybrid_forward(self, F, x):
        x = self.features(x)
        if self.pool_in_forward:
            x = F.contrib.AdaptiveAvgPooling2D(x, output_size=1)
        return self.output(x)


def with_network(monkeypatch, **kwargs) -> None:
    """Train ``SmallNet(**kwargs)`` in place of the zoo's network."""
    import mxnet as mx

    import gluon_ft.train.run

    def build(config, num_classes, ctx):
        net = SmallNet(num_classes, **kwargs)
        net.initialize(mx.init.Xavier(), ctx=ctx)
        return net, None

    monkeypatch.setattr(gluon_ft.train.run, "build_network", build)
    # The end-of-run report rebuilds the zoo model the run names, which SmallNet is not; the
    # cache tests compare the training.
    monkeypatch.setattr(gluon_ft.train.run, "build_report", lambda *args, **kwargs: (None, None))


def test_a_dropout_between_frozen_layers_moves_into_the_head_part(tiny_data, tmp_path, monkeypatch):
    """VGG, AlexNet, Inception v3 and SqueezeNet have Dropout in their features: the cache
    stops before it, and the steps run it (with the step's random seed) and what follows."""
    with_network(monkeypatch, dropout=True)
    plain = run(tiny_data, tmp_path / "plain")
    cached = run(tiny_data, tmp_path / "cached", cache_features=True, cache_views=EPOCHS)
    assert len(cached[2]["built"]) == EPOCHS + 1
    assert same_training(plain, cached)


def test_a_network_that_is_not_a_chain_of_its_blocks_is_refused_before_any_work(
    tiny_data, tmp_path, monkeypatch
):
    with_network(monkeypatch, pool_in_forward=True)
    with pytest.raises(UsageError, match="forward pass is not its blocks run in order") as err:
        run(tiny_data, tmp_path / "x", cache_features=True)
    assert "Train without --cache-features" in str(err.value)
    assert not cache_dir().exists()  # no feature was computed
    # Not a started run: the same --out takes the run without --cache-features.
    assert not (tmp_path / "x" / "config.json").exists()
