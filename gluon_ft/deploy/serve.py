"""Serve a finished run: a web page to try it on photos, and a JSON API.

::

    GET  /          the page (``gluon_ft/deploy/static/index.html``): pick or drop a photo
    POST /predict   multipart form, the file in the field ``image`` -> JSON
                    {"run_id", "model", "tta", "filename", "classes", "probabilities"}
                    (every class, most probable first; ``?top_k=N`` keeps the first N;
                    ``tta``: the views averaged per image, ``serve --tta N``); a
                    multi-label run adds "labels" (the predicted set), and its
                    probabilities are each class's own (sigmoid), not a softmax
    GET  /health    {"status": "ok", "run_id", "model", "tta", "classes", "multi_label",
                    "image_size", "max_upload_bytes", "max_pixels", "max_queue",
                    "max_wait_s", "max_batch", "batch_wait_ms", "pending", "dtype",
                    "batches"} (``pending``: the /predict requests in progress now;
                    ``dtype``: the network's form, ``--dtype``; ``batches``: {"<requests
                    in a forward pass>": passes} since the start); a multi-label run adds
                    "thresholds" ({class: threshold}), which the page draws

A Gluon block must not run forward from two threads at once (a hybridized block with
``static_alloc`` reuses its buffers), so one :class:`InferenceWorker` thread owns the network
and every request hands its image to it through a queue. Requests that arrive within
:data:`DEFAULT_BATCH_WAIT_MS` of each other go through the network together, up to
:data:`DEFAULT_MAX_BATCH` in one pass.

Hostile input is bounded before it costs memory. Uploads are capped
(:data:`DEFAULT_MAX_UPLOAD_BYTES`) before they are buffered; an image's size is read from its
header, and one over :data:`DEFAULT_MAX_PIXELS` is refused before a pixel is decoded (a
baseline JPEG is decoded at 1/2, 1/4 or 1/8 scale instead when that fits); a request that
would wait more than :data:`DEFAULT_MAX_WAIT_S` for its answer is refused, and at most
:data:`DEFAULT_MAX_QUEUE` requests are in progress at once. The rest is decoded by the
training code's safe loader (:func:`gluon_ft.data.decode.load_image`). Bound to a loopback address,
the server answers only requests addressed to a loopback name, so that a web page cannot reach
it through a name of its own that it re-points at 127.0.0.1 (DNS rebinding).

Every error is answered with a JSON body ``{"error": "<reason>"}``: 400 for a malformed request
(not a multipart form, no ``image`` file field, an empty file), 403 for a Host header naming
another machine, 404 and 405 for a wrong path or method, 413 for a body or an image over the
caps, 422 for a file that is not a usable image (not an image, truncated), 500 for a failure
of the server itself, and 503 (with ``Retry-After``) while the queue is full (by count or by
the expected wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import mxnet as mx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from gluon_ft.data.decode import UnreadableImageError, unchecked_size
from gluon_ft.deploy.int8 import DEFAULT_CALIBRATION_IMAGES
from gluon_ft.deploy.predict import Predictor

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
# Decoding and converting to RGB cost the server (VmHWM) 8 bytes a pixel for an RGB PNG and
# 20 for an RGBA one: 190 and 470 MB at 24 MP, against 630 MB for an 81 MP PNG of 0.2 MB.
# 24 MP takes a 6000x4000 camera photo or a 5K frame whole, and JPEGs (phone and camera
# photos) up to 64 times larger are decoded at a reduced scale.
DEFAULT_MAX_PIXELS = 24_000_000
# Requests wait for a batch to fill for at most this long: a few milliseconds, against the tens
# a forward pass takes, buy a pass shared by every request that arrives meanwhile.
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_BATCH = 16
# The queue is bounded by the time a new request would wait (estimated from the passes ahead
# of it), so that a slow network refuses early and a fast one takes a burst.
DEFAULT_MAX_WAIT_S = 2.0
# And by a count, for memory: each request in progress may hold an upload of up to 10 MiB, so
# 128 of them hold 1.25 GiB at most (photos are a few MB).
DEFAULT_MAX_QUEUE = 128
RETRY_AFTER_SECONDS = 1
IMAGE_FIELD = "image"
# The scales libjpeg can decode a JPEG at directly, without the full-size image in memory.
_JPEG_SCALES = (2, 4, 8)


@dataclass
class _Job:
    image: np.ndarray  # what Predictor.prepare made of the upload
    future: Future = field(default_factory=Future)


def batch_shapes(max_batch: int) -> list[int]:
    """The batch sizes the network runs: powers of two below ``max_batch``, and ``max_batch``."""
    shapes = [1 << power for power in range(max_batch.bit_length()) if 1 << power < max_batch]
    return [*shapes, max_batch]


class InferenceWorker:
    """The one thread that runs a :class:`~gluon_ft.deploy.predict.Predictor`'s network.

    :meth:`submit` may be called from any thread, with an image that
    :meth:`~gluon_ft.deploy.predict.Predictor.prepare` made ready there: decoding in the
    request's thread overlaps it with the network's passes (on this thread, decoding would
    queue behind them). The jobs wait in a queue. The worker takes
    the first waiting job, waits up to ``batch_wait_s`` for others (up to ``max_batch`` in
    all), and classifies them in one forward pass. A hybridized block pays for every new
    batch shape (measured at 32 px: 0.2 to 0.7 s on its first pass, against 5 to 30 ms for a
    shape it has seen), so a batch is padded with blank images to the next of
    :func:`batch_shapes`, and :meth:`start` runs each of those shapes once before the first
    request. In predict mode BatchNorm uses its running statistics, so an image's answer does
    not depend on its neighbours in the batch.

    Parameters
    ----------
    predictor : Predictor
        The loaded run; its ``batch_size`` must be at least ``max_batch``. After
        :meth:`start`, nothing else may call it.
    max_batch : int
        Most images in one forward pass.
    batch_wait_s : float
        How long the first job of a batch waits for others.
    """

    def __init__(
        self,
        predictor: Predictor,
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_MS / 1000,
    ):
        self.predictor = predictor
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        # batches_served[n]: passes that classified n requests (one list slot per size, so
        # that /health can copy it while this thread counts).
        self.batches_served = [0] * (max_batch + 1)
        self.seconds_per_pass = 0.0  # recent passes, smoothed; for the admission estimate
        size = predictor.run.image_size
        # What pads a batch to its shape.
        self._blank = predictor.prepare(Image.new("RGB", (size, size)))
        self._ready: Future = Future()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="gluon-ft-inference", daemon=True)

    def start(self) -> Future:
        """Start the thread; the returned future is done once every batch shape has run.

        The first pass of a hybridized network at a batch shape builds its graph and takes far
        longer than the others, so it happens here rather than in a user's request.
        """
        self._thread.start()
        return self._ready

    def submit(self, image: np.ndarray) -> Future:
        """Queue an image that ``Predictor.prepare`` made ready; the future's result is
        ``Predictor.answer``'s entry for it, with every class: ``{"ok": True, "top": [...]}``."""
        job = _Job(image)
        self._jobs.put(job)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def batch_counts(self) -> dict[str, int]:
        """``{"<requests in a pass>": passes}`` since the start, sizes that occurred only."""
        return {str(size): count for size, count in enumerate(self.batches_served) if count}

    def _warm_up(self) -> None:
        blank = self._blank
        for shape in batch_shapes(self.max_batch):
            self.predictor.prepared_probabilities([blank] * shape)
        # The largest shape once more, now built: what a pass costs under load.
        started = time.perf_counter()
        self.predictor.prepared_probabilities([blank] * self.max_batch)
        self.seconds_per_pass = time.perf_counter() - started

    def _loop(self) -> None:
        try:
            self._warm_up()
        except Exception as err:  # noqa: BLE001  the server does not start, and says why
            self._ready.set_exception(err)
            return
        self._ready.set_result(None)
        running = True
        while running:
            jobs, running = self._next_batch()
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if jobs:
                self._classify(jobs)

    def _next_batch(self) -> tuple[list[_Job], bool]:
        """The jobs of the next pass (waiting for the first), and whether to go on after it."""
        first = self._jobs.get()
        if first is None:
            return [], False
        jobs = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < self.max_batch:
            try:
                job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, False
            jobs.append(job)
        return jobs, True

    def _classify(self, jobs: list[_Job]) -> None:
        shape = next(s for s in batch_shapes(self.max_batch) if s >= len(jobs))
        images = [job.image for job in jobs] + [self._blank] * (shape - len(jobs))
        every_class = len(self.predictor.classes)
        started = time.perf_counter()
        try:
            probs = self.predictor.prepared_probabilities(images)
            results = [self.predictor.answer(row, every_class) for row in probs[: len(jobs)]]
        except Exception as err:  # noqa: BLE001  the requests get a 500, the server lives
            for job in jobs:
                job.future.set_exception(err)
            return
        seconds = time.perf_counter() - started
        self.seconds_per_pass = 0.8 * self.seconds_per_pass + 0.2 * seconds
        self.batches_served[len(jobs)] += 1
        for job, result in zip(jobs, results):
            job.future.set_result(result)


def _prepare_upload(predictor: Predictor, data: bytes, filename: str, max_pixels: int):
    """An upload decoded within the pixel cap and made ready for the network, in the
    request's thread; 422 if it cannot be decoded."""
    try:
        return predictor.prepare(fit_pixel_cap(data, filename, max_pixels))
    except UnreadableImageError as err:
        raise HTTPException(422, f"{filename or 'the upload'} is unusable: {err}") from None


def fit_pixel_cap(data: bytes, filename: str, max_pixels: int) -> bytes | Image.Image:
    """What to decode of an upload, judged from its image header alone.

    Parameters
    ----------
    data : bytes
        The uploaded file.
    filename : str
        Its name, for the error message.
    max_pixels : int
        The most pixels the server decodes at once.

    Returns
    -------
    bytes or PIL.Image.Image
        ``data`` itself when the image is within the cap (or is no image PIL recognizes: the
        decoder's error says why), or, for a baseline JPEG over it, the image opened to
        decode at the least of 1/2, 1/4 or 1/8 scale that fits.

    Raises
    ------
    HTTPException
        413: the image has more pixels than the cap and cannot be decoded smaller.
    """
    try:
        # PIL warns past its own limit (this cap is lower) and raises past twice it. The
        # warning is left alone: filters changed here would race the decoder's on its thread.
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _ImageTooLarge(filename, unchecked_size(io.BytesIO(data)), max_pixels) from None
    except Exception:  # noqa: BLE001  not an image, or a broken header: the decoder explains
        return data
    width, height = img.size
    if width * height <= max_pixels:
        return data
    scale = _jpeg_scale(img, max_pixels)
    if scale is not None:
        img.draft(img.mode, (max(1, width // scale), max(1, height // scale)))
        if img.width * img.height <= max_pixels:
            return img
    raise _ImageTooLarge(filename, (width, height), max_pixels)


def _jpeg_scale(img: Image.Image, max_pixels: int) -> int | None:
    """The least reduction that libjpeg decodes ``img`` at within ``max_pixels``, if any."""
    # A progressive JPEG keeps every DCT coefficient in memory whatever the output scale
    # (8000x6000: 141 MB at 1/8 scale, where a baseline one takes 4 MB).
    if img.format not in ("JPEG", "MPO") or img.info.get("progressive"):
        return None
    for scale in _JPEG_SCALES:
        if math.ceil(img.width / scale) * math.ceil(img.height / scale) <= max_pixels:
            return scale
    return None


class _ImageTooLarge(HTTPException):
    def __init__(self, filename: str, size: tuple[int, int] | None, max_pixels: int):
        name = filename or "the upload"
        if size is None:
            what = f"{name} has more than {Image.MAX_IMAGE_PIXELS} pixels"
        else:
            what = (
                f"{name} is {size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.1f} megapixels)"
            )
        super().__init__(
            413,
            f"{what}; this server decodes at most {max_pixels / 1e6:.1f} megapixels "
            "(gluon-ft serve --max-pixels): scale the image down and send it again",
        )


def is_loopback_name(host: str) -> bool:
    """Whether ``host`` (a Host header or a bind address, with or without a port) names this
    machine's loopback interface: ``localhost``, ``127.x.x.x`` or ``::1``."""
    if host.startswith("["):  # "[::1]:8000"
        name = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # "localhost:8000"; more colons make a bare IPv6 address
        name = host.split(":", 1)[0]
    else:
        name = host
    name = name.rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _LoopbackHostsOnly:
    """ASGI middleware for a server bound to loopback: a request whose ``Host`` header names
    another machine gets 403.

    A web page on another site can otherwise reach the server: it points a name of its own
    at 127.0.0.1 (DNS rebinding), and the browser sends that name as the Host.
    """

    def __init__(self, app, bound_to: str):
        self.app = app
        self.bound_to = bound_to

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host and not is_loopback_name(host):
                message = (
                    f"this server listens on {self.bound_to} and answers requests addressed to "
                    f"localhost, 127.0.0.1 or [::1] only; the Host header {host!r} names another "
                    "machine, as a web page using DNS rebinding would. To serve it under other "
                    "names, start it with --host"
                )
                await _error_response(403, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Admission:
    """Counts the /predict requests in progress (reading their upload, waiting for the
    worker, or being classified) and refuses one with 503 when ``limit`` are in progress
    already, or when others are and it would wait more than ``max_wait_s``: the passes ahead
    of it (the requests in progress, ``worker.max_batch`` a pass) at
    ``worker.seconds_per_pass`` each.

    Only the event loop's thread touches the count, so it needs no lock.
    """

    def __init__(self, limit: int, max_wait_s: float, worker: InferenceWorker):
        self.limit = limit
        self.max_wait_s = max_wait_s
        self.worker = worker
        self.pending = 0

    def expected_wait_s(self) -> float:
        """How long a request arriving now would wait for its answer, roughly."""
        passes = self.pending // self.worker.max_batch + 1
        return self.worker.batch_wait_s + passes * self.worker.seconds_per_pass

    @contextlib.contextmanager
    def slot(self):
        if self.pending >= self.limit:
            raise _busy(f"{self.limit} requests are in progress (gluon-ft serve --max-queue)")
        wait = self.expected_wait_s()
        if self.pending and wait > self.max_wait_s:  # a request alone is always served
            raise _busy(
                f"a request now would wait about {wait:.1f} s, more than {self.max_wait_s:g} s "
                "(gluon-ft serve --max-wait-s)"
            )
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1


def _busy(why: str) -> HTTPException:
    return HTTPException(
        503,
        f"the server is busy: {why}; try again in {RETRY_AFTER_SECONDS} s",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class _UploadTooLarge(HTTPException):
    def __init__(self, max_bytes: int):
        super().__init__(
            413,
            f"the upload is larger than the server's limit of {_human_bytes(max_bytes)} "
            "(gluon-ft serve --max-upload-mb)",
        )


def _human_bytes(count: int) -> str:
    return f"{count / 2**20:.3g} MiB" if count >= 2**20 else f"{count / 2**10:.3g} KiB"


class _UploadLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused before it is buffered.

    A declared ``Content-Length`` over the limit is answered at once; a body without one
    (chunked) is counted as it arrives, and reading stops at the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = _UploadTooLarge(self.max_bytes)
            await _error_response(error.status_code, error.detail)(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # An HTTPException, so the app's handler answers it wherever the body is read.
                raise _UploadTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def _error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _bad_request(message: str) -> HTTPException:
    return HTTPException(400, message)


async def _read_upload(request: Request) -> tuple[str, bytes]:
    """The ``image`` file of a multipart form: its name and its bytes, or a 400."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise _bad_request(
            f"POST /predict takes a multipart/form-data body with the photo in a file field "
            f"named {IMAGE_FIELD!r} (got content type {content_type or 'none'!r}), e.g. "
            f"curl -F {IMAGE_FIELD}=@photo.jpg http://HOST:PORT/predict"
        )
    try:
        # One file per request; a few text fields are tolerated and ignored.
        form = await request.form(max_files=1, max_fields=16)
    except ValueError as err:  # python-multipart's parse errors, which Starlette lets through
        raise _bad_request(f"the multipart/form-data body is malformed ({err})") from None
    except ClientDisconnect:  # nobody reads the answer, but the log stays clean
        raise _bad_request("the client left before the upload was complete") from None
    try:
        upload = form.get(IMAGE_FIELD)
        if not isinstance(upload, UploadFile):
            found = ", ".join(repr(name) for name in form) or "none"
            what = "a text field, not a file" if upload is not None else "missing"
            raise _bad_request(
                f"the form field {IMAGE_FIELD!r} is {what}: send the photo as a file in a field "
                f"named {IMAGE_FIELD!r} (fields received: {found})"
            )
        data = await upload.read()
    finally:
        await form.close()
    if not data:
        raise _bad_request("the uploaded file is empty (0 bytes)")
    return upload.filename or "", data


def _parse_top_k(request: Request, count: int) -> int:
    text = request.query_params.get("top_k")
    if text is None:
        return count
    if not text.isdigit() or int(text) < 1:
        raise _bad_request(f"top_k must be a whole number of at least 1, got {text!r}")
    return min(int(text), count)


def _answer_errors_as_json(app: FastAPI) -> None:
    """Every error the application answers, 404 to 500, gets the body ``{"error": ...}``."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        # The headers carry Allow for a 405 and Retry-After for a 503.
        return _error_response(err.status_code, str(err.detail), err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(422, "; ".join(e.get("msg", str(e)) for e in err.errors()))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        # Starlette still hands the exception on, so the log keeps its traceback.
        message = f"the server failed on this request ({type(err).__name__}); its log says why"
        return _error_response(500, message)


def create_app(
    predictor: Predictor,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_queue: int = DEFAULT_MAX_QUEUE,
    host: str = DEFAULT_HOST,
    max_batch: int = DEFAULT_MAX_BATCH,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    max_wait_s: float = DEFAULT_MAX_WAIT_S,
) -> FastAPI:
    """The web application around a loaded run; its network runs only on its worker thread.

    Parameters
    ----------
    predictor : Predictor
        The run to serve, with a ``batch_size`` of at least ``max_batch``. The application
        owns it from now on.
    max_upload_bytes : int
        Largest request body accepted; larger ones get 413.
    max_pixels : int
        Largest image decoded; larger ones get 413 (see :func:`fit_pixel_cap`).
    max_queue : int
        Most /predict requests in progress at once; more get 503 with ``Retry-After``.
    host : str
        The address the server listens on. On a loopback one, requests must name a loopback
        host too.
    max_batch, batch_wait_ms : int, float
        Most requests in one forward pass, and how long the first waits for the others
        (:class:`InferenceWorker`).
    max_wait_s : float
        A request that would wait longer than this for its answer gets 503 with
        ``Retry-After``.
    """
    identity = _run_identity(predictor)
    worker = InferenceWorker(predictor, max_batch, batch_wait_ms / 1000)
    admission = _Admission(max_queue, max_wait_s, worker)
    app = _application(worker, host, max_upload_bytes)
    limits = {
        "max_upload_bytes": max_upload_bytes,
        "max_pixels": max_pixels,
        "max_queue": max_queue,
        "max_wait_s": max_wait_s,
        "max_batch": max_batch,
        "batch_wait_ms": batch_wait_ms,
    }
    _add_health_route(app, predictor, identity, limits, admission)
    _add_predict_route(app, predictor, identity, worker, admission, max_pixels)
    return app


def _application(worker: InferenceWorker, host: str, max_upload_bytes: int) -> FastAPI:
    """The FastAPI application with its lifespan, middleware, error handlers and page."""
    page = (
        resources.files("gluon_ft.deploy").joinpath("static/index.html").read_text(encoding="utf-8")
    )
    app = FastAPI(
        title="gluon-ft serve",
        lifespan=_warm_up_then_close(worker),
        docs_url=None,  # the docs pages load their scripts from a CDN
        redoc_url=None,
    )
    app.state.worker = worker
    app.add_middleware(_UploadLimit, max_bytes=max_upload_bytes)
    if is_loopback_name(host):  # added last, so it runs first
        app.add_middleware(_LoopbackHostsOnly, bound_to=host)
    _answer_errors_as_json(app)
    _add_page_route(app, page)
    return app


def _run_identity(predictor: Predictor) -> dict:
    """The fields that name the served run in every answer of /health and /predict."""
    run = predictor.run
    return {
        "run_id": run.path.resolve().name,
        "model": run.config["model"],
        "tta": predictor.tta,  # the views averaged per image (1: none)
    }


def _warm_up_then_close(worker: InferenceWorker):
    """The application's lifespan: start ``worker`` and wait for its first pass; close it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # The server accepts connections only once the network has run once.
        await asyncio.wrap_future(worker.start())
        yield
        worker.close(timeout=30)

    return lifespan


def _add_page_route(app: FastAPI, page: str) -> None:
    """``GET /``: the page to try the run on a photo."""

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)


def _add_health_route(
    app: FastAPI, predictor: Predictor, identity: dict, limits: dict, admission: _Admission
) -> None:
    """``GET /health``: the run, its limits, the /predict requests in progress and the
    batches served."""
    run = predictor.run
    kind = {"multi_label": predictor.multi_label}
    if predictor.multi_label:
        chosen = zip(predictor.classes, predictor.thresholds)
        kind["thresholds"] = {name: float(threshold) for name, threshold in chosen}

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            **identity,
            "classes": predictor.classes,
            **kind,
            "image_size": run.image_size,
            **limits,
            "pending": admission.pending,
            "dtype": run.inference["dtype"],
            "batches": admission.worker.batch_counts(),
        }


def _add_predict_route(
    app: FastAPI,
    predictor: Predictor,
    identity: dict,
    worker: InferenceWorker,
    admission: _Admission,
    max_pixels: int,
) -> None:
    """``POST /predict``: the uploaded photo's classes, classified on ``worker``'s thread."""

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        with admission.slot():
            top_k = _parse_top_k(request, len(predictor.classes))
            filename, data = await _read_upload(request)
            image = await asyncio.to_thread(_prepare_upload, predictor, data, filename, max_pixels)
            result = await asyncio.wrap_future(worker.submit(image))
        top = result["top"][:top_k]
        return {
            **identity,
            "filename": filename,
            "classes": [entry["class"] for entry in top],
            "probabilities": [entry["probability"] for entry in top],
            # A multi-label run: the predicted set (each class at its threshold or above).
            **({"labels": result["labels"]} if "labels" in result else {}),
        }


def serve(
    run_dir: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ctx: mx.Context | None = None,
    log_level: str = "info",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_queue: int = DEFAULT_MAX_QUEUE,
    dtype: str = "float32",
    on_loaded=None,
    tta: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    max_wait_s: float = DEFAULT_MAX_WAIT_S,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
) -> None:
    """Load a finished run and serve it until interrupted (Ctrl-C).

    The limits and the batching are those of :func:`create_app`. ``dtype`` is the network's
    form (see :mod:`gluon_ft.deploy.inference`), chosen for ``max_batch`` images per forward
    pass, the batch :class:`InferenceWorker` runs under load; ``on_loaded(run)`` is called
    once the run is loaded, before the server starts. ``tta`` is the test-time augmentation
    views averaged per image, by default the run's own (:class:`gluon_ft.deploy.predict.Predictor`);
    ``calibration_images`` calibrate ``--dtype int8`` (:mod:`gluon_ft.deploy.int8`).

    Raises
    ------
    UsageError
        ``run_dir`` is not a finished run (from :func:`gluon_ft.deploy.predict.load_run`), or
        ``dtype`` cannot run on ``ctx``.
    """
    import uvicorn

    predictor = Predictor(
        run_dir, ctx, max_batch, dtype, tta, calibration_images=calibration_images
    )
    if on_loaded is not None:
        on_loaded(predictor.run)
    batching = {"max_batch": max_batch, "batch_wait_ms": batch_wait_ms, "max_wait_s": max_wait_s}
    app = create_app(predictor, max_upload_bytes, max_pixels, max_queue, host, **batching)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
