"""OpenMP thread count for MXNet, set before ``import mxnet``.

MXNet 1.9.1 runs its OpenMP kernels on half the cores by default: one thread on a 2-core
machine. Measured here, two threads nearly double training and inference throughput, so every
entry point calls :func:`configure_threads` before MXNet is imported (``gluon_ft/__init__``
does it on import).
"""

from __future__ import annotations

import os
import sys

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS")
# What configure_threads chose, so that a child process (which inherits OMP_NUM_THREADS) can
# tell gluon-ft's own choice from the user's: `gluon-ft launch` started from a gluon-ft
# process must still size its workers' pools, or two-thread workers spin in OpenMP barriers
# on a busy machine.
CHOSEN_MARK = "GLUON_FT_CHOSE_OMP_NUM_THREADS"


def usable_cores() -> int:
    """Return the number of cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(environ: dict | None = None) -> dict:
    """Set ``OMP_NUM_THREADS`` to the usable cores unless the user chose a thread count.

    Parameters
    ----------
    environ : dict, optional
        The environment to change; ``os.environ`` by default.

    Returns
    -------
    dict
        ``{"omp_num_threads": str, "source": "user" | "gluon-ft", "mxnet_imported_first": bool}``.
    """
    env = os.environ if environ is None else environ
    user_set = [name for name in THREAD_VARIABLES if env.get(name)]
    if user_set == ["OMP_NUM_THREADS"] and env.get(CHOSEN_MARK) == env["OMP_NUM_THREADS"]:
        user_set = []  # inherited from a gluon-ft parent that chose it
    if not user_set:
        env["OMP_NUM_THREADS"] = env[CHOSEN_MARK] = str(usable_cores())
    return {
        "omp_num_threads": env.get("OMP_NUM_THREADS") or env.get("MXNET_OMP_MAX_THREADS"),
        "source": "user" if user_set else "gluon-ft",
        # If mxnet was imported before us, its OpenMP pool is already sized.
        "mxnet_imported_first": "mxnet" in sys.modules,
    }
