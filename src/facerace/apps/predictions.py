"""Per-face rows read back (`audit --from`): a JSON-lines, CSV or Parquet file, or a folder of Parquet files,
as batches of columns, so that millions of rows stream through in bounded memory.

The file is checked when it is opened: one that cannot be read at all (missing, not the format
its name says, a Parquet footer that does not parse) is an InvalidParameterError naming it. After
that nothing stops the reading: a line or row that cannot be read (not UTF-8, not JSON, nested too
deep, a number too large, a cell over the CSV limit, a Parquet row group that does not decode)
becomes a row with status `error`, counted by the audit.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from facerace.csvread import MAX_LINE, BadLine, read_csv, text_lines
from facerace.errors import InvalidParameterError
from facerace.files import notice
from facerace.labels import SCHEMES

if TYPE_CHECKING:
    import pyarrow as pa

PREDICTION_FORMATS = (".jsonl", ".csv", ".parquet")
#: Rows per batch.
BATCH = 8192


@dataclass(frozen=True)
class RowBatch:
    """Rows as columns: image paths (None for a line or row that could not be read: it belongs to no image),
    statuses, probabilities (n, K) in the order of `classes` (NaN where a row has none in these classes) and,
    when asked for, the cells of one more column (`values`) and the face indices and boxes (`details`)."""

    paths: list[str | None]
    statuses: list[Any]
    probabilities: np.ndarray
    classes: tuple[str, ...] | None
    values: list[Any] | None = None
    faces: list[Any] | None = None
    boxes: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def scheme_of(classes: Iterable[str]) -> str | None:
    """The label scheme whose classes are exactly `classes` (any order), or None."""
    found = set(classes)
    return next((name for name, s in SCHEMES.items() if set(s.classes) == found), None)


def read_batches(path: str | Path, column: str | None = None, *, details: bool = False) -> Iterator[RowBatch]:
    """The rows of a predictions file or Parquet folder, in batches; `column`: also read that column (the
    `--by` one): a CSV or Parquet file without it is an InvalidParameterError; `details`: also the face
    indices and boxes."""
    path = Path(path)
    if path.is_dir():  # a Parquet folder, as `predict --format parquet` and the ray engine write
        return _parquet_batches(_parquet_files(path), column, details)
    suffix = path.suffix.lower()
    if suffix not in PREDICTION_FORMATS:
        raise InvalidParameterError(f"{path}: predictions must be {', '.join(PREDICTION_FORMATS)} or a folder of "
                                    f".parquet files, not {suffix or 'a file without extension'!r}")
    if not path.is_file():
        raise InvalidParameterError(f"{path}: no such predictions file")
    if suffix == ".parquet":
        return _parquet_batches([(path, _parquet_columns(path))], column, details)
    if suffix == ".csv":
        fields, rows = read_csv(path, tolerant=True)
        if column is not None and column not in fields:
            raise InvalidParameterError(f"--by {column}: {path} has no column {column!r}; its columns are: "
                                        f"{', '.join(fields)}")
        return batches_of(_csv_rows(path, rows), column, details=details)
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise InvalidParameterError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return _jsonl_batches(path, stream, column, details)


def read_predictions(path: str | Path, column: str | None = None) -> Iterator[dict[str, Any]]:
    """The rows of `read_batches` one by one, as dicts (path, status, probabilities as {class: p} or None,
    and `column`)."""
    for batch in read_batches(path, column):
        for i in range(len(batch)):
            probs = batch.probabilities[i]
            row = {"path": batch.paths[i], "status": batch.statuses[i],
                   "probabilities": dict(zip(batch.classes, probs.tolist()))
                   if batch.classes and not np.isnan(probs).all() else None}
            if column is not None and batch.values is not None:
                row[column] = batch.values[i]
            yield row


def batches_of(rows: Iterable[dict[str, Any]], column: str | None = None,
               classes: tuple[str, ...] | None = None, *, details: bool = False) -> Iterator[RowBatch]:
    """Dict rows (as `facerace predict` writes them) as batches. The first row whose probabilities name
    exactly a scheme's classes fixes the classes (unless `classes` are given); a row's probabilities of these
    classes are read (other keys ignored, as Arrow's reader does), rows without them get NaN."""
    names: frozenset[str] = frozenset(classes or ())
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if classes is None and isinstance(row.get("probabilities"), dict):
            scheme = scheme_of(row["probabilities"])
            if scheme is not None:
                classes = SCHEMES[scheme].classes
                names = frozenset(classes)
        if len(chunk) >= BATCH:
            yield _batch(chunk, classes, names, column, details)
            chunk = []
    if chunk:
        yield _batch(chunk, classes, names, column, details)


def _batch(rows: list[dict[str, Any]], classes: tuple[str, ...] | None, names: frozenset[str],
           column: str | None, details: bool) -> RowBatch:
    width = len(classes or ())
    nan = [float("nan")] * width
    table = []
    for row in rows:
        probs = row.get("probabilities")
        if classes and isinstance(probs, dict) and probs.keys() >= names:
            table.append([_number(probs[c]) for c in classes])
        else:
            table.append(nan)
    matrix = np.array(table, np.float64).reshape(len(rows), width)
    return RowBatch([None if "where" in r and r.get("path") is None else _text(r.get("path")) for r in rows],
                    [r.get("status") for r in rows], matrix, classes,
                    [r.get(column) for r in rows] if column is not None else None,
                    [r.get("face") for r in rows] if details else None, [r.get("box") for r in rows] if details else None)


def _number(value: Any) -> float:
    """A probability as a float; NaN for anything that is not a number (or a numeric string), or is too large."""
    if isinstance(value, bool):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return float("nan")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "(none)" if value is None else str(value)[:200]


def _error_row(where: str, reason: str) -> dict[str, Any]:
    """A line or row that could not be read: no image path (`where` names the place), status error."""
    return {"path": None, "where": where, "status": "error", "error": reason, "probabilities": None}


#: Bytes of a JSON-lines file parsed at once (by Arrow's JSON reader; a block it refuses is read line by line).
BLOCK = 4 << 20


def _jsonl_batches(path: Path, stream: Any, column: str | None, details: bool) -> Iterator[RowBatch]:
    """A JSON-lines file in blocks of whole lines: each parsed by Arrow's JSON reader once the classes are known
    (fast), else, or when Arrow refuses anything in it, line by line with Python's json (any bad line an
    error row); both give the same rows."""
    classes: tuple[str, ...] | None = None
    line = 1
    with stream:
        while block := stream.read(BLOCK):
            if not block.endswith(b"\n"):
                block += stream.readline(MAX_LINE)  # finish the last line (a longer one is cut: an error row)
                if not block.endswith(b"\n"):
                    while (rest := stream.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                        pass
            fast = _arrow_json(block, classes, column, details) if classes is not None else None
            if fast is not None:
                yield from fast
            else:
                for batch in batches_of(_jsonl_rows(path, io.BytesIO(block), line), column, classes, details=details):
                    classes = classes or batch.classes
                    yield batch
            line += block.count(b"\n") + (not block.endswith(b"\n"))


def _arrow_json(block: bytes, classes: tuple[str, ...], column: str | None, details: bool) -> list[RowBatch] | None:
    """The rows of a block of JSON lines parsed by Arrow (only path, status, the probabilities of `classes` and
    `column`), or None if Arrow refuses any line of it (not JSON, NaN, a number or type it cannot take) or a row
    lacks path or status."""
    import pyarrow as pa
    import pyarrow.json as pj

    fields = [pa.field("path", pa.string()), pa.field("status", pa.string()),
              pa.field("probabilities", pa.struct([pa.field(c, pa.float64()) for c in classes]))]
    if column is not None and column not in ("path", "status", "probabilities"):
        fields.append(pa.field(column, pa.string()))  # a cell of another type: Arrow refuses, Python reads it
    if details:
        fields += [pa.field("face", pa.int64()), pa.field("box", pa.list_(pa.int64()))]
    try:
        table = pj.read_json(io.BytesIO(block), read_options=pj.ReadOptions(block_size=len(block) + 1),
                             parse_options=pj.ParseOptions(explicit_schema=pa.schema(fields),
                                                           unexpected_field_behavior="ignore"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowCapacityError):
        return None
    if table.column("status").null_count or table.column("path").null_count:
        return None  # rows without status or path: read line by line
    return [_arrow_batch(b, column, details) for b in table.to_batches(BATCH)]


def _jsonl_rows(path: Path, stream: Any, first: int = 1) -> Iterator[dict[str, Any]]:
    with stream:
        for line, text in enumerate(text_lines(stream), start=first):
            if isinstance(text, BadLine):
                yield _error_row(f"{path}:{line}", str(text))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as exc:  # not JSON, numbers over Python's digit limit, deep nesting
                yield _error_row(f"{path}:{line}", f"not a JSON line ({type(exc).__name__})")
                continue
            yield row if isinstance(row, dict) and "status" in row else \
                _error_row(f"{path}:{line}", "not a per-face row (no status)")


def _csv_rows(path: Path, rows: Iterator[tuple[int, dict[str, str] | str]]) -> Iterator[dict[str, Any]]:
    """CSV rows (`p_<class>` columns) with their probabilities gathered into a dict; unreadable lines as errors."""
    for line, row in rows:
        if isinstance(row, str):
            yield _error_row(f"{path}:{line}", row)
            continue
        out: dict[str, Any] = {k: v for k, v in row.items() if not k.startswith("p_")}
        probs = {k[2:]: v for k, v in row.items() if k.startswith("p_") and v not in (None, "")}
        out["probabilities"] = probs or None
        if "box" not in out and all(out.get(k) not in (None, "") for k in "xywh"):  # predict's CSV: x, y, w, h
            out["box"] = [out[k] for k in "xywh"]
        yield out if out.get("status") else _error_row(f"{path}:{line}", "not a per-face row (no status)")


# ---- Parquet -------------------------------------------------------------------------------------------------
def _parquet_files(folder: Path) -> list[tuple[Path, list[str]]]:
    """The .parquet files of a folder (recursive, sorted; hidden and `_` files skipped, other kinds skipped with a
    notice), each with its column names."""
    try:
        found = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    except OSError as exc:
        raise InvalidParameterError(f"{folder}: cannot list this folder ({exc.strerror or exc})") from None
    parts = [p for p in found if p.suffix.lower() == ".parquet"]
    if not parts:
        raise InvalidParameterError(f"{folder}: a folder of predictions must hold .parquet files")
    others = [p for p in found if p.suffix.lower() != ".parquet"]
    if others:
        notice(f"{folder}: skipped {len(others)} file(s) that are not .parquet: "
               + ", ".join(p.name for p in others[:5]) + (", ..." if len(others) > 5 else ""))
    return [(p, _parquet_columns(p)) for p in parts]


def _parquet_open(path: Path) -> Any:
    """`path` opened as a ParquetFile (its footer read and checked), or an InvalidParameterError naming it."""
    from facerace.apps.tables import pyarrow

    pyarrow()
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # ArrowInvalid, OSError: not Parquet, truncated, unreadable
        raise InvalidParameterError(f"{path}: not a readable Parquet file ({exc})") from None


def _parquet_columns(path: Path) -> list[str]:
    """The column names of Parquet file `path`, whose footer is checked now (the file is closed again: a folder
    may hold thousands)."""
    with _parquet_open(path) as pf:
        return list(pf.schema_arrow.names)


def _parquet_batches(files: list[tuple[Path, list[str]]], column: str | None, details: bool) -> Iterator[RowBatch]:
    for path, names in files:
        if column is not None and column not in names:
            raise InvalidParameterError(f"--by {column}: {path} has no column {column!r}; its columns are: "
                                        f"{', '.join(names)}")
    return _parquet_rows([path for path, _ in files], column, details)


def _parquet_rows(files: list[Path], column: str | None, details: bool) -> Iterator[RowBatch]:
    for path in files:
        with _parquet_open(path) as pf:
            names = pf.schema_arrow.names
            wanted = [c for c in ("path", "status", "probabilities", column, *(("face", "box") if details else ()))
                      if c is not None and c in names]
            for group in range(pf.num_row_groups):
                yield from _row_group(pf, group, path, list(dict.fromkeys(wanted)), column, details)


def _row_group(pf: Any, group: int, path: Path, columns: list[str], column: str | None, details: bool
               ) -> Iterator[RowBatch]:
    """The batches of one row group; the rows of a row group whose pages do not decode are error rows."""
    total, done = pf.metadata.row_group(group).num_rows, 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH, row_groups=[group], columns=columns):
            done += batch.num_rows
            yield _arrow_batch(batch, column, details)
    except Exception as exc:  # damaged pages, a column Arrow cannot read
        lost = total - done
        notice(f"{path}: row group {group}: {lost} rows unreadable ({exc})")
        yield RowBatch([None] * lost, ["error"] * lost, np.full((lost, 0), np.nan), None,
                       [None] * lost if column else None, [None] * lost if details else None,
                       [None] * lost if details else None)


def _arrow_batch(batch: pa.RecordBatch, column: str | None, details: bool = False) -> RowBatch:
    import pyarrow as pa

    n, names = batch.num_rows, batch.schema.names
    paths = [_text(v) for v in batch.column("path").to_pylist()] if "path" in names else ["(none)"] * n
    statuses = batch.column("status").to_pylist() if "status" in names and \
        pa.types.is_string(batch.schema.field("status").type) else ["error"] * n
    classes, matrix = None, np.full((n, 0), np.nan)
    if "probabilities" in names:
        probs = batch.column("probabilities")
        kind = probs.type
        if pa.types.is_struct(kind):
            fields = [kind.field(i).name for i in range(kind.num_fields)]
            scheme = scheme_of(fields)
            if scheme is not None and len(fields) == len(SCHEMES[scheme].classes):
                classes = SCHEMES[scheme].classes
                matrix = np.column_stack([_floats(probs.field(fields.index(c)), n) for c in classes])
                matrix[probs.is_null().to_numpy(zero_copy_only=False)] = np.nan
        elif pa.types.is_map(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
            rows = [{"probabilities": _pairs(v)} for v in probs.to_pylist()]
            fixed = next(iter(batches_of(rows)), None)
            if fixed is not None:
                classes, matrix = fixed.classes, fixed.probabilities
    values = batch.column(column).to_pylist() if column is not None and column in names else None
    faces, boxes = None, None
    if details:
        faces = batch.column("face").to_pylist() if "face" in names else [None] * n
        boxes = batch.column("box").to_pylist() if "box" in names else [None] * n
    return RowBatch(paths, statuses, matrix, classes, values, faces, boxes)


def _floats(array: pa.Array, n: int) -> np.ndarray:
    """A numeric Arrow array as float64 (nulls NaN); NaN throughout for any other type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_floating(array.type) or pa.types.is_integer(array.type) or pa.types.is_decimal(array.type)):
        return np.full(n, np.nan)
    try:
        return pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return np.full(n, np.nan)


def _pairs(value: Any) -> Any:
    """A map column's (key, value) pairs as a dict; anything else unchanged (and later unusable)."""
    if isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return dict(value)
    return value
