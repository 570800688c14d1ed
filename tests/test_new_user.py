"""What a new user trips on: folders given to predict, mangled errors, checks made before any
work, what training says at its start, and the pictures and exit codes of a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from gluon_ft.cli import main


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
