"""Bad inputs a user may hand us: each gets a clear message or a counted skip, no traceback.

One test per input. Three more live beside the download code they exercise:
``tests/test_download.py::test_unsafe_member_is_refused_and_nothing_extracted`` (a zip with
``../`` members, absolute paths, links), ``test_wrong_sha1_leaves_nothing`` with
``tests/test_data.py::test_hotdog_wrong_sha1_exits_2_naming_both_hashes`` (a sha1 mismatch),
and ``test_connection_that_always_drops_fails`` (a dropped connection, library level; the
command-line level is here).
"""

from __future__ import annotations

import http.server
import io
import json
import struct
import threading
import zlib
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image, ImageFile

from gluon_ft.cli import main
from gluon_ft.data.decode import UnreadableImageError, load_image
from gluon_ft.data.folders import ImageFolderSplit
from gluon_ft.data.loaders import make_loader
from gluon_ft.data.transforms import TestTransform, TrainTransform
from gluon_ft.errors import UsageError
from gluon_ft.model.graft import build_model
from gluon_ft.train import TrainConfig

# --- files ---------------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit PNG that claims ``width x height`` pixels in a few dozen bytes."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)  # far fewer rows than claimed: a decoder would choke
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def noise(size: int = 40, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def corrupt_png() -> bytes:
    """A real PNG whose compressed pixel data was damaged (its CRCs no longer match)."""
    raw = bytearray(encoded(noise(), "PNG"))
    start = raw.index(b"IDAT") + 20
    raw[start : start + 64] = bytes(64)
    return bytes(raw)


def truncated_jpeg() -> bytes:
    data = encoded(noise(64), "JPEG", quality=90)
    return data[: len(data) // 2]


def gray_16bit() -> Image.Image:
    ramp = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    return Image.fromarray(ramp)  # mode I;16


UNREADABLE = {
    # name: (bytes, the reason load_image gives)
    "corrupt.png": (corrupt_png, "cannot decode"),
    "truncated.jpg": (truncated_jpeg, "truncated"),
    "empty.png": (lambda: b"", "empty file (0 bytes)"),
    "notes.jpg": (lambda: b"shopping list: buns, mustard\n", "not an image"),
    "bomb.png": (lambda: bomb_png(30000, 30000), "decompression bomb"),
}
ODD_BUT_GOOD = {
    "gray.png": lambda: encoded(noise().convert("L"), "PNG"),
    "rgba.png": lambda: encoded(noise().convert("RGBA"), "PNG"),
    "cmyk.jpg": lambda: encoded(noise().convert("CMYK"), "JPEG"),
    "deep.png": lambda: encoded(gray_16bit(), "PNG"),
    "tiny.png": lambda: encoded(Image.new("RGB", (1, 1), (250, 10, 10)), "PNG"),
}


def write(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def assert_skipped_and_counted(path: Path, reason: str) -> None:
    """``load_image`` refuses it with the reason; a training loader skips and counts it."""
    with pytest.raises(UnreadableImageError, match=reason):
        load_image(path)
    split = ImageFolderSplit(path.parent, ("x",), ((str(path), 0),))
    loader = make_loader(split, TrainTransform(16), 4, shuffle=True)
    assert [(images, bad) for images, _, bad in loader] == [(None, 1)]


@pytest.fixture
def bad_data(tmp_path) -> Path:
    """Clean cat/dog images, every unreadable kind among the cats, odd-but-good dogs."""
    root = write_image_folder(tmp_path / "data", n_train=4, n_test=2, size=36)
    for name, (payload, _) in UNREADABLE.items():
        write(root / "train" / "cat" / name, payload())
    for name, payload in ODD_BUT_GOOD.items():
        write(root / "train" / "dog" / name, payload())
    return root


# --- unreadable files: refused with a reason, skipped and counted in training --------------


@pytest.fixture
def gluoncv_imported(monkeypatch):
    """What ``import gluoncv`` does to PIL, process-wide: pad damaged files instead of failing."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)


def test_corrupt_file(tmp_path, gluoncv_imported):
    assert_skipped_and_counted(write(tmp_path / "a.png", corrupt_png()), "cannot decode")


def test_truncated_jpeg(tmp_path, gluoncv_imported):
    assert_skipped_and_counted(write(tmp_path / "a.jpg", truncated_jpeg()), "truncated")


def test_zero_byte_file(tmp_path):
    assert_skipped_and_counted(write(tmp_path / "a.png", b""), r"empty file \(0 bytes\)")


def test_text_file_with_an_image_extension(tmp_path):
    path = write(tmp_path / "a.jpg", b"shopping list: buns, mustard\n")
    assert_skipped_and_counted(path, "not an image")


@pytest.mark.parametrize("side", [30000, 10000], ids=["over-2x-limit", "over-limit"])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    """Above 2x PIL's limit PIL raises; between 1x and 2x it only warns, and we refuse."""
    assert side * side > Image.MAX_IMAGE_PIXELS
    path = write(tmp_path / "bomb.png", bomb_png(side, side))
    # Its pixel data is bogus: had it been decoded, the reason would be a decode error.
    assert_skipped_and_counted(path, "refused as a possible decompression bomb")


# --- odd but valid images: all become 8-bit RGB --------------------------------------------


def test_grayscale_becomes_rgb(tmp_path):
    gray = noise().convert("L")
    img = load_image(write(tmp_path / "g.png", encoded(gray, "PNG")))
    pixels = np.asarray(img)
    assert img.mode == "RGB" and pixels.shape == (40, 40, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], np.asarray(gray))


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: the colour must not show
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    img = load_image(write(tmp_path / "t.png", encoded(rgba, "PNG")))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (0, 0, 255)


def test_cmyk_becomes_rgb(tmp_path):
    red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    img = load_image(write(tmp_path / "c.jpg", encoded(red, "JPEG", quality=95)))
    r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    img = load_image(write(tmp_path / "d.png", encoded(gray_16bit(), "PNG")))
    pixels = np.asarray(img)[..., 0].astype(int)
    assert img.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255
    # A ramp stays a ramp: clipping 16-bit values to 8 bits would make almost all of it 255.
    assert abs(np.median(pixels) - 127.5) < 2


def test_1x1_image_is_upscaled_by_both_transforms(tmp_path):
    img = load_image(write(tmp_path / "p.png", ODD_BUT_GOOD["tiny.png"]()))
    crop = TrainTransform(32)(img, np.random.default_rng(0))
    centre = TestTransform(32)(img)
    for out in (crop, centre):
        assert out.shape == (32, 32, 3) and (out == (250, 10, 10)).all()


# --- datasets ------------------------------------------------------------------------------


def train_cli(data: Path, *extra: str) -> list[str]:
    return [
        "train",
        *("--data", str(data), "--model", "mobilenet0.25", "--pretrained", "none"),
        *("--epochs", "2", "--batch-size", "4", "--image-size", "32", "--no-progress"),
        *extra,
    ]


def test_training_skips_unreadable_files_with_one_counted_warning(bad_data, tmp_path, cli):
    out = tmp_path / "run"
    result = cli(*train_cli(bad_data, "--out", str(out)))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert output.count("warning: skipped") == 1
    assert "warning: skipped 5 unreadable image file(s) in epoch 1" in output
    # Named: a few in the warning, every one in the run directory.
    listed = (out / "unreadable.txt").read_text().split()
    assert sorted(Path(path).name for path in listed) == sorted(UNREADABLE)
    assert f"and 2 more (all in {out / 'unreadable.txt'})" in output
    assert Path(listed[0]).name in output.split("warning: skipped")[1]
    metrics = json.loads((out / "metrics.json").read_text())
    # The odd-but-good dogs were trained on: 4 cats and 9 dogs are readable.
    assert [row["skipped"] for row in metrics] == [5, 5]
    assert [row["train_samples"] for row in metrics] == [4 + 9, 4 + 9]


def test_strict_refuses_listing_every_unreadable_file(bad_data, tmp_path, capsys):
    code = main(train_cli(bad_data, "--out", str(tmp_path / "run"), "--strict"))
    err = capsys.readouterr().err
    assert code == 2 and "--strict: 5 unreadable image file(s)" in err
    for name in UNREADABLE:
        assert f"train/cat/{name} (" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_check_data_reports_counts_reasons_and_small_images(bad_data, capsys):
    # Exit 0: training accepts the folder (it skips the unreadable files), see test_new_user.
    assert main(["check-data", str(bad_data), "--image-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "  train  cat                            9           5      0" in text
    assert "  train  dog                            9           0      1" in text
    for name, (_, reason) in UNREADABLE.items():
        assert f"  train/cat/{name}: " in text and reason in text.split(f"train/cat/{name}: ")[1]
    assert "  train/dog/tiny.png: 1x1" in text

    assert main(["check-data", str(bad_data), "--image-size", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dogs = report["splits"]["train"]["dog"]
    assert dogs["images"] == 9 and dogs["small"] == [{"path": "train/dog/tiny.png", "size": [1, 1]}]
    assert len(report["splits"]["train"]["cat"]["unreadable"]) == 5 and report["problems"] == []


def test_check_data_on_a_clean_dataset_exits_0(tiny_data, capsys):
    assert main(["check-data", str(tiny_data), "--image-size", "32"]) == 0
    assert "unreadable (" not in capsys.readouterr().out


def test_empty_class_folder(tiny_data, tmp_path, capsys):
    for f in (tiny_data / "train" / "dog").iterdir():
        f.unlink()
    assert main(train_cli(tiny_data, "--out", str(tmp_path / "run"))) == 2
    assert "class folder(s) with no image files: dog" in capsys.readouterr().err


def test_train_test_class_mismatch(tiny_data, tmp_path, capsys):
    (tiny_data / "test" / "dog").rename(tiny_data / "test" / "bird")
    assert main(["check-data", str(tiny_data)]) == 2
    assert "only in train: ['dog']; only in test: ['bird']" in capsys.readouterr().out
    assert main(train_cli(tiny_data, "--out", str(tmp_path / "run"))) == 2
    assert "only in test: ['bird']" in capsys.readouterr().err


def test_single_class_dataset(tiny_data, tmp_path, capsys):
    for split in ("train", "test"):
        for f in (tiny_data / split / "dog").iterdir():
            f.unlink()
        (tiny_data / split / "dog").rmdir()
    assert main(train_cli(tiny_data, "--out", str(tmp_path / "run"))) == 2
    assert "has a single class (cat); a classifier needs two or more" in capsys.readouterr().err


def _params_of(model: str, path: Path, classes: int = 2) -> Path:
    net = build_model(model, classes)
    net.initialize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.save_parameters(str(path))
    return path


def test_wrong_architecture_pretrained_params(tiny_data, tmp_path, capsys):
    params = _params_of("mobilenet0.25", tmp_path / "mobile.params")
    args = train_cli(tiny_data, "--out", str(tmp_path / "run"))
    args[args.index("mobilenet0.25")] = "resnet18_v2"
    args[args.index("none")] = str(params)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{params} does not fit the resnet18_v2 architecture" in err
    assert "Pass the --model it was trained with" in err


def test_wrong_architecture_run_params(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "mobilenet0.25", "image_size": 32}))
    (run / "classes.json").write_text(json.dumps(["cat", "dog"]))
    _params_of("resnet18_v2", run / "model.params")
    assert main(["predict", str(run), str(tiny_data / "test" / "cat" / "000.png")]) == 2
    err = capsys.readouterr().err
    assert f"Model parameters {run / 'model.params'} does not fit this network" in err
    assert "same architecture and number of classes" in err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "0", "must be a positive number, got 0"),
        ("--lr", "-0.1", "must be a positive number, got -0.1"),
        ("--lr", "nan", "must be a positive number, got nan"),
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--batch-size", "-4", "must be at least 1, got -4"),
        ("--epochs", "0", "must be at least 1, got 0"),
        ("--epochs", "-1", "must be at least 1, got -1"),
    ],
)
def test_non_positive_lr_batch_size_or_epochs(tiny_data, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        main([*train_cli(tiny_data), f"{flag}={value}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: {message}" in err


@pytest.mark.parametrize(
    "changes", [{"lr": 0.0}, {"lr": -1.0}, {"batch_size": 0}, {"epochs": 0}, {"epochs": -2}]
)
def test_non_positive_settings_through_the_library(changes):
    with pytest.raises(UsageError, match="must be"):
        TrainConfig(**changes).validate()


@pytest.fixture
def dropping_server():
    """A real HTTP server on 127.0.0.1 that sends half of every body, then closes the socket."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.server.requests += 1
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"P" * 50000)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requests = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_connection_dropped_mid_download_exits_2(dropping_server, tmp_path, cli, monkeypatch):
    url = f"http://127.0.0.1:{dropping_server.server_address[1]}/hotdog.zip"
    monkeypatch.setenv("GLUON_FT_HOTDOG_URL", url)
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    result = cli("train", "--data", "hotdog", "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "broke off" in result.stderr
    assert "hotdog.zip" in result.stderr  # where to put a copy by hand
    assert dropping_server.requests > 1  # it was retried
    assert not (tmp_path / "home" / "datasets" / "hotdog.zip").exists()
