"""What the notebooks in ``notebooks/`` share: the data they run on, and running them.

Every notebook starts with ``setup = choose_data()``. The switch is one environment variable,
``GLUON_FT_NOTEBOOK_MODE``:

- ``full`` (the default, for a person): the book's run, the hot-dog dataset and the ImageNet
  weights of ``resnet18_v2`` at 224 px, 5 epochs. When either cannot be had (an offline
  machine), the note says how to get them, and the notebook falls back to the real photos of
  ``../shared/data/hotdog-small`` with the food model of ``../shared/models`` when they are
  there, else to the built-in synthetic task of ``gluon-ft demo``.
- ``smoke`` (the tests): the same notebooks in seconds, on ``hotdog-small`` and the food model
  (when there) or a small synthetic task, tiny images and one epoch.

``python -m gluon_ft.notebook run notebooks/*.ipynb`` executes notebooks in place with a
Jupyter kernel of this Python (``make notebooks``); ``strip`` removes their outputs again
before a commit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from gluon_ft.errors import UsageError
from gluon_ft.train import TrainConfig

with warnings.catch_warnings():
    # In a kernel without ipywidgets, tqdm.auto warns on import (train imports it). Notebook
    # runs turn progress bars off, so the warning would only be noise in every notebook.
    warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401

MODE_VARIABLE = "GLUON_FT_NOTEBOOK_MODE"
OUT_VARIABLE = "GLUON_FT_NOTEBOOK_OUT"  # where run directories go; default runs/notebooks
SHARED_VARIABLE = "GLUON_FT_SHARED"  # the shared data folder; default ../shared
MODES = ("full", "smoke")
MODEL = "resnet18_v2"
HOTDOG_SMALL = Path("data") / "hotdog-small"
FOOD_MODEL = Path("models") / "resnet18_v2-food100-64px.params"

_PACKAGE_PARENT = Path(__file__).resolve().parents[1]


@dataclass
class NotebookSetup:
    """The data, source weights and sizes a notebook runs with, and why they were chosen.

    ``train_config`` and ``scratch_config`` turn it into the book's two recipes.
    """

    mode: str
    task: str  # "hotdog" (the book's), "hotdog-small" (real photos) or "synthetic"
    data_dir: Path
    pretrained: str  # "imagenet" or a .params file
    image_size: int
    epochs: int
    note: str  # what was chosen and why, in markdown; every notebook shows it
    run_dir: Path  # every run and PNG of this notebook goes under it
    batch_size: int = 128
    lr: float = 0.01
    scratch_lr: float = 0.1
    momentum: float = 0.0
    wd: float = 0.001
    crop_scale: float = 0.08  # smallest area of the random train crops (the book's)
    lrs: tuple[float, ...] = (0.01, 0.1)  # exercises 1-2: the learning rates swept
    model: str = MODEL
    seed: int = 0
    fallback: bool = False  # full mode that could not get the book's data or weights

    def train_config(self, name: str, **overrides) -> TrainConfig:
        """The fine-tuning recipe (graft, head lr x10) as a run ``run_dir/name``."""
        settings = dict(
            data=str(self.data_dir),
            model=self.model,
            pretrained=self.pretrained,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            wd=self.wd,
            image_size=self.image_size,
            crop_scale=self.crop_scale,
            seed=self.seed,
            progress=False,
            out=str(self.run_dir / name),
        )
        return TrainConfig(**{**settings, **overrides})

    def scratch_config(self, name: str, **overrides) -> TrainConfig:
        """The book's comparison: the same network from scratch, lr 0.1, no head multiplier."""
        scratch = {"pretrained": "none", "lr": self.scratch_lr, "head_lr_mult": 1.0}
        return self.train_config(name, **{**scratch, **overrides})

    def png(self, name: str) -> Path:
        """The path of a figure under ``run_dir``."""
        return self.run_dir / f"{name}.png"

    def _repr_markdown_(self) -> str:
        rows = [
            ("mode", self.mode),
            ("data", f"{self.task}: `{self.data_dir}`"),
            ("source weights", f"`{self.pretrained}` ({self.model})"),
            (
                "image size, epochs, batch",
                f"{self.image_size} px (crops of {self.crop_scale:.0%}+ of the area), "
                f"{self.epochs}, {self.batch_size}",
            ),
            ("fine-tune lr / scratch lr", f"{self.lr:g} (head x10) / {self.scratch_lr:g}"),
            ("momentum, wd", f"{self.momentum:g}, {self.wd:g}"),
            ("run directory", f"`{self.run_dir}`"),
        ]
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return f"{self.note}\n\n| setting | value |\n|---|---|\n{table}\n"


@dataclass
class _Source:
    task: str
    data_dir: Path
    pretrained: str
    settings: dict = field(default_factory=dict)
    description: str = ""


def shared_dir() -> Path:
    """``$GLUON_FT_SHARED``, else the ``shared`` folder beside the repository."""
    return Path(os.environ.get(SHARED_VARIABLE) or _PACKAGE_PARENT.parent / "shared")


def out_root() -> Path:
    """``$GLUON_FT_NOTEBOOK_OUT``, else ``runs/notebooks`` of the repository (or of the cwd)."""
    if os.environ.get(OUT_VARIABLE):
        return Path(os.environ[OUT_VARIABLE]).expanduser()
    is_checkout = (_PACKAGE_PARENT / "notebooks").is_dir()
    return (_PACKAGE_PARENT if is_checkout else Path.cwd()) / "runs" / "notebooks"


def _new_run_dir(notebook: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        path = out_root() / (f"{notebook}-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise UsageError(f"Could not create a new run directory under {out_root()}.")


def _book_source() -> _Source:
    """The hot-dog dataset and the ImageNet weights; UsageError says how to get what is missing."""
    from gluon_ft.data.hotdog import hotdog_root
    from gluon_ft.model.graft import load_source_model

    problems = []
    data_dir = None
    try:
        data_dir = hotdog_root()
    except UsageError as err:
        problems.append(str(err))
    try:
        # The model store prints every retry; the UsageError says it all once.
        with contextlib.redirect_stdout(io.StringIO()):
            load_source_model(MODEL, "imagenet")
    except UsageError as err:
        problems.append(str(err))
    if problems:
        raise UsageError("\n\n".join(problems))
    return _Source(
        "hotdog",
        data_dir,
        "imagenet",
        dict(image_size=224, epochs=5, batch_size=128, lrs=(0.003, 0.01, 0.03, 0.1, 0.3)),
        "the book's run: the hot-dog dataset (2000 train, 800 test photos) and the ImageNet "
        f"weights of {MODEL}, at 224 px for 5 epochs with batch 128, lr 0.01 and no momentum",
    )


def _shared_source(smoke: bool) -> _Source | None:
    """``hotdog-small`` and the food model when both are there, else None."""
    data_dir, params = shared_dir() / HOTDOG_SMALL, shared_dir() / FOOD_MODEL
    if not ((data_dir / "train").is_dir() and params.is_file()):
        return None
    settings = dict(image_size=64, epochs=5, batch_size=32, momentum=0.9, wd=0.001)
    settings["lrs"] = (0.001, 0.003, 0.01, 0.03, 0.1)
    if smoke:
        settings.update(image_size=32, epochs=1, lrs=(0.01, 0.1))
    return _Source(
        "hotdog-small",
        data_dir,
        str(params),
        settings,
        "real photos of hot dogs and other food (`hotdog-small`: 200 train, 50 test, so a "
        "test accuracy moves in steps of 0.02 and is noisy) with a "
        f"{MODEL} pretrained on 100 other Food-101 classes at 64 px (no hot dogs among them); "
        "SGD with momentum 0.9, as an epoch has only 7 steps",
    )


def _synthetic_source(smoke: bool, log) -> _Source:
    """The built-in task of ``gluon-ft demo``, generated and pretrained once (cached)."""
    from gluon_ft.data.synthetic import SMALL_SPEC
    from gluon_ft.demo import DemoConfig, prepare_source

    demo = DemoConfig(progress=False)
    if smoke:
        demo = replace(demo, spec=SMALL_SPEC, pretrain_epochs=1, epochs=1, batch_size=8)
    task, params = prepare_source(demo, log=log)
    settings = dict(
        image_size=demo.spec.image_size,
        epochs=demo.epochs,
        batch_size=demo.batch_size,
        lr=demo.finetune_lr,
        scratch_lr=demo.scratch_lr,
        momentum=demo.momentum,
        wd=demo.wd,
        crop_scale=demo.crop_scale,
        lrs=(0.01, 0.1) if smoke else (0.001, 0.003, 0.01, 0.03, 0.1),
    )
    source, target = task["classes"]["source"], task["classes"]["target"]
    return _Source(
        "synthetic",
        Path(task["target"]),
        str(params),
        settings,
        f"the built-in synthetic transfer task of `gluon-ft demo`: {len(target)} target "
        f"classes ({', '.join(target)}) that are new combinations of the textures and shapes "
        f"of the {len(source)} source classes the source model was pretrained on",
    )


def choose_data(
    mode: str | None = None, notebook: str = "notebook", log=lambda message: None
) -> NotebookSetup:
    """Choose the data, source weights and sizes of a notebook run, and make its run directory.

    Parameters
    ----------
    mode : {"full", "smoke"}, optional
        Default ``$GLUON_FT_NOTEBOOK_MODE``, else ``full``. ``full`` is the book's run (the
        hot-dog dataset, ImageNet weights), falling back with a note when they cannot be had;
        ``smoke`` is the seconds-long version the tests run.
    notebook : str
        Names the run directory, ``<out_root()>/<notebook>-<time>``.
    log : callable
        Receives progress lines (the synthetic task's generation and pretraining).

    Raises
    ------
    UsageError
        An unknown mode.
    """
    mode = (mode or os.environ.get(MODE_VARIABLE) or "full").strip().lower()
    if mode not in MODES:
        raise UsageError(f"{MODE_VARIABLE}={mode!r}: use one of {', '.join(MODES)}.")
    smoke = mode == "smoke"
    missing = None
    source = None
    if not smoke:
        try:
            source = _book_source()
        except UsageError as err:
            missing = str(err)
    if source is None:
        source = _shared_source(smoke) or _synthetic_source(smoke, log)
    if smoke:
        note = f"**Smoke mode** (`{MODE_VARIABLE}=smoke`, for the tests): {source.description}."
        note += " Tiny images and one epoch: the numbers show the mechanics, not the results."
    elif missing:
        quoted = "\n".join(f"> {line}" if line else ">" for line in missing.splitlines())
        note = (
            "**Note: falling back from the book's data.** The hot-dog dataset or the ImageNet "
            f"weights could not be had:\n\n{quoted}\n\nInstead, this run uses "
            f"{source.description}. Every step is the same; the numbers are not the book's. "
            "Once the files are in place, run the notebook again."
        )
    else:
        note = f"**Full mode**: {source.description}."
    return NotebookSetup(
        mode=mode,
        task=source.task,
        data_dir=Path(source.data_dir),
        pretrained=source.pretrained,
        note=note,
        run_dir=_new_run_dir(notebook),
        fallback=missing is not None,
        **source.settings,
    )


def train_network(net, config: TrainConfig) -> list[dict]:
    """Train a network built by hand (e.g. exercise 4's head) with the loop of ``train``.

    The same loaders, Trainer, per-step seeds, learning-rate schedule and epoch engine as
    :func:`gluon_ft.train.train`, without the run directory, for a network whose
    construction ``train`` does not offer.

    Returns
    -------
    list of dict
        ``{"epoch", "loss", "train_acc", "test_acc"}`` per epoch, after a row for epoch 0:
        the test accuracy before any training.
    """
    from mxnet import gluon

    from gluon_ft.data.loaders import set_epoch
    from gluon_ft.train import (
        EpochSteps,
        StepOptions,
        StopRequest,
        evaluate,
        image_loaders,
        load_dataset,
        make_trainer,
        parse_contexts,
        train_epoch,
    )
    from gluon_ft.train.schedule import LrSchedule

    config.validate()
    ctx = parse_contexts(config.ctx)
    net.collect_params().reset_ctx(ctx)
    parts = load_dataset(config.data, config.val_split, config.test_split, config.seed)
    train_loader, test_loader = image_loaders(config, parts.train, parts.test)
    net.hybridize(static_alloc=True, static_shape=True)
    nan = float("nan")
    history = [
        {"epoch": 0, "loss": nan, "train_acc": nan, "test_acc": evaluate(net, test_loader, ctx)}
    ]
    trainer = make_trainer(net, config, ctx)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    set_lr = LrSchedule.of(config, len(train_loader)).setter(trainer)
    options = StepOptions.of(config)
    for epoch in range(config.epochs):
        set_epoch(train_loader, epoch)
        steps = EpochSteps(train_loader, config.seed, epoch, 0, StopRequest(), set_lr)
        sums, _, _ = train_epoch(net, trainer, steps, ctx, loss_fn, options=options)
        loss, train_acc = sums.read()
        test_acc = evaluate(net, test_loader, ctx)
        history.append(
            {"epoch": epoch + 1, "loss": loss, "train_acc": train_acc, "test_acc": test_acc}
        )
    return history


# ----------------------------------------------------------------------------- running them


def execute_notebook(nb, folder: str | Path, timeout: int | None = None, env: dict | None = None):
    """Run every cell of the notebook ``nb`` in place, in a fresh kernel of this Python.

    The kernel starts in ``folder`` (the notebook's own, for its relative paths) with ``env``
    (default: this process's environment). The kernel spec comes from this environment only
    (``sys.prefix``), so another ``python3`` kernel of the user's is never picked.
    ``timeout`` limits each cell, in seconds (None: no limit; a full-mode sweep on a CPU takes
    an hour).

    Returns
    -------
    nbformat.NotebookNode
        ``nb``, executed.

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        A cell raised; ``nb`` holds the outputs up to it.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    specs = KernelSpecManager(kernel_dirs=[str(Path(sys.prefix) / "share" / "jupyter" / "kernels")])
    manager = KernelManager(kernel_name="python3", kernel_spec_manager=specs)
    client = NotebookClient(
        nb, km=manager, timeout=timeout, resources={"metadata": {"path": str(folder)}}
    )
    try:
        client.execute(env=dict(os.environ if env is None else env))
    finally:
        # The client leaves a kernel it was handed running; stop it and reap its process.
        if manager.has_kernel:
            manager.shutdown_kernel(now=False)
    return nb


def cells_with_outputs(nb) -> list[int]:
    """Indices of the code cells that carry outputs or an execution count."""
    return [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]


def strip_outputs(nb):
    """Remove every output and execution count, in place; return the notebook."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def main(argv: list[str] | None = None) -> int:
    """``run PATH...`` executes notebooks in place; ``strip PATH...`` removes their outputs."""
    import nbformat

    parser = argparse.ArgumentParser(prog="python -m gluon_ft.notebook", description=__doc__)
    parser.add_argument("action", choices=("run", "strip"))
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.paths:
        if args.action == "strip":
            nbformat.write(strip_outputs(nbformat.read(path, as_version=4)), path)
            print(f"stripped {path}")
            continue
        from nbclient.exceptions import CellExecutionError

        started = time.perf_counter()
        print(f"running {path} ({MODE_VARIABLE}={os.environ.get(MODE_VARIABLE, 'full')})")
        nb = nbformat.read(path, as_version=4)
        try:
            execute_notebook(nb, path.parent)
        except CellExecutionError as err:
            nbformat.write(nb, path)  # the outputs up to the failed cell, to read in Jupyter
            print(f"{path}: a cell failed:\n{err}", file=sys.stderr)
            return 1
        nbformat.write(nb, path)
        print(f"wrote {path} with outputs ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
