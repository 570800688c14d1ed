"""``--dtype``: bfloat16 through MXNet AMP on CPUs that have it, clear refusals elsewhere.

AMP changes the whole process once on, so every run that turns it on is a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mxnet as mx
import pytest
from conftest import run_cli

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


def test_cli_refuses_float16_on_cpu_with_exit_2_and_no_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "train", "--data", str(tiny_data), "--dtype", "float16", "--ctx", "cpu", "--out", str(out)
    )
    assert done.returncode == 2
    assert "float16 trains on GPUs only" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: the refusal is tested above")
def test_bfloat16_training_runs_convolutions_in_bfloat16(tiny_data, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "train", "--data", str(tiny_data), "--pretrained", "none", "--epochs", "1",
        "--batch-size", "4", "--image-size", "32", "--dtype", "bfloat16", "--ctx", "cpu",
        "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    (row,) = json.loads((out / "metrics.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert 0 < row["loss"] < 10 and 0 <= row["test_acc"] <= 1
    # The graph AMP builds casts the convolutions' inputs to bfloat16; the weights stay float32.
    code = (
        "import gluon_ft, mxnet as mx\n"
        "from gluon_ft.train import amp\n"
        "from gluon_ft.model import scratch_twin\n"
        "amp.enable('bfloat16')\n"
        "net = scratch_twin('resnet18_v2', 2, [mx.cpu()])\n"
        "net.hybridize()\n"
        "net(mx.nd.zeros((1, 3, 32, 32)))\n"
        "nodes = net._cached_graph[1].get_internals().list_outputs()\n"
        "casts = [n for n in nodes if '_conv' in n and '_amp_cast' in n]\n"
        "print(len(casts), net(mx.nd.zeros((1, 3, 32, 32))).dtype.names[0])\n"
        "print(net.features[1].weight.dtype.__name__)\n"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    casts, out_dtype, weight_dtype = probe.stdout.split()
    assert int(casts) >= 2 * 20, probe.stderr[-2000:]  # data and weight of all 20 convolutions
    assert out_dtype == "bfloat16"
    assert weight_dtype == "float32"


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
