"""Devices: which contexts a run uses, and how a host batch is spread over them.

``split_batch`` is ``split_and_load`` for host arrays; ``zero_unused_grads`` keeps a short
batch's idle devices from adding a stale gradient; ``micro_batches`` cuts a batch for
gradient accumulation.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet import gluon

from gluon_ft.errors import UsageError


def parse_contexts(spec: str) -> list[mx.Context]:
    """Turn ``auto``, ``cpu``, ``cpu:N`` or ``gpu:0,1`` into a list of contexts.

    ``auto`` is every GPU MXNet sees, else the CPU. ``cpu:N`` makes N CPU contexts, which
    MXNet treats as separate devices: the multi-device path without a GPU.

    Raises
    ------
    UsageError
        An unknown form, a GPU listed twice (``gpu:0,0``) or one MXNet does not see.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        gpus = mx.context.num_gpus()
        return [mx.gpu(i) for i in range(gpus)] if gpus else [mx.cpu()]
    kind, _, rest = spec.partition(":")
    try:
        if kind == "cpu":
            count = int(rest) if rest else 1
            if count < 1:
                raise ValueError
            return [mx.cpu(i) for i in range(count)]
        if kind == "gpu":
            ids = [int(i) for i in rest.split(",")] if rest else [0]
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:  # one device twice would take two slices of each batch, as two devices
                raise UsageError(
                    f"--ctx {spec}: GPU {', '.join(map(str, twice))} is listed more than "
                    "once; list each device once, e.g. gpu:0,1."
                )
            available = mx.context.num_gpus()
            missing = [i for i in ids if i >= available]
            if missing:
                raise UsageError(f"--ctx {spec}: MXNet sees {available} GPU(s), not {missing}.")
            return [mx.gpu(i) for i in ids]
    except ValueError:
        pass
    raise UsageError(f"--ctx {spec!r}: use auto, cpu, cpu:N or gpu:0,1.")


def split_batch(images: np.ndarray, labels: np.ndarray, ctx: list[mx.Context]):
    """Load a host batch onto the contexts in near-equal slices, as ``split_and_load``.

    A batch smaller than the context count uses fewer contexts. (MXNet 1.9.1's
    ``split_and_load(even_split=False)`` fails on a 1-sample batch over 2 contexts.)
    Class indices load as int32; multi-hot rows (multi-label) keep their float32.
    """
    return split_rows(images, ctx), split_rows(labels, ctx, "int32" if labels.ndim == 1 else None)


def split_rows(rows: np.ndarray, ctx: list[mx.Context], dtype=None) -> list:
    """Load the rows of a host array onto the contexts in the slices :func:`split_batch` makes
    (e.g. the soft targets of a mixed batch beside its images)."""
    used = ctx[: min(len(ctx), len(rows))]
    parts = np.array_split(rows, len(used))
    return [mx.nd.array(part, ctx=c, dtype=dtype or part.dtype) for part, c in zip(parts, used)]


def zero_unused_grads(net: gluon.Block, unused: list[mx.Context]) -> None:
    """Zero the gradients of contexts a short batch did not reach, and mark them fresh.

    Otherwise the kvstore would sum in the previous step's gradient from those devices.
    """
    for param in net.collect_params().values():
        if param.grad_req == "null":
            continue
        for c in unused:
            param.grad(c)[:] = 0
            param.data(c)._fresh_grad = True


def micro_batches(images: np.ndarray, labels: np.ndarray, count: int, *more: np.ndarray):
    """Split a host batch into ``count`` near-equal micro-batches (fewer if it is short):
    ``(images, labels, *more)`` tuples, ``more`` being further arrays of the same rows."""
    pieces = max(1, min(count, len(labels)))
    return list(zip(*(np.array_split(rows, pieces) for rows in (images, labels, *more))))
