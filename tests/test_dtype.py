"""``--dtype``: bfloat16 through MXNet AMP on CPUs that have it, clear refusals elsewhere.

AMP changes the whole process once on, so every run that turns it on is a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mxnet as mx
import numpy as np
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
    inputs of every convolution, and the scores reach the loss as bfloat16."""
    seen = recorded_train(tiny_data, tmp_path / "bf16", "bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (row,) = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert 0 < row["loss"] < 10 and 0 <= row["test_acc"] <= 1
    assert seen["scores"] == ["bfloat16"]
    assert len(seen["convolutions"]) == 27  # mobilenet0.25
    for conv in seen["convolutions"]:  # data and weight
        assert {f"{conv}_amp_cast0_output", f"{conv}_amp_cast1_output"} <= set(seen["casts"])
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
