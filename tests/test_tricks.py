"""Label smoothing, mixup/CutMix and AdamW (issue 18): each changes what it should, nothing else.

The runs are tiny (mobilenet0.25 from scratch at 32 px, 24 training images in batches of 4),
so that an interrupted and resumed run can be compared with an unstopped one bit for bit.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import conftest
import mxnet as mx
import numpy as np
import pytest
from conftest import record_steps, write_image_folder
from mxnet import gluon

from gluon_ft.errors import Interrupted
from gluon_ft.train import TrainConfig, make_trainer, train
from gluon_ft.train.adamw import AdamW
from gluon_ft.train.mixing import Mixer
from gluon_ft.train.network import ClassWeightedLoss, SoftTargetLoss, make_loss

STEPS_PER_EPOCH = 6  # 2 classes x 12 images, batches of 4
ALL_TRICKS = dict(optimizer="adamw", lr=0.001, wd=0.01, label_smoothing=0.1, mixup=0.4, cutmix=1.0)
LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], dtype=np.float32)
LABELS = np.array([0, 1])


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    return conftest.tiny_config(data, out, **{"epochs": 2, "seed": 3, **changes})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("tricks") / "data", n_train=12, n_test=2)


def params_of(path: Path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def assert_bitwise_equal(a: Path, b: Path) -> None:
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa), "the parameters differ"


def loss_of(config: TrainConfig, labels=LABELS, logits=LOGITS) -> np.ndarray:
    loss_fn = make_loss(config, [0, 0, 1, 2], 3, [mx.cpu()])
    return loss_fn(mx.nd.array(logits), mx.nd.array(labels, dtype="int32")).asnumpy()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


# --- label smoothing ---------------------------------------------------------------------


def test_label_smoothing_gives_the_formulas_loss():
    """F = 0.3 over K = 3 classes: 1 - F + F/K = 0.8 on the class, F/K = 0.1 on the others."""
    smoothing = 0.3
    targets = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    expected = -(targets * log_softmax(LOGITS)).sum(axis=1)
    got = loss_of(TrainConfig(label_smoothing=smoothing))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    plain = -log_softmax(LOGITS)[np.arange(2), LABELS]
    assert np.all(np.abs(got - plain) > 0.05)  # it really differs from the plain loss
    np.testing.assert_allclose(loss_of(TrainConfig()), plain, atol=1e-5)


def test_label_smoothing_with_class_weights_weights_each_class_term():
    """``--class-weights auto`` (inverse frequency of [0, 0, 1, 2]: 2/3, 4/3, 4/3) weights each
    class's term, as PyTorch's CrossEntropyLoss(weight=...) does for probability targets."""
    weights = np.array([2 / 3, 4 / 3, 4 / 3])
    targets = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    expected = -(weights * targets * log_softmax(LOGITS)).sum(axis=1)
    got = loss_of(TrainConfig(label_smoothing=0.3, class_weights="auto"))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_soft_targets_without_smoothing_give_the_plain_loss():
    """F = 0 (e.g. mixup alone, or after --mixup-off-epoch) is the plain cross-entropy."""
    loss_fn = SoftTargetLoss(3, 0.0, None, [mx.cpu()])
    got = loss_fn(mx.nd.array(LOGITS), mx.nd.array(LABELS, dtype="int32")).asnumpy()
    np.testing.assert_allclose(got, -log_softmax(LOGITS)[np.arange(2), LABELS], atol=1e-5)


def test_without_tricks_the_loss_is_the_books():
    """The default (and --class-weights auto) keep the sparse-label losses they had: the book's
    numbers cannot move (the model.params md5 of a default run equals main's)."""
    assert (
        type(make_loss(TrainConfig(), [0, 1], 2, [mx.cpu()])) is gluon.loss.SoftmaxCrossEntropyLoss
    )
    weighted = make_loss(TrainConfig(class_weights="auto"), [0, 1], 2, [mx.cpu()])
    assert type(weighted) is ClassWeightedLoss
    for changes in ({"label_smoothing": 0.1}, {"mixup": 0.2}, {"cutmix": 1.0}):
        assert type(make_loss(TrainConfig(**changes), [0, 1], 2, [mx.cpu()])) is SoftTargetLoss


# --- mixup and CutMix --------------------------------------------------------------------


def host_batch(count: int = 6, size: int = 16, classes: int = 3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    return images, np.arange(count) % classes


def test_alpha_zero_is_no_mixing_and_changes_no_bit(data, tmp_path):
    """Mixup 0 and CutMix 0 are off: no mixer, and a run equals the default run bit for bit."""
    assert Mixer.of(TrainConfig(mixup=0.0, cutmix=0.0), 2) is None
    train(tiny_config(data, tmp_path / "default", epochs=1))
    train(tiny_config(data, tmp_path / "zero", epochs=1, mixup=0.0, cutmix=0.0))
    assert_bitwise_equal(tmp_path / "zero" / "model.params", tmp_path / "default" / "model.params")


def test_mixup_blends_images_and_targets_by_the_same_lambda():
    images, labels = host_batch()
    mixed = Mixer(mixup=0.4, cutmix=0.0, num_classes=3)(images, labels, np.random.default_rng(1))
    lam = mixed.lam
    assert 0 < lam < 1
    partner = images[::-1].astype(np.float32)
    np.testing.assert_allclose(mixed.images, lam * images + (1 - lam) * partner, atol=1e-5)
    eye = np.eye(3)
    np.testing.assert_allclose(mixed.targets, lam * eye[labels] + (1 - lam) * eye[labels[::-1]])
    np.testing.assert_allclose(mixed.targets.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(mixed.labels, labels if lam >= 0.5 else labels[::-1])


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_lambda_is_the_area_each_image_keeps(seed):
    images, labels = host_batch()
    mixed = Mixer(mixup=0.0, cutmix=1.0, num_classes=3)(images, labels, np.random.default_rng(seed))
    assert mixed.images.dtype == np.uint8  # pasted pixels, not blended
    from_partner = np.all(mixed.images[0] == images[-1], axis=-1)
    own = np.all(mixed.images[0] == images[0], axis=-1)
    assert np.all(own | from_partner)
    assert mixed.lam == pytest.approx(1 - from_partner.mean())  # random pixels: no ties
    np.testing.assert_allclose(mixed.targets[0], [mixed.lam, 0, 1 - mixed.lam], atol=1e-5)
    np.testing.assert_allclose(mixed.targets.sum(axis=1), 1.0, atol=1e-5)


def test_with_both_on_each_step_picks_mixup_or_cutmix():
    images, labels = host_batch()
    mixer = Mixer(mixup=0.4, cutmix=1.0, num_classes=3)
    kinds = {
        mixer(images, labels, np.random.default_rng(seed)).images.dtype.name for seed in range(20)
    }
    assert kinds == {"uint8", "float32"}  # CutMix pastes, mixup blends


def record_mixing(monkeypatch) -> list:
    """Patch :class:`Mixer` to record each step's epoch-free output: ``(lam, targets)``."""
    seen = []
    original = Mixer.__call__

    def call(self, images, labels, rng=None):
        mixed = original(self, images, labels, rng)
        seen.append((mixed.lam, mixed.targets.copy(), mixed.images.copy()))
        return mixed

    monkeypatch.setattr(Mixer, "__call__", call)
    return seen


def test_mixup_off_epoch_stops_mixing_from_that_epoch(data, tmp_path, monkeypatch):
    seen = record_mixing(monkeypatch)
    train(tiny_config(data, tmp_path / "run", mixup=0.4, mix_off_epoch=2))
    assert len(seen) == STEPS_PER_EPOCH  # epoch 1 only
    seen.clear()
    train(tiny_config(data, tmp_path / "always", mixup=0.4))
    assert len(seen) == 2 * STEPS_PER_EPOCH


def test_two_devices_mix_what_one_device_mixes(data, tmp_path, monkeypatch):
    """The host batch is mixed before the split: --ctx cpu:2 draws and mixes as cpu does."""
    seen = record_mixing(monkeypatch)
    tricks = {**ALL_TRICKS, "epochs": 1}
    train(tiny_config(data, tmp_path / "one", ctx="cpu", **tricks))
    one = list(seen)
    seen.clear()
    train(tiny_config(data, tmp_path / "two", ctx="cpu:2", **tricks))
    assert len(one) == len(seen) == STEPS_PER_EPOCH
    assert {a.dtype.name for _, _, a in one} == {"uint8", "float32"}  # both kinds happened
    for (lam_a, targets_a, images_a), (lam_b, targets_b, images_b) in zip(one, seen):
        assert lam_a == lam_b
        assert np.array_equal(targets_a, targets_b) and np.array_equal(images_a, images_b)


# --- AdamW -------------------------------------------------------------------------------


def adamw_closed_form(w, grads, lr, wd, beta1=0.9, beta2=0.999, eps=1e-8):
    """PyTorch's AdamW (torch.optim.AdamW) written out, in float64."""
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        w = w * (1 - lr * wd)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
    return w


def test_adamw_steps_equal_pytorchs_closed_form_with_decoupled_wd_and_lr_mult():
    """Two steps on a toy parameter with lr_mult 10 (as the head's): the rate is lr * 10 for
    both the Adam step and the decay, and the summed gradient is divided by the batch size."""
    lr, wd, lr_mult, batch = 0.01, 0.1, 10.0, 4
    net = gluon.nn.Dense(1, in_units=3, use_bias=False)
    net.initialize(mx.init.Constant(0.5))
    net.weight.lr_mult = lr_mult
    config = TrainConfig(optimizer="adamw", lr=lr, wd=wd)
    trainer = make_trainer(net, config, [mx.cpu()])
    assert isinstance(trainer._optimizer, AdamW)
    inputs = [np.array([[1.0, -2.0, 3.0]] * batch), np.array([[0.5, 4.0, -1.0]] * batch)]
    for x in inputs:
        with mx.autograd.record():
            loss = net(mx.nd.array(x)).sum()  # gradient of the sum: the sum of the rows
        loss.backward()
        trainer.step(batch)
    grads = [x.sum(axis=0, keepdims=True) / batch for x in inputs]
    expected = adamw_closed_form(np.full((1, 3), 0.5), grads, lr * lr_mult, wd)
    np.testing.assert_allclose(net.weight.data().asnumpy(), expected, atol=1e-5)
    without_decay = adamw_closed_form(np.full((1, 3), 0.5), grads, lr * lr_mult, 0.0)
    assert np.all(np.abs(expected - without_decay) > 1e-4)  # the decay is really there


def test_adamw_unpickles_in_a_fresh_process():
    """``Trainer.save_states`` pickles the optimizer: its class must import by name."""
    blob = pickle.dumps(AdamW(learning_rate=0.003, wd=0.01))
    code = (
        "import pickle, sys; o = pickle.loads(sys.stdin.buffer.read()); "
        "print(type(o).__module__, o.lr, o.wd)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=blob, capture_output=True, check=True, timeout=120
    )
    assert done.stdout.decode().split() == ["gluon_ft.train.adamw", "0.003", "0.01"]


# --- the tricks together: the command line, two devices, --resume ---------------------------


def test_every_trick_on_two_devices_from_the_command_line(data, tmp_path, cli):
    out = tmp_path / "run"
    done = cli(
        *("train", "--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--epochs", "1", "--batch-size", "4", "--image-size", "32", "--ctx", "cpu:2"),
        *("--optimizer", "adamw", "--lr", "0.001", "--wd", "0.01", "--label-smoothing", "0.1"),
        *("--mixup", "0.4", "--cutmix", "1.0", "--mixup-off-epoch", "2"),
        *("--out", str(out), "--no-progress"),
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "adamw" and config["mixup"] == 0.4
    assert config["contexts"] == ["cpu(0)", "cpu(1)"]
    assert np.isfinite(json.loads((out / "metrics.json").read_text())[0]["loss"])


def interrupted_and_resumed(data: Path, root: Path, monkeypatch, **tricks) -> tuple[dict, dict]:
    """The parameters of an unstopped 2-epoch run, and of one stopped after step 2 of epoch 2
    and resumed."""
    train(tiny_config(data, root / "unstopped", **tricks))
    run = root / "run"
    record_steps(monkeypatch, signal_after=STEPS_PER_EPOCH + 2)
    with pytest.raises(Interrupted):
        train(tiny_config(data, run, **tricks))
    monkeypatch.undo()
    assert (run / "checkpoints" / "interrupted-epoch-0002-step-000002").is_dir()
    train(tiny_config(data, run, resume=True, **tricks))
    return params_of(root / "unstopped" / "model.params"), params_of(run / "model.params")


def test_every_trick_resumes_exactly_mid_epoch(data, tmp_path, monkeypatch):
    """The same bits as the unstopped run: the mixing draws, the AdamW moments and step
    counts all come back."""
    unstopped, resumed = interrupted_and_resumed(data, tmp_path, monkeypatch, **ALL_TRICKS)
    assert unstopped.keys() == resumed.keys()
    assert all(np.array_equal(unstopped[k], resumed[k]) for k in unstopped)


def test_every_trick_resumes_exactly_mid_epoch_on_two_devices(data, tmp_path, monkeypatch):
    """On two devices every trained weight comes back bit for bit. The BatchNorm running
    statistics are left out: on cpu:2 they differ between two identical unstopped runs already
    (on main too, with the book's SGD alone), so no resume can match them bit for bit."""
    tricks = {**ALL_TRICKS, "ctx": "cpu:2"}
    unstopped, resumed = interrupted_and_resumed(data, tmp_path, monkeypatch, **tricks)
    trained = [k for k in unstopped if "running_" not in k]
    assert len(trained) > 50 and unstopped.keys() == resumed.keys()
    assert all(np.array_equal(unstopped[k], resumed[k]) for k in trained)


def test_mixing_refuses_cached_features_with_exit_2(data, tmp_path, cli):
    """Mixing needs images; cached features are of unmixed ones: a usage error, no traceback."""
    done = cli(
        *("train", "--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--freeze", "features", "--cache-features", "--mixup", "0.2"),
        *("--out", str(tmp_path / "run"), "--no-progress"),
    )
    assert done.returncode == 2, done.stderr
    assert "--cache-features" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "config.json").exists()
