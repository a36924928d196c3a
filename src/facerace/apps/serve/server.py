"""Running the service: uvicorn with limits on slow and numerous clients (used by `facerace serve`).

uvicorn closes idle keep-alive connections, but never a connection whose request line and headers
trickle in: `SlowHeadersH11` closes those after `FACERACE_HEADER_TIMEOUT_S`. Request bodies are
timed by the app (`facerace.apps.serve.app.RequestGuard`).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 64
MAX_HEADER_BYTES = 16 * 1024


class SlowHeadersH11(H11Protocol):
    """uvicorn's h11 protocol that closes a connection when a request's headers are not complete
    `FACERACE_HEADER_TIMEOUT_S` seconds after the connection opened or the previous response ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = float(os.environ.get("FACERACE_HEADER_TIMEOUT_S", HEADER_TIMEOUT_S))
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        """No request in progress since the timer started: the next one's headers are late."""
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def uvicorn_options(max_connections: int = MAX_CONNECTIONS, *, quiet: bool = False) -> dict[str, Any]:
    """uvicorn settings of the service: header timeout, keep-alive, header size, connection cap, log level."""
    return {"http": SlowHeadersH11, "timeout_keep_alive": KEEP_ALIVE_S, "limit_concurrency": max_connections,
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "log_level": "error" if quiet else "warning"}
