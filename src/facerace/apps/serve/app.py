"""HTTP service: POST /v1/analyze, GET /v1/health, GET /v1/models, GET /model-card (an HTML page; the Markdown at
/model-card.md), docs at /docs, a web page at /.

The model is loaded, and its weights' SHA-256 checked, when the app is built: a damaged install never
starts. Inference runs in a one-thread executor per process (more processes with `facerace serve
--workers N`), so the event loop never blocks. `RequestGuard` reads each request body before the app
does: refused from its Content-Length or as soon as it passes the limit, cut off when it arrives too
slowly. Responses carry no server paths, hashes or tracebacks: an unexpected error is logged with an id
and answered with that id.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import IO, Any, BinaryIO

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facerace.errors import ImageError, InvalidParameterError
from facerace.images import MAX_PIXELS
from facerace.model import list_models, resolve
from facerace.predictor import Predictor
from facerace.results import ImageResult

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
REQUEST_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 60.0
#: room for the multipart boundaries, part headers and form fields around the uploaded file
FORM_OVERHEAD_BYTES = 64 * 1024
#: A request body is kept in memory up to this size, on disk (the temporary folder) beyond it.
SPOOL_BYTES = 1024 * 1024
#: Bytes per message when a kept body is replayed to the app.
REPLAY_CHUNK = 64 * 1024
FIELD_HINT = ("send the photo as multipart/form-data in the field 'file' "
              "(for example: curl -F file=@photo.jpg http://HOST:PORT/v1/analyze)")

log = logging.getLogger("facerace.serve")
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None  # glibc


class RequestGuard:
    """ASGI middleware: bounded, timed request bodies, and a JSON answer for any unexpected exception.

    A body longer than `max_upload_bytes` plus FORM_OVERHEAD_BYTES is refused (413) from its Content-Length
    before it is read, or as soon as the bytes read pass that (chunked uploads); a body not complete
    `body_timeout_s` after the headers gets 408. Both close the connection. The body, at most that size, is
    kept in a temporary file (in memory up to SPOOL_BYTES) and replayed to the app, which spools the upload
    again (Starlette: on disk past 1 MiB) and reads it only in the analysis thread: a request waiting for its
    turn holds about SPOOL_BYTES of memory, the one being analysed one copy of its photo. An exception that
    escapes the app becomes a 500 JSON answer that keeps the connection open, instead of a dropped connection.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_upload_bytes + FORM_OVERHEAD_BYTES
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = _too_large(self.max_upload_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_body_bytes:  # h11 refuses non-numeric lengths
            await _send_json(send, 413, too_large, close=True)
            return
        body = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        try:
            await self._guarded(scope, receive, send, body, too_large)
        finally:
            body.close()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, body: IO[bytes], too_large: str) -> None:
        """Read the body into `body` (bounded, timed), then run the app on it."""
        try:
            outcome = await asyncio.wait_for(self._read_body(receive, body), self.body_timeout_s)
        except TimeoutError:
            await _send_json(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s", close=True)
            return
        if outcome == "too large":
            await _send_json(send, 413, too_large, close=True)
            return
        if outcome == "disconnected":
            return  # nobody to answer
        total = body.tell()
        body.seek(0)
        done = False
        started = False

        async def replay() -> Message:
            nonlocal done
            if done:
                return await receive()
            chunk = body.read(REPLAY_CHUNK)
            done = body.tell() >= total
            return {"type": "http.request", "body": chunk, "more_body": not done}

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, replay, tracked_send)
        except Exception:
            error_id = _log_exception("request")
            if not started:
                await _send_json(send, 500, f"internal error {error_id}: the server's log has the details")

    async def _read_body(self, receive: Receive, body: IO[bytes]) -> str:
        """Write the request's body into `body`: "complete", "too large" once it passes `max_body_bytes`, or
        "disconnected"."""
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return "disconnected"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return "too large"
            body.write(chunk)
            if not message.get("more_body", False):
                return "complete"


async def _send_json(send: Send, status: int, detail: str, *, close: bool = False) -> None:
    """An error answer straight from the middleware."""
    body = JSONResponse({"status": "error", "detail": detail}).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _too_large(max_upload_bytes: int) -> str:
    return f"upload larger than the limit of {max_upload_bytes:,} bytes"


def _log_exception(what: str) -> str:
    """Log the exception being handled, with a short id to quote to the client."""
    error_id = uuid.uuid4().hex[:8]
    log.exception("%s failed (error id %s)", what, error_id)
    return error_id


def load_predictor(model: str | os.PathLike = "default", max_pixels: int = MAX_PIXELS) -> Predictor:
    """The service's Predictor with its model loaded now: weights whose SHA-256 does not match raise
    ModelIntegrityError here, so the server refuses to start instead of failing every request."""
    predictor = Predictor(model, max_pixels=max_pixels).validate()
    _ = predictor.pipeline  # loads the head and fine-tuned layers, both SHA-256 checked
    return predictor


def create_app(
    model: str | os.PathLike = "default",
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    timeout_s: float = REQUEST_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """Build the app around one Predictor, loaded and checked now."""
    base = load_predictor(model, max_pixels)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facerace-infer")
    app = FastAPIOffline(title="facerace", version=_version(), swagger_ui_parameters={"validatorUrl": None},
                         description="Perceived race category of every face in a photo. Categories are perceived, "
                                     "coarse and contested; see the model card at /model-card.")
    app.add_middleware(RequestGuard, max_upload_bytes=max_upload_bytes, body_timeout_s=body_timeout_s)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"status": "error", "detail": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"status": "error", "detail": _validation_message(exc)}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (resources.files("facerace.apps.serve") / "static" / "index.html").read_text()

    def card_text() -> str:
        card = resolve(base.model) / "MODEL_CARD.md"
        if not card.is_file():
            raise HTTPException(404, "this model has no model card")
        return card.read_text(encoding="utf-8", errors="replace")

    @app.get("/model-card", response_class=HTMLResponse)
    async def model_card() -> str:
        """The served model's card as a page: what it was trained on, how accurate it is, for whom."""
        return card_page(card_text(), base.config.name)

    @app.get("/model-card.md", response_class=PlainTextResponse)
    async def model_card_markdown() -> str:
        """The served model's card as its Markdown source."""
        return card_text()

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": base.config.name, "version": base.config.version}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": [{k: v for k, v in m.items() if k != "path"} for m in list_models()]}

    @app.post("/v1/analyze")
    async def analyze(
        file: UploadFile = File(..., description="the photo (JPEG, PNG, GIF, WebP, BMP, TIFF)"),
        scheme: str | None = Query(None, description="fairface7, race6, race4 or utk5 (default: the model's)"),
        detector: str | None = Query(None, description="yunet, hog, haar or none (default: the model's)"),
        threshold: float | None = Query(None, ge=0.0, le=1.0, description="uncertain below this confidence"),
    ) -> dict[str, Any]:
        """Every face in the photo: `status` is ok, no_face or error (as in `facerace predict` rows)."""
        size = file.size if file.size is not None else await _size(file)
        if size > max_upload_bytes:
            raise HTTPException(413, _too_large(max_upload_bytes))
        if not size:
            raise HTTPException(400, f"empty upload: {FIELD_HINT}")
        name = file.filename or "upload"
        options = {k: v for k, v in (("scheme", scheme), ("detector", detector), ("threshold", threshold)) if v is not None}
        try:
            predictor = base.replace(**options) if options else base
        except InvalidParameterError as exc:
            raise HTTPException(422, str(exc)) from None
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(loop.run_in_executor(executor, _analyse, predictor, file.file), timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"analysis took longer than {timeout_s:g} s") from None
        except ImageError as exc:
            raise HTTPException(422, f"{name}: {exc.reason}") from None
        except Exception:  # a detector that trips on a degenerate image, ...: never a 500, never a dropped connection
            raise HTTPException(422, f"{name}: could not analyse this image (error id {_log_exception('analysis')}; "
                                     "the server's log has the details)") from None
        if result.error is not None:
            raise HTTPException(422, f"{name}: {result.error}")
        return {"status": result.status, "faces": _faces_json(result, name)}

    app.state.predictor = base
    return app


#: The model card page's style: readable text and tables, nothing loaded from other hosts.
CARD_STYLE = ("body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;line-height:1.5}"
              "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}"
              "code,pre{background:#f4f4f4}pre{padding:.5rem;overflow-x:auto}")


def card_page(markdown: str, model: str) -> str:
    """A model card's Markdown as a whole HTML page, rendered offline by markdown-it (CommonMark and tables):
    raw HTML in the card is shown as text, never run, and links to javascript:/vbscript:/data: are dropped."""
    from html import escape

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Model card: {escape(model)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CARD_STYLE}</style></head>'
            f'<body>\n{body}<p><a href="/model-card.md">Markdown source</a> · <a href="/">back</a></p>'
            "</body></html>\n")


async def _size(file: UploadFile) -> int:
    """The size of an upload whose size Starlette did not record."""
    await file.seek(0, os.SEEK_END)
    size = file.file.tell()
    await file.seek(0)
    return size


def _analyse(predictor: Predictor, upload: BinaryIO) -> ImageResult:
    """One uploaded image's result, its bytes read only now (in the analysis thread: a request waiting for its turn
    holds none in memory); then the memory its analysis freed goes back to the system (glibc keeps it otherwise)."""
    try:
        upload.seek(0)
        return predictor.predict_image(upload.read())
    finally:
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


def _faces_json(result: ImageResult, name: str) -> list[dict[str, Any]]:
    """The `facerace predict` rows of the faces, under the upload's file name (none for no face)."""
    return [{**row, "path": name} for row in result.rows()] if result.faces else []


def _validation_message(exc: RequestValidationError) -> str:
    """One plain sentence per invalid request part, instead of pydantic's error list."""
    parts = []
    for error in exc.errors():
        where, *field = error.get("loc", ("body",))
        if where == "body":
            problem = "no photo in the request" if error.get("type") == "missing" else "'file' is not a file upload"
            parts.append(f"{problem}: {FIELD_HINT}")
        else:
            parts.append(f"{where} parameter {'.'.join(map(str, field))!r}: {error.get('msg', 'invalid')}")
    return "; ".join(dict.fromkeys(parts))


def _version() -> str:
    from facerace.version import __version__

    return __version__


def app_from_env() -> FastAPI:
    """The app `facerace serve` starts in each worker process (options come from the environment)."""
    return create_app(
        os.environ.get("FACERACE_MODEL", "default"),
        max_upload_bytes=int(os.environ.get("FACERACE_MAX_UPLOAD_BYTES", MAX_UPLOAD_BYTES)),
        max_pixels=int(os.environ.get("FACERACE_MAX_PIXELS", MAX_PIXELS)),
        timeout_s=float(os.environ.get("FACERACE_TIMEOUT_S", REQUEST_TIMEOUT_S)),
        body_timeout_s=float(os.environ.get("FACERACE_BODY_TIMEOUT_S", BODY_TIMEOUT_S)),
    )
