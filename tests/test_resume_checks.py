"""``--resume`` continues only the same run: its settings, its classes, its image files.

Real run directories from real runs (mobilenet0.25 from scratch at 32 px, one epoch), then the
data or the command changed the way users change them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config, write_image_folder

from gluon_ft.errors import DivergedError, UsageError
from gluon_ft.train import train
from gluon_ft.train.resume import RESUMABLE_FLAGS


def cli_args(data: Path, out: Path, *more: str) -> list[str]:
    """The command line of :func:`conftest.tiny_config`."""
    return [
        "train",
        *("--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--epochs", "1", "--batch-size", "4", "--image-size", "32"),
        *("--out", str(out), "--no-progress", *more),
    ]


def run_files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory, by relative path: what a refused resume must not touch."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_refuses_a_renamed_class_folder(tmp_path, cli):
    data = write_image_folder(tmp_path / "data", classes=("cat", "dog"))
    run = tmp_path / "run"
    first = cli(*cli_args(data, run))
    assert first.returncode == 0, first.stderr
    before = run_files(run)
    # The user renames "dog" to "ant": the sorted classes become (ant, cat), so output 0,
    # trained as "cat", would now be trained as "ant".
    for split in ("train", "test"):
        (data / split / "dog").rename(data / split / "ant")

    resumed = cli(*cli_args(data, run, "--epochs", "2", "--resume"))
    assert resumed.returncode == 2, resumed.stderr
    assert "Traceback" not in resumed.stderr
    message = resumed.stderr.strip()
    assert "\n" not in message  # one paragraph
    assert "the classes of --data differ" in message
    assert "output 0 was 'cat', now 'ant'; output 1 was 'dog', now 'cat'" in message
    assert run_files(run) == before  # nothing written, no new checkpoint

    # Named back, the same command continues the run.
    for split in ("train", "test"):
        (data / split / "ant").rename(data / split / "dog")
    result = train(tiny_config(data, run, epochs=2, resume=True))
    assert [row["epoch"] for row in result["history"]] == [1, 2]


def test_resume_keeps_to_the_files_it_started_with(tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(data, run))
    before = run_files(run)
    recorded = json.loads((run / "config.json").read_text())["data_files"]
    assert recorded["train"]["files"] == 12 and recorded["test"]["files"] == 8

    # A file the run trained or tested on is gone (renamed): the run cannot go on as it was.
    renamed = data / "test" / "dog" / "renamed.png"
    (data / "test" / "dog" / "000.png").rename(renamed)
    with pytest.raises(UsageError, match=r"split.json lists 1 file\(s\) of the test part"):
        train(tiny_config(data, run, epochs=2, resume=True))
    assert run_files(run) == before
    renamed.rename(data / "test" / "dog" / "000.png")

    # A new photo in the folder does not move anything: the run resumes on split.json's files.
    extra = data / "train" / "cat" / "new.png"
    extra.write_bytes((data / "train" / "cat" / "000.png").read_bytes())
    result = train(tiny_config(data, run, epochs=2, resume=True))
    assert [row["train_samples"] for row in result["history"]] == [12, 12]


def test_a_started_run_without_a_checkpoint_is_checked_and_kept(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    # A run that diverges in its first epoch has written config.json, and no checkpoint.
    with pytest.raises(DivergedError, match="No checkpoint was saved"):
        train(tiny_config(data, run, lr=1e30))
    assert (run / "config.json").is_file() and not (run / "metrics.json").exists()
    before = run_files(run)

    with pytest.raises(UsageError, match=r"--lr was 1e\+30, now 0\.01") as err:
        train(tiny_config(data, run, resume=True))
    assert f"only {RESUMABLE_FLAGS} may change" in str(err.value)
    with pytest.raises(UsageError, match="already holds a run, started, with no finished epoch"):
        train(tiny_config(data, run))  # not overwritten without --resume either
    assert run_files(run) == before

    # The same settings continue it: from step 1, since nothing was saved.
    with pytest.raises(DivergedError):
        train(tiny_config(data, run, lr=1e30, resume=True))
    assert "stopped before its first checkpoint; starting from step 1" in capsys.readouterr().out

    (run / "config.json").write_text("{ edited by hand")
    with pytest.raises(UsageError, match="config.json cannot be read"):
        train(tiny_config(data, run, lr=1e30, resume=True))
