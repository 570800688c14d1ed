"""``gluon-ft bench --quick``: one JSON object on stdout, every figure positive and finite."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

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


@pytest.mark.slow  # half a minute of timed runs: .ci/run runs it after make test
def test_quick_bench_prints_one_json_object_with_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    done = run_cli("bench", "--quick", "--out", str(out), timeout=900)
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
