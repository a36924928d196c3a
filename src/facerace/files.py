"""Files: streaming SHA-256, the cache folder, and model files shipped by other packages."""

from __future__ import annotations

import hashlib
import os
import sys
from importlib import util
from pathlib import Path

from facerace.errors import MissingDependencyError


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
