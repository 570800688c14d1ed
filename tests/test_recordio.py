"""``gluon-ft pack`` and ``--data PREFIX``: same classes, labels and pixels as the folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image

from gluon_ft.data.decode import load_image
from gluon_ft.data.folders import scan_dataset
from gluon_ft.data.loaders import make_loader, set_epoch
from gluon_ft.data.recordio import load_pack, manifest_path, pack_dataset, split_paths
from gluon_ft.data.transforms import TrainTransform
from gluon_ft.train import TrainConfig, load_dataset, train


@pytest.fixture
def folder(tmp_path):
    # Class folders created out of order: the class list is the sorted names, as for folders.
    root = write_image_folder(tmp_path / "data", classes=("zebra", "ant", "moth"), n_train=3)
    rng = np.random.default_rng(1)
    photo = np.clip(rng.normal(128, 40, size=(60, 90, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(photo).save(root / "train" / "ant" / "wide.jpg", quality=92)
    (root / "train" / "moth" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return root


def pack(cli, folder, prefix, *extra):
    done = cli("pack", str(folder), "--out", str(prefix), *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_pack_round_trip_keeps_classes_labels_and_pixels(folder, tmp_path, cli):
    prefix = tmp_path / "packs" / "small"
    done = pack(cli, folder, prefix, "--resize", "0")
    assert "skipped" in done.stdout and "broken.jpg" in done.stdout
    for split in ("train", "test"):
        assert all(p.is_file() for p in split_paths(prefix, split))

    folder_splits = scan_dataset(folder)
    packed_parts = load_dataset(str(prefix))  # the training code's own entry
    pack_splits = (packed_parts.train, packed_parts.test)
    for original, packed in zip(folder_splits, pack_splits):
        readable = [(p, label) for p, label in original.items if not p.endswith("broken.jpg")]
        assert packed.classes == original.classes == ("ant", "moth", "zebra")
        assert [label for _, label in packed.items] == [label for _, label in readable]
        assert [name for name, _ in packed.items] == [
            str(Path(p).relative_to(original.root)) for p, _ in readable
        ]
        for index, (path, _) in enumerate(readable):
            want = np.asarray(load_image(path), dtype=np.int16)
            got = np.asarray(packed.load(index), dtype=np.int16)
            assert got.shape == want.shape
            if path.endswith(".jpg"):  # an unresized JPEG is stored byte for byte
                assert np.array_equal(got, want)
            else:  # PNG -> quality-95 JPEG: close, not equal
                assert np.abs(got - want).mean() < 4, path


def test_pack_resizes_the_shorter_side_and_never_enlarges(folder, tmp_path):
    prefix = tmp_path / "p"
    pack_dataset(folder, prefix, resize=30)
    packed, _ = load_pack(prefix)
    sizes = {name: packed.load(i).size for i, (name, _) in enumerate(packed.items)}
    assert sizes["ant/wide.jpg"] == (45, 30)  # 90x60 -> shorter side 30, aspect kept
    assert sizes["ant/000.png"] == (30, 30)  # 40x40 -> 30x30
    manifest = json.loads(manifest_path(prefix).read_text())
    assert manifest["resize"] == 30 and manifest["classes"] == ["ant", "moth", "zebra"]

    small = tmp_path / "keep"
    pack_dataset(folder, small)  # default 256: these small images keep their size
    assert load_pack(small)[0].load(0).size == (40, 40)


def test_loader_gives_the_same_batches_with_worker_processes(folder, tmp_path):
    prefix = tmp_path / "p"
    pack_dataset(folder, prefix)
    packed, _ = load_pack(prefix)

    def batches(workers):
        loader = make_loader(packed, TrainTransform(24), 4, shuffle=True, seed=3, workers=workers)
        set_epoch(loader, 1)
        return [(images.copy(), labels.copy()) for images, labels, _ in loader]

    alone, forked = batches(0), batches(2)  # each worker opens the .rec file for itself
    assert len(alone) == len(forked) == 3
    for (a_img, a_lab), (f_img, f_lab) in zip(alone, forked):
        assert np.array_equal(a_img, f_img) and np.array_equal(a_lab, f_lab)


def test_train_reads_a_pack_with_the_folder_classes(folder, tmp_path):
    prefix = tmp_path / "p"
    pack_dataset(folder, prefix)
    out = tmp_path / "run"
    config = TrainConfig(
        data=str(prefix), pretrained="none", epochs=1, batch_size=4, image_size=32,
        ctx="cpu", out=str(out), progress=False,
    )  # fmt: skip
    train(config)
    assert json.loads((out / "classes.json").read_text()) == ["ant", "moth", "zebra"]
    config = json.loads((out / "config.json").read_text())
    assert config["train_size"] == 3 * 3 + 1  # the broken file was left out at pack time


def test_pack_and_train_refuse_bad_input(tmp_path, cli):
    missing = cli("pack", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    root = write_image_folder(tmp_path / "d", n_train=1, n_test=1)
    pack_dataset(root, tmp_path / "p")
    split_paths(tmp_path / "p", "test")[0].unlink()
    broken = cli("train", "--data", str(tmp_path / "p"), "--out", str(tmp_path / "run"))
    assert broken.returncode == 2 and "incomplete" in broken.stderr
