"""Command-line inputs -> a list of images: files, folders (recursive), globs and CSVs of paths."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from facerace.errors import InvalidParameterError
from facerace.files import notice
from facerace.images import IMAGE_SUFFIXES

CSV_COLUMNS = ("path", "file")


@dataclass(frozen=True)
class Source:
    """One image to analyse, or the reason it cannot be (a bad CSV row)."""

    path: str
    error: str | None = None


def expand(paths: Sequence[str], *, column: str | None = None, root: str | Path | None = None,
           quiet: bool = False) -> list[Source]:
    """Expand PATH arguments into images, in order.

    A folder gives its image files (recursive, sorted); a pattern with * ? [ gives its
    matches; a `.csv` gives the paths in `column` (default `path` or `file`), relative ones
    resolved against the CSV's folder and refused outside `root` (default: that folder).
    Folders and patterns never follow symbolic links to folders (no loops) and give each
    file once (by its real path); the files they skip for their extension are counted on
    stderr (unless `quiet`). Raises InvalidParameterError for a missing path, a glob with no match, a bad
    column or a CSV that cannot be read as UTF-8 text.
    """
    out: list[Source] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = _images(p.rglob("*"), arg, quiet=quiet)
            if not found:
                raise InvalidParameterError(f"{arg}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            out += found
        elif p.is_file() and p.suffix.lower() == ".csv":
            out += _from_csv(p, column, Path(root) if root else None)
        elif p.exists():
            out.append(Source(str(p)))
        elif any(ch in arg for ch in "*?["):
            found = _images(_glob(arg), arg, images_only=False, quiet=quiet)
            if not found:
                raise InvalidParameterError(f"no files match {arg!r}")
            out += found
        else:
            raise InvalidParameterError(f"{arg}: no such file or folder")
    return out


def _glob(pattern: str) -> Iterable[Path]:
    """The paths matching `pattern` (`**` = any folders; a final `**` = every file below), never following
    links to folders."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    base = Path(*parts[:first]) if first else Path()
    return base.glob(str(Path(*parts[first:], *(["*"] if parts[-1] == "**" else []))))


def _images(candidates: Iterable[Path], arg: str, *, images_only: bool = True, quiet: bool = False) -> list[Source]:
    """The files among `candidates`, sorted, each real file once; with `images_only`, only image files
    (the others are counted on stderr unless `quiet`)."""
    files, seen, skipped = [], set(), []
    for f in sorted(candidates):
        if not f.is_file():
            continue
        if images_only and f.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(f)
            continue
        real = os.path.realpath(f)
        if real not in seen:
            seen.add(real)
            files.append(Source(str(f)))
    if skipped and not quiet:
        kinds = sorted({f.suffix.lower() or "(no extension)" for f in skipped})
        notice(f"{arg}: skipped {len(skipped)} file(s) that are not images ({', '.join(kinds[:8])}): "
               + ", ".join(str(f) for f in skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    return files


def read_csv(path: str | Path, what: str = "CSV file") -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(column names, [(line number, row)]) of a UTF-8 CSV file with a header (a BOM is dropped).

    The one reader of the CSV files users give facerace (paths, labels). Raises InvalidParameterError
    naming the file (as `what`) when it cannot be read, is not UTF-8 text or is not CSV.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(line, row) for line, row in enumerate(reader, start=2)]
            return list(reader.fieldnames or []), rows
    except UnicodeDecodeError as exc:
        raise InvalidParameterError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the CSV as "
                                    "UTF-8 (any spreadsheet's \"CSV UTF-8\" format)") from None
    except csv.Error as exc:  # a field over the csv module's size limit, ...
        raise InvalidParameterError(f"{path}: not a {what} ({exc})") from None
    except OSError as exc:
        raise InvalidParameterError(f"{path}: cannot read this CSV ({exc.strerror or exc})") from None


def _from_csv(path: Path, column: str | None, root: Path | None) -> list[Source]:
    fields, rows = read_csv(path, "CSV file of paths")
    return _csv_sources(path, fields, rows, column, root)


def _csv_sources(path: Path, fields: list[str], rows: list[tuple[int, dict[str, str]]], column: str | None,
                 root: Path | None) -> list[Source]:
    """The sources in column `column` (default `path` or `file`) of the rows of CSV file `path`."""
    name = column or next((c for c in CSV_COLUMNS if c in fields), None)
    if name is None or name not in fields:
        wanted = repr(column) if column else "'path' or 'file'"
        raise InvalidParameterError(
            f"{path}: no column {wanted}; its columns are: {', '.join(fields) or '(none)'}. "
            f"Pass --column NAME to choose one."
        )
    allowed = (root or path.parent).resolve()
    out = []
    for line, row in rows:
        value = (row.get(name) or "").strip()
        if not value or "\x00" in value:
            out.append(Source(f"{path}:{line}", f"{'empty' if not value else 'NUL character in the'} {name!r} cell"))
            continue
        target = Path(value) if Path(value).is_absolute() else path.parent / value
        if not target.resolve().is_relative_to(allowed):
            out.append(Source(value, f"outside the allowed folder {allowed} (pass --root to allow another)"))
        else:
            out.append(Source(str(target)))
    return out


def check_output(output: str | Path | None, inputs: Iterable[str | Path], option: str = "--output") -> None:
    """Refuse an output that is one of `inputs` (the same file under any name or link): inputs are never
    overwritten. An output that does not exist yet cannot be one."""
    if output is None:
        return
    try:
        target = os.stat(output)
    except OSError:
        return
    for path in inputs:
        try:
            same = os.path.samestat(os.stat(path), target)
        except OSError:
            continue
        if same:
            raise InvalidParameterError(f"{option} {output} is the input {path}; facerace never overwrites its "
                                        "inputs: choose another output file")
