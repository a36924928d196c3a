"""Writers for `facerace predict` rows: table, json, jsonl, csv; each row written as it comes.

(parquet, binary, goes to a folder through facerace.apps.tables.ParquetRowWriter.)
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any, Sequence

from facerace.errors import InvalidParameterError
from facerace.results import LANDMARK_NAMES
from facerace.textout import CsvWriter, fit, json_text, printable

FORMATS = ("table", "json", "jsonl", "csv", "parquet")

#: The format an output file's extension implies (`-o` without `--format`).
EXTENSION_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".txt": "table",
                     ".parquet": "parquet"}

#: Table columns: (title, width); the last column (box, or the error) takes the rest of the line.
TABLE_COLUMNS = (("path", 40), ("face", 4), ("status", 9), ("label", 16), ("conf", 5), ("uncertain", 9))
ERROR_WIDTH = 100
RIGHT_ALIGNED = ("face", "conf")


def output_format(fmt: str | None, output: Path | None, terminal: bool) -> str:
    """The format to write: `fmt` if given, else the one `output`'s extension names, else a table
    on a terminal and JSON lines otherwise. An output file with another extension needs `fmt`."""
    if fmt:
        return fmt
    if output is None:
        return "table" if terminal else "jsonl"
    try:
        return EXTENSION_FORMATS[output.suffix.lower()]
    except KeyError:
        known = ", ".join(f"{ext} ({f})" for ext, f in EXTENSION_FORMATS.items())
        raise InvalidParameterError(
            f"cannot tell the format of {output} from its extension ({known}); "
            f"pass --format {{{','.join(FORMATS)}}}") from None


def csv_header(classes: Sequence[str]) -> list[str]:
    """The CSV columns: the row keys flattened (box -> x y w h, probabilities -> p_CLASS, landmarks
    -> NAME_x NAME_y); columns added later come last, so existing ones keep their positions."""
    return ["path", "face", "status", "x", "y", "w", "h", "label", "confidence", "uncertain",
            *(f"p_{c}" for c in classes), "error", "detection_score",
            *(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy")]


class RowWriter:
    """Writes output rows (dicts with ROW_KEYS) to a text stream in one of the text formats."""

    def __init__(self, stream: IO[str], fmt: str, classes: Sequence[str]) -> None:
        self.stream, self.fmt, self.classes = stream, fmt, tuple(classes)
        self.count = 0
        if fmt == "json":
            stream.write("[")
        elif fmt == "csv":
            self._csv = CsvWriter(stream)
            self._csv.writerow(csv_header(self.classes))
        elif fmt == "table":
            stream.write(" ".join(_cell(t, t, w) for t, w in TABLE_COLUMNS) + " box or error\n")

    def write(self, row: dict[str, Any]) -> None:
        if self.fmt == "json":
            self.stream.write(("," if self.count else "") + "\n  " + json_text(row))
        elif self.fmt == "jsonl":
            self.stream.write(json_text(row) + "\n")
        elif self.fmt == "csv":
            box = row["box"] or [None] * 4
            probs = row["probabilities"] or {}
            marks = row.get("landmarks") or {}
            self._csv.writerow([row["path"], row["face"], row["status"], *box, row["label"], row["confidence"],
                                row["uncertain"], *(probs.get(c) for c in self.classes), row.get("error"),
                                row.get("detection_score"),
                                *(v for name in LANDMARK_NAMES for v in marks.get(name, (None, None)))])
        else:
            self.stream.write(table_line(row) + "\n")
        self.count += 1
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n" if self.count else "]\n")
        self.stream.flush()


def table_line(row: dict[str, Any]) -> str:
    """One row as a line of fixed-width columns: every cell escaped (no control characters) and cut
    to its column (a long path keeps its end); an error's message goes in the last column."""
    conf = f"{row['confidence']:.2f}" if row["confidence"] is not None else ""
    unc = "" if row["uncertain"] is None else ("yes" if row["uncertain"] else "no")
    face = "" if row["face"] is None else str(row["face"])
    last = " ".join(map(str, row["box"])) if row["box"] else ""
    if row.get("error"):
        last = fit(printable(row["error"]), ERROR_WIDTH).rstrip()
    cells = [printable(row["path"]), face, row["status"], printable(row["label"] or ""), conf, unc]
    columns = " ".join(_cell(cell, title, width) for cell, (title, width) in zip(cells, TABLE_COLUMNS))
    return f"{columns} {last}".rstrip()


def _cell(text: str, title: str, width: int) -> str:
    cut = fit(text, width, keep="end" if title == "path" else "start")
    return cut.strip().rjust(width) if title in RIGHT_ALIGNED else cut
