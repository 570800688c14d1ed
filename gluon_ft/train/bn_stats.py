"""One set of BatchNorm running statistics for the devices and workers of a run.

Each device keeps its own running mean and variance, and so does each worker of a
distributed run: they see different samples. Rank 0 saves its first device's set, so a test
pass with the others' would report the accuracy of statistics that nobody saves.
:func:`sync_bn_stats` replaces every copy by their mean, over the devices of this worker and
over the workers; the statistics of each training step (those of its batch) are untouched.

A run stopped mid-epoch keeps every copy instead (:func:`every_copy`, in the checkpoint),
and each device of each worker takes its own back on resume (:func:`restore_copy`): averaging
there would be exact only up to rounding, and the resumed run would not end bit for bit as
the run that never stopped.
"""

from __future__ import annotations

import mxnet as mx
from mxnet import gluon

from gluon_ft.train.dist import DistContext

RUNNING_STATS = r".*running_(mean|var)$"


def running_stats(net: gluon.Block) -> list[gluon.Parameter]:
    """The running means and variances of ``net``'s BatchNorm layers, in a fixed order."""
    params = net.collect_params(RUNNING_STATS)
    return [params[name] for name in sorted(params.keys())]


def wants_sync(setting: bool | None, num_devices: int, dist: DistContext) -> bool:
    """``--sync-bn-stats``: on, off, or (``None``) on wherever there is more than one copy."""
    if setting is not None:
        return setting
    return num_devices > 1 or dist.distributed


def sync_bn_stats(net: gluon.Block, dist: DistContext) -> int:
    """Set every device's (and worker's) running statistics of ``net`` to their mean.

    Every worker of a distributed run must call it at the same point: it is an allreduce.
    The sums run in float64, so copies that were already equal (a frozen BatchNorm) stay
    bit for bit what they were.

    Returns
    -------
    int
        The number of statistics values averaged (per copy).
    """
    params = running_stats(net)
    if not params:
        return 0
    copies = len(params[0].list_ctx()) * dist.num_workers
    if copies == 1:
        return 0
    cpu = mx.cpu()
    # This worker's sum over its devices, all statistics in one vector: one round trip.
    local = mx.nd.concat(
        *[
            mx.nd.add_n(*[d.as_in_context(cpu).astype("float64") for d in p.list_data()]).reshape(
                (-1,)
            )
            for p in params
        ],
        dim=0,
    )
    mean = dist.allreduce_array(local) / copies
    offset = 0
    for param in params:
        size = param.data(param.list_ctx()[0]).size
        part = mean[offset : offset + size].reshape(param.shape).astype(param.dtype)
        # Written into each device's array: Parameter.set_data would reset a Trainer that
        # updates on its kvstore (kvstore='device'), and with it every optimizer state.
        for ctx in param.list_ctx():
            param.data(ctx)[:] = part.as_in_context(ctx)
        offset += size
    mx.nd.waitall()
    return offset


def _flat(params: list[gluon.Parameter], ctx: mx.Context) -> mx.nd.NDArray:
    """One device's statistics as one float64 vector on the CPU (float32 values stay exact)."""
    cpu = mx.cpu()
    return mx.nd.concat(
        *[p.data(ctx).as_in_context(cpu).astype("float64").reshape((-1,)) for p in params], dim=0
    )


def every_copy(net: gluon.Block, dist: DistContext) -> mx.nd.NDArray | None:
    """Every worker's and device's running statistics: shape ``(workers, devices * values)``.

    An allreduce, like :func:`sync_bn_stats`; None where there is only one copy.
    """
    params = running_stats(net)
    if not params or len(params[0].list_ctx()) * dist.num_workers == 1:
        return None
    mine = mx.nd.concat(*[_flat(params, ctx) for ctx in params[0].list_ctx()], dim=0)
    size = mine.shape[0]
    slots = mx.nd.zeros((dist.num_workers * size,), dtype="float64")
    slots[dist.rank * size : (dist.rank + 1) * size] = mine
    return dist.allreduce_array(slots).reshape((dist.num_workers, size))


def restore_copy(net: gluon.Block, copies: mx.nd.NDArray, dist: DistContext) -> bool:
    """Give each device of this worker its own statistics from :func:`every_copy`'s array.

    Returns False, changing nothing, when ``copies`` came from another number of workers or
    devices.
    """
    params = running_stats(net)
    devices = params[0].list_ctx() if params else []
    per_device = sum(p.data(devices[0]).size for p in params) if params else 0
    if copies.shape != (dist.num_workers, len(devices) * per_device):
        return False
    row = copies[dist.rank]
    offset = 0
    for ctx in devices:
        for param in params:
            size = param.data(ctx).size
            part = row[offset : offset + size].reshape(param.shape).astype(param.dtype)
            param.data(ctx)[:] = part.as_in_context(ctx)
            offset += size
    mx.nd.waitall()
    return True
