"""Class imbalance (issue 16): inverse-frequency loss weights, a balanced sampler that is
deterministic and exact on resume, and check-data's warning."""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
from conftest import record_steps, tiny_config, write_class_folders
from mxnet import gluon

from gluon_ft.cli import main
from gluon_ft.data.balance import balanced_probabilities, inverse_frequency
from gluon_ft.data.loaders import EpochBatchSampler
from gluon_ft.errors import Interrupted
from gluon_ft.train import TrainConfig, train
from gluon_ft.train.network import make_loss


def test_inverse_frequency_weights_reach_the_loss():
    labels = [0, 0, 0, 1]  # 3 to 1
    np.testing.assert_allclose(inverse_frequency(labels, 3), [4 / 6, 4 / 2, 0.0], rtol=1e-6)
    out = mx.nd.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    y = mx.nd.array([0, 1, 1])
    plain = gluon.loss.SoftmaxCrossEntropyLoss()(out, y).asnumpy()
    config = TrainConfig(class_weights="auto")
    weighted = make_loss(config, labels, 3, [mx.cpu()])(out, y).asnumpy()
    np.testing.assert_allclose(weighted, plain * [4 / 6, 2, 2], rtol=1e-6)
    np.testing.assert_allclose(
        make_loss(TrainConfig(), labels, 3, [mx.cpu()])(out, y).asnumpy(), plain
    )


def test_balanced_sampler_draws_classes_equally_and_deterministically():
    labels = np.array([0] * 90 + [1] * 10)
    probabilities = balanced_probabilities(labels)

    def drawn(epoch, seed=0):
        sampler = EpochBatchSampler(100, 10, True, seed, probabilities=probabilities)
        sampler.set_epoch(epoch)
        return sampler.indices()

    assert np.array_equal(drawn(3), drawn(3))  # from (seed, epoch) alone
    assert not np.array_equal(drawn(3), drawn(4)) and not np.array_equal(drawn(3), drawn(3, 1))
    minority = np.mean([np.mean(labels[drawn(epoch)] == 1) for epoch in range(20)])
    assert 0.4 < minority < 0.6  # about half, where a shuffle gives exactly 0.1


def test_balanced_run_resumes_exactly(tmp_path, monkeypatch):
    # Without --class-weights auto: the two together are refused (a double correction).
    data = write_class_folders(tmp_path / "photos", {"many": 14, "few": 4})
    settings = dict(epochs=2, momentum=0.9, sampler="balanced", seed=2)
    whole = train(tiny_config(data, tmp_path / "whole", **settings))["run_dir"]
    run = tmp_path / "run"
    record_steps(monkeypatch, signal_after=5)  # 4 steps an epoch (16 train images, batch 4)
    with pytest.raises(Interrupted):
        train(tiny_config(data, run, **settings))
    monkeypatch.undo()
    train(tiny_config(data, run, resume=True, **settings))
    for name in ("model.params", "checkpoints/epoch-0002/model.params"):
        assert (run / name).read_bytes() == (whole / name).read_bytes(), name


def test_check_data_warns_about_imbalance(tmp_path, capsys, cli):
    data = write_class_folders(tmp_path / "photos", {"many": 11, "few": 2})
    done = cli("check-data", str(data), "--image-size", "32")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"warning: the classes of {data} are imbalanced: many has 11 images, few 2" in done.stdout
    )
    at_limit = write_class_folders(tmp_path / "at-limit", {"a": 10, "b": 2})  # 5x: no warning
    assert main(["check-data", str(at_limit), "--image-size", "32"]) == 0
    assert "imbalanced" not in capsys.readouterr().out
