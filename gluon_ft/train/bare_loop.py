"""The reference training step for ``gluon-ft bench``: hand-written hybridized Gluon.

It is what a user would write without gluon-ft: a float32 batch already on the device,
``autograd.record``, ``backward``, ``trainer.step``. This module imports only MXNet and the
standard library, never ``gluon_ft`` (whose import sets the OpenMP threads), so the bench can
also run it as a script in a child process that keeps MXNet's default thread count::

    python -P gluon_ft/train/bare_loop.py '{"image_size": 224, "batch_size": 32, ...}'

(``-P`` keeps this folder off ``sys.path``, where ``data.py`` and friends would shadow other
modules.) The script prints one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS")


class BareLoop:
    """A hybridized zoo network, its Trainer and one fixed batch; :meth:`run` times steps.

    ``net``, if given, is an initialized network to use instead of a new zoo one (the
    ``--dtype auto`` probe passes networks prepared for a dtype).
    """

    def __init__(
        self, model: str, batch_size: int, image_size: int, classes: int, seed: int = 0, net=None
    ):
        import mxnet as mx
        from mxnet import gluon

        mx.random.seed(seed)
        self.batch_size = batch_size
        if net is None:
            net = gluon.model_zoo.vision.get_model(model, classes=classes)
            net.initialize(mx.init.Xavier())
        self.net = net
        self.net.hybridize(static_alloc=True, static_shape=True)
        self.trainer = gluon.Trainer(
            self.net.collect_params(), "sgd", {"learning_rate": 0.01, "wd": 0.001}
        )
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        shape = (batch_size, 3, image_size, image_size)
        self.x = mx.nd.random.normal(shape=shape)
        self.y = mx.nd.random.randint(0, classes, shape=(batch_size,)).astype("float32")

    def step(self) -> None:
        from mxnet import autograd

        with autograd.record():
            loss = self.loss_fn(self.net(self.x), self.y)
        loss.backward()
        self.trainer.step(self.batch_size)

    def run(self, steps: int) -> float:
        """Run ``steps`` steps; return the seconds until their results are computed."""
        import mxnet as mx

        mx.nd.waitall()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        mx.nd.waitall()
        return time.perf_counter() - start


def measure(
    model: str = "resnet18_v2",
    batch_size: int = 32,
    image_size: int = 224,
    classes: int = 10,
    steps: int = 4,
    repeats: int = 5,
    warmup: int = 2,
) -> dict:
    """Median images per second of :class:`BareLoop` over ``repeats`` timings of ``steps``."""
    loop = BareLoop(model, batch_size, image_size, classes)
    loop.run(warmup)
    rates = [batch_size * steps / loop.run(steps) for _ in range(repeats)]
    return {
        "img_s": statistics.median(rates),
        "rates": rates,
        "threads": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "gluon_ft_imported": "gluon_ft" in sys.modules,
    }


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
