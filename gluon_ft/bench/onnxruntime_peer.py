"""ONNX Runtime on an exported ``model.onnx``: the deployment anchor of ``gluon-ft bench``.

A stand-alone script, never imported by gluon-ft: ONNX Runtime's wheels need numpy >= 1.24
and MXNet 1.9.1 needs numpy < 1.24, so it runs in a scratch virtual environment beside the
project, never in the project's::

    python3 -m venv /work/scratch/ortvenv
    /work/scratch/ortvenv/bin/pip install onnxruntime numpy onnx
    /work/scratch/ortvenv/bin/python gluon_ft/bench/onnxruntime_peer.py RUN/export/model.onnx

``gluon-ft bench --onnxruntime /work/scratch/ortvenv/bin/python`` exports its own network at
its main size (224 px) and runs this script on it in the same sitting.

It times, in interleaved rounds (median of ``--repeats``, each ``--steps`` batches, after
``--warmup``), on CPU with ``--threads`` intra-op threads (default 2), batch ``--batch``:

- ``ours``: the file as exported;
- ``clean``: the same graph with every initializer removed from the graph inputs (the
  cleanest form of this graph for ONNX Runtime: weights it may fold and fuse).

It prints one JSON object: both rates, ``ours_vs_clean``, the largest difference of their
outputs, and the warnings ONNX Runtime logged while loading each (an "Initializer ... appears
in graph inputs and will not be treated as constant value/weight" one means it could not
optimize the graph).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model.onnx exported by gluon-ft export")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def clean_copy(path, folder):
    """The model at ``path`` without graph inputs that are initializers; its path, and how
    many inputs were dropped."""
    import onnx

    model = onnx.load(path)
    weights = {tensor.name for tensor in model.graph.initializer}
    kept = [graph_input for graph_input in model.graph.input if graph_input.name not in weights]
    dropped = len(model.graph.input) - len(kept)
    del model.graph.input[:]
    model.graph.input.extend(kept)
    target = os.path.join(folder, "clean.onnx")
    onnx.save(model, target)
    return target, dropped


def load_session(path, threads, folder):
    """An ONNX Runtime CPU session of ``path``, and the warnings it logged while loading."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 1  # info and above: the initializer warning is a warning
    log = os.path.join(folder, "ort.log")
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "w") as sink:
        os.dup2(sink.fileno(), 2)  # ONNX Runtime logs to the process's stderr
        try:
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    with open(log) as f:
        warnings = [line.strip() for line in f if "W:" in line or "appears in graph inputs" in line]
    return session, warnings


def timer(session, feed, batch, steps):
    def run():
        started = time.perf_counter()
        for _ in range(steps):
            session.run(None, feed)
        return batch * steps / (time.perf_counter() - started)

    return run


def main(argv=None):
    import numpy as np
    import onnxruntime as ort

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ort-peer-") as folder:
        clean_path, dropped = clean_copy(args.model, folder)
        sessions, warnings = {}, {}
        for name, path in (("ours", args.model), ("clean", clean_path)):
            sessions[name], warnings[name] = load_session(path, args.threads, folder)
    data = sessions["ours"].get_inputs()[0]
    size = [dim if isinstance(dim, int) else args.batch for dim in data.shape]
    size[0] = args.batch
    x = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    feed = {data.name: x}
    outputs = {name: session.run(None, feed)[0] for name, session in sessions.items()}
    timers = {name: timer(s, feed, args.batch, args.steps) for name, s in sessions.items()}
    for run in timers.values():
        for _ in range(args.warmup):
            run()
    runs = {name: [] for name in timers}
    for _ in range(args.repeats):
        for name, run in timers.items():
            runs[name].append(run())
    rates = {name: statistics.median(values) for name, values in runs.items()}
    print(json.dumps({
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "model": os.path.abspath(args.model),
        "input_shape": size,
        "threads": args.threads,
        "ours_img_s": rates["ours"],
        "clean_img_s": rates["clean"],
        "ours_vs_clean": rates["ours"] / rates["clean"],
        "initializers_in_graph_inputs": dropped,
        "max_abs_diff": float(np.abs(outputs["ours"] - outputs["clean"]).max()),
        "warnings": warnings,
        "initializer_warning": any("appears in graph inputs" in w for w in warnings["ours"]),
        "runs": runs,
    }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
