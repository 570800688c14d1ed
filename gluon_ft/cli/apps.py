"""``demo``, ``bench`` and ``models``: the offline demo, the benches, the model catalogue."""

from __future__ import annotations

import argparse
import sys

from gluon_ft.cli.common import Command, positive_int


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from gluon_ft.demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--seed", type=int, default=d.seed, help="task, init and order seed")
    p.add_argument(
        "--size",
        choices=["default", "small"],
        default="default",
        help="small: a tiny task for smoke tests (accuracy means nothing there)",
    )
    p.add_argument(
        "--epochs", type=positive_int, default=d.epochs, help="target epochs (default %(default)s)"
    )
    p.add_argument("--pretrain-epochs", type=positive_int, default=d.pretrain_epochs)
    p.add_argument("--out", default=None, help="output folder (default runs/demo-<time>)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="task and source model cache (default $MXNET_HOME/gluon-ft/demo)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gluon_ft.data.synthetic import DEFAULT_SPEC, SMALL_SPEC
    from gluon_ft.demo import REAL_RUN_NOTE, DemoConfig, format_table, run_demo

    config = DemoConfig(
        seed=args.seed,
        spec=SMALL_SPEC if args.size == "small" else DEFAULT_SPEC,
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        out=Path(args.out) if args.out else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        progress=args.progress,
    )
    result = run_demo(config)
    results = result["results"]
    print()
    print("test accuracy on the target task")
    print(format_table(results))
    if {"fine-tuned", "scratch"} <= results.keys():
        gain = results["fine-tuned"]["test_acc"] - results["scratch"]["test_acc"]
        epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
        print(f"\nfine-tuned - scratch: {100 * gain:+.1f} points after {epochs}")
    print(f"\nplots: {result['comparison_png']}, {result['samples_png']}")
    print(f"runs and summary.json: {result['out']} ({result['total_seconds']:.0f} s in all)")
    print()
    print(REAL_RUN_NOTE)
    return 0


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes: under a minute when idle")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data loader processes for the loader and epoch figures (default: train's)",
    )
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument(
        "--run",
        dest="run_dir",
        metavar="RUN",
        help="a finished run: int8's (and fused bfloat16's) top-1 agreement with float32 on "
        "its test part (calibrating RUN/int8/ first if it has none), and the serve figures on "
        "it and its test photos (default: agreement not measured; serve on a random network)",
    )
    p.add_argument(
        "--onnxruntime",
        metavar="PYTHON",
        help="a Python interpreter that has onnxruntime, in a virtual environment of its own "
        "(its wheels need numpy>=1.24, MXNet <1.24): time ONNX Runtime on the bench's network "
        "exported to ONNX, in the same sitting",
    )
    g = p.add_argument_group(
        "recipes", "instead of the speed figures: the book's recipe against --recipe best"
    )
    g.add_argument(
        "--recipes",
        metavar="DATA",
        help="train the book's recipe, --recipe best and best without each ingredient on DATA, "
        "each seed in turn; prints test accuracy and wall time",
    )
    g.add_argument("--pretrained", metavar="FILE", help="the source model of --recipes")
    g.add_argument("--image-size", type=positive_int, default=64)
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        help="samples per step of each --recipes run (default %(default)s)",
    )
    g.add_argument(
        "--epochs",
        type=positive_int,
        default=5,
        help="epochs of each --recipes run (default %(default)s)",
    )
    g.add_argument("--seeds", type=positive_int, default=3)
    g.add_argument(
        "--no-ablation", dest="ablation", action="store_false", help="book and best only"
    )


def _run_recipe_bench(args: argparse.Namespace) -> dict:
    from gluon_ft.bench.recipes import markdown_table, run_recipe_bench
    from gluon_ft.errors import UsageError

    if not args.pretrained:
        raise UsageError("bench --recipes DATA needs --pretrained FILE (or imagenet).")
    result = run_recipe_bench(
        args.recipes,
        args.pretrained,
        args.image_size,
        args.batch_size,
        args.epochs,
        args.seeds,
        args.ablation,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(markdown_table(result))
    return result


def _run_bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from gluon_ft.bench.throughput import run_bench
    from gluon_ft.errors import UsageError

    if args.recipes:
        result = _run_recipe_bench(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must be >= 0.")
    result = run_bench(
        args.quick,
        args.workers,
        log=lambda line: print(line, file=sys.stderr),
        run=args.run_dir,
        onnxruntime=args.onnxruntime,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", help="only names matching this regex (e.g. resnet50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--parts",
        action="store_true",
        help="also list the parts --freeze, --unfreeze-at and --layer-lr-decay name (stem, "
        "stage1.., tail, output): their scale, parameters and blocks",
    )


def _print_parts(parts: list) -> None:
    for part in parts:
        blocks = " ".join(part.blocks)
        print(f"  {part.name:<8} {part.scale:>5} {part.params / 1e6:>7.2f}M  {blocks}")


def _run_models(args: argparse.Namespace) -> int:
    import json

    from gluon_ft.model.zoo import describe, matching_names

    names = matching_names(args.pattern)
    row = "{name:<24} {zoo:<8} {family:<22} {input_size:>5} {params:>8}  {weights}"
    if not args.json:
        print(
            row.format(
                name="name",
                zoo="zoo",
                family="family",
                input_size="input",
                params="params",
                weights="imagenet weights",
            )
        )
    for name in names:  # each row builds its network (about 0.1 s): print as we go
        info = describe(name).as_dict()
        parts = _model_parts(name, info["input_size"]) if args.parts else None
        if args.json:
            extra = {"parts": [part.as_dict() for part in parts]} if parts else {}
            print(json.dumps({**info, **extra}), flush=True)
            continue
        print(row.format(**{**info, "params": f"{info['params'] / 1e6:.1f}M"}), flush=True)
        if parts:
            _print_parts(parts)
    return 0


def _model_parts(name: str, image_size: int) -> list:
    from gluon_ft.model.graft import build_model
    from gluon_ft.model.parts import summarize_parts

    return summarize_parts(build_model(name, 1000), image_size)


DEMO = Command(
    "the offline end-to-end demo on the built-in synthetic transfer task",
    add_demo_arguments,
    _run_demo,
)
BENCH = Command(
    "measure throughput; print one JSON object",
    add_bench_arguments,
    _run_bench,
)
MODELS = Command(
    "list every fine-tunable model name with family, input size, parameters",
    add_models_arguments,
    _run_models,
)
