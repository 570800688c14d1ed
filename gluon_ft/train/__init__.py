"""Training: ``train`` (fine-tune or from scratch) and ``pretrain``, and their parts.

``python -m gluon_ft.train`` is ``gluon-ft train``. The modules, from the top:

- :mod:`~gluon_ft.train.run`: ``train``/``pretrain`` as named phases;
- :mod:`~gluon_ft.train.step`: ``train_batch``, ``train_epoch`` (their ``StepOptions``),
  ``evaluate``;
- :mod:`~gluon_ft.train.network`, :mod:`~gluon_ft.train.feeds`,
  :mod:`~gluon_ft.train.rundir`, :mod:`~gluon_ft.train.resume`: what the phases use;
- :mod:`~gluon_ft.train.config`, :mod:`~gluon_ft.train.devices`, and the mechanisms
  :mod:`~gluon_ft.train.checkpoint`, :mod:`~gluon_ft.train.schedule`,
  :mod:`~gluon_ft.train.amp`, :mod:`~gluon_ft.train.dist`,
  :mod:`~gluon_ft.train.features_cache`.
"""

from gluon_ft.train.config import TrainConfig
from gluon_ft.train.devices import parse_contexts, split_batch
from gluon_ft.train.feeds import image_loaders, load_dataset
from gluon_ft.train.network import build_network, make_trainer
from gluon_ft.train.resume import EpochSteps, StopRequest, step_seed
from gluon_ft.train.run import pretrain, train
from gluon_ft.train.step import MetricSums, StepOptions, evaluate, train_batch, train_epoch

__all__ = [
    "EpochSteps",
    "MetricSums",
    "StepOptions",
    "StopRequest",
    "TrainConfig",
    "build_network",
    "evaluate",
    "image_loaders",
    "load_dataset",
    "make_trainer",
    "parse_contexts",
    "pretrain",
    "split_batch",
    "step_seed",
    "train",
    "train_batch",
    "train_epoch",
]
