"""facerace label: a local page to label an audit's sample (`sample.csv`), one face at a time.

Every answer is written to `labels.csv` in the audit folder at once (a whole new file renamed over
the old one), so closing the page or stopping the process loses nothing and opening it again
resumes at the first face without an answer. The page works offline and, by default, only on this
machine (127.0.0.1). Requests are bounded like the service's (`serve.app.RequestGuard`); answers
must come as JSON from the page's own origin (a web page elsewhere cannot write labels), and the
Host header must name this machine (no DNS rebinding).
"""

from __future__ import annotations

import json
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from facerace.apps.sample import NOT_A_FACE, SKIP, write_csv_atomic
from facerace.errors import InvalidParameterError

LABELS_FILE = "labels.csv"
#: labels.csv's columns: the rows in the order they were answered (undo takes back the last).
LABEL_COLUMNS = ("path", "face", "group", "label")
#: Bytes an answer may take (a class name and an index), plus the request guard's 64 KiB of form overhead.
MAX_BODY_BYTES = 4096
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class LabelStore:
    """The faces of an audit folder's `sample.csv` and the answers so far (`labels.csv`), saved after each change."""

    def __init__(self, folder: str | Path, scheme: str | None = None) -> None:
        from facerace.apps.sources import read_csv
        from facerace.labels import get_scheme

        self.folder = Path(folder)
        sample = self.folder / "sample.csv"
        if not sample.is_file():
            raise InvalidParameterError(f"{self.folder}: no sample.csv here; draw a sample to label first: "
                                        f"facerace audit PATH... --sample 200 --out {self.folder}")
        fields, rows = read_csv(sample, "sample.csv")
        if not {"path", "face", "crop"} <= set(fields):
            raise InvalidParameterError(f"{sample}: not a sample.csv of `facerace audit --sample` (columns path, "
                                        f"face, group, box, label, crop); its columns are: {', '.join(fields)}")
        self.faces = [{"path": r.get("path") or "", "face": r.get("face") or "0", "group": r.get("group") or "",
                       "crop": r.get("crop") or ""} for _, r in rows]
        self.classes = get_scheme(scheme or self._audit_scheme()).classes
        self.choices = (*self.classes, NOT_A_FACE, SKIP)
        self.order: list[int] = []  # answered faces, in the order of their answers
        self.answers: dict[int, str] = {}
        self._lock = threading.Lock()
        self._resume()

    def _audit_scheme(self) -> str:
        try:
            return str(json.loads((self.folder / "composition.json").read_text(encoding="utf-8"))["scheme"])
        except (OSError, ValueError, KeyError, TypeError):
            raise InvalidParameterError(f"{self.folder}: no readable composition.json to take the scheme from; pass "
                                        "--scheme (fairface7, race6, race4 or utk5)") from None

    def _resume(self) -> None:
        """Take back the answers of an earlier session from labels.csv (rows of other faces or labels ignored)."""
        from facerace.apps.sources import read_csv

        path = self.folder / LABELS_FILE
        if not path.is_file():
            return
        index = {(f["path"], f["face"]): i for i, f in enumerate(self.faces)}
        for _, row in read_csv(path, LABELS_FILE)[1]:
            i = index.get((row.get("path") or "", row.get("face") or "0"))
            if i is not None and row.get("label") in self.choices:
                if i in self.answers:
                    self.order.remove(i)
                self.answers[i] = str(row["label"])
                self.order.append(i)

    def state(self) -> dict[str, Any]:
        """What the page shows: the choices, every face's group and answer, the next face to label."""
        pending = [i for i in range(len(self.faces)) if i not in self.answers]
        return {"choices": list(self.choices), "classes": list(self.classes), "total": len(self.faces),
                "answered": len(self.answers), "next": pending[0] if pending else None,
                "last": self.order[-1] if self.order else None,
                "faces": [{"index": i, "group": f["group"], "label": self.answers.get(i)}
                          for i, f in enumerate(self.faces)],
                "labels_file": str(self.folder / LABELS_FILE)}

    def answer(self, index: Any, label: Any) -> dict[str, Any]:
        """Record `label` (one of `choices`) for face `index` (a new answer replaces an earlier one) and save."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.faces):
            raise HTTPException(422, f"index must be a face number from 0 to {len(self.faces) - 1}")
        if label not in self.choices:
            raise HTTPException(422, f"label must be one of: {', '.join(self.choices)}")
        with self._lock:
            if index in self.answers:
                self.order.remove(index)
            self.answers[index] = label
            self.order.append(index)
            self._save()
            return self.state()

    def undo(self) -> dict[str, Any]:
        """Take back the last answer and save."""
        with self._lock:
            if self.order:
                self.answers.pop(self.order.pop())
                self._save()
            return self.state()

    def _save(self) -> None:
        write_csv_atomic(self.folder / LABELS_FILE, LABEL_COLUMNS,
                         ({**{k: self.faces[i][k] for k in ("path", "face", "group")}, "label": self.answers[i]}
                          for i in self.order))

    def crop(self, index: int) -> Path:
        """The picture of face `index`: its crop under the folder's sample/ (nothing outside it is served)."""
        if not 0 <= index < len(self.faces) or not self.faces[index]["crop"]:
            raise HTTPException(404, "no picture of this face (its image could not be read when the sample was drawn)")
        base = (self.folder / "sample").resolve()
        path = (self.folder / self.faces[index]["crop"]).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise HTTPException(404, "no picture of this face")
        return path


def create_app(folder: str | Path, scheme: str | None = None, *, hosts: tuple[str, ...] = ()) -> FastAPI:
    """The labelling app of audit folder `folder` (checked now); `hosts`: Host names it answers besides this
    machine's."""
    from facerace.apps.serve.app import RequestGuard

    store = LabelStore(folder, scheme)
    app = FastAPI(title="facerace label", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, max_upload_bytes=MAX_BODY_BYTES, body_timeout_s=30.0)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[*LOCAL_HOSTS, *hosts])

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"status": "error", "detail": exc.detail}, status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (resources.files("facerace.apps.label") / "static" / "index.html").read_text()

    @app.get("/api/state")
    async def state() -> dict[str, Any]:
        return store.state()

    @app.post("/api/answer")
    async def answer(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        return store.answer(body.get("index"), body.get("label"))

    @app.post("/api/undo")
    async def undo(request: Request) -> dict[str, Any]:
        await _json_body(request)
        return store.undo()

    @app.get("/crop/{index}")
    async def crop(index: int) -> FileResponse:
        return FileResponse(store.crop(index), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    app.state.store = store
    return app


async def _json_body(request: Request) -> dict[str, Any]:
    """A JSON object sent by this page: other origins (and forms, which cannot send JSON) are refused."""
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
        raise HTTPException(403, "answers come from the labelling page itself")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send the answer as JSON (Content-Type: application/json)")
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "send a JSON object, e.g. {\"index\": 0, \"label\": \"White\"}")
    return body
