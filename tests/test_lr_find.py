"""``gluon-ft lr-find`` and :func:`range_test`: the LR range test changes nothing it touches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from conftest import record_steps, tiny_config, write_class_folders, write_image_folder

from gluon_ft.data import folders
from gluon_ft.data.decode import load_image
from gluon_ft.data.loaders import set_epoch
from gluon_ft.errors import UsageError
from gluon_ft.train.checkpoint import optimizer_state
from gluon_ft.train.devices import parse_contexts
from gluon_ft.train.feeds import image_loaders, load_dataset
from gluon_ft.train.lr_find import lr_at, lr_find, range_test, suggest_valley
from gluon_ft.train.network import make_loss, make_trainer, ready_network
from gluon_ft.train.step import MetricSums, StepOptions, train_batch


def _setup(data: Path, tmp_path: Path, **changes):
    """A tiny network, its Trainer, train loader and loss, as a run builds them."""
    config = tiny_config(data, tmp_path / "run", momentum=0.9, **changes)
    config.validate()
    ctx = parse_contexts(config.ctx)
    parts = load_dataset(config.data)
    net, _, _ = ready_network(config, len(parts.classes), ctx)
    trainer = make_trainer(net, config, ctx)
    loader, _ = image_loaders(config, parts.train, parts.test)
    loss_fn = make_loss(config, parts.train.labels(), len(parts.classes), ctx)
    return config, ctx, net, trainer, loader, loss_fn


def _step(setup, images, labels) -> None:
    config, ctx, net, trainer, _, loss_fn = setup
    mx.random.seed(1)
    sums = MetricSums(ctx)
    train_batch(net, trainer, images, labels, ctx, loss_fn, sums, options=StepOptions.of(config))


def _state(net, trainer) -> dict:
    """Every copy of every parameter, the optimizer's arrays and counters, and the rate."""
    mx.nd.waitall()  # BatchNorm statistics land after the step (see TrainingSnapshot)
    arrays, info = optimizer_state(trainer, net)
    state = {  # by structural names, which a twin network shares
        f"param {name} {i}": d.asnumpy().copy()
        for name, p in net._collect_params_with_prefix().items()
        for i, d in enumerate(p.list_data())
    }
    state.update({f"optimizer {k}": v.asnumpy().copy() for k, v in arrays.items()})
    state["counters"] = json.dumps(info, sort_keys=True)
    return state


def _assert_bitwise_equal(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert not changed, f"changed: {changed[:5]}"


@pytest.mark.parametrize("ctx", ["cpu", "cpu:2"])
def test_range_test_puts_every_parameter_and_the_optimizer_back(tmp_path, ctx):
    data = write_image_folder(tmp_path / "data", n_train=8, size=32)
    setup = _setup(data, tmp_path, ctx=ctx)
    twin = _setup(data, tmp_path, ctx=ctx)  # the same run without the test
    config, ctx_list, net, trainer, loader, loss_fn = setup
    set_epoch(loader, 0)
    images, labels, _ = next(iter(loader))
    for run in (setup, twin):  # steps first: momentum to keep, and on cpu:2 a kvstore
        for _ in range(2):  # (the first step of a fresh graph leaves the running stats alone)
            _step(run, images, labels)
    before = _state(net, trainer)
    bn_means = [p for name, p in net.collect_params().items() if name.endswith("running_mean")]
    result = range_test(net, trainer, loader, ctx_list, loss_fn, config, 8, 1e-3, 1.0)
    assert result.steps >= 2
    _assert_bitwise_equal(before, _state(net, trainer))
    # The running statistics compared above are live ones: training moved them from zero.
    assert any(d.abs().sum().asscalar() > 0 for p in bn_means for d in p.list_data())
    for p in net.collect_params().values():
        if p.grad_req != "null":
            assert all(g.abs().sum().asscalar() == 0 for g in p.list_grad()), p.name
    # What the next step does is the twin's too: no stale copy (a kvstore's) survived.
    _step(setup, images, labels)
    _step(twin, images, labels)
    _assert_bitwise_equal(_state(twin[2], twin[3]), _state(net, trainer))


def test_the_rate_grows_exponentially_and_the_test_stops_when_the_loss_blows_up(
    tmp_path, monkeypatch
):
    data = write_image_folder(tmp_path / "data", n_train=4, size=32)  # 2 batches: looped over
    config, ctx, net, trainer, loader, loss_fn = _setup(data, tmp_path)
    rates = record_steps(monkeypatch)
    result = range_test(net, trainer, loader, ctx, loss_fn, config, 5, 1e-6, 1e-2)
    assert rates == result.lrs  # each step ran at its rate
    assert result.steps == 5 and not result.stopped_early
    assert result.lrs[0] == 1e-6 and result.lrs[-1] == pytest.approx(1e-2, rel=1e-12)
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, math.log(10), rtol=1e-9)
    assert trainer.learning_rate == config.lr

    blown = range_test(net, trainer, loader, ctx, loss_fn, config, 30, 1e-2, 1e8)
    assert blown.stopped_early and blown.steps < 30
    last, best = blown.smoothed[-1], min(blown.smoothed[:-1])
    assert not math.isfinite(last) or last > 4 * best
    assert all(s <= 4 * min(blown.smoothed[: i + 1]) for i, s in enumerate(blown.smoothed[:-1]))


def test_the_valley_rule_picks_halfway_down_the_longest_descent():
    lrs = [lr_at(i, 60, 1e-6, 10.0) for i in range(60)]
    flat = [1.0] * 20  # steps 0-19
    descent = list(np.linspace(0.99, 0.4, 30))  # steps 20-49
    rise = list(np.linspace(0.5, 3.0, 10))  # steps 50-59
    curve = flat + descent + rise
    curve[30] = 0.95  # a noisy step does not break the descent: it is passed over
    suggestion, how = suggest_valley(lrs, curve)
    # The first 6 steps are left out; the longest descent: step 19 (the last flat one), then
    # 20-49 without 30: L = 30 ending at e = 49, so s = 20 and the pick is 20 + 10 + 5.
    assert suggestion == lrs[35]
    assert "valley" in how and "30 steps" in how
    assert suggest_valley(lrs[:10], [1.0] * 10)[0] is None  # never fell: no suggestion


def test_lr_find_reads_the_train_part_only(tmp_path, monkeypatch):
    data = write_class_folders(tmp_path / "data", {"a": 8, "b": 8})
    settings = dict(val_split=0.25, test_split=0.25, seed=3)
    parts = load_dataset(str(data), **settings)
    read = []
    # ImageFolderSplit.load decodes through the folders module's name for load_image.
    monkeypatch.setattr(folders, "load_image", lambda path: read.append(path) or load_image(path))
    config = tiny_config(data, tmp_path / "unused", **settings)
    result, out = lr_find(config, tmp_path / "lrf", num_steps=6, start_lr=1e-4, end_lr=1e-1)
    train_files = {path for path, _ in parts.train.items}
    assert read and set(read) <= train_files
    assert set(read) == train_files  # 6 steps of 4 cover the 8 train images
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["settings"]["train_size"] == len(parts.train) == 8
    assert saved["lrs"] == result.lrs
    assert not (tmp_path / "unused").exists()


def test_the_command_writes_its_files_and_prints_the_suggestion(tmp_path, cli):
    data = write_image_folder(tmp_path / "data", n_train=8, size=32)
    args = ["--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"]
    args += ["--image-size", "32", "--batch-size", "4", "--steps", "12", "--ctx", "cpu:2"]
    done = cli("lr-find", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (out,) = (tmp_path / "runs").glob("lr-find-data-mobilenet0.25-*")
    saved = json.loads((out / "lr_find.json").read_text())
    assert len(saved["lrs"]) == saved["steps"] == len(saved["losses"]) == len(saved["smoothed"])
    assert saved["method"] == "valley" and saved["settings"]["num_steps"] == 12
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    if saved["suggestion"] is None:
        assert "no suggested lr" in done.stdout
    else:
        assert f"suggested lr: {saved['suggestion']:.3g} (valley" in done.stdout
    assert f"wrote {out.relative_to(tmp_path) / 'lr_find.json'}" in done.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr 1 and --end-lr 0.1"),
        (["--steps", "1"], "--steps must be at least 2"),
        (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (["--pretrained", "missing.params"], "missing.params"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, flags, message, cli):
    data = write_image_folder(tmp_path / "data", n_train=2, n_test=1, size=32)
    args = ["--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"]
    args += ["--image-size", "32", "--out", str(tmp_path / "out"), *flags]
    done = cli("lr-find", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_a_training_part_without_a_readable_image_is_a_usage_error(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=2, n_test=1, size=32)
    config, ctx, net, trainer, _, loss_fn = _setup(data, tmp_path)
    unreadable = [(None, None, 4)]  # what the loader gives for a batch of broken files
    with pytest.raises(UsageError, match="no readable image"):
        range_test(net, trainer, unreadable, ctx, loss_fn, config, 5)
