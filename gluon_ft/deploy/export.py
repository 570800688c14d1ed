"""Export a finished run for deployment, and verify the export before it is kept.

``mxnet``: ``model-symbol.json`` + ``model-0000.params`` (``HybridBlock.export``), reloaded
with ``SymbolBlock.imports`` and compared with the run's network on the same input.
``onnx``: ``model.onnx`` (``mx.onnx.export_model``, dynamic batch size; the weights are
initializers only, not also graph inputs, so that ONNX Runtime can fold and fuse them), run
with ``onnx.reference.ReferenceEvaluator`` and compared likewise; it must agree within 1e-4.
``--dtype bfloat16`` (MXNet format only) exports the fused bfloat16 graph of
:mod:`gluon_ft.deploy.inference`, compared with that graph; ``--dtype int8`` likewise the
run's quantized graph (:mod:`gluon_ft.deploy.int8`).

Both also write ``preprocessing.json``: the class names and the input the network expects
(resize, centre crop, 0-1 scaling, ImageNet mean and std, NCHW float32). Files are written to
a temporary directory and moved into place only after the check passed.

The reference evaluator's own ``Conv`` is a Python loop (measured: 77 s for one 32-px image
through resnet18_v2); :func:`conv2d` below is the same ONNX operator vectorized with NumPy,
tested against the reference one, so a 224-px model verifies in seconds.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import warnings
from pathlib import Path

import mxnet as mx
import numpy as np

from gluon_ft.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TestTransform
from gluon_ft.deploy.inference import sample_input
from gluon_ft.deploy.int8 import DEFAULT_CALIBRATION_IMAGES
from gluon_ft.deploy.predict import LoadedRun, load_run, run_thresholds
from gluon_ft.errors import GluonFTError, UsageError

FORMATS = ("mxnet", "onnx")
EXPORT_DTYPES = ("float32", "bfloat16", "int8")
# MXNet's own reload runs the same operators: it must agree to float rounding.
MXNET_TOLERANCE = 1e-6
# The bar for the ONNX file run by another runtime.
ONNX_TOLERANCE = 1e-4


class ExportCheckError(GluonFTError):
    """The exported model does not reproduce the run's network (exit 1)."""


def preprocessing(run: LoadedRun, input_name: str) -> dict:
    """What a deployment must do to an image before the network sees it."""
    transform = TestTransform(run.image_size, run.eval_resize)
    return {
        "classes": run.classes,
        "model": run.config.get("model"),
        "input": {
            "name": input_name,
            "layout": "NCHW",
            "dtype": "float32",
            "shape": [None, 3, run.image_size, run.image_size],
        },
        "compute_dtype": run.inference["dtype"],  # bfloat16: the fused graph casts inside
        "steps": [
            "decode as 8-bit RGB, turned upright as its EXIF Orientation says",
            f"resize to {transform.resize}x{transform.resize} (bilinear)",
            f"centre crop {run.image_size}x{run.image_size}",
            "divide by 255; subtract mean and divide by std, per channel",
        ],
        "resize": transform.resize,
        "crop": run.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        **_output(run),
    }


SOFTMAX_OUTPUT = "logits, one per class in the order of classes; softmax gives probabilities"


def _output(run: LoadedRun) -> dict:
    """What the network's output means: softmax logits, or a multi-label run's independent
    sigmoid logits with each class's threshold."""
    if not run.config.get("multi_label"):
        return {"output": SOFTMAX_OUTPUT}
    thresholds = run_thresholds(run.path, run.config, len(run.classes))
    return {
        "output": "logits, one per class in the order of classes; multi-label: the sigmoid of "
        "each is its class's probability, and a class is predicted at its threshold or above",
        "thresholds": [float(t) for t in thresholds],
    }


def _quietly():
    """MXNet's converter prints shape-inference chatter; keep the command's output readable."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


@contextlib.contextmanager
def _weights_as_raw_bytes():
    """Make mx2onnx store weights as raw bytes, the same ONNX tensors, encoded fast.

    mx2onnx passes every weight to ``onnx.helper.make_tensor`` as a Python list with
    ``raw=False``; the protobuf that installs beside onnx 1.14 on Python 3.11 (3.20, pure
    Python) then encodes and decodes it one float at a time. Measured on resnet18_v2: 260 s
    for export, load and check, 190 s of it in protobuf.
    """
    import onnx.helper
    from onnx import numpy_helper

    original = onnx.helper.make_tensor
    raw_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64}

    def make_tensor(name, data_type, dims, vals, raw=False):
        if raw or data_type not in raw_types:
            return original(name, data_type, dims, vals, raw)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
        return numpy_helper.from_array(np.asarray(vals, dtype=dtype).reshape(dims), name)

    onnx.helper.make_tensor = make_tensor
    try:
        yield
    finally:
        onnx.helper.make_tensor = original


def _as_float32(out: mx.nd.NDArray) -> np.ndarray:
    return out.astype("float32").asnumpy()  # a fused bfloat16 graph may answer in bfloat16


def _check(diff: float, tolerance: float, what: str) -> None:
    if not diff <= tolerance:  # also catches NaN
        raise ExportCheckError(
            f"The {what} does not reproduce the run's network: max abs difference {diff:.3g} "
            f"> {tolerance:g}. Nothing was written."
        )


def _export_mxnet(run: LoadedRun, staging: Path, x: mx.nd.NDArray, reference: np.ndarray):
    files = [staging / "model-symbol.json", staging / "model-0000.params"]
    with _quietly():
        block = mx.gluon.SymbolBlock.imports(str(files[0]), ["data"], str(files[1]), ctx=run.ctx)
    diff = float(np.abs(_as_float32(block(x)) - reference).max())
    _check(diff, MXNET_TOLERANCE, "re-imported MXNet model")
    return files, diff, "data"


def _export_onnx(run: LoadedRun, staging: Path, x: mx.nd.NDArray, reference: np.ndarray):
    import onnx
    from onnx.reference import ReferenceEvaluator

    target = staging / "model.onnx"
    size = run.image_size
    try:
        with _quietly(), _weights_as_raw_bytes():
            mx.onnx.export_model(
                str(staging / "model-symbol.json"),
                str(staging / "model-0000.params"),
                in_shapes=[(x.shape[0], 3, size, size)],
                in_types=[np.float32],
                onnx_file_path=str(target),
                dynamic=True,
                dynamic_input_shapes=[(None, 3, size, size)],
            )
    except Exception as err:  # noqa: BLE001  the converter raises many types per operator
        raise ExportCheckError(
            f"MXNet could not convert {run.config.get('model')} to ONNX "
            f"({type(err).__name__}: {str(err)[:300]})."
        ) from None
    model = weights_as_initializers_only(onnx.load(str(target)))
    onnx.save(model, str(target))
    onnx.checker.check_model(model)
    input_name = model.graph.input[0].name
    evaluator = ReferenceEvaluator(model, new_ops=[fast_conv_op()])
    output = evaluator.run(None, {input_name: x.asnumpy()})[0]
    diff = float(np.abs(output - reference).max())
    _check(diff, ONNX_TOLERANCE, "ONNX model (run by onnx.reference.ReferenceEvaluator)")
    return [target], diff, input_name


def weights_as_initializers_only(model):
    """``model`` without the graph inputs that are also initializers: only the data stays.

    mx2onnx lists every weight twice, as an initializer and as a graph input. An input that
    has an initializer is a default the caller may override, so ONNX Runtime must treat it as
    variable and will not fold or fuse it (constant folding, Conv+BatchNorm fusion); it warns
    and keeps the slow graph. Dropping those inputs makes the weights constants.
    """
    weights = {tensor.name for tensor in model.graph.initializer}
    kept = [graph_input for graph_input in model.graph.input if graph_input.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def _check_request(fmt: str, dtype: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use {' or '.join(FORMATS)}.")
    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use {' or '.join(EXPORT_DTYPES)}.")
    if dtype != "float32" and fmt != "mxnet":
        raise UsageError(
            f"--dtype {dtype} exports the MXNet format only (the {_GRAPH[dtype]} graph runs "
            "oneDNN operators that ONNX does not have): add --format mxnet."
        )


_GRAPH = {"bfloat16": "fused", "int8": "quantized"}


def export_run(
    run_dir: str | Path,
    fmt: str = "mxnet",
    out_dir: str | Path | None = None,
    dtype: str = "float32",
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
) -> dict:
    """Export a finished run as MXNet symbol + params or as ONNX, verified on the spot.

    Parameters
    ----------
    run_dir : str or Path
        A finished run directory (``model.params``, ``config.json``, ``classes.json``).
    fmt : {"mxnet", "onnx"}
        What to write.
    out_dir : str or Path, optional
        Where to write; ``RUN/export`` by default.
    dtype : {"float32", "bfloat16", "int8"}
        bfloat16 (MXNet format only) writes the fused bfloat16 graph of
        :func:`gluon_ft.deploy.inference.fused_bfloat16`: float32 in and out, oneDNN operators
        inside. int8 (MXNet format only) writes the run's quantized graph
        (:mod:`gluon_ft.deploy.int8`, calibrated first when the run has no calibration).
    calibration_images : int
        int8: how many of the run's training images calibrate it.

    Returns
    -------
    dict
        ``{"format", "out_dir", "files": [names], "max_abs_diff", "tolerance", "checked_with"}``,
        and ``"calibration"`` (``RUN/int8/calibration.json``) for int8.

    Raises
    ------
    UsageError
        Unknown format, or ``run_dir`` is not a finished run.
    ExportCheckError
        The exported model's outputs differ from the run's network by more than the tolerance;
        nothing is written then.
    """
    _check_request(fmt, dtype)
    run = load_run(run_dir, dtype=dtype, calibration_images=calibration_images)
    out_dir = Path(out_dir) if out_dir is not None else run.path / "export"
    names, diff = _write_verified_export(run, fmt, out_dir)
    calibration = {"calibration": run.inference["calibration"]} if dtype == "int8" else {}
    return {
        **calibration,
        "format": fmt,
        "out_dir": str(out_dir),
        "files": names,
        "max_abs_diff": diff,
        "tolerance": MXNET_TOLERANCE if fmt == "mxnet" else ONNX_TOLERANCE,
        "checked_with": (
            "mxnet.gluon.SymbolBlock.imports"
            if fmt == "mxnet"
            else "onnx.reference.ReferenceEvaluator"
        ),
    }


def _write_verified_export(run: LoadedRun, fmt: str, out_dir: Path) -> tuple[list[str], float]:
    """Export into a staging folder, check it, then move its files into ``out_dir``.

    Staging keeps ``out_dir`` free of a half-written or unverified export: the files move
    only once the check passed, and the staging folder goes whatever happens.
    """
    x = sample_input(run.image_size).as_in_context(run.ctx)
    reference = _as_float32(run.net(x))  # also the forward pass that export() needs
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        files, diff = _stage_verified(run, fmt, staging, x, reference)
        out_dir.mkdir(parents=True, exist_ok=True)
        for file in files:
            os.replace(file, out_dir / file.name)
    except OSError as err:
        raise UsageError(f"Cannot write the export to {out_dir}: {err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [file.name for file in files], diff


def _stage_verified(
    run: LoadedRun, fmt: str, staging: Path, x: mx.nd.NDArray, reference: np.ndarray
) -> tuple[list[Path], float]:
    """Write the ``fmt`` export and ``preprocessing.json`` into ``staging``, checked."""
    staging.mkdir(parents=True)
    # Keep the casts: a bfloat16 graph without them feeds float32 data to bfloat16 weights.
    run.net.export(str(staging / "model"), epoch=0, remove_amp_cast=False)
    export_and_check = _export_mxnet if fmt == "mxnet" else _export_onnx
    files, diff, input_name = export_and_check(run, staging, x, reference)
    info = staging / "preprocessing.json"
    info.write_text(json.dumps(preprocessing(run, input_name), indent=2) + "\n")
    return [*files, info], diff


@functools.cache
def fast_conv_op():
    """The :func:`conv2d` ONNX ``Conv`` as an ``OpRun`` for ``ReferenceEvaluator(new_ops=...)``.

    Built on first use: importing onnx is not needed for MXNet exports.
    """
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_conv import Conv as ReferenceConv

    class Conv(OpRun):
        """ONNX ``Conv`` for 2-D NCHW inputs with explicit pads, vectorized with NumPy.

        Anything else (``auto_pad``, 1-D or 3-D) falls back to the reference implementation.
        """

        op_domain = ""

        def _run(
            self,
            X,
            W,
            B=None,
            auto_pad=None,
            dilations=None,
            group=None,
            kernel_shape=None,
            pads=None,
            strides=None,
        ):
            if X.ndim != 4 or auto_pad not in (None, "NOTSET", b"NOTSET"):
                return ReferenceConv._run(
                    self, X, W, B, auto_pad, dilations, group, kernel_shape, pads, strides
                )
            return (conv2d(X, W, B, dilations, group or 1, pads, strides),)

    return Conv


def conv2d(X, W, B=None, dilations=None, group=1, pads=None, strides=None) -> np.ndarray:
    """ONNX ``Conv`` semantics on NCHW arrays: ``pads`` is ``[top, left, bottom, right]``."""
    n, channels, _, _ = X.shape
    out_channels, per_group, kh, kw = W.shape
    dh, dw = dilations or (1, 1)
    sh, sw = strides or (1, 1)
    top, left, bottom, right = pads or (0, 0, 0, 0)
    if channels != per_group * group or out_channels % group:
        raise ValueError(f"Conv: X {X.shape} and W {W.shape} do not fit group={group}")
    padded = np.pad(X, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))
    # (n, c, out_h, out_w, kh, kw): every stride-th window, every dilation-th tap of it
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]
    out_h, out_w = windows.shape[2:4]
    windows = windows.reshape(n, group, per_group, out_h, out_w, kh, kw)
    kernels = W.reshape(group, out_channels // group, per_group, kh, kw)
    out = np.einsum("ngcyxij,gmcij->ngmyx", windows, kernels, optimize=True)
    out = out.reshape(n, out_channels, out_h, out_w)
    if B is not None:
        out = out + B.reshape(1, -1, 1, 1)
    return out.astype(X.dtype, copy=False)
