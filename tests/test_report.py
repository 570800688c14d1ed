"""The report (issue 16): per-class scores checked by hand on a fixed confusion matrix, and
`gluon-ft report` rebuilding a finished run's report on its test part or any folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import write_image_folder

from gluon_ft.cli import main
from gluon_ft.deploy.metrics import class_scores
from gluon_ft.deploy.plots import plot_mistakes, plot_pr_curves


def test_class_scores_equal_hand_computed_ones():
    # Rows: true class; columns: predicted. "eel" has no example and is never predicted.
    confusion = [[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 4, 0], [0, 0, 0, 0]]
    scores = class_scores(confusion, ["ant", "bee", "cow", "eel"])
    by_class = {row["class"]: row for row in scores["per_class"]}
    expected = {  # precision = tp / column, recall = tp / row, F1 = 2 tp / (row + column)
        "ant": (5 / 7, 5 / 6, 10 / 13, 6),
        "bee": (3 / 4, 3 / 6, 6 / 10, 6),
        "cow": (4 / 5, 4 / 4, 8 / 9, 4),
        "eel": (0.0, 0.0, 0.0, 0),
    }
    for name, (precision, recall, f1, support) in expected.items():
        row = by_class[name]
        assert row["precision"] == pytest.approx(precision), name
        assert row["recall"] == pytest.approx(recall), name
        assert row["f1"] == pytest.approx(f1), name
        assert row["support"] == support
    assert scores["accuracy"] == pytest.approx(12 / 16)
    # Averages over the classes that occur: eel, absent from both, does not drag them down.
    assert scores["balanced_acc"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    assert scores["macro_f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)


def test_mistakes_figure_with_and_without_mistakes(tmp_path):
    picture = np.zeros((40, 30, 3), dtype=np.uint8)
    for count in (0, 3):
        path = plot_mistakes(
            [picture] * count, ["true a\npred b (0.90)"] * count, tmp_path / "m.png"
        )
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pr_curves_figure_names_each_class_with_its_ap(tmp_path):
    curve = (np.array([0, 0.5, 1]), np.array([1, 1, 0.5]))
    labels = ["cat (AP 0.750)", "dog (AP -)"]
    figure = plot_pr_curves([curve, None], labels, [(0.5, 1.0), (0.0, 0.0)])
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["cat (AP 0.750)", "dog (AP -): no positive"]
    (line, dot, _) = figure.axes[0].get_lines()  # the curve, its dot, dog's legend entry
    assert line.get_drawstyle() == "steps-pre" and list(dot.get_xdata()) == [0.5]
    plt.close(figure)
    path = plot_pr_curves([curve, None], labels, path=tmp_path / "pr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def finished_run(image_folder, trained_run):
    """Three classes in one folder each, 10 images, 1 epoch (trained once per session)."""
    data = image_folder(class_folders={"red": 10, "green": 10, "blue": 10})
    return data, trained_run(data, epochs=1, batch_size=8).path


def test_every_run_writes_the_report(finished_run):
    _, run = finished_run
    summary = json.loads((run / "summary.json").read_text())
    per_class = summary["per_class"]
    assert [row["class"] for row in per_class] == ["blue", "green", "red"]
    assert sum(row["support"] for row in per_class) == summary["images"] == 3  # 10 % of each
    for key in ("test_acc", "test_loss", "balanced_acc", "macro_f1", "best_epoch", "monitor"):
        assert key in summary, key
    report = (run / "report.md").read_text()
    assert "| blue |" in report and "balanced accuracy" in report and "confusion.png" in report
    assert "train 24, val 3, test 3" in report
    for figure in ("confusion.png", "mistakes.png"):
        assert (run / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command_rebuilds_the_run_report_and_reports_on_a_folder(
    finished_run, tmp_path, cli
):
    data, shared = finished_run
    run = Path(shutil.copytree(shared, tmp_path / "run"))  # the session's run stays as it was
    before = json.loads((run / "summary.json").read_text())
    (run / "report.md").unlink()
    done = cli("report", run)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "summary.json").read_text()) == before  # selection fields kept
    assert (run / "report.md").is_file()

    folder = tmp_path / "more"
    shutil.copytree(data / "red", folder / "red")  # one class of the run's three
    assert main(["report", str(run), "--split", str(folder)]) == 0
    summary = json.loads((run / "report-more" / "summary.json").read_text())
    assert summary["images"] == 10 and summary["split"] == str(folder)
    assert [row["support"] for row in summary["per_class"]] == [0, 0, 10]


def test_report_command_refuses_bad_input(finished_run, tmp_path, capsys):
    _, run = finished_run
    unknown = write_image_folder(tmp_path / "other", classes=("cat", "dog")) / "train"
    for args, message in (
        ([str(run), "--split", str(unknown)], "class folder(s) the run does not know: cat, dog"),
        ([str(run), "--split", "nowhere"], "expected test, val or a folder"),
        ([str(tmp_path / "no-run")], "does not exist"),
    ):
        assert main(["report", *args]) == 2
        assert message in capsys.readouterr().err
