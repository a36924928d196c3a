"""Command-line inputs -> a list of images: files, folders (recursive), globs and CSVs of paths."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from facerace.csvread import read_csv
from facerace.errors import InvalidParameterError
from facerace.files import notice
from facerace.images import IMAGE_SUFFIXES

CSV_COLUMNS = ("path", "file")
@dataclass(frozen=True)
class Source:
    """One image to analyse, or the reason it cannot be (a bad CSV row); `group`: its CSV row's group cell."""

    path: str
    error: str | None = None
    group: str | None = None


def expand(paths: Sequence[str], *, column: str | None = None, root: str | Path | None = None,
           quiet: bool = False, group: str | None = None) -> list[Source]:
    """Expand PATH arguments into images, in order.

    A folder gives its image files (recursive, sorted); a pattern with * ? [ gives its
    matches; a `.csv` gives the paths in `column` (default `path` or `file`), relative ones
    resolved against the CSV's folder and refused outside `root` (default: that folder).
    Folders and patterns never follow symbolic links to folders (no loops) and give each
    file once (by its real path); the files they skip for their extension are counted on
    stderr (unless `quiet`). With `group`, each CSV row's Source carries that column's cell (`(none)`
    if empty). A CSV row is one image: an image listed twice (in one CSV or in two) is refused,
    naming both lines. Raises InvalidParameterError for a missing path, a glob with no match, a bad
    column, a listed duplicate or a CSV that cannot be read as UTF-8 text.
    """
    out: list[Source] = []
    listed: dict[str, str] = {}
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = _images(p.rglob("*"), arg, quiet=quiet)
            if not found:
                raise InvalidParameterError(f"{arg}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            out += found
        elif p.is_file() and p.suffix.lower() == ".csv":
            out += _from_csv(p, column, Path(root) if root else None, group, listed)
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


def _from_csv(path: Path, column: str | None, root: Path | None, group: str | None,
              listed: dict[str, str]) -> list[Source]:
    """The sources in column `column` (default `path` or `file`) of CSV file `path`, with their `group` cells;
    `listed` (real path -> where it was listed) refuses an image listed twice."""
    fields, rows = read_csv(path, "CSV file of paths")
    name = column or next((c for c in CSV_COLUMNS if c in fields), None)
    for wanted, option in ((name, "--column"), (group, "--by")):
        if wanted is not None and wanted not in fields or wanted is None and option == "--column":
            shown = repr(wanted) if wanted else "'path' or 'file'"
            raise InvalidParameterError(f"{path}: no column {shown}; its columns are: {', '.join(fields) or '(none)'}"
                                        f". Pass {option} NAME to choose one.")
    assert name is not None
    allowed = (root or path.parent).resolve()
    out = []
    for line, row in rows:
        assert isinstance(row, dict)
        value = (row.get(name) or "").strip()
        cell = (row.get(group) or "(none)") if group else None
        if not value or "\x00" in value:
            out.append(Source(f"{path}:{line}", f"{'empty' if not value else 'NUL character in the'} {name!r} cell",
                              cell))
            continue
        target = Path(value) if Path(value).is_absolute() else path.parent / value
        real = os.path.realpath(target)
        if real in listed:
            raise InvalidParameterError(f"{path}, line {line}: {value!r} is also listed at {listed[real]}; a CSV row "
                                        "is one image (in one group): list each image once")
        listed[real] = f"{path}, line {line}"
        if not Path(real).is_relative_to(allowed):
            out.append(Source(value, f"outside the allowed folder {allowed} (pass --root to allow another)", cell))
        else:
            out.append(Source(str(target), None, cell))
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
