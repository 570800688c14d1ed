"""``gluon-ft bench --onnxruntime PYTHON``: ONNX Runtime on gluon-ft's exported ``model.onnx``,
in the same sitting as the bench's own figures.

The bench's network (random weights, the main size: 224 px) is written as a stand-in run
(:func:`gluon_ft.bench.standin.write_scratch_run`) and exported as ``gluon-ft export --format
onnx`` exports a run; ``PYTHON`` (an interpreter with ``onnxruntime``, in a virtual
environment of its own: see :mod:`gluon_ft.bench.onnxruntime_peer`) then times it at the
bench's batch, with as many threads as gluon-ft uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path


def measure_onnxruntime(python: str, sizes, threads: int, log) -> dict:
    """Export the bench's network to ONNX and time it with ONNX Runtime under ``python``.

    Returns
    -------
    dict
        The JSON object of :mod:`gluon_ft.bench.onnxruntime_peer` (``ours_img_s``,
        ``clean_img_s``, ``ours_vs_clean``, ``warnings``, ...).

    Raises
    ------
    UsageError
        ``python`` cannot run the script (no onnxruntime there, or not a Python).
    """
    from gluon_ft.bench import onnxruntime_peer
    from gluon_ft.bench.standin import write_scratch_run
    from gluon_ft.deploy.export import export_run
    from gluon_ft.errors import UsageError

    with tempfile.TemporaryDirectory(prefix="gluon-ft-bench-onnx-") as tmp:
        run = write_scratch_run(Path(tmp) / "run", sizes.model, sizes.classes, sizes.image_size)
        log(f"onnxruntime: exporting {sizes.model} at {sizes.image_size} px to ONNX")
        exported = export_run(run, "onnx", Path(tmp) / "export")
        model = Path(exported["out_dir"]) / "model.onnx"
        command = [python, "-I", onnxruntime_peer.__file__, str(model)]
        command += ["--batch", str(sizes.batch_size), "--threads", str(threads)]
        command += ["--repeats", str(sizes.repeats), "--steps", str(sizes.steps)]
        command += ["--warmup", str(sizes.warmup)]
        log(f"onnxruntime: timing it with {python} ({threads} threads)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env)
        except OSError as err:
            raise UsageError(f"--onnxruntime {python}: cannot run it ({err}).") from None
    if done.returncode != 0:
        raise UsageError(
            f"--onnxruntime {python}: the ONNX Runtime script failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-800:]}"
        )
    return json.loads(done.stdout)
