"""Logs (issue 16): metrics.csv beside metrics.json, TensorBoard event files, and plain lines
instead of progress-bar redraws when the output is not a terminal."""

from __future__ import annotations

import csv
import json
import struct

import pytest
from conftest import tiny_config, write_class_folders, write_image_folder

from gluon_ft.train import train


def event_scalars(folder) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` read back from the TFRecord event files in ``folder``."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        blob = path.read_bytes()
        offset = 0
        while offset < len(blob):
            (length,) = struct.unpack("<Q", blob[offset : offset + 8])
            event = Event.FromString(blob[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_metrics_csv_and_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboardX", reason="tensorboardX is pinned in the constraints")
    data = write_class_folders(tmp_path / "photos", {"a": 10, "b": 10})
    run = train(tiny_config(data, tmp_path / "run", epochs=2, tensorboard=True))["run_dir"]
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(metrics) == 2
    for row, expected in zip(rows, metrics):
        assert list(row) == list(expected)
        assert float(row["val_acc"]) == expected["val_acc"]
        assert float(row["loss"]) == expected["loss"]
    scalars = event_scalars(run / "tensorboard")
    for key in ("loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert scalars[key] == pytest.approx({r["epoch"]: r[key] for r in metrics}), key


def test_a_run_logged_to_a_file_has_no_carriage_returns(tmp_path, cli):
    """Output that is not a terminal (here captured in this process, as a file would) gets
    the epochs' plain lines, not progress-bar redraws."""
    data = write_image_folder(tmp_path / "data", n_train=8, n_test=2, size=32)
    done = cli(
        *("train", "--data", data, "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--image-size", "32", "--epochs", "2", "--batch-size", "4", "--out", tmp_path / "run"),
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    assert "\r" not in text
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("epoch ")] == [
        "epoch 1",
        "epoch 2",
    ]
