"""HTTP service: POST /v1/analyze, GET /v1/health, GET /v1/models, and a web page at /.

The model is loaded once per process; inference runs in a one-thread executor per process
(more processes with `facerace serve --workers N`), so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from facerace.errors import FaceraceError, InvalidParameterError
from facerace.images import MAX_PIXELS
from facerace.model import list_models
from facerace.predictor import Predictor

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
REQUEST_TIMEOUT_S = 30.0


def create_app(
    model: str = "default",
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> FastAPI:
    """Build the app around one lazily loaded Predictor."""
    base = Predictor(model, max_pixels=max_pixels)
    base.validate()  # fail at start-up, not on the first request, if the model is missing
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facerace-infer")
    app = FastAPI(title="facerace", version=_version(),
                  description="Perceived race category of every face in a photo. Categories are perceived, "
                              "coarse and contested; see the model card.")

    @app.exception_handler(FaceraceError)
    async def _facerace_error(request: Request, exc: FaceraceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (resources.files("facerace.apps.serve") / "static" / "index.html").read_text()

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": base.config.name, "version": base.config.version, "pid": os.getpid()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": list_models()}

    @app.post("/v1/analyze")
    async def analyze(
        file: UploadFile = File(..., description="the photo (JPEG, PNG, GIF, WebP, BMP, TIFF)"),
        scheme: str | None = Query(None, description="fairface7, race6, race4 or utk5 (default: the model's)"),
        detector: str | None = Query(None, description="yunet, hog, haar or none (default: the model's)"),
        threshold: float | None = Query(None, ge=0.0, le=1.0, description="uncertain below this confidence"),
    ) -> dict[str, Any]:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than the limit of {max_upload_bytes:,} bytes")
        if not data:
            raise HTTPException(400, "empty upload: send the image in the multipart field 'file'")
        options = {k: v for k, v in (("scheme", scheme), ("detector", detector), ("threshold", threshold)) if v is not None}
        try:
            predictor = base.replace(**options) if options else base
        except InvalidParameterError as exc:
            raise HTTPException(422, str(exc)) from None
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(loop.run_in_executor(executor, predictor.predict_image, data), timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"analysis took longer than {timeout_s:.0f} s") from None
        if result.error is not None:
            raise HTTPException(422, f"{file.filename or 'upload'}: {result.error}")
        name = file.filename or "upload"
        rows = [{**row, "path": name} for row in result.rows()] if result.faces else []
        return {"faces": rows}

    app.state.predictor = base
    return app


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
    )
