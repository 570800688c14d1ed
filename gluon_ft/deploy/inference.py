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
- ``int8``: oneDNN post-training quantization, calibrated on the run's training images
  (:mod:`gluon_ft.deploy.int8`, which records the calibration and its top-1 agreement with
  float32 on the run's test part in ``RUN/int8/``).
- ``auto``: :func:`choose_form`: the fastest of bfloat16 (where the CPU supports it) and int8
  (once the run has been calibrated) that a short probe on this network, at its input size
  and batch, measures at least :data:`MIN_SPEEDUP` times faster than float32, and that agrees
  with float32's top-1 on at least :data:`MIN_AGREEMENT` of the images (int8: the run's test
  part; bfloat16: the probe's batch); float32 when none does.

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

DTYPES = ("float32", "bfloat16", "int8", "auto")
MIN_SPEEDUP = 1.1  # as for training (gluon_ft.train.amp.MIN_BF16_SPEEDUP): noise must not decide
# auto never serves a form that changes more than 1 top-1 answer in 100 of float32's.
MIN_AGREEMENT = 0.99
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
        Unknown dtype, int8 or bfloat16 on a GPU, or bfloat16 on a CPU without it.
    """
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    if dtype == "int8" and ctx.device_type != "cpu":
        raise UsageError("--dtype int8 runs on CPUs only in MXNet 1.9 (oneDNN kernels).")
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


def choose_form(net: gluon.HybridBlock, x: mx.nd.NDArray, requested: str, int8=None) -> tuple:
    """The form of ``net`` that ``--dtype requested`` asks for, and what was decided.

    Parameters
    ----------
    net : HybridBlock
        The trained network, hybridized, on ``x``'s context.
    x : NDArray
        A normalized float32 batch at the size and batch the form will serve.
    requested : {"float32", "bfloat16", "int8", "auto"}
    int8 : callable, optional
        ``int8(calibrate)`` -> ``(block, calibration record)`` of the run's int8 form
        (:func:`gluon_ft.deploy.int8.int8_form`); with ``calibrate=False``, None when the run
        has no calibration yet. Without it, int8 is refused and ``auto`` does not consider it.

    Returns
    -------
    (block, dict)
        The block to call, and ``{"requested", "dtype", "why"}``, with ``"calibration"`` for
        int8 and, when ``auto`` measured, ``"probe"`` (bfloat16: ``{"batch_size",
        "float32_img_s", "bfloat16_img_s", "speedup", "top1_agreement", "finite"}``) and
        ``"int8_probe"`` (the same with ``int8_img_s``).
    """
    check_inference_dtype(requested, x.context)
    record = {"requested": requested}
    if requested == "float32":
        return net, {**record, "dtype": "float32", "why": "--dtype"}
    net(x)  # builds the graph that the conversions read
    if requested == "int8":
        if int8 is None:
            raise UsageError("--dtype int8 needs a finished run to calibrate on.")
        block, calibration = int8(calibrate=True)
        return block, {**record, "dtype": "int8", "why": "--dtype", "calibration": calibration}
    if requested == "bfloat16":
        return fused_bfloat16(net, x), {**record, "dtype": "bfloat16", "why": "--dtype"}
    return _fastest_faithful_form(net, x, record, int8)


def _fastest_faithful_form(net, x: mx.nd.NDArray, record: dict, int8) -> tuple:
    """``--dtype auto``: probe the candidate forms, keep the fastest that passes both bars."""
    if x.context.device_type != "cpu":
        return net, {**record, "dtype": "float32", "why": "not a CPU"}
    candidates, reasons = {}, []
    reason = bfloat16_unsupported()
    if reason:
        reasons.append(reason)
    else:
        fused = fused_bfloat16(net, x)
        figures = probe_forms(net, fused, x)
        candidates["bfloat16"] = (fused, figures, figures["top1_agreement"])
        record["probe"] = figures
    calibrated = int8(calibrate=False) if int8 is not None else None
    if calibrated is None:
        reasons.append("int8: the run has no calibration (run it once with --dtype int8)")
    else:
        block, calibration = calibrated
        figures = probe_forms(net, block, x, name="int8")
        agreement = calibration["test_agreement"]["top1_agreement"]
        candidates["int8"] = (block, figures, agreement)
        record.update(int8_probe=figures, calibration=calibration)
    best, why = pick_form({name: c[1:] for name, c in candidates.items()})
    block = candidates[best][0] if best != "float32" else net
    return block, {**record, "dtype": best, "why": "; ".join([*reasons, *why])}


def pick_form(candidates: dict[str, tuple[dict, float]]) -> tuple[str, list[str]]:
    """The fastest candidate form that passes both bars, else float32, and why.

    Parameters
    ----------
    candidates : dict
        ``{name: (probe figures, top-1 agreement with float32)}``: the figures of
        :func:`probe_forms`.

    Returns
    -------
    (str, list of str)
        The form chosen, and one sentence per candidate on how it fared.
    """
    passed, why = {}, []
    for name, (figures, agreement) in candidates.items():
        said = f"the probe measured {name} {figures['speedup']:.2f}x float32"
        if not figures["finite"]:
            why.append(f"{said}, but it answered NaN or infinity")
        elif not agreement >= MIN_AGREEMENT:  # also refuses NaN
            why.append(
                f"{said}, but its top-1 agrees with float32 on {100 * agreement:.1f} % of the "
                f"images, below {100 * MIN_AGREEMENT:g} %"
            )
        else:
            why.append(said)
            if figures["speedup"] >= MIN_SPEEDUP:
                passed[name] = figures["speedup"]
    return (max(passed, key=passed.get) if passed else "float32"), why


def probe_forms(
    plain: gluon.HybridBlock, fused: gluon.HybridBlock, x: mx.nd.NDArray, name: str = "bfloat16"
) -> dict:
    """Time both forms on ``x``: a warm-up call each, then the fastest of alternating calls.

    ``name`` is the form of ``fused``, as the figures name it (``<name>_img_s``).
    """
    reference = plain(x).asnumpy()
    out = fused(x).astype("float32").asnumpy()
    seconds = {"float32": [], name: []}
    for _ in range(PROBE_ROUNDS):
        seconds["float32"].append(_seconds_of_one_call(plain, x))
        seconds[name].append(_seconds_of_one_call(fused, x))
    batch = x.shape[0]
    rates = {f"{form}_img_s": batch / min(times) for form, times in seconds.items()}
    return {
        "batch_size": batch,
        **rates,
        "speedup": rates[f"{name}_img_s"] / rates["float32_img_s"],
        "top1_agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
        "finite": bool(np.isfinite(out).all()),
    }
