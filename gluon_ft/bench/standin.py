"""A stand-in for a finished run, for the bench's serve and ONNX Runtime figures."""

from __future__ import annotations

import json
from pathlib import Path


def write_scratch_run(folder: Path, model: str, classes: int, image_size: int) -> Path:
    """A stand-in for a finished run: ``model`` with random weights, as ``serve`` loads it.

    Enough for throughput and for the same-answer checks; its answers mean nothing.
    """
    import mxnet as mx

    from gluon_ft.model.graft import scratch_twin

    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    net = scratch_twin(model, classes, [mx.cpu()])
    net(mx.nd.zeros((1, 3, image_size, image_size)))
    net.save_parameters(str(folder / "model.params"))
    config = {"model": model, "image_size": image_size, "tta": 1, "pretrained": "none"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = [f"class{i}" for i in range(classes)]
    (folder / "classes.json").write_text(json.dumps(names) + "\n")
    return folder
