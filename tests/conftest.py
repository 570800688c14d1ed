"""Shared fixtures: tiny generated image folders, trained runs cached for the whole session,
in-process commands, paths to the optional shared data."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gluon_ft  # noqa: F401  (thread settings before mxnet)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HOTDOG_SMALL = SHARED / "data" / "hotdog-small"
FOOD_MODEL = SHARED / "models" / "resnet18_v2-food100-64px.params"


def write_image_folder(
    root: Path,
    classes=("cat", "dog"),
    n_train: int = 6,
    n_test: int = 4,
    size: int = 40,
    seed: int = 0,
    colors: list[tuple[int, int, int]] | None = None,
) -> Path:
    """Write ``root/{train,test}/<class>/*.png``: each class a colour, plus noise.

    The classes are easy to tell apart, so a couple of epochs learn something. The colour of
    class ``i`` is ``colors[i]``, by default 200 in channel ``i % 3`` (red, green, blue).
    """
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(classes):
            color = None if colors is None else colors[label]
            write_class_images(root / split / name, label, count, size, rng, color)
    return root


def write_class_folders(root: Path, counts: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """Write ``root/<class>/*.png`` (the one-folder-per-class layout), ``counts[class]`` each."""
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(counts.items()):
        write_class_images(root / name, label, count, size, rng)
    return root


def write_class_images(folder: Path, label: int, count: int, size: int, rng, color=None) -> None:
    """``count`` PNGs of class ``label``'s colour plus noise: ``color``, by default 200 in
    channel ``label % 3`` (red, green, blue)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.zeros(3)
    base[label % 3] = 200
    if color is not None:
        base = np.array(color, dtype=float)
    for i in range(count):
        noise = rng.integers(0, 55, size=(size, size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def tiny_config(data: Path, out: Path, **changes):
    """A run of seconds: mobilenet0.25 from scratch at 32 px, batches of 4, 1 epoch, no bar."""
    from gluon_ft.train import TrainConfig

    settings = dict(data=str(data), model="mobilenet0.25", pretrained="none", epochs=1)
    settings.update(batch_size=4, image_size=32, out=str(out), progress=False)
    return TrainConfig(**{**settings, **changes})


def record_steps(monkeypatch, signal_after: int | None = None, signum=signal.SIGINT) -> list:
    """Patch ``gluon.Trainer.step`` to record the learning rate of every step taken.

    With ``signal_after=N``, step N (counted from 1 over the whole run) completes, then
    ``signum`` goes to this process: a Ctrl-C (or SIGTERM) arriving between two steps.
    """
    from mxnet import gluon

    rates: list[float] = []
    original = gluon.Trainer.step

    def step(self, *args, **kwargs):
        rates.append(self.learning_rate)
        original(self, *args, **kwargs)
        if len(rates) == signal_after:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(gluon.Trainer, "step", step)
    return rates


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m gluon_ft ARGS`` as a user would; capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "gluon_ft", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@dataclass
class Finished:
    """What a command left: its exit code and output (as a ``CompletedProcess`` has them)."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys) -> Callable[..., Finished]:
    """``cli(*args, cwd=None)``: ``gluon-ft ARGS`` run in this process by ``main`` (in the
    folder ``cwd``); its exit code and output. For the tests that are not about the process
    (exit codes through a real interpreter, signals, the cluster): those start one with
    :func:`run_cli`."""
    from gluon_ft.cli import main

    def run(*args, cwd: Path | None = None) -> Finished:
        capsys.readouterr()  # only the command's own output
        environment = dict(os.environ)  # what main sets for a command stays with it
        os.environ.setdefault("COLUMNS", "80")  # --help as a process with a pipe wraps it
        try:
            with contextlib.chdir(cwd or Path.cwd()):
                code = main([str(arg) for arg in args])
        except SystemExit as exit:  # argparse refusing the command line
            code = exit.code
        finally:
            for name in set(os.environ) - set(environment):
                del os.environ[name]
            os.environ.update(environment)
        out, err = capsys.readouterr()
        return Finished(code, out, err)

    return run


def finish(process: subprocess.Popen, seconds: float) -> tuple[int, str]:
    """Wait up to ``seconds`` for ``process``, kill it either way; ``(exit code, output)``."""
    try:
        output, _ = process.communicate(timeout=seconds)
    finally:
        process.kill()
    return process.returncode, output


def processes_with_environment(entry: str) -> list[int]:
    """Live processes (not zombies, not this one) whose environment holds ``entry``
    (``NAME=value``, which every process a launcher starts inherits)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            if entry.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z" and int(pid) != os.getpid():
                    found.append(int(pid))
        except (OSError, ValueError):
            continue
    return found


@dataclass(frozen=True)
class TrainedRun:
    """A finished run of the session cache: its directory, its data and what train() returned.

    Shared by every test that asks for the same settings: read it, never change it (copy the
    directory under tmp_path first).
    """

    path: Path
    data: Path
    result: dict


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Callable[..., Path]:
    """``image_folder(**spec)``: :func:`write_image_folder` with ``spec``, written once per
    session (``class_folders={name: count}`` writes :func:`write_class_folders` instead)."""
    folders: dict[str, Path] = {}

    def get(**spec) -> Path:
        key = json.dumps(spec, sort_keys=True)
        if key not in folders:
            root = tmp_path_factory.mktemp("images") / "data"
            if "class_folders" in spec:
                counts = spec["class_folders"]
                others = {k: v for k, v in spec.items() if k != "class_folders"}
                folders[key] = write_class_folders(root, counts, **others)
            else:
                folders[key] = write_image_folder(root, **spec)
        return folders[key]

    return get


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Callable[..., TrainedRun]:
    """``trained_run(data, **changes)``: ``train(tiny_config(data, out, **changes))``, trained
    once per test session for each distinct configuration (``out`` aside), however many
    test files ask for it."""
    from gluon_ft.train import train

    runs: dict[str, TrainedRun] = {}
    mxnet_home = tmp_path_factory.mktemp("trained-mxnet-home")

    def get(data: Path, **changes) -> TrainedRun:
        config = tiny_config(data, "", **changes)
        key = json.dumps({k: v for k, v in asdict(config).items() if k != "out"}, sort_keys=True)
        if key not in runs:
            out = tmp_path_factory.mktemp("trained") / "run"
            # A module fixture may ask before the test's own MXNET_HOME is set: never ~/.mxnet.
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("MXNET_HOME", str(mxnet_home))
                result = train(tiny_config(data, out, **changes))
            runs[key] = TrainedRun(out, Path(data), result)
        return runs[key]

    return get


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A two-class image folder with 6 train and 4 test images per class, 40 px."""
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def hotdog_small() -> Path:
    if not HOTDOG_SMALL.is_dir():
        pytest.skip(f"{HOTDOG_SMALL} is absent (shared data is optional)")
    return HOTDOG_SMALL


@pytest.fixture
def food_model() -> Path:
    if not FOOD_MODEL.is_file():
        pytest.skip(f"{FOOD_MODEL} is absent (shared models are optional)")
    return FOOD_MODEL


def run_folders() -> dict[Path, int]:
    """What ``runs/`` holds where a run without ``--out`` goes (the working folder, and the
    repository: ``make test``'s working folder), with each entry's modification time."""
    folders = {REPO / "runs", Path.cwd() / "runs"}
    return {
        entry: entry.stat().st_mtime_ns
        for folder in folders
        if folder.is_dir()
        for entry in folder.iterdir()
    }


@pytest.fixture(autouse=True)
def _no_run_folder_left_in_the_repository():
    """Every test writes under its tmp_path; a ``train`` without ``--out`` would leave a
    ``runs/<data>-<model>-<time>/`` behind in the repository. A folder of the same name made
    earlier in the same second is reused, hence the modification times."""
    before = run_folders()
    yield
    after = run_folders()
    left = sorted(str(path) for path, mtime in after.items() if before.get(path) != mtime)
    if left:
        pytest.fail(f"the test left run folders {left}: give `train` an --out under tmp_path")


@pytest.fixture(autouse=True)
def _isolated_mxnet_home(tmp_path, monkeypatch):
    """Never touch the user's ~/.mxnet cache: datasets and weights go to a temp folder."""
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "mxnet-home"))
    os.environ.setdefault("MPLBACKEND", "Agg")
