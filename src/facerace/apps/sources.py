"""Command-line inputs -> a list of images: files, folders (recursive), globs and CSVs of paths."""

from __future__ import annotations

import csv
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from facerace.errors import InvalidParameterError
from facerace.images import IMAGE_SUFFIXES

CSV_COLUMNS = ("path", "file")


@dataclass(frozen=True)
class Source:
    """One image to analyse, or the reason it cannot be (a bad CSV row)."""

    path: str
    error: str | None = None


def expand(paths: Sequence[str], *, column: str | None = None, root: str | Path | None = None) -> list[Source]:
    """Expand PATH arguments into images, in order.

    A folder gives its image files (recursive, sorted); a pattern with * ? [ gives its
    matches; a `.csv` gives the paths in `column` (default `path` or `file`), relative ones
    resolved against the CSV's folder and refused outside `root` (default: that folder).
    Raises InvalidParameterError for a missing path, a glob with no match or a bad column.
    """
    out: list[Source] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = [Source(str(f)) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise InvalidParameterError(f"{arg}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            out += found
        elif p.is_file() and p.suffix.lower() == ".csv":
            out += _from_csv(p, column, Path(root) if root else None)
        elif p.exists():
            out.append(Source(str(p)))
        elif any(ch in arg for ch in "*?["):
            matches = sorted(m for m in glob.glob(arg, recursive=True) if Path(m).is_file())
            if not matches:
                raise InvalidParameterError(f"no files match {arg!r}")
            out += [Source(m) for m in matches]
        else:
            raise InvalidParameterError(f"{arg}: no such file or folder")
    return out


def _from_csv(path: Path, column: str | None, root: Path | None) -> list[Source]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        name = column or next((c for c in CSV_COLUMNS if c in fields), None)
        if name is None or name not in fields:
            wanted = repr(column) if column else "'path' or 'file'"
            raise InvalidParameterError(
                f"{path}: no column {wanted}; its columns are: {', '.join(fields) or '(none)'}. "
                f"Pass --column NAME to choose one."
            )
        allowed = (root or path.parent).resolve()
        out = []
        for line, row in enumerate(reader, start=2):
            value = (row.get(name) or "").strip()
            if not value:
                out.append(Source(f"{path}:{line}", f"empty {name!r} cell"))
                continue
            target = Path(value) if Path(value).is_absolute() else path.parent / value
            if not target.resolve().is_relative_to(allowed):
                out.append(Source(value, f"outside the allowed folder {allowed} (pass --root to allow another)"))
            else:
                out.append(Source(str(target)))
        return out
