"""Data-parallel training on the parameter server: real scheduler, server and worker processes
on 127.0.0.1, started by :func:`gluon_ft.cluster.launch.launch` or ``gluon-ft launch``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import write_image_folder

import gluon_ft  # noqa: F401  (thread settings before mxnet)
from gluon_ft.cluster.launch import launch
from gluon_ft.data.loaders import EpochBatchSampler
from gluon_ft.errors import UsageError
from gluon_ft.train.dist import connect
from gluon_ft.train.resume import step_seed

# The worker of the equivalence and learning-rate tests. "train" runs the real
# gluon_ft.train.train() with one change: a tiny network without BatchNorm, whose result
# cannot depend on how a batch is split. It records which training samples this process
# decoded, a draw from mx.random at each step (what Dropout would draw from; the network has
# none, so the draws change nothing), and saves the parameters it ended with, per rank.
WORKER = r"""
import json
import sys
from pathlib import Path

import gluon_ft
import mxnet as mx
from mxnet import autograd, gluon

from gluon_ft.data.loaders import EpochBatchSampler, TransformedSplit
from gluon_ft.data.transforms import TrainTransform
import gluon_ft.train.run
from gluon_ft import train as gtrain

mode, out = sys.argv[1], Path(sys.argv[2])

if mode == "train":
    kvstore, data = sys.argv[3], sys.argv[4]
    nets = []

    def tiny_network(config, num_classes, ctx):
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Conv2D(6, 3, strides=2, activation="relu"), gluon.nn.GlobalAvgPool2D())
        net.add(gluon.nn.Dense(num_classes))
        net.initialize(mx.init.Xavier(), ctx=ctx)
        nets.append(net)
        return net, None

    gluon_ft.train.run.build_network = tiny_network
    # The end-of-run report rebuilds the run's zoo model from its name, which this stand-in
    # network is not; what these tests compare is the training.
    gluon_ft.train.run.build_report = lambda *args, **kwargs: (None, None)
    decoded = []
    original_getitem = TransformedSplit.__getitem__

    def recording_getitem(self, key):
        split = "train" if isinstance(self.transform, TrainTransform) else "test"
        decoded.append([split, *key])
        return original_getitem(self, key)

    TransformedSplit.__getitem__ = recording_getitem
    draws = []
    original_iter = gluon_ft.train.resume.EpochSteps.__iter__

    def drawing_iter(self):
        for batch in original_iter(self):
            draws.append(mx.nd.random.uniform(shape=(2,)).asnumpy().tolist())
            yield batch

    gluon_ft.train.resume.EpochSteps.__iter__ = drawing_iter
    config = gtrain.TrainConfig(
        data=data, pretrained="none", epochs=2, batch_size=4, lr=0.02, momentum=0.9,
        image_size=32, kvstore=None if kvstore == "none" else kvstore, progress=False,
        out=str(out / "run"),
    )
    result = gtrain.train(config)
    rank = result["rank"]
    nets[0].save_parameters(str(out / f"rank{rank}.params"))
    record = {"decoded": decoded, "draws": draws, **result}
    (out / f"rank{rank}.json").write_text(json.dumps(record, default=str))

elif mode == "lr":
    # y = w.x with x fixed per rank: the gradient never depends on w, so each step's update
    # is exactly lr * (summed gradient) / (global batch).
    from gluon_ft.train.dist import connect

    dist = connect(sys.argv[3], batch_size=2)
    net = gluon.nn.Dense(1, use_bias=False, in_units=3)
    net.initialize(mx.init.Zero())
    config = gtrain.TrainConfig(lr=0.1, wd=0.0)
    if sys.argv[4] == "ours":
        trainer = gtrain.make_trainer(net, config, [mx.cpu()], dist)
    else:  # MXNet's default for a dist kvstore: the optimizer lives on the servers
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": config.lr},
                                kvstore=dist.kvstore)
    x = mx.nd.array([[1.0, 2.0, 3.0]]) * (dist.rank + 1)

    def step():
        before = net.weight.data().copy()
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
        trainer.step(2)
        return (net.weight.data() - before).asnumpy().ravel().tolist()

    first = step()
    trainer.set_learning_rate(0.01)
    second = step()
    weights = net.weight.data().asnumpy().ravel().tolist()
    result = {"first": first, "second": second, "weights": weights}
    (out / f"lr-rank{dist.rank}.json").write_text(json.dumps(result))
"""


@pytest.fixture
def worker(tmp_path) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return [sys.executable, str(script)]


def run_cluster(command: list[str], workers: int = 2) -> str:
    out = io.StringIO()
    code = launch(command, workers, stream=out)
    assert code == 0, out.getvalue()
    return out.getvalue()


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("size,batch,shards", [(13, 4, 2), (11, 6, 4), (10, 5, 3), (5, 4, 3)])
def test_shards_of_each_global_batch_are_disjoint_and_add_up_to_it(size, batch, shards):
    single = EpochBatchSampler(size, batch, True, seed=5)
    sharded = [EpochBatchSampler(size, batch, True, 5, r, shards) for r in range(shards)]
    for epoch in range(2):
        for sampler in [single, *sharded]:
            sampler.set_epoch(epoch)
        # Every shard takes the same number of steps, even when its last part is empty.
        assert {len(s) for s in sharded} == {len(single)} == {-(-size // batch)}
        for whole, *parts in zip(single, *sharded):
            keys = [key for part in parts for key in part]
            assert sorted(keys) == sorted(whole)  # disjoint, and together the global batch
        assert sharded[0].global_batch_sizes() == [len(b) for b in single]
        assert sorted(np.concatenate([s.indices() for s in sharded])) == list(range(size))
    # Reshuffled per epoch: the last epoch's order differs from the first one's.
    single.set_epoch(0)
    first = single.indices()
    single.set_epoch(1)
    assert list(first) != list(single.indices())


def test_a_resumed_epoch_skips_whole_global_batches():
    sampler = EpochBatchSampler(13, 4, True, seed=1, shard=1, num_shards=2)
    sampler.set_epoch(0)
    full = list(sampler)
    sampler.set_epoch(0, first_batch=2)
    assert list(sampler) == full[2:]
    assert sampler.global_batch_sizes() == [4, 1]


def test_one_process_context_sums_nothing_but_its_own_values():
    local = connect(None, 8)
    assert (local.rank, local.num_workers, local.is_writer) == (0, 1, True)
    assert not local.distributed and local.kvstore is None
    assert local.allreduce_sum([1, 2.5]) == [1.0, 2.5]


@pytest.mark.parametrize("kvstore", ["dist_sync", "dist_async"])
def test_a_dist_kvstore_outside_a_cluster_or_async_is_refused(kvstore, monkeypatch):
    for name in ("DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_NUM_WORKER"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="gluon-ft launch|dist_sync or dist_device_sync"):
        connect(kvstore, 8)


def test_the_global_batch_must_cover_every_worker(monkeypatch):
    cluster = {
        "DMLC_ROLE": "worker",
        "DMLC_PS_ROOT_URI": "127.0.0.1",
        "DMLC_PS_ROOT_PORT": "9",
        "DMLC_NUM_SERVER": "1",
        "DMLC_NUM_WORKER": "4",
    }
    for name, value in cluster.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match="--batch-size 3 is the global batch"):
        connect("dist_sync", 3)


# ----------------------------------------------------------------------------- real clusters


@pytest.mark.timeout(120)
def test_two_workers_equal_one_worker_with_the_whole_batch(worker, tmp_path):
    # 13 samples in global batches of 4: per epoch 4 steps of 4, 4, 4 and 1 samples, so one
    # worker's shard is shorter and its last step is empty.
    data = write_image_folder(tmp_path / "data", n_train=7, n_test=4, size=36)
    (data / "train" / "dog" / "006.png").unlink()
    single, pair = tmp_path / "single", tmp_path / "pair"
    single.mkdir()
    pair.mkdir()
    run_cluster([*worker, "train", str(pair), "dist_sync", str(data)])
    done = subprocess.run(
        [*worker, "train", str(single), "none", str(data)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr

    import mxnet as mx

    reference = mx.nd.load(str(single / "rank0.params"))
    ranks = [mx.nd.load(str(pair / f"rank{rank}.params")) for rank in (0, 1)]
    for name, value in ranks[0].items():  # the workers hold one model, bit for bit
        np.testing.assert_array_equal(value.asnumpy(), ranks[1][name].asnumpy(), err_msg=name)
    for rank in (0, 1):
        params = mx.nd.load(str(pair / f"rank{rank}.params"))
        assert params.keys() == reference.keys()
        for name, value in reference.items():
            np.testing.assert_allclose(
                params[name].asnumpy(), value.asnumpy(), rtol=1e-4, atol=1e-6, err_msg=name
            )
    # Rank 0 wrote the one run directory; its model is the parameters it trained.
    saved = mx.nd.load(str(pair / "run" / "model.params"))
    for name, value in mx.nd.load(str(pair / "rank0.params")).items():
        np.testing.assert_array_equal(saved[name].asnumpy(), value.asnumpy())

    # The epoch metrics are over every worker's shard: the same as the one-worker run's.
    ours = json.loads((pair / "run" / "metrics.json").read_text())
    theirs = json.loads((single / "run" / "metrics.json").read_text())
    # A run that diverged would magnify rounding differences and prove nothing.
    assert theirs[1]["loss"] < theirs[0]["loss"]
    for row, expected in zip(ours, theirs, strict=True):
        assert row["train_samples"] == expected["train_samples"] == 13
        for key in ("loss", "train_acc", "test_acc"):
            assert row[key] == pytest.approx(expected[key], rel=1e-4), key

    # Each epoch the shards are disjoint and together the training set (7 + 6 samples), and
    # the test set (4 + 4) for the evaluation.
    decoded = {r: json.loads((pair / f"rank{r}.json").read_text())["decoded"] for r in (0, 1)}
    for epoch in (0, 1):
        shards = [[i for s, i, e in decoded[r] if (s, e) == ("train", epoch)] for r in (0, 1)]
        assert sorted(shards[0] + shards[1]) == list(range(13))
        assert sorted(len(shard) for shard in shards) == [6, 7]
    tests = [[i for s, i, _ in decoded[r] if s == "test"] for r in (0, 1)]
    assert sorted(tests[0] + tests[1]) == sorted(list(range(8)) * 2)  # two evaluations
    assert not set(tests[0]) & set(tests[1])
    orders = [[i for s, i, e in decoded[0] if (s, e) == ("train", epoch)] for epoch in (0, 1)]
    assert orders[0] != orders[1]  # reshuffled
    assert sorted(orders[0]) != sorted(orders[1])  # and sharded anew

    # Each worker draws its own random numbers at every step (Dropout masks), while the one
    # process run draws exactly what it always did: step_seed(seed, epoch, step).
    draws = {r: json.loads((pair / f"rank{r}.json").read_text())["draws"] for r in (0, 1)}
    assert len(draws[0]) == len(draws[1]) == 8  # 2 epochs of 4 steps
    assert all(a != b for a, b in zip(draws[0], draws[1]))
    expected = []
    for epoch, step in [(e, s) for e in (0, 1) for s in range(1, 5)]:
        mx.random.seed(step_seed(0, epoch, step))
        expected.append(mx.nd.random.uniform(shape=(2,)).asnumpy().tolist())
    assert json.loads((single / "rank0.json").read_text())["draws"] == expected


@pytest.mark.timeout(90)
def test_a_learning_rate_change_reaches_the_next_dist_update(worker, tmp_path):
    run_cluster([*worker, "lr", str(tmp_path), "dist_device_sync", "ours"])
    # Both workers push x = (1, 2, 3) * (rank + 1): summed (3, 6, 9), over 2 samples.
    gradient = np.array([1.5, 3.0, 4.5])
    results = [json.loads((tmp_path / f"lr-rank{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        np.testing.assert_allclose(result["first"], -0.1 * gradient, rtol=1e-6)
        np.testing.assert_allclose(result["second"], -0.01 * gradient, rtol=1e-6)
    assert results[0]["weights"] == results[1]["weights"]


@pytest.mark.timeout(90)
def test_with_the_optimizer_on_the_servers_the_change_is_lost(worker, tmp_path):
    """Why gluon-ft keeps the optimizer on the workers (apache/mxnet#15919): MXNet's default
    for a dist kvstore ignores set_learning_rate, which the test above would catch."""
    run_cluster([*worker, "lr", str(tmp_path), "dist_sync", "mxnet-default"])
    result = json.loads((tmp_path / "lr-rank0.json").read_text())
    np.testing.assert_allclose(result["second"], result["first"], rtol=1e-6)


@pytest.mark.timeout(150)
def test_gluon_ft_launch_trains_and_writes_one_run_directory(tmp_path, cli):
    data = write_image_folder(tmp_path / "data", n_train=6, n_test=4, size=36)
    out = tmp_path / "runs" / "dist"
    train = [sys.executable, "-m", "gluon_ft", "train", "--kvstore", "dist_sync"]
    train += ["--data", str(data), "--pretrained", "none", "--epochs", "1", "--image-size", "32"]
    train += ["--model", "mobilenet0.25", "--batch-size", "8", "--out", str(out)]
    # The launcher runs in this process; its scheduler, server and workers are processes.
    done = cli("launch", "-n", "2", "-s", "1", "--", *train, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["dist"]
    assert {"config.json", "classes.json", "metrics.json", "model.params", "curves.png"} <= {
        p.name for p in out.iterdir()
    }
    (row,) = json.loads((out / "metrics.json").read_text())
    assert row["train_samples"] == 12  # every training image once, over both workers
    assert np.isfinite(row["loss"]) and 0 <= row["train_acc"] <= 1 and 0 <= row["test_acc"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["cluster"] == {
        "kvstore": "dist_sync",
        "num_workers": 2,
        "update_on_kvstore": False,
    }
    assert done.stdout.count("done: test acc") == 2, done.stdout
    metrics = (out / "metrics.json").read_bytes()

    # A worker that fails after joining the cluster (rank 0 refuses the existing run) exits at
    # once with its code, and the launcher stops the others rather than hanging.
    started = time.monotonic()
    again = cli("launch", "-n", "2", "--", *train, cwd=tmp_path)
    assert again.returncode == 2, again.stdout + again.stderr
    assert time.monotonic() - started < 45
    assert "already holds a run" in again.stdout
    assert (out / "metrics.json").read_bytes() == metrics


def test_launch_command_refuses_a_missing_worker_command(capsys):
    from gluon_ft.cli import main

    assert main(["launch", "-n", "2", "--"]) == 2
    assert "launch needs a worker command" in capsys.readouterr().err
