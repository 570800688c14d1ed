"""``gluon-ft serve`` as users meet it: a real server process on 127.0.0.1, its JSON API, bad
requests, concurrent clients, and the page in headless Chromium.

Run as a script, this file writes the README's screenshot through the same browser code as
the page test (``make screenshot``)::

    python tests/test_serve.py --screenshot docs/screenshot.png
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, when run as a script
from conftest import FOOD_MODEL, HOTDOG_SMALL, REPO, run_cli, write_image_folder  # noqa: E402

from gluon_ft import isa  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# This machine's network is closed: without these, Chromium floods it with refused connections.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1000,700",
]
CAP_MB = 0.1  # the test server's upload limit, so that "too large" costs little to send
HAS_BF16 = isa.bfloat16_unsupported() is None
CLIENTS, REQUESTS_PER_CLIENT = 8, 25


# ---------------------------------------------------------------- server and files


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def assert_alive(self) -> None:
        """The process still runs and answers /health."""
        assert self.process.poll() is None, f"the server died:\n{self.log.read_text()[-3000:]}"
        assert requests.get(self.url + "health", timeout=10).json()["status"] == "ok"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(run_dir: Path, log: Path, *flags: str, env=None) -> Iterator[Server]:
    """``gluon-ft serve RUN`` in a subprocess on a free port; stopped on exit."""
    port = _free_port()
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gluon_ft", "serve", str(run_dir), "--port", str(port), *flags],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(f"http://127.0.0.1:{port}/", process, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"gluon-ft serve exited {process.returncode}:\n{log.read_text()}"
                )
            with contextlib.suppress(requests.ConnectionError):
                requests.get(server.url + "health", timeout=5).raise_for_status()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gluon-ft serve did not answer in 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def train_run(data: Path, out: Path, *flags: str, env=None) -> Path:
    result = run_cli(
        "train", "--data", str(data), "--out", str(out), "--no-progress", *flags, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG file whose header declares ``width`` x ``height`` pixels (a bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int, progressive: bool = False) -> bytes:
    """A small JPEG file whose frame header declares ``width`` x ``height`` pixels."""
    data = bytearray(encode_jpeg(Image.new("RGB", (16, 16), (90, 20, 160)), progressive))
    frame = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def encode_jpeg(img: Image.Image, progressive: bool = False) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """A smooth photo-like image that compresses well at any size."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def post_image(url: str, data: bytes, name: str = "photo.png", session=None, **kwargs):
    return (session or requests).post(
        url + "predict", files={"image": (name, data)}, timeout=60, **kwargs
    )


# ---------------------------------------------------------------- the browser


def ensure_chromium() -> str | None:
    """Install Debian's chromium + chromium-driver when missing; the reason if they are not."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return None
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        setup = subprocess.run(
            ["bash", str(Path(__file__).with_name("browser_setup.sh"))],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if setup.returncode != 0:
            tail = (setup.stderr or setup.stdout).strip().splitlines()[-3:]
            return "Chromium could not be installed: " + " / ".join(tail)
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return None
    return f"{CHROMIUM} or {CHROMEDRIVER} is missing after installing chromium"


@contextlib.contextmanager
def chromium_session(profile: Path):
    """Selenium driving Debian's headless Chromium with a fresh profile; never a download."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager (which downloads browsers) never runs.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def classify_in_browser(driver, url: str, photo: Path, screenshot: Path | None = None) -> dict:
    """Open the page, upload ``photo`` through its file input, wait for the answer.

    Returns what the page shows: ``state`` (done or error), ``top_class``, ``rows`` (class,
    percent text), ``error``, and the preview image's natural width.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if driver.current_url.rstrip("/") != url.rstrip("/"):
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: "run" in d.find_element(By.ID, "model").text)
    driver.execute_script("document.body.dataset.state = 'idle'")
    driver.find_element(By.ID, "file").send_keys(str(photo.resolve()))
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script(
            "const state = document.body.dataset.state, img = document.getElementById('preview');"
            "return state === 'error' || (state === 'done' && img.complete);"
        )
    )
    rows = [
        (row.find_element(By.CLASS_NAME, "name").text, row.find_element(By.CLASS_NAME, "pct").text)
        for row in driver.find_elements(By.CSS_SELECTOR, "#bars li")
    ]
    shown = {
        "state": driver.find_element(By.TAG_NAME, "body").get_attribute("data-state"),
        "top_class": driver.find_element(By.ID, "top-class").text,
        "rows": rows,
        "error": driver.find_element(By.ID, "error").text,
        "preview_width": driver.execute_script(
            "const img = document.getElementById('preview');"
            "return img.complete ? img.naturalWidth : 0;"
        ),
    }
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
    return shown


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory) -> dict:
    # Module-scoped processes start before the per-test MXNET_HOME isolation applies.
    return {**os.environ, "MXNET_HOME": str(tmp_path_factory.mktemp("mxnet-home"))}


@pytest.fixture(scope="module")
def served_run(image_folder, trained_run) -> Path:
    """A tiny finished run: resnet18_v2 from scratch, 32 px, one epoch on two colour classes
    (trained once per session)."""
    data = image_folder(n_train=4, n_test=2)
    return trained_run(data, model="resnet18_v2", batch_size=8).path


@pytest.fixture(scope="module")
def server(served_run, tmp_path_factory, subprocess_env) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with running_server(served_run, log, "--max-upload-mb", str(CAP_MB), env=subprocess_env) as s:
        yield s


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Four small photos the network tells apart: three PNGs and a JPEG, 48 px."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    paths = []
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 40, 210), (200, 180, 40)]):
        pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (48, 48, 3)), 0, 255)
        fmt = "JPEG" if i == 3 else "PNG"
        path = folder / f"photo{i}.{fmt.lower()}"
        path.write_bytes(encode(Image.fromarray(pixels.astype(np.uint8)), fmt))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def cli_predictions(served_run, photos) -> dict[str, dict[str, float]]:
    """``gluon-ft predict --json`` (in this process) for each photo: {file name: {class:
    probability}}."""
    from gluon_ft.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["predict", str(served_run), *map(str, photos), "--json", "--top-k", "2"])
    assert code == 0
    return {
        Path(r["source"]).name: {t["class"]: t["probability"] for t in r["top"]}
        for r in json.loads(out.getvalue())
    }


@pytest.fixture(scope="session")
def chromium() -> None:
    reason = ensure_chromium()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    """One headless Chromium for the page tests of this module (it takes a second to start)."""
    with chromium_session(tmp_path_factory.mktemp("profile")) as driver:
        yield driver


# ---------------------------------------------------------------- API


def test_health_names_the_run_and_its_limit(server, served_run):
    health = requests.get(server.url + "health", timeout=10).json()
    batches = health.pop("batches")  # what earlier requests made of it
    assert all(1 <= int(size) <= 16 and count >= 1 for size, count in batches.items()), batches
    assert health == {
        "status": "ok",
        "run_id": served_run.name,
        "model": "resnet18_v2",
        "tta": 1,
        "classes": ["cat", "dog"],
        "multi_label": False,
        "image_size": 32,
        "max_upload_bytes": int(CAP_MB * 2**20),
        "max_pixels": 24_000_000,
        "max_queue": 128,
        "max_wait_s": 2.0,
        "max_batch": 16,
        "batch_wait_ms": 5.0,
        "pending": 0,
        "dtype": "float32",
    }


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16: --dtype bfloat16 is refused")
def test_serve_in_bfloat16_answers_the_documented_json(
    served_run, photos, cli_predictions, tmp_path, subprocess_env
):
    log = tmp_path / "serve.log"
    with running_server(served_run, log, "--dtype", "bfloat16", env=subprocess_env) as server:
        assert requests.get(server.url + "health", timeout=10).json()["dtype"] == "bfloat16"
        for photo in photos:
            response = post_image(server.url, photo.read_bytes(), photo.name)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert set(answer) == {"run_id", "model", "tta", "filename", "classes", "probabilities"}
            assert answer["run_id"] == served_run.name and answer["filename"] == photo.name
            probabilities = answer["probabilities"]
            assert probabilities == sorted(probabilities, reverse=True)
            assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
            expected = cli_predictions[photo.name]  # float32, from gluon-ft predict
            assert answer["classes"][0] == max(expected, key=expected.get)
            np.testing.assert_allclose(
                probabilities, [expected[c] for c in answer["classes"]], atol=0.05
            )
    assert "serving in bfloat16" in log.read_text()


def test_serve_in_int8_answers_the_documented_json(served_run, photos, tmp_path, subprocess_env):
    log = tmp_path / "serve.log"
    flags = ("--dtype", "int8", "--calibration-images", "6")
    with running_server(served_run, log, *flags, env=subprocess_env) as server:
        assert requests.get(server.url + "health", timeout=10).json()["dtype"] == "int8"
        for photo in photos:
            response = post_image(server.url, photo.read_bytes(), photo.name)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert set(answer) == {"run_id", "model", "tta", "filename", "classes", "probabilities"}
            assert sorted(answer["classes"]) == ["cat", "dog"]
            assert sum(answer["probabilities"]) == pytest.approx(1.0, abs=1e-3)
    record = json.loads((served_run / "int8" / "calibration.json").read_text())
    assert record["calibration"]["images"] == 6
    said = log.read_text()
    assert "serving in int8" in said and "top-1 agreement with float32" in said, said


def test_predict_matches_the_predict_command(server, served_run, photos, cli_predictions):
    for photo in photos:
        response = post_image(server.url, photo.read_bytes(), photo.name)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["run_id"] == served_run.name and answer["model"] == "resnet18_v2"
        assert answer["filename"] == photo.name
        assert sorted(answer["classes"]) == ["cat", "dog"]
        probabilities = answer["probabilities"]
        assert probabilities == sorted(probabilities, reverse=True)
        expected = cli_predictions[photo.name]
        np.testing.assert_allclose(
            probabilities, [expected[name] for name in answer["classes"]], rtol=1e-5, atol=1e-6
        )
    # The photos are told apart: a server answering a constant would not match all four.
    assert len({round(p["cat"], 4) for p in cli_predictions.values()}) > 1


def test_top_k_keeps_the_most_probable_classes(server, photos):
    full = post_image(server.url, photos[0].read_bytes()).json()
    top1 = post_image(server.url, photos[0].read_bytes(), params={"top_k": "1"}).json()
    assert top1["classes"] == full["classes"][:1]
    assert top1["probabilities"] == full["probabilities"][:1]


def _chunked_body():
    yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
    for _ in range(20):
        yield b"\xff" * 10_000


_JPEG = encode(Image.new("RGB", (64, 64), (200, 40, 40)), "JPEG")
_PNG = encode(Image.new("RGB", (40, 40), (10, 120, 200)))
_BAD_REQUESTS = {
    # id: (requests.post keyword arguments, status, words in the error)
    "not-an-image": (
        {"files": {"image": ("notes.txt", b"not a photo\n" * 20)}},
        422,
        "not an image",
    ),
    "empty-file": ({"files": {"image": ("empty.jpg", b"")}}, 400, "empty"),
    "empty-body": ({"data": b""}, 400, "multipart/form-data"),
    "wrong-field-name": ({"files": {"photo": ("a.png", _PNG)}}, 400, "named 'image'"),
    "text-instead-of-file": ({"files": {"image": (None, "a.png")}}, 400, "not a file"),
    "two-files": (
        {"files": [("image", ("a.png", _PNG)), ("image", ("b.png", _PNG))]},
        400,
        "Too many files",
    ),
    "over-the-cap": ({"files": {"image": ("big.png", os.urandom(150_000))}}, 413, "limit"),
    "over-the-cap-chunked": (
        # No Content-Length: the limit must hold while the body streams in.
        {"data": _chunked_body, "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
        413,
        "limit",
    ),
    "malformed-multipart": (
        {
            "data": b"no boundary here",
            "headers": {"Content-Type": "multipart/form-data; boundary=b"},
        },
        400,
        "malformed",
    ),
    "truncated-jpeg": (
        {"files": {"image": ("cut.jpg", _JPEG[: len(_JPEG) // 2])}},
        422,
        "truncated",
    ),
    # Refused from the header, before a pixel is decoded: 81 MP would cost 630 MB.
    "over-the-pixel-cap": (
        {"files": {"image": ("scan.png", png_header_only(9_000, 9_000))}},
        413,
        "9000x9000 pixels (81.0 megapixels); this server decodes at most 24.0",
    ),
    "decompression-bomb": (
        {"files": {"image": ("bomb.png", png_header_only(30_000, 30_000))}},
        413,
        "--max-pixels",
    ),
    # Between PIL's limit and twice it, PIL itself only warns.
    "bomb-just-over-pil-limit": (
        {"files": {"image": ("bomb.png", png_header_only(10_000, 9_000))}},
        413,
        "--max-pixels",
    ),
    # Past twice PIL's limit, PIL refuses to open it at all: no scale is tried.
    "jpeg-bomb": (
        {"files": {"image": ("huge.jpg", jpeg_declaring(60_000, 60_000))}},
        413,
        "--max-pixels",
    ),
    "bad-top-k": ({"files": {"image": ("a.png", _PNG)}, "params": {"top_k": "0"}}, 400, "top_k"),
}


@pytest.mark.parametrize("case", list(_BAD_REQUESTS))
def test_bad_request_gets_its_4xx_and_the_server_lives(server, case):
    kwargs, status, words = _BAD_REQUESTS[case]
    # A streamed body is given as its generator function: a generator is used up once.
    kwargs = {key: value() if callable(value) else value for key, value in kwargs.items()}
    response = requests.post(server.url + "predict", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words.lower() in error.lower(), error
    server.assert_alive()
    assert post_image(server.url, _PNG).status_code == 200


def assert_json_error(response: requests.Response, status: int) -> str:
    """The response has ``status`` and the documented body ``{"error": "<reason>"}``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert list(body) == ["error"] and body["error"], body
    return body["error"]


def test_unknown_path_is_a_json_404(server):
    assert_json_error(requests.get(server.url + "nothing-here", timeout=10), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "predict", "POST"), ("POST", "", "GET"), ("DELETE", "health", "GET")],
)
def test_wrong_method_is_a_json_405_that_names_the_allowed_one(server, method, path, allowed):
    response = requests.request(method, server.url + path, timeout=10)
    assert_json_error(response, 405)
    assert allowed in response.headers["allow"]


def test_client_leaving_in_the_middle_of_an_upload_leaves_no_traceback(server):
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 90000\r\n\r\n"
    )
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode() + part + b"x" * 1000)
        time.sleep(0.5)  # the server is reading the body when the client goes
    server.assert_alive()
    assert post_image(server.url, _PNG).status_code == 200
    assert "Traceback" not in server.log.read_text()


# A page on another site can reach a server on 127.0.0.1 through a name it controls that it
# re-points at 127.0.0.1 (DNS rebinding): the browser then sends that name as the Host.
@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "localhost.evil.example", "10.0.0.8:{port}"]
)
def test_loopback_server_refuses_a_foreign_host_header(server, host):
    port = server.url.rsplit(":", 1)[1].strip("/")
    headers = {"Host": host.format(port=port)}
    for method, path in [("GET", ""), ("GET", "health"), ("POST", "predict")]:
        response = requests.request(method, server.url + path, headers=headers, timeout=10)
        error = assert_json_error(response, 403)
        assert host.format(port=port) in error and "--host" in error
    server.assert_alive()


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "localhost"]
)
def test_loopback_server_answers_loopback_names(server, host):
    headers = {"Host": host.format(port=server.url.rsplit(":", 1)[1].strip("/"))}
    assert requests.get(server.url + "health", headers=headers, timeout=10).status_code == 200
    assert post_image(server.url, _PNG, headers=headers).status_code == 200


# ---------------------------------------------------------------- the pixel cap


@pytest.fixture(scope="module")
def small_cap_server(served_run, tmp_path_factory, subprocess_env) -> Iterator[Server]:
    """A server that decodes at most 1 megapixel."""
    log = tmp_path_factory.mktemp("small-cap") / "serve.log"
    flags = ("--max-pixels", "1000000", "--max-upload-mb", "1")
    with running_server(served_run, log, *flags, env=subprocess_env) as s:
        yield s


def test_health_reports_the_pixel_cap(small_cap_server):
    health = requests.get(small_cap_server.url + "health", timeout=10).json()
    assert health["max_pixels"] == 1_000_000


def test_png_over_the_pixel_cap_is_refused(small_cap_server):
    photo = encode(gradient(1200, 1000))  # a real, decodable file: refused all the same
    error = assert_json_error(post_image(small_cap_server.url, photo, "wide.png"), 413)
    assert "wide.png is 1200x1000 pixels (1.2 megapixels)" in error
    assert "at most 1.0 megapixels" in error and "--max-pixels" in error
    assert post_image(small_cap_server.url, encode(gradient(1000, 1000))).status_code == 200


def test_jpeg_over_the_pixel_cap_is_decoded_at_a_reduced_scale(small_cap_server, served_run):
    from gluon_ft.deploy.predict import Predictor

    photo = encode_jpeg(gradient(1600, 1200))  # 1.9 MP: within the cap at half scale
    response = post_image(small_cap_server.url, photo, "camera.jpg")
    assert response.status_code == 200, response.text
    answer = response.json()
    served = dict(zip(answer["classes"], answer["probabilities"]))
    # The answer is the network's for the half-scale decode, which libjpeg does directly.
    draft = Image.open(io.BytesIO(photo))
    draft.draft("RGB", (800, 600))
    assert draft.size == (800, 600)
    [expected] = Predictor(served_run).predict_images([draft], top_k=2)
    for entry in expected["top"]:
        assert served[entry["class"]] == pytest.approx(entry["probability"], rel=1e-5, abs=1e-6)


def test_jpeg_over_the_pixel_cap_even_at_one_eighth_is_refused(small_cap_server):
    photo = jpeg_declaring(9000, 8000)  # 1125x1000 at 1/8 scale: still over 1 MP
    error = assert_json_error(post_image(small_cap_server.url, photo, "scan.jpg"), 413)
    assert "scan.jpg is 9000x8000 pixels (72.0 megapixels)" in error


def test_progressive_jpeg_over_the_pixel_cap_is_refused(small_cap_server):
    # libjpeg keeps a progressive file's whole coefficient buffer, whatever the scale.
    photo = encode_jpeg(gradient(1600, 1200), progressive=True)
    error = assert_json_error(post_image(small_cap_server.url, photo, "camera.jpg"), 413)
    assert "1600x1200" in error and "--max-pixels" in error


# ---------------------------------------------------------------- a stand-in network


class _GatedPredictor:
    """Stands in for a Predictor in an in-process server: each forward pass waits for
    ``gate``, and raises while ``broken`` is set."""

    classes = ["a", "b"]
    tta = 1
    multi_label = False

    def __init__(self, run_dir: Path):
        self.run = SimpleNamespace(
            path=run_dir, config={"model": "stand-in"}, image_size=8, inference={"dtype": "float32"}
        )
        self.gate = threading.Event()
        self.gate.set()
        self.broken = False
        self.passes = 0

    def prepare(self, item):
        return item

    def prepared_probabilities(self, arrays):
        self.passes += 1
        assert self.gate.wait(30), "the test never opened the gate"
        if self.broken:
            raise RuntimeError("the network failed")
        return [[0.75, 0.25] for _ in arrays]

    def answer(self, row, top_k):
        return {"ok": True, "top": [{"class": "a", "probability": row[0]}]}


@contextlib.contextmanager
def serving_in_process(app) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in a thread of this process; its URL."""
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(30)


def test_full_queue_answers_503_with_retry_after(tmp_path):
    from gluon_ft.deploy.serve import create_app

    predictor = _GatedPredictor(tmp_path)
    # One request a pass, so that passes count requests.
    with serving_in_process(create_app(predictor, max_queue=2, max_batch=1)) as url:
        predictor.gate.clear()
        warm_passes = predictor.passes
        with ThreadPoolExecutor(2) as pool:
            admitted = [pool.submit(post_image, url, _PNG) for _ in range(2)]
            deadline = time.monotonic() + 30
            while requests.get(url + "health", timeout=10).json()["pending"] < 2:
                assert time.monotonic() < deadline, "the two requests were never admitted"
                time.sleep(0.02)
            busy = post_image(url, _PNG)
            error = assert_json_error(busy, 503)
            assert busy.headers["retry-after"] == "1" and "--max-queue" in error
            predictor.gate.set()
            assert [f.result(timeout=30).status_code for f in admitted] == [200, 200]
        assert predictor.passes == warm_passes + 2  # the refused request never reached it
        assert post_image(url, _PNG).status_code == 200  # the queue drained


def test_a_request_that_would_wait_too_long_answers_503(tmp_path):
    from gluon_ft.deploy.serve import create_app

    predictor = _GatedPredictor(tmp_path)
    app = create_app(predictor, max_wait_s=0.5, max_batch=1)
    with serving_in_process(app) as url:
        assert post_image(url, _PNG).status_code == 200
        app.state.worker.seconds_per_pass = 0.6  # as if the network had slowed down
        assert post_image(url, _PNG).status_code == 200  # alone, it is served all the same
        predictor.gate.clear()
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(post_image, url, _PNG)
            deadline = time.monotonic() + 30
            while requests.get(url + "health", timeout=10).json()["pending"] < 1:
                assert time.monotonic() < deadline, "the first request was never admitted"
                time.sleep(0.02)
            app.state.worker.seconds_per_pass = 0.6
            busy = post_image(url, _PNG)  # one pass ahead of it, and its own: 1.2 s
            error = assert_json_error(busy, 503)
            assert busy.headers["retry-after"] == "1"
            assert "would wait about 1.2 s, more than 0.5 s" in error and "--max-wait-s" in error
            predictor.gate.set()
            assert ahead.result(timeout=30).status_code == 200


def test_server_failure_is_a_json_500_and_the_server_lives(tmp_path):
    from gluon_ft.deploy.serve import create_app

    predictor = _GatedPredictor(tmp_path)
    with serving_in_process(create_app(predictor)) as url:
        predictor.broken = True
        error = assert_json_error(post_image(url, _PNG), 500)
        assert "RuntimeError" in error
        predictor.broken = False
        assert post_image(url, _PNG).status_code == 200


class _DecodingPredictor(_GatedPredictor):
    """A stand-in that notes which threads decode, and cannot read ``b"junk"``."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self.decoding_threads = set()

    def prepare(self, item):
        from gluon_ft.data.decode import UnreadableImageError

        self.decoding_threads.add(threading.get_ident())
        if item == b"junk":
            raise UnreadableImageError("cannot identify image file")
        return item


def test_uploads_are_decoded_beside_the_network_and_a_bad_one_never_reaches_it(tmp_path):
    from gluon_ft.deploy.serve import create_app

    predictor = _DecodingPredictor(tmp_path)
    app = create_app(predictor, max_batch=1)
    with serving_in_process(app) as url:
        passes = predictor.passes
        assert "unusable" in assert_json_error(post_image(url, b"junk"), 422)
        assert predictor.passes == passes  # refused in the request's thread
        assert post_image(url, _PNG).status_code == 200
        assert predictor.passes == passes + 1
        assert app.state.worker._thread.ident not in predictor.decoding_threads


def test_server_on_all_interfaces_does_not_check_the_host_header(tmp_path):
    from gluon_ft.deploy.serve import create_app

    # Served on 127.0.0.1 all the same: the test opens no port to the network.
    with serving_in_process(create_app(_GatedPredictor(tmp_path), host="0.0.0.0")) as url:
        response = requests.get(url + "health", headers={"Host": "gpu-box.lan:8000"}, timeout=10)
        assert response.status_code == 200


# ---------------------------------------------------------------- concurrency


class _RecordingPredictor:
    """Stands in for a Predictor: notes which threads run the "network", and any overlap."""

    classes = ["a", "b"]
    run = SimpleNamespace(image_size=8)

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.threads = set()
        self.batch_sizes = []

    def prepare(self, item):
        return item

    def answer(self, row, top_k):
        return {"ok": True, "top": [{"class": "a", "echo": row}]}

    def prepared_probabilities(self, images):
        with self.lock:
            self.batch_sizes.append(len(images))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.threads.add(threading.get_ident())
        time.sleep(0.001)  # long enough for callers to pile up
        with self.lock:
            self.running -= 1
        return images  # each image's "row": its answer echoes it


def test_worker_runs_the_network_on_its_one_thread():
    from gluon_ft.deploy.serve import InferenceWorker

    predictor = _RecordingPredictor()
    worker = InferenceWorker(predictor)
    worker.start().result(timeout=10)

    def client(i: int) -> list[bool]:
        futures = [(f"{i}-{j}".encode(), worker.submit(f"{i}-{j}".encode())) for j in range(8)]
        return [f.result(timeout=30)["top"][0]["echo"] == sent for sent, f in futures]

    with ThreadPoolExecutor(8) as pool:
        answers = [ok for oks in pool.map(client, range(8)) for ok in oks]
    worker.close(timeout=10)
    assert len(answers) == 64 and all(answers)  # each caller got its own image's answer
    assert predictor.most_running == 1
    assert predictor.threads == {worker._thread.ident}


def test_worker_batches_requests_padded_to_a_few_shapes():
    from gluon_ft.deploy.serve import InferenceWorker, batch_shapes

    assert batch_shapes(16) == [1, 2, 4, 8, 16] and batch_shapes(6) == [1, 2, 4, 6]
    assert batch_shapes(1) == [1]
    predictor = _RecordingPredictor()
    worker = InferenceWorker(predictor, max_batch=6, batch_wait_s=0.05)
    worker.start().result(timeout=10)
    barrier = threading.Barrier(8)

    def client(i: int) -> list[bool]:
        barrier.wait(10)
        futures = [(f"{i}-{j}".encode(), worker.submit(f"{i}-{j}".encode())) for j in range(8)]
        return [f.result(timeout=30)["top"][0]["echo"] == sent for sent, f in futures]

    with ThreadPoolExecutor(8) as pool:
        answers = [ok for oks in pool.map(client, range(8)) for ok in oks]
    worker.close(timeout=10)
    assert len(answers) == 64 and all(answers)  # each caller got its own image's answer
    assert set(predictor.batch_sizes) <= {1, 2, 4, 6}  # the network saw these shapes only
    served = {int(size): count for size, count in worker.batch_counts().items()}
    assert sum(size * count for size, count in served.items()) == 64
    assert max(served) > 1, served  # requests shared passes
    assert predictor.most_running == 1


def _distinct_photos(count: int) -> list[bytes]:
    """``count`` small PNGs of different colours and noise."""
    rng = np.random.default_rng(11)
    blobs = []
    for _ in range(count):
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.integers(-60, 60, (40, 40, 3)), 0, 255)
        blobs.append(encode(Image.fromarray(pixels.astype(np.uint8))))
    return blobs


@pytest.fixture(scope="module")
def batching_server(served_run, tmp_path_factory, subprocess_env) -> Iterator[Server]:
    """A server that batches up to 8 requests, waiting 20 ms for them to gather.

    ``--max-wait-s 60``: on a shared machine a pass may take long enough that the default
    bound would refuse part of a 64-request burst, which is its job, not this test's subject.
    """
    log = tmp_path_factory.mktemp("batching") / "serve.log"
    flags = ("--max-batch", "8", "--batch-wait-ms", "20", "--max-wait-s", "60")
    with running_server(served_run, log, *flags, env=subprocess_env) as s:
        yield s


def test_batched_requests_get_the_answers_they_get_alone(batching_server):
    server = batching_server
    blobs = _distinct_photos(8)
    alone = [post_image(server.url, blob).json() for blob in blobs]  # one at a time
    assert len({round(answer["probabilities"][0], 4) for answer in alone}) > 1
    before = requests.get(server.url + "health", timeout=10).json()["batches"]
    for order_seed in (0, 1):  # two arrival orders
        order = np.random.default_rng(order_seed).permutation(np.arange(64) % len(blobs))
        barrier = threading.Barrier(len(order))

        def client(which: int, barrier=barrier):
            barrier.wait(30)
            return post_image(server.url, blobs[which])

        with ThreadPoolExecutor(len(order)) as pool:
            responses = list(pool.map(client, order))
        assert [r.status_code for r in responses] == [200] * len(order), [
            r.text for r in responses if r.status_code != 200
        ][:3]
        for which, response in zip(order, responses):
            answer, expected = response.json(), alone[which]
            assert answer["classes"] == expected["classes"]  # the same top-1 and ranking
            np.testing.assert_allclose(
                answer["probabilities"], expected["probabilities"], rtol=0, atol=1e-5
            )
    after = requests.get(server.url + "health", timeout=10).json()["batches"]
    shared = {s: n - before.get(s, 0) for s, n in after.items() if int(s) > 1}
    assert any(shared.values()), (before, after)  # the requests did share forward passes
    server.assert_alive()


def test_concurrent_clients_all_get_correct_answers(server, photos, capsys):
    blobs = [photo.read_bytes() for photo in photos]
    sequential = [post_image(server.url, blob).json() for blob in blobs]

    def client(index: int) -> list[tuple[int, int, dict, float]]:
        results = []
        with requests.Session() as session:
            for j in range(REQUESTS_PER_CLIENT):
                which = (index + j) % len(blobs)
                start = time.perf_counter()
                response = post_image(server.url, blobs[which], session=session)
                seconds = time.perf_counter() - start
                results.append((which, response.status_code, response.json(), seconds))
        return results

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
    wall = time.perf_counter() - started

    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    assert [status for _, status, _, _ in results] == [200] * len(results)
    for which, _, answer, _ in results:
        assert answer["classes"] == sequential[which]["classes"]
        np.testing.assert_allclose(
            answer["probabilities"], sequential[which]["probabilities"], rtol=1e-5, atol=1e-6
        )
    server.assert_alive()
    latency_ms = 1000 * np.array([seconds for *_, seconds in results])
    p50, p95 = np.percentile(latency_ms, [50, 95])
    with capsys.disabled():  # shown without -s: the numbers are the point
        print(
            f"\nserve load: {CLIENTS} clients x {REQUESTS_PER_CLIENT} requests, all 200 and "
            f"correct; latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; "
            f"{len(results) / wall:.1f} requests/s"
        )


# ---------------------------------------------------------------- the page


def test_page_classifies_an_upload_in_chromium(server, photos, cli_predictions, browser, tmp_path):
    photo = photos[0]
    expected = cli_predictions[photo.name]
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a photo\n")
    too_large = tmp_path / "large.jpg"
    too_large.write_bytes(b"\xff" * 150_000)
    shown = classify_in_browser(browser, server.url, photo, tmp_path / "page.png")
    refused = classify_in_browser(browser, server.url, not_an_image)
    kept_back = classify_in_browser(browser, server.url, too_large)

    assert shown["state"] == "done", shown["error"]
    assert shown["top_class"] == max(expected, key=expected.get)
    assert [name for name, _ in shown["rows"]] == sorted(expected, key=expected.get)[::-1]
    assert shown["rows"][0][1] == f"{100 * max(expected.values()):.1f}%"
    assert shown["preview_width"] == 48  # the photo itself is on the page
    assert Image.open(tmp_path / "page.png").size[0] > 0
    assert refused["state"] == "error" and "not an image" in refused["error"]
    # The page checks the server's limit (from /health) before sending the file at all.
    assert kept_back["state"] == "error" and "accepts up to 0.1 MiB" in kept_back["error"]


def test_page_draws_a_multilabel_answer_in_chromium(server, browser):
    """The multi-label view as Chromium lays it out: a multi-label answer and thresholds handed
    to the page's own render() (the test server's run is single-label; the JSON the page gets
    from a multi-label server is checked in test_multilabel_train.py)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    WebDriverWait(browser, 30).until(lambda d: "run" in d.find_element(By.ID, "model").text)
    answer = {"filename": "lunch.jpg", "classes": ["wine", "cheese", "bread"]}
    answer.update(probabilities=[0.9, 0.5, 0.2], labels=["cheese", "wine"])
    browser.execute_script(
        "thresholds = arguments[1]; render(arguments[0]); document.body.dataset.state = 'done';",
        answer,
        {"wine": 0.5, "cheese": 0.25, "bread": 0.75},
    )
    chips = browser.find_elements(By.CSS_SELECTOR, "#chips .chip")
    assert [chip.text for chip in chips] == ["cheese", "wine"]
    assert all(chip.is_displayed() for chip in chips)
    assert not browser.find_element(By.ID, "verdict").is_displayed()
    assert "need not add up" in browser.find_element(By.ID, "note").text
    drawn = browser.execute_script(
        "return [...document.querySelectorAll('#bars li')].map((row) => {"
        "  const track = row.querySelector('.track').getBoundingClientRect();"
        "  const tick = row.querySelector('.tick').getBoundingClientRect();"
        "  const fill = row.querySelector('.fill');"
        "  return [(tick.left + tick.width / 2 - track.left) / track.width,"
        "          fill.getBoundingClientRect().width / track.width,"
        "          getComputedStyle(fill).backgroundColor]; });"
    )
    ticks, fills, colours = zip(*drawn)
    assert ticks == pytest.approx([0.5, 0.25, 0.75], abs=0.02)
    assert fills == pytest.approx([0.9, 0.5, 0.2], abs=0.02)
    assert colours[0] == colours[1] != colours[2]  # the predicted two in the accent colour


NODE = shutil.which("node")
PAGE = REPO / "gluon_ft" / "deploy" / "static" / "index.html"


def page_shows(health: dict, answer: dict) -> dict:
    """What the page shows for ``answer`` (a /predict JSON) once it has read ``health``: its
    script run by Node on a fake DOM (tests/page_harness.js), no browser, no server."""
    harness = Path(__file__).with_name("page_harness.js")
    done = subprocess.run(
        [NODE, str(harness), str(PAGE)],
        input=json.dumps({"health": health, "answer": answer}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(NODE is None, reason="node is not installed (the page's script needs it)")
def test_page_shows_a_multilabel_set_and_each_class_own_probability():
    classes = ["bread", "cheese", "salad", "soup", "tea", "wine"]
    thresholds = {"bread": 0.5, "cheese": 0.7, "salad": 0.5, "soup": 0.5, "tea": 0.1, "wine": 0.5}
    health = {"model": "resnet18_v2", "run_id": "lunch", "classes": classes, "multi_label": True}
    health.update(thresholds=thresholds, max_upload_bytes=2**20)
    answer = {"run_id": "lunch", "model": "resnet18_v2", "tta": 1, "filename": "table.jpg"}
    answer["classes"] = ["bread", "cheese", "salad", "soup", "wine", "tea"]  # most probable first
    answer["probabilities"] = [0.91, 0.62, 0.40, 0.33, 0.2, 0.12]
    shown = page_shows(health, {**answer, "labels": ["bread", "tea"]})
    assert "multi-label" in shown["model"]
    assert shown["chips"] == ["bread", "tea"] and shown["verdict_hidden"]
    # The five most probable, and tea, sixth but predicted (0.12 is over its 0.1).
    rows = [(row["name"], row["pct"], row["chosen"], row["tick"]) for row in shown["rows"]]
    assert rows == [
        ("bread", "91.0%", True, "50.0%"),
        ("cheese", "62.0%", False, "70.0%"),
        ("salad", "40.0%", False, "50.0%"),
        ("soup", "33.0%", False, "50.0%"),
        ("wine", "20.0%", False, "50.0%"),
        ("tea", "12.0%", True, "10.0%"),
    ]
    assert "need not add up to 100%" in shown["note"] and shown["status"] == "Photo: table.jpg"
    assert page_shows(health, {**answer, "labels": []})["chips"] == ["no label"]
    # A single-label run's answer (no labels) is shown as before: the top class and 5 bars.
    single = page_shows({**health, "multi_label": False, "thresholds": None}, answer)
    assert (single["top_class"], single["top_prob"], single["chips"]) == ("bread", "91.0%", [])
    assert not single["verdict_hidden"]
    assert [row["name"] for row in single["rows"]] == answer["classes"][:5]
    assert not any(row["chosen"] or row["tick"] for row in single["rows"]) and not single["note"]
    assert "multi-label" not in single["model"]


# ---------------------------------------------------------------- command line


def test_serve_binds_loopback_by_default_and_says_what_all_interfaces_expose(capsys):
    from gluon_ft.cli import build_parser

    args = build_parser().parse_args(["serve", "runs/x"])
    assert (args.host, args.port, args.max_upload_mb) == ("127.0.0.1", 8000, 10.0)
    assert (args.max_pixels, args.max_queue) == (24_000_000, 128)
    assert (args.max_wait_s, args.max_batch, args.batch_wait_ms) == (2.0, 16, 5.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "0.0.0.0 listens on every network interface" in help_text
    assert "without a password" in help_text


def test_serve_takes_int8_and_its_calibration_size():
    from gluon_ft.cli import build_parser

    args = build_parser().parse_args(["serve", "runs/x", "--dtype", "int8"])
    assert (args.dtype, args.calibration_images) == ("int8", 200)
    args = build_parser().parse_args(["serve", "runs/x", "--calibration-images", "50"])
    assert args.calibration_images == 50


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--max-pixels", "0"], "must be at least 1"),
        (["--max-pixels", "200000000"], "must be at most 89478485"),
        (["--max-queue", "0"], "must be at least 1"),
        (["--max-batch", "0"], "must be at least 1"),
        (["--max-wait-s", "0"], "must be a positive number"),
        (["--batch-wait-ms", "-1"], "must be between 0 and 1000"),
    ],
    ids=["no-pixels", "over-pil-limit", "no-queue", "no-batch", "no-wait", "negative-batch-wait"],
)
def test_serve_refuses_impossible_limits(flags, reason, capsys):
    from gluon_ft.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "runs/x", *flags])
    error = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flags[0]}: {reason}" in error, error


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path, cli):
    result = cli("serve", tmp_path, "--port", _free_port())
    assert result.returncode == 2, result.stderr
    assert "gluon-ft: error:" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- make screenshot


def write_screenshot(out: Path) -> Path:
    """Train a small run, serve it, and photograph the page classifying a photo.

    With ``../shared`` present: fine-tuned from the food model on real hot-dog photos (64 px),
    showing the hot dog test photo the run is most sure of. Otherwise: a generated two-class
    folder trained from scratch.
    """
    reason = ensure_chromium()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="gluon-ft-screenshot-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MXNET_HOME": str(tmp / "mxnet-home")}
        if HOTDOG_SMALL.is_dir() and FOOD_MODEL.is_file():
            data = HOTDOG_SMALL
            flags = ["--pretrained", str(FOOD_MODEL), "--image-size", "64", "--epochs", "5"]
            candidates = sorted((HOTDOG_SMALL / "test" / "hotdog").glob("*.jpg"))
        else:
            data = write_image_folder(tmp / "data", ("hotdog", "not-hotdog"), n_train=16, size=64)
            flags = ["--pretrained", "none", "--image-size", "32", "--epochs", "2"]
            candidates = sorted((data / "test" / "hotdog").glob("*.png"))
        run = train_run(data, tmp / "hotdog-resnet18_v2", *flags, "--batch-size", "32", env=env)
        with running_server(run, tmp / "serve.log", env=env) as server:

            def confidence(photo: Path) -> float:
                answer = post_image(server.url, photo.read_bytes()).json()
                return dict(zip(answer["classes"], answer["probabilities"]))["hotdog"]

            photo = max(candidates, key=confidence)
            with chromium_session(tmp / "profile") as driver:
                shown = classify_in_browser(driver, server.url, photo, out)
    if shown["state"] != "done":
        raise RuntimeError(f"the page showed an error: {shown['error']}")
    return out


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="Write the README screenshot of gluon-ft serve.")
    cli.add_argument("--screenshot", type=Path, default=REPO / "docs" / "screenshot.png")
    path = write_screenshot(cli.parse_args().screenshot)
    print(f"wrote {path}")
