"""Image files as users hand them to us: rotated phone photos, deep bit depths, hidden files.

Each kind is checked through the paths a user meets it on: the dataset scan and loader,
``gluon-ft check-data``, ``gluon-ft pack``, :class:`~gluon_ft.deploy.predict.Predictor` on a file,
and the serve worker that decodes uploaded bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image

from gluon_ft.data.decode import load_image
from gluon_ft.data.folders import scan_dataset
from gluon_ft.data.loaders import make_loader
from gluon_ft.data.recordio import load_pack, pack_dataset
from gluon_ft.data.transforms import TestTransform
from gluon_ft.deploy.predict import Predictor
from gluon_ft.model.graft import build_model

# --- EXIF orientation ----------------------------------------------------------------------

# How a camera stores an upright view ``u`` (rows, columns, channels) under each EXIF
# Orientation value, from the EXIF specification; a viewer undoes it.
STORED_AS = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # mirrored left-right
    3: lambda u: u[::-1, ::-1],  # turned 180 degrees
    4: lambda u: u[::-1],  # mirrored top-bottom
    5: lambda u: u.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda u: np.rot90(u, 1),  # turned 90 degrees counter-clockwise: view it turned clockwise
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda u: np.rot90(u, -1),  # turned 90 degrees clockwise: view it turned back
}
BLOCK = 16  # JPEG-friendly flat blocks: their centres survive compression


def upright_view() -> np.ndarray:
    """A 48x32 (height x width) view of six flat blocks, each a different colour."""
    colours = np.array(
        [[(250, 0, 0), (0, 250, 0)], [(0, 0, 250), (250, 250, 0)], [(0, 250, 250), (120, 0, 120)]],
        dtype=np.uint8,
    )
    return colours.repeat(BLOCK, axis=0).repeat(BLOCK, axis=1)


def exif_jpeg(path: Path, orientation: int, upright: np.ndarray | None = None) -> Path:
    """Write a JPEG as a phone does: the sensor's pixels plus an EXIF Orientation tag."""
    upright = upright_view() if upright is None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORED_AS[orientation](upright))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored).save(path, exif=exif, quality=95, subsampling=0)
    return path


def block_centres(pixels: np.ndarray) -> np.ndarray:
    """The colour at the centre of each 16x16 block."""
    return pixels[BLOCK // 2 :: BLOCK, BLOCK // 2 :: BLOCK].astype(int)


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_every_exif_orientation_is_decoded_upright(tmp_path, orientation):
    img = load_image(exif_jpeg(tmp_path / "photo.jpg", orientation))
    assert img.size == (32, 48)  # width, height of the upright view
    assert np.abs(block_centres(np.asarray(img)) - block_centres(upright_view())).max() <= 6


def test_rotated_photo_is_trained_and_packed_upright(tmp_path):
    """The dataset loader and a pack (stored byte for byte, or re-encoded) see the upright view."""
    data = write_image_folder(tmp_path / "data", n_train=1, n_test=1, size=40)
    exif_jpeg(data / "train" / "cat" / "phone.jpg", 6)
    train, _ = scan_dataset(data)
    index = [Path(p).name for p, _ in train.items].index("phone.jpg")
    transform = TestTransform(48, resize_ratio=1.0)
    want = transform(Image.fromarray(upright_view()))

    loader = make_loader(train, transform, len(train), shuffle=False)
    [(images, _, skipped)] = list(loader)
    assert skipped == 0
    assert np.abs(images[index].astype(int) - want).mean() < 3

    for resize in (0, 24):  # 0 keeps the JPEG's bytes and its tag; 24 re-encodes the pixels
        pack_dataset(data, tmp_path / f"pack{resize}", resize=resize)
        packed, _ = load_pack(tmp_path / f"pack{resize}")
        names = [name for name, _ in packed.items]
        img = packed.load(names.index("cat/phone.jpg"))
        assert img.size == ((24, 36) if resize else (32, 48))
        got = transform(img).astype(int)
        assert np.abs(got - want).mean() < 8, resize


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """An untrained resnet18_v2 run at 32 px: its answers move with the pixels' layout and level.

    (An untrained mobilenet0.25 answers 0.5 / 0.5 whatever it is shown.)
    """
    run = tmp_path_factory.mktemp("untrained") / "run"
    run.mkdir()
    mx.random.seed(0)
    net = build_model("resnet18_v2", 2)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.save_parameters(str(run / "model.params"))
    (run / "config.json").write_text(json.dumps({"model": "resnet18_v2", "image_size": 32}))
    (run / "classes.json").write_text(json.dumps(["a", "b"]))
    return run


def probabilities(result: dict) -> list[float]:
    assert result["ok"], result
    return [t["probability"] for t in sorted(result["top"], key=lambda t: t["index"])]


def test_predict_and_serve_classify_the_photo_as_it_is_seen(untrained_run, tmp_path):
    """A file, its uploaded bytes and the serve worker agree with the upright view's pixels."""
    from gluon_ft.deploy.serve import InferenceWorker, fit_pixel_cap

    photo = exif_jpeg(tmp_path / "phone.jpg", 6)
    with Image.open(photo) as raw:  # the stored pixels, turned as a viewer turns them
        upright = np.rot90(np.asarray(raw.convert("RGB")), -1)
    seen = tmp_path / "seen.png"
    Image.fromarray(np.ascontiguousarray(upright)).save(seen)

    predictor = Predictor(untrained_run)
    want, from_file, from_bytes = predictor.predict_images([seen, photo, photo.read_bytes()])
    worker = InferenceWorker(predictor)
    worker.start().result(timeout=60)
    try:
        # As serve's route: checked against the pixel cap, made ready in the request's thread.
        upload = predictor.prepare(fit_pixel_cap(photo.read_bytes(), "phone.jpg", 10**8))
        from_upload = worker.submit(upload).result(timeout=60)
    finally:
        worker.close(timeout=10)
    for result in (from_file, from_bytes, from_upload):
        np.testing.assert_allclose(probabilities(result), probabilities(want), atol=1e-5)


# --- bit depths ----------------------------------------------------------------------------


def pgm_16bit(pixels: np.ndarray) -> bytes:
    """A binary PGM (P5) with maxval 65535: big-endian 16-bit samples, as the format says."""
    height, width = pixels.shape
    return f"P5\n{width} {height}\n65535\n".encode() + pixels.astype(">u2").tobytes()


def encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def big_endian_16bit(pixels: np.ndarray) -> Image.Image:
    # Not .convert("I;16B"): Pillow 10 clips to 255 on the way.
    height, width = pixels.shape
    return Image.frombytes("I;16B", (width, height), pixels.astype(">u2").tobytes())


def dark_16bit() -> np.ndarray:
    """A dark 16-bit ramp: at most 4000 of 65535, so at most 15 of 255 in 8 bits."""
    return np.linspace(0, 4000, 8 * 16).reshape(8, 16).astype(np.uint16)


def test_16_bit_files_decode_alike_and_a_dark_image_stays_dark(tmp_path):
    pixels = dark_16bit()
    files = {
        "png": encoded(Image.fromarray(pixels), "PNG"),
        "tif": encoded(Image.fromarray(pixels), "TIFF"),
        "big-endian.tif": encoded(big_endian_16bit(pixels), "TIFF"),
        "pgm": pgm_16bit(pixels),
    }
    decoded = {}
    for name, payload in files.items():
        path = tmp_path / f"dark.{name}"
        path.write_bytes(payload)
        decoded[name] = np.asarray(load_image(path))
    for name, rgb in decoded.items():
        np.testing.assert_array_equal(rgb, decoded["png"], err_msg=f"{name} differs from png")
    assert decoded["png"].max() == 15  # 4000 of 65535 is dark, and stays so
    want = (pixels >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decoded["png"], np.repeat(want[..., None], 3, axis=2))


def test_bit_depths_reach_predict_and_check_data_alike(untrained_run, tmp_path, cli):
    """The same dark pixels as PNG and PGM: one answer from predict, none unreadable."""
    data = write_image_folder(tmp_path / "data", n_train=1, n_test=1, size=40)
    png = data / "train" / "cat" / "dark.png"
    pgm = data / "train" / "cat" / "dark.pgm"
    png.write_bytes(encoded(Image.fromarray(dark_16bit()), "PNG"))
    pgm.write_bytes(pgm_16bit(dark_16bit()))
    from_png, from_pgm = Predictor(untrained_run).predict_images([png, pgm])
    assert probabilities(from_png) == probabilities(from_pgm)

    done = cli("check-data", str(data), "--image-size", "8", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["splits"]["train"]["cat"]["images"] == 3


def tiff_32bit(values: np.ndarray, signed: bool) -> bytes:
    """A 32-bit integer TIFF; Pillow writes only signed ones, so its SampleFormat is patched."""
    tiff = encoded(Image.fromarray(values, "I"), "TIFF")
    sample_format_signed = b"\x53\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # tag 339, SHORT, 1, 2
    assert tiff.count(sample_format_signed) == 1
    return (
        tiff if signed else tiff.replace(sample_format_signed, sample_format_signed[:-2] + b"\1\0")
    )


@pytest.mark.parametrize(
    "signed,want",
    [
        # 0 .. 2**31 - 1 maps to 0 .. 255, whatever the image's own maximum; negatives are black.
        (True, [0, 1, 128, 0, 0]),
        # The same 32 bits read unsigned: 0 .. 2**32 - 1 maps to 0 .. 255 (-1 is 2**32 - 1).
        (False, [0, 0, 64, 255, 255]),
    ],
    ids=["signed", "unsigned"],
)
def test_32_bit_integer_tiff_is_scaled_by_its_range(tmp_path, signed, want):
    values = np.array([[0, 2**23, 2**30, -5, -1]], dtype=np.int32)
    path = tmp_path / "deep.tif"
    path.write_bytes(tiff_32bit(values, signed))
    got = np.asarray(load_image(path))[0, :, 0]
    np.testing.assert_array_equal(got, want)


def test_float_tiff_is_read_as_0_to_1(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values, "F").save(path)
    got = np.asarray(load_image(path))[0, :, 0]
    np.testing.assert_array_equal(got, [0, 128, 255, 255, 0, 0])


# --- hidden files, other extensions --------------------------------------------------------


def apple_double() -> bytes:
    """What macOS writes as ``._name`` beside a file on a foreign disk: not an image."""
    return b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)


@pytest.fixture
def messy_data(tmp_path) -> Path:
    """A dataset as it arrives from a Mac and a notebook: hidden copies, odd extensions, notes."""
    root = write_image_folder(tmp_path / "data", n_train=2, n_test=1, size=36)
    cat = root / "train" / "cat"
    checkpoints = cat / ".ipynb_checkpoints"
    checkpoints.mkdir()
    for original in sorted(cat.glob("*.png")):
        (checkpoints / original.name).write_bytes(original.read_bytes())  # would be duplicates
    (cat / "._000.png").write_bytes(apple_double())
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(32))
    (cat / "deep" / ".thumbs").mkdir(parents=True)
    (cat / "deep" / ".thumbs" / "x.png").write_bytes((cat / "000.png").read_bytes())
    (cat / "deep" / "kept.png").write_bytes((cat / "001.png").read_bytes())
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / "README.txt").write_text("cats and dogs\n")
    photo = Image.fromarray(upright_view())
    for name, fmt in (("a.jfif", "JPEG"), ("b.jpe", "JPEG"), ("c.webp", "WEBP"), ("d.JPG", "JPEG")):
        photo.save(root / "train" / "dog" / name, format=fmt)
    (root / "train" / "dog" / "notes.txt").write_text("dogs I met\n")
    (root / "train" / "dog" / "scan.pdf").write_bytes(b"%PDF-1.4\n")
    return root


def test_scan_ignores_hidden_names_and_reads_every_pillow_extension(messy_data):
    train, _ = scan_dataset(messy_data)
    names = [str(Path(p).relative_to(train.root)) for p, _ in train.items]
    assert names == [
        "cat/000.png",
        "cat/001.png",
        "cat/deep/kept.png",
        "dog/000.png",
        "dog/001.png",
        "dog/a.jfif",
        "dog/b.jpe",
        "dog/c.webp",
        "dog/d.JPG",
    ]
    loader = make_loader(train, TestTransform(16), len(train), shuffle=False)
    [(images, labels, skipped)] = list(loader)
    assert skipped == 0 and len(images) == 9


def test_check_data_counts_ignored_and_skipped_files(messy_data, cli):
    done = cli("check-data", str(messy_data), "--image-size", "16", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    cat, dog = report["splits"]["train"]["cat"], report["splits"]["train"]["dog"]
    assert (cat["images"], cat["unreadable"], cat["skipped"]) == (3, [], [])
    assert cat["ignored"] == [
        "train/cat/.DS_Store",
        "train/cat/._000.png",
        "train/cat/.ipynb_checkpoints/",
        "train/cat/deep/.thumbs/",
    ]
    assert (dog["images"], dog["unreadable"], dog["ignored"]) == (6, [], [])
    assert dog["skipped"] == ["train/dog/notes.txt", "train/dog/scan.pdf"]
    assert report["beside_classes"]["train"] == {
        "ignored": ["train/.DS_Store"],
        "skipped": ["train/README.txt"],
    }

    done = cli("check-data", str(messy_data), "--image-size", "16")
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr
    text = done.stdout
    assert "ignored (5 hidden names" in text and "  train/cat/.ipynb_checkpoints/" in text
    assert "skipped (3 files" in text and "  train/dog/scan.pdf" in text
    assert "  train/README.txt (not in a class folder)" in text


def test_a_class_with_no_image_says_what_it_skipped(messy_data, tmp_path, cli):
    for image in (messy_data / "train" / "dog").glob("*.*"):
        if image.suffix not in (".txt", ".pdf"):
            image.unlink()
    done = cli("check-data", str(messy_data), "--image-size", "16")
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert "class folder(s) with no image files: dog (skipped notes.txt, scan.pdf)" in done.stdout
