"""Run folders: `runs/<verb>/expN` (or a given name), never overwritten."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facerace.errors import InvalidParameterError


def new_run_dir(out: str | Path | None, verb: str, name: str | None = None) -> Path:
    """Create the run folder: `out` if given (it must be new or empty), else `runs/<verb>/expN`
    (or `runs/<verb>/<name>`, then `<name>-2`, ... when `name` is given)."""
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InvalidParameterError(f"{path} already exists and is not empty; runs are never overwritten: "
                                f"choose another --out, or omit it to get runs/{verb}/expN")
        path.mkdir(parents=True, exist_ok=True)
        return path
    base, n = Path("runs") / verb, 1

    def candidate(n: int) -> Path:
        return base / (f"exp{n}" if name is None else name if n == 1 else f"{name}-{n}")

    while candidate(n).exists():
        n += 1
    path = candidate(n)
    path.mkdir(parents=True)
    return path


def discard_if_empty(path: Path) -> None:
    """Remove a run folder that nothing was written into (the run failed before its first file)."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def write_json(path: Path, data: Any) -> Path:
    """Write indented JSON (with a trailing newline)."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def environment() -> dict[str, str]:
    """Where and when a run happened: date, machine, Python and facerace versions."""
    from facerace.version import __version__

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {_cpu_name()}".strip(),
        "python": platform.python_version(),
        "facerace": __version__,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                import os

                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return ""
