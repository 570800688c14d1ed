"""The predict-mode form of a trained network: plain float32, or fused bfloat16.

``--dtype`` of ``predict``, ``serve`` and ``export``:

- ``float32``: the network as trained, hybridized (``static_alloc``).
- ``bfloat16``: :func:`fused_bfloat16`: ``amp.convert_hybrid_block`` with the weights stored
  in bfloat16 once (``cast_optional_params``; without it every call casts and reorders them:
  36 oneDNN reorders per resnet18_v2 forward instead of 5), then ``optimize_for(backend=
  "MKLDNN")``, which fuses convolution, BatchNorm, ReLU and sums. Inputs and outputs stay
  float32. Measured on an AMX CPU (resnet18_v2, one thread, CPU time): 5.3x plain float32 at
  224 px, batch 32; 3.4x at 64 px, batch 64. On AVX-512 BF16 alone it can be slower than
  float32, hence ``auto``.
- ``auto``: :func:`choose_form`: bfloat16 where the CPU supports it and a short probe on this
  network, at its input size and batch, measures it at least :data:`MIN_SPEEDUP` times faster.

MXNet AMP's global switch is not involved: these conversions change only the block they
return, so float32 and bfloat16 forms live side by side in one process.
"""

from __future__ import annotations

import time
import warnings

import mxnet as mx
import numpy as np
from mxnet import gluon

from gluon_ft.data.transforms import normalize_batch
from gluon_ft.errors import UsageError
from gluon_ft.isa import bfloat16_unsupported
from gluon_ft.model.graft import walk_blocks
from gluon_ft.model.parts import stem_blocks

DTYPES = ("float32", "bfloat16", "auto")
MIN_SPEEDUP = 1.1  # as for training (gluon_ft.train.amp.MIN_BF16_SPEEDUP): noise must not decide
PROBE_ROUNDS = 3


def sample_input(image_size: int, count: int = 2, seed: int = 0) -> mx.nd.NDArray:
    """Normalized random images, ``(count, 3, S, S)``: inputs in the range real photos give."""
    pixels = np.random.default_rng(seed).integers(0, 256, (count, image_size, image_size, 3))
    return normalize_batch(mx.nd.array(pixels, dtype="uint8"))


def check_inference_dtype(dtype: str, ctx: mx.Context) -> None:
    """Refuse an inference ``--dtype`` this device cannot run.

    Raises
    ------
    UsageError
        Unknown dtype, or bfloat16 on a GPU or on a CPU without it.
    """
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    if dtype != "bfloat16":
        return
    if ctx.device_type != "cpu":
        raise UsageError("--dtype bfloat16 runs on CPUs only in MXNet 1.9 (oneDNN kernels).")
    reason = bfloat16_unsupported()
    if reason:
        raise UsageError(f"--dtype {reason}. Use --dtype float32.")


def stem_operators(net: gluon.HybridBlock) -> list[str]:
    """The graph names of the convolutions in the stem (ResNet: the 7x7 one)."""
    blocks = [b for stem in stem_blocks(net) for _, b in walk_blocks(stem)]
    convs = [b for b in blocks if getattr(b, "_op_name", "") == "Convolution"]
    return [conv.prefix + "fwd" for conv in convs]  # Gluon's convolutions name their op "fwd"


def fused_bfloat16(net: gluon.HybridBlock, x: mx.nd.NDArray) -> gluon.SymbolBlock:
    """``net`` (hybridized, called once) as a fused bfloat16 graph with float32 in and out.

    ``x`` is an input of the shape the block will mostly see (oneDNN plans for it). The stem
    convolutions stay float32, as in training (:func:`gluon_ft.train.amp.prepare_network`): on
    food10-64's test split (500 images, resnet18_v2 fine-tuned from its source) that raised
    the top-1 agreement with float32 from 99.2 % to 99.6 %; the flips are near-ties.
    """
    from mxnet.contrib import amp

    with warnings.catch_warnings():  # "Cannot decide type for ... data": it is float32
        warnings.simplefilter("ignore", UserWarning)
        block = amp.convert_hybrid_block(
            net,
            target_dtype="bfloat16",
            ctx=x.context,
            excluded_sym_names=stem_operators(net),
            cast_optional_params=True,
        )
    block.optimize_for(x, backend="MKLDNN", static_alloc=True, static_shape=True)
    return block


def _seconds_of_one_call(block, x: mx.nd.NDArray) -> float:
    mx.nd.waitall()
    start = time.perf_counter()
    block(x).wait_to_read()
    return time.perf_counter() - start


def choose_form(net: gluon.HybridBlock, x: mx.nd.NDArray, requested: str) -> tuple:
    """The form of ``net`` that ``--dtype requested`` asks for, and what was decided.

    Parameters
    ----------
    net : HybridBlock
        The trained network, hybridized, on ``x``'s context.
    x : NDArray
        A normalized float32 batch at the size and batch the form will serve.
    requested : {"float32", "bfloat16", "auto"}

    Returns
    -------
    (block, dict)
        The block to call, and ``{"requested", "dtype", "why"}`` with ``"probe"``
        (``{"batch_size", "float32_img_s", "bfloat16_img_s", "speedup",
        "top1_agreement"}``) when ``auto`` measured.
    """
    check_inference_dtype(requested, x.context)
    record = {"requested": requested}
    if requested == "float32":
        return net, {**record, "dtype": "float32", "why": "--dtype"}
    if requested == "auto":
        reason = "not a CPU" if x.context.device_type != "cpu" else bfloat16_unsupported()
        if reason:
            return net, {**record, "dtype": "float32", "why": reason}
    net(x)  # builds the graph that convert_hybrid_block reads
    fused = fused_bfloat16(net, x)
    if requested == "bfloat16":
        return fused, {**record, "dtype": "bfloat16", "why": "--dtype"}
    figures = probe_forms(net, fused, x)
    faster = figures["speedup"] >= MIN_SPEEDUP and figures["finite"]
    why = f"the probe measured bfloat16 {figures['speedup']:.2f}x float32"
    record.update(dtype="bfloat16" if faster else "float32", why=why, probe=figures)
    return (fused if faster else net), record


def probe_forms(plain: gluon.HybridBlock, fused: gluon.HybridBlock, x: mx.nd.NDArray) -> dict:
    """Time both forms on ``x``: a warm-up call each, then the fastest of alternating calls."""
    reference = plain(x).asnumpy()
    out = fused(x).astype("float32").asnumpy()
    seconds = {"float32": [], "bfloat16": []}
    for _ in range(PROBE_ROUNDS):
        seconds["float32"].append(_seconds_of_one_call(plain, x))
        seconds["bfloat16"].append(_seconds_of_one_call(fused, x))
    batch = x.shape[0]
    rates = {f"{name}_img_s": batch / min(times) for name, times in seconds.items()}
    return {
        "batch_size": batch,
        **rates,
        "speedup": rates["bfloat16_img_s"] / rates["float32_img_s"],
        "top1_agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
        "finite": bool(np.isfinite(out).all()),
    }
