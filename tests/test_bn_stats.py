"""``--sync-bn-stats``: one set of BatchNorm running statistics, the one that is tested and
saved, on several devices and on several workers (real ps-lite processes on 127.0.0.1)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import tiny_config, write_image_folder

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


# A worker that runs `gluon-ft train` as the command line does, then saves the running
# statistics its network ended with, per rank.
WORKER = r"""
import sys
from pathlib import Path

import gluon_ft
import mxnet as mx
import gluon_ft.train.run as run
from gluon_ft.cli import main

seen = {}
build_network, connect = run.build_network, run.connect
run.build_network = lambda *a: seen.setdefault("net", build_network(*a))
run.connect = lambda *a: seen.setdefault("dist", connect(*a))
code = main(["train", *sys.argv[2:]])
params = seen["net"][0]._collect_params_with_prefix()
stats = {name: p.data() for name, p in params.items() if ".running_" in name}
mx.nd.save(str(Path(sys.argv[1]) / f"rank{seen['dist'].rank}.params"), stats)
sys.exit(code)
"""


def predicted_accuracy(cli, run_dir, data) -> tuple[float, int]:
    images = sorted(str(p) for p in (data / "test").glob("*/*.png"))
    done = cli("predict", str(run_dir), *images, "--json", "--top-k", "1")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    right = sum(r["top"][0]["class"] == r["source"].split("/")[-2] for r in results)
    return right / len(results), len(results)


@pytest.mark.timeout(240)
def test_a_two_worker_run_reports_the_accuracy_of_the_saved_model(tmp_path, cli):
    data = write_image_folder(tmp_path / "data", n_train=8, n_test=8, size=32)
    out = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    train_args = ["--kvstore", "dist_sync", "--data", str(data), "--model", "mobilenet0.25"]
    train_args += ["--pretrained", "none", "--epochs", "2", "--image-size", "32"]
    train_args += ["--batch-size", "4", "--out", str(out), "--no-progress"]
    command = [sys.executable, str(script), str(tmp_path), *train_args]
    done = cli("launch", "-n", "2", "--", *command, cwd=tmp_path)  # the launcher in this process
    assert done.returncode == 0, done.stdout + done.stderr

    import mxnet as mx

    # Each worker normalized its own shard's batches, yet both end with one set of
    # statistics, and it is the set that rank 0 saved.
    ranks = [mx.nd.load(str(tmp_path / f"rank{r}.params")) for r in (0, 1)]
    saved = mx.nd.load(str(out / "model.params"))
    assert ranks[0] and ranks[0].keys() == ranks[1].keys()
    for name, value in ranks[0].items():
        np.testing.assert_array_equal(value.asnumpy(), ranks[1][name].asnumpy(), err_msg=name)
        np.testing.assert_array_equal(value.asnumpy(), saved[name].asnumpy(), err_msg=name)
    # So the accuracy the run reported is the saved model's.
    reported = json.loads((out / "metrics.json").read_text())[-1]["test_acc"]
    accuracy, count = predicted_accuracy(cli, out, data)
    assert abs(accuracy - reported) * count <= 1 + 1e-9, (accuracy, reported)
