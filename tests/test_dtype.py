"""``--dtype``: bfloat16 through MXNet AMP on CPUs that have it, clear refusals elsewhere.

AMP changes the whole process once on, so every run that turns it on is a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from gluon_ft.errors import UsageError
from gluon_ft.train.amp import BF16_CPU_FLAGS, check_dtype, cpu_flags, trainer_kwargs

HAS_BF16 = any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def test_bfloat16_refused_on_a_cpu_without_bf16_instructions():
    with pytest.raises(UsageError, match="avx512_bf16 or amx_bf16") as err:
        check_dtype("bfloat16", [mx.cpu()], flags=frozenset({"avx2", "avx512f", "fma"}))
    assert "--dtype float32" in str(err.value)
    check_dtype("bfloat16", [mx.cpu()], flags=frozenset({"avx512f", "avx512_bf16"}))
    check_dtype("bfloat16", [mx.cpu()], flags=frozenset({"amx_bf16"}))


def test_float16_refused_on_cpu_and_bfloat16_on_gpu():
    with pytest.raises(UsageError, match="float16 trains on GPUs only") as err:
        check_dtype("float16", [mx.cpu()])
    assert "bfloat16" in str(err.value)  # says what works on a CPU
    with pytest.raises(UsageError, match="bfloat16 runs on CPUs only"):
        check_dtype("bfloat16", [mx.gpu(0)])
    check_dtype("float16", [mx.gpu(0), mx.gpu(1)])  # MXNet's AMP recipe: accepted
    with pytest.raises(UsageError, match="float64"):
        check_dtype("float64", [mx.cpu()])


def test_float16_follows_the_amp_recipe_on_the_trainer():
    # Dynamic loss scaling skips overflowed steps, which needs the update off the kvstore.
    assert trainer_kwargs("float16") == {"update_on_kvstore": False}
    assert trainer_kwargs("bfloat16") == {} and trainer_kwargs("float32") == {}


def test_cli_refuses_float16_on_cpu_with_exit_2_and_no_run(tiny_data, tmp_path, cli):
    out = tmp_path / "run"
    done = cli("train", "--data", tiny_data, "--dtype", "float16", "--ctx", "cpu", "--out", out)
    assert done.returncode == 2
    assert "float16 trains on GPUs only" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


# `gluon-ft train ARGS` in a process that records what the run's network computes: the dtype
# of the scores the loss receives, and the inputs of each convolution in the graph it builds.
RECORDING_TRAIN = """
import json, sys
import numpy as np
import gluon_ft
from mxnet import gluon
from gluon_ft.cli import main

seen = {"scores": set(), "convolutions": [], "casts": []}
score_loss = gluon.loss.SoftmaxCrossEntropyLoss.hybrid_forward
build_graph = gluon.HybridBlock._build_cache


def recording_loss(self, F, pred, label, *args, **kwargs):
    dtype = np.dtype(pred.dtype)
    seen["scores"].add(dtype.names[0] if dtype.names else dtype.name)  # bfloat16 is a record
    return score_loss(self, F, pred, label, *args, **kwargs)


def recording_graph(self, *args):
    build_graph(self, *args)
    if seen["convolutions"]:  # the trained network's graph comes first; the report's later
        return
    nodes = self._cached_graph[1].get_internals().list_outputs()
    convolutions = [n for n in nodes if "_conv" in n and n.endswith("_fwd_output")]
    seen["convolutions"] += [n[: -len("_fwd_output")] for n in convolutions]
    seen["casts"] += [n for n in nodes if "_amp_cast" in n]


gluon.loss.SoftmaxCrossEntropyLoss.hybrid_forward = recording_loss
gluon.HybridBlock._build_cache = recording_graph
code = main(["train", *sys.argv[1:]])
print(json.dumps({key: sorted(value) for key, value in seen.items()}))
sys.exit(code)
"""


def recorded_train(data, out, dtype: str) -> dict:
    args = ["--data", str(data), "--pretrained", "none", "--epochs", "1", "--batch-size", "4"]
    args += ["--image-size", "32", "--model", "mobilenet0.25", "--ctx", "cpu", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", RECORDING_TRAIN, *args, "--dtype", dtype, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: the refusal is tested above")
def test_bfloat16_training_runs_convolutions_in_bfloat16(tiny_data, tmp_path):
    """The network that `train --dtype bfloat16` trains computes in bfloat16: AMP casts both
    inputs of every convolution after the stem (which stays float32, see
    amp.prepare_network), and the scores reach the loss as bfloat16."""
    seen = recorded_train(tiny_data, tmp_path / "bf16", "bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (row,) = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert 0 < row["loss"] < 10 and 0 <= row["test_acc"] <= 1
    assert seen["scores"] == ["bfloat16"]
    assert len(seen["convolutions"]) == 27  # mobilenet0.25
    cast = {conv for conv in seen["convolutions"] if f"{conv}_amp_cast0_output" in seen["casts"]}
    for conv in cast:  # data and weight
        assert f"{conv}_amp_cast1_output" in seen["casts"]
    # mobilenet0.25's stem, at full and half resolution: conv0 (stride 2), conv1, conv2.
    stem = sorted(int(conv.rsplit("conv", 1)[1]) for conv in set(seen["convolutions"]) - cast)
    assert stem == [0, 1, 2]
    # The weights stay float32 (AMP keeps the master copy); the saved model too.
    saved = mx.nd.load(str(tmp_path / "bf16" / "model.params"))
    assert {array.dtype for array in saved.values()} == {np.float32}


def test_accuracy_counts_class_indices_above_256_under_bfloat16():
    from mxnet.contrib.amp.amp import bfloat16

    from gluon_ft.train import MetricSums

    scores = mx.nd.zeros((3, 1000))
    for row, label in enumerate((999, 300, 5)):
        scores[row, label] = 1
    sums = MetricSums([mx.cpu()])
    # What an AMP network outputs: bfloat16 logits, where 999 would round to 996.
    sums.add([mx.nd.amp_cast(scores, dtype=bfloat16)], [mx.nd.array([999, 300, 5], dtype="int32")])
    assert sums.read()[1] == 1.0


# ----------------------------------------------------------------------------- --dtype auto


def _probe_saying(speedup: float, calls: list):
    """A stand-in for amp.probe_speeds that reports ``speedup`` and records its arguments."""

    def probe(model, image_size, batch_size, rounds=3):
        calls.append((model, image_size, batch_size))
        return {
            "model": model,
            "image_size": image_size,
            "batch_size": batch_size,
            "float32_img_s": 100.0,
            "bfloat16_img_s": 100.0 * speedup,
            "speedup": speedup,
            "seconds": 0.1,
        }

    return probe


def test_auto_picks_float32_when_the_probe_measures_bfloat16_slower(
    tiny_data, tmp_path, monkeypatch, capsys
):
    from conftest import tiny_config

    from gluon_ft.train import amp, train

    calls: list = []
    monkeypatch.setattr(amp, "bfloat16_unsupported", lambda flags=None: None)  # any CPU
    monkeypatch.setattr(amp, "probe_speeds", _probe_saying(0.9, calls))
    config = tiny_config(tiny_data, tmp_path / "run", dtype="auto", batch_size=8, ctx="cpu:2")
    train(config)  # float32 never turns AMP on: safe in this process
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert calls == [("mobilenet0.25", 32, 4)]  # the run's model, size, per-device batch
    assert saved["dtype"] == "float32"
    choice = saved["dtype_choice"]
    assert choice["requested"] == "auto" and choice["probe"]["speedup"] == 0.9
    assert "0.90x" in choice["why"]
    assert not amp._enabled  # AMP stayed off
    out = capsys.readouterr().out
    assert "--dtype auto: float32" in out and "bfloat16 90.0 img/s" in out


def test_auto_needs_a_clear_win_and_refuses_a_distributed_run(monkeypatch):
    from gluon_ft.train import TrainConfig, amp

    monkeypatch.setattr(amp, "bfloat16_unsupported", lambda flags=None: None)
    config = TrainConfig(model="mobilenet0.25", dtype="auto", image_size=32, batch_size=64)
    for speedup, dtype in ((1.05, "float32"), (amp.MIN_BF16_SPEEDUP, "bfloat16")):
        calls: list = []
        monkeypatch.setattr(amp, "probe_speeds", _probe_saying(speedup, calls))
        assert amp.choose_dtype(config, [mx.cpu()])["dtype"] == dtype
        assert calls == [("mobilenet0.25", 32, amp.PROBE_MAX_BATCH)]  # capped: a short probe
    monkeypatch.setattr(amp, "bfloat16_unsupported", lambda flags=None: "no BF16 here")
    unsupported = amp.choose_dtype(config, [mx.cpu()])
    assert unsupported == {"requested": "auto", "dtype": "float32", "why": "no BF16 here"}
    config.kvstore = "dist_sync"
    with pytest.raises(UsageError, match="workers .* could choose differently"):
        amp.choose_dtype(config, [mx.cpu()])


def test_auto_on_resume_keeps_the_recorded_choice_without_probing(tmp_path, monkeypatch):
    from gluon_ft.train import TrainConfig, amp

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    monkeypatch.setattr(amp, "bfloat16_unsupported", lambda flags=None: None)
    monkeypatch.setattr(amp, "probe_speeds", _probe_saying(0.5, calls := []))
    config = TrainConfig(dtype="auto", out=str(tmp_path), resume=True)
    choice = amp.choose_dtype(config, [mx.cpu()])
    assert choice["dtype"] == "bfloat16" and "--resume" in choice["why"] and calls == []
    monkeypatch.setattr(amp, "bfloat16_unsupported", lambda flags=None: "no BF16 on this one")
    with pytest.raises(UsageError, match="no BF16 on this one"):  # moved to another machine
        amp.choose_dtype(config, [mx.cpu()])


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: auto can only pick float32")
def test_auto_trains_in_bfloat16_when_the_probe_measures_it_faster(tiny_data, tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys\n"
        "from gluon_ft.train import amp\n"
        "from gluon_ft.cli import main\n"
        "amp.probe_speeds = lambda model, size, batch, rounds=3: {'model': model,\n"
        "    'image_size': size, 'batch_size': batch, 'float32_img_s': 10.0,\n"
        "    'bfloat16_img_s': 25.0, 'speedup': 2.5, 'seconds': 0.1}\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "train", "--data", str(tiny_data), "--pretrained", "none",
         "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--dtype", "auto",
         "--ctx", "cpu", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--dtype auto: bfloat16" in done.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["dtype_choice"]["probe"]["speedup"] == 2.5
    (row,) = json.loads((out / "metrics.json").read_text())
    assert 0 < row["loss"] < 10


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: nothing to probe")
def test_the_probe_times_both_dtypes_in_a_child_process():
    from gluon_ft.train import amp

    probe = amp.probe_speeds("mobilenet0.25", 32, 4, rounds=2)
    assert probe["float32_img_s"] > 0 and probe["bfloat16_img_s"] > 0
    assert probe["speedup"] == pytest.approx(probe["bfloat16_img_s"] / probe["float32_img_s"])
    assert not amp._enabled  # this process never turned AMP on


# ----------------------------------------------------------------------------- the stem

# A bfloat16 training step of resnet18_v2 with oneDNN's log on. DNNL_MAX_CPU_ISA keeps it to
# AVX-512 BF16, the kernels of CPUs without AMX (AMD Zen 4, Intel Cooper Lake).
STEM_STEP = """
import gluon_ft, mxnet as mx
from mxnet import autograd, gluon
from gluon_ft.train import amp
from gluon_ft.model.graft import scratch_twin
amp.enable("bfloat16")
net = scratch_twin("resnet18_v2", 2, [mx.cpu()])
getattr(amp, "prepare_network", lambda net, dtype: None)(net, "bfloat16")
net.hybridize(static_alloc=True, static_shape=True)
trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
x, y = mx.nd.random.normal(shape=(4, 3, 64, 64)), mx.nd.array([0, 1, 0, 1])
for step in range(2):
    mx.nd.waitall()
    print("STEP", step, flush=True)
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(x), y)
    loss.backward()
    trainer.step(4)
mx.nd.waitall()
"""


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16")
def test_bfloat16_keeps_the_stem_off_the_slow_plain_layout_kernels():
    env = {**os.environ, "MKLDNN_VERBOSE": "1", "DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    done = subprocess.run(
        [sys.executable, "-c", STEM_STEP], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    step = done.stdout.split("STEP 1")[1].splitlines()  # the second step: nothing is created
    convolutions = [line for line in step if ",convolution," in line]
    assert len(convolutions) > 40  # the forward and backward passes of 20 convolutions
    # oneDNN has no blocked bfloat16 kernel for 3 input channels: AMP's stem ran as a GEMM
    # writing plain NCHW, and BatchNorm on plain bfloat16 takes the slow reference path.
    assert not [c for c in convolutions if "gemm" in c and "src_bf16" in c]
    plain_bf16_batchnorms = [line for line in step if "ncsp_bnorm" in line and "data_bf16" in line]
    assert len(plain_bf16_batchnorms) <= 1, plain_bf16_batchnorms  # the stages' first, once


# `gluon-ft train ARGS` on two devices, then (AMP still on, in the same process) the graph a
# resnet18_v2 on those devices builds: for each convolution, whether an amp_cast feeds it.
TRAIN_THEN_GRAPH = """
import json, sys
import gluon_ft, mxnet as mx
from gluon_ft.cli import main
from gluon_ft.train import amp
from gluon_ft.model.graft import scratch_twin
code = main(["train", *sys.argv[1:]])
amp.enable("bfloat16")
net = scratch_twin("resnet18_v2", 2, [mx.cpu(0), mx.cpu(1)])
getattr(amp, "prepare_network", lambda net, dtype: None)(net, "bfloat16")
net.hybridize()
net(mx.nd.zeros((1, 3, 32, 32), ctx=mx.cpu(1)))
graph = net._cached_graph[1].tojson(remove_amp_cast=False)
nodes = json.loads(graph)["nodes"]
convs = [n for n in nodes if n["op"] == "Convolution"]
print(json.dumps([nodes[n["inputs"][0][0]]["op"] == "amp_cast" for n in convs]))
sys.exit(code)
"""


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: the refusal is tested above")
def test_bfloat16_trains_on_two_cpu_contexts_with_the_stem_in_float32(tiny_data, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_THEN_GRAPH,
         "--data", str(tiny_data), "--pretrained", "none", "--epochs", "1",
         "--batch-size", "4", "--image-size", "32", "--dtype", "bfloat16", "--ctx", "cpu:2",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    (row,) = json.loads((out / "metrics.json").read_text())
    assert config["dtype"] == "bfloat16" and config["contexts"] == ["cpu(0)", "cpu(1)"]
    assert row["train_samples"] == 12 and 0 < row["loss"] < 10 and 0 <= row["test_acc"] <= 1
    # The graph: the stem convolution reads float32 (no cast before it), the stages bfloat16.
    fed_by_cast = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(fed_by_cast) == 20
    assert fed_by_cast[0] is False and all(fed_by_cast[1:])
