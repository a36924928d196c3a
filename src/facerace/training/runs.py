"""Run folders: `runs/<verb>/expN` (or a given name), never overwritten."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facerace.errors import InvalidParameterError
from facerace.textout import json_text


def check_new_run_dir(out: str | Path, verb: str) -> Path:
    """`out` as a Path if it is new or an empty folder, else an InvalidParameterError (runs are never overwritten)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InvalidParameterError(f"{path} already exists and is not empty; runs are never overwritten: "
                                    f"choose another --out, or omit it to get runs/{verb}/expN")
    return path


def next_run_dir(verb: str) -> Path:
    """The first `runs/<verb>/expN` that does not exist yet (not created)."""
    n = 1
    while (Path("runs") / verb / f"exp{n}").exists():
        n += 1
    return Path("runs") / verb / f"exp{n}"


#: The file that claims a run folder for one run (created exclusively, so two runs never share a folder).
CLAIM_FILE = ".facerace-run"


def new_run_dir(out: str | Path | None, verb: str, name: str | None = None) -> Path:
    """Create the run folder: `out` if given (it must be new or empty), else `runs/<verb>/expN`
    (or `runs/<verb>/<name>`, then `<name>-2`, ... when `name` is given). The folder is claimed with an
    exclusively created CLAIM_FILE: a second run given the same folder at the same time is refused."""
    if out is not None:
        path = check_new_run_dir(out, verb)
        path.mkdir(parents=True, exist_ok=True)
        if not _claim(path):
            raise InvalidParameterError(f"{path}: another run is writing into this folder; runs are never "
                                        f"overwritten: choose another --out, or omit it to get runs/{verb}/expN")
        return path
    base, n = Path("runs") / verb, 1

    def candidate(n: int) -> Path:
        return base / (f"exp{n}" if name is None else name if n == 1 else f"{name}-{n}")

    while True:
        path = candidate(n)
        try:
            path.mkdir(parents=True)  # exclusive: a run started at the same moment takes the next number
            if _claim(path):
                return path
        except FileExistsError:
            pass
        n += 1


def _claim(path: Path) -> bool:
    """Create `path`/CLAIM_FILE exclusively; False if another run already did."""
    try:
        with open(path / CLAIM_FILE, "x") as f:
            f.write(f"{os.getpid()}\n")
    except FileExistsError:
        return False
    return True


def discard_if_empty(path: Path) -> None:
    """Remove a run folder that nothing was written into (the run failed before its first file)."""
    if path.is_dir() and not [p for p in path.iterdir() if p.name != CLAIM_FILE]:
        (path / CLAIM_FILE).unlink(missing_ok=True)
        path.rmdir()


def write_json(path: Path, data: Any) -> Path:
    """Write indented JSON (with a trailing newline) under a temporary name, renamed when complete."""
    from facerace.files import atomic_output

    with atomic_output(path, "w") as f:
        f.write(json_text(data, indent=2) + "\n")
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
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return ""
