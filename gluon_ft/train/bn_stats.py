"""One set of BatchNorm running statistics for the devices and workers of a run.

Each device keeps its own running mean and variance, and so does each worker of a
distributed run: they see different samples. Rank 0 saves its first device's set, so a test
pass with the others' would report the accuracy of statistics that nobody saves.
:func:`sync_bn_stats` replaces every copy by their mean, over the devices of this worker and
over the workers; the statistics of each training step (those of its batch) are untouched.

The running update ``r <- m r + (1 - m) batch`` is linear, so averaging between two steps
gives the same average later as averaging once at the end: a run stopped and resumed from
averaged statistics ends with the statistics of a run that never stopped.
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
        part = mean[offset : offset + size].reshape(param.shape)
        param.set_data(part.astype(param.dtype))
        offset += size
    mx.nd.waitall()
    return offset
