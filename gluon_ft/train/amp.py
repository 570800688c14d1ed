"""Mixed precision through MXNet AMP: bfloat16 on CPUs that have it, float16 on GPUs.

``--dtype`` chooses it. MXNet AMP rewrites the network's operators as the graph is built, so
:func:`enable` must run before the first forward pass, and it holds for the whole process.
Inputs stay float32: AMP inserts the casts.

- ``bfloat16`` (CPU, oneDNN): needs a CPU with native BF16 instructions (``avx512_bf16`` or
  ``amx_bf16``); elsewhere oneDNN would emulate it, slower than float32, so it is refused.
  bfloat16 has float32's exponent range: no loss scaling. :func:`prepare_network` keeps the
  stem in float32 (see there); on AMX CPUs :mod:`gluon_ft.isa` lets oneDNN use the tiles.
- ``float16`` (GPU): MXNet's recipe, a Trainer with ``update_on_kvstore=False`` and dynamic
  loss scaling (:func:`backward` scales, ``trainer.step`` unscales and skips overflowed steps).
  MXNet has no float16 training kernels worth using on a CPU, so it is refused there.
- ``auto``: :func:`choose_dtype` picks float16 on GPUs; on a CPU, bfloat16 only where it is
  supported and a short probe of the run's model, size and batch measures it faster.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from gluon_ft.errors import UsageError
from gluon_ft.isa import BF16_CPU_FLAGS, bfloat16_unsupported, cpu_flags  # noqa: F401
from gluon_ft.model.graft import walk_blocks
from gluon_ft.model.parts import stem_blocks
from gluon_ft.train.dist import is_distributed

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = (*DTYPES, "auto")
# --dtype auto takes bfloat16 only when the probe measures at least this speedup: below it,
# the probe's noise could hide a loss, and float32 is the safer numerics.
MIN_BF16_SPEEDUP = 1.1
PROBE_MAX_BATCH = 32  # larger batches make the probe long and change the ratio little
PROBE_CLASSES = 10  # the data is not loaded yet; the head is a small part of the step

_enabled: list[str] = []  # the dtype AMP was initialized with in this process, if any
_unwrapped: dict = {}  # (mx.sym or mx.nd, operator name) -> the operator before AMP wrapped it
_wrapped: dict = {}  # (namespace, name) -> (the operator before AMP, AMP's wrapper): every one
_PREPARED = "_gluon_ft_stem_in_float32"  # marks a network prepare_network has changed


def uses_amp(dtype: str) -> bool:
    """Whether ``dtype`` trains through AMP (a float32 master copy, low-precision compute)."""
    return dtype in ("bfloat16", "float16")


def check_dtype(dtype: str, ctx: list, flags: frozenset[str] | None = None) -> None:
    """Refuse a ``--dtype`` these contexts cannot train in, saying what would work.

    Parameters
    ----------
    dtype : str
        ``float32``, ``bfloat16`` or ``float16`` (``auto`` is resolved by
        :func:`choose_dtype` first).
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
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(CHOICES)}.")
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
        reason = bfloat16_unsupported(flags)
        if reason:
            raise UsageError(f"--dtype {reason}. Use --dtype float32.")


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
    import mxnet as mx
    from mxnet.contrib import amp
    from mxnet.contrib.amp import lists

    for name in lists.symbol_bf16.BF16_FUNCS:  # what prepare_network's stem keeps in float32
        for module in (mx.sym, mx.nd):
            _unwrapped[module, name] = getattr(module, name)
    namespaces = _operator_namespaces()
    before = {namespace: dict(vars(namespace)) for namespace in namespaces}
    amp.init(target_dtype=dtype)
    for namespace in namespaces:
        for name, now in vars(namespace).items():
            if name in before[namespace] and before[namespace][name] is not now:
                _wrapped[namespace, name] = (before[namespace][name], now)
    _enabled.append(dtype)


def _operator_namespaces() -> list:
    """The modules whose operators ``amp.init`` replaces by wrappers: ``mx.sym`` and ``mx.nd``,
    their ``op`` modules and their prefixed submodules (``contrib``, ``linalg``, ...)."""
    import mxnet as mx
    from mxnet import base

    found = []
    for module in (mx.sym, mx.nd):
        found += [module, module.op]
        found += [getattr(module, prefix[1:-1]) for prefix in base._OP_NAME_PREFIX_LIST]
    unique = {id(namespace): namespace for namespace in found}
    return list(unique.values())


@contextlib.contextmanager
def float32_operators():
    """Inside the block, every operator AMP wrapped is its own float32 self again.

    A network that builds its graph in the block computes as it would in a process that
    never turned AMP on: the end-of-run report scores the test part as ``gluon-ft predict``
    does (float32), not through the casts of a bfloat16 run. Nothing else may run MXNet
    operators meanwhile (the swap is process-wide); without AMP it changes nothing.
    """
    for (namespace, name), (original, _) in _wrapped.items():
        setattr(namespace, name, original)
    try:
        yield
    finally:
        for (namespace, name), (_, wrapper) in _wrapped.items():
            setattr(namespace, name, wrapper)


class _Float32Operators:
    """``F`` (``mx.sym`` or ``mx.nd``) with the operators AMP wrapped swapped back."""

    def __init__(self, F):
        self._F = F

    def __getattr__(self, name: str):
        return _unwrapped.get((self._F, name)) or getattr(self._F, name)


def _compute_in_float32(block) -> None:
    """Make ``block`` build its operators without AMP's bfloat16 casts."""
    original = block.hybrid_forward
    block.hybrid_forward = lambda F, *args, **params: original(
        _Float32Operators(F), *args, **params
    )


def _cast_output_to_bfloat16(block) -> None:
    from mxnet.contrib.amp.amp import bfloat16

    original = block.hybrid_forward
    block.hybrid_forward = lambda F, *args, **params: F.amp_cast(
        original(F, *args, **params), dtype=bfloat16
    )


def prepare_network(net, dtype: str) -> list[str]:
    """Under bfloat16, keep the stem in float32 and cast its output to bfloat16 once.

    Call it after :func:`enable` and before the first forward pass. Why: oneDNN 2.4 has no
    blocked-layout bfloat16 kernel for a convolution over 3 input channels. AMP's bfloat16 stem
    convolution runs as a GEMM that writes plain NCHW, and the BatchNorms and the max-pool
    after it take oneDNN's slow plain-layout path until the next convolution reorders (the
    "BatchNorm on bfloat16 is slow" of the profile: per step of resnet18_v2 at 224 px, batch
    32, one thread: 1.08 s of BatchNorm in bfloat16 against 0.45 s in float32; 0.46 s with
    the stem in float32). In float32 the stem runs the blocked kernels, and the stages start
    from one cast. On AMX (:mod:`gluon_ft.isa`) it costs about the same either way.

    Returns
    -------
    list of str
        The class names of the stem blocks kept in float32 (empty: nothing changed).
    """
    stem = stem_blocks(net) if dtype == "bfloat16" else []
    if not stem or getattr(stem[-1], _PREPARED, False):
        return []
    setattr(stem[-1], _PREPARED, True)
    for block in stem:
        for _, child in walk_blocks(block):
            if getattr(child, "_op_name", None) in ("Convolution", "FullyConnected"):
                _compute_in_float32(child)
    _cast_output_to_bfloat16(stem[-1])
    return [type(block).__name__ for block in stem]


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


# ----------------------------------------------------------------------------- --dtype auto


def choose_dtype(config, ctx: list) -> dict:
    """Resolve ``config.dtype`` (``auto`` included) for training on ``ctx``; check it.

    ``auto``: float16 on GPUs; on a CPU, bfloat16 where :func:`check_dtype` allows it and
    :func:`probe_speeds` measures it at least :data:`MIN_BF16_SPEEDUP` times faster, else
    float32. A ``--resume`` keeps the choice recorded in the run's ``config.json``.

    Returns
    -------
    dict
        ``{"requested", "dtype", "why"}``, with ``"probe"`` (:func:`probe_speeds`) when one
        ran: what ``config.json`` records as ``dtype_choice``.

    Raises
    ------
    UsageError
        An explicit ``--dtype`` these contexts cannot train in.
    """
    requested = config.dtype
    if requested != "auto":
        check_dtype(requested, ctx)
        return {"requested": requested, "dtype": requested, "why": "--dtype"}
    choice = {"requested": "auto"}
    if is_distributed(config.kvstore):
        raise UsageError(
            f"--dtype auto probes the machine it runs on, so the workers of a --kvstore "
            f"{config.kvstore} run could choose differently: pass --dtype float32 or bfloat16."
        )
    on_gpu = [c for c in ctx if c.device_type == "gpu"]
    recorded = _recorded_choice(config) if config.resume else None
    if recorded:
        check_dtype(recorded, ctx)  # the run may have moved to another machine
        return {**choice, "dtype": recorded, "why": "the choice recorded in the run (--resume)"}
    if on_gpu:
        dtype = "float16" if len(on_gpu) == len(ctx) else "float32"
        return {**choice, "dtype": dtype, "why": "GPUs: MXNet AMP float16, no probe"}
    reason = bfloat16_unsupported()
    if reason:
        return {**choice, "dtype": "float32", "why": reason}
    batch = min(PROBE_MAX_BATCH, math.ceil(config.batch_size / len(ctx)))
    probe = probe_speeds(config.model, config.image_size, batch)
    faster = probe["speedup"] >= MIN_BF16_SPEEDUP
    why = (
        f"the probe measured bfloat16 {probe['speedup']:.2f}x float32 "
        f"({'at least' if faster else 'below'} {MIN_BF16_SPEEDUP}x)"
    )
    return {**choice, "dtype": "bfloat16" if faster else "float32", "why": why, "probe": probe}


def describe_choice(choice: dict) -> str:
    """One line for the console: what ``--dtype auto`` chose, and why."""
    line = f"--dtype auto: {choice['dtype']} ({choice['why']}"
    probe = choice.get("probe")
    if probe:
        line += (
            f"; {probe['image_size']} px, batch {probe['batch_size']}: float32 "
            f"{probe['float32_img_s']:.1f} img/s, bfloat16 {probe['bfloat16_img_s']:.1f} img/s"
        )
    return line + ")"


def _recorded_choice(config) -> str | None:
    try:
        saved = json.loads((Path(config.out) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    dtype = saved.get("dtype") if isinstance(saved, dict) else None
    return dtype if dtype in DTYPES else None


def probe_speeds(model: str, image_size: int, batch_size: int, rounds: int = 3) -> dict:
    """Training steps of ``model`` in float32 and in bfloat16, timed in a child process.

    AMP cannot be turned off once on, so the probe runs apart from the run it decides for. It
    is the bench's bare loop (:mod:`gluon_ft.train.bare_loop`) on one repeated batch, the networks
    prepared as :func:`prepare_network` prepares the run's, one warm-up step each, then
    ``rounds`` alternating timings; each figure is the fastest of its timings.

    Returns
    -------
    dict
        ``{"model", "image_size", "batch_size", "float32_img_s", "bfloat16_img_s",
        "speedup", "seconds"}``.
    """
    args = {"model": model, "image_size": image_size, "batch_size": batch_size}
    args["rounds"] = rounds
    code = f"import sys, {__name__} as amp; amp._probe_in_this_process(sys.argv[1])"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise UsageError(
            f"--dtype auto: the bfloat16 probe failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-500:]} Choose --dtype float32 or bfloat16 yourself."
        )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {**args, **figures, "seconds": round(time.perf_counter() - started, 1)}


def _probe_in_this_process(arguments: str) -> None:
    """The child of :func:`probe_speeds`: print its figures as one JSON line."""
    import mxnet as mx

    from gluon_ft.model.graft import scratch_twin
    from gluon_ft.train.bare_loop import BareLoop

    args = json.loads(arguments)
    size, batch = args["image_size"], args["batch_size"]
    loops = {}
    for dtype in ("float32", "bfloat16"):  # float32's graph is built before AMP turns on
        enable(dtype)
        mx.random.seed(0)
        net = scratch_twin(args["model"], PROBE_CLASSES, [mx.cpu()], size)
        prepare_network(net, dtype)
        loops[dtype] = BareLoop(args["model"], batch, size, PROBE_CLASSES, net=net)
        loops[dtype].run(1)
    seconds = {dtype: [] for dtype in loops}
    for _ in range(args["rounds"]):
        for dtype, loop in loops.items():
            seconds[dtype].append(loop.run(1))
    rates = {f"{dtype}_img_s": batch / min(times) for dtype, times in seconds.items()}
    rates["speedup"] = rates["bfloat16_img_s"] / rates["float32_img_s"]
    print(json.dumps(rates))
