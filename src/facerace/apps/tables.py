"""Parquet output: the Arrow schemas of `predict` and `embed` rows, shared by the local and the Ray engine.

Output is a Parquet *dataset*: a folder of `.parquet` files (the local engine writes one,
`part-00000.parquet`; Ray writes files of about 10,000 rows), read back whole by
`pyarrow.parquet.read_table(folder)`, `pandas.read_parquet(folder)`, DuckDB or Spark.
Local paths and s3:// / gs:// URIs are both accepted (through pyarrow's file systems).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from facerace.errors import InvalidParameterError, MissingDependencyError
from facerace.results import LANDMARK_NAMES, ROW_KEYS
from facerace.textout import utf8_text
from facerace.version import __version__

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs

    from facerace.predictor import Predictor

#: The columns of `predict` rows: the JSONL row keys in their order, then the error (null unless status is "error").
PREDICT_COLUMNS = (*ROW_KEYS, "error")
#: Rows per row group of the local writer (and per flush of its buffer).
ROW_GROUP = 4096
#: The one file of the local writer.
PART_FILE = "part-00000.parquet"
#: The hidden file that claims a local output folder for one run.
CLAIM_FILE = ".facerace-run"


def pyarrow() -> Any:
    """The pyarrow module, or MissingDependencyError naming the extra to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "Parquet output needs pyarrow: pip install 'facerace[parquet]' (or 'facerace[ray]')") from None
    return pa


def predict_schema(classes: Sequence[str]) -> pa.Schema:
    """Arrow schema of `predict` rows (PREDICT_COLUMNS): box a list of 4 int32 [x, y, w, h], probabilities a
    struct class -> float64, landmarks a struct name -> [x, y] float64.

    List items are named "element", as Parquet names them, so a schema read back equals this one.
    """
    pa = pyarrow()
    point = pa.list_(pa.field("element", pa.float64()), 2)
    types = {
        "path": pa.string(), "face": pa.int32(), "status": pa.string(),
        "box": pa.list_(pa.field("element", pa.int32()), 4),
        "label": pa.string(), "confidence": pa.float64(), "uncertain": pa.bool_(),
        "probabilities": pa.struct([pa.field(c, pa.float64()) for c in classes]),
        "landmarks": pa.struct([pa.field(name, point) for name in LANDMARK_NAMES]),
        "detection_score": pa.float64(), "error": pa.string(),
    }
    return pa.schema([pa.field(c, types[c], nullable=c not in ("path", "status")) for c in PREDICT_COLUMNS],
                     metadata={"facerace.rows": "predict", "facerace.version": __version__})


def embed_schema(dim: int, backbone: str) -> pa.Schema:
    """Arrow schema of `embed` rows: embedding a list of `dim` float32; the backbone is in the metadata."""
    pa = pyarrow()
    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("face", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("box", pa.list_(pa.field("element", pa.int32()), 4)),
        pa.field("embedding", pa.list_(pa.field("element", pa.float32()), dim)),
        pa.field("error", pa.string()),
    ], metadata={"facerace.rows": "embed", "facerace.version": __version__, "facerace.backbone": backbone})


def row_schema(kind: str, predictor: Predictor) -> pa.Schema:
    """The schema of `kind` ("predict" or "embed") rows of `predictor` ("embed" loads its backbone for its size)."""
    if kind == "predict":
        return predict_schema(predictor.classes)
    backbone = predictor.get_backbone()
    return embed_schema(backbone.dim, f"{backbone.name} ({backbone.version})")


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """An Arrow table of rows (missing keys become nulls, extra keys are dropped)."""
    pa = pyarrow()
    names = schema.names
    return pa.Table.from_pylist([{k: _text(row.get(k)) for k in names} for row in rows], schema=schema)


def _text(value: Any) -> Any:
    """A string cell as valid UTF-8 (`utf8_text`: a file name's undecodable bytes as `\\udcXX`); others as they are."""
    return utf8_text(value) if isinstance(value, str) else value


#: How long one gs:// call may retry: google-cloud-cpp's default (15 minutes) makes a missing credential look
#: like a hang.
GCS_RETRY_SECONDS = 30


def filesystem(uri: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow file system and path of a local path or an s3:// / gs:// URI (gs:// calls retry for at most
    GCS_RETRY_SECONDS unless the URI sets retry_limit_seconds)."""
    pyarrow()
    from pyarrow import fs

    text = str(uri)
    if "://" in text:
        if text.startswith("gs://") and "retry_limit_seconds=" not in text:
            text += ("&" if "?" in text else "?") + f"retry_limit_seconds={GCS_RETRY_SECONDS}"
        try:
            return fs.FileSystem.from_uri(text)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with the reason
            raise InvalidParameterError(f"{uri}: cannot open this location ({exc})") from None
    return fs.LocalFileSystem(), str(Path(text).resolve())


def check_new_folder(uri: str | Path) -> None:
    """Refuse an output that is a file or a folder already holding files (two runs' rows would mix)."""
    from pyarrow import fs

    filesys, path = filesystem(uri)
    try:
        info = filesys.get_file_info(path)
        holds_files = info.type == fs.FileType.Directory and filesys.get_file_info(fs.FileSelector(path))
    except OSError as exc:  # no network, no credentials, no such bucket
        raise InvalidParameterError(f"{uri}: cannot reach this location ({exc})") from None
    if info.type == fs.FileType.File:
        raise InvalidParameterError(f"{uri} is a file; Parquet output is a folder of files: give a new folder")
    if holds_files:
        raise InvalidParameterError(f"{uri} already holds files; write to a new folder (or delete it) so the rows "
                                    f"of two runs do not mix")


def new_output_folder(uri: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """Create the output folder `uri` (local, s3:// or gs://) once `check_new_folder` accepts it; return its file
    system and path. Called before any image is analysed, so an output that cannot be written loses no work.
    A local folder is claimed for this run with an exclusively created CLAIM_FILE (hidden: readers of the
    folder skip it), so a second run started into the same folder at the same moment is refused."""
    from pyarrow import fs

    check_new_folder(uri)
    filesys, path = filesystem(uri)
    try:
        filesys.create_dir(path, recursive=True)
        if isinstance(filesys, fs.LocalFileSystem):
            with open(f"{path}/{CLAIM_FILE}", "x") as claim:
                claim.write(f"{os.getpid()}\n")
    except FileExistsError:
        raise InvalidParameterError(f"{uri}: another run is writing into this folder; give a new folder so the rows "
                                    "of two runs do not mix") from None
    except OSError as exc:  # read-only folder, missing bucket, no permission
        raise InvalidParameterError(f"{uri}: cannot write there ({exc})") from None
    return filesys, path


def release_output_folder(uri: str | Path) -> None:
    """Give up the claim on a local output folder that holds nothing else (the run stopped before writing
    anything), so that the same command can be run again."""
    from pyarrow import fs

    filesys, path = filesystem(uri)
    if isinstance(filesys, fs.LocalFileSystem) and Path(path).is_dir() and \
            [p.name for p in Path(path).iterdir()] == [CLAIM_FILE]:
        (Path(path) / CLAIM_FILE).unlink()


class ParquetRowWriter:
    """Writes rows to FOLDER/part-00000.parquet as they come (buffered in row groups); `close()` finishes the file.

    A local file is written under a hidden name (`.part-00000.parquet.partial`, which readers of the folder skip),
    created exclusively, so a second run writing into the same folder is refused at the start; `close()` (also
    after Ctrl-C) renames it. An object store's file appears only when it is complete.
    """

    def __init__(self, folder: str | Path, schema: pa.Schema) -> None:
        import pyarrow.parquet as pq
        from pyarrow import fs

        filesys, path = new_output_folder(folder)
        self._final = f"{path}/{PART_FILE}"
        self._partial: str | None = None
        try:
            if isinstance(filesys, fs.LocalFileSystem):
                self._partial = f"{path}/.{PART_FILE}.partial"
                sink: Any = open(self._partial, "xb")
            else:
                sink = self._final
            self._writer = pq.ParquetWriter(sink, schema, filesystem=None if self._partial else filesys)
        except FileExistsError:
            raise InvalidParameterError(f"{folder}: another run is writing into this folder; give a new folder so "
                                        f"the rows of two runs do not mix") from None
        except OSError as exc:
            raise InvalidParameterError(f"{folder}: cannot write there ({exc})") from None
        self._sink = sink if self._partial else None
        self.schema, self.count = schema, 0
        self._rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self.count += 1
        if len(self._rows) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            rows, self._rows = self._rows, []
            self._writer.write_table(to_table(rows, self.schema))

    def close(self) -> None:
        """Write the buffered rows and finish the file (renamed to its final name)."""
        try:
            self._flush()
        finally:
            self._writer.close()
            if self._sink is not None:
                self._sink.close()
                os.replace(self._partial, self._final)
                self._sink = None


def read_rows(folder: str | Path, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the rows of a Parquet output folder (local or s3:// / gs://) as dicts, batch by batch."""
    import pyarrow.dataset as ds

    filesys, path = filesystem(folder)
    dataset = ds.dataset(path, format="parquet", filesystem=filesys)
    for batch in dataset.to_batches(columns=list(columns) if columns else None):
        yield from batch.to_pylist()
