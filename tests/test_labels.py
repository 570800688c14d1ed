"""CSV labels (``train --labels FILE.csv``): the reader, its bad rows and refusals, the parts of
a labels file, and iterative stratification for multi-label splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, write_class_folders, write_class_images

from gluon_ft.data import labels as L
from gluon_ft.data.folders import ImageFolderSplit
from gluon_ft.data.labels import MultiLabelSplit, describe_bad_rows, read_labels
from gluon_ft.data.multilabel_split import iterative_stratification
from gluon_ft.data.splits import (
    class_counts,
    parts_from_record,
    split_dataset,
    split_labels,
)
from gluon_ft.errors import UsageError

FOOD4 = SHARED / "data" / "food4-multilabel64"


def write_csv(path: Path, rows: list[str], encoding: str = "utf-8") -> Path:
    path.write_text("\n".join(rows) + "\n", encoding=encoding)
    return path


def images(root: Path, names: list[str], size: int = 16) -> None:
    """Write one small PNG at each ``root/name``."""
    rng = np.random.default_rng(0)
    for name in names:
        target = root / name
        write_class_images(target.parent, len(name), 1, size, rng)
        (target.parent / "000.png").rename(target)


def test_a_multi_label_file_with_a_split_column(tmp_path):
    images(tmp_path, ["a.png", "sub/b.png", "c.png", "d.png"])
    source = write_csv(
        tmp_path / "labels.csv",
        [
            "image,labels,split",
            "a.png,dog cat,train",
            "sub/b.png,  cat ,test",  # spaces around a label are not part of it
            "c.png,bird  dog,TRAIN",  # runs of the delimiter, and the split's case
            "./d.png,cat cat,val",  # a label twice is the label once
        ],
    )
    table = read_labels(source, tmp_path)
    assert table.classes == ("bird", "cat", "dog")
    assert table.items == (
        (str(tmp_path / "a.png"), (1, 2)),
        (str(tmp_path / "sub/b.png"), (1,)),
        (str(tmp_path / "c.png"), (0, 2)),
        (str(tmp_path / "d.png"), (1,)),
    )
    assert table.split == ("train", "test", "train", "val")
    assert table.multi_label and table.bad_rows == ()
    np.testing.assert_array_equal(table.targets(), [[0, 1, 1], [0, 1, 0], [1, 0, 1], [0, 1, 0]])


def test_a_single_label_file_without_a_split_column_is_not_multi_label(tmp_path):
    images(tmp_path, ["x.png", "y.png"])
    table = read_labels(
        write_csv(tmp_path / "l.csv", ["image,labels", "x.png,b", "y.png,a"]), tmp_path
    )
    assert not table.multi_label and table.split is None
    assert table.classes == ("a", "b") and [labels for _, labels in table.items] == [(1,), (0,)]


def test_header_bom_case_extra_columns_and_another_delimiter(tmp_path):
    images(tmp_path, ["x.png", "y.png"])
    source = write_csv(
        tmp_path / "l.csv",
        [" Labels ,notes,IMAGE", '"hot dog;bun",first,x.png', "bun,,y.png"],
        encoding="utf-8-sig",  # Excel's "CSV UTF-8" starts with a byte order mark
    )
    table = read_labels(source, tmp_path, delimiter=";")
    assert table.classes == ("bun", "hot dog")
    assert [labels for _, labels in table.items] == [(0, 1), (0,)]


def test_bad_rows_are_counted_and_named_and_the_good_ones_kept(tmp_path):
    images(tmp_path / "data", ["good.png", "other.png", "sub/third.png"])
    data = tmp_path / "data"
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "notes.txt").write_text("a note")
    (data / "folder.png").mkdir()
    images(tmp_path, ["outside.png"])
    source = write_csv(
        tmp_path / "labels.csv",
        [
            "image,labels,split",
            "good.png,cat,train",  # line 2
            "gone.png,cat,train",  # 3: missing
            "broken.png,dog,train",  # 4: undecodable
            "notes.txt,dog,train",  # 5: not an image format
            "other.png,,train",  # 6: no labels
            "sub/third.png,dog,dev",  # 7: unknown split (a later row lists it well)
            "good.png,cat,train",  # 8: the same row again
            "./good.png,dog,train",  # 9: the same image with other labels
            "../outside.png,dog,train",  # 10: outside --data
            ",dog,train",  # 11: no image
            "folder.png,dog,train",  # 12: a folder
            "sub/third.png,dog,test",  # 13: good, as line 7 kept nothing
            "other.png,dog,",  # 14: no split
            "sub/third.png,cat,test",  # 15: the same image as line 13, other labels
        ],
    )
    table = read_labels(source, data)
    assert [path for path, _ in table.items] == [
        str(data / "good.png"),
        str(data / "sub/third.png"),
    ]
    assert table.split == ("train", "test")
    got = [(bad.line, bad.image, bad.problem) for bad in table.bad_rows]
    assert got == [
        (3, "gone.png", L.MISSING_FILE),
        (4, "broken.png", L.UNREADABLE),
        (5, "notes.txt", L.NOT_AN_IMAGE),
        (6, "other.png", L.NO_LABELS),
        (7, "sub/third.png", L.UNKNOWN_SPLIT),
        (8, "good.png", L.DUPLICATE),
        (9, "./good.png", L.DUPLICATE),
        (10, "../outside.png", L.BAD_PATH),
        (11, "", L.BAD_PATH),
        (12, "folder.png", L.MISSING_FILE),
        (14, "other.png", L.UNKNOWN_SPLIT),
        (15, "sub/third.png", L.DUPLICATE),
    ]
    assert table.bad_counts() == {
        L.MISSING_FILE: 2,
        L.UNREADABLE: 1,
        L.NOT_AN_IMAGE: 1,
        L.NO_LABELS: 1,
        L.UNKNOWN_SPLIT: 2,
        L.DUPLICATE: 3,
        L.BAD_PATH: 2,
    }
    details = {bad.line: bad.detail for bad in table.bad_rows}
    assert details[8] == "already listed on line 2"
    assert "other labels" in details[9] and "not an image" in details[4]
    assert details[15].startswith("already listed on line 13 with other labels")
    said = describe_bad_rows(table.bad_rows, shown=2)
    assert said.startswith("12 row(s) left out (2 missing file, 1 unreadable image, ")
    assert "line 3 gone.png (file not found); line 4 broken.png (" in said
    assert said.endswith("; and 10 more")
    # Without decoding, the undecodable file is kept: training will skip it, as with folders.
    kept = read_labels(source, data, decode=False)
    assert str(data / "broken.png") in [path for path, _ in kept.items]


def test_an_empty_or_absent_split_cell_is_an_unknown_split(tmp_path):
    images(tmp_path, ["x.png", "y.png", "z.png", "w.png"])
    rows = ["image,labels,split", "x.png,a,train", "y.png,b,test", "z.png,b,", "w.png,a"]
    table = read_labels(write_csv(tmp_path / "l.csv", rows), tmp_path)
    assert [(bad.line, bad.problem) for bad in table.bad_rows] == [
        (4, L.UNKNOWN_SPLIT),
        (5, L.UNKNOWN_SPLIT),
    ]
    assert table.bad_rows[0].detail == "split ''; expected train, val or test"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"image,label\nx.png,a\n", "no labels column (found: 'image', 'label')"),
        (b"path;labels\nx.png;a\n", "no image and no labels column"),
        (b"", "no image and no labels column (found: no header row)"),
        (b"image,labels\n", "has no usable row (only a header)"),
        (b"image,labels\nx.png,caf\xe9\n", "is not UTF-8 text (byte 22 cannot be decoded)"),
        (b"image,labels\nx.png,a\ny.png,a\n", "names a single class (a)"),
        (b"image,labels\nm.png,a\nn.png,b\n", "has no usable row (2 row(s) left out (2 missing"),
    ],
)
def test_a_file_that_cannot_be_used_is_a_usage_error(tmp_path, content, message):
    images(tmp_path, ["x.png", "y.png"])
    (tmp_path / "l.csv").write_bytes(content)
    with pytest.raises(UsageError) as err:
        read_labels(tmp_path / "l.csv", tmp_path)
    assert message in str(err.value)


def test_a_missing_file_root_or_delimiter_is_a_usage_error(tmp_path):
    images(tmp_path, ["x.png"])
    with pytest.raises(UsageError, match="Cannot read the labels file .*gone.csv"):
        read_labels(tmp_path / "gone.csv", tmp_path)
    with pytest.raises(UsageError, match="Cannot read the labels file"):
        read_labels(tmp_path, tmp_path)  # a folder
    source = write_csv(tmp_path / "l.csv", ["image,labels", "x.png,a"])
    with pytest.raises(UsageError, match="Image folder .*nowhere does not exist"):
        read_labels(source, tmp_path / "nowhere")
    with pytest.raises(UsageError, match="--label-delim must be"):
        read_labels(source, tmp_path, delimiter="")


def shuffled_listing(root: Path, counts: dict[str, int]) -> list[str]:
    """CSV rows of a class-folder dataset, classes interleaved, each class's files in order."""
    rows = [(i, f"{name}/{i:03d}.png,{name}") for name, n in counts.items() for i in range(n)]
    return ["image,labels"] + [row for _, row in sorted(rows, key=lambda r: r[0])]


def test_a_single_label_file_gives_the_parts_class_folders_give(tmp_path):
    counts = {"ant": 12, "bee": 9, "cow": 7}
    root = write_class_folders(tmp_path / "photos", counts)
    table = read_labels(write_csv(tmp_path / "l.csv", shuffled_listing(root, counts)), root)
    from_csv = split_labels(table, 0.2, None, seed=3)
    from_folders = split_dataset(root, 0.2, None, seed=3)
    assert not from_csv.multi_label
    for name in ("train", "val", "test"):
        part = from_csv.named()[name]
        assert isinstance(part, ImageFolderSplit) and part == from_folders.named()[name]
    assert from_csv.record()["parts"] == from_folders.record()["parts"]
    # The record rebuilds the same parts, in the same order (what a resumed run reads).
    assert parts_from_record(root, from_csv.record()) == from_csv
    assert split_labels(table, 0.2, None, seed=4).record() != from_csv.record()


def split_column_dataset(tmp_path: Path, rows: list[str]):
    names = [row.split(",")[0] for row in rows]
    images(tmp_path, names)
    return read_labels(write_csv(tmp_path / "l.csv", ["image,labels,split", *rows]), tmp_path)


def test_the_split_column_wins_and_val_may_be_carved_out_of_train(tmp_path):
    rows = [f"t{i}.png,{'ab'[i % 2]},train" for i in range(20)]
    table = split_column_dataset(tmp_path, rows + ["s0.png,a,test", "s1.png,b,test"])
    parts = split_labels(table, None, None, seed=0)
    assert parts.val is None and len(parts.train) == 20
    assert [Path(p).name for p, _ in parts.test.items] == ["s0.png", "s1.png"]
    carved = split_labels(table, 0.2, None, seed=0)
    assert (len(carved.train), len(carved.val)) == (16, 4)
    assert class_counts(carved.val).tolist() == [2, 2]
    with pytest.raises(UsageError, match="has a split column; --test-split only splits"):
        split_labels(table, None, 0.1, seed=0)


def test_split_column_refusals(tmp_path):
    with_val = split_column_dataset(
        tmp_path, ["a.png,x,train", "b.png,y,train", "c.png,x,val", "d.png,y,test"]
    )
    assert len(split_labels(with_val, None, None, seed=0).val) == 1
    with pytest.raises(UsageError, match="has val rows in its split column; leave out"):
        split_labels(with_val, 0.1, None, seed=0)
    no_test = split_column_dataset(tmp_path / "n", ["a.png,x,train", "b.png,y,val"])
    with pytest.raises(UsageError, match="has no usable test row"):
        split_labels(no_test, None, None, seed=0)
    test_only_class = split_column_dataset(tmp_path / "o", ["a.png,x,train", "b.png,y,test"])
    with pytest.raises(UsageError, match="leaves no training image for y"):
        split_labels(test_only_class, None, None, seed=0)


def test_multi_label_parts_and_their_record(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"{i:02d}.png" for i in range(40)]
    images(tmp_path, names)
    label_sets = [" ".join(sorted({"abc"[rng.integers(3)], "abc"[rng.integers(3)]})) for _ in names]
    rows = ["image,labels"] + [f"{n},{labels}" for n, labels in zip(names, label_sets)]
    table = read_labels(write_csv(tmp_path / "l.csv", rows), tmp_path)
    parts = split_labels(table, 0.25, 0.25, seed=2)
    assert parts.multi_label and isinstance(parts.train, MultiLabelSplit)
    listed = sorted(p for part in parts.named().values() for p, _ in part.items)
    assert listed == sorted(p for p, _ in table.items)  # disjoint and complete
    assert abs(len(parts.val) - 10) <= 1 and abs(len(parts.test) - 10) <= 1
    record = parts.record(labels="l.csv")
    assert record["multi_label"] is True and record["labels"] == "l.csv"
    first_path, first_labels = parts.train.items[0]
    assert record["parts"]["train"][Path(first_path).name] == [
        table.classes[i] for i in first_labels
    ]
    assert parts_from_record(tmp_path, record) == parts
    assert parts.train.load(0).mode == "RGB"
    np.testing.assert_array_equal(class_counts(parts.test), parts.test.targets().sum(axis=0))
    assert split_labels(table, 0.25, 0.25, seed=3).record() != record


def test_multi_label_is_forced_or_refused_as_asked(tmp_path):
    images(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    single = read_labels(
        write_csv(
            tmp_path / "s.csv",
            [
                "image,labels,split",
                "a.png,x,train",
                "b.png,y,train",
                "c.png,x,test",
                "d.png,y,test",
            ],
        ),
        tmp_path,
    )
    assert isinstance(split_labels(single, None, None, 0, multi_label=True).train, MultiLabelSplit)
    multi = read_labels(
        write_csv(
            tmp_path / "m.csv",
            [
                "image,labels,split",
                "a.png,x y,train",
                "b.png,y,train",
                "c.png,x,test",
                "d.png,y,test",
            ],
        ),
        tmp_path,
    )
    with pytest.raises(UsageError, match="two or more labels; train it with --multi-label"):
        split_labels(multi, None, None, 0, multi_label=False)


def shares_are_kept(parts: dict, targets: np.ndarray, fractions: dict, slack: float) -> bool:
    """Every label's count in every part within ``slack`` of its share."""
    return all(
        abs(targets[parts[name]].sum(axis=0) - fraction * targets.sum(axis=0)).max() <= slack
        for name, fraction in fractions.items()
    )


def test_iterative_stratification_keeps_every_labels_share():
    rng = np.random.default_rng(0)
    # 120 images, 6 labels from common (p = 0.5) to rare (p = 0.04)
    targets = (rng.random((120, 6)) < [0.5, 0.3, 0.2, 0.1, 0.06, 0.04]).astype(np.float32)
    fractions = {"test": 0.2, "val": 0.2}
    parts = iterative_stratification(targets, fractions, seed=5)
    together = np.sort(np.concatenate(list(parts.values())))
    np.testing.assert_array_equal(together, np.arange(120))  # disjoint and complete
    assert all(abs(len(parts[n]) - 120 * f) <= 1 for n, f in fractions.items())
    assert shares_are_kept(parts, targets, {**fractions, "train": 0.6}, slack=1.0)
    again = iterative_stratification(targets, fractions, seed=5)
    assert all(np.array_equal(parts[n], again[n]) for n in parts)
    other = iterative_stratification(targets, fractions, seed=6)
    assert not all(np.array_equal(parts[n], other[n]) for n in parts)
    # The bound is one a random split of the same sizes does not keep.
    random_kept = []
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(120)
        random = {"test": order[:24], "val": order[24:48], "train": order[48:]}
        random_kept.append(shares_are_kept(random, targets, fractions, slack=1.0))
    assert not any(random_kept)


def test_iterative_stratification_by_hand():
    # Label 1 is the rarest (images 0 and 1): placed first. Each part wants 0.5 * 2 = 1 of
    # it, so the first goes to either (a tie) and the second to the other. Then each part
    # wants 2 - 1 = 1 more of label 0: images 2 and 3 go one to each. Image 4 (no label) goes
    # to either: both want 2.5 - 2 = 0.5 more images.
    # Whatever the seed: a random split puts images 0 and 1 together a third of the time.
    targets = np.array([[1, 1], [1, 1], [1, 0], [1, 0], [0, 0]])
    for seed in range(10):
        parts = iterative_stratification(targets, {"test": 0.5}, seed=seed)
        for name in ("train", "test"):
            chosen = set(parts[name].tolist())
            assert len(chosen & {0, 1}) == 1 and len(chosen & {2, 3}) == 1, (seed, chosen)
        assert len(parts["train"]) + len(parts["test"]) == 5


def test_a_zero_fraction_part_stays_empty():
    targets = np.eye(3)[np.arange(30) % 3]
    parts = iterative_stratification(targets, {"test": 0.0, "val": 0.5}, seed=1)
    assert len(parts["test"]) == 0 and len(parts["val"]) == 15


def test_the_shared_multi_label_food_file():
    if not (FOOD4 / "labels.csv").is_file():
        pytest.skip(f"{FOOD4} is absent (shared data is optional)")
    table = read_labels(FOOD4 / "labels.csv", FOOD4)
    assert table.classes == ("pizza", "ramen", "steak", "sushi")
    assert len(table) == 800 and table.bad_rows == () and table.multi_label
    parts = split_labels(table, 0.1, None, seed=0)
    assert (len(parts.train) + len(parts.val), len(parts.test)) == (600, 200)
    # val holds a tenth of the train rows of each food, to within one image
    with_food = class_counts(parts.val) + class_counts(parts.train)
    assert np.all(np.abs(class_counts(parts.val) - 0.1 * with_food) <= 1), with_food
