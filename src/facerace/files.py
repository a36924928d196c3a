"""Files: streaming SHA-256, the cache folder, and model files shipped by other packages."""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
from contextlib import contextmanager
from importlib import util
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from facerace.errors import CacheError, MissingDependencyError


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def notice(message: str) -> None:
    """Tell the user something was repaired or skipped (one line on stderr, control characters escaped)."""
    from facerace.textout import printable

    print(f"facerace: {printable(message)}", file=sys.stderr)


def cached_build(target: Path, build: Callable[[], bytes]) -> Path:
    """`target`, written from `build()` on first use with its SHA-256 beside it (`.sha256`).

    A file whose SHA-256 is not the one recorded when it was built (modified or damaged) is
    rebuilt, and that is said on stderr. Written atomically (concurrent workers never read half
    a file); a folder that cannot be written is a CacheError.
    """
    recorded = target.with_name(target.name + ".sha256")
    if target.is_file():
        try:
            expected = recorded.read_text().strip() if recorded.is_file() else None
            if expected == sha256_file(target):
                return target
        except OSError:
            expected = "?"
        notice(f"{target} does not have the SHA-256 recorded when it was built "
               f"({'modified or damaged' if expected else 'none recorded'}); rebuilding it")
    data = build()
    partial = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        partial.replace(target)
        partial.write_text(hashlib.sha256(data).hexdigest() + "\n")
        partial.replace(recorded)
    except OSError as exc:
        raise CacheError(f"cannot write {target} ({exc.strerror or exc}); set FACERACE_CACHE to a writable "
                         "folder") from None
    return target


def partial_name(target: Path) -> Path:
    """A hidden name `target` is written under until it is complete, ending in `target`'s extension (for writers
    that choose the format by it); new for every call: runs in other processes or threads get their own."""
    return target.with_name(f".{target.stem}.{os.getpid()}-{secrets.token_hex(4)}.partial{target.suffix}")


@contextmanager
def atomic_output(target: str | Path, mode: str = "w", *, keep_partial: bool = False,
                  **open_args: Any) -> Iterator[IO[Any]]:
    """A file opened under a hidden temporary name beside `target` and renamed to `target` when the block ends,
    so a reader (or a second run writing the same file) never sees half a file: the last run to finish wins,
    whole. If the block raises, the partial file is renamed too with `keep_partial` (rows finished before a
    Ctrl-C are kept), else removed. A target that exists and is not a regular file (/dev/stdout, a FIFO) is
    written to directly; a link to a file replaces the file and keeps the link."""
    target = Path(target)
    if target.exists() and not target.is_file():  # /dev/stdout, a FIFO, a device: written to directly
        with open(target, mode, **open_args) as f:
            yield f
        return
    target = target.resolve()  # a link to a file: the file is replaced, the link kept
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_name(target)
    complete = False
    try:
        with open(partial, mode.replace("w", "x"), **open_args) as f:
            yield f
        complete = True
    finally:
        if (complete or keep_partial) and partial.exists():
            os.replace(partial, target)
        else:
            partial.unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """`$FACERACE_CACHE`, else `$XDG_CACHE_HOME/facerace`, else `~/.cache/facerace`."""
    if os.environ.get("FACERACE_CACHE"):
        return Path(os.environ["FACERACE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facerace"


def dlib_model_file(name: str) -> Path:
    """A model file of the `face-recognition-models` package, found without importing it.

    (Its `__init__` needs `pkg_resources`, which setuptools >= 81 no longer ships.)
    """
    spec = util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("face-recognition-models is not installed: pip install face-recognition-models")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing: reinstall face-recognition-models")
    return path
