"""``--adapt-bn``: AdaBN, BatchNorm's running statistics re-estimated on the target data.

A pretrained body normalizes with the statistics of its source data. Li et al.'s AdaBN
("Revisiting Batch Normalization For Practical Domain Adaptation", 2016) replaces them by
the target's before anything trains: one forward pass over the train part, in training mode
(batch statistics) with no update of any weight. Each running mean and variance becomes the
exact mean of its batches' statistics (the momentum of batch ``k``, 0-based, is
``k / (k + 1)``), not an exponential average that still remembers the source.

It is what the peer's BatchNorm in training mode gives (its statistics re-estimated on the
target), at the cost of one pass of the plain test view, and it leaves ``--bn inference`` (the
statistics then stay fixed) and the head epochs' cached features (computed after it) as they
are.
"""

from __future__ import annotations

import mxnet as mx
from mxnet import autograd, gluon

from gluon_ft.data.transforms import normalize_batch
from gluon_ft.model.freeze import is_batchnorm
from gluon_ft.model.graft import walk_blocks


def adapt_batchnorm(
    net: gluon.HybridBlock, loader, ctx: mx.Context, prepare=normalize_batch
) -> int:
    """Set every BatchNorm's running statistics of ``net`` to the mean over ``loader``'s
    batches of their batch statistics; return the number of batches.

    ``net`` may be hybridized: it runs imperatively here (each batch's momentum is read at
    the call) and is hybridized again as it was. MXNet moves the running statistics in
    BatchNorm's backward pass, so each batch also runs one, to the input (whatever is frozen),
    and the gradients are zeroed after. Gamma, beta and every other weight are unchanged;
    with several devices, ``ctx``'s statistics are copied to the others.
    """
    layers = [block for _, block in walk_blocks(net) if is_batchnorm(block)]
    saved = [(block._kwargs["momentum"], block._kwargs["use_global_stats"]) for block in layers]
    hybridized = getattr(net, "_active", False)
    flags = dict(getattr(net, "_flags", {}) or {})
    net.hybridize(False)
    batches = 0
    try:
        for block in layers:
            block._kwargs["use_global_stats"] = False
        for images, _labels, *_ in loader:
            if images is None:
                continue
            for block in layers:
                block._kwargs["momentum"] = batches / (batches + 1)
            x = prepare(mx.nd.array(images, ctx=ctx, dtype="uint8"))
            x.attach_grad()  # MXNet moves the running statistics in BatchNorm's backward pass
            with autograd.record():
                out = net(x)
            out.backward()
            batches += 1
        mx.nd.waitall()
    finally:
        for block, (momentum, global_stats) in zip(layers, saved):
            block._kwargs["momentum"], block._kwargs["use_global_stats"] = momentum, global_stats
        if hybridized:
            net.hybridize(True, **flags)
    net.collect_params().zero_grad()  # for --accumulate's grad_req 'add'
    for block in layers:
        for name in ("running_mean", "running_var"):
            param = getattr(block, name)
            param.set_data(param.data(ctx))
    return batches
