"""``gluon-ft pretrain``: a source model trained from scratch, then grafted by ``train``.

Step 1 of the book's recipe. The params file it writes, with the sidecar JSON beside it, must
be what ``train --pretrained FILE.params`` grafts; and bad input is refused (exit 2, one
paragraph, no traceback) before any training starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from conftest import record_steps, write_image_folder

import gluon_ft.train.run
from gluon_ft.cli import main
from gluon_ft.model.graft import graft_new_head, load_source_model, sidecar_path

MODEL = "mobilenet0.25"  # the smallest zoo network: the mechanism, not the accuracy
SOURCE_CLASSES = ("red", "green", "blue")
SMALL_RUN = ("--epochs", "1", "--batch-size", "8", "--image-size", "32", "--no-progress")


def pretrain_args(data: Path, out: Path | str, model: str = MODEL) -> list[str]:
    return ["pretrain", "--data", str(data), "--model", model, "--out", str(out), *SMALL_RUN]


def assert_refused(output: str, message: str) -> None:
    """A bad-input refusal: the one-paragraph message, and no traceback."""
    assert message in output
    assert "gluon-ft: error:" in output
    assert "Traceback" not in output


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A mobilenet0.25 params file written by ``gluon-ft pretrain`` (run in this process)."""
    root = tmp_path_factory.mktemp("pretrain")
    source = write_image_folder(root / "source", SOURCE_CLASSES, n_train=4, n_test=2, size=36)
    out = root / "models" / "source.params"  # a folder that does not exist yet
    # Module scope runs before the per-test MXNET_HOME isolation: give the command its own.
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as said:
        patch.setenv("MXNET_HOME", str(root / "mxnet-home"))
        assert main(pretrain_args(source, out)) == 0
    assert f"wrote {out}" in said.getvalue() and "over 3 classes" in said.getvalue()
    return out


def test_pretrain_writes_params_sidecar_and_run_directory(pretrained):
    meta = json.loads(sidecar_path(pretrained).read_text())
    assert sidecar_path(pretrained) == pretrained.with_suffix(".json")
    assert meta == {"model": MODEL, "classes": sorted(SOURCE_CLASSES), "image_size": 32}
    saved = mx.nd.load(str(pretrained))
    assert saved["output.weight"].shape[0] == len(SOURCE_CLASSES)
    run = pretrained.with_suffix(".run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1]
    assert {"loss", "train_acc", "test_acc"} <= metrics[0].keys()
    config = json.loads((run / "config.json").read_text())
    # From scratch, with no new head to speed up.
    assert (config["pretrained"], config["head_lr_mult"]) == ("none", 1.0)
    assert json.loads((run / "classes.json").read_text()) == sorted(SOURCE_CLASSES)
    assert not (run / "model.params").exists()  # moved to --out, not copied


def test_graft_of_the_pretrained_file_starts_from_its_features(pretrained):
    source = load_source_model(MODEL, str(pretrained), image_size=32)
    assert (source.num_classes, source.classes) == (3, sorted(SOURCE_CLASSES))
    net = graft_new_head(source, num_classes=2)
    saved = {k: v.asnumpy() for k, v in mx.nd.load(str(pretrained)).items()}
    grafted = net._collect_params_with_prefix()
    features = sorted(k for k in saved if k.startswith("features."))
    assert len(features) > 50  # every conv, BatchNorm (running statistics too) of the body
    assert sorted(k for k in grafted if k.startswith("features.")) == features
    for key in features:
        np.testing.assert_array_equal(grafted[key].data().asnumpy(), saved[key], err_msg=key)
    # Only the classifier is new: 2 target classes instead of the 3 source ones.
    assert net(mx.nd.zeros((1, 3, 32, 32))).shape == (1, 2)
    assert grafted["output.weight"].shape == (2, saved["output.weight"].shape[1])
    assert saved["output.weight"].shape[0] == 3


def test_train_with_the_pretrained_file_runs_end_to_end(pretrained, tmp_path, cli):
    target = write_image_folder(tmp_path / "target", n_train=4, n_test=2, size=36, seed=1)
    run = tmp_path / "run"
    args = ["train", "--data", str(target), "--model", MODEL, "--pretrained", str(pretrained)]
    result = cli(*args, "--out", str(run), *SMALL_RUN)
    assert result.returncode == 0, result.stderr
    assert "done: test acc" in result.stdout
    assert len(json.loads((run / "metrics.json").read_text())) == 1
    config = json.loads((run / "config.json").read_text())
    assert config["pretrained"] == str(pretrained)
    assert (config["source_classes"], config["num_classes"]) == (3, 2)
    assert (run / "model.params").is_file()


def test_params_of_another_architecture_are_refused_by_name(pretrained, tmp_path, cli):
    target = write_image_folder(tmp_path / "target", n_train=2, n_test=1, size=36)
    run = tmp_path / "run"
    args = ["train", "--data", str(target), "--model", "resnet18_v2"]
    result = cli(*args, "--pretrained", str(pretrained), "--out", str(run), *SMALL_RUN)
    assert result.returncode == 2
    # The sidecar names the architecture, so the message can say which --model to use.
    assert_refused(
        result.stderr,
        f"{pretrained} holds a {MODEL} (per source.json), not a resnet18_v2; "
        f"use --model {MODEL}.",
    )
    assert not (run / "metrics.json").exists()


def test_model_name_in_another_case_still_matches_its_sidecar(tmp_path):
    source = write_image_folder(tmp_path / "source", n_train=4, n_test=1, size=36)
    params = tmp_path / "source.params"
    assert main(pretrain_args(source, params, model="MobileNet0.25")) == 0
    target = write_image_folder(tmp_path / "target", n_train=4, n_test=1, size=36, seed=1)
    args = ["train", "--data", str(target), "--model", "MobileNet0.25", "--pretrained"]
    assert main([*args, str(params), "--out", str(tmp_path / "run"), *SMALL_RUN]) == 0


# --- bad input -----------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if ``pretrain`` reaches the training loop."""

    def refuse(config):
        raise AssertionError("training started")

    monkeypatch.setattr(gluon_ft.train.run, "train", refuse)


def test_one_class_dataset_exits_2(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", classes=("only",), n_train=2, n_test=1)
    out = tmp_path / "source.params"
    assert main(pretrain_args(data, out)) == 2
    err = capsys.readouterr().err
    assert_refused(err, "has a single class (only); a classifier needs two or more")
    assert not out.exists() and not sidecar_path(out).exists()


def test_out_under_a_regular_file_exits_2_before_training(tiny_data, tmp_path, capsys, no_training):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file, not a folder")
    out = blocker / "source.params"
    assert main(pretrain_args(tiny_data, out)) == 2
    captured = capsys.readouterr()
    assert_refused(captured.err, f"Cannot write {out}")
    assert blocker.read_text() == "a file, not a folder"


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write into. Root (as CI runs) ignores permissions, so for root it
    is a read-only tmpfs mount; for anyone else, mode 0500."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield folder
        finally:
            folder.chmod(0o700)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_out_in_a_read_only_folder_exits_2_before_training(
    tiny_data, read_only_folder, capsys, no_training
):
    out = read_only_folder / "source.params"
    assert main(pretrain_args(tiny_data, out)) == 2
    assert_refused(capsys.readouterr().err, f"Cannot write {out}")
    assert list(read_only_folder.iterdir()) == []  # no run directory, no checkpoint, no probe


@pytest.mark.parametrize("name", ["source.pt", "source", "source.params.json"])
def test_out_without_params_suffix_exits_2(tiny_data, tmp_path, capsys, no_training, name):
    out = tmp_path / "models" / name
    assert main(pretrain_args(tiny_data, out)) == 2
    assert_refused(capsys.readouterr().err, "the pretrained model file must end in .params")
    assert not (tmp_path / "models").exists()  # refused before creating anything


def test_out_that_is_a_folder_exits_2_before_training(tiny_data, tmp_path, capsys, no_training):
    out = tmp_path / "source.params"
    out.mkdir()
    assert main(pretrain_args(tiny_data, out)) == 2
    assert_refused(capsys.readouterr().err, str(out))


def test_an_existing_model_or_earlier_run_is_never_replaced(
    tiny_data, tmp_path, capsys, no_training
):
    out = tmp_path / "source.params"
    out.write_bytes(b"weights of an earlier pretrain")
    assert main(pretrain_args(tiny_data, out)) == 2
    assert_refused(capsys.readouterr().err, f"{out} already exists; nothing was overwritten")
    assert out.read_bytes() == b"weights of an earlier pretrain"
    # The model file was moved away, but the run directory of that pretrain is still there.
    out.unlink()
    earlier = out.with_suffix(".run")
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    assert main(pretrain_args(tiny_data, out)) == 2
    err = capsys.readouterr().err
    assert_refused(err, f"{earlier} holds an earlier pretraining; nothing was overwritten")
    assert "Add --resume to continue it" in err


def test_an_interrupted_pretraining_resumes_to_the_same_model(tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 2 says to add --resume; ``pretrain --resume`` then ends where an
    uninterrupted pretraining ends."""
    source = write_image_folder(tmp_path / "source", SOURCE_CLASSES, n_train=4, n_test=1)
    two_epochs = ["--epochs", "2", "--momentum", "0.9", "--lr-schedule", "cosine"]
    whole = tmp_path / "whole.params"
    assert main([*pretrain_args(source, whole), *two_epochs]) == 0
    record_steps(monkeypatch, signal_after=3)  # 12 images in batches of 8: step 1 of epoch 2
    out = tmp_path / "resumed.params"
    assert main([*pretrain_args(source, out), *two_epochs]) == 130
    assert "Continue with the same command and --resume" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.undo()
    assert main([*pretrain_args(source, out), *two_epochs, "--resume"]) == 0
    resumed, uninterrupted = mx.nd.load(str(out)), mx.nd.load(str(whole))
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(resumed[name].asnumpy(), value.asnumpy(), atol=1e-6)
    assert json.loads(sidecar_path(out).read_text())["classes"] == sorted(SOURCE_CLASSES)
