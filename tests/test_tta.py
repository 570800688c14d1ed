"""``--tta N`` (issue #18): test-time augmentation in train's evaluation, the report,
``predict`` and ``serve``.

The views against PIL by hand; N=1 is the plain evaluation bit for bit and N=2 the mean of
the logits of the image and its flip, computed here from the run's own network; the commands
as users meet them (a subprocess, a real HTTP server on 127.0.0.1); two devices and a resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import conftest
import mxnet as mx
import numpy as np
import pytest
import requests
from conftest import record_steps, write_image_folder
from PIL import Image
from test_serve import post_image, running_server

from gluon_ft.data.decode import load_image
from gluon_ft.data.transforms import TestTransform, normalize_batch
from gluon_ft.data.tta import MAX_VIEWS, ViewsTransform, eval_transform
from gluon_ft.deploy.predict import Predictor, load_run
from gluon_ft.errors import Interrupted, UsageError
from gluon_ft.train import train

STEPS_PER_EPOCH = 5  # 2 classes x 12 images, 20% held out for validation: 20, batches of 4


def photo(width: int = 50, height: int = 44, seed: int = 0) -> Image.Image:
    """Noise over a left-to-right ramp in one channel: its flip is another picture."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 56, (height, width, 3)).astype(np.float64)
    pixels[:, :, seed % 3] += np.linspace(0, 199, width)[None, :]
    return Image.fromarray(pixels.astype(np.uint8))


def test_the_views_in_their_documented_order():
    img = photo()
    views = ViewsTransform(32, MAX_VIEWS)(img)
    assert views.shape == (12, 32, 32, 3) and views.dtype == np.uint8
    plain = TestTransform(32)(img)
    np.testing.assert_array_equal(views[0], plain)
    np.testing.assert_array_equal(views[1], np.asarray(Image.fromarray(plain).transpose(0)))
    side = round(round(32 * 256 / 224) * 1.14)  # 37 -> 42
    larger = img.resize((side, side), Image.BILINEAR)
    span = side - 32
    boxes = [(span // 2, span // 2), (0, 0), (span, 0), (0, span), (span, span)]
    for i, (left, top) in enumerate(boxes):
        crop = larger.crop((left, top, left + 32, top + 32))
        np.testing.assert_array_equal(views[2 + 2 * i], np.asarray(crop))
        np.testing.assert_array_equal(views[3 + 2 * i], np.asarray(crop.transpose(0)))
    # --tta N: the first N of that order; 1 is the plain transform itself.
    np.testing.assert_array_equal(ViewsTransform(32, 3)(img), views[:3])
    assert isinstance(eval_transform(32, 1), TestTransform)
    for bad in (0, MAX_VIEWS + 1):
        with pytest.raises(UsageError, match=f"between 1 .* and {MAX_VIEWS}"):
            eval_transform(32, bad)


# resnet18_v1: mobilenet0.25 from scratch gives the same output to 1e-7 for every input
# here (measured), where the views' mean could not differ from the plain view.
SETTINGS = {"epochs": 2, "momentum": 0.9, "seed": 3, "val_split": 0.2}
SETTINGS.update(model="resnet18_v1", lr=0.001)


def tiny_config(data: Path, out: Path, **changes):
    return conftest.tiny_config(data, out, **{**SETTINGS, **changes})


@pytest.fixture
def finished(image_folder, trained_run):
    """A finished 2-epoch run with --tta 2 and a validation part (trained once per session),
    and its data."""
    data = image_folder(n_train=12, n_test=2, size=36)
    run = trained_run(data, **SETTINGS, tta=2)
    return data, run.path, run.result


def logits_by_hand(run_dir: Path, params: Path, images: list[Image.Image], flip: bool):
    """The run's network (``params``) on the plain crops of ``images``, or on their flips."""
    loaded = load_run(run_dir)
    loaded.net.load_parameters(str(params), ctx=mx.cpu())
    crops = [TestTransform(loaded.image_size)(img) for img in images]
    if flip:
        crops = [crop[:, ::-1] for crop in crops]
    batch = mx.nd.array(np.stack(crops), dtype="uint8")
    return loaded.net(normalize_batch(batch)).asnumpy().astype(np.float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def val_images(run_dir: Path) -> tuple[list[Image.Image], np.ndarray]:
    record = json.loads((run_dir / "split.json").read_text())
    from gluon_ft.data import splits

    val = splits.parts_from_record(record["root"], record).val
    return [val.load(i) for i in range(len(val))], val.labels()


def test_train_scores_each_epoch_on_the_mean_logits_of_the_views(finished):
    """metrics.json's val loss and accuracy are those of the mean of the plain and flipped
    logits of each val image, from the epoch's checkpoint; not the plain view's."""
    _, run, result = finished
    images, labels = val_images(run)
    for row in result["history"]:
        params = run / "checkpoints" / f"epoch-{row['epoch']:04d}" / "model.params"
        plain = logits_by_hand(run, params, images, flip=False)
        mean = (plain + logits_by_hand(run, params, images, flip=True)) / 2
        for logits, matches in ((mean, True), (plain, False)):
            loss = -log_softmax(logits)[np.arange(len(labels)), labels].mean()
            assert bool(row["val_loss"] == pytest.approx(loss, rel=1e-5)) is matches
        assert row["val_acc"] == (mean.argmax(axis=1) == labels).mean()
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert config["tta"] == 2 and summary["tta"] == 2  # the report used the run's --tta
    assert "Test-time augmentation: 2 views" in (run / "report.md").read_text()


def test_predict_with_one_view_is_the_plain_network_and_two_the_mean_with_the_flip(finished):
    _, run, _ = finished
    images = [photo(seed=s) for s in range(3)]
    plain = logits_by_hand(run, run / "model.params", images, flip=False)
    flipped = logits_by_hand(run, run / "model.params", images, flip=True)
    one = Predictor(run, tta=1).probabilities(images)  # the run's own --tta is 2
    # --tta 1 is the plain evaluation, bit for bit (softmax over the same float32 logits).
    batch = mx.nd.array(np.stack([TestTransform(32)(img) for img in images]), dtype="uint8")
    loaded = Predictor(run, tta=1).run
    exact = mx.nd.softmax(loaded.net(normalize_batch(batch)), axis=1).asnumpy()
    np.testing.assert_array_equal(one, exact)
    np.testing.assert_allclose(one, softmax(plain), rtol=1e-5, atol=1e-7)
    two = Predictor(run, tta=2).probabilities(images)
    np.testing.assert_allclose(two, softmax((plain + flipped) / 2), rtol=1e-5, atol=1e-7)
    assert not np.allclose(two, one, rtol=1e-4, atol=1e-6)


def two_view_probabilities(run: Path, image: Path) -> np.ndarray:
    """By hand: the softmax of the mean logits of the image and its flip."""
    img = load_image(image)
    plain = logits_by_hand(run, run / "model.params", [img], flip=False)
    flipped = logits_by_hand(run, run / "model.params", [img], flip=True)
    return softmax((plain + flipped) / 2)[0]


def test_the_predict_command_takes_tta_and_refuses_too_many_views(finished, tmp_path, cli):
    _, run, _ = finished
    image = tmp_path / "photo.png"
    photo().save(image)
    result = cli("predict", run, image, "--tta", "2", "--json")
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert set(entry) == {"source", "ok", "top"} and entry["ok"]  # the documented shape
    expected = two_view_probabilities(run, image)
    for top in entry["top"]:
        assert top["probability"] == pytest.approx(expected[top["index"]], rel=1e-5)
    refused = cli("predict", run, image, "--tta", MAX_VIEWS + 1)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"between 1 (no test-time augmentation) and {MAX_VIEWS}" in refused.stderr


def test_serve_answers_with_the_views_mean_and_says_tta(finished, tmp_path):
    _, run, _ = finished
    img = photo(seed=5)
    path = tmp_path / "photo.png"
    img.save(path)
    expected = two_view_probabilities(run, path)
    with running_server(run, tmp_path / "serve.log", "--tta", "2") as server:
        health = requests.get(server.url + "health", timeout=10).json()
        answer = post_image(server.url, path.read_bytes()).json()
    assert health["tta"] == 2
    assert set(answer) == {"run_id", "model", "tta", "filename", "classes", "probabilities"}
    assert answer["tta"] == 2
    classes = json.loads((run / "classes.json").read_text())
    for name, probability in zip(answer["classes"], answer["probabilities"]):
        assert probability == pytest.approx(expected[classes.index(name)], rel=1e-5)


def test_train_refuses_tta_with_cached_features(tmp_path, cli):
    data = write_image_folder(tmp_path / "data", n_train=2, n_test=1)
    result = cli(
        *("train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"),
        *("--pretrained", "none", "--freeze", "features", "--cache-features", "--tta", "2"),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--tta 2 needs the images of each view" in result.stderr


def test_tta_on_two_devices_scores_as_on_one(finished, tmp_path):
    """--ctx cpu:2 with --tta 2 and the backbone frozen (so that both devices normalize with
    the same statistics): epoch 1's val scores are those of the cpu:1 run."""
    data, _, _ = finished
    rows = {}
    for ctx in ("cpu:1", "cpu:2"):
        run = tmp_path / ctx.replace(":", "-")
        rows[ctx] = train(tiny_config(data, run, ctx=ctx, tta=2, freeze="features"))["history"]
    assert rows["cpu:2"][0]["val_loss"] == pytest.approx(rows["cpu:1"][0]["val_loss"], rel=1e-5)
    assert rows["cpu:2"][0]["val_acc"] == rows["cpu:1"][0]["val_acc"]


def test_stopped_mid_epoch_and_resumed_scores_as_the_unstopped_run(finished, tmp_path, monkeypatch):
    data, uninterrupted, expected = finished
    run = tmp_path / "run"
    record_steps(monkeypatch, signal_after=STEPS_PER_EPOCH + 2)
    with pytest.raises(Interrupted):
        train(tiny_config(data, run, tta=2))
    monkeypatch.undo()
    result = train(tiny_config(data, run, tta=2, resume=True))
    for key in ("val_loss", "val_acc"):
        assert [r[key] for r in result["history"]] == [r[key] for r in expected["history"]]
    saved, unstopped = (mx.nd.load(str(r / "model.params")) for r in (run, uninterrupted))
    for name, value in unstopped.items():
        np.testing.assert_array_equal(saved[name].asnumpy(), value.asnumpy(), err_msg=name)
