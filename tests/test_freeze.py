"""Freezing, BatchNorm freezing, lr_mult policies, the table, unfreezing and accumulation."""

from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon.model_zoo import vision

import gluon_ft  # noqa: F401  (thread settings before mxnet)
from gluon_ft.errors import UsageError
from gluon_ft.model.freeze import (
    FreezePlan,
    freeze,
    named_parts,
    needs_input_grad,
    parse_unfreeze_schedule,
    select,
    set_lr_policy,
    set_trainable_grad_req,
    trainable_table,
    unfreeze,
)
from gluon_ft.train import StepOptions, TrainConfig, make_trainer, train, train_epoch
from gluon_ft.train.devices import micro_batches

LOSS = gluon.loss.SoftmaxCrossEntropyLoss()


def resnet(ctx=None, seed: int = 0):
    """resnet18_v2 with 2 classes, initialized (shapes resolved) on ``ctx``."""
    mx.random.seed(seed)
    ctx = ctx or [mx.cpu()]
    net = vision.get_model("resnet18_v2", classes=2)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net(mx.nd.zeros((1, 3, 32, 32), ctx=ctx[0]))
    return net


def batch(n: int = 8, size: int = 32, seed: int = 1, ctx=None):
    rng = np.random.default_rng(seed)
    x = mx.nd.array(rng.normal(size=(n, 3, size, size)), ctx=ctx or mx.cpu())
    y = mx.nd.array(np.arange(n) % 2, ctx=ctx or mx.cpu())
    return x, y


def sgd(net, lr=0.1, wd=0.01, momentum=0.0, kvstore="device"):
    params = {"learning_rate": lr, "wd": wd}
    if momentum:
        params["momentum"] = momentum
    return gluon.Trainer(net.collect_params(), "sgd", params, kvstore=kvstore)


def steps(net, trainer, n: int = 3, xs=None):
    """``n`` SGD steps; ``xs`` a list of (x, y) per context (default one CPU batch)."""
    xs = xs or [batch()]
    for _ in range(n):
        with autograd.record():
            losses = [LOSS(net(x), y) for x, y in xs]
        autograd.backward(losses)
        trainer.step(sum(x.shape[0] for x, _ in xs))
    mx.nd.waitall()


def snapshot(block) -> dict[str, np.ndarray]:
    # MXNet 1.9.1 + oneDNN: right after the first (deferred-init) imperative forward, a conv
    # weight read with asnumpy() can race the in-place weight reorder and return wrong values
    # (measured: about 1 in 40 networks); waiting for all pending work first avoids it.
    mx.nd.waitall()
    return {name: p.data().asnumpy().copy() for name, p in block.collect_params().items()}


def changed(block, before) -> set[str]:
    """Names of the parameters whose values differ (bitwise) from ``before``."""
    mx.nd.waitall()
    return {
        name
        for name, p in block.collect_params().items()
        if not np.array_equal(p.data().asnumpy(), before[name])
    }


def stats_names(block) -> set[str]:
    return {n for n in block.collect_params() if n.endswith(("running_mean", "running_var"))}


# ----------------------------------------------------------------------------- parts


def test_parts_are_found_from_the_block_structure():
    net = resnet()
    parts = named_parts(net)
    assert list(parts) == [
        "features",
        "output",
        "stem",
        "stage1",
        "stage2",
        "stage3",
        "stage4",
        "all",
    ]
    assert parts["features"] == [net.features] and parts["output"] == [net.output]
    assert parts["stage1"] == [net.features[5]]
    # The final BatchNorm computes at stage 4's resolution, so it belongs to stage 4.
    assert parts["stage4"] == [net.features[8], net.features[9]]
    # A network without spatial maps has no stages; asking for one fails clearly.
    mlp = gluon.nn.HybridSequential()
    mlp.add(gluon.nn.Dense(8), gluon.nn.Dense(2))
    assert list(named_parts(mlp)) == ["features", "output", "all"]
    with pytest.raises(UsageError, match="Parts: features, output, all"):
        select(mlp, "stage1")


def test_select_by_regex_searches_names_and_attribute_paths():
    net = resnet()
    by_name = select(net, r"stage2_conv\d_weight$")
    assert len(by_name.params) == 5 and not by_name.batchnorms
    by_path = select(net, r"^features\.6\.0\.bn1\.")
    assert {p.name.rsplit("_", 1)[-1] for p in by_path.params} == {"gamma", "beta", "mean", "var"}
    assert len(by_path.batchnorms) == 1


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("stage9", "Unknown part 'stage9'.*Parts: features, output, stem, stage1..stage4, all"),
        ("conv_(nothing", "not a part of this network .* nor a valid regular expression"),
        (r"nothing_\d+", r"Unknown pattern .*matches no parameter name"),
    ],
)
def test_bad_patterns_raise_usage_errors_naming_the_parts(pattern, message):
    with pytest.raises(UsageError, match=message):
        freeze(resnet(), pattern)


# ----------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("when", ["no-hybridize", "before-hybridize", "after-hybridize"])
def test_frozen_features_stay_bitwise_unchanged_under_weight_decay(when):
    net = resnet()
    if when == "after-hybridize":
        # Train first with everything trainable, so the cached graph exists when freezing.
        net.hybridize(static_alloc=True, static_shape=True)
        trainer = sgd(net)
        steps(net, trainer, 1)
        change = freeze(net, "features")
    else:
        change = freeze(net, "features")
        if when == "before-hybridize":
            net.hybridize(static_alloc=True, static_shape=True)
        trainer = sgd(net)
    assert len(change.params) == 56 and len(change.batchnorms) == 19
    before = snapshot(net)
    steps(net, trainer, 3)
    moved = changed(net, before)
    assert moved == set(net.output.collect_params()), moved
    assert stats_names(net.features) <= set(before)  # running statistics were compared too


@pytest.mark.parametrize("hybridize", [False, True])
def test_frozen_features_give_the_same_output_in_record_and_predict_mode(hybridize):
    net = resnet()
    x, _ = batch()
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
        net(x)  # the cached graph exists before the freeze
    # The trap first: grad_req='null' alone leaves BatchNorm on batch statistics.
    net.features.collect_params().setattr("grad_req", "null")
    with autograd.record():
        trained = net.features(x).asnumpy()
    assert np.abs(trained - net.features(x).asnumpy()).max() > 0.1
    freeze(net, "features")
    with autograd.record():
        trained = net.features(x).asnumpy()
    np.testing.assert_allclose(trained, net.features(x).asnumpy(), rtol=1e-5, atol=1e-5)


def test_a_batchnorm_frozen_between_trainable_layers_keeps_its_statistics():
    net = resnet()
    stage2 = net.features[6]
    net.hybridize(static_alloc=True, static_shape=True)
    # The trap: with grad_req='null' alone, stage 2's running statistics still move.
    stage2.collect_params().setattr("grad_req", "null")
    trainer = sgd(net)
    before = snapshot(stage2)
    steps(net, trainer, 1)
    assert changed(stage2, before) == stats_names(stage2)

    freeze(net, "stage2")
    before, before_stage3 = snapshot(stage2), snapshot(net.features[7])
    steps(net, trainer, 3)
    assert changed(stage2, before) == set()
    # Its neighbours keep training: weights and statistics of stage 3 move.
    assert stats_names(net.features[7]) <= changed(net.features[7], before_stage3)


def test_bn_train_opt_out_leaves_batchnorm_training_inside_a_frozen_part():
    net = resnet()
    change = freeze(net, "features", bn="train")
    assert not change.batchnorms
    stage1 = net.features[5]
    assert stage1[0].bn1._kwargs["use_global_stats"] is False
    reqs = {n.rsplit("_", 1)[-1]: p.grad_req for n, p in stage1.collect_params().items()}
    assert reqs["weight"] == "null" and reqs["gamma"] == "write" and reqs["beta"] == "write"
    before = snapshot(stage1)
    steps(net, sgd(net), 1)
    moved = changed(stage1, before)
    assert stats_names(stage1) <= moved and not any(n.endswith("weight") for n in moved)


def test_unfreeze_restores_training_and_the_trainer_updates_newly_trainable_params():
    ctx = [mx.cpu(0), mx.cpu(1)]
    net = resnet(ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    freeze(net, "all")
    unfreeze(net, "output")
    trainer = sgd(net)  # built while everything but the head is frozen; kvstore on 2 devices
    xs = [batch(4, seed=s, ctx=c) for s, c in enumerate(ctx)]
    steps(net, trainer, 1, xs)

    change = unfreeze(net, "stage4")
    assert change.batchnorms and change.params
    assert all(
        p.grad_req == "write"
        for n, p in net.features[8].collect_params().items()
        if "running" not in n
    )
    before = snapshot(net)
    steps(net, trainer, 2, xs)
    moved = changed(net, before)
    assert set(net.features[8].collect_params()) <= moved  # weights and statistics
    assert not moved & set(net.features[7].collect_params())
    # Both devices hold the same, updated weights (running statistics are per device).
    for p in net.features[8].collect_params().values():
        if p.grad_req == "null":
            continue
        np.testing.assert_array_equal(p.data(ctx[0]).asnumpy(), p.data(ctx[1]).asnumpy())
    assert not unfreeze(net, "stage4")  # nothing left to change


# ----------------------------------------------------------------------------- lr policies


def effective_lrs(net, lr: float = 0.1) -> dict[str, float]:
    """One SGD step (wd 0, momentum 0): update / gradient for every trainable parameter."""
    trainer = sgd(net, lr=lr, wd=0.0)
    x, y = batch()
    with autograd.record():
        loss = LOSS(net(x), y)
    loss.backward()
    params = {n: p for n, p in net.collect_params().items() if p.grad_req != "null"}
    grads = {n: p.grad().asnumpy().copy() for n, p in params.items()}
    before = {n: p.data().asnumpy().copy() for n, p in params.items()}
    trainer.step(1)
    out = {}
    for n, p in params.items():
        update, grad = before[n] - p.data().asnumpy(), grads[n]
        if np.abs(grad).max() > 1e-6:
            out[n] = float((update * grad).sum() / (grad * grad).sum())
    return out


def expected_decay_mult(name: str, decay: float, head: float) -> float:
    """The policy, written out from resnet18_v2's parameter names."""
    if "dense" in name:
        return head
    for k, stage in enumerate(("stage4", "stage3", "stage2", "stage1"), 1):
        if stage in name:
            return decay**k
    if "batchnorm2" in name:  # the final BatchNorm after stage 4
        return decay
    return decay**5  # the stem


def expected_spread_mult(name: str, spread: float, head: float) -> float:
    """fastai's three groups, written out from resnet18_v2's parameter names."""
    if "dense" in name:
        return head
    if "stage" in name or "batchnorm2" in name:  # the final BatchNorm computes at 1/32
        return spread**-0.5
    return 1.0 / spread  # the stem


@pytest.mark.parametrize("policy", ["head", "layer-decay", "spread"])
def test_effective_learning_rate_is_lr_times_the_policy_multiplier(policy):
    net = resnet()
    net.hybridize(static_alloc=True, static_shape=True)
    net(batch()[0])  # the policy is set after hybridize() and a cached graph
    lr = 0.1
    if policy == "head":
        applied = set_lr_policy(net, head_lr_mult=10)
        assert applied == {"output": 10}
        expected = {n: 10.0 if "dense" in n else 1.0 for n in net.collect_params()}
    elif policy == "layer-decay":
        applied = set_lr_policy(net, head_lr_mult=10, layer_decay=0.5)
        assert applied["stage4"] == 0.5 and applied["stem"] == 0.5**5
        expected = {n: expected_decay_mult(n, 0.5, 10) for n in net.collect_params()}
    else:
        applied = set_lr_policy(net, head_lr_mult=1, spread=100)
        assert applied["stage1"] == applied["stage4"] == 0.1 and applied["stem"] == 0.01
        expected = {n: expected_spread_mult(n, 100, 1) for n in net.collect_params()}
    measured = effective_lrs(net, lr)
    assert len(measured) > 50
    for name, value in measured.items():
        assert value == pytest.approx(lr * expected[name], rel=1e-3), name
    table = {row.name: row.lr_mult for row in trainable_table(net).rows}
    assert all(table[n] == pytest.approx(expected[n]) for n in measured)


def test_layer_decay_needs_stages():
    mlp = gluon.nn.HybridSequential()
    mlp.add(gluon.nn.Dense(8), gluon.nn.Dense(2))
    with pytest.raises(UsageError, match="needs a network built from stages"):
        set_lr_policy(mlp, layer_decay=0.5)
    with pytest.raises(UsageError, match="needs a network built from stages"):
        set_lr_policy(mlp, spread=50)
    with pytest.raises(UsageError, match="pass one"):
        FreezePlan(layer_lr_decay=0.5, lr_spread=50).validate(5)
    with pytest.raises(UsageError, match="at least 1"):
        FreezePlan(lr_spread=0.5).validate(5)


# ----------------------------------------------------------------------------- the table


def test_the_table_has_one_row_per_parameter_and_totals_in_three_forms():
    net = resnet()
    freeze(net, "features")
    table = trainable_table(net)
    params = dict(net.collect_params().items())
    assert [r.name for r in table.rows] == list(params)
    head = table.rows[-2]
    assert (head.name, head.shape, head.grad_req, head.lr_mult, head.count) == (
        net.output.weight.name,
        (2, 512),
        "write",
        1.0,
        1024,
    )
    total = sum(int(np.prod(p.shape)) for p in params.values())
    assert table.trainable_count == 1026 and table.trainable_count + table.frozen_count == total
    text = str(table)
    assert text.splitlines()[0].split() == [
        "name",
        "shape",
        "grad_req",
        "lr_mult",
        "wd_mult",
        "count",
    ]
    assert "trainable: 1,026 in 2 parameter(s)" in text
    assert f"frozen: {total - 1026:,} in {len(params) - 2} parameter(s)" in text
    assert "BatchNorm layers on running statistics in training: 19 of 19" in text
    markdown = table.to_markdown()
    assert markdown.count("\n| ") == len(params) and "| 2x512 | write |" in markdown
    page = table._repr_html_()
    assert page.count("<tr>") == len(params) + 1 and "<li>trainable: 1,026" in page


# ----------------------------------------------------------------------------- schedules


def test_unfreeze_schedule_parsing_and_validation():
    assert parse_unfreeze_schedule("2:stage4, 0:output ,4:all") == [
        (0, "output"),
        (2, "stage4"),
        (4, "all"),
    ]
    for bad in ("output", "x:all", "-1:all", "1:"):
        with pytest.raises(UsageError, match="EPOCH:PART"):
            parse_unfreeze_schedule(bad)
    with pytest.raises(UsageError, match="unfreezes nothing at epoch 0"):
        FreezePlan(unfreeze_at="1:all").validate(epochs=3)
    with pytest.raises(UsageError, match="after the last epoch"):
        FreezePlan(unfreeze_at="0:output,3:all").validate(epochs=3)
    with pytest.raises(UsageError, match="pass only one"):
        FreezePlan(freeze="features", unfreeze_at="0:output").validate(epochs=3)


def test_freeze_plan_steps_through_the_schedule_idempotently():
    net = resnet()
    plan = FreezePlan(unfreeze_at="0:output,2:stage4,4:all", accumulate=2)
    plan.setup(net)

    def trainable():
        return {n for n, p in net.collect_params().items() if p.grad_req != "null"}

    assert trainable() == set(net.output.collect_params())
    assert {p.grad_req for p in net.output.collect_params().values()} == {"add"}
    assert plan.at_epoch(net, 1) == []
    assert [c.pattern for c in plan.at_epoch(net, 2)] == ["stage4"]
    assert any(n.endswith("stage4_conv0_weight") for n in trainable())
    assert not any(n.endswith("stage3_conv0_weight") for n in trainable())
    # A resumed run starting at epoch 5 reaches the final state in one call.
    fresh = resnet()
    plan.setup(fresh)
    assert [c.pattern for c in plan.at_epoch(fresh, 5)] == ["stage4", "all"]
    assert {p.grad_req for p in fresh.collect_params().values()} == {"add", "null"}
    assert all(
        p.grad_req == "add" for n, p in fresh.collect_params().items() if n.endswith("weight")
    )


def test_train_with_unfreeze_schedule_and_accumulation_records_what_was_frozen(tiny_data, tmp_path):
    config = TrainConfig(
        data=str(tiny_data),
        pretrained="none",
        epochs=3,
        batch_size=6,
        image_size=32,
        ctx="cpu:2",  # with accumulation over two devices, end to end
        accumulate=2,
        unfreeze_at="0:output,1:stage4,2:all",
        out=str(tmp_path / "run"),
        progress=False,
    )
    result = train(config)
    history = result["history"]
    counts = [row["trainable_params"] for row in history]
    assert counts[0] == 1026 and counts[0] < counts[1] < counts[2]
    assert [row.get("unfrozen") for row in history] == [None, ["stage4"], ["all"]]
    frozen = [row["frozen_params"] for row in history]
    assert frozen[0] > frozen[1] > frozen[2] > 0  # at the end only running statistics
    run = result["run_dir"]
    recorded = json.loads((run / "config.json").read_text())["frozen"]
    assert recorded["unfreeze_at"] == ["0:output", "1:stage4", "2:all"]
    assert recorded["accumulate"] == 2
    assert recorded["trainable_params"] == 1026 and len(recorded["frozen"]) == 56
    log = (run / "trainable.txt").read_text()
    assert log.count("## epoch") == 3 and "## epoch 3: unfroze all" in log


def test_train_freeze_features_is_recorded(tiny_data, tmp_path):
    result = train(
        TrainConfig(
            data=str(tiny_data),
            pretrained="none",
            epochs=1,
            batch_size=12,
            image_size=32,
            ctx="cpu",
            freeze="features",
            out=str(tmp_path / "run"),
            progress=False,
        )
    )
    recorded = json.loads((result["run_dir"] / "config.json").read_text())["frozen"]
    assert recorded["freeze"] == "features" and recorded["bn"] == "freeze"
    assert len(recorded["frozen"]) == 56 and len(recorded["batchnorm_on_running_stats"]) == 19
    assert result["history"][0]["trainable_params"] == 1026


# ----------------------------------------------------------------------------- accumulation


def small_net(ctx):
    """Conv + Dense, no BatchNorm: nothing in it depends on how a batch is split."""
    mx.random.seed(3)
    net = gluon.nn.HybridSequential()
    net.add(
        gluon.nn.Conv2D(4, 3, activation="relu"),
        gluon.nn.GlobalAvgPool2D(),
        gluon.nn.Dense(3),
    )
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def host_batches(count: int, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(0, 256, size=(size, 12, 12, 3), dtype=np.uint8),
            rng.integers(0, 3, size=size),
            0,
        )
        for _ in range(count)
    ]


def run_steps(ctx, accumulate: int, freeze_first: bool = False):
    net = small_net(ctx)
    net(mx.nd.zeros((1, 3, 12, 12), ctx=ctx[0]))
    config = TrainConfig(batch_size=32, lr=0.1, wd=0.01, accumulate=accumulate, log_every=100)
    if freeze_first:
        freeze(net, r"conv\d+_weight")
    set_trainable_grad_req(net, config.freeze_plan().grad_req)
    trainer = make_trainer(net, config, ctx)
    before = snapshot(net)
    train_epoch(net, trainer, host_batches(2), ctx, LOSS, options=StepOptions.of(config))
    return net, before


@pytest.mark.parametrize("ctx_count", [1, 2])
def test_four_micro_batches_of_eight_update_as_one_batch_of_32(ctx_count):
    reference, _ = run_steps([mx.cpu()], accumulate=1)
    ctx = [mx.cpu(i) for i in range(ctx_count)]
    accumulated, before = run_steps(ctx, accumulate=4)
    assert {p.grad_req for p in accumulated.collect_params().values()} == {"add"}
    for (name, p), q in zip(
        accumulated.collect_params().items(), reference.collect_params().values()
    ):
        assert not np.array_equal(p.data().asnumpy(), before[name])  # two real steps
        np.testing.assert_allclose(p.data().asnumpy(), q.data().asnumpy(), rtol=1e-5, atol=1e-6)
        for c in ctx:  # gradients are zeroed after each step
            assert not p.grad(c).asnumpy().any()


def test_accumulation_keeps_frozen_parameters_null_and_fixed():
    net, before = run_steps([mx.cpu(0), mx.cpu(1)], accumulate=4, freeze_first=True)
    reqs = {n: p.grad_req for n, p in net.collect_params().items()}
    conv = [n for n in reqs if "conv" in n and n.endswith("weight")]
    assert [reqs[n] for n in conv] == ["null"]
    assert {reqs[n] for n in reqs if n not in conv} == {"add"}
    assert changed(net, before) == set(reqs) - set(conv)


def test_micro_batches_split_evenly_and_cope_with_short_batches():
    images, labels = np.arange(10 * 2).reshape(10, 2), np.arange(10)
    parts = micro_batches(images, labels, 4)
    assert [len(y) for _, y in parts] == [3, 3, 2, 2]
    assert np.array_equal(np.concatenate([y for _, y in parts]), labels)
    assert [len(y) for _, y in micro_batches(images[:2], labels[:2], 4)] == [1, 1]


# ----------------------------------------------------------------------------- the CLI


def test_cli_freeze_pattern_matching_nothing_exits_2_naming_the_parts(tiny_data, tmp_path, cli):
    common = ["train", "--data", str(tiny_data), "--pretrained", "none", "--image-size", "32"]
    result = cli(*common, "--freeze", "no_such_layer", "--out", str(tmp_path / "a"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Parts: features, output, stem, stage1..stage4, all" in result.stderr
    result = cli(*common, "--unfreeze-at", "0:output,1:stage7", "--out", str(tmp_path / "b"))
    assert result.returncode == 2, result.stderr
    assert "Unknown part 'stage7'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("input_grad", [False, True])
def test_an_input_batchnorm_without_parameters_moves_its_statistics_with_the_inputs_gradient(
    input_grad,
):
    from gluon_ft.train.step import MetricSums, train_batch

    mx.random.seed(0)
    net = gluon.nn.HybridSequential()  # ResNet v2's start: BatchNorm without gamma and beta
    net.add(gluon.nn.BatchNorm(scale=False, center=False, in_channels=3))
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3), gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(2))
    net.initialize()
    net.hybridize(static_alloc=True, static_shape=True)
    assert needs_input_grad(net)
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    options = StepOptions("float32", 1, 10, input_grad=input_grad)
    before = net[0].running_mean.data().asnumpy().copy()
    train_batch(
        net,
        trainer,
        images,
        np.array([0, 1, 0, 1]),
        [mx.cpu()],
        LOSS,
        MetricSums([mx.cpu()]),
        options=options,
    )
    net(mx.nd.zeros((4, 3, 8, 8)))  # a cached graph writes them back at its next call
    moved = not np.array_equal(net[0].running_mean.data().asnumpy(), before)
    assert moved == input_grad  # without it MXNet skips the layer's backward, and its update
    net[0]._kwargs["use_global_stats"] = True  # frozen (--bn freeze, inference): not needed
    assert not needs_input_grad(net)
