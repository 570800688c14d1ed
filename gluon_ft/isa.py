"""What this CPU offers bfloat16, and AMX for oneDNN, set before MXNet's first kernel.

MXNet 1.9.1 ships oneDNN 2.4.4. On a CPU with AMX (``amx_tile``, ``amx_bf16``: Intel Xeon
Sapphire Rapids and later) that oneDNN runs bfloat16 on its AVX-512 BF16 kernels unless
``DNNL_MAX_CPU_ISA=AVX512_CORE_AMX`` raises its ceiling, and Linux (5.16+) lets a process use
the AMX tile registers only after it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``),
which oneDNN 2.4 never does: its AMX kernels die of SIGILL then. Measured on such a CPU
(resnet18_v2, 224 px, batch 32, one thread, CPU time per training step): float32 3.1 s,
bfloat16 on AVX-512 BF16 4.8 s (slower: there ``vdpbf16ps`` has the float32 FMA's
throughput), bfloat16 on AMX 1.3 s.

:func:`configure_amx` asks Linux, and raises the ceiling only when it said yes. oneDNN reads
the variable once, when it creates its first kernel; a child process started with ``exec``
loses the permission but would inherit the variable, and die on its first AMX kernel. So the
variable is set only until MXNet has created one kernel, then removed again. It runs at
``import gluon_ft``, after the thread settings, like them before any MXNet work.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16")
ISA_VARIABLES = ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")
AMX_ISA = "AVX512_CORE_AMX"
# Linux x86-64: the arch_prctl system call, its "request permission" code, and the state
# component of the AMX tile data (asm/prctl.h, asm/fpu/types.h).
SYS_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of this CPU (empty where ``/proc/cpuinfo`` does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def bfloat16_unsupported(flags: frozenset[str] | None = None) -> str | None:
    """Why this CPU and MXNet build cannot run bfloat16 well, or None if they can.

    Parameters
    ----------
    flags : frozenset of str, optional
        CPU flags; read from ``/proc/cpuinfo`` by default.
    """
    flags = cpu_flags() if flags is None else flags
    if not any(f in flags for f in BF16_CPU_FLAGS):
        return (
            "bfloat16 needs a CPU with native BF16 instructions "
            f"({' or '.join(BF16_CPU_FLAGS)} in /proc/cpuinfo); this one has none, and "
            "emulated bfloat16 is slower than float32"
        )
    import mxnet as mx

    if not mx.runtime.Features().is_enabled("MKLDNN"):
        return "bfloat16 needs MXNet built with oneDNN (MKLDNN); this build has no bfloat16 kernels"
    return None


def request_amx_permission() -> bool:
    """Ask Linux for the AMX tile registers for this process; True if granted."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):  # not Linux, or no syscall() in this libc
        return False


def _make_onednn_read_its_isa() -> None:
    """Create one oneDNN kernel (a 1-element bfloat16 reorder): oneDNN fixes its ISA then."""
    import mxnet as mx
    from mxnet.contrib.amp.amp import bfloat16

    mx.nd.amp_cast(mx.nd.zeros((1, 1, 1, 1)), dtype=bfloat16).wait_to_read()


def configure_amx(environ: dict | None = None, flags: frozenset[str] | None = None) -> dict:
    """Let oneDNN run bfloat16 on AMX when the CPU has it and Linux allows it.

    A user's own ``DNNL_MAX_CPU_ISA`` / ``ONEDNN_MAX_CPU_ISA`` is respected (the permission is
    still requested, so a ceiling that allows AMX works).

    Parameters
    ----------
    environ : dict, optional
        The environment to read and change; ``os.environ`` by default.
    flags : frozenset of str, optional
        CPU flags; read from ``/proc/cpuinfo`` by default.

    Returns
    -------
    dict
        ``{"amx": bool, "why": str, "mxnet_imported_first": bool}``: whether oneDNN may use
        AMX, the reason, and whether MXNet was imported before (then, if it already ran a
        kernel, oneDNN has fixed its ISA and this came too late).
    """
    env = os.environ if environ is None else environ
    flags = cpu_flags() if flags is None else flags
    first = "mxnet" in sys.modules
    if not all(f in flags for f in AMX_CPU_FLAGS):
        return {"amx": False, "why": "this CPU has no AMX", "mxnet_imported_first": first}
    if not request_amx_permission():
        why = "Linux refused the AMX tile permission (a kernel before 5.16?)"
        return {"amx": False, "why": why, "mxnet_imported_first": first}
    user_set = [name for name in ISA_VARIABLES if env.get(name)]
    if user_set:
        value = env[user_set[0]]
        why = f"{user_set[0]}={value} set by the user"
        return {"amx": "AMX" in value.upper(), "why": why, "mxnet_imported_first": first}
    env["DNNL_MAX_CPU_ISA"] = AMX_ISA
    try:
        _make_onednn_read_its_isa()
    finally:
        del env["DNNL_MAX_CPU_ISA"]  # a child started by exec would lack the permission
    why = f"DNNL_MAX_CPU_ISA={AMX_ISA} until oneDNN read it"
    return {"amx": True, "why": why, "mxnet_imported_first": first}
