"""The training loop: gradient scaling across contexts, head lr, short batches, run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from conftest import tiny_config
from mxnet import gluon
from mxnet.gluon import nn

from gluon_ft.data.folders import scan_split
from gluon_ft.data.loaders import make_loader
from gluon_ft.data.transforms import TestTransform
from gluon_ft.errors import UsageError
from gluon_ft.model.graft import SourceModel, build_model, graft_new_head
from gluon_ft.train import (
    StepOptions,
    TrainConfig,
    make_trainer,
    parse_contexts,
    train,
    train_epoch,
)


def tiny_net(classes: int = 2, seed: int = 0) -> nn.HybridSequential:
    """A conv net without BatchNorm, so splitting a batch cannot change its gradient."""
    mx.random.seed(seed)
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, strides=2, in_channels=3), nn.Activation("relu"))
    net.add(nn.GlobalAvgPool2D(), nn.Dense(classes, in_units=4))
    return net


def one_epoch(net, data_root, ctx, batch_size, hybridize=True, **config):
    """Run one training epoch of ``net`` over ``data_root/train``; return the metric sums."""
    split = scan_split(data_root / "train")
    cfg = TrainConfig(batch_size=batch_size, wd=0.0, **config)
    loader = make_loader(split, TestTransform(24), batch_size, shuffle=False)
    net.initialize(mx.init.Xavier(), ctx=ctx, force_reinit=True)
    if hybridize:
        net.hybridize()
    trainer = make_trainer(net, cfg, ctx)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    sums, skipped, _ = train_epoch(net, trainer, loader, ctx, loss_fn, options=StepOptions.of(cfg))
    return sums, skipped


def params_of(net) -> dict[str, np.ndarray]:
    return {
        k: v.data(v.list_ctx()[0]).asnumpy() for k, v in net._collect_params_with_prefix().items()
    }


def test_two_contexts_give_the_same_update_as_one(tmp_path):
    """trainer.step(global batch) once per step: splitting a batch must not scale the update."""
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "d", n_train=5, n_test=1, size=24)
    # 9 samples in batches of 8: the last step has 1 sample, which reaches one context only.
    (root / "train" / "dog" / "004.png").unlink()
    before = params_of(_initialized(tiny_net(), [mx.cpu()]))
    one = tiny_net()
    one_epoch(one, root, [mx.cpu()], batch_size=8)
    two = tiny_net()
    one_epoch(two, root, [mx.cpu(0), mx.cpu(1)], batch_size=8)
    after_one, after_two = params_of(one), params_of(two)
    for name in after_one:
        # The step really moved the weights (so the comparison below means something).
        assert not np.allclose(after_one[name], before[name]), name
        np.testing.assert_allclose(after_two[name], after_one[name], rtol=1e-5, atol=1e-6)


def _initialized(net, ctx):
    net.initialize(mx.init.Xavier(), ctx=ctx)
    return net


@pytest.mark.parametrize("n_images,batch_size", [(5, 4), (1, 4)])
def test_short_last_batch_over_two_contexts(tmp_path, n_images, batch_size):
    """5 samples in batches of 4 (a last batch of 1), and 1 sample over 2 contexts."""
    from conftest import write_image_folder

    root = tmp_path / "d"
    write_image_folder(root, classes=("a", "b"), n_train=3, n_test=1, size=24)
    files = sorted((root / "train").rglob("*.png"))
    for extra in files[n_images:]:
        extra.unlink()
    if n_images == 1:  # a class folder may not be empty: keep one file per class out of sight
        (root / "train" / "b").rename(tmp_path / "b-hidden")
    net = tiny_net()
    sums, skipped = one_epoch(net, root, [mx.cpu(0), mx.cpu(1)], batch_size=batch_size)
    assert skipped == 0
    assert sums.count == n_images
    loss, acc = sums.read()
    assert np.isfinite(loss)
    assert 0.0 <= acc <= 1.0
    assert acc * n_images == pytest.approx(round(acc * n_images))


def test_head_learns_ten_times_faster_than_backbone():
    """Effective lr = update / (grad / batch): exactly lr for features, 10 lr for the head."""
    ctx = [mx.cpu()]
    net = build_model("resnet18_v2", 5)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net(mx.nd.zeros((1, 3, 32, 32)))  # finish deferred initialization
    source = SourceModel("resnet18_v2", net, 5, None, "none")
    grafted = graft_new_head(source, 2, head_lr_mult=10, ctx=ctx)
    grafted.hybridize()
    cfg = TrainConfig(lr=0.01, wd=0.0)
    trainer = make_trainer(grafted, cfg, ctx)
    x = mx.nd.random.uniform(shape=(4, 3, 32, 32))
    y = mx.nd.array([0, 1, 0, 1])
    # The new head's weight and bias, and the last convolution of the features.
    measured = {"head weight": grafted.output.weight, "head bias": grafted.output.bias}
    features = grafted.features.collect_params()
    measured["last conv"] = [p for n, p in features.items() if "conv" in n and "weight" in n][-1]
    before = {k: p.data().copy() for k, p in measured.items()}
    with mx.autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(grafted(x), y)
    loss.backward()
    trainer.step(4)
    rates = {}
    for name, param in measured.items():
        grad = param.grad().asnumpy() / 4
        update = (before[name] - param.data()).asnumpy()
        mask = np.abs(grad) > 1e-6
        assert mask.sum() >= min(grad.size, 100), name  # a ratio over real gradients
        rates[name] = np.median(update[mask] / grad[mask])
    assert rates["last conv"] == pytest.approx(0.01, rel=1e-3)
    assert rates["head weight"] == pytest.approx(0.1, rel=1e-3)
    assert rates["head bias"] == pytest.approx(0.1, rel=1e-3)


def test_parse_contexts():
    assert parse_contexts("cpu") == [mx.cpu()]
    assert parse_contexts("cpu:3") == [mx.cpu(0), mx.cpu(1), mx.cpu(2)]
    assert parse_contexts(" CPU:2 ") == [mx.cpu(0), mx.cpu(1)]
    assert parse_contexts("auto") == [mx.cpu()]  # no GPU on these machines
    # Each refusal for its own reason: a malformed spec is not "no such GPU", and back.
    with pytest.raises(UsageError, match=r"MXNet sees 0 GPU\(s\), not \[0\]"):
        parse_contexts("gpu:0")
    for bad in ("cpu:0", "tpu", "cpu:x", "gpu:x", "gpu:0,,1"):
        with pytest.raises(UsageError, match="use auto, cpu, cpu:N or gpu:0,1") as err:
            parse_contexts(bad)
        assert repr(bad.strip().lower()) in str(err.value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("auto", [0, 1]),  # every GPU MXNet sees
        ("gpu", [0]),
        ("gpu:1", [1]),
        ("gpu:0,1", [0, 1]),
        ("GPU:1,0", [1, 0]),  # in the order given
    ],
)
def test_gpu_contexts_with_two_gpus(monkeypatch, spec, expected):
    """No GPU here: MXNet's GPU count is faked; a GPU context is just an object until used."""
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 2)
    assert parse_contexts(spec) == [mx.gpu(i) for i in expected]


def test_a_gpu_that_is_not_there_is_refused_naming_the_count(monkeypatch):
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 2)
    with pytest.raises(UsageError, match=r"--ctx gpu:1,2: MXNet sees 2 GPU\(s\), not \[2\]"):
        parse_contexts("gpu:1,2")
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 0)
    with pytest.raises(UsageError, match=r"MXNet sees 0 GPU\(s\), not \[0\]"):
        parse_contexts("gpu")


@pytest.mark.parametrize("spec, twice", [("gpu:0,0", "GPU 0"), ("gpu:1,0,1,0", "GPU 0, 1")])
def test_a_device_listed_twice_is_refused(tiny_data, spec, twice, cli):
    """One device twice would take two slices of every batch as if it were two devices."""
    done = cli("train", "--data", tiny_data, "--ctx", spec, "--pretrained", "none")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"--ctx {spec}: {twice} is listed more than once" in done.stderr


def test_end_to_end_cli_writes_the_run_directory(tiny_data, tmp_path, cli):
    out = tmp_path / "run"
    result = cli(
        "train",
        "--data", str(tiny_data),
        "--pretrained", "none",
        "--epochs", "1",
        "--image-size", "32",
        "--batch-size", "8",
        "--out", str(out),
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "classes.json", "metrics.json", "curves.png", "model.params"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "checkpoints").is_dir()
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained"] == "none" and config["batch_size"] == 8
    (row,) = json.loads((out / "metrics.json").read_text())
    assert row["epoch"] == 1
    assert np.isfinite(row["loss"]) and row["loss"] > 0
    assert 0 <= row["train_acc"] <= 1 and 0 <= row["test_acc"] <= 1
    assert row["examples_per_sec"] > 0 and row["seconds"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run into the same folder must not overwrite the first.
    again = cli("train", "--data", tiny_data, "--pretrained", "none", "--out", out)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr


def test_python_m_gluon_ft_train_is_the_same_command(tiny_data, tmp_path):
    args = ["--data", str(tiny_data / "missing"), "--out", str(tmp_path / "run")]
    result = subprocess.run(
        [sys.executable, "-m", "gluon_ft.train", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_hotdog_small_integration_on_two_contexts(hotdog_small, food_model, tmp_path, cli):
    """Real photos, a real pretrained source, 64 px, the multi-device path."""
    out = tmp_path / "run"
    result = cli(
        "train",
        "--data", str(hotdog_small),
        "--pretrained", str(food_model),
        "--epochs", "1",
        "--image-size", "64",
        "--batch-size", "32",
        "--ctx", "cpu:2",
        "--out", str(out),
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["contexts"] == ["cpu(0)", "cpu(1)"]
    assert config["train_size"] == 200 and config["test_size"] == 50
    assert config["source_classes"] == 100
    assert json.loads((out / "classes.json").read_text()) == ["hotdog", "not-hotdog"]
    assert row["skipped"] == 0
    assert np.isfinite(row["loss"]) and 0 < row["loss"] < 5
    assert 0 <= row["train_acc"] <= 1 and 0 <= row["test_acc"] <= 1
    assert row["test_acc"] * 50 == pytest.approx(round(row["test_acc"] * 50))


def test_failed_run_leaves_no_run_folder(tmp_path, monkeypatch):
    """A run refused after its folder was made (here: no data) removes that folder again,
    whether --out named it or it was the default ./runs/<data>-<model>-<time>."""
    missing = tmp_path / "missing"
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="does not exist"):
        train(tiny_config(missing, out))
    assert not out.exists()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        config = tiny_config(missing, tmp_path)
        config.out = None  # the default: ./runs/<data>-<model>-<time>
        train(config)
    assert not (tmp_path / "runs").exists()
