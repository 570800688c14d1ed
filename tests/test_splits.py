"""Dataset layouts and split.json (issue 16): class folders split for you, train/ + test/
with a validation part carved out of train, stratified, disjoint, complete and seeded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, write_class_folders, write_image_folder

from gluon_ft.data.splits import split_dataset, stratified_split
from gluon_ft.errors import UsageError
from gluon_ft.train import train

COUNTS = {"ant": 20, "bee": 13, "cow": 9}


def part_files(record: dict) -> dict[str, dict[str, set]]:
    return {
        part: {cls: set(paths) for cls, paths in by_class.items()}
        for part, by_class in record["parts"].items()
    }


def assert_stratified(record: dict, counts: dict, fractions: dict) -> None:
    """Each class's share of each part within one image of exact; disjoint; complete."""
    parts = part_files(record)
    for cls, total in counts.items():
        seen = [parts[part][cls] for part in parts]
        union = set().union(*seen)
        assert len(union) == sum(len(s) for s in seen) == total, cls  # disjoint, complete
        assert union == {f"{cls}/{i:03d}.png" for i in range(total)}
        for part, fraction in fractions.items():
            assert abs(len(parts[part][cls]) - total * fraction) <= 1, (part, cls)


def test_stratified_split_shares_and_seed():
    labels = np.repeat([0, 1, 2], [20, 13, 9])
    one = stratified_split(labels, {"test": 0.1, "val": 0.25}, seed=4)
    again = stratified_split(labels, {"test": 0.1, "val": 0.25}, seed=4)
    other = stratified_split(labels, {"test": 0.1, "val": 0.25}, seed=5)
    assert all(np.array_equal(one[k], again[k]) for k in one)
    assert not all(np.array_equal(one[k], other[k]) for k in one)
    everything = np.concatenate(list(one.values()))
    assert sorted(everything.tolist()) == list(range(len(labels)))  # disjoint and complete
    for part, fraction in (("test", 0.1), ("val", 0.25)):
        for label, total in enumerate((20, 13, 9)):
            assert abs(int((labels[one[part]] == label).sum()) - total * fraction) <= 1


def test_class_folders_train_end_to_end_and_write_split_json(tmp_path, cli):
    data = write_class_folders(tmp_path / "photos", COUNTS)
    out = tmp_path / "run"
    done = cli(  # with paths relative to the working directory, as people type them
        "train",
        *("--data", "photos", "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--epochs", "1", "--batch-size", "8", "--image-size", "32", "--seed", "7"),
        *("--val-split", "0.2", "--out", "run", "--no-progress"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "split.json").read_text())
    assert record["layout"] == "class-folders" and record["classes"] == list(COUNTS)
    assert record["root"] == str(data)
    assert set(record["parts"]) == {"train", "val", "test"}
    assert_stratified(record, COUNTS, {"val": 0.2, "test": 0.1})
    config = json.loads((out / "config.json").read_text())
    sizes = {part: sum(map(len, record["parts"][part].values())) for part in record["parts"]}
    assert (config["train_size"], config["val_size"], config["test_size"]) == (
        sizes["train"],
        sizes["val"],
        sizes["test"],
    )

    # The same seed gives the same split; another seed another one.
    assert split_dataset(data, 0.2, None, seed=7).record()["parts"] == record["parts"]
    assert split_dataset(data, 0.2, None, seed=8).record()["parts"] != record["parts"]


def test_resume_reuses_split_json_even_when_the_folder_changed(tmp_path):
    data = write_class_folders(tmp_path / "photos", COUNTS)
    out = tmp_path / "run"
    train(tiny_config(data, out, epochs=1))
    before = (out / "split.json").read_text()
    # New photos arrive: a fresh split would place them (and move others); a resume must not.
    write_class_folders(tmp_path / "more", {"ant": 30, "bee": 13, "cow": 9}, seed=1)
    for extra in sorted((tmp_path / "more" / "ant").iterdir())[20:]:
        extra.rename(data / "ant" / extra.name)
    train(tiny_config(data, out, epochs=2, resume=True))
    assert (out / "split.json").read_text() == before
    assert json.loads((out / "config.json").read_text())["train_size"] == 34  # 42 - 4 val - 4 test


def test_train_test_layout_carves_val_out_of_train(tmp_path):
    data = write_image_folder(tmp_path / "d", classes=("a", "b", "c"), n_train=8, n_test=2)
    parts = split_dataset(data, val_split=0.25, test_split=None, seed=0)
    assert parts.layout == "train-test"
    assert [len(parts.train), len(parts.val), len(parts.test)] == [18, 6, 6]
    assert np.bincount(parts.val.labels()).tolist() == [2, 2, 2]
    train_files = {p for p, _ in parts.train.items}
    assert not train_files & {p for p, _ in parts.val.items}
    assert all(Path(p).parent.parent.name == "test" for p, _ in parts.test.items)
    # The default is the book's: no validation part.
    assert split_dataset(data, None, None, 0).val is None
    # A val/ folder is used as it is.
    write_image_folder(tmp_path / "v", classes=("a", "b", "c"), n_train=2, n_test=0)
    (tmp_path / "v" / "train").rename(data / "val")
    given = split_dataset(data, None, None, 0)
    assert len(given.val) == 6 and len(given.train) == 24


@pytest.mark.parametrize(
    "layout,flags,message",
    [
        ("train-test", {"test_split": 0.2}, "--test-split only splits a folder of classes"),
        ("classes", {"val_split": 1.0}, "--val-split must be a fraction"),
        ("classes", {"test_split": 0.0}, "--test-split must be above 0"),
        ("classes", {"test_split": 0.01}, "leaves the test part"),
    ],
)
def test_split_settings_a_layout_cannot_use_are_refused(tmp_path, layout, flags, message):
    if layout == "classes":
        # Two images a class: too few to hold one out for val and test and train on one.
        data = write_class_folders(tmp_path / "d", {"a": 2, "b": 2})
    else:
        data = write_image_folder(tmp_path / "d", n_train=2, n_test=1)
    settings = {"val_split": None, "test_split": None, **flags}
    with pytest.raises(UsageError, match=message):
        split_dataset(data, seed=0, **settings)


def test_cli_refuses_a_split_flag_the_layout_cannot_use(tmp_path, cli):
    data = write_image_folder(tmp_path / "d", n_train=2, n_test=1)
    out = tmp_path / "r"
    done = cli("train", "--data", data, "--test-split", "0.2", "--out", out)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--test-split only splits a folder of classes" in done.stderr
    assert not out.exists()
