"""``--lr-schedule`` and ``--warmup-epochs``: the rate of every step, on resume and on 2 devices."""

from __future__ import annotations

import json
import math

import mxnet as mx
import numpy as np
import pytest
from conftest import record_steps, tiny_config

from gluon_ft.errors import Interrupted, UsageError
from gluon_ft.train import TrainConfig, train
from gluon_ft.train.schedule import LrSchedule

STEPS = 4  # 2 classes x 8 images, batches of 4


def test_constant_is_the_base_rate_after_a_linear_warmup():
    schedule = LrSchedule(0.1, "constant", epochs=3, steps_per_epoch=4, warmup_epochs=1)
    rates = [schedule.lr(e, s) for e in range(3) for s in range(4)]
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert rates[4:] == [0.1] * 8
    assert LrSchedule(0.1).lr(0, 0) == 0.1  # no warmup: the book's constant rate


def test_cosine_falls_from_the_peak_to_zero_after_the_warmup():
    schedule = LrSchedule(0.2, "cosine", epochs=5, steps_per_epoch=10, warmup_epochs=1)
    rates = [schedule.lr(e, s) for e in range(5) for s in range(10)]
    assert rates[9] == pytest.approx(0.2) and rates[10] == pytest.approx(0.2)
    assert rates[30] == pytest.approx(0.1)  # half way through the 40 decay steps
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert LrSchedule(0.2, "cosine", epochs=2, steps_per_epoch=1).lr(0, 0) == 0.2
    # A warmup as long as the run (e.g. a 1-epoch run with 1 warmup epoch) only rises.
    whole = LrSchedule(0.2, "cosine", epochs=1, steps_per_epoch=4, warmup_epochs=1)
    assert [whole.lr(0, s) for s in range(4)] == pytest.approx([0.05, 0.1, 0.15, 0.2])


def test_onecycle_is_pytorchs_onecyclelr_with_beta1_cycled_the_other_way():
    # OneCycleLR(max_lr=1e-3, total_steps=16, pct_start=0.25): up over steps 0..3, then down.
    schedule = LrSchedule(1e-3, "onecycle", epochs=1, steps_per_epoch=16)
    rates = [schedule.lr(0, s) for s in range(16)]
    betas = [schedule.beta1(0, s) for s in range(16)]
    assert rates[0] == pytest.approx(1e-3 / 25) and betas[0] == pytest.approx(0.95)
    assert rates[3] == pytest.approx(1e-3) and betas[3] == pytest.approx(0.85)
    assert rates[9] == pytest.approx(1e-3 / 25 / 1e4 + (1e-3 - 4e-9) / 2)  # half way down
    assert betas[9] == pytest.approx(0.9)
    assert rates[15] == pytest.approx(1e-3 / 25 / 1e4) and betas[15] == pytest.approx(0.95)
    assert rates[:4] == sorted(rates[:4]) and rates[3:] == sorted(rates[3:], reverse=True)
    assert LrSchedule(1e-3, "cosine").beta1(0, 0) is None  # other schedules leave beta1 alone


def test_onecycle_gives_the_head_epochs_a_cycle_of_their_own_and_sets_adamws_beta1():
    schedule = LrSchedule(1e-3, "onecycle", epochs=3, steps_per_epoch=16, start_epoch=1)
    head = LrSchedule(1e-3, "onecycle", epochs=1, steps_per_epoch=16)
    rest = LrSchedule(1e-3, "onecycle", epochs=2, steps_per_epoch=16)
    assert [schedule.lr(0, s) for s in range(16)] == [head.lr(0, s) for s in range(16)]
    got = [schedule.lr(e, s) for e in (1, 2) for s in range(16)]
    assert got == [rest.lr(e, s) for e in (0, 1) for s in range(16)]
    net = mx.gluon.nn.Dense(2)
    net.initialize()
    trainer = mx.gluon.Trainer(net.collect_params(), "adamw", {"learning_rate": 1.0})
    schedule.setter(trainer)(1, 7)
    assert trainer.learning_rate == pytest.approx(rest.lr(0, 7))
    assert trainer._optimizer.beta1 == pytest.approx(rest.beta1(0, 7)) != 0.9


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        LrSchedule(0.1, "step")


@pytest.fixture
def data(image_folder):
    return image_folder(n_train=8, n_test=2)


# 3 epochs of cosine with 1 of warmup, and momentum.
SETTINGS = dict(epochs=3, lr=0.05, momentum=0.9, lr_schedule="cosine", warmup_epochs=1.0, seed=1)


def config(data, out, **changes) -> TrainConfig:
    """:data:`SETTINGS` with ``changes``."""
    return tiny_config(data, out, **{**SETTINGS, **changes})


def test_every_step_gets_its_scheduled_rate_and_metrics_record_it(data, tmp_path, monkeypatch):
    seen = record_steps(monkeypatch)
    result = train(config(data, tmp_path / "run"))
    want = LrSchedule(0.05, "cosine", 3, STEPS, 1.0)
    assert seen == pytest.approx([want.lr(e, s) for e in range(3) for s in range(STEPS)])
    assert [row["lr"] for row in result["history"]] == pytest.approx(seen[STEPS - 1 :: STEPS])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]["lr"] < 0.01


def test_default_is_the_books_constant_rate(data, tmp_path, monkeypatch):
    seen = record_steps(monkeypatch)
    train(config(data, tmp_path / "run", lr_schedule="constant", warmup_epochs=0, epochs=1))
    assert seen == [0.05] * STEPS


def params(path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def max_difference(a, b) -> float:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    return max(float(np.abs(pa[k] - pb[k]).max()) for k in pa)


def test_a_run_resumed_mid_epoch_follows_the_same_schedule(
    data, tmp_path, monkeypatch, trained_run
):
    """Interrupted at step 2 of epoch 2 (in the cosine part), then resumed: the same weights."""
    whole = trained_run(data, **SETTINGS).path  # never stopped (trained once per session)
    record_steps(monkeypatch, signal_after=STEPS + 2)
    with pytest.raises(Interrupted):
        train(config(data, tmp_path / "resumed"))
    monkeypatch.undo()
    seen_after = record_steps(monkeypatch)
    train(config(data, tmp_path / "resumed", resume=True))
    want = LrSchedule(0.05, "cosine", 3, STEPS, 1.0)
    assert seen_after == pytest.approx(
        [want.lr(1, s) for s in range(2, STEPS)] + [want.lr(2, s) for s in range(STEPS)]
    )
    run = tmp_path / "resumed" / "model.params"
    assert max_difference(run, whole / "model.params") <= 1e-6


def test_two_devices_apply_the_schedule_as_one(data, tmp_path, monkeypatch):
    """Two contexts update through the device kvstore's optimizer: the rates must reach it."""
    used: list[float] = []
    original = mx.optimizer.Optimizer._get_lrs

    def get_lrs(self, indices):
        used.append(self.learning_rate)
        return original(self, indices)

    monkeypatch.setattr(mx.optimizer.Optimizer, "_get_lrs", get_lrs)
    seen = record_steps(monkeypatch)
    train(config(data, tmp_path / "two", ctx="cpu:2"))
    want = LrSchedule(0.05, "cosine", 3, STEPS, 1.0)
    assert seen == pytest.approx([want.lr(e, s) for e in range(3) for s in range(STEPS)])
    assert runs_of(used) == pytest.approx(runs_of(seen))


def runs_of(values: list[float]) -> list[float]:
    """``values`` without consecutive repeats: one entry per step when each step's rate differs."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"warmup_epochs": 4.0}, "--warmup-epochs must be between 0 and --epochs (3), got 4"),
        ({"warmup_epochs": -1.0}, "--warmup-epochs must be between 0"),
        ({"warmup_epochs": float("nan")}, "--warmup-epochs must be between 0"),
        ({"lr_schedule": "step"}, "--lr-schedule must be one of constant, cosine"),
    ],
)
def test_bad_settings_are_usage_errors(data, tmp_path, changes, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(data, tmp_path / "run", **changes).validate()


def test_command_line_flags(data, tmp_path, cli):
    args = ["train", "--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"]
    args += ["--epochs", "2", "--image-size", "32", "--batch-size", "4", "--no-progress"]
    good = cli(*args, "--lr-schedule", "cosine", "--warmup-epochs", "0.5", "--out", tmp_path / "r")
    assert good.returncode == 0, good.stderr
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["lr_schedule"], saved["warmup_epochs"]) == ("cosine", 0.5)
    bad = cli(*args, "--lr-schedule", "linear")
    assert bad.returncode == 2 and "invalid choice: 'linear'" in bad.stderr
    late = cli(*args, "--warmup-epochs", "3")
    assert late.returncode == 2 and "between 0 and --epochs (2), got 3" in late.stderr
    assert "Traceback" not in bad.stderr + late.stderr
