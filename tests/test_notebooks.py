"""The notebooks: executed top to bottom by a real Jupyter kernel, offline, in smoke mode.

Also the library functions they call (mode selection, exercise 4's head initialization, the
predictions of a split, the learning-rate plot), and the rule that committed notebooks carry
no outputs.
"""

from __future__ import annotations

import base64
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import mxnet as mx
import nbformat
import numpy as np
import pytest
from conftest import FOOD_MODEL, HOTDOG_SMALL, REPO
from nbclient.exceptions import CellExecutionError
from PIL import Image

from gluon_ft import notebook
from gluon_ft.deploy.plots import plot_lr_sweep
from gluon_ft.deploy.predict import SplitPredictions
from gluon_ft.errors import UsageError
from gluon_ft.model.graft import (
    SourceModel,
    graft_new_head,
    init_head_from_source_class,
    load_source_model,
    related_source_class,
    source_class_names,
)

NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_finetune_hotdog", "02_freezing_layers", "03_exercises")
# Figures each notebook must save under its run directory and show inline.
FIGURES = {
    "01_finetune_hotdog": [
        "examples.png",
        "augmentations.png",
        "finetune/curves.png",
        "comparison.png",
        "confusion.png",
    ],
    "02_freezing_layers": [],
    "03_exercises": ["lr_sweep.png", "frozen_vs_full.png", "head_init.png"],
}
# What each notebook must print: the proofs and checks it makes.
EXPECTED_TEXT = {
    "01_finetune_hotdog": ["Smoke mode", "features are the pretrained ones: True", "lr_mult=10"],
    "02_freezing_layers": ["Smoke mode", "bitwise unchanged", "grad_req: null"],
    "03_exercises": ["Smoke mode", "ImageNet class 934: 'hotdog'; class 713: 'photocopier'"],
}
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: nothing listens, a download fails fast
# Real photos for the kernels, but fewer: the first of each class of hotdog-small (200 train,
# 50 test). 16 a class fill the first notebook's rows of 8 examples of each class.
TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 5


def _cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- committed files


def test_committed_notebooks_carry_no_outputs():
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(NAMES)
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        dirty = notebook.cells_with_outputs(nb)
        assert not dirty, (
            f"notebooks/{name}.ipynb has outputs or execution counts in cells {dirty}; "
            "strip them before committing: .venv/bin/python -m gluon_ft.notebook strip "
            "notebooks/*.ipynb"
        )


def test_strip_outputs_clears_what_the_check_finds():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# title"),
            nbformat.v4.new_code_cell("1 + 1", execution_count=3),
            nbformat.v4.new_code_cell("print(1)"),
        ]
    )
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    assert notebook.cells_with_outputs(nb) == [1, 2]
    assert notebook.cells_with_outputs(notebook.strip_outputs(nb)) == []


# ----------------------------------------------------------------------------- execution


def fewer_shared_photos(root: Path) -> Path:
    """A shared folder as ``../shared`` is laid out (``$GLUON_FT_SHARED``), holding its models
    (the food model and its class names) and the first ``TRAIN_PER_CLASS`` / ``TEST_PER_CLASS``
    photos of each class."""
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for folder in sorted((HOTDOG_SMALL / split).iterdir()):
            target = root / notebook.HOTDOG_SMALL / split / folder.name
            target.mkdir(parents=True)
            for photo in sorted(folder.iterdir())[:count]:
                shutil.copy2(photo, target / photo.name)
    (root / notebook.FOOD_MODEL.parent).symlink_to(FOOD_MODEL.parent, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory) -> dict:
    """The kernels' environment: smoke mode, a private MXNET_HOME, no way to download; the
    shared photos (fewer of them) when ``../shared`` is there, else the synthetic task."""
    root = tmp_path_factory.mktemp("notebooks")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline one
    env.update(
        GLUON_FT_NOTEBOOK_MODE="smoke",
        GLUON_FT_NOTEBOOK_OUT=str(root / "runs"),
        MXNET_HOME=str(root / "mxnet-home"),  # the synthetic task's cache lives here too
        MXNET_GLUON_REPO=UNREACHABLE,
        GLUON_FT_HOTDOG_URL=UNREACHABLE + "hotdog.zip",
    )
    if HOTDOG_SMALL.is_dir() and FOOD_MODEL.is_file():
        env[notebook.SHARED_VARIABLE] = str(fewer_shared_photos(root / "shared"))
    return env


@pytest.fixture(scope="module")
def executed(kernel_env) -> dict:
    """Execute the three committed notebooks once; ``{name: {"nb", "error", "run_dir"}}``."""
    results = {}
    runs = Path(kernel_env["GLUON_FT_NOTEBOOK_OUT"])
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        wall, cpu = time.perf_counter(), _cpu_seconds_of_children()
        error = None
        try:
            notebook.execute_notebook(nb, NOTEBOOKS, timeout=600, env=kernel_env)
        except CellExecutionError as err:
            error = str(err)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds_of_children() - cpu
        nbformat.write(nb, runs.parent / f"{name}.executed.ipynb")  # to read after a failure
        run_dirs = sorted(runs.glob(f"{name}-*"))
        print(f"{name}: {wall:.0f} s wall, {cpu:.0f} s CPU (kernel)")
        results[name] = {"nb": nb, "error": error, "run_dirs": run_dirs}
    return results


def test_kernel_runs_this_python_in_the_notebook_folder(tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())")
        ]
    )
    notebook.execute_notebook(nb, tmp_path, timeout=120)
    executable, cwd = nb.cells[0].outputs[0]["text"].split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(cwd).resolve() == tmp_path.resolve()


def _outputs(nb, output_type=None):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if output_type is None or out.output_type in output_type:
                yield out


def _text(nb) -> str:
    parts = []
    for out in _outputs(nb):
        if out.output_type == "stream":
            parts.append(out.text)
        for key in ("text/plain", "text/markdown", "text/html"):
            parts.append(out.get("data", {}).get(key, ""))
    return "\n".join(parts)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_without_errors(executed, name):
    result = executed[name]
    assert result["error"] is None, f"{name} failed:\n{result['error'][-4000:]}"
    assert not list(_outputs(result["nb"], {"error"}))
    code_cells = [c for c in result["nb"].cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells), "some cells were not executed"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_outputs(executed, name):
    nb = executed[name]["nb"]
    text = _text(nb)
    for expected in EXPECTED_TEXT[name]:
        assert expected in text, f"{name}: {expected!r} not in its outputs"
    stderr = [o.text for o in _outputs(nb, {"stream"}) if o.name == "stderr"]
    assert not stderr, f"{name} wrote to stderr: {stderr}"
    assert len(executed[name]["run_dirs"]) == 1, "one run directory per notebook run"


@pytest.mark.parametrize("name", [n for n in NAMES if FIGURES[n]])
def test_figures_are_saved_as_pngs_and_shown_inline(executed, name):
    run_dir = executed[name]["run_dirs"][0]
    shown = {
        out["data"]["image/png"].replace("\n", "")
        for out in _outputs(executed[name]["nb"], {"display_data", "execute_result"})
        if "image/png" in out.get("data", {})
    }
    saved = sorted(run_dir.rglob("*.png"))
    assert {str(p.relative_to(run_dir)) for p in saved} >= set(FIGURES[name])
    for path in saved:
        assert path.stat().st_size > 0, path
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        assert min(pixels.shape[:2]) >= 100, f"{path} is {pixels.shape}"
        assert pixels.std() > 1, f"{path} is a blank image"
        if path.parent == run_dir or str(path.relative_to(run_dir)) in FIGURES[name]:
            inline = base64.b64encode(path.read_bytes()).decode()
            assert inline in shown, f"{path.name} is saved but not shown inline"


# ----------------------------------------------------------------------------- choose_data


def test_choose_data_rejects_an_unknown_mode(monkeypatch):
    monkeypatch.setenv(notebook.MODE_VARIABLE, "fast")
    with pytest.raises(UsageError, match="full, smoke"):
        notebook.choose_data()


def test_smoke_mode_uses_the_shared_photos(hotdog_small, food_model, tmp_path, monkeypatch):
    monkeypatch.setenv(notebook.OUT_VARIABLE, str(tmp_path))
    monkeypatch.setenv(notebook.SHARED_VARIABLE, str(hotdog_small.parents[1]))
    setup = notebook.choose_data("smoke", notebook="nb")
    assert (setup.task, setup.data_dir, setup.pretrained) == (
        "hotdog-small",
        hotdog_small,
        str(food_model),
    )
    assert (setup.epochs, setup.image_size) == (1, 32)
    assert setup.run_dir.is_dir() and setup.run_dir.parent == tmp_path
    assert "Smoke mode" in setup.note
    config = setup.scratch_config("scratch")
    assert (config.pretrained, config.lr, config.head_lr_mult, config.epochs) == (
        "none",
        setup.scratch_lr,
        1.0,
        1,
    )
    assert config.out == str(setup.run_dir / "scratch")
    assert notebook.choose_data("smoke", notebook="nb").run_dir != setup.run_dir


def test_smoke_mode_without_shared_data_uses_the_synthetic_task(tmp_path, monkeypatch):
    monkeypatch.setenv(notebook.OUT_VARIABLE, str(tmp_path / "runs"))
    monkeypatch.setenv(notebook.SHARED_VARIABLE, str(tmp_path / "no-shared"))
    setup = notebook.choose_data("smoke")
    assert setup.task == "synthetic"
    assert setup.data_dir.is_relative_to(Path(os.environ["MXNET_HOME"]))  # the demo's cache
    assert (setup.data_dir / "train").is_dir() and Path(setup.pretrained).is_file()
    assert setup.epochs == 1 and setup.image_size == 32
    assert "synthetic" in setup.note


def test_full_mode_offline_falls_back_with_a_note(hotdog_small, food_model, tmp_path, monkeypatch):
    monkeypatch.setenv(notebook.OUT_VARIABLE, str(tmp_path / "runs"))
    monkeypatch.setenv(notebook.SHARED_VARIABLE, str(hotdog_small.parents[1]))
    monkeypatch.setenv("GLUON_FT_HOTDOG_URL", UNREACHABLE + "hotdog.zip")
    monkeypatch.setenv("MXNET_GLUON_REPO", UNREACHABLE)
    monkeypatch.delenv(notebook.MODE_VARIABLE, raising=False)  # full is the default
    setup = notebook.choose_data()
    assert setup.mode == "full" and setup.fallback
    assert setup.task == "hotdog-small" and setup.pretrained == str(food_model)
    assert setup.epochs > 1
    # The note says what is missing and where to put it.
    assert "falling back" in setup.note
    assert "hotdog.zip" in setup.note and "resnet18_v2-" in setup.note
    assert str(Path(os.environ["MXNET_HOME"]) / "datasets") in setup.note


# ----------------------------------------------------------------------------- exercise 4


def test_hotdog_is_imagenet_class_934_and_713_is_photocopier():
    from gluoncv.data import ImageNet1kAttr

    imagenet_source = SourceModel("resnet18_v2", None, 1000, None, "imagenet")
    classes = source_class_names(imagenet_source)
    assert classes == list(ImageNet1kAttr().classes)
    index, name, why = related_source_class("hotdog", classes)
    assert (index, name, why) == (934, "hotdog", "the same class")
    assert ImageNet1kAttr().classes[934] == "hotdog"
    assert ImageNet1kAttr().classes[713] == "photocopier"


def test_related_source_class_without_the_class():
    food = ["apple_pie", "hamburger", "hot_and_sour_soup", "lobster_roll_sandwich", "pizza"]
    assert related_source_class("hotdog", food)[:2] == (3, "lobster_roll_sandwich")
    assert related_source_class("hotdog", ["hot_dog", "pizza"])[:2] == (0, "hot_dog")
    shapes = ["solid-circle", "striped-square", "dotted-triangle"]
    assert related_source_class("dotted-circle", shapes)[:2] == (0, "solid-circle")
    with pytest.raises(UsageError):
        related_source_class("hotdog", [])


def test_init_head_from_source_class_copies_the_row():
    mx.random.seed(0)
    source = load_source_model("resnet18_v2", "none")
    net = graft_new_head(source, num_classes=3)
    init_head_from_source_class(net, source, source_class=934, target_class=1)
    x = mx.nd.random.normal(shape=(2, 3, 32, 32))
    new, old = net(x).asnumpy(), source.net(x).asnumpy()
    np.testing.assert_allclose(new[:, 1], old[:, 934], rtol=1e-5, atol=1e-5)
    weight = net.output.weight.data().asnumpy()
    np.testing.assert_array_equal(weight[1], source.net.output.weight.data().asnumpy()[934])
    assert net.output.bias.data().asnumpy()[1] == source.net.output.bias.data().asnumpy()[934]
    assert not np.allclose(new[:, 0], old[:, 934])  # the other rows stay Xavier
    with pytest.raises(UsageError, match="Source class 1000"):
        init_head_from_source_class(net, source, source_class=1000)
    with pytest.raises(UsageError, match="Target class 3"):
        init_head_from_source_class(net, source, source_class=934, target_class=3)


# ----------------------------------------------------------------------------- helpers


def test_split_predictions_confusion_and_confident_mistakes():
    predictions = SplitPredictions(
        indices=np.array([0, 1, 2, 4, 5]),
        labels=np.array([0, 0, 1, 1, 1]),
        probabilities=np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.05, 0.95], [0.3, 0.7]]),
    )
    assert predictions.accuracy() == pytest.approx(3 / 5)
    np.testing.assert_array_equal(predictions.confusion_matrix(), [[1, 1], [1, 2]])
    assert predictions.confident_mistakes(5) == [1, 2]  # 0.8 wrong before 0.6 wrong
    assert predictions.confident_mistakes(1) == [1]
    assert predictions.indices[predictions.confident_mistakes(1)[0]] == 1


def test_plot_lr_sweep_uses_a_log_axis_and_marks_diverged_runs(tmp_path):
    results = {"fine-tuned": {0.01: 0.8, 0.1: 0.7, 1.0: math.nan}, "scratch": {0.1: 0.6}}
    fig = plot_lr_sweep(results)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["fine-tuned"].get_xdata()) == [0.01, 0.1]
    assert any(list(line.get_xdata()) == [1.0] for line in ax.get_lines())  # the x marker
    path = plot_lr_sweep(results, tmp_path / "sweep.png")
    with Image.open(path) as img:
        assert img.size[0] > 100
