"""Classify images with a finished run: its network, its class names, its test transform.

The run is loaded once; each call classifies a list of images, and a bad one gets its own
error without stopping the others::

    predictor = Predictor("runs/hotdog-finetune")
    predictor.predict_images(["a.jpg", "b.txt"], top_k=2)
    # [{"source": "a.jpg", "ok": True,
    #   "top": [{"class": "hotdog", "index": 0, "probability": 0.93}, ...]},
    #  {"source": "b.txt", "ok": False, "error": "not an image (...)"}]

``gluon-ft predict`` prints these; ``gluon-ft serve`` returns them as JSON.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import gluon
from PIL import Image

from gluon_ft.data.decode import UnreadableImageError, load_image, to_rgb
from gluon_ft.data.folders import ImageFolderSplit
from gluon_ft.data.transforms import BOOK_RESIZE
from gluon_ft.data.tta import check_views, eval_transform, view_logits
from gluon_ft.deploy.inference import check_inference_dtype, choose_form, sample_input
from gluon_ft.deploy.int8 import DEFAULT_CALIBRATION_IMAGES, int8_form
from gluon_ft.errors import UsageError
from gluon_ft.model.graft import build_model, load_parameters

ImageInput = str | Path | bytes | Image.Image


@dataclass
class LoadedRun:
    """A finished run's network (on ``ctx``, in the form ``--dtype`` chose) and what it needs
    to classify. ``inference`` records that choice
    (:func:`gluon_ft.deploy.inference.choose_form`)."""

    path: Path
    config: dict
    classes: list[str]
    net: gluon.HybridBlock
    image_size: int
    ctx: mx.Context
    inference: dict = field(default_factory=lambda: {"dtype": "float32"})

    @property
    def eval_resize(self) -> float:
        """The run's ``--eval-resize``: its evaluation view (256/224, the book's, for runs
        from before the flag)."""
        return self.config.get("eval_resize", BOOK_RESIZE)


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise UsageError(f"{path} is missing: is {path.parent} a finished run directory?")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} ({what}) is not valid JSON: {err}") from None


def load_run(
    run_dir: str | Path,
    ctx: mx.Context | None = None,
    dtype: str = "float32",
    batch_size: int = 2,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
) -> LoadedRun:
    """Rebuild a finished run's network from ``config.json``, ``classes.json``, ``model.params``.

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by ``gluon-ft train``.
    ctx : Context, optional
        Where to run the network; the CPU by default.
    dtype : {"float32", "bfloat16", "int8", "auto"}
        The predict-mode form (see :mod:`gluon_ft.deploy.inference`): bfloat16 is the fused
        graph, int8 the quantized one (:mod:`gluon_ft.deploy.int8`).
    batch_size : int
        The batch the network will mostly see: bfloat16 plans for it, ``auto`` probes it.
    calibration_images : int
        int8: how many of the run's training images calibrate it.

    Raises
    ------
    UsageError
        The folder is not a finished run, a file is malformed, ``model.params`` does not fit
        the architecture and class count the run's JSON files describe, or ``dtype`` cannot
        run on ``ctx``.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UsageError(f"Run directory {run_dir} does not exist.")
    config = _read_json(run_dir / "config.json", "the run's settings")
    classes = _read_json(run_dir / "classes.json", "the class names")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise UsageError(f"{run_dir / 'classes.json'} must be a non-empty JSON list of names.")
    model, image_size = config.get("model"), config.get("image_size")
    if not isinstance(model, str) or not isinstance(image_size, int) or image_size < 1:
        raise UsageError(f"{run_dir / 'config.json'} lacks a valid model name and image_size.")
    if not (run_dir / "model.params").is_file():
        raise UsageError(
            f"{run_dir} has no model.params: the run did not finish. Continue it with "
            f"`gluon-ft train --out {run_dir} --resume` (and its original flags)."
        )
    ctx = ctx or mx.cpu()
    check_inference_dtype(dtype, ctx)  # before the slow part
    net = build_model(model, len(classes))
    load_parameters(net, run_dir / "model.params", ctx, what="Model parameters")
    net.hybridize(static_alloc=True)
    x = sample_input(image_size, count=batch_size).as_in_context(ctx)
    resize = config.get("eval_resize", BOOK_RESIZE)  # LoadedRun.eval_resize, before there is one
    int8 = functools.partial(
        int8_form, run_dir, net, image_size, images=calibration_images, resize=resize
    )
    net, inference = choose_form(net, x, dtype, int8)
    return LoadedRun(run_dir, config, classes, net, image_size, ctx, inference)


def _describe(item: ImageInput, position: int) -> str:
    if isinstance(item, str | Path):
        return str(item)
    return f"<image {position}>"


def _decode(item: ImageInput) -> Image.Image:
    """Any accepted input as 8-bit RGB, or :class:`~gluon_ft.data.decode.UnreadableImageError`."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, bytes):
        return load_image(io.BytesIO(item))
    path = Path(item)
    if path.is_dir():
        raise UnreadableImageError("a folder, not an image file")
    return load_image(path)


class Predictor:
    """Classify images with a finished run, loaded once.

    Parameters
    ----------
    run_dir : str or Path
        The run directory.
    ctx : Context, optional
        Where to run the network; the CPU by default.
    batch_size : int
        Images per forward pass.
    dtype : {"float32", "bfloat16", "int8", "auto"}
        The network's predict-mode form (see :func:`load_run`).
    calibration_images : int
        int8: how many of the run's training images calibrate it (see :func:`load_run`).
    tta : int, optional
        Test-time augmentation: the mean logits of this many views of each image
        (:mod:`gluon_ft.data.tta`); 1 is the plain center crop. By default the run's own
        ``--tta`` (``config.json``), as its report scored it.

    Raises
    ------
    UsageError
        Not a finished run (:func:`load_run`), or ``tta`` outside what :mod:`gluon_ft.data.tta`
        supports.
    """

    def __init__(
        self,
        run_dir: str | Path,
        ctx: mx.Context | None = None,
        batch_size: int = 32,
        dtype: str = "float32",
        tta: int | None = None,
        calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    ):
        if tta is not None:
            check_views(tta)  # before the run loads
        self.run = load_run(run_dir, ctx, dtype, batch_size, calibration_images)
        if tta is None:
            tta = self.run.config.get("tta", 1)
            check_views(tta, flag=f"--tta in {self.run.path / 'config.json'}")
        self.classes = self.run.classes
        # A multi-label run: independent sigmoid probabilities, a set of labels per image.
        self.multi_label = bool(self.run.config.get("multi_label"))
        self.thresholds = run_thresholds(self.run.path, self.run.config, len(self.classes))
        self.transform = eval_transform(self.run.image_size, tta, self.run.eval_resize)
        self.tta = tta
        self.batch_size = batch_size

    def prepare(self, item: ImageInput) -> np.ndarray:
        """One image made ready for :meth:`prepared_probabilities`: decoded and transformed
        (its views, uint8). Any thread may call it (serve decodes in the request's thread).

        Raises
        ------
        UnreadableImageError
            The file cannot be decoded.
        """
        return self.transform(_decode(item))

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """Class probabilities, ``(len(images), classes)``, of decoded RGB images: a softmax,
        or for a multi-label run each class's own sigmoid."""
        return self.prepared_probabilities([self.transform(img) for img in images])

    def prepared_probabilities(self, arrays: list[np.ndarray]) -> np.ndarray:
        """:meth:`probabilities` of images that :meth:`prepare` made ready, in one pass."""
        if not arrays:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        batch = mx.nd.array(np.stack(arrays), ctx=self.run.ctx, dtype="uint8")
        logits = view_logits(self.run.net, batch).astype("float32", copy=False)
        if self.multi_label:
            return logits.sigmoid().asnumpy()
        return mx.nd.softmax(logits, axis=1).asnumpy()

    def answer(self, row: np.ndarray, top_k: int) -> dict:
        """One image's entry of :meth:`predict_images` (``source`` aside) from its row of
        probabilities."""
        best = np.argsort(-row, kind="stable")[:top_k]
        top = [
            {"class": self.classes[i], "index": int(i), "probability": float(row[i])} for i in best
        ]
        return {"ok": True, "top": top, **self._label_set(row)}

    def predict_images(self, images: Sequence[ImageInput], top_k: int = 5) -> list[dict]:
        """Classify each image; an unreadable one gets ``ok: False`` and its ``error``.

        Parameters
        ----------
        images : sequence of path, bytes or PIL image
            File paths, encoded file contents (an upload), or opened PIL images.
        top_k : int
            How many classes to return per image, most probable first (at most all).

        Returns
        -------
        list of dict
            In input order: ``{"source", "ok": True, "top": [{"class", "index",
            "probability"}]}`` or ``{"source", "ok": False, "error"}``. A multi-label run
            adds ``labels`` (the predicted set: each class at its threshold or above) and
            ``probabilities`` (``{class: probability}``, independent per class).
        """
        if top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {top_k}.")
        top_k = min(top_k, len(self.classes))
        results = []
        # Decoded a batch at a time, so a long list of files never sits in memory at once.
        for start in range(0, len(images), self.batch_size):
            chunk = list(enumerate(images[start : start + self.batch_size], start))
            prepared, outcome = [], {}
            for position, item in chunk:
                try:
                    prepared.append((position, self.prepare(item)))
                except UnreadableImageError as err:
                    outcome[position] = {"ok": False, "error": str(err)}
            probs = self.prepared_probabilities([array for _, array in prepared])
            for (position, _), row in zip(prepared, probs):
                outcome[position] = self.answer(row, top_k)
            results += [{"source": _describe(item, pos), **outcome[pos]} for pos, item in chunk]
        return results

    def _label_set(self, row: np.ndarray) -> dict:
        """A multi-label answer's ``labels`` and ``probabilities``; nothing for one label."""
        if not self.multi_label:
            return {}
        chosen = [name for name, p, t in zip(self.classes, row, self.thresholds) if p >= t]
        return {
            "labels": chosen,
            "probabilities": {name: float(p) for name, p in zip(self.classes, row)},
        }


THRESHOLDS_FILE = "thresholds.json"


def run_thresholds(run_dir: Path, config: dict, num_classes: int) -> np.ndarray:
    """Each class's threshold of a multi-label run: ``thresholds.json`` (``--thresholds
    auto``, ``{"thresholds": [...]}``) if the run wrote one, else ``--threshold``."""
    path = Path(run_dir) / THRESHOLDS_FILE
    if path.is_file():
        saved = _read_json(path, "the thresholds").get("thresholds")
        if isinstance(saved, list) and len(saved) == num_classes:
            return np.asarray(saved, dtype=np.float64)
        raise UsageError(f"{path} must hold one threshold per class ({num_classes}).")
    return np.full(num_classes, float(config.get("threshold", 0.5)))


@dataclass
class SplitPredictions:
    """A run's class probabilities for the readable items of a dataset split.

    ``indices[i]`` is the split item that ``labels[i]`` and ``probabilities[i]`` belong to
    (unreadable files are left out).
    """

    indices: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def accuracy(self) -> float:
        return float((self.predicted == self.labels).mean()) if len(self.labels) else float("nan")

    def confusion_matrix(self) -> np.ndarray:
        """Counts: rows are the true classes, columns the predicted ones."""
        classes = self.probabilities.shape[1]
        matrix = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(matrix, (self.labels, self.predicted), 1)
        return matrix

    def confident_mistakes(self, count: int) -> list[int]:
        """Positions (into these arrays) of up to ``count`` wrong predictions, surest first."""
        wrong = np.flatnonzero(self.predicted != self.labels)
        confidence = self.probabilities[wrong, self.predicted[wrong]]
        return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:count]]


def predict_split(predictor: Predictor, split: ImageFolderSplit) -> SplitPredictions:
    """Classify every item of ``split`` with ``predictor`` (the run's test transform)."""
    indices, probabilities = [], []
    for start in range(0, len(split), predictor.batch_size):
        batch = []
        for index in range(start, min(start + predictor.batch_size, len(split))):
            try:
                batch.append(split.load(index))
            except UnreadableImageError:
                continue
            indices.append(index)
        probabilities.append(predictor.probabilities(batch))
    indices = np.array(indices, dtype=np.int64)
    # A multi-label split's labels are its (N, C) multi-hot rows.
    labels = (split.targets() if predictor.multi_label else split.labels())[indices]
    empty = np.zeros((0, len(predictor.classes)), dtype=np.float32)
    return SplitPredictions(indices, labels, np.concatenate([empty, *probabilities]))
