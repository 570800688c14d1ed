"""What a new user trips on: folders given to predict, mangled errors, checks made before any
work, what training says at its start, and the pictures and exit codes of a run."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from gluon_ft.cli import main
from gluon_ft.errors import UsageError


def _png(path: Path, size: int = 36, value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """A run directory as train leaves it, with random weights: only the plumbing is tested."""
    from gluon_ft.model.graft import build_model

    run = tmp_path_factory.mktemp("run")
    net = build_model("mobilenet0.25", 3)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.save_parameters(str(run / "model.params"))
    (run / "config.json").write_text(json.dumps({"model": "mobilenet0.25", "image_size": 32}))
    (run / "classes.json").write_text(json.dumps(["ant", "bee", "cow"]))
    return run


# ----------------------------------------------------------------------------- 13: predict


def _photo_folder(root: Path) -> Path:
    _png(root / "a.png")
    _png(root / "deeper" / "b.jpg", value=30)
    _png(root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".ipynb_checkpoints").mkdir(parents=True)
    _png(root / ".ipynb_checkpoints" / "c.png")
    return root


def test_predict_takes_a_folder_recursively_and_writes_csv(untrained_run, tmp_path, capsys):
    folder = _photo_folder(tmp_path / "photos")
    table = tmp_path / "out.csv"
    code = main(["predict", str(untrained_run), str(folder), "--top-k", "2", "--csv", str(table)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        str(folder / "a.png"),
        str(folder / "deeper" / "b.jpg"),
    ]
    assert "left out 3 hidden or non-image files" in err
    rows = list(csv.reader(table.open()))
    assert rows[0] == ["path", "class", "probability", "class_2", "probability_2", "error"]
    assert [row[0] for row in rows[1:]] == [str(folder / "a.png"), str(folder / "deeper" / "b.jpg")]
    for row in rows[1:]:
        assert row[1] in ("ant", "bee", "cow") and row[3] in ("ant", "bee", "cow")
        assert float(row[2]) >= float(row[4]) and row[5] == ""


def test_predict_csv_and_json_keep_an_unreadable_file_as_a_row(untrained_run, tmp_path, capsys):
    good = _png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    table = tmp_path / "out.csv"
    code = main(["predict", str(untrained_run), str(good), str(bad), "--json", "--csv", str(table)])
    out, err = capsys.readouterr()
    assert code == 2
    assert [r["ok"] for r in json.loads(out)] == [True, False]
    rows = list(csv.reader(table.open()))
    assert len(rows[0]) == 2 + 2 * 3  # path, three classes with probabilities, error
    assert rows[2][0] == str(bad) and rows[2][1] == "" and "not an image" in rows[2][-1]
    assert "Traceback" not in err


def test_predict_says_when_a_folder_holds_no_images(untrained_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    assert main(["predict", str(untrained_run), str(empty)]) == 2
    err = capsys.readouterr().err
    assert "a folder with no image files" in err and "readme.txt" in err


# ----------------------------------------------------------------------------- 11: messages


def _params_of(model: str, path: Path, classes: int = 3) -> Path:
    from gluon_ft.model.graft import build_model

    net = build_model(model, classes)
    net.initialize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.save_parameters(str(path))
    return path


def test_pretrained_json_is_named_as_the_note_not_the_weights(tmp_path):
    from gluon_ft.model.graft import load_source_model

    note = tmp_path / "food.json"
    note.write_text(json.dumps({"model": "resnet18_v2", "classes": ["a", "b"]}))
    with pytest.raises(UsageError) as caught:
        load_source_model("resnet18_v2", str(note))
    assert "is a JSON file" in str(caught.value) and "food.params" in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_a_file_that_is_no_params_file_says_why_without_traceback(tmp_path):
    from gluon_ft.model.graft import load_source_model

    junk = tmp_path / "junk.params"
    junk.write_text("{}")
    with pytest.raises(UsageError) as caught:
        load_source_model("resnet18_v2", str(junk))
    message = str(caught.value)
    assert "Traceback" not in message and "Invalid NDArray file format" in message


def test_another_architectures_params_name_what_is_missing(tmp_path):
    from gluon_ft.model.graft import load_source_model

    params = _params_of("mobilenet0.25", tmp_path / "mobile.params")
    with pytest.raises(UsageError) as caught:
        load_source_model("resnet18_v2", str(params))
    message = str(caught.value)
    assert "allow_missing" not in message
    assert "of the network's 98 parameters missing from the file: features.0.gamma" in message
    assert "in the file that the network does not have: features.0.weight" in message
    assert "more" in message and "Pass the --model it was trained with" in message


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("side", [20_000, 10_000])  # past twice PIL's limit, and just past it
def test_a_huge_image_says_its_own_size_and_the_limit(untrained_run, tmp_path, capsys, side):
    from gluon_ft.data.decode import UnreadableImageError, load_image

    huge = _png_header_only(tmp_path / "huge.png", side, side)
    with pytest.raises(UnreadableImageError, match=f"{side}x{side} pixels"):
        load_image(huge)
    assert main(["predict", str(untrained_run), str(huge)]) == 2
    err = capsys.readouterr().err
    assert f"{side}x{side} pixels ({side * side / 1e6:.1f} megapixels)" in err
    assert "limit of 89478485 pixels" in err


def test_data_that_is_a_file_is_called_a_file(tmp_path):
    from gluon_ft.data.splits import split_dataset

    photo = _png(tmp_path / "photos" / "x.png")
    with pytest.raises(UsageError) as caught:
        split_dataset(photo, None, None, 0)
    message = str(caught.value)
    assert "is a file, not a folder" in message and "does not exist" not in message
    assert f"{tmp_path / 'photos'}/<class>/*" in message


def test_offline_imagenet_weights_are_one_paragraph(monkeypatch, capsys):
    import requests

    from gluon_ft.model import graft

    url = "https://example.invalid/gluon/models/resnet18_v2-a81db45f.zip"

    def offline(*args, **kwargs):
        for left in range(4, -1, -1):  # as MXNet's download prints its attempts
            print(f"Downloading /x/resnet18_v2.zip from {url}...")
            if left:
                print(f"download failed due to ConnectionError(...), retrying, {left} left")
        refused = OSError(-2, "Name or service not known")
        raise requests.ConnectionError(
            requests.packages.urllib3.exceptions.MaxRetryError(None, url, refused)
        )

    monkeypatch.setattr(graft, "build_model", offline)
    with pytest.raises(UsageError) as caught:
        graft.load_source_model("resnet18_v2")
    message = str(caught.value)
    assert capsys.readouterr().out == ""
    assert f"from {url} (Name or service not known; 5 attempts)" in message
    assert "models/resnet18_v2-a81db45f.params (set MXNET_HOME" in message
    assert "--pretrained FILE" in message


# ----------------------------------------------------------------------------- 12: refusals


def _class_folders(root: Path, per_class: int = 3) -> Path:
    for name in ("ant", "bee"):
        for i in range(per_class):
            _png(root / name / f"{i}.png", value=40 + 100 * (name == "bee") + i)
    return root


@pytest.mark.parametrize("model, smallest", [("resnet18_v2", 32), ("mobilenet0.25", 32)])
def test_an_image_size_below_the_models_stride_is_refused_before_any_work(
    tmp_path, capsys, model, smallest
):
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "nowhere"), "--model", model, "--out", str(out)]
    assert main([*args, "--image-size", str(smallest - 8), "--pretrained", "none"]) == 2
    err = capsys.readouterr().err
    assert f"--image-size {smallest - 8} is below what {model} takes" in err
    assert f"Pass --image-size {smallest} or more" in err
    assert not out.exists()  # refused before the run folder, a download or the data


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path, capsys):
    data = _class_folders(tmp_path / "data", per_class=5)  # 10 images: 6 train, 1 val, 3 test
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"]
    assert main([*args, "--image-size", "32", "--batch-size", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 64 is larger than the training set (6 images)" in err
    assert "Pass --batch-size 6 or less" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 9/10, 15: the start


def test_training_says_how_the_data_was_split_and_records_the_fractions(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(30):
        _png(data / "ant" / f"{i}.png", size=32, value=40 + i)
    for i in range(4):
        _png(data / "bee" / f"{i}.png", size=32, value=200 - i)
    (data / "ant" / ".DS_Store").write_text("x")
    (data / "bee" / "notes.txt").write_text("x")
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"]
    args += ["--image-size", "32", "--batch-size", "8", "--epochs", "1"]
    assert main([*args, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "(class folders, split with --seed 0: val 0.1, test 0.1)" in said
    assert "data: per class (train/val/test): ant " in said
    assert "the train part is imbalanced" in said and "--class-weights auto" in said
    assert "fewer than 5 test images" in said and "bee 1" in said
    assert "left out 1 hidden and 1 non-image files" in said
    config = json.loads((out / "config.json").read_text())
    assert (config["val_split_used"], config["test_split_used"]) == (0.1, 0.1)
    # --no-progress: the warning alone
    assert main([*args, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "the train part is imbalanced" in said and "data: " not in said


# ----------------------------------------------------------------------------- 16: pictures


def test_mistake_titles_name_the_file(tmp_path, monkeypatch):
    from gluon_ft.data.folders import ImageFolderSplit
    from gluon_ft.deploy import plots, report
    from gluon_ft.deploy.predict import SplitPredictions

    paths = [_png(tmp_path / "ant" / "IMG_0001.png"), _png(tmp_path / "bee" / "b.png")]
    split = ImageFolderSplit(tmp_path, ("ant", "bee"), ((str(paths[0]), 0), (str(paths[1]), 1)))
    predictions = SplitPredictions(
        np.array([0, 1]), np.array([0, 1]), np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    )
    seen = {}
    monkeypatch.setattr(plots, "plot_mistakes", lambda _, titles, *a, **k: seen.update(t=titles))
    report._plot_mistakes(predictions, split, ["ant", "bee"], tmp_path / "m.png")
    assert seen["t"] == [
        "IMG_0001.png\ntrue ant\npred bee (0.90)",
        "b.png\ntrue bee\npred ant (0.80)",
    ]


def test_curves_mark_the_best_epoch():
    from gluon_ft.deploy.plots import plot_curves

    scores = ((1, 0.6), (2, 0.9), (3, 0.7))
    rows = [{"epoch": e, "loss": 1 / e, "train_acc": 0.5, "val_acc": a} for e, a in scores]
    fig = plot_curves(rows, best_epoch=2)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "best: epoch 2" in labels


def test_confusion_has_a_row_normalized_view_beside_the_counts():
    from gluon_ft.deploy.plots import plot_confusion

    fig = plot_confusion(np.array([[1, 1], [0, 8]]), ["ant", "bee"])
    counts, shares = fig.axes[:2]
    assert shares.get_title() == "share of each true class"
    assert sorted(t.get_text() for t in shares.texts) == ["0.00", "0.50", "0.50", "1.00"]
    assert sorted(t.get_text() for t in counts.texts) == ["0", "1", "1", "8"]


def test_check_data_exits_0_with_warnings_and_2_for_an_unusable_folder(tmp_path, capsys):
    data = _class_folders(tmp_path / "data")
    (data / "ant" / "broken.png").write_bytes(b"not a png")
    assert main(["check-data", str(data), "--image-size", "32"]) == 0
    assert "unreadable (1; training skips them" in capsys.readouterr().out
    for image in (data / "bee").iterdir():
        image.unlink()
    assert main(["check-data", str(data), "--image-size", "32"]) == 2


# ----------------------------------------------------------------------------- 17: --config


def _train_config_of(words: list[str]):
    from gluon_ft.cli import build_parser
    from gluon_ft.cli.recipe import parse_command_line
    from gluon_ft.cli.train import config_from

    return config_from(parse_command_line(build_parser(), ["train", *words]))


def test_train_config_takes_a_runs_own_config_json_and_the_command_line_wins(tmp_path):
    from dataclasses import asdict

    from gluon_ft.train import TrainConfig

    recorded = asdict(TrainConfig(data="photos", model="mobilenet0.25", lr=0.02, epochs=7))
    recorded.update(out=str(tmp_path / "old-run"), gluon_ft="0.1", num_classes=2, train_size=9)
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    config = _train_config_of(["--config", str(tmp_path / "config.json"), "--epochs", "2"])
    assert (config.data, config.model, config.lr, config.epochs) == (
        "photos",
        "mobilenet0.25",
        0.02,
        2,
    )
    assert config.out != str(tmp_path / "old-run")  # a new run gets its own folder


def test_train_config_refuses_unknown_keys_by_name(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"batch-size": 4, "bogus": 1, "lrr": 0.1}))
    with pytest.raises(SystemExit) as caught:
        _train_config_of(["--config", str(tmp_path / "c.json")])
    assert caught.value.code == 2
    assert "unknown setting(s) bogus, lrr" in capsys.readouterr().err


def test_train_config_reads_yaml_where_pyyaml_is_installed(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("batch_size: 4\noptimizer: adamw\n")
    config = _train_config_of(["--config", str(tmp_path / "c.yaml")])
    assert (config.batch_size, config.optimizer) == (4, "adamw")


# ----------------------------------------------------------------------------- 14: progress


def _epoch_line(capsys, epoch: int, **settings) -> str:
    from gluon_ft.train import TrainConfig
    from gluon_ft.train.run import report_epoch

    row = {"epoch": epoch, "loss": 0.5, "train_acc": 0.8, "val_acc": 0.7, "skipped": 0}
    row.update(examples_per_sec=123.0, seconds=50.0)
    report_epoch(TrainConfig(**settings), row, [])
    return capsys.readouterr().out


def test_the_epoch_line_says_the_time_left_for_the_whole_run(capsys):
    assert _epoch_line(capsys, 2, epochs=5).rstrip().endswith("examples/sec, about 2m30s left")
    assert "left" not in _epoch_line(capsys, 5, epochs=5)
    assert "about 1h23m left" in _epoch_line(capsys, 1, epochs=101)


def test_head_epochs_on_cached_features_are_labelled_as_such(capsys):
    head = dict(epochs=4, head_epochs=2, pretrained="imagenet")
    line = _epoch_line(capsys, 1, **head)
    assert "123.0 examples/sec (head on cached features)" in line
    assert "left" not in line  # the full epochs after it take far longer
    line = _epoch_line(capsys, 3, **head)
    assert "(head on cached features)" not in line and "about 0m50s left" in line


def test_validating_and_saving_are_said_where_bars_are_drawn(monkeypatch, capsys):
    from types import SimpleNamespace

    from gluon_ft.train import TrainConfig
    from gluon_ft.train.run import phase

    session = SimpleNamespace(writer=True)
    monkeypatch.setenv("GLUON_FT_PROGRESS_BARS", "1")
    with phase(TrainConfig(), session, "epoch 1/5: validating"):
        pass
    assert "epoch 1/5: validating ..." in capsys.readouterr().err
    with phase(TrainConfig(progress=False), session, "epoch 1/5: saving"):
        pass
    assert "saving" not in capsys.readouterr().err
