"""``--dtype int8``: oneDNN post-training quantization of a run, calibrated on its own images.

The first ``--dtype int8`` use of a run calibrates it: ``mx.contrib.quantization.quantize_net``
(``calib_mode="naive"``: the min and max of each layer's output set its int8 range) on up to
``--calibration-images`` images of the run's train part (from ``split.json``, evenly spaced
over it, through the test transform), then measures the top-1 agreement of the int8 network
with float32 on the run's test part. Both go into ``RUN/int8/``:

- ``model-symbol.json``, ``model-0000.params``: the quantized network (oneDNN operators);
- ``calibration.json``: how it was calibrated and its agreement with float32.

Later uses load these files, unless they asked for another number of calibration images.
``--dtype auto`` considers int8 only once a run has been calibrated, and only when its
agreement is at least :data:`gluon_ft.deploy.inference.MIN_AGREEMENT`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import gluon

from gluon_ft import paths
from gluon_ft.data.decode import UnreadableImageError
from gluon_ft.data.transforms import BOOK_RESIZE, TestTransform, normalize_batch
from gluon_ft.deploy.runparts import run_parts
from gluon_ft.errors import UsageError

INT8_DIR = "int8"
DEFAULT_CALIBRATION_IMAGES = 200
CALIBRATION_MODE = "naive"  # min/max per layer: what a few hundred images can estimate
BATCH = 25


def calibration_record(run_dir: Path) -> dict | None:
    """``RUN/int8/calibration.json`` when the run has a complete int8 calibration, else None."""
    folder = Path(run_dir) / INT8_DIR
    names = ("calibration.json", "model-symbol.json", "model-0000.params")
    files = [folder / name for name in names]
    if not all(file.is_file() for file in files):
        return None
    try:
        return json.loads(files[0].read_text())
    except (OSError, ValueError):
        return None


def int8_form(
    run_dir: Path,
    net: gluon.HybridBlock,
    image_size: int,
    calibrate: bool = True,
    images: int = DEFAULT_CALIBRATION_IMAGES,
    resize: float = BOOK_RESIZE,
) -> tuple[gluon.SymbolBlock, dict] | None:
    """The run's int8 network and its ``calibration.json`` record.

    Parameters
    ----------
    run_dir : Path
        The finished run.
    net : HybridBlock
        Its float32 network (hybridized, called once), on the CPU.
    image_size : int
        The run's input size.
    calibrate : bool
        Calibrate (and save) when the run has no calibration of ``images`` images; with False,
        None is returned instead.
    images : int
        How many training images to calibrate on (fewer when the train part is smaller).
    resize : float
        The run's ``--eval-resize``: calibration and agreement see the view that inference
        sees.

    Raises
    ------
    UsageError
        The run has no readable ``split.json`` or its images are gone.
    """
    record = calibration_record(run_dir)
    if record is not None and (not calibrate or record["calibration"]["requested"] == images):
        folder = Path(run_dir) / INT8_DIR
        with _quietly():
            block = gluon.SymbolBlock.imports(
                str(folder / "model-symbol.json"), ["data"], str(folder / "model-0000.params")
            )
        block.hybridize(static_alloc=True)
        return block, record
    if not calibrate:
        return None
    return calibrate_run(Path(run_dir), net, TestTransform(image_size, resize), images)


def calibrate_run(
    run_dir: Path, net: gluon.HybridBlock, transform: TestTransform, images: int
) -> tuple[gluon.SymbolBlock, dict]:
    """Quantize ``net`` on ``images`` of the run's training images seen through
    ``transform`` (its evaluation view), score it, save both."""
    parts = run_parts(run_dir)
    chosen = np.unique(np.linspace(0, len(parts.train) - 1, min(images, len(parts.train))))
    data = _normalized(parts.train, chosen.astype(int), transform)
    block = quantize(net, data)
    agreement = top1_agreement(net, block, parts.test, transform)
    record = {
        "dtype": "int8",
        "calibration": {
            "requested": images,
            "images": len(data),
            "part": "train (split.json), evenly spaced, test transform",
            "mode": CALIBRATION_MODE,
            "quantized_dtype": "auto",
            "mxnet": mx.__version__,
        },
        "test_agreement": agreement,
    }
    _save(run_dir / INT8_DIR, block, data[:1], record)
    return block, record


def quantize(net: gluon.HybridBlock, data: mx.nd.NDArray) -> gluon.SymbolBlock:
    """``net`` quantized to int8 by oneDNN, its ranges calibrated on ``data``.

    Parameters
    ----------
    net : HybridBlock
        A float32 network (hybridized, called once), on the CPU; hybridized again with
        ``static_alloc`` afterwards (``quantize_net`` re-hybridizes it without).
    data : NDArray
        Normalized float32 images, ``(N, 3, S, S)``.
    """
    calibration = mx.io.NDArrayIter(data, batch_size=min(BATCH, len(data)), data_name="data")
    with _quietly():
        block = mx.contrib.quantization.quantize_net(
            net,
            quantized_dtype="auto",
            calib_mode=CALIBRATION_MODE,
            calib_data=calibration,
            num_calib_examples=len(data),
            ctx=mx.cpu(),
            logger=None,
        )
    net.hybridize(static_alloc=True)
    block.hybridize(static_alloc=True)
    return block


def _normalized(part, indices: np.ndarray, transform: TestTransform) -> mx.nd.NDArray:
    """The readable images of ``part`` at ``indices``, transformed and normalized."""
    pixels = []
    for index in indices:
        with contextlib.suppress(UnreadableImageError):
            pixels.append(transform(part.load(int(index))))
    if not pixels:
        raise UsageError("None of the run's training images could be read for int8 calibration.")
    return normalize_batch(mx.nd.array(np.stack(pixels), dtype="uint8"))


def top1_agreement(plain, quantized, part, transform: TestTransform) -> dict:
    """How often ``quantized`` picks the class ``plain`` picks, over the images of ``part``."""
    agree = total = 0
    for start in range(0, len(part), BATCH):
        indices = np.arange(start, min(start + BATCH, len(part)))
        with contextlib.suppress(UsageError):  # a batch of unreadable images only
            x = _normalized(part, indices, transform)
            same = plain(x).argmax(axis=1) == quantized(x).astype("float32").argmax(axis=1)
            agree += int(same.sum().asscalar())
            total += x.shape[0]
    return {
        "part": "test",
        "images": total,
        "top1_agreement": agree / total if total else float("nan"),
    }


def _save(folder: Path, block: gluon.SymbolBlock, x: mx.nd.NDArray, record: dict) -> None:
    folder.mkdir(exist_ok=True)
    # Written last, and gone meanwhile: a calibration.json always describes the files beside it.
    (folder / "calibration.json").unlink(missing_ok=True)
    block(x)  # export needs a forward pass of the hybridized block
    with _quietly():
        block.export(str(folder / "model"), epoch=0)
    paths.write_json(folder / "calibration.json", record)


def _quietly():
    """quantize_net warns of its deprecation and logs every layer it quantizes."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    stack.callback(logging.disable, previous)
    return stack
