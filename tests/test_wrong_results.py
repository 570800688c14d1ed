"""Silent wrong results, round 2: each test here failed before its fix.

Small and fast: tiny generated images, mobilenet0.25 from scratch, one or two epochs.
"""

from __future__ import annotations

import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from conftest import run_cli, tiny_config, write_class_folders, write_image_folder

import gluon_ft  # noqa: F401  (thread settings before mxnet)
from gluon_ft.train import train


def trained_weights(run_dir) -> dict[str, np.ndarray]:
    """``model.params`` without the BatchNorm running statistics, which no step reads."""
    saved = mx.nd.load(str(run_dir / "model.params"))
    return {name: value.asnumpy() for name, value in saved.items() if ".running_" not in name}


def optimizer_states(checkpoint) -> int:
    """How many parameters have an optimizer state (momentum) in ``checkpoint``."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    return sum(state is not None for state in meta["optimizer"]["states"].values())


def test_syncing_the_statistics_keeps_the_momentum_of_a_two_device_run(tmp_path):
    """``--sync-bn-stats`` writes running statistics only. Every step normalizes with its
    batch's statistics (no BatchNorm is frozen here), so the trained weights must come out
    bit for bit as without the sync; and each epoch's checkpoint must hold the momentum."""
    data = write_image_folder(tmp_path / "data", n_train=6, n_test=2, size=32)
    runs = {}
    for sync in (True, False):
        out = tmp_path / f"sync-{sync}"
        train(tiny_config(data, out, ctx="cpu:2", epochs=2, momentum=0.9, sync_bn_stats=sync))
        runs[sync] = out
    synced, alone = trained_weights(runs[True]), trained_weights(runs[False])
    assert synced.keys() == alone.keys() and len(synced) > 10
    differ = [name for name in synced if not np.array_equal(synced[name], alone[name])]
    assert differ == []
    # The sync did act: the saved statistics are the mean of the two devices' own.
    saved = {sync: mx.nd.load(str(runs[sync] / "model.params")) for sync in runs}
    stats = [name for name in saved[True] if ".running_" in name]
    assert any(
        not np.array_equal(saved[True][n].asnumpy(), saved[False][n].asnumpy()) for n in stats
    )
    for sync, out in runs.items():
        for epoch in ("epoch-0001", "epoch-0002"):
            assert optimizer_states(out / "checkpoints" / epoch) == len(synced), (sync, epoch)


def test_a_bfloat16_run_scores_its_test_part_in_float32_as_predict_does(tmp_path):
    """AMP holds for the whole training process; the end-of-run report must still score the
    test part as a fresh ``report`` (and ``predict``) does: in float32."""
    from gluon_ft.deploy.report import build_report
    from gluon_ft.isa import bfloat16_unsupported

    if bfloat16_unsupported():
        pytest.skip("this CPU has no bfloat16 instructions: --dtype bfloat16 is refused")
    data = write_image_folder(tmp_path / "data", n_train=4, n_test=4, size=32)
    out = tmp_path / "run"
    done = run_cli(  # a process of its own: AMP cannot be turned off again
        "train",
        *("--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--epochs", "1", "--batch-size", "4", "--image-size", "32", "--dtype", "bfloat16"),
        *("--out", str(out), "--no-progress"),
    )
    assert done.returncode == 0, done.stderr
    in_training = json.loads((out / "summary.json").read_text())
    fresh, _ = build_report(out, "test", out=tmp_path / "fresh")  # this process: no AMP
    assert in_training["test_loss"] == fresh["test_loss"]
    assert in_training["per_class"] == fresh["per_class"]


def drawn_keys(probabilities, epoch: int, shard: int = 0, num_shards: int = 1) -> list:
    from gluon_ft.data.loaders import EpochBatchSampler

    sampler = EpochBatchSampler(len(probabilities), 4, True, 3, shard, num_shards, probabilities)
    sampler.set_epoch(epoch)
    return [key for batch in sampler for key in batch]


def test_an_image_drawn_twice_by_the_balanced_sampler_gets_two_views(tmp_path):
    from gluon_ft.data.balance import balanced_probabilities
    from gluon_ft.data.folders import scan_split
    from gluon_ft.data.loaders import TransformedSplit
    from gluon_ft.data.transforms import TrainTransform

    data = write_class_folders(tmp_path / "photos", {"many": 10, "few": 2})
    split = scan_split(data)
    keys = drawn_keys(balanced_probabilities(split.labels()), epoch=1)
    indices = [key[0] for key in keys]
    twice = next(i for i in indices if indices.count(i) > 1)  # the 2 "few" share half the draws
    samples = TransformedSplit(split, TrainTransform(24), seed=3)
    views = [samples[key][0] for key in keys if key[0] == twice]
    assert not np.array_equal(views[0], views[1])
    # Each draw's view is the same whatever the number of workers that share the epoch.
    shards = [drawn_keys(balanced_probabilities(split.labels()), 1, r, 2) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(keys)


def test_a_shuffle_keeps_its_per_sample_seeds(tiny_data):
    """The uniform sampler's augmentation stays keyed by ``(seed, epoch, index)``."""
    from gluon_ft.data.folders import scan_split
    from gluon_ft.data.loaders import EpochBatchSampler, TransformedSplit
    from gluon_ft.data.transforms import TrainTransform

    split = scan_split(tiny_data / "train")
    sampler = EpochBatchSampler(len(split), 4, True, seed=3)
    sampler.set_epoch(2)
    keys = [key for batch in sampler for key in batch]
    assert all(len(key) == 2 for key in keys)
    transform = TrainTransform(24)
    samples = TransformedSplit(split, transform, seed=3)
    for index, epoch in keys[:3]:
        expected = transform(split.load(index), np.random.default_rng([3, epoch, index]))
        np.testing.assert_array_equal(samples[(index, epoch)][0], expected)


def test_cached_balanced_training_equals_uncached_when_views_cover_the_epochs(tmp_path):
    """The feature cache holds each epoch's draws, so an image drawn twice gets two views
    there too, the ones the uncached run computes."""
    data = write_image_folder(tmp_path / "data", n_train=5, n_test=2, size=32)
    settings = dict(freeze="features", epochs=2, lr=0.5, seed=7, sampler="balanced")
    runs = {}
    for cached in (False, True):
        out = tmp_path / f"cached-{cached}"
        extra = dict(cache_features=True, cache_views=2) if cached else {}
        runs[cached] = train(tiny_config(data, out, **settings, **extra))["history"], out
    (plain, plain_out), (cached, cached_out) = runs[False], runs[True]
    for row, other in zip(plain, cached):
        assert row["loss"] == pytest.approx(other["loss"], rel=1e-5, abs=1e-6)
    heads = [mx.nd.load(str(out / "model.params")) for out in (plain_out, cached_out)]
    for name in (n for n in heads[0] if n.startswith("output.")):
        np.testing.assert_allclose(heads[0][name].asnumpy(), heads[1][name].asnumpy(), 1e-4, 1e-6)


def test_a_class_of_three_reaches_val_and_test_and_a_smaller_one_is_named(tmp_path):
    from gluon_ft.data.splits import parts_from_record, split_dataset

    data = write_class_folders(tmp_path / "photos", {"big": 20, "three": 3, "two": 2})
    parts = split_dataset(data, None, None, seed=0)  # 0.1 each: 3 and 2 round to none
    per_part = {
        name: np.bincount(p.labels(), minlength=3).tolist() for name, p in parts.named().items()
    }
    assert per_part == {"train": [16, 1, 2], "val": [2, 1, 0], "test": [2, 1, 0]}
    record = parts.record(seed=0)
    assert record["absent_from"] == {"test": ["two"], "val": ["two"]}
    [line] = parts.warnings()
    assert "class two has 2 image(s)" in line and "cannot be validated or tested" in line
    # A resumed run or a report rebuilds the parts from split.json, and keeps what it says.
    assert parts_from_record(data, record).record(seed=0) == record


def copy_file(source, target) -> None:
    target.write_bytes(source.read_bytes())


def test_byte_identical_files_stay_in_one_part_and_are_counted(tmp_path):
    from gluon_ft.data.splits import split_dataset

    data = write_class_folders(tmp_path / "photos", {"ant": 10, "bee": 10})
    for i in range(10):  # every ant under a second name
        copy_file(data / "ant" / f"{i:03d}.png", data / "ant" / f"copy-{i:03d}.png")
    parts = split_dataset(data, 0.2, 0.2, seed=0)
    part_of = {
        Path(path).relative_to(data).as_posix(): name
        for name, part in parts.named().items()
        for path, _ in part.items
    }
    crossing = [
        i for i in range(10) if part_of[f"ant/{i:03d}.png"] != part_of[f"ant/copy-{i:03d}.png"]
    ]
    assert crossing == []
    assert parts.record()["duplicates"] == {"groups": 10, "files": 20, "across_folders": 0}
    assert "10 group(s) of byte-identical files (20 files)" in parts.warnings()[0]
    # Each group counts once in its class's shares: 10 ants, 2 held out for each part.
    assert sum(part_of[f"ant/{i:03d}.png"] == "test" for i in range(10)) == 2


def test_copies_across_your_own_train_and_test_folders_are_reported(tmp_path, capsys):
    from gluon_ft.cli import main

    data = write_image_folder(tmp_path / "d", n_train=4, n_test=2, size=32)
    copy_file(data / "train" / "cat" / "000.png", data / "test" / "cat" / "copied.png")
    out = tmp_path / "run"
    train(tiny_config(data, out, progress=True))
    printed = capsys.readouterr().out
    assert printed.count("1 group(s) of byte-identical files (2 files)") == 1
    assert "1 of them span the train/ and test/" in printed
    record = json.loads((out / "split.json").read_text())
    assert record["duplicates"] == {"groups": 1, "files": 2, "across_folders": 1}
    assert main(["check-data", str(data), "--image-size", "32"]) == 0
    assert "train/cat/000.png = test/cat/copied.png" in capsys.readouterr().out


def test_predict_and_serve_take_the_runs_own_tta_unless_told(tmp_path, monkeypatch, capsys):
    import sys
    import types

    import gluon_ft.deploy.serve as serve_module
    from gluon_ft.cli import main
    from gluon_ft.deploy.predict import Predictor

    data = write_image_folder(tmp_path / "data", n_train=4, n_test=2, size=36)
    run = tmp_path / "run"
    # resnet18_v1: mobilenet0.25 from scratch gives every view the same output here.
    train(tiny_config(data, run, model="resnet18_v1", tta=2))
    assert Predictor(run).tta == 2 and Predictor(run, tta=1).tta == 1
    image = str(data / "test" / "cat" / "000.png")
    assert main(["predict", run.as_posix(), image, "--json"]) == 0
    by_default = json.loads(capsys.readouterr().out)[0]["top"]
    assert main(["predict", run.as_posix(), image, "--json", "--tta", "1"]) == 0
    plain = json.loads(capsys.readouterr().out)[0]["top"]
    expected = Predictor(run, tta=2).predict_images([image])[0]["top"]
    assert by_default == expected and plain != expected
    served = []
    monkeypatch.setattr(
        serve_module, "create_app", lambda predictor, *a, **k: served.append(predictor)
    )
    monkeypatch.setitem(sys.modules, "uvicorn", types.SimpleNamespace(run=lambda *a, **k: None))
    assert main(["serve", run.as_posix()]) == 0
    assert main(["serve", run.as_posix(), "--tta", "1"]) == 0
    assert [predictor.tta for predictor in served] == [2, 1]


def test_head_epochs_are_scored_with_the_runs_tta_like_the_later_ones(tmp_path):
    """``--recipe best`` picks its best epoch among the head epochs and the later ones: all
    must be scored alike, on the mean logits of the ``--tta`` views."""
    from test_tta import log_softmax, logits_by_hand, val_images

    from gluon_ft.model.graft import build_model

    source = build_model("resnet18_v1", 3)  # mobilenet0.25 barely tells a view from its flip
    source.initialize(mx.init.Xavier())
    source(mx.nd.zeros((1, 3, 32, 32)))
    source.save_parameters(str(tmp_path / "source.params"))
    data = write_image_folder(tmp_path / "data", n_train=6, n_test=2, size=36)
    run = tmp_path / "run"
    settings = dict(model="resnet18_v1", pretrained=str(tmp_path / "source.params"), tta=2)
    settings.update(head_epochs=1, epochs=2, val_split=0.5, momentum=0.9, lr=0.001)
    head_row = train(tiny_config(data, run, **settings))["history"][0]
    images, labels = val_images(run)
    params = run / "checkpoints" / "epoch-0001" / "model.params"
    plain = logits_by_hand(run, params, images, flip=False)
    mean = (plain + logits_by_hand(run, params, images, flip=True)) / 2
    for logits, matches in ((mean, True), (plain, False)):
        loss = -log_softmax(logits)[np.arange(len(labels)), labels].mean()
        assert bool(head_row["val_loss"] == pytest.approx(loss, rel=1e-5)) is matches


def test_class_weights_and_the_balanced_sampler_together_are_refused(tmp_path, capsys):
    from gluon_ft.cli import main

    data = write_class_folders(tmp_path / "photos", {"many": 8, "few": 3})
    out = tmp_path / "run"
    flags = ["train", "--data", str(data), "--out", str(out), "--image-size", "32"]
    flags += ["--model", "mobilenet0.25", "--pretrained", "none", "--epochs", "1", "--no-progress"]
    code = main([*flags, "--class-weights", "auto", "--sampler", "balanced"])
    message = capsys.readouterr().err
    assert code == 2 and "correct it twice" in message and "Pass one of them" in message
    assert "Traceback" not in message and not out.exists()
