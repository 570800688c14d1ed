"""``gluon-ft demo``: the whole fine-tuning recipe, offline, on the built-in transfer task.

The book's four steps, all runnable: (1) pretrain a source model on a source dataset;
(2) copy it except for its output layer; (3) add a new output layer; (4) train on the target.
Then the book's comparison (the same network from scratch) and exercise 3 (a frozen backbone).
Every run goes through the same code as ``gluon-ft pretrain`` and ``gluon-ft train``; the task
is written as real image files, so it takes the same data path as a user's folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from gluon_ft.data.synthetic import DEFAULT_SPEC, TaskSpec, generate_task
from gluon_ft.errors import Interrupted
from gluon_ft.paths import mxnet_home
from gluon_ft.train import TrainConfig, pretrain, train


@dataclass
class DemoConfig:
    """Sizes and hyperparameters of the demo; the defaults finish in about 3 minutes on 2 cores.

    Fine-tuned, scratch and frozen runs get the same epochs, batch size and augmentation; each
    keeps the learning rate its recipe uses (the book: 0.01 with a 10x head, 0.1 from
    scratch), with plain SGD as in the book. Pretraining the source is a from-scratch run on
    many images, where SGD with momentum and a warmed-up cosine schedule reach a good source
    model in 12 epochs (a constant lr 0.05 with momentum 0.9 diverged; 8 epochs gave a source
    too weak to transfer much). Random crops keep half the image area or more: at 32 px the
    book's 8 % crops hold too little of the shape to learn from.
    """

    seed: int = 0
    spec: TaskSpec = field(default_factory=lambda: DEFAULT_SPEC)
    model: str = "resnet18_v2"
    pretrain_epochs: int = 12
    pretrain_lr: float = 0.05
    pretrain_batch_size: int = 128
    pretrain_momentum: float = 0.9
    pretrain_schedule: str = "cosine"
    pretrain_warmup_epochs: float = 1.0
    epochs: int = 10
    batch_size: int = 16
    finetune_lr: float = 0.01
    scratch_lr: float = 0.1
    frozen_lr: float = 0.01
    momentum: float = 0.0
    wd: float = 0.001
    crop_scale: float = 0.5
    variants: tuple[str, ...] = ("fine-tuned", "scratch", "frozen")
    cache_dir: Path | None = None  # default $MXNET_HOME/gluon-ft/demo
    out: Path | None = None  # default runs/demo-<time>
    progress: bool = True

    def cache(self) -> Path:
        return Path(self.cache_dir or mxnet_home() / "gluon-ft" / "demo")


SAMPLES_PER_CLASS = 6  # columns of samples.png


def _key(obj) -> str:
    """A short stable hash of settings, naming what they produce in the cache."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def prepare_source(config: DemoConfig, log=print) -> tuple[dict, Path]:
    """Steps 0 and 1: generate the task and pretrain the source model, each reused if cached.

    Returns
    -------
    (task, params_file)
        ``task`` as :func:`gluon_ft.data.synthetic.generate_task` returns it; the source model's
        params file (with its sidecar JSON), ready for ``--pretrained``.
    """
    spec = replace(config.spec, seed=config.seed)
    task_dir = config.cache() / f"task-{_key(asdict(spec))}"
    task = generate_task(task_dir, spec)
    log(f"[1/5] task: {'reused' if task['reused'] else 'generated'} {task_dir}")
    pretrain_config = TrainConfig(
        data=str(task["source"]),
        model=config.model,
        epochs=config.pretrain_epochs,
        # The whole source set where it is smaller than the batch (--size small): the same one
        # batch an epoch as before, since train refuses a batch larger than its training set.
        batch_size=min(
            config.pretrain_batch_size, spec.n_source_classes * spec.source_train_per_class
        ),
        lr=config.pretrain_lr,
        momentum=config.pretrain_momentum,
        lr_schedule=config.pretrain_schedule,
        warmup_epochs=config.pretrain_warmup_epochs,
        wd=config.wd,
        image_size=spec.image_size,
        crop_scale=config.crop_scale,
        ctx="cpu",
        seed=config.seed,
        progress=config.progress,
    )
    # Every setting that changes the weights names the cached source model.
    recipe = {"spec": asdict(spec), **asdict(pretrain_config), "progress": None, "data": None}
    params = config.cache() / f"source-{_key(recipe)}.params"
    if params.is_file() and params.with_suffix(".json").is_file():
        log(f"[2/5] source model: reused {params}")
        return task, params
    log(f"[2/5] pretraining {config.model} on {len(task['classes']['source'])} source classes")
    pretrain_config.out = str(params.with_name(f"{params.stem}-{time.strftime('%H%M%S')}.run"))
    pretrain(pretrain_config, params)
    return task, params


def variant_config(config: DemoConfig, variant: str, target: Path, params: Path, out: Path):
    """The :class:`TrainConfig` of one demo variant: fine-tuned, scratch or frozen."""
    common = dict(
        data=str(target),
        model=config.model,
        epochs=config.epochs,
        batch_size=config.batch_size,
        momentum=config.momentum,
        wd=config.wd,
        image_size=config.spec.image_size,
        crop_scale=config.crop_scale,
        ctx="cpu",
        seed=config.seed,
        progress=config.progress,
        out=str(out / variant),
    )
    if variant == "fine-tuned":
        return TrainConfig(pretrained=str(params), lr=config.finetune_lr, **common)
    if variant == "scratch":
        return TrainConfig(pretrained="none", lr=config.scratch_lr, head_lr_mult=1.0, **common)
    if variant == "frozen":
        return TrainConfig(
            pretrained=str(params),
            lr=config.frozen_lr,
            freeze="features",
            cache_features=True,
            cache_views=config.epochs,
            **common,
        )
    raise ValueError(f"unknown demo variant {variant!r}")


def run_demo(config: DemoConfig, log=print) -> dict:
    """Run every step of the demo; write plots and a summary under ``config.out``.

    Returns
    -------
    dict
        ``{"out": Path, "results": {variant: {"history", "test_acc", "seconds"}},
        "comparison_png": Path, "samples_png": Path}``.
    """
    from gluon_ft.data.decode import load_image
    from gluon_ft.data.folders import scan_split
    from gluon_ft.deploy.plots import plot_comparison, show_images

    started = time.perf_counter()
    out = Path(config.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        task, params = prepare_source(config, log)
        target = Path(task["target"])
        out.mkdir(parents=True, exist_ok=True)
        results = {}
        for step, variant in enumerate(config.variants, start=3):
            log(f"[{step}/5] {variant}: training on {target.name} ({config.epochs} epochs)")
            t0 = time.perf_counter()
            run = train(variant_config(config, variant, target, params, out))
            results[variant] = {
                "history": run["history"],
                "test_acc": run["history"][-1]["test_acc"],
                "seconds": time.perf_counter() - t0,
                "run_dir": str(run["run_dir"]),
            }
    except Interrupted:
        # train's message says "--resume", which the demo does not take; its cache does it.
        raise Interrupted(
            "The demo was stopped (Ctrl-C or SIGTERM). Run it again: the generated task and a "
            "finished source model are reused from the cache, and the stopped step starts over."
        ) from None
    comparison = plot_comparison(
        {name: r["history"] for name, r in results.items()}, out / "comparison.png"
    )
    # One row per target class: the few images the target has to be learned from.
    split = scan_split(target / "train")
    rows = [[p for p, label in split.items if label == c] for c in range(len(split.classes))]
    cols = min(SAMPLES_PER_CLASS, *(len(row) for row in rows))
    samples = show_images(
        [load_image(p) for row in rows for p in row[:cols]],
        titles=[name if i == 0 else "" for name in split.classes for i in range(cols)],
        cols=cols,
        path=out / "samples.png",
    )
    summary = {
        "seed": config.seed,
        "task": {k: str(v) for k, v in task.items() if k != "spec"},
        "source_params": str(params),
        "results": results,
        "total_seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "out": out, "comparison_png": comparison, "samples_png": samples}


def format_table(results: dict) -> str:
    """The side-by-side table: test accuracy per epoch, final accuracy, wall time."""
    names = list(results)
    epochs = max(len(r["history"]) for r in results.values())
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["epoch".ljust(8) + "".join(n.rjust(width) for n in names)]
    for e in range(epochs):
        cells = []
        for n in names:
            hist = results[n]["history"]
            cells.append(f"{hist[e]['test_acc']:.3f}".rjust(width) if e < len(hist) else "")
        lines.append(str(e + 1).ljust(8) + "".join(cells))
    lines.append(
        "final".ljust(8) + "".join(f"{results[n]['test_acc']:.3f}".rjust(width) for n in names)
    )
    lines.append(
        "seconds".ljust(8) + "".join(f"{results[n]['seconds']:.0f}".rjust(width) for n in names)
    )
    return "\n".join(lines)


REAL_RUN_NOTE = """\
In the real hot-dog run (make train), what differs: nothing is pretrained there; the source is
resnet18_v2 pretrained on ImageNet (1.28M photos, 1000 classes; downloaded once, 46 MB)
instead of the synthetic source model above. The target is hotdog.zip (2000 train and 800
test photos, 261 MB) at 224 px instead of synthetic 32 px images, with the book's random crops
(8 % of the area or more), batch 128, lr 0.01 without momentum and 5 epochs. The graft, the
head x10, the trainer and the data path are the same code."""
