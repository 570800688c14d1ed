"""Checkpoints, --resume, signals and the divergence guard (issue 7).

The runs are tiny (mobilenet0.25 at 32 px, 24 training images, batches of 4, momentum 0.9 so
that the optimizer has state to lose), so that an uninterrupted 2-epoch run, a killed one and
its resumption can be compared parameter by parameter.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import conftest
import mxnet as mx
import numpy as np
import pytest
from conftest import REPO, record_steps
from mxnet import gluon
from mxnet.gluon import nn

from gluon_ft.errors import DivergedError, Interrupted, UsageError
from gluon_ft.train import EpochSteps, StopRequest, TrainConfig, make_trainer, step_seed, train
from gluon_ft.train import checkpoint as ckpt

STEPS_PER_EPOCH = 6  # 2 classes x 12 images, batches of 4


SETTINGS = {"epochs": 2, "momentum": 0.9, "seed": 3}


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    return conftest.tiny_config(data, out, **{**SETTINGS, **changes})


def cli_args(data: Path, out: Path, epochs: int = 2) -> list[str]:
    """The command line of :func:`tiny_config`."""
    return [
        "train",
        *("--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--epochs", str(epochs), "--batch-size", "4", "--image-size", "32"),
        *("--momentum", "0.9", "--seed", "3", "--out", str(out), "--no-progress"),
    ]


def params_of(path: Path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def assert_same_params(a: Path, b: Path) -> float:
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    diff = max(float(np.abs(pa[k] - pb[k]).max()) for k in pa)
    assert diff <= 1e-6, f"max abs difference {diff}"
    return diff


@pytest.fixture
def reference(image_folder, trained_run):
    """An uninterrupted 2-epoch run (trained once per session); every resumed run below must
    end with its parameters."""
    data = image_folder(n_train=12, n_test=2, size=36)
    return data, trained_run(data, **SETTINGS).path


def one_epoch_run(trained_run, data: Path, where: Path) -> Path:
    """A copy at ``where`` of the session's 1-epoch run of :func:`tiny_config`, to resume."""
    shutil.copytree(trained_run(data, **{**SETTINGS, "epochs": 1}).path, where)
    return where


def test_resume_after_epoch_one_equals_the_uninterrupted_run(reference, trained_run, tmp_path):
    data, uninterrupted = reference
    run = one_epoch_run(trained_run, data, tmp_path / "run")
    first = run / "checkpoints" / "epoch-0001"
    meta = json.loads((first / "meta.json").read_text())
    assert meta["epoch"] == 1 and meta["step"] == 0 and len(meta["history"]) == 1
    momentum = mx.nd.load(str(first / "optimizer.nd"))
    # The optimizer state is really there: one momentum array per trained parameter.
    assert len(momentum) == len(meta["optimizer"]["states"]) > 0
    assert any(float(v.abs().sum().asscalar()) > 0 for v in momentum.values())

    result = train(tiny_config(data, run, resume=True))
    assert_same_params(run / "model.params", uninterrupted / "model.params")
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    expected = json.loads((uninterrupted / "metrics.json").read_text())
    for got, want in zip(result["history"], expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["train_acc"] == want["train_acc"] and got["test_acc"] == want["test_acc"]


def test_ctrl_c_mid_epoch_saves_a_checkpoint_and_resume_is_exact(reference, tmp_path, monkeypatch):
    """SIGINT arrives during step 2 of epoch 2: that step completes, then the run stops.

    SIGTERM takes the same path; the command-line test below sends it for real.
    """
    signum = signal.SIGINT
    data, uninterrupted = reference
    run = tmp_path / "run"
    calls = record_steps(monkeypatch, signal_after=STEPS_PER_EPOCH + 2, signum=signum)
    with pytest.raises(Interrupted, match=signal.Signals(signum).name) as err:
        train(tiny_config(data, run))
    monkeypatch.undo()
    assert len(calls) == STEPS_PER_EPOCH + 2  # no step after the signal
    saved = run / "checkpoints" / "interrupted-epoch-0002-step-000002"
    assert str(saved) in str(err.value) and "--resume" in str(err.value)
    assert json.loads((saved / "meta.json").read_text())["partial"]["sums"]["count"] == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    result = train(tiny_config(data, run, resume=True))
    assert_same_params(run / "model.params", uninterrupted / "model.params")
    # Epoch 2's metrics cover the steps before and after the interruption.
    expected = json.loads((uninterrupted / "metrics.json").read_text())
    assert result["history"][1]["train_acc"] == expected[1]["train_acc"]
    assert result["history"][1]["loss"] == pytest.approx(expected[1]["loss"], rel=1e-5)
    # The finished epoch's checkpoint supersedes the interrupted one.
    assert not saved.exists() and (run / "checkpoints" / "epoch-0002").is_dir()


def _wait_for(path: Path, child: subprocess.Popen) -> None:
    while not path.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"training ended (exit {child.returncode}) before {path}:\n{err}")
        time.sleep(0.005)


def test_sigkill_during_epoch_two_resumes_from_epoch_one_never_a_partial(reference, tmp_path, cli):
    data, uninterrupted = reference
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    child = subprocess.Popen(
        [sys.executable, "-m", "gluon_ft", *cli_args(data, run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(checkpoints / "epoch-0001", child)
        child.kill()
    finally:
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert [c.path.name for c in ckpt.list_checkpoints(checkpoints)] == ["epoch-0001"]
    assert not (run / "model.params").exists()

    # What a kill during the next save leaves: a temporary directory (of the dead process),
    # and, worse, a complete-looking epoch-0002 whose parameters were damaged afterwards.
    partial = checkpoints / f".epoch-0002.tmp-{child.pid}"
    shutil.copytree(checkpoints / "epoch-0001", partial)
    (partial / "model.params").write_bytes(b"half")
    damaged = checkpoints / "epoch-0002"
    shutil.copytree(checkpoints / "epoch-0001", damaged)
    meta = json.loads((damaged / "meta.json").read_text())
    (damaged / "meta.json").write_text(json.dumps({**meta, "epoch": 2}))
    raw = bytearray((damaged / "model.params").read_bytes())
    raw[-5] ^= 0xFF
    (damaged / "model.params").write_bytes(bytes(raw))

    resumed = cli(*cli_args(data, run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoints / 'epoch-0001'} (epoch 1)" in resumed.stdout
    assert "epoch-0002: SHA-1 mismatch in model.params" in resumed.stdout
    assert f".epoch-0002.tmp-{child.pid}: removed" in resumed.stdout
    assert "Traceback" not in resumed.stderr
    assert not partial.exists()
    assert_same_params(run / "model.params", uninterrupted / "model.params")
    latest, notes = ckpt.latest_checkpoint(checkpoints)
    assert latest.path == damaged and notes == []  # rewritten whole by the resumed run


def test_sigterm_exits_130_after_saving_a_checkpoint(reference, tmp_path):
    data, _ = reference
    run = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "gluon_ft", *cli_args(data, run, epochs=4)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(run / "checkpoints" / "epoch-0001", child)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, stderr
    assert "Stopped by SIGTERM; saved checkpoint" in stderr and "Traceback" not in stderr
    latest, _ = ckpt.latest_checkpoint(run / "checkpoints")
    assert f"saved checkpoint {latest.path} " in stderr


def tiny_net(ctx) -> nn.HybridSequential:
    mx.random.seed(0)
    net = nn.HybridSequential()
    net.add(nn.Dense(8, in_units=5, activation="relu"), nn.Dense(3, in_units=8))
    net.initialize(mx.init.Xavier(), ctx=ctx)
    return net


def _steps(net, trainer, ctx, count, seed):
    rng = np.random.default_rng(seed)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(count):
        x = rng.standard_normal((4, 5)).astype("float32")
        y = rng.integers(0, 3, 4)
        xs = gluon.utils.split_and_load(mx.nd.array(x), ctx)
        ys = gluon.utils.split_and_load(mx.nd.array(y), ctx)
        with mx.autograd.record():
            losses = [loss_fn(net(a), b) for a, b in zip(xs, ys)]
        mx.autograd.backward(losses)
        trainer.step(4)
    return {k: p.data(ctx[0]).asnumpy() for k, p in net._collect_params_with_prefix().items()}


@pytest.mark.parametrize("contexts", [1, 2], ids=["one-context", "two-contexts-kvstore"])
def test_optimizer_state_round_trip(tmp_path, contexts):
    """Momentum and update counts survive the checkpoint, on local and kvstore updaters."""
    ctx = [mx.cpu(i) for i in range(contexts)]
    config = TrainConfig(lr=0.1, momentum=0.9, wd=0.01)
    net = tiny_net(ctx)
    trainer = make_trainer(net, config, ctx)
    _steps(net, trainer, ctx, 3, seed=1)
    saved = ckpt.save_checkpoint(tmp_path, net, trainer, {"epoch": 1})
    expected = _steps(net, trainer, ctx, 2, seed=2)

    restored_net = tiny_net(ctx)
    restored = make_trainer(restored_net, config, ctx)
    ckpt.restore_checkpoint(saved, restored_net, restored)
    assert restored.optimizer.num_update == 3
    got = _steps(restored_net, restored, ctx, 2, seed=2)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-7)

    # Control: the same parameters without the optimizer state take other steps.
    fresh_net = tiny_net(ctx)
    fresh_net.load_parameters(str(saved.path / ckpt.PARAMS_FILE), ctx=ctx)
    other = _steps(fresh_net, make_trainer(fresh_net, config, ctx), ctx, 2, seed=2)
    assert max(float(np.abs(other[k] - expected[k]).max()) for k in expected) > 1e-4


def test_latest_checkpoint_passes_over_unfinished_truncated_and_corrupt_ones(tmp_path):
    ctx = [mx.cpu()]
    net = tiny_net(ctx)
    trainer = make_trainer(net, TrainConfig(momentum=0.9), ctx)
    _steps(net, trainer, ctx, 1, seed=0)
    good = ckpt.save_checkpoint(tmp_path, net, trainer, {"epoch": 1})
    for name in ("epoch-0002", "epoch-0003", "epoch-0004"):
        shutil.copytree(good.path, tmp_path / name)
    meta = json.loads((good.path / "meta.json").read_text())
    for epoch, name in ((2, "epoch-0002"), (3, "epoch-0003"), (4, "epoch-0004")):
        (tmp_path / name / "meta.json").write_text(json.dumps({**meta, "epoch": epoch}))
    (tmp_path / "epoch-0002" / "meta.json").write_text('{"format": "gluon-ft-checkp')  # cut
    (tmp_path / "epoch-0003" / "optimizer.nd").write_bytes(b"")  # truncated
    params = tmp_path / "epoch-0004" / "model.params"
    params.write_bytes(params.read_bytes()[:-1] + b"\x00")  # same size, other bytes
    shutil.copytree(good.path, tmp_path / ".epoch-0005.tmp-1")

    latest, notes = ckpt.latest_checkpoint(tmp_path)
    assert latest.path == good.path
    assert sorted(n.split(":")[0] for n in notes) == [
        ".epoch-0005.tmp-1",
        "epoch-0002",
        "epoch-0003",
        "epoch-0004",
    ]
    assert any("SHA-1 mismatch" in n for n in notes)


def test_a_kill_before_the_rename_leaves_no_checkpoint(tmp_path, monkeypatch):
    ctx = [mx.cpu()]
    net = tiny_net(ctx)
    trainer = make_trainer(net, TrainConfig(), ctx)
    first = ckpt.save_checkpoint(tmp_path, net, trainer, {"epoch": 1})

    def killed(*args):
        raise KeyboardInterrupt  # the process dies with everything written but the rename

    monkeypatch.setattr(ckpt.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, net, trainer, {"epoch": 2})
    monkeypatch.undo()
    assert not (tmp_path / "epoch-0002").exists()
    assert (tmp_path / f".epoch-0002.tmp-{os.getpid()}" / "meta.json").is_file()
    assert ckpt.latest_checkpoint(tmp_path)[0].path == first.path


def test_huge_lr_exits_3_naming_step_and_lr(reference, tmp_path, cli):
    data, _ = reference
    result = cli(*cli_args(data, tmp_path / "run"), "--lr", "1e30")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "training loss became nan by step" in result.stderr
    assert "(lr 1e+30)" in result.stderr and "No checkpoint was saved" in result.stderr


def test_divergence_message_names_the_last_good_checkpoint(reference, tmp_path, monkeypatch):
    data, _ = reference
    run = tmp_path / "run"
    original_step = gluon.Trainer.step
    calls = []

    def step_then_poison(self, *args, **kwargs):
        original_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH + 1:  # first step of epoch 2
            weight = self._params[0]
            weight.set_data(mx.nd.full(weight.shape, float("nan")))

    monkeypatch.setattr(gluon.Trainer, "step", step_then_poison)
    with pytest.raises(DivergedError) as err:
        train(tiny_config(data, run))
    message = str(err.value)
    assert message.startswith("Epoch 2: ") and "lr 0.01" in message
    assert f"last good checkpoint is {run / 'checkpoints' / 'epoch-0001'} (epoch 1)" in message
    assert not (run / "checkpoints" / "epoch-0002").exists()  # nothing NaN was saved


def test_resume_refuses_other_settings_and_folders_without_a_run(reference, trained_run, tmp_path):
    data, _ = reference
    run = one_epoch_run(trained_run, data, tmp_path / "run")
    with pytest.raises(UsageError, match=r"--lr was 0\.01, now 0\.1") as err:
        train(tiny_config(data, run, resume=True, lr=0.1))
    assert "Repeat the original command" in str(err.value)
    with pytest.raises(UsageError, match="holds no run to continue"):
        train(tiny_config(data, tmp_path / "elsewhere", resume=True))
    with pytest.raises(UsageError, match="--resume needs --out"):
        train(replace(tiny_config(data, run), resume=True, out=None))
    with pytest.raises(UsageError, match="already holds a run"):
        train(tiny_config(data, run))  # no silent overwrite without --resume


def test_each_step_draws_from_its_own_seed():
    """Dropout and other mx.random users draw the same at step k, resumed or not."""
    loader = [f"batch {i}" for i in range(4)]
    with StopRequest() as stop:
        whole = EpochSteps(loader, seed=5, epoch=1, first_step=0, stop=stop)
        draws = {}
        for step, _ in enumerate(whole, 1):
            draws[step] = mx.nd.random.uniform(shape=(3,)).asnumpy()
        resumed = EpochSteps(loader[2:], seed=5, epoch=1, first_step=2, stop=stop)
        for step, _ in enumerate(resumed, 3):
            np.testing.assert_array_equal(mx.nd.random.uniform(shape=(3,)).asnumpy(), draws[step])
    assert whole.done == 4 and resumed.done == 4
    assert step_seed(5, 1, 3) != step_seed(5, 2, 3) != step_seed(6, 1, 3)


# Names whose use would unpickle (or pickle state that another run then unpickles).
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
PICKLE_CALLS = {"load_states", "save_states", "set_states", "get_states", "load_optimizer_states"}


def pickle_uses(source: str, filename: str = "<probe>") -> list[str]:
    """``file:line`` of every import of a pickler or call of the pickling MXNet API."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [where for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(where)
        elif isinstance(node, ast.Attribute) and node.attr in PICKLE_CALLS:
            found.append(where)
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            allowed = not (isinstance(node.value, ast.Constant) and node.value.value is False)
            found += [where] if allowed else []
    return found


def test_no_pickle_on_any_code_path():
    """No module of the package imports a pickler or calls the pickling Trainer/Updater API."""
    probe = "import pickle\nfrom dill import loads\nt.load_states(f)\nnp.load(f, allow_pickle=True)"
    assert len(pickle_uses(probe)) == 4  # it sees what it looks for
    found = []
    for path in sorted((REPO / "gluon_ft").rglob("*.py")):
        found += pickle_uses(path.read_text(), str(path.relative_to(REPO)))
    assert found == []
