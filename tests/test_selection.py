"""Selection on validation, test once (issue 16): the best epoch's weights are kept, early
stopping, checkpoint retention, and a resumed run that still ends bit-exact.

The runs graft a head onto the shared food model's frozen, cached features (seconds each). Their
val/ folder holds the train classes' colours under swapped names, so the better the head learns
train, the worse its val loss: the best epoch by val_loss comes before the last.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config, write_image_folder

from gluon_ft.errors import UsageError
from gluon_ft.train import TrainConfig, train
from gluon_ft.train.selection import best_row, epochs_without_improvement, selection


def test_best_row_rules():
    history = [
        {"epoch": 1, "val_acc": 0.5, "val_loss": 0.9},
        {"epoch": 2, "val_acc": 0.7, "val_loss": float("nan")},
        {"epoch": 3, "val_acc": 0.7, "val_loss": 0.4},  # a tie is no improvement
        {"epoch": 4, "val_acc": 0.6, "val_loss": 0.6},
    ]
    assert best_row(history, "val_acc")["epoch"] == 2
    assert best_row(history, "val_loss")["epoch"] == 3  # lower is better; NaN never wins
    assert epochs_without_improvement(history, "val_acc") == 2
    assert selection(history, "val_loss", validated=True, epochs=6) == {
        "best_epoch": 3,
        "monitor": "val_loss",
        "best_value": 0.4,
        "stopped_early": True,
    }
    # Without a validation part: the last epoch, nothing monitored.
    unvalidated = [{"epoch": 1, "test_acc": 0.9}, {"epoch": 2, "test_acc": 0.5}]
    assert selection(unvalidated, "val_acc", validated=False, epochs=2)["best_epoch"] == 2


@pytest.fixture
def swapped_val_data(tmp_path, food_model) -> Path:
    data = write_image_folder(tmp_path / "data", n_train=8, n_test=4, size=64)
    write_image_folder(tmp_path / "swapped", classes=("dog", "cat"), n_train=4, n_test=0, size=64)
    (tmp_path / "swapped" / "train").rename(data / "val")
    return data


def food_config(data: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(data=str(data), pretrained=str(Path(changes.pop("source"))), image_size=64)
    settings.update(freeze="features", cache_features=True, batch_size=8, epochs=4)
    settings.update(monitor="val_loss", out=str(out), progress=False)
    return TrainConfig(**{**settings, **changes})


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_best_epoch_weights_kept_and_test_acc_equals_predict(
    swapped_val_data, food_model, tmp_path, cli
):
    run = tmp_path / "run"
    result = train(food_config(swapped_val_data, run, source=food_model, keep_checkpoints=1))
    metrics = json.loads((run / "metrics.json").read_text())
    val_loss = [row["val_loss"] for row in metrics]
    best = 1 + val_loss.index(min(val_loss))
    assert best < len(metrics) == 4  # the run is built so that the best is not the last
    assert all("test_acc" not in row and "val_acc" in row for row in metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert summary == result["summary"]
    assert (summary["best_epoch"], summary["monitor"]) == (best, "val_loss")
    assert summary["best_value"] == min(val_loss) and summary["stopped_early"] is False
    best_params = run / "checkpoints" / f"epoch-{best:04d}" / "model.params"
    assert (run / "model.params").read_bytes() == best_params.read_bytes()
    # --keep-checkpoints 1: the last, and the best.
    assert checkpoint_names(run) == [f"epoch-{best:04d}", "epoch-0004"]

    # The test part, once, on the kept weights: what `gluon-ft predict` says of its files.
    record = json.loads((run / "split.json").read_text())
    files = [
        (str(swapped_val_data / path), label)
        for label, cls in enumerate(record["classes"])
        for path in record["parts"]["test"][cls]
    ]
    done = cli("predict", str(run), *[f for f, _ in files], "--json", "--top-k", "1")
    assert done.returncode == 0, done.stderr
    predicted = [r["top"][0]["index"] for r in json.loads(done.stdout)]
    right = sum(p == label for p, (_, label) in zip(predicted, files))
    assert summary["test_acc"] == right / len(files)
    assert summary["images"] == len(files) == 8


def test_early_stop_and_bit_exact_resume_with_retention(swapped_val_data, food_model, tmp_path):
    whole = tmp_path / "whole"
    train(food_config(swapped_val_data, whole, source=food_model, keep_checkpoints=1))
    best = json.loads((whole / "summary.json").read_text())["best_epoch"]

    # Stopped after 2 epochs, resumed to 4: the same files as the run that never stopped.
    resumed = tmp_path / "resumed"
    train(food_config(swapped_val_data, resumed, source=food_model, keep_checkpoints=1, epochs=2))
    train(
        food_config(swapped_val_data, resumed, source=food_model, keep_checkpoints=1, resume=True)
    )
    assert checkpoint_names(resumed) == checkpoint_names(whole)
    for name in [
        "model.params",
        *(f"checkpoints/{n}/model.params" for n in checkpoint_names(whole)),
    ]:
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name

    # --early-stop 1: the first epoch that does not improve on the best is the last one run.
    early = tmp_path / "early"
    result = train(food_config(swapped_val_data, early, source=food_model, early_stop=1))
    assert [row["epoch"] for row in result["history"]] == list(range(1, best + 2))
    assert result["summary"]["stopped_early"] is True
    assert (early / "model.params").read_bytes() == (whole / "model.params").read_bytes()


def test_without_val_the_book_test_acc_stays_per_epoch_with_a_note(tmp_path, cli):
    data = write_image_folder(tmp_path / "data", n_train=4, n_test=2, size=32)
    run = tmp_path / "run"
    done = cli(
        "train",
        *("--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--epochs", "2", "--batch-size", "4", "--image-size", "32", "--out", str(run)),
    )
    assert done.returncode == 0, done.stderr
    assert "not a selection metric" in done.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert all("test_acc" in row and "val_acc" not in row for row in metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["best_epoch"], summary["monitor"]) == (2, None)
    last = run / "checkpoints" / "epoch-0002" / "model.params"
    assert (run / "model.params").read_bytes() == last.read_bytes()
    assert summary["test_acc"] == metrics[-1]["test_acc"]  # the same weights, tested again


def test_early_stop_without_a_val_part_is_refused(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=2, n_test=1, size=32)
    with pytest.raises(UsageError, match="--early-stop 2 needs a validation part"):
        train(tiny_config(data, tmp_path / "run", early_stop=2))
    assert not (tmp_path / "run").exists()
