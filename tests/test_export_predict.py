"""Export (MXNet, ONNX) and predict on a tiny finished run."""

from __future__ import annotations

import json
import re
import shutil

import mxnet as mx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from PIL import Image

from gluon_ft import isa
from gluon_ft.cli import main
from gluon_ft.data.decode import load_image
from gluon_ft.data.transforms import TestTransform, normalize_batch
from gluon_ft.deploy import export as gexport
from gluon_ft.deploy import inference
from gluon_ft.deploy.predict import Predictor, load_run
from gluon_ft.errors import UsageError
from gluon_ft.model.graft import build_model

HAS_BF16 = isa.bfloat16_unsupported() is None


@pytest.fixture
def finished(image_folder, trained_run):
    """A trained 2-class mobilenet0.25 run at 32 px (once per session), and its data."""
    data = image_folder(n_train=6, n_test=2, size=40)
    return trained_run(data).path, data


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """An untrained resnet18_v2 run directory (residual adds, max pooling) at 32 px."""
    run = tmp_path_factory.mktemp("resnet") / "run"
    run.mkdir()
    mx.random.seed(0)
    net = build_model("resnet18_v2", 3)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.save_parameters(str(run / "model.params"))
    (run / "config.json").write_text(json.dumps({"model": "resnet18_v2", "image_size": 32}))
    (run / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    return run


def test_mxnet_export_round_trip(finished, tmp_path):
    run, _ = finished
    result = gexport.export_run(run, "mxnet", tmp_path / "out")
    assert result["max_abs_diff"] <= gexport.MXNET_TOLERANCE
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["model-0000.params", "model-symbol.json", "preprocessing.json"]
    # Reload as a deployment would, and compare with the run's own network.
    block = mx.gluon.SymbolBlock.imports(
        str(tmp_path / "out" / "model-symbol.json"),
        ["data"],
        str(tmp_path / "out" / "model-0000.params"),
    )
    x = gexport.sample_input(32, count=3, seed=7)
    expected = load_run(run).net(x).asnumpy()
    assert np.abs(block(x).asnumpy() - expected).max() <= 1e-6
    info = json.loads((tmp_path / "out" / "preprocessing.json").read_text())
    assert info["classes"] == ["cat", "dog"] and info["crop"] == 32 and info["resize"] == 37


def test_onnx_export_round_trip_with_the_reference_evaluator(finished, tmp_path):
    run, _ = finished
    result = gexport.export_run(run, "onnx", tmp_path / "out")
    assert result["max_abs_diff"] <= 1e-4
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    # The reference evaluator as shipped (its own Conv), batch size 1: the batch is dynamic.
    x = gexport.sample_input(32, count=1, seed=7)
    got = ReferenceEvaluator(model).run(None, {"data": x.asnumpy()})[0]
    expected = load_run(run).net(x).asnumpy()
    assert got.shape == (1, 2) and np.abs(got - expected).max() <= 1e-4


def test_onnx_export_of_a_residual_network(resnet_run, tmp_path):
    result = gexport.export_run(resnet_run, "onnx", tmp_path / "out")
    assert result["max_abs_diff"] <= 1e-4 and result["files"] == [
        "model.onnx",
        "preprocessing.json",
    ]
    # Weights are initializers only, so that ONNX Runtime may fold and fuse them: an input
    # with an initializer is an overridable default it must leave alone.
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [graph_input.name for graph_input in model.graph.input] == ["data"]
    # Compared without the network's prefix (resnetv2N_), which counts networks built.
    initializers = {tensor.name.split("_", 1)[-1] for tensor in model.graph.initializer}
    weights = {name.split("_", 1)[1] for name in load_run(resnet_run).net.collect_params()}
    assert len(weights) == 98 and weights <= initializers, weights - initializers


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "attrs"),
    [
        ((2, 3, 9, 9), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
        ((1, 3, 11, 10), (5, 3, 7, 7), {"pads": [3, 3, 3, 3], "strides": [2, 2]}),
        ((1, 4, 8, 8), (4, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 4}),  # depthwise
        ((1, 4, 9, 9), (6, 2, 3, 3), {"pads": [0, 1, 2, 0], "group": 2, "strides": [2, 1]}),
        ((1, 2, 10, 10), (3, 2, 3, 3), {"dilations": [2, 2], "pads": [2, 1, 2, 1]}),
        ((1, 3, 5, 5), (2, 3, 1, 1), {}),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_fast_conv_matches_the_reference_conv(x_shape, w_shape, attrs, bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    inputs = ["X", "W", "B"] if bias else ["X", "W"]
    node = helper.make_node("Conv", inputs, ["Y"], **attrs)
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feeds = {"X": x, "W": w, "B": b} if bias else {"X": x, "W": w}
    expected = ReferenceEvaluator(model).run(None, feeds)[0]
    fast = ReferenceEvaluator(model, new_ops=[gexport.fast_conv_op()]).run(None, feeds)[0]
    assert fast.shape == expected.shape and fast.dtype == expected.dtype
    np.testing.assert_allclose(fast, expected, rtol=1e-5, atol=1e-5)


def test_export_command_verifies_and_reports_the_difference(finished, tmp_path, cli):
    run, _ = finished
    out = tmp_path / "deploy"
    result = cli("export", str(run), "--format", "all", "--out", str(out))
    assert result.returncode == 0, result.stderr
    diffs = dict(re.findall(r"^(\w+): wrote .* max abs diff (\S+) ", result.stdout, re.M))
    assert set(diffs) == {"mxnet", "onnx"}
    assert float(diffs["mxnet"]) <= 1e-6 and float(diffs["onnx"]) <= 1e-4
    assert "checked with onnx.reference.ReferenceEvaluator" in result.stdout
    assert {"model.onnx", "model-symbol.json", "model-0000.params"} <= {
        p.name for p in out.iterdir()
    }
    assert "Traceback" not in result.stderr


def test_a_failed_check_writes_nothing(finished, tmp_path, monkeypatch):
    run, _ = finished
    monkeypatch.setattr(gexport, "MXNET_TOLERANCE", -1.0)  # no difference can pass
    with pytest.raises(gexport.ExportCheckError, match="Nothing was written"):
        gexport.export_run(run, "mxnet", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="--format 'tflite'"):
        gexport.export_run(run, "tflite")


def test_predictor_uses_the_runs_network_classes_and_test_transform(finished):
    run, data = finished
    paths = sorted((data / "test").rglob("*.png"))
    predictor = Predictor(run)
    results = predictor.predict_images(paths, top_k=2)

    # The same pipeline, built by hand from the run's files.
    net = build_model("mobilenet0.25", 2)
    net.load_parameters(str(run / "model.params"))
    transform = TestTransform(json.loads((run / "config.json").read_text())["image_size"])
    batch = np.stack([transform(load_image(p)) for p in paths])
    probs = mx.nd.softmax(net(normalize_batch(mx.nd.array(batch, dtype="uint8"))))
    probs = probs.asnumpy()
    for result, path, row in zip(results, paths, probs):
        assert result["ok"] and result["source"] == str(path)
        top = result["top"]
        assert [t["class"] for t in top] == [["cat", "dog"][i] for i in np.argsort(-row)]
        np.testing.assert_allclose([t["probability"] for t in top], np.sort(row)[::-1], atol=1e-6)

    # Encoded bytes (an upload) and opened PIL images give the same answers as paths.
    as_bytes = predictor.predict_images([p.read_bytes() for p in paths], top_k=2)
    as_images = predictor.predict_images([Image.open(p) for p in paths], top_k=2)
    for by_path, by_bytes, by_image in zip(results, as_bytes, as_images):
        assert by_bytes["top"] == by_path["top"] == by_image["top"]
    assert as_bytes[0]["source"] == "<image 0>"


def test_one_bad_file_does_not_stop_the_others(finished, tmp_path, cli):
    run, data = finished
    good = data / "test" / "dog" / "000.png"
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not a photo")
    predictor = Predictor(run, batch_size=2)
    results = predictor.predict_images([good, bad, tmp_path / "missing.png", good], top_k=1)
    assert [r["ok"] for r in results] == [True, False, False, True]
    assert "not an image" in results[1]["error"] and "not found" in results[2]["error"]
    assert results[0]["top"] == results[3]["top"] and len(results[0]["top"]) == 1

    shown = cli("predict", str(run), str(good), str(bad), "--top-k", "5")
    assert shown.returncode == 2
    assert shown.stdout.startswith(f"{good}: ") and shown.stdout.count("\n") == 1
    assert re.search(r": (cat|dog) \d\.\d{3}, (cat|dog) \d\.\d{3}$", shown.stdout.strip())
    assert f"{bad}: error: not an image" in shown.stderr and "Traceback" not in shown.stderr

    as_json = cli("predict", str(run), str(good), str(bad), "--json")
    assert as_json.returncode == 2
    assert [r["ok"] for r in json.loads(as_json.stdout)] == [True, False]


def test_predict_refuses_unfinished_runs_and_bad_top_k(finished, tmp_path, capsys):
    run, data = finished
    image = str(data / "test" / "cat" / "000.png")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "classes.json"):
        (unfinished / name).write_text((run / name).read_text())
    assert main(["predict", str(unfinished), image]) == 2
    assert "has no model.params: the run did not finish" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nowhere"), image]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(UsageError, match="at least 1"):
        Predictor(run).predict_images([image], top_k=0)
    assert len(Predictor(run).predict_images([image], top_k=50)[0]["top"]) == 2


def test_run_loader_rejects_malformed_files(finished, tmp_path):
    run, _ = finished
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((run / "config.json").read_text())
    (broken / "classes.json").write_text('{"cat": 0')
    (broken / "model.params").write_bytes((run / "model.params").read_bytes())
    with pytest.raises(UsageError, match="classes.json .* is not valid JSON"):
        load_run(broken)
    (broken / "classes.json").write_text(json.dumps(["cat", "dog"]))
    (broken / "model.params").write_bytes(b"\x00" * 100)
    with pytest.raises(UsageError, match="does not fit this network"):
        load_run(broken)


# ----------------------------------------------------------------------------- bfloat16


def _predict_json(cli, run, images, *flags):
    done = cli("predict", run, *images, "--json", "--top-k", "2", *flags)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout), done.stderr


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: --dtype bfloat16 is refused")
def test_predict_in_bfloat16_gives_the_documented_json_and_float32_answers(finished, cli):
    run, data = finished
    images = sorted((data / "test").rglob("*.png"))
    fp32, _ = _predict_json(cli, run, images)
    bf16, _ = _predict_json(cli, run, images, "--dtype", "bfloat16")
    assert len(bf16) == len(images)
    for mine, theirs in zip(bf16, fp32):
        assert set(mine) == {"source", "ok", "top"} and mine["ok"]
        assert [set(t) for t in mine["top"]] == [{"class", "index", "probability"}] * 2
        assert mine["top"][0]["class"] == theirs["top"][0]["class"]
        for got, want in zip(mine["top"], theirs["top"]):
            assert got["probability"] == pytest.approx(want["probability"], abs=0.02)
    # The network really is the fused bfloat16 graph: oneDNN subgraph operators.
    loaded = load_run(run, dtype="bfloat16", batch_size=2)
    assert loaded.inference["dtype"] == "bfloat16"
    ops = {n["op"] for n in json.loads(loaded.net._cached_graph[1].tojson())["nodes"]}
    assert any(op.startswith("_sg_mkldnn") for op in ops), ops


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: auto can only pick float32")
def test_predict_auto_probes_and_says_what_it_chose(finished, cli):
    run, data = finished
    images = sorted((data / "test").rglob("*.png"))[:2]
    results, stderr = _predict_json(cli, run, images, "--dtype", "auto")
    assert [r["ok"] for r in results] == [True, True]
    said = re.search(r"--dtype auto: (float32|bfloat16) \(.*float32 \S+ img/s", stderr)
    assert said, stderr
    loaded = load_run(run, dtype="auto", batch_size=2)
    probe = loaded.inference["probe"]
    assert probe["batch_size"] == 2 and probe["float32_img_s"] > 0 and probe["finite"]
    faster = probe["speedup"] >= 1.1
    assert loaded.inference["dtype"] == ("bfloat16" if faster else "float32")


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: --dtype bfloat16 is refused")
def test_fused_bfloat16_keeps_the_stem_convolution_in_float32(resnet_run):
    loaded = load_run(resnet_run, dtype="bfloat16")
    weights = {
        name.split("_", 1)[1]: np.dtype(param.data().dtype)  # without the network's prefix
        for name, param in loaded.net.collect_params().items()
        if name.endswith("_weight") and "conv" in name
    }
    assert len(weights) == 20  # resnet18_v2's convolutions, its 1x1 shortcuts included
    # The stem's 7x7 convolution only; every other one is stored in bfloat16.
    assert [conv for conv, dtype in weights.items() if dtype == np.float32] == ["conv0_weight"]


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: --dtype bfloat16 is refused")
def test_bfloat16_export_round_trip(finished, tmp_path, cli):
    run, _ = finished
    out = tmp_path / "out"
    done = cli("export", str(run), "--dtype", "bfloat16", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MXNet format only" in done.stderr and done.stdout.startswith("mxnet: wrote")
    info = json.loads((out / "preprocessing.json").read_text())
    assert info["compute_dtype"] == "bfloat16" and info["input"]["dtype"] == "float32"
    block = mx.gluon.SymbolBlock.imports(
        str(out / "model-symbol.json"), ["data"], str(out / "model-0000.params")
    )
    x = gexport.sample_input(32, count=3, seed=7)
    got = block(x).astype("float32").asnumpy()
    expected = load_run(run).net(x).asnumpy()  # float32
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()
    weights = mx.nd.load(str(out / "model-0000.params"))
    assert any(w.dtype != np.float32 for w in weights.values())  # stored in bfloat16


def test_inference_dtypes_are_checked_before_loading(finished, tmp_path):
    run, _ = finished
    with pytest.raises(UsageError, match="float64"):
        load_run(run, dtype="float64")
    with pytest.raises(UsageError, match="CPUs only"):
        load_run(run, ctx=mx.gpu(0), dtype="bfloat16")
    with pytest.raises(UsageError, match="add --format mxnet"):
        gexport.export_run(run, "onnx", tmp_path / "out", dtype="bfloat16")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- int8


@pytest.fixture
def int8_run(finished, tmp_path_factory):
    """A copy of the finished run (so that its int8/ folder stays out of the other tests)."""
    run, data = finished
    copy = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(run, copy)
    return copy, data


def test_predict_in_int8_answers_the_documented_json_and_records_its_calibration(int8_run, cli):
    run, data = int8_run
    images = sorted((data / "test").rglob("*.png"))
    fp32, _ = _predict_json(cli, run, images)
    int8, stderr = _predict_json(cli, run, images, "--dtype", "int8", "--calibration-images", "5")
    assert len(int8) == len(images)
    for mine in int8:
        assert set(mine) == {"source", "ok", "top"} and mine["ok"]
        assert [set(t) for t in mine["top"]] == [{"class", "index", "probability"}] * 2
        assert sum(t["probability"] for t in mine["top"]) == pytest.approx(1.0, abs=1e-4)
    record = json.loads((run / "int8" / "calibration.json").read_text())
    assert record["calibration"]["images"] == 5 and record["calibration"]["requested"] == 5
    agreement = record["test_agreement"]
    assert agreement["images"] == len(images) and 0 <= agreement["top1_agreement"] <= 1
    same = np.mean([a["top"][0]["class"] == b["top"][0]["class"] for a, b in zip(int8, fp32)])
    assert agreement["top1_agreement"] == pytest.approx(same)  # what the command answered
    said = f"top-1 agreement with float32 {100 * agreement['top1_agreement']:.1f} % on the"
    assert said in stderr and "calibrated on 5 training images" in stderr, stderr
    # The network really is the quantized graph, reloaded from int8/ without calibrating again.
    stamp = (run / "int8" / "calibration.json").stat().st_mtime_ns
    loaded = load_run(run, dtype="int8", calibration_images=5)
    assert (run / "int8" / "calibration.json").stat().st_mtime_ns == stamp
    assert loaded.inference["dtype"] == "int8" and loaded.inference["calibration"] == record
    ops = {n["op"] for n in json.loads((run / "int8" / "model-symbol.json").read_text())["nodes"]}
    assert any("quantize" in op for op in ops), ops


def test_auto_never_picks_a_form_below_the_agreement_floor(int8_run, monkeypatch):
    run, _ = int8_run
    load_run(run, dtype="int8", calibration_images=5)  # calibrated: auto considers int8 too
    monkeypatch.setattr(inference, "MIN_AGREEMENT", 1.01)  # no form can agree that much
    loaded = load_run(run, dtype="auto")
    assert loaded.inference["dtype"] == "float32"
    assert "int8_probe" in loaded.inference, loaded.inference  # it was probed, and refused
    assert "below 101 %" in loaded.inference["why"]
    assert "int8" in loaded.inference["why"]


def test_pick_form_keeps_the_fastest_faithful_form():
    def figures(speedup, finite=True):
        return {"speedup": speedup, "finite": finite}

    assert inference.pick_form({})[0] == "float32"
    chosen, why = inference.pick_form(
        {"bfloat16": (figures(3.0), 0.995), "int8": (figures(2.0), 1.0)}
    )
    assert chosen == "bfloat16" and len(why) == 2
    # Faster, but broken or unfaithful: refused.
    assert inference.pick_form({"int8": (figures(4.0, finite=False), 1.0)})[0] == "float32"
    chosen, why = inference.pick_form({"int8": (figures(4.0), 0.98), "bfloat16": (figures(1.2), 1)})
    assert chosen == "bfloat16" and "98.0 % of the images, below 99 %" in why[0]
    assert inference.pick_form({"int8": (figures(4.0), float("nan"))})[0] == "float32"
    assert inference.pick_form({"int8": (figures(1.05), 1.0)})[0] == "float32"  # not faster


def test_int8_export_round_trip(int8_run, tmp_path, cli):
    run, _ = int8_run
    out = tmp_path / "out"
    done = cli(
        "export", str(run), "--dtype", "int8", "--calibration-images", "5", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MXNet format only" in done.stderr and "top-1 agreement with float32" in done.stderr
    assert done.stdout.startswith("mxnet: wrote")
    info = json.loads((out / "preprocessing.json").read_text())
    assert info["compute_dtype"] == "int8" and info["input"]["dtype"] == "float32"
    block = mx.gluon.SymbolBlock.imports(
        str(out / "model-symbol.json"), ["data"], str(out / "model-0000.params")
    )
    x = gexport.sample_input(32, count=3, seed=7)
    expected = load_run(run, dtype="int8", calibration_images=5).net(x).asnumpy()
    assert np.abs(block(x).asnumpy() - expected).max() <= 1e-6
    with pytest.raises(UsageError, match="--dtype int8 exports the MXNet format only"):
        gexport.export_run(run, "onnx", tmp_path / "onnx", dtype="int8")
