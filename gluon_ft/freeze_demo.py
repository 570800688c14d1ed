"""``python -m gluon_ft.freeze_demo``: the MXNet forum answer on freezing, made runnable.

The walk-through: print the network; look at ``features[1]`` and its parameters' ``grad_req``;
freeze the features and print the trainable-parameter table; take a few SGD steps with weight
decay; prove what changed and what did not (BatchNorm statistics included); show why BatchNorm
must be frozen too (train-mode vs eval-mode features); time a frozen step against a full one.

It uses the ImageNet weights of ``resnet18_v2`` when the model store has them, else a random
initialization (the mechanics are the same), so it runs offline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from gluon_ft.errors import GluonFTError, UsageError
from gluon_ft.model.freeze import freeze, named_parts, trainable_table, unfreeze
from gluon_ft.model.graft import SourceModel, graft_new_head, load_source_model, model_store_file

MODEL = "resnet18_v2"
RUNNING_STATS = ("running_mean", "running_var")


def load_source(say) -> SourceModel:
    """The ImageNet source if the model store has it, else a random one (said in one line)."""
    cached = model_store_file(MODEL)
    if cached.is_file():
        try:
            source = load_source_model(MODEL, "imagenet")
            say(f"Using the ImageNet weights of {MODEL} from {cached}.")
            return source
        except UsageError as err:
            say(f"The cached ImageNet weights could not be loaded ({err}); using a random init.")
    else:
        say(f"No ImageNet weights cached at {cached}; using a random initialization.")
    return load_source_model(MODEL, "none")


def snapshot(net: gluon.Block) -> dict[str, np.ndarray]:
    """A host copy of every parameter, by name."""
    # MXNet 1.9.1 + oneDNN: a read right after the first (deferred-init) forward can race the
    # in-place reorder of a conv weight and return wrong values; wait for pending work first.
    mx.nd.waitall()
    return {name: p.data().asnumpy() for name, p in net.collect_params().items()}


def changes_by_part(net: gluon.Block, before: dict[str, np.ndarray]) -> list[tuple]:
    """``(part, max |change| of weights, max |change| of running statistics)`` per part."""
    mx.nd.waitall()
    rows = []
    for part, blocks in named_parts(net).items():
        weights, stats = [0.0], [0.0]
        for block in blocks:
            for name, param in block.collect_params().items():
                delta = float(np.abs(param.data().asnumpy() - before[name]).max(initial=0.0))
                (stats if name.endswith(RUNNING_STATS) else weights).append(delta)
        rows.append((part, max(weights), max(stats)))
    return rows


def sgd_steps(net, trainer, x, y, steps: int) -> None:
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(steps):
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(x.shape[0])
    mx.nd.waitall()


def train_eval_gap(features: gluon.Block, x) -> float:
    """Max |features(x) in training mode - in predict mode|: what BatchNorm does differently."""
    predicted = features(x)
    with autograd.record():
        trained = features(x)
    return float((trained - predicted).abs().max().asscalar())


def median_step_seconds(net, trainer, x, y, warmup: int, repeats: int) -> float:
    """Median wall time of one training step (forward, backward, update), after warm-up."""
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        sgd_steps(net, trainer, x, y, 1)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace, say=print) -> bool:
    """Run the walk-through; return whether the frozen/changed proof held."""
    mx.random.seed(args.seed)
    source = load_source(say)
    net = graft_new_head(source, num_classes=2, head_lr_mult=10)
    x = mx.nd.random.normal(shape=(args.batch_size, 3, args.image_size, args.image_size))
    y = mx.nd.array(np.arange(args.batch_size) % 2)
    net(x)  # finishes the head's deferred initialization
    net.hybridize(static_alloc=True, static_shape=True)

    say("\n== 1. The network: print(net)\n")
    say(str(net))
    say("\n== 2. net.features[1] and its parameters\n")
    say(str(net.features[1]))
    for name, param in net.features[1].collect_params().items():
        say(f"{name}: grad_req={param.grad_req!r}, lr_mult={param.lr_mult:g}")

    say("\n== 3. freeze(net, \"features\"): grad_req='null' and BatchNorm on running stats\n")
    say(str(freeze(net, "features")))
    say("")
    say(str(trainable_table(net)))

    say(f"\n== 4. {args.steps} SGD steps, lr 0.01, wd 0.01, on {args.batch_size} images\n")
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "wd": 0.01})
    before = snapshot(net)
    sgd_steps(net, trainer, x, y, args.steps)
    rows = changes_by_part(net, before)
    say(f"{'part':<10}{'weights max|change|':>22}{'running stats max|change|':>28}  verdict")
    for part, weights, stats in rows:
        verdict = "unchanged (bitwise)" if weights == 0 and stats == 0 else "changed"
        say(f"{part:<10}{weights:>22.3g}{stats:>28.3g}  {verdict}")
    by_part = {part: (weights, stats) for part, weights, stats in rows}
    held = by_part["features"] == (0.0, 0.0) and by_part["output"][0] > 0
    if held:
        say(
            "PROOF: every frozen parameter and BatchNorm running statistic is bitwise "
            "unchanged despite weight decay; the head changed."
        )
    else:
        say("PROOF FAILED: the frozen features changed, or the head did not.")

    say("\n== 5. Train-mode vs eval-mode features, max |difference|\n")
    unfreeze(net, "features")
    net.features.collect_params().setattr("grad_req", "null")  # the forum's freeze, alone
    naive = train_eval_gap(net.features, x)
    freeze(net, "features")
    frozen = train_eval_gap(net.features, x)
    say(f"grad_req='null' alone (BatchNorm on batch statistics): {naive:.4g}")
    say(f"freeze(net, 'features') (BatchNorm on running statistics): {frozen:.4g}")

    say(f"\n== 6. Step time at {args.time_size} px, batch {args.time_batch} (hybridized)\n")
    xt = mx.nd.random.normal(shape=(args.time_batch, 3, args.time_size, args.time_size))
    yt = mx.nd.array(np.arange(args.time_batch) % 2)
    frozen_s = median_step_seconds(net, trainer, xt, yt, args.warmup, args.repeats)
    unfreeze(net, "all")
    full_s = median_step_seconds(net, trainer, xt, yt, args.warmup, args.repeats)
    say(f"frozen features: {args.time_batch / frozen_s:.1f} img/s ({frozen_s * 1e3:.0f} ms)")
    say(f"full fine-tune:  {args.time_batch / full_s:.1f} img/s ({full_s * 1e3:.0f} ms)")
    say(f"speed-up: {full_s / frozen_s:.2f}x (medians of {args.repeats}, {args.warmup} warm-up)")
    return held


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gluon_ft.freeze_demo", description=__doc__)
    p.add_argument("--image-size", type=int, default=64, help="images of the SGD steps")
    p.add_argument("--batch-size", type=int, default=8, help="batch of the SGD steps")
    p.add_argument("--steps", type=int, default=3, help="SGD steps before the proof")
    p.add_argument("--time-size", type=int, default=224, help="image size of the timing")
    p.add_argument("--time-batch", type=int, default=16, help="batch of the timing")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when the proof held, 1 when it did not, 2 on bad input."""
    args = build_parser().parse_args(argv)
    if min(args.image_size, args.batch_size, args.steps, args.time_size, args.time_batch) < 1:
        print("freeze_demo: sizes, batches and steps must be at least 1", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.warmup < 0:
        print("freeze_demo: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    try:
        return 0 if run(args) else 1
    except GluonFTError as err:
        print(f"freeze_demo: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
