"""``--head-epochs``, ``--bn inference`` and ``--recipe``: what each changes, and nothing else.

Every run is mobilenet0.25 at 32 px from a random "pretrained" file (the mechanics, not the
accuracy: the table in docs/recipes.md measures that on real photos).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import conftest
import mxnet as mx
import numpy as np
import pytest
from conftest import record_steps, write_image_folder

from gluon_ft.cli import build_parser, main
from gluon_ft.cli.recipe import parse_command_line
from gluon_ft.cli.train import config_from
from gluon_ft.errors import Interrupted, UsageError
from gluon_ft.model.freeze import FreezePlan, is_batchnorm
from gluon_ft.model.graft import build_model, walk_blocks
from gluon_ft.train import TrainConfig, train
from gluon_ft.train.config import BEST_FEW_SHOT, RECIPE_PRESETS, flags_of, recipe_preset
from gluon_ft.train.schedule import LrSchedule

STEPS_PER_EPOCH = 3  # 12 train images in batches of 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Two colour classes, and a random mobilenet0.25 of 3 classes as the source."""
    root = tmp_path_factory.mktemp("recipe")
    data = write_image_folder(root / "data", n_train=6, n_test=2, size=36)
    net = build_model("mobilenet0.25", 3)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    source = root / "source.params"
    net.save_parameters(str(source))
    return {"data": data, "source": source, "root": root}


def config(setup: dict, out: Path, **changes) -> TrainConfig:
    settings = {"pretrained": str(setup["source"]), "ctx": "cpu", "epochs": 2, "momentum": 0.9}
    return conftest.tiny_config(setup["data"], out, **{**settings, **changes})


def arrays(path: Path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def body(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in params.items() if k.startswith("features.")}


def test_head_epochs_train_the_head_alone_on_cached_features_then_everything(setup, tmp_path):
    one = tmp_path / "one"
    result = train(config(setup, one, head_epochs=1))
    first, second = result["history"]
    assert first["trainable_params"] == 2 * 256 + 2 and "unfrozen" not in first  # the head
    assert second["unfrozen"] == ["all"] and second["trainable_params"] > 100_000
    source = body(arrays(setup["source"]))
    after_head = body(arrays(one / "checkpoints" / "epoch-0001" / "model.params"))
    assert all(np.array_equal(source[k], after_head[k]) for k in source)  # BatchNorm too
    finished = body(arrays(one / "model.params"))
    assert any(not np.array_equal(source[k], finished[k]) for k in source)
    assert json.loads((one / "config.json").read_text())["feature_cache"] is not None

    # The head epoch is exactly a --freeze features --cache-features epoch.
    frozen = tmp_path / "frozen"
    train(config(setup, frozen, epochs=1, freeze="features", cache_features=True))
    head = arrays(one / "checkpoints" / "epoch-0001" / "model.params")
    assert all(np.array_equal(head[k], v) for k, v in arrays(frozen / "model.params").items())


def test_head_epochs_resume_exact_after_a_stop_in_either_phase(setup, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(config(setup, whole, head_epochs=1, epochs=3))
    for stop_after in (2, STEPS_PER_EPOCH + 2):  # in the head epoch, then in the body's
        run = tmp_path / f"stopped-{stop_after}"
        record_steps(monkeypatch, signal_after=stop_after, signum=signal.SIGINT)
        with pytest.raises(Interrupted):
            train(config(setup, run, head_epochs=1, epochs=3))
        monkeypatch.undo()
        train(config(setup, run, head_epochs=1, epochs=3, resume=True))
        want, got = arrays(whole / "model.params"), arrays(run / "model.params")
        assert all(np.array_equal(want[k], got[k]) for k in want), stop_after


def test_head_epochs_with_bn_train_reestimate_batchnorm_on_the_images(setup, tmp_path):
    run = tmp_path / "run"
    result = train(config(setup, run, head_epochs=1, epochs=1, bn="train"))
    assert result["history"][0]["trainable_params"] > 2 * 256 + 2  # the head and BatchNorm
    before, after = arrays(setup["source"]), arrays(run / "model.params")
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    gammas = [k for k in before if k.endswith(("gamma", "beta")) and k.startswith("features.")]
    convs = [k for k in before if k.startswith("features.") and k not in stats + gammas]
    assert stats and all(not np.array_equal(before[k], after[k]) for k in stats)
    assert any(not np.array_equal(before[k], after[k]) for k in gammas)
    assert convs and all(np.array_equal(before[k], after[k]) for k in convs)
    assert json.loads((run / "config.json").read_text())["feature_cache"] is None


def test_the_schedule_starts_after_the_head_epochs():
    schedule = LrSchedule(0.1, "cosine", epochs=3, steps_per_epoch=2, start_epoch=1)
    rates = [schedule.lr(e, s) for e in range(3) for s in range(2)]
    assert rates[:2] == [0.1, 0.1]  # the head epoch: the base rate
    plain = LrSchedule(0.1, "cosine", epochs=2, steps_per_epoch=2)
    assert rates[2:] == [plain.lr(e, s) for e in range(2) for s in range(2)]


def test_bn_inference_normalizes_with_fixed_running_statistics_while_gamma_learns(setup, tmp_path):
    run = tmp_path / "run"
    train(config(setup, run, epochs=1, bn="inference"))
    before, after = arrays(setup["source"]), arrays(run / "model.params")
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    gammas = [k for k in before if k.endswith("gamma") and k.startswith("features.")]
    assert stats and all(np.array_equal(before[k], after[k]) for k in stats)
    assert any(not np.array_equal(before[k], after[k]) for k in gammas)
    # The plain run moves them: the test can fail.
    plain = tmp_path / "plain"
    train(config(setup, plain, epochs=1))
    assert any(not np.array_equal(before[k], arrays(plain / "model.params")[k]) for k in stats)


def test_bn_inference_sets_every_batchnorm_on_running_statistics_and_keeps_it_when_opening():
    net = build_model("mobilenet0.25", 2)
    net.initialize()
    plan = FreezePlan(bn="inference", head_epochs=1)
    plan.setup(net)
    plan.at_epoch(net, 1)
    layers = [b for _, b in walk_blocks(net) if is_batchnorm(b)]
    assert layers and all(b._kwargs["use_global_stats"] for b in layers)
    assert all(p.grad_req == "write" for p in net.collect_params(".*gamma").values())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"head_epochs": 3}, "--head-epochs must be between 0 and --epochs"),
        ({"head_epochs": 1, "cache_features": True}, "pass one of them"),
        ({"head_epochs": 1, "unfreeze_at": "0:output"}, "not both"),
        ({"head_epochs": 1, "pretrained": "none"}, "from scratch"),
        ({"recipe": "best", "pretrained": "none"}, "fine-tunes a pretrained network"),
    ],
)
def test_refusals(setup, tmp_path, changes, message):
    with pytest.raises(UsageError, match=message):
        config(setup, tmp_path / "run", **changes).validate()
    assert not (tmp_path / "run").exists()


def test_recipe_best_resolves_to_its_preset_and_explicit_settings_win():
    best = TrainConfig(recipe="best")
    applied = best.apply_recipe(given={"tta", "wd"})
    assert "tta" not in applied and "wd" not in applied
    preset = RECIPE_PRESETS["best"]
    for name, value in preset.items():
        if name in ("lr", "tta", "wd"):
            continue
        assert getattr(best, name) == value, name
    assert best.tta == 1 and best.wd == TrainConfig().wd
    assert best.lr_find == (preset.get("lr") == "find")
    assert TrainConfig().apply_recipe() == {}  # the book's recipe sets nothing


def command_line_config(words: list[str]) -> TrainConfig:
    return config_from(parse_command_line(build_parser(), words))


def test_given_flags_are_those_on_the_command_line_whatever_their_values(capsys):
    words = ["train", "--data", "d", "--tta", "1", "--lr", "0.01", "--recipe", "best"]
    config = command_line_config(words)
    # Given, though equal to the built-in defaults: the preset's tta 2 and lr-find do not apply.
    assert (config.data, config.tta, config.lr, config.lr_find) == ("d", 1, 0.01, False)
    preset = RECIPE_PRESETS["best"]
    applied = {name: value for name, value in preset.items() if name not in ("lr", "tta")}
    assert all(getattr(config, name) == value for name, value in applied.items())
    assert capsys.readouterr().err == f"gluon-ft: --recipe best: {flags_of(applied)}\n"
    # Not given: the preset's values, before the built-in defaults.
    config = command_line_config(["train", "--recipe", "best"])
    assert not config.lr_find and config.lr == preset["lr"] and config.tta == preset["tta"]
    assert config.recipe_shape.startswith("many: unknown")  # no folder to count: many
    assert capsys.readouterr().err == f"gluon-ft: --recipe best: {flags_of(preset)}\n"
    assert command_line_config(["train", "--recipe", "book"]) == TrainConfig()


def test_train_help_writes_the_preset_out(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--head-epochs 1" in help_text and "--optimizer adamw" in help_text


def test_recipe_best_on_the_command_line_writes_its_settings_and_the_measured_lr(setup, tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            *("--data", str(setup["data"]), "--model", "mobilenet0.25"),
            *("--pretrained", str(setup["source"]), "--image-size", "32", "--ctx", "cpu"),
            *("--epochs", "2", "--batch-size", "4", "--recipe", "best", "--tta", "1"),
            *("--out", str(out), "--no-progress"),
        ]
    )
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    for name, value in BEST_FEW_SHOT.items():  # 6 train images a class: the few-shot preset
        if name not in ("lr", "tta"):
            assert saved[name] == value, name
    assert saved["recipe_shape"].startswith("few-shot: 6 < 50")
    assert saved["tta"] == 1  # given explicitly: the preset's 2 does not apply
    found = json.loads((out / "lr_find.json").read_text())
    assert saved["lr_find"] and saved["lr"] == found["suggestion"] != TrainConfig().lr
    assert (out / "lr_find.png").stat().st_size > 0
    rates = [row["lr"] for row in json.loads((out / "metrics.json").read_text())]
    assert rates[0] == pytest.approx(found["suggestion"])  # the head epoch: the base rate


def test_recipe_best_on_two_devices_resumes_exactly(setup, tmp_path, monkeypatch):
    """The whole preset (its lr-find, head epoch, AdamW, --bn inference, TTA) on cpu:2,
    stopped in epoch 2 and resumed: the same weights as the run that was never stopped."""

    def best(out: Path, **changes) -> TrainConfig:
        chosen = config(setup, out, ctx="cpu:2", epochs=3, recipe="best", **changes)
        chosen.apply_recipe(given={"momentum", "ctx", "epochs", "resume"})
        return chosen

    whole = tmp_path / "whole"
    train(best(whole))
    lr_find_steps = len(json.loads((whole / "lr_find.json").read_text())["lrs"])
    run = tmp_path / "stopped"
    record_steps(monkeypatch, signal_after=lr_find_steps + STEPS_PER_EPOCH + 2)
    with pytest.raises(Interrupted):
        train(best(run))
    monkeypatch.undo()
    train(best(run, resume=True))
    want, got = arrays(whole / "model.params"), arrays(run / "model.params")
    assert all(np.array_equal(want[k], got[k]) for k in want)
    saved = json.loads((run / "config.json").read_text())
    assert saved["lr"] == json.loads((whole / "config.json").read_text())["lr"]


def test_adapt_bn_sets_running_statistics_to_the_mean_of_the_batches_and_nothing_else():
    from gluon_ft.train.adabn import adapt_batchnorm

    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.BatchNorm(in_channels=3), mx.gluon.nn.Conv2D(4, 3, in_channels=3))
    net.add(mx.gluon.nn.BatchNorm(in_channels=4))
    net.initialize()
    for param in net.collect_params().values():
        param.grad_req = "null"  # a frozen body: its BatchNorm statistics move all the same
    net[0]._kwargs["use_global_stats"] = True  # --bn inference: restored after
    net.hybridize(static_alloc=True, static_shape=True)
    net(mx.nd.zeros((1, 3, 8, 8)))
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), None) for _ in range(3)]
    gamma = net[2].gamma.data().asnumpy().copy()
    assert (
        adapt_batchnorm(
            net, batches, mx.cpu(), prepare=lambda x: x.astype("float32").transpose((0, 3, 1, 2))
        )
        == 3
    )
    means = [b.astype(np.float64).mean(axis=(0, 1, 2)) for b, _ in batches]
    variances = [b.astype(np.float64).var(axis=(0, 1, 2)) for b, _ in batches]
    np.testing.assert_allclose(net[0].running_mean.data().asnumpy(), np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(
        net[0].running_var.data().asnumpy(), np.mean(variances, 0), rtol=1e-3
    )
    assert np.array_equal(net[2].gamma.data().asnumpy(), gamma)
    assert net[0]._kwargs["use_global_stats"] and net[0]._kwargs["momentum"] == 0.9
    assert not np.allclose(net[2].running_var.data().asnumpy(), 1.0)  # the second moved too


def test_precise_bn_changes_only_the_running_statistics_of_the_last_epoch(setup, tmp_path):
    plain, precise = tmp_path / "plain", tmp_path / "precise"
    train(config(setup, plain, epochs=1))
    train(config(setup, precise, epochs=1, precise_bn=True))
    want, got = arrays(plain / "model.params"), arrays(precise / "model.params")
    stats = [k for k in want if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not np.array_equal(want[k], got[k]) for k in stats)
    assert all(np.array_equal(want[k], got[k]) for k in want if k not in stats)


def test_recipe_best_chooses_its_preset_by_the_images_a_class(tmp_path):
    from gluon_ft.data.folders import images_per_class

    assert recipe_preset("best", 20)[0] is BEST_FEW_SHOT
    assert recipe_preset("best", 100)[0] is RECIPE_PRESETS["best"] is recipe_preset("best")[0]
    assert recipe_preset("best", 100)[0]["bn"] == "train" != BEST_FEW_SHOT["bn"]
    assert recipe_preset("book", 20) == ({}, None)
    data = write_image_folder(tmp_path / "data", n_train=3, n_test=1, size=8)
    assert images_per_class(str(data)) == 3 and images_per_class(str(tmp_path / "no")) is None
    words = ["train", "--data", str(data), "--recipe", "best"]
    chosen = command_line_config(words)
    assert chosen.bn == "inference" and chosen.recipe_shape.startswith("few-shot")
    assert command_line_config([*words, "--bn", "train"]).bn == "train"  # given wins
    many = write_image_folder(tmp_path / "many", n_train=50, n_test=1, size=8)
    words = ["train", "--data", str(many), "--recipe", "best"]
    chosen = command_line_config(words)
    assert (chosen.bn, chosen.lr_spread, chosen.layer_lr_decay) == ("train", 50.0, None)
    assert chosen.recipe_shape.startswith("many: 50 images")
    decay = command_line_config([*words, "--layer-lr-decay", "0.5"])  # replaces the groups
    assert (decay.lr_spread, decay.layer_lr_decay) == (None, 0.5)


def test_recipe_best_counts_a_labels_file_by_its_train_rows(tmp_path):
    from gluon_ft.train.config import task_images_per_class

    rows = ["image,labels,split", "a.png,cat dog,train", "b.png,dog,", "c.png,cat,test"]
    rows += [f"t{i}.png,bird;x,val" for i in range(60)]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    # Train rows only (split train or empty): cat 1, dog 2; the folder's files do not count.
    assert task_images_per_class(str(tmp_path), str(labels)) == 1.5
    (tmp_path / "images").mkdir()
    for i in range(60):
        (tmp_path / "images" / f"{i}.png").write_bytes(b"")
    words = ["train", "--data", str(tmp_path), "--labels", str(labels), "--recipe", "best"]
    assert command_line_config(words).recipe_shape.startswith("few-shot: 1.5 < 50")
    semicolons = [*words, "--label-delim", ";"]
    # Split by ";": "cat dog" is one class, "dog" another.
    assert task_images_per_class(str(tmp_path), str(labels), ";") == 1.0
    assert command_line_config(semicolons).recipe_shape.startswith("few-shot")
    assert task_images_per_class(str(tmp_path), str(tmp_path / "missing.csv")) is None
