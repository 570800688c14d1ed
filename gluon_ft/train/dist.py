"""A worker's place in data-parallel training on MXNet's parameter server (``--kvstore dist_*``).

:func:`connect` turns ``--kvstore`` into a :class:`DistContext`: for a ``dist_sync`` (or
``dist_device_sync``) kvstore it creates it, which registers this process with the ps-lite
scheduler and learns its rank; for anything else it is the one-process context, so the
training loop reads the same whatever it runs on. What the loop takes from it:

- ``rank`` and ``num_workers``: which shard of each batch this worker reads. ``--batch-size``
  stays the *global* batch, as in the book: each worker reads its share of every global batch
  (:class:`gluon_ft.data.loaders.EpochBatchSampler`), and every worker takes the same number
  of steps, a step with no samples included, since a ``dist_sync`` step waits for every worker.
- ``is_writer``: rank 0 alone writes the run directory; the others only log.
- ``allreduce_sum``/``allreduce_array``: sums over the workers (epoch metrics, test accuracy,
  BatchNorm running statistics).
- ``trainer_options``: the kvstore for :class:`mxnet.gluon.Trainer`, with
  ``update_on_kvstore=False``. With MXNet's default for a dist kvstore (``True``) the
  optimizer is pickled to the servers once, and a later ``trainer.set_learning_rate`` changes
  only the worker's copy: learning-rate schedules silently stop working
  (apache/mxnet#15919). With ``False`` the servers only sum gradients, and every worker
  applies the same update to the same weights with its own optimizer, lr changes included.

A worker that fails after :func:`connect` must leave with ``os._exit``: a normal exit waits
in the kvstore's shutdown barrier for peers that never arrive (``gluon_ft.cli`` does this).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import mxnet as mx
import numpy as np

from gluon_ft.errors import UsageError

DIST_KVSTORES = ("dist_sync", "dist_device_sync")
# The Trainer keys its parameters 0, 1, ...; the allreduces use keys from here on, one per
# vector length. ps-lite maps an int key to a server with key * 9973 in 32 bits, so it must
# stay below 2**31 / 9973.
RESERVED_KEY = 200_000
CLUSTER_VARIABLES = (
    "DMLC_ROLE",
    "DMLC_PS_ROOT_URI",
    "DMLC_PS_ROOT_PORT",
    "DMLC_NUM_SERVER",
    "DMLC_NUM_WORKER",
)


def is_distributed(kvstore: str | None) -> bool:
    """Whether ``--kvstore`` asks for MXNet's parameter server (any ``dist_*`` type)."""
    return bool(kvstore) and kvstore.lower().startswith("dist")


@dataclass
class DistContext:
    """This process's rank among ``num_workers`` data-parallel workers, and their kvstore.

    The one-process context (``kvstore=None``) is rank 0 of 1; its sums are its own values.
    """

    kvstore: mx.kvstore.KVStore | None = None
    rank: int = 0
    num_workers: int = 1
    _keys: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.kvstore is not None

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run directory, metrics and checkpoints."""
        return self.rank == 0

    def allreduce_sum(self, values: Sequence[float]) -> list[float]:
        """Return ``values`` summed element-wise over every worker.

        Every worker must call it at the same point with the same number of values: it is a
        push and a pull through the servers, which in ``dist_sync`` wait for all workers.
        """
        summed = self.allreduce_array(
            mx.nd.array(np.asarray(values, dtype=np.float64), dtype="float64")
        )
        return summed.asnumpy().tolist()

    def allreduce_array(self, values: mx.nd.NDArray) -> mx.nd.NDArray:
        """Return the float64 vector ``values`` (on the CPU) summed over every worker.

        The same contract as :meth:`allreduce_sum`. Each vector length gets its own key, the
        next free one from :data:`RESERVED_KEY` in the order of first use, which is the same
        on every worker since they all call at the same points.
        """
        if not self.distributed:
            return values.copy()
        length = values.shape[0]
        if length not in self._keys:
            key = RESERVED_KEY + len(self._keys)
            self.kvstore.init(key, mx.nd.zeros((length,), dtype="float64"))
            self._keys[length] = key
        summed = mx.nd.zeros((length,), dtype="float64")
        self.kvstore.push(self._keys[length], values)
        self.kvstore.pull(self._keys[length], out=summed)
        # Done before returning: a worker that leaves next (os._exit on a stop) must not take
        # its push with it, or the others wait for that push forever.
        summed.wait_to_read()
        return summed

    def broadcast_initial_parameters(self, trainer: mx.gluon.Trainer) -> None:
        """Give every worker rank 0's parameters now, and wait until they have arrived.

        The Trainer would do it lazily in its first ``step()``, with pulls that MXNet does not
        order before that step's gradient pushes to the same keys (they touch different
        arrays). With ``update_on_kvstore=False`` the servers hold gradient sums under those
        keys, so a late pull returned the first summed gradient as the initial weights: in 2
        of 5 runs of a 2-worker test, and then the workers train different models. Parameters
        whose shapes are still deferred are left to the first step.
        """
        if not self.distributed:
            return
        for param in trainer._params:
            if param._data is not None:
                # A predict-mode forward pass leaves convolution weights in oneDNN's own
                # memory layout, which the kvstore cannot push ("We can't generate TBlob for
                # MKLDNN data", raised in the engine; the other workers then pull a key the
                # servers never got, and a server aborts). reset_ctx copies them into plain
                # arrays.
                param.reset_ctx(param.list_ctx())
        trainer._init_kvstore()
        trainer._init_params()
        mx.nd.waitall()

    def trainer_options(self) -> dict:
        """``kvstore``/``update_on_kvstore`` for :class:`mxnet.gluon.Trainer` (see module doc)."""
        return {"kvstore": self.kvstore, "update_on_kvstore": False}

    def describe(self) -> dict:
        """What ``config.json`` records about the cluster."""
        return {
            "kvstore": self.kvstore.type if self.distributed else None,
            "num_workers": self.num_workers,
            "update_on_kvstore": False if self.distributed else None,
        }


def connect(kvstore: str | None, batch_size: int) -> DistContext:
    """Join the ps-lite cluster for a ``dist_*`` ``kvstore``; else the one-process context.

    Blocks until every worker of the cluster has connected.

    Raises
    ------
    UsageError
        A ``dist_*`` type other than :data:`DIST_KVSTORES`, no cluster in the environment
        (the command was not started by ``gluon-ft launch`` or MXNet's launcher), or a
        ``batch_size`` smaller than the number of workers.
    """
    if not is_distributed(kvstore):
        return DistContext()
    kind = kvstore.lower()
    if kind not in DIST_KVSTORES:
        raise UsageError(
            f"--kvstore {kvstore}: use {' or '.join(DIST_KVSTORES)}. dist_async needs the "
            "optimizer on the servers, where learning-rate changes never arrive "
            "(apache/mxnet#15919)."
        )
    missing = [name for name in CLUSTER_VARIABLES if not os.environ.get(name)]
    if missing or os.environ["DMLC_ROLE"] != "worker":
        raise UsageError(
            f"--kvstore {kvstore} runs as a worker of a parameter-server cluster, but "
            f"{', '.join(missing) or 'DMLC_ROLE=worker'} is not set. Start it with "
            f"`gluon-ft launch -n WORKERS -- gluon-ft train --kvstore {kvstore} ...`, or with "
            "MXNet's launcher on several machines."
        )
    # Checked before connecting, from the launcher's count, so that every worker refuses
    # alike instead of waiting for the others.
    num_workers = int(os.environ["DMLC_NUM_WORKER"])
    if batch_size < num_workers:
        raise UsageError(
            f"--batch-size {batch_size} is the global batch, split over {num_workers} "
            "workers; it must be at least the number of workers."
        )
    store = mx.kv.create(kind)
    return DistContext(store, store.rank, store.num_workers)
