"""``gluon-ft bench``: the throughput of every path, measured in one run, as one JSON object.

Every figure is a median over ``repeats`` timings taken after a warm-up. Figures that are
compared with each other are timed in interleaved rounds (one timing of each per round), so
that a change in the machine's load while the bench runs hits both sides of a ratio alike.

- ``bare_fp32_img_s``: a hand-written hybridized Gluon loop (:mod:`gluon_ft.train.bare_loop`), with
  gluon-ft's thread settings; ``bare_fp32_default_threads_img_s``: the same loop in a child
  process with MXNet's default threads; ``thread_speedup`` = train / that.
- ``train_fp32_img_s``: gluon-ft's own step (:func:`gluon_ft.train.train_epoch` on uint8 host
  batches: copy, normalize on the device, metrics on the device), same model and batch;
  ``trainer_overhead`` = 1 - train / bare.
- ``frozen_step_img_s``: the same step with the backbone frozen (BatchNorm included).
- ``frozen_epoch_s``, ``cached_epoch_s``: a frozen-backbone epoch (train + test pass) of
  :func:`gluon_ft.train.train` on large JPEGs, without and with ``--cache-features``.
- ``loader_folder_img_s``, ``loader_recordio_img_s``: decode + the book's train augmentation
  from the large-JPEG folder and from its pack, with the same worker count.
- ``infer_img_s``, ``infer_optimized_img_s``: hybridized predict-mode forward, plain and in
  the fastest form MXNet offers here whose top-1 predictions agree with it (on >= 99% of the
  batch): ``optimize_for(backend="MKLDNN")`` (oneDNN fusion) in float32, or the fused
  bfloat16 graph of ``--dtype bfloat16`` (:func:`gluon_ft.deploy.inference.fused_bfloat16`) where
  the CPU has it. ``details`` has every form.
- ``train_bf16_img_s``, ``bf16_speedup``: gluon-ft's step under ``--dtype bfloat16``, timed
  against the float32 step in the same rounds. MXNet AMP cannot be turned off once on, so this
  phase runs last.
- ``precision``: per size of :attr:`BenchSizes.precision_sizes` (full: 224 px, batch 32 and
  64 px, batch 64), float32 and bfloat16 training, what ``--dtype auto`` chooses there (its
  probe's figures) and the rate of that choice against float32 in the same rounds, and
  inference: plain float32, fused float32, fused bfloat16 with its top-1 agreement. The
  top-level bf16 and inference figures are those of the first size.
- ``infer_int8_img_s``, ``int8_speedup``: the same network quantized to int8 as ``predict
  --dtype int8`` quantizes a run (:func:`gluon_ft.deploy.int8.quantize`), at every precision
  size. Its top-1 agreement with float32 (``int8_top1_agreement``, ``agreement``) is judged
  only on a finished run's test part (``--run RUN``, :mod:`gluon_ft.bench.agreement`); without
  one it is ``None``, "not measured".
- ``infer_best``: the fastest of fused float32, fused bfloat16 and int8 (int8 only when
  ``--run`` judged it) that agrees with float32 on at least 99 %, against plain float32.
- ``serve``, ``serve_*``: a real ``gluon-ft serve`` process under 1, 8 and 64 concurrent
  clients posting JPEGs (:mod:`gluon_ft.bench.serve_load`): requests/s, p50/p99 latency,
  answers other than 200, and whether every answer equals the one-client answer for its image.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

BF16_TIMINGS = ("train_bf16_img_s", "bf16_speedup")
CPU_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class BenchSizes:
    """What the bench runs on. The full sizes are the issue's: resnet18_v2, 224 px, batch 32."""

    model: str = "resnet18_v2"
    image_size: int = 224
    batch_size: int = 32
    classes: int = 10
    steps: int = 4  # training steps (or inference batches) per timing
    repeats: int = 5  # timings per figure; the figure is their median
    warmup: int = 2  # untimed steps first: graph building, oneDNN primitive creation
    photo_width: int = 800  # the large JPEGs of the loader and epoch figures
    photo_height: int = 600
    train_photos: int = 128
    test_photos: int = 32
    epochs: int = 3  # frozen / cached runs; the first epoch is a warm-up, not counted
    # (image size, batch) pairs of the precision figures; the first is the main size above
    precision_sizes: tuple = ((224, 32), (64, 64))


FULL = BenchSizes()
QUICK = replace(
    FULL,
    image_size=64,
    batch_size=16,
    steps=2,
    repeats=3,
    warmup=1,
    train_photos=32,
    test_photos=16,
    epochs=2,
    precision_sizes=((64, 16),),
)


def interleave(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call every timer once per round for ``repeats`` rounds; return each one's results."""
    results: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            results[name].append(timer())
    return results


def record(timings: dict[str, list[float]], result: dict, details: dict) -> dict[str, float]:
    """Put each timing's median in ``result`` and all its values in ``details``."""
    found = {name: statistics.median(values) for name, values in timings.items()}
    result.update(found)
    details.update({f"{name}_runs": values for name, values in timings.items()})
    return found


# ----------------------------------------------------------------------------- data


def write_photos(root: Path, sizes: BenchSizes, seed: int = 0) -> Path:
    """Write ``root/{train,test}/{a,b}/*.jpg``: smooth random pictures at the photo size.

    Smooth colour fields with mild noise compress like photos (tens of kB at 800x600), so
    decoding costs what it costs on real pictures.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    size = (sizes.photo_width, sizes.photo_height)
    for split, count in (("train", sizes.train_photos), ("test", sizes.test_photos)):
        for i in range(count):
            folder = root / split / "ab"[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), np.int16)
            noise = rng.integers(-12, 13, size=field.shape, dtype=np.int16)
            pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def host_batch(sizes: BenchSizes, seed: int = 0) -> tuple:
    """One loader-shaped batch: ``(uint8 NHWC images, int32 labels, 0 skipped)``."""
    rng = np.random.default_rng(seed)
    shape = (sizes.batch_size, sizes.image_size, sizes.image_size, 3)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = rng.integers(0, sizes.classes, size=sizes.batch_size).astype(np.int32)
    return images, labels, 0


# ----------------------------------------------------------------------------- timers


class GluonFTStep:
    """gluon-ft's training step, as a run takes it, on one repeated host batch."""

    def __init__(self, sizes: BenchSizes, dtype: str = "float32", freeze: str = "none"):
        import mxnet as mx
        from mxnet import gluon

        from gluon_ft.model.freeze import FreezePlan
        from gluon_ft.model.graft import scratch_twin
        from gluon_ft.train import StepOptions, TrainConfig, amp, make_trainer

        self.ctx = [mx.cpu()]
        self.config = TrainConfig(
            model=sizes.model,
            pretrained="none",
            batch_size=sizes.batch_size,
            image_size=sizes.image_size,
            dtype=dtype,
            freeze=freeze,
            progress=False,
        )
        mx.random.seed(0)
        self.net = scratch_twin(sizes.model, sizes.classes, self.ctx)
        FreezePlan(freeze).setup(self.net)
        amp.prepare_network(self.net, dtype)
        self.net.hybridize(static_alloc=True, static_shape=True)
        self.trainer = make_trainer(self.net, self.config, self.ctx)
        self.options = StepOptions.of(self.config)
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        self.batch = host_batch(sizes)
        self.batch_size = sizes.batch_size

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` steps, as :func:`gluon_ft.train.train_epoch` measures them."""
        import mxnet as mx

        from gluon_ft.train import EpochSteps, StopRequest, train_epoch

        mx.nd.waitall()
        batches = EpochSteps([self.batch] * steps, self.config.seed, 0, 0, StopRequest())
        _, _, seconds = train_epoch(
            self.net, self.trainer, batches, self.ctx, self.loss_fn, options=self.options
        )
        return seconds


class Inference:
    """Predict-mode forward passes of one network on one float32 batch, in one of its forms.

    The plain form is ``hybridize(static_alloc=True, static_shape=True)``; :meth:`fused` gives
    the same weights after ``optimize_for(backend="MKLDNN")`` (oneDNN fuses convolution,
    BatchNorm, ReLU and sums), optionally converted to bfloat16 first by
    ``amp.convert_hybrid_block`` (weights cast once, float32 at the edges).
    """

    def __init__(self, sizes: BenchSizes, net=None, x=None):
        import mxnet as mx

        from gluon_ft.model.graft import scratch_twin

        self.sizes = sizes
        if net is None:
            mx.random.seed(0)
            net = scratch_twin(sizes.model, sizes.classes, [mx.cpu()])
            shape = (sizes.batch_size, 3, sizes.image_size, sizes.image_size)
            x = mx.nd.random.normal(shape=shape, ctx=mx.cpu())
            net(x)  # materializes the deferred shapes
            net.hybridize(static_alloc=True, static_shape=True)
            net(x)  # builds the graph that a conversion reads
        self.net, self.x = net, x

    def fused(self, bfloat16: bool = False) -> Inference:
        """The same weights, partitioned for oneDNN; in bfloat16 as ``predict --dtype`` runs."""
        from gluon_ft.deploy.inference import fused_bfloat16

        if bfloat16:
            return Inference(self.sizes, fused_bfloat16(self.net, self.x), self.x)
        net = self._twin()  # optimize_for rewrites its block in place
        net.optimize_for(self.x, backend="MKLDNN", static_alloc=True, static_shape=True)
        return Inference(self.sizes, net, self.x)

    def int8(self) -> Inference:
        """The same weights quantized to int8 as ``predict --dtype int8`` quantizes a run
        (:func:`gluon_ft.deploy.int8.quantize`), calibrated on this form's batch."""
        from gluon_ft.deploy.int8 import quantize

        net = self._twin()  # quantize_net re-hybridizes the network it reads
        net.hybridize(static_alloc=True)
        net(self.x)
        block = quantize(net, self.x)
        block.hybridize(static_alloc=True, static_shape=True)
        return Inference(self.sizes, block, self.x)

    def _twin(self):
        """A network of the same architecture holding this form's weights (called once)."""
        import mxnet as mx

        from gluon_ft.model.graft import scratch_twin

        net = scratch_twin(self.sizes.model, self.sizes.classes, [mx.cpu()])
        net(self.x)
        for mine, theirs in zip(net.collect_params().values(), self.net.collect_params().values()):
            mine.set_data(theirs.data())
        return net

    def output(self) -> np.ndarray:
        return self.net(self.x).astype("float32").asnumpy()

    def run(self, batches: int) -> float:
        import mxnet as mx

        mx.nd.waitall()
        start = time.perf_counter()
        for _ in range(batches):
            self.net(self.x)
        mx.nd.waitall()
        return time.perf_counter() - start


def rate(timer: Callable[[int], float], images_per_call: int, calls: int) -> Callable[[], float]:
    """A timer that returns images per second of ``calls`` calls."""
    return lambda: images_per_call * calls / timer(calls)


class LoaderPass:
    """Images per second of one epoch of gluon-ft's train loader over a split."""

    def __init__(self, split, sizes: BenchSizes, workers: int):
        from gluon_ft.data.loaders import make_loader
        from gluon_ft.data.transforms import TrainTransform

        self.loader = make_loader(
            split,
            TrainTransform(sizes.image_size),
            sizes.batch_size,
            shuffle=True,
            workers=workers,
        )
        self.epoch = 0

    def __call__(self) -> float:
        from gluon_ft.data.loaders import set_epoch

        set_epoch(self.loader, self.epoch)
        self.epoch += 1
        start = time.perf_counter()
        count = sum(len(labels) for _, labels, _ in self.loader if labels is not None)
        return count / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- phases


def bare_child(sizes: BenchSizes, env: dict) -> dict:
    """Run :mod:`gluon_ft.train.bare_loop` as a script in a child process with environment ``env``.

    The script never imports ``gluon_ft``, so the thread variables are what ``env`` says.
    """
    from gluon_ft.train import bare_loop

    args = {
        "model": sizes.model,
        "batch_size": sizes.batch_size,
        "image_size": sizes.image_size,
        "classes": sizes.classes,
        "steps": sizes.steps,
        "repeats": sizes.repeats,
        "warmup": sizes.warmup,
    }
    done = subprocess.run(
        [sys.executable, "-P", bare_loop.__file__, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def frozen_run(folder: Path, out: Path, sizes: BenchSizes, workers: int, **settings) -> dict:
    """Run :func:`gluon_ft.train.train` with the backbone frozen; return its resolved config
    with the median seconds of its epochs after the first (which builds graphs, forks
    workers) and its last loss."""
    from gluon_ft.train import TrainConfig, train

    config = TrainConfig(
        data=str(folder),
        model=sizes.model,
        pretrained="none",
        freeze="features",
        epochs=sizes.epochs,
        batch_size=sizes.batch_size,
        image_size=sizes.image_size,
        workers=workers,
        ctx="cpu",
        progress=False,
        out=str(out),
        **settings,
    )
    history = train(config)["history"]
    return {
        **json.loads((out / "config.json").read_text()),
        "epoch_s": statistics.median(row["seconds"] for row in history[1:]),
        "last_loss": history[-1]["loss"],
    }


def environment(workers: int) -> dict:
    import platform

    import mxnet as mx

    import gluon_ft
    from gluon_ft.threads import usable_cores
    from gluon_ft.train.amp import cpu_flags

    flags = cpu_flags()
    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "mxnet": mx.__version__,
        "gluon_ft": gluon_ft.__version__,
        "python": platform.python_version(),
        "cpu": model_name,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS_SHOWN},
        "usable_cores": usable_cores(),
        "threads": gluon_ft.THREAD_SETTINGS,
        "mxnet_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MXNET_")},
        "workers": workers,
        "load_average_at_start": list(os.getloadavg()),
    }


def measure_steps(sizes: BenchSizes, result: dict, details: dict) -> GluonFTStep:
    """The bare loop, gluon-ft's step and its frozen step, interleaved; returns the fp32 step."""
    from gluon_ft.train.bare_loop import BareLoop

    bare = BareLoop(sizes.model, sizes.batch_size, sizes.image_size, sizes.classes)
    fp32 = GluonFTStep(sizes)
    frozen = GluonFTStep(sizes, freeze="features")
    for step in (bare, fp32, frozen):
        step.run(sizes.warmup)
    images = sizes.batch_size
    timings = {
        "bare_fp32_img_s": rate(bare.run, images, sizes.steps),
        "train_fp32_img_s": rate(fp32.run, images, sizes.steps),
        "frozen_step_img_s": rate(frozen.run, images, sizes.steps),
    }
    record(interleave(timings, sizes.repeats), result, details)
    result["trainer_overhead"] = 1 - result["train_fp32_img_s"] / result["bare_fp32_img_s"]
    return fp32


def measure_threads(sizes: BenchSizes, quick: bool, result: dict, details: dict) -> None:
    """The bare loop in child processes: MXNet's default threads (and passive OpenMP waits)."""
    from gluon_ft.train.bare_loop import THREAD_VARIABLES

    unset = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    child = bare_child(sizes, unset)
    details["bare_fp32_default_threads"] = child
    result["bare_fp32_default_threads_img_s"] = child["img_s"]
    result["thread_speedup"] = result["train_fp32_img_s"] / child["img_s"]
    if not quick:
        # OpenMP threads that sleep at once at a barrier instead of spinning: what it costs on
        # an idle machine (on a busy one, spinning threads were measured 5x slower).
        passive = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        details["bare_fp32_omp_passive"] = bare_child(sizes, passive)


def measure_inference(sizes: BenchSizes, bf16: bool, result: dict, details: dict) -> None:
    """Plain hybridized inference against the fastest form that predicts the same, and int8.

    int8's agreement with float32 is not judged here (random weights, random inputs): see
    :mod:`gluon_ft.bench.agreement`.
    """
    plain = Inference(sizes)
    forms = {"infer_img_s": plain, "infer_fused_fp32_img_s": plain.fused()}
    if bf16:
        forms["infer_fused_bf16_img_s"] = plain.fused(bfloat16=True)
    reference = plain.output()
    for name, form in forms.items():
        out = form.output()
        details[f"{name}_max_abs_diff"] = float(np.abs(out - reference).max())
        details[f"{name}_top1_agreement"] = float((out.argmax(1) == reference.argmax(1)).mean())
    forms["infer_int8_img_s"] = plain.int8()
    for form in forms.values():
        form.run(sizes.warmup)
    timings = {name: rate(form.run, sizes.batch_size, sizes.steps) for name, form in forms.items()}
    found = record(interleave(timings, sizes.repeats), result, details)
    result["int8_speedup"] = found["infer_int8_img_s"] / found["infer_img_s"]
    best = max(
        (name for name in forms if name not in ("infer_img_s", "infer_int8_img_s")),
        key=lambda name: found[name] if details[f"{name}_top1_agreement"] >= 0.99 else 0.0,
    )
    details["infer_optimized_form"] = best
    result["infer_optimized_img_s"] = found[best]
    result["infer_speedup"] = result["infer_optimized_img_s"] / result["infer_img_s"]


def at_size(sizes: BenchSizes, image_size: int, batch_size: int) -> BenchSizes:
    """``sizes`` with another image size and batch (one of its ``precision_sizes``)."""
    return replace(sizes, image_size=image_size, batch_size=batch_size)


def size_key(image_size: int, batch_size: int) -> str:
    """The key of a size in the ``precision`` section: ``224px_b32``."""
    return f"{image_size}px_b{batch_size}"


def measure_precision_inference(
    sizes: BenchSizes, bf16: bool, precision: dict, result: dict, details: dict
) -> None:
    """:func:`measure_inference` at every precision size, into ``precision[size]``; the first
    size's figures also into ``result`` and ``details``."""
    for image_size, batch_size in sizes.precision_sizes:
        figures, found = {}, {}
        measure_inference(at_size(sizes, image_size, batch_size), bf16, figures, found)
        if not precision:
            result.update(figures)
            details.update(found)
        entry = precision.setdefault(size_key(image_size, batch_size), {})
        entry.update(
            infer_fp32_img_s=figures["infer_img_s"],
            infer_fused_fp32_img_s=figures["infer_fused_fp32_img_s"],
            infer_fused_bf16_img_s=figures.get("infer_fused_bf16_img_s"),
            fused_bf16_speedup=(
                figures["infer_fused_bf16_img_s"] / figures["infer_img_s"] if bf16 else None
            ),
            fused_bf16_top1_agreement=found.get("infer_fused_bf16_img_s_top1_agreement"),
            infer_int8_img_s=figures["infer_int8_img_s"],
            int8_speedup=figures["int8_speedup"],
        )


def measure_data(sizes: BenchSizes, workers: int, quick: bool, result: dict, details: dict, log):
    """Loaders (folder vs pack) and frozen-backbone epochs (without and with the cache)."""
    from gluon_ft.data.recordio import pack_dataset
    from gluon_ft.train import load_dataset

    home = os.environ.get("MXNET_HOME")
    with tempfile.TemporaryDirectory(prefix="gluon-ft-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["MXNET_HOME"] = str(tmp / "mxnet-home")  # the feature cache stays in tmp
        try:
            log(f"writing {sizes.train_photos + sizes.test_photos} photos and packing them")
            folder = write_photos(tmp / "photos", sizes)
            pack_start = time.perf_counter()
            pack_dataset(folder, tmp / "pack" / "photos")
            details["pack_s"] = time.perf_counter() - pack_start

            log(f"loaders: folder and RecordIO, {workers} worker(s) (interleaved)")
            from_folder = LoaderPass(load_dataset(str(folder)).train, sizes, workers)
            from_pack = LoaderPass(load_dataset(str(tmp / "pack" / "photos")).train, sizes, workers)
            for warm_up in (from_folder, from_pack):  # page cache, worker processes
                warm_up()
            timings = {"loader_folder_img_s": from_folder, "loader_recordio_img_s": from_pack}
            record(interleave(timings, sizes.repeats), result, details)
            result["recordio_speedup"] = (
                result["loader_recordio_img_s"] / result["loader_folder_img_s"]
            )
            del from_folder, from_pack, timings  # their worker processes end here

            log("frozen-backbone epochs, without and with the feature cache")
            runs = tmp / "runs"
            frozen = frozen_run(folder, runs / "frozen", sizes, workers)
            cache = {"cache_features": True, "cache_views": sizes.epochs}
            cached = frozen_run(folder, runs / "cached", sizes, workers, **cache)
            if not quick:  # the data for the --workers default: decoding weighs most here
                by_workers = {workers: frozen["epoch_s"]}
                for count in sorted({0, 1, 2} - {workers}):
                    run = frozen_run(folder, runs / f"w{count}", sizes, count)
                    by_workers[count] = run["epoch_s"]
                details["frozen_epoch_s_by_workers"] = dict(sorted(by_workers.items()))
        finally:
            if home is None:
                os.environ.pop("MXNET_HOME", None)
            else:
                os.environ["MXNET_HOME"] = home
    result["frozen_epoch_s"] = frozen["epoch_s"]
    result["cached_epoch_s"] = cached["epoch_s"]
    result["cache_speedup"] = result["frozen_epoch_s"] / result["cached_epoch_s"]
    details["cache_build_s"] = cached["feature_cache"]["seconds"]
    details["cached_loss_minus_frozen_loss"] = cached["last_loss"] - frozen["last_loss"]


def auto_choice(sizes: BenchSizes, image_size: int, batch_size: int) -> dict:
    """What ``train --dtype auto`` chooses at this size (its probe runs in a child process)."""
    import mxnet as mx

    from gluon_ft.train import TrainConfig, amp

    config = TrainConfig(
        model=sizes.model, dtype="auto", image_size=image_size, batch_size=batch_size
    )
    return amp.choose_dtype(config, [mx.cpu()])


def measure_bf16(
    sizes: BenchSizes, fp32_main: GluonFTStep, precision: dict, result: dict, details: dict
) -> None:
    """gluon-ft's step under --dtype bfloat16 at every precision size, interleaved with the
    float32 one, and the rate of ``--dtype auto``'s choice against float32.

    MXNet AMP rewrites every graph built after it is turned on, for the rest of the process:
    this runs last, and the float32 steps build their graphs before it.
    """
    from gluon_ft.train import amp

    fp32_steps = {}
    for image_size, batch_size in sizes.precision_sizes:
        step = fp32_main
        if (image_size, batch_size) != (sizes.image_size, sizes.batch_size):
            step = GluonFTStep(at_size(sizes, image_size, batch_size))
            step.run(sizes.warmup)
        fp32_steps[image_size, batch_size] = step
    amp.enable("bfloat16")
    for (image_size, batch_size), fp32 in fp32_steps.items():
        bf16 = GluonFTStep(at_size(sizes, image_size, batch_size), dtype="bfloat16")
        bf16.run(sizes.warmup)
        timings = {
            "float32": rate(fp32.run, batch_size, sizes.steps),
            "bfloat16": rate(bf16.run, batch_size, sizes.steps),
        }
        runs = interleave(timings, sizes.repeats)
        rates = {dtype: statistics.median(values) for dtype, values in runs.items()}
        entry = precision.setdefault(size_key(image_size, batch_size), {})
        chosen = entry["auto"]["dtype"]
        entry.update(
            train_fp32_img_s=rates["float32"],
            train_bf16_img_s=rates["bfloat16"],
            bf16_speedup=rates["bfloat16"] / rates["float32"],
            auto_img_s=rates[chosen],
            auto_vs_fp32=rates[chosen] / rates["float32"],
            train_runs=runs,
        )
    main = precision[size_key(sizes.image_size, sizes.batch_size)]
    result["train_bf16_img_s"] = main["train_bf16_img_s"]
    result["bf16_speedup"] = main["bf16_speedup"]
    details["train_fp32_paired_img_s"] = main["train_fp32_img_s"]


def best_inference_form(result: dict, details: dict, agreement: dict | None) -> dict:
    """The fastest inference form at the main size whose top-1 agrees with float32 on at least
    :data:`gluon_ft.deploy.inference.MIN_AGREEMENT`: int8 only where a run judged it, fused
    bfloat16 on the run's test part when there is one (else on the bench's batch)."""
    from gluon_ft.deploy.inference import MIN_AGREEMENT

    batch = "the bench's batch (random network)"
    candidates = {
        "fused_fp32": (
            result["infer_fused_fp32_img_s"],
            details["infer_fused_fp32_img_s_top1_agreement"],
            batch,
        )
    }
    if result.get("infer_fused_bf16_img_s") is not None:
        on_run = agreement and agreement["bfloat16"]
        candidates["fused_bf16"] = (
            result["infer_fused_bf16_img_s"],
            on_run["top1_agreement"]
            if on_run
            else details["infer_fused_bf16_img_s_top1_agreement"],
            "the run's test part" if on_run else batch,
        )
    if agreement:
        measured = agreement["int8"]["top1_agreement"]
        candidates["int8"] = (result["infer_int8_img_s"], measured, "the run's test part")
    passed = {name: c for name, c in candidates.items() if c[1] >= MIN_AGREEMENT}
    best = max(passed, key=lambda name: passed[name][0]) if passed else None
    keys = ("img_s", "top1_agreement", "judged_on")
    return {
        "form": best,
        "img_s": passed[best][0] if best else None,
        "speedup": passed[best][0] / result["infer_img_s"] if best else None,
        "candidates": {name: dict(zip(keys, c)) for name, c in candidates.items()},
        "int8_considered": bool(agreement),
    }


def measure_run_agreement(run: str | None, result: dict, log) -> dict | None:
    """int8's (and fused bfloat16's) agreement with float32 on ``run``'s test part, or a note
    that it was not measured."""
    from gluon_ft.bench.agreement import NOT_MEASURED, run_agreement

    if run is None:
        result["int8_top1_agreement"] = None
        result["agreement"] = {"measured": False, "why": NOT_MEASURED}
        return None
    log(f"agreement with float32 on the test part of {run} (int8, fused bfloat16)")
    agreement = run_agreement(run)
    result["int8_top1_agreement"] = agreement["int8"]["top1_agreement"]
    result["agreement"] = {"measured": True, **agreement}
    return agreement


def measure_serve_load(sizes: BenchSizes, quick: bool, run: str | None, result: dict, log):
    """``gluon-ft serve`` under 1, 8 and 64 clients (:mod:`gluon_ft.bench.serve_load`): of
    ``run`` with its test photos, else of a random-weight stand-in at the bench's size with
    written photos."""
    from gluon_ft.bench import serve_load
    from gluon_ft.bench.standin import write_scratch_run

    load = serve_load.QUICK_LOAD if quick else serve_load.ServeLoad()
    with tempfile.TemporaryDirectory(prefix="gluon-ft-bench-serve-") as tmp:
        tmp = Path(tmp)
        if run is not None:
            served, images = Path(run), serve_load.run_test_jpegs(Path(run), load.images)
        else:
            size = (sizes.model, sizes.classes, sizes.image_size)
            served = write_scratch_run(tmp / "run", *size)
            write_photos(tmp / "photos", replace(sizes, train_photos=0, test_photos=load.images))
            images = serve_load.folder_jpegs(tmp / "photos" / "test", load.images)
        try:
            serve = serve_load.measure_serve(served, images, load, log)
        except (OSError, RuntimeError) as err:  # the other figures stay: say why, go on
            log(f"serve: failed: {err}")
            result["serve"] = {"error": str(err)}
            return
    result["serve"] = serve
    result.update(serve_load.summary_figures(serve))


def measure_bf16_if_supported(sizes, fp32, refused, precision, result, details, log) -> None:
    """:func:`measure_bf16`, or its figures as None where the CPU has no bfloat16."""
    if refused is None:
        log("bfloat16 (MXNet AMP) against float32 (interleaved), at each size")
        measure_bf16(sizes, fp32, precision, result, details)
    else:
        result.update(dict.fromkeys(BF16_TIMINGS))
        details["bf16_unsupported"] = refused


def bf16_refusal() -> str | None:
    """Why this CPU cannot train in bfloat16 (no native bfloat16), or None."""
    import mxnet as mx

    from gluon_ft.errors import UsageError
    from gluon_ft.train import amp

    try:
        amp.check_dtype("bfloat16", [mx.cpu()])
    except UsageError as err:
        return str(err)
    return None


def measure_auto(sizes: BenchSizes, precision: dict, log) -> None:
    """What ``--dtype auto`` chooses at every precision size (its probes are child processes)."""
    for image_size, batch_size in sizes.precision_sizes:
        log(f"--dtype auto's probe at {image_size} px, batch {batch_size} (a child process)")
        entry = precision.setdefault(size_key(image_size, batch_size), {})
        entry["auto"] = auto_choice(sizes, image_size, batch_size)


def measure_deployment(sizes, quick, run, onnxruntime, result: dict, details: dict, log) -> None:
    """int8's agreement on ``run``, the best inference form, serve under load and ONNX Runtime
    (with ``onnxruntime``, a Python that has it). Before AMP: the agreement builds graphs."""
    from gluon_ft.bench.onnx_anchor import measure_onnxruntime
    from gluon_ft.errors import UsageError
    from gluon_ft.threads import usable_cores

    agreement = measure_run_agreement(run, result, log)
    result["infer_best"] = best_inference_form(result, details, agreement)
    measure_serve_load(sizes, quick, run, result, log)
    if onnxruntime is None:
        result["onnxruntime"] = None
        return
    try:
        anchor = measure_onnxruntime(onnxruntime, sizes, usable_cores(), log)
    except UsageError as err:  # the other figures stay: say why, go on
        log(f"onnxruntime: failed: {err}")
        result["onnxruntime"] = {"error": str(err)}
        return
    best = result["infer_best"]["img_s"]
    anchor["best_form_vs_clean"] = best / anchor["clean_img_s"] if best else None
    result["onnxruntime"] = anchor


@contextlib.contextmanager
def phase(name: str, details: dict):
    """Record the seconds the block took in ``details["phase_seconds"][name]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        details.setdefault("phase_seconds", {})[name] = time.perf_counter() - started


def run_bench(
    quick: bool = False,
    workers: int | None = None,
    log=None,
    run: str | None = None,
    onnxruntime: str | None = None,
) -> dict:
    """Measure every figure; return the bench's JSON object.

    Parameters
    ----------
    quick : bool
        Small sizes (64 px, batch 16, few repeats), few requests to serve.
    workers : int, optional
        DataLoader processes of the loader and epoch figures; gluon-ft's default if None.
    log : callable, optional
        Called with a line of progress (the CLI prints it to stderr).
    run : str, optional
        A finished run: int8's agreement with float32 on its test part
        (:mod:`gluon_ft.bench.agreement`; it calibrates ``RUN/int8/`` first if needed), and
        the serve figures on it. Without one, the agreement is reported as not measured.
    onnxruntime : str, optional
        A Python with ``onnxruntime`` (a virtual environment of its own): ONNX Runtime on the
        bench's network exported to ONNX (:mod:`gluon_ft.bench.onnx_anchor`).
    """
    from gluon_ft.errors import UsageError
    from gluon_ft.train import TrainConfig

    log = log or (lambda line: None)
    if onnxruntime is not None and not shutil.which(onnxruntime):
        raise UsageError(f"--onnxruntime {onnxruntime}: no such program.")
    sizes = QUICK if quick else FULL
    workers = TrainConfig().workers if workers is None else workers
    started = time.perf_counter()
    result: dict = {"quick": quick, "sizes": asdict(sizes), "env": environment(workers)}
    details: dict = {}
    bf16_refused = bf16_refusal()
    precision: dict = {}
    log("training steps: bare loop, gluon-ft, gluon-ft frozen (interleaved)")
    with phase("steps", details):
        fp32 = measure_steps(sizes, result, details)
        log("bare loop in child processes: MXNet's default threads")
        measure_threads(sizes, quick, result, details)
    log("inference: hybridized; optimize_for(backend='MKLDNN') in float32 and bfloat16; int8")
    with phase("inference", details):
        measure_precision_inference(sizes, bf16_refused is None, precision, result, details)
    with phase("data", details):
        measure_data(sizes, workers, quick, result, details, log)
    with phase("auto", details):
        measure_auto(sizes, precision, log)
    with phase("deployment", details):
        measure_deployment(sizes, quick, run, onnxruntime, result, details, log)
    with phase("bf16", details):
        measure_bf16_if_supported(sizes, fp32, bf16_refused, precision, result, details, log)
    result["precision"] = precision
    result["env"]["load_average_at_end"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - started
    result["details"] = details
    return result
