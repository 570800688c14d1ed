"""The text's learning rates: d2l's per-sample rates with ``step(1)`` are gluon-ft's per-batch
rates with ``step(batch_size)``; a per-sample rate typed into gluon-ft is warned about; the
head multiplier from scratch says what it does."""

from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest
from conftest import write_image_folder
from mxnet import autograd, gluon
from mxnet.gluon import nn

from gluon_ft.data.transforms import normalize_batch
from gluon_ft.train import MetricSums, StepOptions, TrainConfig, make_trainer, train_batch

BATCH = 32


def small_net(seed: int) -> nn.HybridSequential:
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, in_channels=3), nn.GlobalAvgPool2D(), nn.Dense(2, in_units=4))
    mx.random.seed(seed)
    net.initialize(mx.init.Xavier())
    return net


def one_step_each_way(lr: float, wd: float, text_wd: float) -> tuple[dict, dict]:
    """The parameters after one step of gluon-ft's ``train_batch`` at ``lr``, and after one
    step of d2l's ``train_batch_ch13`` (summed loss, ``step(1)``) at ``lr / batch``."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, 8, 8, 3)).astype(np.uint8)
    labels = rng.integers(0, 2, BATCH).astype(np.int32)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    ours = small_net(seed=1)
    config = TrainConfig(lr=lr, wd=wd, batch_size=BATCH)
    trainer = make_trainer(ours, config, [mx.cpu()])
    sums, options = MetricSums([mx.cpu()]), StepOptions.of(config)
    train_batch(ours, trainer, images, labels, [mx.cpu()], loss_fn, sums, options=options)

    text = small_net(seed=1)
    options = {"learning_rate": lr / BATCH, "wd": text_wd}
    text_trainer = gluon.Trainer(text.collect_params(), "sgd", options)
    x = normalize_batch(mx.nd.array(images, dtype="uint8"))
    with autograd.record():
        loss = loss_fn(text(x), mx.nd.array(labels)).sum()
    loss.backward()
    text_trainer.step(1)

    def values(net):
        return {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}

    return values(ours), values(text)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_the_texts_lr_over_batch_with_step_1_is_our_lr_with_step_batch():
    ours, text = one_step_each_way(lr=0.5, wd=0.0, text_wd=0.0)
    before = small_net(seed=1)
    moved = {k: p.data().asnumpy() for k, p in before._collect_params_with_prefix().items()}
    assert max_difference(ours, moved) > 1e-3  # the step did move the parameters
    assert max_difference(ours, text) <= 1e-6


def test_weight_decay_is_not_divided_by_the_batch():
    """MXNet's SGD adds wd * weight after rescaling the gradient: at lr / batch with step(1),
    the same --wd decays batch times less; wd x batch gives the same update again."""
    ours, text = one_step_each_way(lr=0.5, wd=0.01, text_wd=0.01)
    assert max_difference(ours, text) > 1e-4
    ours, text = one_step_each_way(lr=0.5, wd=0.01, text_wd=0.01 * BATCH)
    assert max_difference(ours, text) <= 1e-6


def test_help_says_lr_is_per_batch_and_what_the_texts_rates_are_here(cli):
    text = cli("train", "--help").stdout
    assert "SGD rate per batch" in text
    assert "7.8125e-5 and 7.8125e-4 are --lr 0.01 and 0.1 here" in " ".join(text.split())


@pytest.mark.parametrize(
    "lr, batch_size, warned",
    [(7.8125e-5, 128, "--lr 0.01"), (7.8125e-4, 128, "--lr 0.1"), (5e-4, 32, "--lr 0.016")],
)
def test_a_per_sample_looking_lr_names_the_per_batch_rate(lr, batch_size, warned):
    (warning,) = TrainConfig(lr=lr, batch_size=batch_size).warnings()
    assert "looks like a per-sample rate" in warning
    assert warning.endswith(f"you probably meant {warned}.")


@pytest.mark.parametrize("lr, batch_size", [(0.01, 128), (1e-3, 128), (5e-4, 16)])
def test_per_batch_rates_and_small_batches_are_not_warned_about(lr, batch_size):
    assert TrainConfig(lr=lr, batch_size=batch_size).warnings() == []
    assert TrainConfig(pretrained="none", head_lr_mult=10).warnings() == []  # the default


def test_the_cli_warns_and_config_json_records_the_head_lr_mult_used(tmp_path, cli):
    out = tmp_path / "run"
    data = write_image_folder(tmp_path / "data", n_train=16, size=32)  # a batch of 32
    done = cli(
        "train",
        *("--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--epochs", "1", "--batch-size", "32", "--image-size", "32", "--out", str(out)),
        *("--lr", "7.8125e-5", "--head-lr-mult", "5", "--no-progress"),
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2, done.stderr
    assert "you probably meant --lr 0.0025" in warnings[0]  # 7.8125e-5 x 32
    assert warnings[1].startswith("gluon-ft: warning: --head-lr-mult 5 has no effect from scratch")
    config = json.loads((out / "config.json").read_text())
    assert config["head_lr_mult"] == 5.0 and config["head_lr_mult_used"] == 1.0
    # ...which is what the parameter table says the output layer learned at.
    table = (out / "trainable.txt").read_text()
    output_rows = [line.split() for line in table.splitlines() if "dense" in line]
    assert output_rows and all(row[-3] == "1" for row in output_rows), table
