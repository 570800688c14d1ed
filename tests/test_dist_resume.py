"""``--resume`` of a ``dist_sync`` run: SIGTERM to ``gluon-ft launch`` makes rank 0 save a
checkpoint, and the relaunch ends where a run that was never stopped ends. Real scheduler,
server and worker processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder

import gluon_ft  # noqa: F401  (thread settings before mxnet)


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    """A 2-epoch run of 12 steps per epoch, with momentum: its state must be restored too."""
    command = [sys.executable, "-m", "gluon_ft", "train", "--kvstore", "dist_sync"]
    command += ["--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"]
    command += ["--epochs", "2", "--image-size", "32", "--batch-size", "4", "--lr", "0.05"]
    command += ["--momentum", "0.9", "--lr-schedule", "cosine", "--out", str(out)]
    return [*command, *extra]


def launch_args(*train: str) -> list[str]:
    return ["launch", "-n", "2", "--", *train]


def read_until(process: subprocess.Popen, pattern: str) -> str:
    """The launcher's output up to the first line that matches ``pattern``."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return "".join(lines)
    raise AssertionError("".join(lines))


@pytest.mark.timeout(600)
def test_sigterm_to_the_launcher_then_resume_equals_the_uninterrupted_run(tmp_path, cli):
    data = write_image_folder(tmp_path / "data", n_train=48, n_test=4, size=32)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    # The launcher of the runs that are not stopped runs in this process; its workers do not.
    done = cli(*launch_args(*train_command(data, whole, "--no-progress")))
    assert done.returncode == 0, done.stdout + done.stderr

    # Rank 0's progress bar says when epoch 2 has taken a step: stop it there, mid-epoch.
    # (Bars are drawn into the launcher's pipe only when asked.)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gluon_ft", *launch_args(*train_command(data, stopped))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "GLUON_FT_PROGRESS_BARS": "1"},
    )
    try:
        # Steps 1-9 of 24: the rest of the epoch outlasts the signal's way to the workers
        # (with 12 steps an epoch, the last 3 once did not).
        output = read_until(launcher, r"epoch 2/2: .*\| *[1-9]/24 ")
        launcher.send_signal(signal.SIGTERM)
        output += launcher.communicate(timeout=90)[0]
    finally:
        launcher.kill()
    assert launcher.returncode == 130, output
    assert "[launch] interrupted: asking the workers to save a checkpoint and stop" in output
    assert "every worker has stopped" in output
    assert output.count("gluon-ft: error: Stopped by") == 2, output  # both workers, no hang
    saved = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    # Saved mid-epoch: the metric sums and BatchNorm statistics over both workers go with it.
    assert saved[0] == "epoch-0001" and saved[1].startswith("interrupted-epoch-0002"), saved
    assert not (stopped / "model.params").exists()

    again = train_command(data, stopped, "--resume", "--no-progress")
    resumed = cli(*launch_args(*again))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("resuming from") == 2  # every worker read rank 0's checkpoint

    import mxnet as mx

    expected = mx.nd.load(str(whole / "model.params"))
    got = mx.nd.load(str(stopped / "model.params"))
    assert got.keys() == expected.keys()
    worst = max(np.abs(got[k].asnumpy() - expected[k].asnumpy()).max() for k in expected)
    assert worst == 0.0, (worst, saved)  # bit for bit (the issue asks for <= 1e-6)
    # The metrics of the interrupted epoch count every worker's steps once, as if never stopped.
    rows = [json.loads((run / "metrics.json").read_text()) for run in (whole, stopped)]
    for ours, theirs in zip(*rows, strict=True):
        assert ours["train_samples"] == theirs["train_samples"] == 96
        for key in ("loss", "train_acc", "test_acc", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
