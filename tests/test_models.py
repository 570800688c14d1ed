"""The model catalogue: names, defaults, weight files, source loading and `gluon-ft models`."""

from __future__ import annotations

import json
import os

import mxnet as mx
import numpy as np
import pytest
from conftest import run_cli, write_image_folder

from gluon_ft.errors import UsageError
from gluon_ft.model import zoo
from gluon_ft.model.graft import (
    build_model,
    global_average_pooling,
    graft_new_head,
    load_source_model,
    walk_blocks,
)
from gluon_ft.train import TrainConfig, train

ALL_MODELS = os.environ.get("GLUON_FT_ALL_MODELS") == "1"
# One name per exception of the store lookup, per zoo, plus the book's.
STORE_SAMPLE = ["resnet18_v2", "squeezenet1.0", "resnet50_v1d", "mobilenetv3_small", "hrnet_w18_c"]


def test_catalogue_holds_the_classifiers_of_both_zoos_and_nothing_else():
    names = zoo.model_names()
    assert len(names) == len(set(names))
    for name in ["resnet18_v2", "squeezenet1.1", "inceptionv3", "vgg16_bn", "mobilenetv2_1.0"]:
        assert zoo.lookup(name).zoo == zoo.GLUON
    for name in ["resnet50_v1d", "resnest50", "mobilenetv3_large", "hrnet_w18_c", "googlenet"]:
        assert zoo.lookup(name).zoo == zoo.GLUONCV
    left_out = [
        "ssd_300_vgg16_atrous_voc",  # detection
        "deeplab_resnet101_coco",  # segmentation
        "simple_pose_resnet18_v1b",  # pose
        "resnet50_v1b_kinetics400",  # video
        "cifar_resnet20_v1",  # CIFAR-10, 32 px
        "resnet50_v1_int8",  # quantized
        "resnet50_v1b_gn",  # GroupNorm fails under hybridize
        "resnet50_v1d_0.86",  # pruned: ignores classes
        "hrnet_w48_s",  # segmentation
    ]
    assert not set(left_out) & set(names)


def test_lookup_is_case_insensitive_and_explains_what_is_left_out():
    assert zoo.lookup(" ResNet50_V1D ").name == "resnet50_v1d"
    with pytest.raises(UsageError, match="CIFAR-10"):
        zoo.lookup("cifar_resnet20_v1")
    with pytest.raises(UsageError, match="not an image classifier"):
        zoo.lookup("yolo3_darknet53_coco")
    with pytest.raises(UsageError, match="Did you mean: .*squeezenet1.0"):
        zoo.lookup("squeezenet1_0")


def test_defaults_per_model_input_size_and_the_books_resize_ratio():
    inception = zoo.lookup("inceptionv3")
    assert (inception.input_size, inception.test_resize) == (299, 342)
    book = zoo.lookup("resnet18_v2")
    assert (book.input_size, book.test_resize) == (224, 256)  # Resize(256), CenterCrop(224)
    assert zoo.lookup("resnest269").input_size == 416


def test_resnest_is_built_for_the_size_it_trains_at():
    """Its DropBlock masks are sized at construction; the training graph shows the mismatch."""
    with pytest.raises(UsageError, match="resnest26 cannot take 128 px images"):
        zoo.check_input_size(build_model("resnest26", 3), "resnest26", 128)
    zoo.check_input_size(build_model("resnest26", 3, image_size=128), "resnest26", 128)
    with pytest.raises(UsageError, match="resnest26 cannot take 32 px images"):  # 3x3 blocks
        zoo.check_input_size(build_model("resnest26", 3, image_size=32), "resnest26", 32)


def test_train_defaults_the_image_size_to_the_models():
    config = TrainConfig(model="inceptionv3")
    config.validate()
    assert config.image_size == 299
    chosen = TrainConfig(model="inceptionv3", image_size=96)
    chosen.validate()
    assert chosen.image_size == 96
    with pytest.raises(UsageError, match="Did you mean"):
        TrainConfig(model="inception_v3").validate()


def test_a_run_without_image_size_trains_at_the_models_size(tmp_path):
    """GoogLeNet's 299 px, end to end (config.json records it)."""
    data = write_image_folder(tmp_path / "data", n_train=2, n_test=1)
    config = TrainConfig(
        data=str(data),
        model="googlenet",
        pretrained="none",
        epochs=1,
        batch_size=4,
        ctx="cpu",
        out=str(tmp_path / "run"),
        progress=False,
    )
    result = train(config)
    saved = json.loads((result["run_dir"] / "config.json").read_text())
    assert saved["image_size"] == 299 and saved["model"] == "googlenet"
    assert len(result["history"]) == 1


def capture_store_requests(monkeypatch) -> list[str]:
    """Make both model stores record the weight file a constructor asks for, then stop."""
    from gluoncv.model_zoo import model_store as gluoncv_store
    from mxnet.gluon.model_zoo import model_store as gluon_store

    asked: list[str] = []

    def record(name, *args, **kwargs):
        asked.append(name)
        raise LookupError("recorded")

    monkeypatch.setattr(gluon_store, "get_model_file", record)
    monkeypatch.setattr(gluoncv_store, "get_model_file", record)
    return asked


@pytest.mark.parametrize(
    "name",
    [n for n in zoo.model_names() if zoo.lookup(n).weights_published]
    if ALL_MODELS
    else STORE_SAMPLE,
)
def test_store_file_is_the_one_the_zoo_loads(name, monkeypatch):
    from gluoncv.model_zoo import model_store as gluoncv_store
    from mxnet.gluon.model_zoo import model_store as gluon_store

    asked = capture_store_requests(monkeypatch)
    with pytest.raises(LookupError, match="recorded"):
        zoo.build(name, 1000, pretrained=True, root="unused")
    store = gluon_store if zoo.lookup(name).zoo == zoo.GLUON else gluoncv_store
    assert [f"{n}-{store.short_hash(n)}.params" for n in asked] == [zoo.model_store_file(name).name]


@pytest.mark.parametrize("name", ["shufflenet_v1", "residualattentionnet56", "resnet50_v1e"])
def test_imagenet_weights_that_do_not_exist_are_refused(name, monkeypatch):
    """GluonCV returns random weights for the first two and the v1d file for the third."""
    asked = capture_store_requests(monkeypatch)
    with pytest.raises(UsageError, match="no published ImageNet weights"):
        load_source_model(name, "imagenet")
    assert asked == []
    assert zoo.weights_status(name) == "none"


def test_missing_imagenet_weights_name_the_file_to_provide():
    with pytest.raises(UsageError) as err:
        load_source_model("resnet50_v1d", "imagenet")  # offline, and MXNET_HOME is empty
    assert str(zoo.model_store_file("resnet50_v1d")) in str(err.value)


def test_params_file_of_a_conv_head_network_is_a_source(tmp_path):
    """The class count is read from the head's path in the file (``output.0.weight``)."""
    source = load_source_model("mobilenetv3_small", "none")
    source.net(mx.nd.zeros((1, 3, 32, 32)))
    net = graft_new_head(source, 3)
    path = tmp_path / "mnv3.params"
    net.save_parameters(str(path))
    loaded = load_source_model("mobilenetv3_small", str(path))
    assert loaded.num_classes == 3
    mx.nd.waitall()
    np.testing.assert_array_equal(
        loaded.net.output[0].weight.data().asnumpy(), net.output[0].weight.data().asnumpy()
    )


# ----------------------------------------------------------------------------- the command


def test_models_command_lists_family_input_params_and_weights(tmp_path, cli):
    done = cli("models", "squeezenet|inceptionv3", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == {"squeezenet1.0", "squeezenet1.1", "inceptionv3"}
    assert (rows["inceptionv3"]["input_size"], rows["inceptionv3"]["family"]) == (299, "Inception3")
    # torchvision counts 1,235,496 for SqueezeNet 1.1 and 23,834,568 for Inception v3 (no aux).
    assert rows["squeezenet1.1"]["params"] == 1_235_496
    assert rows["inceptionv3"]["params"] == 23_834_568
    assert {row["weights"] for row in rows.values()} == {"not cached"}

    # A weight file in the model store (MXNET_HOME is this test's) shows as cached.
    target = zoo.model_store_file("squeezenet1.1")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"weights")
    done = cli("models", "squeezenet1.1")
    assert done.returncode == 0, done.stderr
    header, line = done.stdout.splitlines()
    assert header.split()[:4] == ["name", "zoo", "family", "input"]
    assert line.split() == ["squeezenet1.1", "gluon", "SqueezeNet", "224", "1.2M", "cached"]


def test_unknown_model_exits_2_with_the_closest_names(tiny_data, tmp_path, cli):
    # Without --out a run goes to ./runs/: run where that folder can be looked for.
    done = cli("train", "--model", "resnet18_v3", "--data", tiny_data, "--ctx", "cpu", cwd=tmp_path)
    assert done.returncode == 2
    assert "Unknown model 'resnet18_v3'" in done.stderr
    assert "Did you mean: resnet18_v2" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_models_command_unknown_pattern_and_excluded_model_exit_2(tiny_data, cli):
    done = cli("models", "nosuchnet")
    assert done.returncode == 2 and "No supported model matches" in done.stderr
    done = cli("train", "--model", "cifar_resnet20_v1", "--data", str(tiny_data))
    assert done.returncode == 2 and "CIFAR-10" in done.stderr


def test_image_size_too_small_for_the_model_exits_2(tiny_data, tmp_path, cli):
    """AlexNet's pools need more than 32 px: refused before any work, with the way out."""
    out = tmp_path / "run"
    done = cli(
        "train",
        *("--model", "alexnet", "--pretrained", "none", "--image-size", "32"),
        *("--data", str(tiny_data), "--ctx", "cpu", "--epochs", "1", "--out", str(out)),
    )
    assert done.returncode == 2, done.stderr
    assert "alexnet cannot take 32 px images" in done.stderr
    assert "--image-size 224" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "metrics.json").exists()


def test_vgg_with_imagenet_shaped_weights_keeps_its_fixed_input():
    net = build_model("vgg11", 1000)
    net.features[21].weight.shape = (4096, 512 * 7 * 7)  # its first Dense, as ImageNet's
    with pytest.raises(UsageError, match="vgg11 cannot take 64 px images"):
        zoo.check_input_size(net, "vgg11", 64)
    zoo.check_input_size(net, "vgg11", 224)


@pytest.mark.parametrize(
    ("name", "size"), [("squeezenet1.1", 224), ("densenet121", 224), ("inceptionv3", 299)]
)
def test_global_pooling_changes_nothing_at_the_native_size(name, size):
    """The fixed final pool becomes global average pooling: the same output at its size."""
    mx.random.seed(0)
    net = zoo.build(name, 5)  # as the zoo builds it, with its fixed-size pool
    net.initialize(mx.init.Xavier())
    x = mx.nd.random.uniform(shape=(1, 3, size, size))
    before = net(x).asnumpy()
    replaced = global_average_pooling(net, size)
    assert len(replaced) == 1
    assert type(dict(walk_blocks(net))[replaced[0]]) is mx.gluon.nn.GlobalAvgPool2D
    np.testing.assert_allclose(net(x).asnumpy(), before, rtol=0, atol=1e-6)
    # built by gluon-ft, it takes small images (Inception v3's convolutions need 75 px)
    small = 75 if name == "inceptionv3" else 32
    zoo.check_input_size(build_model(name, 5), name, small)


def test_densenet_trains_at_64_px(tmp_path, cli):
    """Once refused below 224 px (its 7x7 final pool), now one epoch of 64 px images (one
    step: 4 training images, 2 test images)."""
    data = write_image_folder(tmp_path / "data", n_train=2, n_test=1, size=64)
    out = tmp_path / "run"
    done = cli(
        "train",
        *("--model", "densenet121", "--pretrained", "none", "--image-size", "64"),
        *("--data", str(data), "--ctx", "cpu", "--epochs", "1", "--batch-size", "4"),
        *("--out", str(out), "--no-progress"),
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics) == 1 and np.isfinite(metrics[0]["loss"])
    assert json.loads((out / "config.json").read_text())["image_size"] == 64


@pytest.mark.skipif(not ALL_MODELS, reason="lists every network: make test-all")
def test_models_command_lists_every_name():
    done = run_cli("models", "--json", timeout=900)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["name"] for row in rows] == zoo.model_names()
    assert all(row["params"] > 100_000 for row in rows)
