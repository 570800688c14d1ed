"""Mixed precision through MXNet AMP: bfloat16 on CPUs that have it, float16 on GPUs.

``--dtype`` chooses it. MXNet AMP rewrites the network's operators as the graph is built, so
:func:`enable` must run before the first forward pass, and it holds for the whole process.
Inputs stay float32: AMP inserts the casts.

- ``bfloat16`` (CPU, oneDNN): needs a CPU with native BF16 instructions (``avx512_bf16`` or
  ``amx_bf16``); elsewhere oneDNN would emulate it, slower than float32, so it is refused.
  bfloat16 has float32's exponent range: no loss scaling.
- ``float16`` (GPU): MXNet's recipe, a Trainer with ``update_on_kvstore=False`` and dynamic
  loss scaling (:func:`backward` scales, ``trainer.step`` unscales and skips overflowed steps).
  MXNet has no float16 training kernels worth using on a CPU, so it is refused there.
"""

from __future__ import annotations

from pathlib import Path

from gluon_ft.errors import UsageError

DTYPES = ("float32", "bfloat16", "float16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

_enabled: list[str] = []  # the dtype AMP was initialized with in this process, if any


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


def uses_amp(dtype: str) -> bool:
    """Whether ``dtype`` trains through AMP (a float32 master copy, low-precision compute)."""
    return dtype in ("bfloat16", "float16")


def check_dtype(dtype: str, ctx: list, flags: frozenset[str] | None = None) -> None:
    """Refuse a ``--dtype`` these contexts cannot train in, saying what would work.

    Parameters
    ----------
    dtype : str
        ``float32``, ``bfloat16`` or ``float16``.
    ctx : list of Context
        The training devices.
    flags : frozenset of str, optional
        CPU flags; read from ``/proc/cpuinfo`` by default.

    Raises
    ------
    UsageError
        Unknown dtype; bfloat16 on a GPU or on a CPU without BF16 instructions or without
        oneDNN; float16 on a CPU.
    """
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    if dtype == "float32":
        return
    on_gpu = [c for c in ctx if c.device_type == "gpu"]
    if dtype == "float16" and len(on_gpu) < len(ctx):
        raise UsageError(
            "--dtype float16 trains on GPUs only (MXNet AMP with dynamic loss scaling); MXNet "
            "has no fast float16 kernels for the CPU. On this CPU use --dtype bfloat16 (it "
            "needs avx512_bf16 or amx_bf16) or float32."
        )
    if dtype == "bfloat16":
        if on_gpu:
            raise UsageError(
                "--dtype bfloat16 runs on CPUs only in MXNet 1.9 (oneDNN kernels); on GPUs use "
                "--dtype float16."
            )
        flags = cpu_flags() if flags is None else flags
        have = [f for f in BF16_CPU_FLAGS if f in flags]
        if not have:
            raise UsageError(
                "--dtype bfloat16 needs a CPU with native BF16 instructions "
                f"({' or '.join(BF16_CPU_FLAGS)} in /proc/cpuinfo); this one has none, and "
                "emulated bfloat16 is slower than float32. Use --dtype float32."
            )
        import mxnet as mx

        if not mx.runtime.Features().is_enabled("MKLDNN"):
            raise UsageError(
                "--dtype bfloat16 needs MXNet built with oneDNN (MKLDNN); this build has no "
                "bfloat16 kernels. Use --dtype float32."
            )


def enable(dtype: str) -> None:
    """Initialize MXNet AMP for ``dtype`` (before the first forward pass); float32 is a no-op.

    Raises
    ------
    UsageError
        AMP was already initialized in this process with another dtype (it cannot be undone).
    """
    if not uses_amp(dtype):
        if _enabled:
            raise UsageError(
                f"This process already trains in {_enabled[0]} (MXNet AMP cannot be turned "
                "off); run the float32 training in a new process."
            )
        return
    if _enabled:
        if _enabled[0] != dtype:
            raise UsageError(
                f"MXNet AMP was initialized for {_enabled[0]} in this process; {dtype} needs a "
                "new process."
            )
        return
    from mxnet.contrib import amp

    amp.init(target_dtype=dtype)
    _enabled.append(dtype)


def trainer_kwargs(dtype: str) -> dict:
    """Extra ``gluon.Trainer`` arguments: float16 loss scaling needs updates off the kvstore."""
    return {"update_on_kvstore": False} if dtype == "float16" else {}


def prepare_trainer(trainer, dtype: str) -> None:
    """Attach AMP's dynamic loss scaler to ``trainer`` (float16 only)."""
    if dtype == "float16":
        from mxnet.contrib import amp

        amp.init_trainer(trainer)


def backward(losses: list, trainer, dtype: str) -> None:
    """``autograd.backward(losses)``, through the loss scaler under float16."""
    from mxnet import autograd

    if dtype == "float16":
        from mxnet.contrib import amp

        with amp.scale_loss(losses, trainer) as scaled:
            autograd.backward(scaled)
    else:
        autograd.backward(losses)
