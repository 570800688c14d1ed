"""Datasets: scanning, transforms, sharding, the hot-dog download, offline errors."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import time
import zipfile

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from gluon_ft.data.folders import scan_dataset
from gluon_ft.data.hotdog import HOTDOG_SHA1, hotdog_root
from gluon_ft.data.loaders import EpochBatchSampler, make_loader
from gluon_ft.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TestTransform,
    TrainTransform,
    normalize_batch,
    sample_rng,
)
from gluon_ft.errors import UsageError


def test_scan_dataset_sorted_classes_and_labels(tiny_data):
    train, test = scan_dataset(tiny_data)
    assert train.classes == test.classes == ("cat", "dog")
    assert len(train) == 12 and len(test) == 8
    assert list(train.labels()) == [0] * 6 + [1] * 6


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("missing", "does not exist"),
        ("no-train", "has no train/ folder"),
        ("mismatch", "only in test: ['bird']"),
        ("single-class", "single class"),
        ("empty-class", "no image files: dog"),
    ],
)
def test_bad_dataset_folders(tiny_data, breakage, message):
    root = tiny_data
    if breakage == "missing":
        root = tiny_data / "nope"
    elif breakage == "no-train":
        (tiny_data / "train").rename(tiny_data / "training")
    elif breakage == "mismatch":
        (tiny_data / "test" / "dog").rename(tiny_data / "test" / "bird")
    elif breakage == "single-class":
        for split in ("train", "test"):
            for f in (tiny_data / split / "dog").iterdir():
                f.unlink()
            (tiny_data / split / "dog").rmdir()
    elif breakage == "empty-class":
        for f in (tiny_data / "train" / "dog").iterdir():
            f.unlink()
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        scan_dataset(root)


def test_bad_dataset_exits_2_without_traceback(tiny_data, tmp_path):
    """Through a real interpreter (``python -m gluon_ft``): the exit code a shell sees."""
    (tiny_data / "test" / "dog").rename(tiny_data / "test" / "bird")
    out = str(tmp_path / "run")
    result = run_cli("train", "--data", str(tiny_data), "--pretrained", "none", "--out", out)
    assert result.returncode == 2
    assert "differ" in result.stderr and "Traceback" not in result.stderr


def test_train_transform_semantics_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    transform = TrainTransform(32)
    out = transform(img, sample_rng(1, 2, 3))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, transform(img, sample_rng(1, 2, 3)))
    assert not np.array_equal(out, transform(img, sample_rng(1, 3, 3)))
    # Crops cover 8%-100% of the area with aspect ratios in [3/4, 4/3], as Gluon's.
    rng = np.random.default_rng(0)
    areas, flips = [], 0
    for _ in range(400):
        left, top, right, bottom = transform.crop_box(90, 60, rng)
        w, h = right - left, bottom - top
        assert left >= 0 and right <= 90 and top >= 0 and bottom <= 60
        areas.append(w * h / (90 * 60))
    assert min(areas) < 0.2 and max(areas) > 0.8
    # With the whole image as the crop, the output is the image or its mirror, half and half.
    halves = np.zeros((32, 32, 3), dtype=np.uint8)
    halves[:, 16:] = 255
    whole = TrainTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for seed in range(200):
        out = whole(Image.fromarray(halves), sample_rng(seed, 0, 0))
        flips += int(out[0, 0, 0] == 255)
    assert 70 < flips < 130


def test_crop_scale_reaches_the_train_crops(tiny_data, tmp_path, monkeypatch):
    """``--crop-scale 0.5``: every random crop of a run keeps at least half the image area."""
    import mxnet as mx

    from gluon_ft.model.graft import scratch_twin
    from gluon_ft.notebook import train_network
    from gluon_ft.train import TrainConfig, train

    areas = []
    original = TrainTransform.crop_box

    def crop_box(self, width, height, rng):
        box = original(self, width, height, rng)
        areas.append((box[2] - box[0]) * (box[3] - box[1]) / (width * height))
        return box

    monkeypatch.setattr(TrainTransform, "crop_box", crop_box)
    settings = dict(data=str(tiny_data), model="mobilenet0.25", pretrained="none", epochs=1)
    settings.update(batch_size=4, image_size=32, progress=False)
    train(TrainConfig(**settings, out=str(tmp_path / "book")))
    assert min(areas) < 0.4  # the book's 8 %: small crops happen
    areas.clear()
    train(TrainConfig(**settings, crop_scale=0.5, out=str(tmp_path / "half")))
    assert len(areas) == 12 and min(areas) >= 0.45  # every crop of the epoch; whole pixels
    # The notebooks' loop for hand-built networks (exercise 4) takes the same crops.
    areas.clear()
    net = scratch_twin("mobilenet0.25", 2, [mx.cpu()], 32)
    train_network(net, TrainConfig(**settings, crop_scale=0.5, ctx="cpu"))
    assert len(areas) == 12 and min(areas) >= 0.45


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "must be a positive number"), ("1.5", "--crop-scale must be in (0, 1], got 1.5")],
)
def test_bad_crop_scale_exits_2(tiny_data, value, message, cli):
    result = cli("train", "--data", tiny_data, "--pretrained", "none", "--crop-scale", value)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_test_transform_is_resize_then_center_crop():
    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    pixels[:, 50:] = 255  # left half black, right half white
    out = TestTransform(56)(Image.fromarray(pixels))
    assert out.shape == (56, 56, 3)
    assert TestTransform(224).resize == 256
    assert out[:, :20].max() < 10 and out[:, -20:].min() > 245


def test_normalize_batch_matches_to_tensor_and_normalize():
    import mxnet as mx
    from mxnet.gluon.data.vision import transforms

    images = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    ours = normalize_batch(mx.nd.array(images, dtype="uint8")).asnumpy()
    book = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    for i in range(2):
        expected = book(mx.nd.array(images[i], dtype="uint8")).asnumpy()
        np.testing.assert_allclose(ours[i], expected, rtol=1e-5, atol=1e-5)


def test_sampler_shards_are_disjoint_and_cover_each_epoch():
    shards = [EpochBatchSampler(11, 2, True, seed=3, shard=r, num_shards=3) for r in range(3)]
    seen_orders = []
    for epoch in range(2):
        for s in shards:
            s.set_epoch(epoch)
        parts = [[i for batch in s for i, _ in batch] for s in shards]
        flat = sorted(i for part in parts for i in part)
        assert flat == list(range(11))
        seen_orders.append(parts[0])
    assert seen_orders[0] != seen_orders[1]  # reshuffled per epoch


def test_unreadable_file_is_skipped_and_counted(tiny_data):
    (tiny_data / "train" / "cat" / "000.png").write_bytes(b"not an image")
    train, _ = scan_dataset(tiny_data)
    loader = make_loader(train, TestTransform(16), 4, shuffle=False)
    total = skipped = 0
    for _, labels, bad in loader:
        skipped += bad
        total += 0 if labels is None else len(labels)
    assert skipped == 1 and total == 11


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def zip_server():
    """A real HTTP server on 127.0.0.1 serving ``/hotdog.zip`` from ``server.payload``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.server.requests += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.server.payload)))
            self.end_headers()
            self.wfile.write(self.server.payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requests = 0
    server.payload = _zip_bytes(
        {
            f"hotdog/{split}/{cls}/{i}.png": _png()
            for split in ("train", "test")
            for cls in ("hotdog", "not-hotdog")
            for i in range(2)
        }
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/hotdog.zip"
    yield server
    server.shutdown()


def test_hotdog_download_from_a_real_server(zip_server, tmp_path):
    sha1 = hashlib.sha1(zip_server.payload).hexdigest()
    root = hotdog_root(tmp_path / "datasets", url=zip_server.url, sha1=sha1)
    train, test = scan_dataset(root)
    assert train.classes == ("hotdog", "not-hotdog") and len(test) == 4
    # Cached: a second call does not download again.
    hotdog_root(tmp_path / "datasets", url=zip_server.url, sha1=sha1)
    assert zip_server.requests == 1


def test_hotdog_wrong_sha1_exits_2_naming_both_hashes(zip_server, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("GLUON_FT_HOTDOG_URL", zip_server.url)
    home = tmp_path / "home"
    monkeypatch.setenv("MXNET_HOME", str(home))
    out = str(tmp_path / "run")
    result = cli("train", "--data", "hotdog", "--pretrained", "none", "--out", out)
    assert result.returncode == 2, result.stderr
    actual = hashlib.sha1(zip_server.payload).hexdigest()
    assert HOTDOG_SHA1 in result.stderr and actual in result.stderr
    assert "Traceback" not in result.stderr
    datasets = home / "datasets"
    leftovers = [p.name for p in datasets.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_offline_without_data_exits_2_fast_naming_the_zip(tmp_path, monkeypatch, cli):
    # A closed port on loopback stands for "no network" without touching the internet.
    monkeypatch.setenv("GLUON_FT_HOTDOG_URL", "http://127.0.0.1:9/hotdog.zip")
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "home"))
    start = time.monotonic()
    result = cli("train", cwd=tmp_path)  # the bare command: its run folder goes to ./runs/
    assert result.returncode == 2
    assert time.monotonic() - start < 60
    expected = str(tmp_path / "home" / "datasets" / "hotdog.zip")
    assert expected in result.stderr
    assert "--data DIR" in result.stderr and "Traceback" not in result.stderr


def test_a_folder_where_the_hotdog_zip_belongs_exits_2_without_a_traceback(
    tmp_path, monkeypatch, cli
):
    monkeypatch.setenv("GLUON_FT_HOTDOG_URL", "http://127.0.0.1:9/hotdog.zip")
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "datasets" / "hotdog.zip").mkdir(parents=True)
    result = cli("train", "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hotdog.zip exists but cannot be read" in result.stderr


def test_offline_without_weights_exits_2_naming_the_file(tiny_data, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    result = cli("train", "--data", tiny_data, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert str(tmp_path / "home" / "models" / "resnet18_v2-") in result.stderr
    assert "--pretrained FILE.params" in result.stderr and "Traceback" not in result.stderr
