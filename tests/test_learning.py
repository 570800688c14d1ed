"""Training learns; fine-tuning starts from the source's weights; ``train()`` honours its flags.

The source is pretrained once per module, with :func:`gluon_ft.train.pretrain`, on three
colours (red, green, blue). The target tells two new colours apart, yellow from cyan: red from
blue under the same green, which the source has learned. Every run is mobilenet0.25 at 32 px
(resnet18_v2 where stages are needed), so a few epochs take seconds.

The flag tests read what the optimizer did in the first step (the update of each parameter),
or compare the saved parameters with the source's: a flag that ``train()`` ignored fails them.
"""

from __future__ import annotations

from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from conftest import tiny_config, write_image_folder
from mxnet import gluon

from gluon_ft.train import pretrain, train

SOURCE_COLORS = {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200)}
TARGET_COLORS = {"cyan": (0, 200, 200), "yellow": (200, 200, 0)}
BATCHNORM_ARRAYS = ("gamma", "beta", "running_mean", "running_var")


def colour_folder(root: Path, colors: dict, n_train: int, seed: int) -> Path:
    """An image folder with one class per colour (plus noise), 10 test images each."""
    names, values = list(colors), list(colors.values())
    return write_image_folder(root, names, n_train, 10, size=32, seed=seed, colors=values)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A mobilenet0.25 pretrained from scratch on the three colours: 60 steps, 5 epochs."""
    root = tmp_path_factory.mktemp("source")
    data = colour_folder(root / "data", SOURCE_COLORS, n_train=32, seed=0)
    # Module scope runs before the per-test MXNET_HOME isolation: give it its own.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MXNET_HOME", str(root / "mxnet-home"))
        recipe = {"lr": 0.1, "momentum": 0.5, "lr_schedule": "cosine"}
        config = tiny_config(data, root / "source.run", epochs=5, batch_size=8, ctx="cpu", **recipe)
        result = pretrain(config, root / "source.params")
    return {"params": result["params_file"], "history": result["history"]}


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    """Yellow and cyan, 8 training images each."""
    return colour_folder(tmp_path_factory.mktemp("target"), TARGET_COLORS, n_train=8, seed=1)


def fine_tune(source: dict, target: Path, out: Path, **changes) -> dict:
    """``train --pretrained SOURCE`` on the target: 1 epoch, batches of 4 (tiny_config)."""
    return train(tiny_config(target, out, pretrained=str(source["params"]), ctx="cpu", **changes))


def saved_arrays(path: Path) -> dict[str, np.ndarray]:
    return {name: array.asnumpy() for name, array in mx.nd.load(str(path)).items()}


def record_first_update(monkeypatch) -> dict[str, tuple[float, float]]:
    """Patch ``gluon.Trainer.step`` to measure the first step: ``{name: (lr, wd)}``.

    Plain SGD updates ``w -= lr * (grad / batch + wd * w)``; ``lr`` and ``wd`` of each trained
    parameter are the least-squares fit of what the step did, whatever set them.
    """
    measured: dict[str, tuple[float, float]] = {}
    original = gluon.Trainer.step

    def step(self, batch_size, *args, **kwargs):
        if measured:
            return original(self, batch_size, *args, **kwargs)
        trained = [p for p in self._params if p.grad_req != "null"]
        before = {p.name: (p.data().asnumpy(), p.grad().asnumpy() / batch_size) for p in trained}
        original(self, batch_size, *args, **kwargs)
        for param in trained:
            weight, grad = before[param.name]
            update = weight - param.data().asnumpy()
            terms = np.stack([grad.ravel(), weight.ravel()], axis=1).astype(np.float64)
            (lr, lr_times_wd), *_ = np.linalg.lstsq(terms, update.ravel(), rcond=None)
            measured[param.name] = (float(lr), float(lr_times_wd / lr))

    monkeypatch.setattr(gluon.Trainer, "step", step)
    return measured


# ----------------------------------------------------------------------------- learning


def test_a_few_epochs_on_easy_images_reach_high_accuracy(source):
    """From scratch, three colours, 5 epochs: near chance (1/3) is a broken training loop."""
    history = source["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["test_acc"] >= 0.9, history
    assert history[-1]["loss"] < history[0]["loss"] / 2, history


def test_fine_tuning_a_related_source_beats_training_from_scratch(source, target, tmp_path):
    """Two epochs of 16 images: the source's features tell yellow from cyan at once; a
    network trained from scratch on them (the book's lr 0.1, every layer) stays at chance."""
    budget = {"epochs": 2, "batch_size": 4}
    fine = fine_tune(source, target, tmp_path / "fine", freeze="features", lr=0.01, **budget)
    scratch = train(tiny_config(target, tmp_path / "scratch", lr=0.1, ctx="cpu", **budget))
    fine_acc, scratch_acc = fine["history"][-1]["test_acc"], scratch["history"][-1]["test_acc"]
    assert fine_acc >= 0.9, fine["history"]
    assert fine_acc - scratch_acc >= 0.3, (fine_acc, scratch_acc)


# ----------------------------------------------------------------------------- the graft


def test_frozen_features_are_saved_bit_for_bit_as_the_pretrained_file(source, target, tmp_path):
    """``train --pretrained FILE --freeze features`` starts from FILE and keeps it: a train()
    that re-initialized the backbone, or let a frozen part move, fails here."""
    fine_tune(source, target, tmp_path / "run", freeze="features", lr=0.5)
    pretrained = saved_arrays(source["params"])
    trained = saved_arrays(tmp_path / "run" / "model.params")
    features = sorted(name for name in pretrained if name.startswith("features."))
    assert len(features) > 100  # weights and BatchNorm arrays of 27 layers
    assert features == sorted(name for name in trained if name.startswith("features."))
    for name in features:
        np.testing.assert_array_equal(trained[name], pretrained[name], err_msg=name)
    # The head is new: the target's two classes, trained away from zero bias.
    assert trained["output.weight"].shape == (2, pretrained["output.weight"].shape[1])
    assert trained["output.bias"].any()


def test_bn_train_trains_only_the_batchnorm_of_frozen_features(source, target, tmp_path):
    """``--bn train`` (fastai's train_bn): convolutions stay the source's; every BatchNorm
    array (gamma, beta and the running statistics) moves."""
    fine_tune(source, target, tmp_path / "run", freeze="features", bn="train", lr=0.5)
    pretrained = saved_arrays(source["params"])
    trained = saved_arrays(tmp_path / "run" / "model.params")
    features = [name for name in pretrained if name.startswith("features.")]
    batchnorm = [name for name in features if name.endswith(BATCHNORM_ARRAYS)]
    assert len(batchnorm) == 4 * 27
    for name in features:
        if name in batchnorm:
            assert not np.array_equal(trained[name], pretrained[name]), name
        else:
            np.testing.assert_array_equal(trained[name], pretrained[name], err_msg=name)


# ----------------------------------------------------------------------------- the optimizer


def test_head_lr_mult_and_wd_reach_the_update(source, target, tmp_path, monkeypatch):
    """--lr 0.05 --head-lr-mult 3 --wd 0.01: the head learns at 0.15, the features at 0.05,
    and both decay at 0.01 (not the defaults' x10 and 0.001)."""
    measured = record_first_update(monkeypatch)
    fine_tune(source, target, tmp_path / "run", lr=0.05, head_lr_mult=3, wd=0.01)
    head = {name: measured.pop(name) for name in list(measured) if "_dense" in name}
    convolutions = {name: rates for name, rates in measured.items() if "_conv" in name}
    assert len(head) == 2 and len(convolutions) == 27
    for name, (lr, _) in head.items():
        assert lr == pytest.approx(0.15, rel=1e-2), name
    head_weight = next(rates for name, rates in head.items() if name.endswith("weight"))
    assert head_weight[1] == pytest.approx(0.01, rel=1e-2)
    for name, (lr, wd) in convolutions.items():
        assert lr == pytest.approx(0.05, rel=1e-2), name
        assert wd == pytest.approx(0.01, rel=1e-2), name


def test_layer_lr_decay_reaches_the_update(target, tmp_path, monkeypatch):
    """--layer-lr-decay 0.5 on resnet18_v2 (from scratch: the head at --lr): stage k of 4
    learns at lr * 0.5 ** (5 - k), the stem's convolution at lr * 0.5 ** 5."""
    measured = record_first_update(monkeypatch)
    settings = {"model": "resnet18_v2", "lr": 0.1, "layer_lr_decay": 0.5, "ctx": "cpu"}
    train(tiny_config(target, tmp_path / "run", batch_size=16, **settings))  # one step
    # Parameter names without the network's prefix (resnetv20_, resnetv21_, ... by how many
    # networks this process built before).
    measured = {name.split("_", 1)[1]: value for name, value in measured.items()}
    expected = {"dense0_weight": 0.1, "conv0_weight": 0.1 * 0.5**5}
    for stage in (1, 2, 3, 4):
        convolutions = [n for n in measured if n.startswith(f"stage{stage}_conv")]
        assert len(convolutions) >= 4, stage
        expected.update(dict.fromkeys(convolutions, 0.1 * 0.5 ** (5 - stage)))
    for name, lr in expected.items():
        assert measured[name][0] == pytest.approx(lr, rel=1e-2), name
