"""Serve a finished run: a web page to try it on photos, and a JSON API.

::

    GET  /          the page (``gluon_ft/static/index.html``): pick or drop a photo
    POST /predict   multipart form, the file in the field ``image`` -> JSON
                    {"run_id", "model", "filename", "classes", "probabilities"}
                    (every class, most probable first; ``?top_k=N`` keeps the first N)
    GET  /health    {"status": "ok", "run_id", "model", "classes", "image_size",
                    "max_upload_bytes"}

A Gluon block must not run forward from two threads at once (a hybridized block with
``static_alloc`` reuses its buffers), so one :class:`InferenceWorker` thread owns the network
and every request hands its image to it through a queue.

Uploads are capped (:data:`DEFAULT_MAX_UPLOAD_BYTES`) before they are buffered, and decoded
by the training code's safe loader (:func:`gluon_ft.data.load_image`: decompression bombs are
refused). A bad request gets a 4xx answer with a JSON body ``{"error": "<reason>"}``: 400 for
a malformed request (not a multipart form, no ``image`` file field, an empty file), 413 for a
body over the cap, 422 for a file that is not a usable image (not an image, truncated, a bomb).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import mxnet as mx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from gluon_ft.predict import Predictor

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
IMAGE_FIELD = "image"


@dataclass
class _Job:
    image: bytes
    future: Future = field(default_factory=Future)


class InferenceWorker:
    """The one thread that runs a :class:`~gluon_ft.predict.Predictor`'s network.

    :meth:`submit` may be called from any thread; the jobs wait in a queue and the worker
    decodes and classifies them one at a time. One image per forward pass keeps the input
    shape fixed: a hybridized block pays for every new batch shape (measured at 32 px: 0.2 to
    0.7 s on its first pass, against 5 to 30 ms for a shape it has seen), so batching requests
    of varying counts would make latency spikes instead of saving time.

    Parameters
    ----------
    predictor : Predictor
        The loaded run. After :meth:`start`, nothing else may call it.
    """

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="gluon-ft-inference", daemon=True)

    def start(self) -> Future:
        """Start the thread; the returned future is done once a first forward pass has run.

        The first pass of a hybridized network builds its graph and takes far longer than the
        others, so it happens here rather than in the first user's request.
        """
        size = self.predictor.run.image_size
        warm_up = self.submit(_encode_png(Image.new("RGB", (size, size))))
        self._thread.start()
        return warm_up

    def submit(self, image: bytes) -> Future:
        """Queue an encoded image file; the future's result is ``Predictor.predict_images``'s
        entry for it, with every class: ``{"ok": True, "top": [...]}`` or ``{"ok": False,
        "error"}``."""
        job = _Job(image)
        self._jobs.put(job)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        every_class = len(self.predictor.classes)
        while (job := self._jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                [result] = self.predictor.predict_images([job.image], top_k=every_class)
            except Exception as err:  # noqa: BLE001  the request gets a 500, the server lives
                job.future.set_exception(err)
            else:
                job.future.set_result(result)


def _encode_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


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


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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


def create_app(predictor: Predictor, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> FastAPI:
    """The web application around a loaded run; its network runs only on its worker thread.

    Parameters
    ----------
    predictor : Predictor
        The run to serve. The application owns it from now on.
    max_upload_bytes : int
        Largest request body accepted; larger ones get 413.
    """
    run = predictor.run
    identity = {"run_id": run.path.resolve().name, "model": run.config["model"]}
    worker = InferenceWorker(predictor)
    page = resources.files("gluon_ft").joinpath("static/index.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # The server accepts connections only once the network has run once.
        await asyncio.wrap_future(worker.start())
        yield
        worker.close(timeout=30)

    app = FastAPI(
        title="gluon-ft serve",
        lifespan=lifespan,
        docs_url=None,  # the docs pages load their scripts from a CDN
        redoc_url=None,
    )
    app.state.worker = worker
    app.add_middleware(_UploadLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error_response(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(422, "; ".join(e.get("msg", str(e)) for e in err.errors()))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            **identity,
            "classes": predictor.classes,
            "image_size": run.image_size,
            "max_upload_bytes": max_upload_bytes,
        }

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        top_k = _parse_top_k(request, len(predictor.classes))
        filename, data = await _read_upload(request)
        result = await asyncio.wrap_future(worker.submit(data))
        if not result["ok"]:
            raise HTTPException(422, f"{filename or 'the upload'} is unusable: {result['error']}")
        top = result["top"][:top_k]
        return {
            **identity,
            "filename": filename,
            "classes": [entry["class"] for entry in top],
            "probabilities": [entry["probability"] for entry in top],
        }

    return app


def serve(
    run_dir: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ctx: mx.Context | None = None,
    log_level: str = "info",
) -> None:
    """Load a finished run and serve it until interrupted (Ctrl-C).

    Raises
    ------
    UsageError
        ``run_dir`` is not a finished run (from :func:`gluon_ft.predict.load_run`).
    """
    import uvicorn

    app = create_app(Predictor(run_dir, ctx), max_upload_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
