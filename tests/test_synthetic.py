"""The synthetic transfer task: deterministic, well-formed, cached and crash-safe on disk."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import gluon_ft  # noqa: F401  (sets the thread count before anything imports mxnet)
from gluon_ft.data import synthetic
from gluon_ft.data.synthetic import SMALL_SPEC, TaskSpec, generate_task
from gluon_ft.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def file_digests(root: Path) -> dict[str, str]:
    """sha1 of every file under ``root``, keyed by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha1(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def file_mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def small_task(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("small") / "task"
    return root, generate_task(root, SMALL_SPEC)


def test_same_seed_gives_byte_identical_files(small_task, tmp_path):
    root, _ = small_task
    again = generate_task(tmp_path / "again", SMALL_SPEC)
    assert again["reused"] is False
    first, second = file_digests(root), file_digests(tmp_path / "again")
    n_images = sum(
        n_classes * (train + test)
        for n_classes, train, test in [
            (
                SMALL_SPEC.n_source_classes,
                SMALL_SPEC.source_train_per_class,
                SMALL_SPEC.source_test_per_class,
            ),
            (
                SMALL_SPEC.n_target_classes,
                SMALL_SPEC.target_train_per_class,
                SMALL_SPEC.target_test_per_class,
            ),
        ]
    )
    assert len(first) == n_images + 1  # + task.json
    assert first == second


def test_different_seed_gives_different_images(small_task, tmp_path):
    root, _ = small_task
    other = dataclasses.replace(SMALL_SPEC, seed=SMALL_SPEC.seed + 1)
    generate_task(tmp_path / "other", other)
    first, second = file_digests(root), file_digests(tmp_path / "other")
    assert first.keys() == second.keys()  # same layout...
    images = [name for name in first if name.endswith(".png")]
    differing = [name for name in images if first[name] != second[name]]
    assert len(differing) == len(images)  # ...but every image is new


def test_splits_have_the_same_classes_counts_and_image_format(small_task):
    _, info = small_task
    spec = SMALL_SPEC
    expected = {
        "source": (spec.n_source_classes, spec.source_train_per_class, spec.source_test_per_class),
        "target": (spec.n_target_classes, spec.target_train_per_class, spec.target_test_per_class),
    }
    for dataset, (n_classes, n_train, n_test) in expected.items():
        folder = info[dataset]
        assert sorted(p.name for p in folder.iterdir()) == ["test", "train"]
        train_classes = sorted(p.name for p in (folder / "train").iterdir())
        test_classes = sorted(p.name for p in (folder / "test").iterdir())
        assert train_classes == test_classes == sorted(info["classes"][dataset])
        assert len(train_classes) == n_classes
        for split, count in (("train", n_train), ("test", n_test)):
            for name in train_classes:
                files = sorted((folder / split / name).iterdir())
                assert len(files) == count, (dataset, split, name)
                for path in files:
                    assert path.suffix == ".png"
                    with Image.open(path) as image:
                        assert image.format == "PNG"
                        assert image.mode == "RGB"
                        assert image.size == (spec.image_size, spec.image_size)
                        image.load()  # decodes the whole file


def test_images_are_not_blank_or_all_alike(small_task):
    # A renderer that drew nothing (or one constant image) would pass the format checks.
    _, info = small_task
    files = sorted((info["source"] / "train").rglob("*.png"))
    pixels = [Image.open(path).tobytes() for path in files]
    assert len(set(pixels)) == len(pixels)
    for raw in pixels[:5]:
        assert len(set(raw)) > 50  # many distinct channel values: shape, texture, noise


def test_class_names_are_readable_and_target_classes_are_new(small_task):
    _, info = small_task
    for names in info["classes"].values():
        for name in names:
            texture, shape = name.split("-")
            assert texture in synthetic.TEXTURES and shape in synthetic.SHAPES
    assert not set(info["classes"]["source"]) & set(info["classes"]["target"])
    # Also at the largest sizes the spec allows.
    biggest = TaskSpec(
        n_source_classes=len(synthetic.SHAPES) * len(synthetic.TEXTURES)
        - len(synthetic.TARGET_COMBOS),
        n_target_classes=len(synthetic.TARGET_COMBOS),
    )
    source, target = synthetic.source_classes(biggest), synthetic.target_classes(biggest)
    assert len(set(source)) == biggest.n_source_classes
    assert len(set(target)) == biggest.n_target_classes
    assert not set(source) & set(target)


def test_target_primitives_all_appear_in_the_source():
    # Transfer needs every target shape and texture to be taught by the source.
    spec = TaskSpec()
    source = [name.split("-") for name in synthetic.source_classes(spec)]
    for name in synthetic.target_classes(spec):
        texture, shape = name.split("-")
        assert any(t == texture for t, _ in source), texture
        assert any(s == shape for _, s in source), shape


def test_second_call_reuses_the_task_and_rewrites_nothing(tmp_path):
    root = tmp_path / "task"
    assert generate_task(root, SMALL_SPEC)["reused"] is False
    before = file_mtimes(root)
    time.sleep(0.01)  # so that any rewrite would show in st_mtime_ns
    info = generate_task(str(root), SMALL_SPEC)
    assert info["reused"] is True
    assert info["source"] == root / "source" and info["target"] == root / "target"
    assert info["spec"] == dataclasses.asdict(SMALL_SPEC)
    assert file_mtimes(root) == before


def test_a_changed_spec_regenerates(tmp_path):
    root = tmp_path / "task"
    generate_task(root, SMALL_SPEC)
    # Same layout and file names, other pixels: only the recorded spec can tell them apart.
    resized = dataclasses.replace(SMALL_SPEC, image_size=40)
    info = generate_task(root, resized)
    assert info["reused"] is False
    assert json.loads((root / "task.json").read_text())["spec"] == dataclasses.asdict(resized)
    assert {Image.open(p).size for p in root.rglob("*.png")} == {(40, 40)}
    more = dataclasses.replace(resized, target_train_per_class=7)
    info = generate_task(root, more)
    assert info["reused"] is False
    for name in info["classes"]["target"]:
        assert len(list((root / "target" / "train" / name).iterdir())) == 7
    assert [p.name for p in tmp_path.iterdir()] == ["task"]  # no stale or partial dirs left


def test_a_task_with_missing_files_or_manifest_is_not_complete(tmp_path):
    root = tmp_path / "task"
    generate_task(root, SMALL_SPEC)
    victim = next((root / "target" / "test").rglob("*.png"))
    victim.unlink()
    assert generate_task(root, SMALL_SPEC)["reused"] is False
    assert victim.exists()
    (root / "task.json").unlink()
    assert generate_task(root, SMALL_SPEC)["reused"] is False
    assert generate_task(root, SMALL_SPEC)["reused"] is True


def test_a_killed_generation_leaves_no_complete_task(tmp_path):
    root = tmp_path / "task"
    spec = dataclasses.replace(SMALL_SPEC, source_train_per_class=2000)
    code = (
        "import sys; from gluon_ft.data.synthetic import TaskSpec, generate_task; "
        f"generate_task(sys.argv[1], TaskSpec(**{dataclasses.asdict(spec)!r}))"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        partial = []
        while not partial and time.monotonic() < deadline:
            partial = [p for p in tmp_path.glob(".task.partial-*") if any(p.rglob("*.png"))]
            time.sleep(0.02)
        assert partial, "the generator never started writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not root.exists()  # the half-written task is only in the partial directory
    info = generate_task(root, SMALL_SPEC)
    assert info["reused"] is False
    assert generate_task(root, SMALL_SPEC)["reused"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["task"]  # the dead child's leftovers are gone


def test_an_error_during_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real_render = synthetic.render_image

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_image", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_task(tmp_path / "task", SMALL_SPEC)
    assert list(tmp_path.iterdir()) == []


def test_a_partial_directory_of_a_live_process_is_left_alone(tmp_path):
    live = tmp_path / f".task.partial-{os.getpid()}-x"
    live.mkdir()
    generate_task(tmp_path / "task", SMALL_SPEC)
    assert live.exists()


def test_refuses_to_replace_a_directory_that_is_not_a_task(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(UsageError, match="not a synthetic task"):
        generate_task(root, SMALL_SPEC)
    assert [p.name for p in root.iterdir()] == ["holiday.jpg"]


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 8},
        {"n_source_classes": 1},
        {"n_source_classes": 1000},
        {"n_target_classes": 1},
        {"n_target_classes": 1000},
        {"target_train_per_class": 0},
        {"source_test_per_class": 0},
    ],
)
def test_bad_spec_is_a_usage_error(change):
    with pytest.raises(UsageError):
        dataclasses.replace(TaskSpec(), **change)
