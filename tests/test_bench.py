"""``gluon-ft bench --quick``: one JSON object on stdout, every figure positive and finite."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

FIGURES = (
    "bare_fp32_img_s",
    "bare_fp32_default_threads_img_s",
    "thread_speedup",
    "train_fp32_img_s",
    "trainer_overhead",
    "train_bf16_img_s",
    "bf16_speedup",
    "frozen_step_img_s",
    "frozen_epoch_s",
    "cached_epoch_s",
    "cache_speedup",
    "loader_folder_img_s",
    "loader_recordio_img_s",
    "infer_img_s",
    "infer_optimized_img_s",
    "infer_speedup",
)
# A ratio of two measured figures, not a figure: it may be 0 or negative on a noisy machine.
SIGNED = {"trainer_overhead"}


@pytest.fixture
def tiny_run(image_folder, trained_run, tmp_path) -> Path:
    """A copy (its int8/ folder is written) of the session's tiny 2-class mobilenet0.25 run
    at 32 px, the one tests/test_export_predict.py uses."""
    run = trained_run(image_folder(n_train=6, n_test=2, size=40)).path
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow  # 40 s of timed runs and a served run: .ci/run runs it after make test
def test_quick_bench_prints_one_json_object_with_every_figure(tmp_path, tiny_run):
    out = tmp_path / "bench.json"
    done = run_cli("bench", "--quick", "--out", str(out), "--run", str(tiny_run), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # the whole of stdout is one object
    assert json.loads(out.read_text()) == result

    bf16 = result["env"]["cpu_flags"]["avx512_bf16"] or result["env"]["cpu_flags"]["amx_bf16"]
    for key in FIGURES:
        value = result[key]
        if key in ("train_bf16_img_s", "bf16_speedup") and not bf16:
            assert value is None and result["details"]["bf16_unsupported"]
            continue
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        assert key in SIGNED or value > 0, (key, value)
    # The ratios are the figures they are defined from.
    assert math.isclose(
        result["trainer_overhead"], 1 - result["train_fp32_img_s"] / result["bare_fp32_img_s"]
    )
    assert math.isclose(
        result["thread_speedup"],
        result["train_fp32_img_s"] / result["bare_fp32_default_threads_img_s"],
    )
    assert math.isclose(
        result["cache_speedup"], result["frozen_epoch_s"] / result["cached_epoch_s"]
    )
    assert math.isclose(
        result["infer_speedup"], result["infer_optimized_img_s"] / result["infer_img_s"]
    )

    env = result["env"]
    assert env["mxnet"] == "1.9.1" and env["usable_cores"] >= 1
    assert env["threads"]["omp_num_threads"] and env["workers"] >= 0
    # The reference child really ran with MXNet's own default threads, without gluon_ft.
    child = result["details"]["bare_fp32_default_threads"]
    assert child["threads"] == {"OMP_NUM_THREADS": None, "MXNET_OMP_MAX_THREADS": None}
    assert child["gluon_ft_imported"] is False
    # The cached head trained on the same features as the uncached one.
    assert abs(result["details"]["cached_loss_minus_frozen_loss"]) < 1e-4
    best = result["details"]["infer_optimized_form"]
    assert result["details"][f"{best}_top1_agreement"] >= 0.99
    assert result["details"]["infer_fused_fp32_img_s_max_abs_diff"] < 1e-3
    assert result["quick"] is True and result["sizes"]["image_size"] < 224

    # The precision section: one size in quick mode, the bench's own, with auto's choice.
    (key,) = result["precision"]
    entry = result["precision"][key]
    assert key == "64px_b16"
    assert entry["infer_fp32_img_s"] == result["infer_img_s"]
    assert entry["auto"]["requested"] == "auto"
    if bf16:
        assert entry["train_bf16_img_s"] == result["train_bf16_img_s"]
        assert math.isclose(
            entry["bf16_speedup"], entry["train_bf16_img_s"] / entry["train_fp32_img_s"]
        )
        chosen = entry["auto"]["dtype"]
        probe = entry["auto"]["probe"]
        assert (chosen == "bfloat16") == (probe["speedup"] >= 1.1)
        assert probe["image_size"] == 64 and probe["batch_size"] == 16
        assert (
            entry["auto_img_s"]
            == entry[f"train_{'bf16' if chosen == 'bfloat16' else 'fp32'}_img_s"]
        )
        assert entry["fused_bf16_top1_agreement"] >= 0.99
        assert math.isclose(
            entry["fused_bf16_speedup"], entry["infer_fused_bf16_img_s"] / entry["infer_fp32_img_s"]
        )
    else:
        assert entry["auto"]["dtype"] == "float32" and "probe" not in entry["auto"]

    # int8: timed at the bench's size, its agreement judged on the run's test part.
    assert entry["infer_int8_img_s"] == result["infer_int8_img_s"] > 0
    assert math.isclose(result["int8_speedup"], result["infer_int8_img_s"] / result["infer_img_s"])
    agreement = result["agreement"]
    assert agreement["measured"] and agreement["run"] == str(tiny_run)
    assert agreement["int8"]["images"] == 4 and agreement["int8"]["calibration"]["images"] == 12
    assert result["int8_top1_agreement"] == agreement["int8"]["top1_agreement"]
    assert (tiny_run / "int8" / "calibration.json").is_file()
    assert (agreement["bfloat16"] is not None) == bool(bf16)
    assert agreement["bfloat16"] is None or agreement["bfloat16"]["images"] == 4
    best = result["infer_best"]
    assert best["int8_considered"] and set(best["candidates"]) >= {"fused_fp32", "int8"}
    assert best["form"] is None or best["candidates"][best["form"]]["top1_agreement"] >= 0.99

    # serve: a real server of the run, every answer 200 and as when its image came alone.
    serve = result["serve"]
    assert serve["run"] == str(tiny_run) and serve["image_size"] == 32
    assert set(serve["clients"]) == {"1", "8", "64"}
    for clients, phase in serve["clients"].items():
        assert phase["statuses"] == {"200": phase["requests"]}, (clients, phase)
        assert 0 < phase["p50_ms"] <= phase["p99_ms"] and phase["requests_per_s"] > 0
    assert serve["clients"]["64"]["requests"] == 64 and serve["non_200"] == 0
    assert serve["answers_as_when_alone"]["compared"] == 8 + 64
    assert serve["answers_as_when_alone"]["mismatched"] == 0
    assert sum(int(size) * n for size, n in serve["batches_served"].items()) == 16 + 8 + 64
    assert result["serve_speedup"] == serve["speedup_over_one_client"]["64"]


def test_bench_judges_int8_agreement_on_a_run_and_says_so_without_one(tiny_run, monkeypatch):
    """The agreement is the run's test part through the float32 network and the run's own
    int8 form (here a stand-in that flips the top-1 of every other image: calibrating for
    real costs seconds, and the slow quick bench does it)."""
    import mxnet as mx

    from gluon_ft import isa
    from gluon_ft.bench.agreement import run_agreement
    from gluon_ft.bench.throughput import measure_run_agreement
    from gluon_ft.deploy import int8

    result: dict = {}
    assert measure_run_agreement(None, result, print) is None
    assert result["int8_top1_agreement"] is None and not result["agreement"]["measured"]
    assert "not measured" in result["agreement"]["why"]

    asked = []

    def int8_form(run_dir, net, image_size, calibrate=True, images=200, resize=256 / 224):
        asked.append((run_dir, image_size, images))

        def flipped(x):  # the other class for the images at odd positions of a batch
            logits = net(x)
            odd = mx.nd.array([[i % 2] for i in range(x.shape[0])])
            return odd * logits[:, ::-1] + (1 - odd) * logits

        return flipped, {"calibration": {"images": images}}

    monkeypatch.setattr(int8, "int8_form", int8_form)
    monkeypatch.setattr(isa, "bfloat16_unsupported", lambda: "no bf16 here")  # its own test
    found = run_agreement(tiny_run, calibration_images=5)
    assert asked == [(tiny_run, 32, 5)]
    assert found["run"] == str(tiny_run) and found["image_size"] == 32
    assert found["int8"]["part"] == "test" and found["int8"]["images"] == 4
    assert found["int8"]["top1_agreement"] == 0.5
    assert found["int8"]["calibration"] == {"images": 5}
    assert found["bfloat16"] is None  # the slow quick bench judges it where the CPU has it


def test_best_inference_form_counts_int8_only_where_a_run_judged_it():
    from gluon_ft.bench.throughput import best_inference_form

    result = {"infer_img_s": 10.0, "infer_fused_fp32_img_s": 12.0}
    result.update(infer_fused_bf16_img_s=20.0, infer_int8_img_s=40.0)
    details = {
        "infer_fused_fp32_img_s_top1_agreement": 1.0,
        "infer_fused_bf16_img_s_top1_agreement": 1.0,
    }
    alone = best_inference_form(result, details, None)
    assert alone["form"] == "fused_bf16" and alone["speedup"] == 2.0
    assert "int8" not in alone["candidates"] and not alone["int8_considered"]

    def judged(int8: float, bf16: float) -> dict:
        return {"int8": {"top1_agreement": int8}, "bfloat16": {"top1_agreement": bf16}}

    best = best_inference_form(result, details, judged(0.995, 1.0))
    assert best["form"] == "int8" and best["speedup"] == 4.0 and best["img_s"] == 40.0
    assert best["candidates"]["int8"]["judged_on"] == "the run's test part"
    # Below the 99 % floor a form is refused, however fast; the run's bfloat16 figure counts.
    assert best_inference_form(result, details, judged(0.98, 1.0))["form"] == "fused_bf16"
    assert best_inference_form(result, details, judged(0.98, 0.98))["form"] == "fused_fp32"


def test_serve_load_compares_every_answer_with_the_one_alone():
    from gluon_ft.bench.serve_load import compare_with_single, same_answer

    answer = {"classes": ["a", "b"], "probabilities": [0.7, 0.3]}
    near = {"classes": ["a", "b"], "probabilities": [0.7 + 5e-6, 0.3 - 5e-6]}
    far = {"classes": ["a", "b"], "probabilities": [0.7 + 2e-5, 0.3 - 2e-5]}
    swapped = {"classes": ["b", "a"], "probabilities": [0.7, 0.3]}
    assert same_answer(answer, near) and not same_answer(answer, far)
    assert not same_answer(answer, swapped)
    single = {"answers": [(0, 200, answer, 0.1), (1, 200, swapped, 0.1)]}
    burst = {"answers": [(0, 200, near, 0.2), (1, 200, answer, 0.2), (0, 503, {}, 0.1)]}
    assert compare_with_single([single, burst]) == {
        "compared": 2,
        "mismatched": 1,
        "tolerance": 1e-5,
    }


def test_serve_load_stand_in_run_loads_as_a_finished_run(tmp_path, image_folder):
    from gluon_ft.bench.serve_load import folder_jpegs, multipart
    from gluon_ft.bench.standin import write_scratch_run
    from gluon_ft.deploy.predict import Predictor

    run = write_scratch_run(tmp_path / "run", "mobilenet0.25", 3, 32)
    predictor = Predictor(run, batch_size=2)
    assert predictor.classes == ["class0", "class1", "class2"] and predictor.tta == 1
    photos = tmp_path / "photos" / "x"
    photos.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (50, 40), (80 * i, 0, 0)).save(photos / f"{i}.jpg")
    images = folder_jpegs(tmp_path / "photos", 2)
    assert [name for name, _ in images] == ["0000-0.jpg", "0001-1.jpg"]
    (result,) = predictor.predict_images([images[0][1]], top_k=3)
    assert result["ok"] and len(result["top"]) == 3
    body, content_type = multipart(images[0][1], images[0][0])
    boundary = content_type.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode()) and images[0][1] in body


def test_static_hybridization_is_exact_with_a_short_last_batch():
    """static_alloc/static_shape (what train uses) re-plans for a short last batch, correctly.

    Compared with plain hybridize(), which builds the graph for each shape anew: the same
    numbers. (Against imperative mode the forward pass agrees to float rounding; a few SGD
    steps on 3-sample BatchNorm batches then amplify that rounding, so training is compared
    between the two graph modes.)
    """
    import mxnet as mx
    import numpy as np
    from mxnet import autograd, gluon

    from gluon_ft.model.graft import scratch_twin
    from gluon_ft.train import StepOptions, TrainConfig, evaluate, make_trainer, train_epoch

    ctx = [mx.cpu()]
    config = TrainConfig(batch_size=8, image_size=32, lr=0.1, progress=False)
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 3, size=n).astype(np.int32),
            0,
        )
        for n in (8, 8, 3, 8)  # a short batch, then a full one again: two shape changes
    ]

    def network(**hybridize):
        mx.random.seed(0)
        net = scratch_twin("resnet18_v2", 3, ctx)
        net(mx.nd.zeros((1, 3, 32, 32)))  # the deferred initialization, the same for all
        if hybridize:
            net.hybridize(**hybridize)
        return net

    def trained(**hybridize):
        net = network(**hybridize)
        trainer = make_trainer(net, config, ctx)
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        options = StepOptions.of(config)
        sums, _, _ = train_epoch(net, trainer, batches, ctx, loss_fn, options=options)
        accuracy = evaluate(net, batches[1:3], ctx)  # predict mode, full then short batch
        params = {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}
        return sums.read(), accuracy, params

    static = {"static_alloc": True, "static_shape": True}
    (loss_s, acc_s), test_s, params_s = trained(**static)
    (loss_h, acc_h), test_h, params_h = trained(active=True)
    assert np.isclose(loss_s, loss_h, rtol=1e-6) and acc_s == acc_h and test_s == test_h
    for name, value in params_h.items():
        assert np.allclose(params_s[name], value, rtol=1e-5, atol=1e-7), name

    short = mx.nd.random.normal(shape=(3, 3, 32, 32))
    outputs = []
    for net in (network(**static), network()):
        net(mx.nd.random.normal(shape=(8, 3, 32, 32)))  # a full batch first, then the short
        with autograd.record():
            outputs.append(net(short).asnumpy())
    assert np.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- ONNX Runtime

# A Python with onnxruntime, in a virtual environment of its own (never the project's).
ORT_PYTHON = os.environ.get("GLUON_FT_ORT_PYTHON", "/work/scratch/ortvenv/bin/python")


@pytest.fixture(scope="module")
def exported_onnx(tmp_path_factory) -> Path:
    """A stand-in run of mobilenet0.25 at 32 px, exported as `gluon-ft export` exports."""
    from gluon_ft.bench.standin import write_scratch_run
    from gluon_ft.deploy.export import export_run

    folder = tmp_path_factory.mktemp("onnx")
    run = write_scratch_run(folder / "run", "mobilenet0.25", 3, 32)
    return Path(export_run(run, "onnx", folder / "export")["out_dir"]) / "model.onnx"


def test_onnxruntime_peer_cleans_a_graph_with_weights_among_its_inputs(exported_onnx, tmp_path):
    import onnx
    from onnx import helper

    from gluon_ft.bench.onnxruntime_peer import clean_copy

    _, dropped = clean_copy(str(exported_onnx), str(tmp_path))
    assert dropped == 0  # export leaves the weights out of the graph inputs already
    model = onnx.load(str(exported_onnx))
    for weight in model.graph.initializer:  # as mx2onnx writes it
        model.graph.input.append(
            helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims))
        )
    onnx.save(model, str(tmp_path / "dirty.onnx"))
    clean, dropped = clean_copy(str(tmp_path / "dirty.onnx"), str(tmp_path))
    assert dropped == len(model.graph.initializer) > 10
    assert [i.name for i in onnx.load(clean).graph.input] == [model.graph.input[0].name]


def test_bench_refuses_an_onnxruntime_python_that_cannot_run_the_script(exported_onnx):
    from gluon_ft.bench.onnx_anchor import measure_onnxruntime
    from gluon_ft.bench.throughput import QUICK
    from gluon_ft.errors import UsageError

    sizes = replace(QUICK, model="mobilenet0.25", image_size=32, batch_size=2)
    with pytest.raises(UsageError, match="onnxruntime"):  # the project's Python has none
        measure_onnxruntime(sys.executable, sizes, 1, print)


@pytest.mark.slow  # a second interpreter and ONNX Runtime's start: 2 s
@pytest.mark.skipif(not Path(ORT_PYTHON).is_file(), reason=f"no {ORT_PYTHON} (onnxruntime)")
def test_onnxruntime_loads_our_model_without_the_initializer_warning(exported_onnx):
    from gluon_ft.bench import onnxruntime_peer

    command = [ORT_PYTHON, "-I", onnxruntime_peer.__file__, str(exported_onnx)]
    command += ["--batch", "2", "--repeats", "1", "--steps", "1", "--warmup", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["input_shape"] == [2, 3, 32, 32] and result["ours_img_s"] > 0
    assert result["initializers_in_graph_inputs"] == 0 and not result["initializer_warning"]
    assert result["warnings"] == {"ours": [], "clean": []} and result["max_abs_diff"] == 0


def test_a_failed_server_or_onnxruntime_leaves_the_other_figures(monkeypatch, tmp_path):
    """Minutes of figures are not lost to a server that did not start or an ONNX Runtime
    that failed: the bench records why and goes on."""
    from gluon_ft.bench import onnx_anchor, serve_load
    from gluon_ft.bench.throughput import QUICK, measure_deployment
    from gluon_ft.errors import UsageError

    def no_server(run_dir, images, load, log):
        assert len(images) == load.images == 16 and (run_dir / "model.params").is_file()
        raise RuntimeError("gluon-ft serve exited with 1: port taken")

    def no_onnxruntime(python, sizes, threads, log):
        raise UsageError("--onnxruntime python: the ONNX Runtime script failed")

    monkeypatch.setattr(serve_load, "measure_serve", no_server)
    monkeypatch.setattr(onnx_anchor, "measure_onnxruntime", no_onnxruntime)
    sizes = replace(QUICK, model="mobilenet0.25", image_size=32, photo_width=64, photo_height=48)
    result = {"infer_img_s": 1.0, "infer_fused_fp32_img_s": 2.0}
    details = {"infer_fused_fp32_img_s_top1_agreement": 1.0}
    measure_deployment(sizes, True, None, "python", result, details, lambda line: None)
    assert result["serve"] == {"error": "gluon-ft serve exited with 1: port taken"}
    assert "serve_speedup" not in result
    assert "ONNX Runtime script failed" in result["onnxruntime"]["error"]
    assert result["infer_best"]["form"] == "fused_fp32"
