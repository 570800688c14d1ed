"""Training on a labels CSV: single-label as class folders do, and multi-label runs (sigmoid
loss, multi-hot batches, val mAP selection, thresholds, the report, predict, resume).

The multi-label images are 32 px squares whose red, green and blue channels are each lit
(200) when the image has the class of that colour, plus noise; a tiny network learns them.
"""

from __future__ import annotations

import hashlib
import json
from itertools import combinations
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from conftest import record_steps, tiny_config, write_class_folders
from PIL import Image

from gluon_ft.data.labels import MultiLabelSplit
from gluon_ft.data.loaders import collate
from gluon_ft.errors import Interrupted, UsageError
from gluon_ft.train import train
from gluon_ft.train.mixing import Mixer
from gluon_ft.train.multilabel_loss import MultiLabelLoss
from gluon_ft.train.network import make_loss
from gluon_ft.train.step import MetricSums

COLOURS = ("red", "green", "blue")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_multilabel_images(root: Path, per_set: int = 5, seed: int = 0) -> Path:
    """``root/images/*.png`` for every non-empty set of colours, ``per_set`` each, and
    ``root/labels.csv`` naming them (labels separated by a space)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = ["image,labels"]
    sets = [s for k in (1, 2, 3) for s in combinations(range(3), k)]
    for number, chosen in enumerate(s for s in sets for _ in range(per_set)):
        base = np.zeros(3)
        base[list(chosen)] = 200
        pixels = np.clip(base + rng.integers(0, 55, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        name = f"images/{number:03d}.png"
        Image.fromarray(pixels).save(root / name)
        rows.append(f"{name},{' '.join(COLOURS[c] for c in chosen)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def multilabel_data(tmp_path_factory) -> Path:
    return write_multilabel_images(tmp_path_factory.mktemp("multilabel") / "data")


def multilabel_config(data: Path, out: Path, **changes):
    settings = {"labels": str(data / "labels.csv"), "epochs": 2, "val_split": 0.2}
    return tiny_config(data, out, **{**settings, "test_split": 0.2, **changes})


@pytest.fixture(scope="module")
def multilabel_run(multilabel_data, tmp_path_factory) -> Path:
    """A finished 2-epoch multi-label run with --thresholds auto and --recipe best (its
    lr-find, a head epoch on cached features, then the whole network), from a random
    "pretrained" mobilenet0.25 of 5 classes."""
    from gluon_ft.model.graft import build_model

    runs = tmp_path_factory.mktemp("runs")
    net = build_model("mobilenet0.25", 5)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.save_parameters(str(runs / "source.params"))
    out = runs / "run"
    source = str(runs / "source.params")
    config = multilabel_config(multilabel_data, out, thresholds="auto", pretrained=source)
    config.recipe = "best"
    config.apply_recipe(given={"epochs", "labels", "val_split", "test_split", "thresholds"})
    train(config)
    return out


def test_a_single_label_csv_trains_as_the_same_class_folders(tmp_path, capsys):
    data = write_class_folders(tmp_path / "data", {"cat": 8, "dog": 8, "fox": 8})
    rows = ["image,labels"]
    rows += [
        f"{c}/{p.name},{c}" for c in ("cat", "dog", "fox") for p in sorted((data / c).iterdir())
    ]
    rows.append("cat/missing.png,cat")  # left out, and said once
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    train(tiny_config(data, tmp_path / "folders", epochs=2, seed=5))
    train(
        tiny_config(data, tmp_path / "csv", epochs=2, seed=5, labels=str(tmp_path / "labels.csv"))
    )
    assert md5(tmp_path / "csv" / "model.params") == md5(tmp_path / "folders" / "model.params")
    out = capsys.readouterr().out
    assert out.count("1 row(s) left out (1 missing file)") == 1
    config = json.loads((tmp_path / "csv" / "config.json").read_text())
    assert config["layout"] == "labels-csv" and config["multi_label"] is False


def test_multilabel_flag_needs_a_labels_file(tmp_path):
    with pytest.raises(UsageError, match="--multi-label needs a labels file"):
        train(tiny_config(tmp_path, tmp_path / "run", multi_label=True))


def test_multilabel_refuses_what_draws_by_one_class(multilabel_data, tmp_path):
    config = multilabel_config(multilabel_data, tmp_path / "run", sampler="balanced")
    with pytest.raises(UsageError, match="--sampler balanced"):
        train(config)


def test_multilabel_batches_are_multi_hot_rows():
    split = MultiLabelSplit(Path("."), ("a", "b", "c"), (("x.png", (0, 2)), ("y.png", (1,))))
    targets = split.targets()
    images, labels, skipped = collate(
        [(np.zeros((2, 2, 3), np.uint8), targets[0]), None, (np.ones((2, 2, 3)), targets[1])]
    )
    assert skipped == 1 and labels.dtype == np.float32
    np.testing.assert_array_equal(labels, [[1, 0, 1], [0, 1, 0]])


def test_make_loss_weights_positives_by_negatives_over_positives():
    targets = np.array([[1, 0], [1, 0], [1, 1], [0, 0]], np.float32)
    config = tiny_config(Path("."), Path("."), class_weights="auto", label_smoothing=0.1)
    loss = make_loss(config, targets, 2, [mx.cpu()])
    assert isinstance(loss, MultiLabelLoss) and loss.smoothing == 0.1
    np.testing.assert_allclose(loss.weights[mx.cpu()].asnumpy(), [[1 / 3, 3.0]], rtol=1e-6)


def test_metric_sums_count_per_label_accuracy():
    sums = MetricSums([mx.cpu()])
    logits = mx.nd.array([[2.0, -1.0, 3.0], [-2.0, -1.0, 1.0]])
    targets = mx.nd.array([[1, 0, 0], [0, 0, 1]])
    sums.add([logits], [targets])
    assert sums.read()[1] == pytest.approx((2 / 3 + 1) / 2)


def test_mixup_mixes_multi_hot_rows():
    rows = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    images = np.zeros((2, 4, 4, 3), np.uint8)
    mixed = Mixer(mixup=1.0, cutmix=0.0, num_classes=3)(images, rows, np.random.default_rng(0))
    lam = mixed.lam
    np.testing.assert_allclose(mixed.targets, lam * rows + (1 - lam) * rows[::-1], rtol=1e-6)


def test_a_multilabel_run_selects_by_val_map_and_reports_map(multilabel_run):
    config = json.loads((multilabel_run / "config.json").read_text())
    assert config["multi_label"] is True and config["monitor"] == "val_map"
    history = json.loads((multilabel_run / "metrics.json").read_text())
    assert all(0 <= row["val_map"] <= 1 for row in history)
    summary = json.loads((multilabel_run / "summary.json").read_text())
    best = max(history, key=lambda row: row["val_map"])
    assert summary["monitor"] == "val_map" and summary["best_epoch"] == best["epoch"]
    for key in ("test_map", "f1_micro", "f1_macro", "exact_match"):
        assert 0 <= summary[key] <= 1
    assert [row["class"] for row in summary["per_class"]] == ["blue", "green", "red"]
    assert all({"ap", "precision", "recall", "f1"} <= row.keys() for row in summary["per_class"])
    report = (multilabel_run / "report.md").read_text()
    assert "| mAP |" in report and "confusion" not in report
    assert not (multilabel_run / "confusion.png").exists()


def test_the_report_lists_the_most_wrong_sets_with_their_files(multilabel_run, multilabel_data):
    from gluon_ft.deploy.predict import Predictor

    summary = json.loads((multilabel_run / "summary.json").read_text())
    report = (multilabel_run / "report.md").read_text()
    rows = [line.split(",") for line in (multilabel_data / "labels.csv").read_text().splitlines()]
    truth = {name: sorted(labels.split()) for name, labels in rows[1:]}
    tested = sorted(json.loads((multilabel_run / "split.json").read_text())["parts"]["test"])
    answers = Predictor(multilabel_run).predict_images([str(multilabel_data / n) for n in tested])
    predicted = {name: sorted(answer["labels"]) for name, answer in zip(tested, answers)}
    listed = summary["mistakes"]
    assert listed, "a 2-epoch run gets some sets wrong"
    assert sorted(entry["file"] for entry in listed) == [
        name for name in tested if predicted[name] != truth[name]
    ]
    for entry in listed:
        name = entry["file"]
        assert entry["true"] == truth[name] and entry["predicted"] == predicted[name]
        assert entry["missed"] == sorted(set(truth[name]) - set(predicted[name]))
        assert entry["spurious"] == sorted(set(predicted[name]) - set(truth[name]))
        sets = [", ".join(entry[key]) or "(none)" for key in ("true", "predicted")]
        assert f"| {name} | {sets[0]} | {sets[1]} |" in report
    errors = [entry["error"] for entry in listed]
    assert errors == sorted(errors, reverse=True)
    assert "(pr_curves.png)" in report and "(mistakes.png)" in report
    for figure in ("pr_curves.png", "mistakes.png"):
        assert (multilabel_run / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command_draws_each_class_curve_with_its_ap(
    multilabel_run, tmp_path, capsys, monkeypatch
):
    from gluon_ft.cli import main
    from gluon_ft.deploy import plots

    drawn = {}
    original = plots.plot_pr_curves

    def record(curves, labels, points=None, path=None):
        drawn.update(curves=curves, labels=labels, points=points)
        return original(curves, labels, points, path)

    monkeypatch.setattr(plots, "plot_pr_curves", record)
    assert main(["report", str(multilabel_run), "--split", "val", "--out", str(tmp_path)]) == 0
    assert "val: 6 images, mAP " in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["split"] == "val" and (tmp_path / "pr_curves.png").is_file()
    per_class = summary["per_class"]
    assert drawn["labels"] == [f"{row['class']} (AP {row['ap']:.3f})" for row in per_class]
    assert drawn["points"] == [(row["recall"], row["precision"]) for row in per_class]
    for (recall, precision), row in zip(drawn["curves"], per_class):
        assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(row["ap"])


def test_thresholds_auto_are_chosen_on_val_and_used(multilabel_run):
    from gluon_ft.deploy.metrics import choose_thresholds
    from gluon_ft.deploy.predict import Predictor, predict_split
    from gluon_ft.deploy.report import run_parts

    saved = json.loads((multilabel_run / "thresholds.json").read_text())
    assert saved["chosen_on"] == "val" and len(saved["thresholds"]) == 3
    predictor = Predictor(multilabel_run)
    val = predict_split(predictor, run_parts(multilabel_run).val)
    expected = choose_thresholds(val.probabilities, val.labels)
    np.testing.assert_allclose(saved["thresholds"], expected, rtol=1e-6)
    summary = json.loads((multilabel_run / "summary.json").read_text())
    used = [row["threshold"] for row in summary["per_class"]]
    np.testing.assert_allclose(used, saved["thresholds"], rtol=1e-6)


def test_predict_answers_a_set_and_independent_probabilities(multilabel_run, multilabel_data):
    from gluon_ft.deploy.predict import Predictor

    predictor = Predictor(multilabel_run)
    image = multilabel_data / "images" / "000.png"
    (answer,) = predictor.predict_images([str(image)])
    probabilities = answer["probabilities"]
    assert sorted(probabilities) == ["blue", "green", "red"]
    assert sum(probabilities.values()) != pytest.approx(1.0, abs=1e-3)  # not a softmax
    thresholds = dict(zip(predictor.classes, predictor.thresholds))
    assert answer["labels"] == [c for c in predictor.classes if probabilities[c] >= thresholds[c]]


def test_serve_answers_the_set_and_tells_the_page_the_thresholds(multilabel_run, multilabel_data):
    import asyncio

    from starlette.requests import Request

    from gluon_ft.deploy.predict import Predictor
    from gluon_ft.deploy.serve import create_app

    image = multilabel_data / "images" / "030.png"
    predictor = Predictor(multilabel_run, batch_size=1)
    (expected,) = predictor.predict_images([str(image)])
    app = create_app(predictor, max_batch=1)  # no server: the routes called in this process
    routes = {route.path: route.endpoint for route in app.routes}
    health = asyncio.run(routes["/health"]())
    assert health["multi_label"] is True
    assert health["thresholds"] == dict(zip(predictor.classes, predictor.thresholds))
    body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="030.png"\r\n\r\n'
    body += image.read_bytes() + b"\r\n--b--\r\n"

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", b"multipart/form-data; boundary=b")]
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    app.state.worker.start().result(timeout=60)
    try:
        answer = asyncio.run(routes["/predict"](Request({**scope, "query_string": b""}, receive)))
    finally:
        app.state.worker.close(timeout=30)
    assert answer["labels"] == expected["labels"]
    shown = dict(zip(answer["classes"], answer["probabilities"]))
    assert shown == pytest.approx(expected["probabilities"], rel=1e-6)
    assert answer["probabilities"] == sorted(answer["probabilities"], reverse=True)


def test_a_multilabel_run_stopped_mid_epoch_resumes_exactly(multilabel_data, tmp_path, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(multilabel_config(multilabel_data, whole, momentum=0.9, seed=2))
    record_steps(monkeypatch, signal_after=3)  # Ctrl-C during epoch 1's third step
    with pytest.raises(Interrupted):
        train(multilabel_config(multilabel_data, resumed, momentum=0.9, seed=2))
    monkeypatch.undo()
    assert list((resumed / "checkpoints").glob("interrupted-epoch-0001-step-000003"))
    result = train(multilabel_config(multilabel_data, resumed, momentum=0.9, seed=2, resume=True))
    assert md5(resumed / "model.params") == md5(whole / "model.params")
    expected = json.loads((whole / "metrics.json").read_text())
    for got, want in zip(result["history"], expected):
        assert got["train_acc"] == pytest.approx(want["train_acc"], rel=1e-6)
        assert got["val_map"] == want["val_map"]


def test_export_of_a_multilabel_run_names_its_sigmoid_and_thresholds(multilabel_run, tmp_path):
    from gluon_ft.deploy import export

    result = export.export_run(multilabel_run, "mxnet", tmp_path / "out")
    assert result["max_abs_diff"] <= export.MXNET_TOLERANCE
    info = json.loads((tmp_path / "out" / "preprocessing.json").read_text())
    saved = json.loads((multilabel_run / "thresholds.json").read_text())["thresholds"]
    assert "sigmoid" in info["output"] and info["thresholds"] == saved


def test_the_commands_say_map_and_the_predicted_set(
    multilabel_data, multilabel_run, tmp_path, capsys
):
    from gluon_ft.cli import main

    labels = str(multilabel_data / "labels.csv")
    args = ["train", "--data", str(multilabel_data), "--labels", labels, "--epochs", "1"]
    args += ["--model", "mobilenet0.25", "--pretrained", "none", "--batch-size", "4"]
    args += ["--image-size", "32", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 0
    assert "done: test mAP " in capsys.readouterr().out
    assert main(["predict", str(multilabel_run), str(multilabel_data / "images" / "000.png")]) == 0
    assert "000.png: labels [" in capsys.readouterr().out


def test_predict_csv_of_a_multilabel_run_holds_the_set_and_each_probability(
    multilabel_data, multilabel_run, tmp_path, capsys
):
    import csv

    from gluon_ft.cli import main
    from gluon_ft.deploy.predict import Predictor

    images = [multilabel_data / "images" / f"{i:03d}.png" for i in (0, 30)]
    table = tmp_path / "out.csv"
    assert main(["predict", str(multilabel_run), *map(str, images), "--csv", str(table)]) == 0
    rows = list(csv.reader(table.open()))
    assert rows[0] == ["path", "labels", "blue", "green", "red", "error"]
    expected = Predictor(multilabel_run).predict_images([str(image) for image in images])
    for row, answer in zip(rows[1:], expected):
        assert row[1].split() == answer["labels"] and row[-1] == ""
        got = dict(zip(rows[0][2:5], map(float, row[2:5])))
        assert got == pytest.approx(answer["probabilities"], abs=1e-6)


def test_val_map_is_refused_for_a_single_label_run(tmp_path):
    data = write_class_folders(tmp_path / "data", {"cat": 6, "dog": 6})
    with pytest.raises(UsageError, match="--monitor val_map scores a multi-label run"):
        train(tiny_config(data, tmp_path / "run", monitor="val_map"))


def test_recipe_best_on_multi_label_changes_only_what_its_preset_set():
    from gluon_ft.train.config import MULTI_LABEL_PRESETS, TrainConfig

    best = TrainConfig(recipe="best", label_smoothing=0.2)
    best.apply_recipe(given={"label_smoothing"})
    changed = best.apply_multi_label_preset()
    assert changed == {
        k: v for k, v in MULTI_LABEL_PRESETS["best"].items() if k != "label_smoothing"
    }
    assert (best.crop_scale, best.eval_resize, best.tta) == (1.0, 1.0, 1)
    assert best.label_smoothing == 0.2  # given explicitly: it stays
    assert best.recipe_variant == "multi-label" and "eval_resize" in best.preset
    given = TrainConfig(recipe="best", eval_resize=1.5)  # not in the general preset, but given
    given.apply_recipe()
    assert "eval_resize" not in given.apply_multi_label_preset() and given.eval_resize == 1.5
    book = TrainConfig()
    assert book.apply_multi_label_preset() == {} and book.recipe_variant is None
    # --eval-resize 1: the evaluation view is the whole image, resized, nothing cropped.
    image = Image.fromarray(np.arange(40 * 40 * 3, dtype=np.uint8).reshape(40, 40, 3))
    whole = TrainConfig(image_size=32, eval_resize=1.0).test_transform()(image)
    np.testing.assert_array_equal(whole, np.asarray(image.resize((32, 32), Image.BILINEAR)))


def test_recipe_best_trains_a_multi_label_run_with_its_head_epoch_on_cached_features(
    multilabel_run,
):
    """The head epoch's cached features carry multi-hot rows; lr-find measures the BCE."""
    from gluon_ft.deploy.predict import Predictor

    saved = json.loads((multilabel_run / "config.json").read_text())
    assert saved["multi_label"] and saved["recipe_variant"] == "multi-label"
    assert (saved["crop_scale"], saved["eval_resize"], saved["tta"]) == (1.0, 1.0, 1)
    assert saved["lr_find"] and saved["feature_cache"] is not None
    head, whole = json.loads((multilabel_run / "metrics.json").read_text())
    assert head["trainable_params"] == 256 * 3 + 3 and 0 <= head["val_map"] <= 1
    assert whole["unfrozen"] == ["all"]
    assert Predictor(multilabel_run).transform.resize == 32  # the whole image, as in the run


def test_int8_calibrates_and_scores_on_the_view_the_run_predicts_on(
    multilabel_run, tmp_path, monkeypatch
):
    import shutil

    from gluon_ft.data.transforms import TestTransform, normalize_batch
    from gluon_ft.deploy import int8
    from gluon_ft.deploy.predict import Predictor
    from gluon_ft.deploy.runparts import run_parts

    run = tmp_path / "run"
    shutil.copytree(multilabel_run, run, ignore=shutil.ignore_patterns("int8"))
    seen = []
    quantize = int8.quantize
    monkeypatch.setattr(
        int8, "quantize", lambda net, data: seen.append(data) or quantize(net, data)
    )
    predictor = Predictor(run, dtype="int8", calibration_images=2)
    assert predictor.run.eval_resize == 1.0  # best's multi-label variant: the whole image
    whole = TestTransform(predictor.run.image_size, 1.0)
    first = run_parts(run).train.load(0)
    expected = normalize_batch(mx.nd.array(whole(first)[None], dtype="uint8"))
    np.testing.assert_allclose(seen[0][:1].asnumpy(), expected.asnumpy(), atol=1e-6)
