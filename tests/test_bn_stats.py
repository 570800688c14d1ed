"""``--sync-bn-stats``: one set of BatchNorm running statistics, the one that is tested and
saved, on several devices and on several workers (real ps-lite processes on 127.0.0.1)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import run_cli, tiny_config, write_image_folder

import gluon_ft  # noqa: F401  (thread settings before mxnet)
import gluon_ft.train.run as run_module
from gluon_ft.train import train
from gluon_ft.train.bn_stats import running_stats


def copies_at_test_time(monkeypatch) -> list[list[dict]]:
    """Patch the test pass to record, each epoch, every device's running statistics."""
    seen: list[list[dict]] = []
    original = run_module.evaluate

    def evaluate(net, *args, **kwargs):
        params = running_stats(net)
        assert params, "the network has no BatchNorm: this test would prove nothing"
        devices = params[0].list_ctx()
        seen.append([{p.name: p.data(c).asnumpy() for p in params} for c in devices])
        return original(net, *args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", evaluate)
    return seen


@pytest.mark.parametrize("sync", [True, False])
def test_two_devices_test_with_one_set_of_statistics(tmp_path, monkeypatch, sync):
    data = write_image_folder(tmp_path / "data", n_train=6, n_test=2, size=32)
    seen = copies_at_test_time(monkeypatch)
    flag = {} if sync else {"sync_bn_stats": False}  # on by default with two devices
    config = tiny_config(data, tmp_path / "run", ctx="cpu:2", epochs=2, **flag)
    train(config)
    assert len(seen) == 2
    for first, second in seen:
        differ = [n for n in first if not np.array_equal(first[n], second[n])]
        if sync:
            assert differ == []
        else:  # each device saw other samples: proof that there was something to average
            assert len(differ) > len(first) // 2


def test_the_averaging_leaves_the_training_steps_alone(tmp_path):
    """Each step normalizes with its batch's statistics, which the averaging never touches:
    the second epoch trains alike with and without it."""
    data = write_image_folder(tmp_path / "data", n_train=6, n_test=2, size=32)
    losses = {}
    for sync in (True, False):
        config = tiny_config(data, tmp_path / f"run-{sync}", ctx="cpu:2", epochs=2)
        config.sync_bn_stats = sync
        losses[sync] = [(r["loss"], r["train_acc"]) for r in train(config)["history"]]
    assert losses[True] == losses[False]


def test_one_device_leaves_the_statistics_alone_by_default(tmp_path, monkeypatch):
    import gluon_ft.train.bn_stats as bn_stats

    calls = []
    monkeypatch.setattr(run_module, "sync_bn_stats", lambda *a: calls.append(a))
    data = write_image_folder(tmp_path / "data", n_train=4, n_test=2, size=32)
    train(tiny_config(data, tmp_path / "run"))
    assert calls == []
    train(tiny_config(data, tmp_path / "forced", sync_bn_stats=True))
    assert len(calls) == 1
    assert bn_stats.wants_sync(None, 1, run_module.DistContext()) is False


def predicted_accuracy(run_dir, data) -> tuple[float, int]:
    images = sorted(str(p) for p in (data / "test").glob("*/*.png"))
    done = run_cli("predict", str(run_dir), *images, "--json", "--top-k", "1", timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    right = sum(r["top"][0]["class"] == r["source"].split("/")[-2] for r in results)
    return right / len(results), len(results)


@pytest.mark.timeout(240)
def test_a_two_worker_run_reports_the_accuracy_of_the_saved_model(tmp_path):
    # Small per-worker batches from scratch: each worker's statistics follow its own last
    # samples, so without the averaging rank 1's shard is tested with statistics that rank 0
    # does not save.
    data = write_image_folder(tmp_path / "data", n_train=12, n_test=12, size=32, seed=3)
    out = tmp_path / "run"
    train_command = [sys.executable, "-m", "gluon_ft", "train", "--kvstore", "dist_sync"]
    train_command += ["--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"]
    train_command += ["--epochs", "2", "--image-size", "32", "--batch-size", "4"]
    train_command += ["--lr", "0.05", "--out", str(out), "--no-progress"]
    done = run_cli("launch", "-n", "2", "--", *train_command, cwd=tmp_path, timeout=220)
    assert done.returncode == 0, done.stdout + done.stderr
    reported = json.loads((out / "metrics.json").read_text())[-1]["test_acc"]
    accuracy, count = predicted_accuracy(out, data)
    assert abs(accuracy - reported) * count <= 1 + 1e-9, (accuracy, reported)
