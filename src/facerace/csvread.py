"""The one reader of the CSV files users give facerace (paths, groups, labels, datasets, rows read back):
UTF-8 with or without a byte-order mark, lines of bounded length, each row with its line number."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import IO, Iterable, Iterator

from facerace.errors import InvalidParameterError

#: The longest line (bytes) a CSV (or a JSON-lines file read back) may have; csv's own limit on a cell is 131,072.
MAX_LINE = 1 << 20
#: What a line that cannot be read becomes, for the rows of a tolerant `read_csv`.
_BAD_LINE = "\ufdd0"


class BadLine(ValueError):
    """A line of a text file that cannot be read: not UTF-8, or longer than MAX_LINE bytes."""


def text_lines(stream: IO[bytes]) -> Iterator[str | BadLine]:
    """The lines of a binary stream decoded as UTF-8 (a leading BOM dropped); a line that is not UTF-8 or is
    longer than MAX_LINE bytes is a BadLine (the longest is skipped, never held whole)."""
    first = True
    while True:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while (rest := stream.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield BadLine(f"a line over {MAX_LINE:,} bytes")
            continue
        try:
            text = line.decode("utf-8-sig" if first else "utf-8")
        except UnicodeDecodeError as exc:
            yield BadLine(f"not UTF-8 text (byte {exc.start + 1}: {exc.reason})")
        else:
            yield text
        first = False


def read_csv(path: str | Path, what: str = "CSV file", *, tolerant: bool = False
             ) -> tuple[list[str], Iterable[tuple[int, dict[str, str] | str]]]:
    """The one reader of the CSV files users give facerace (paths, groups, labels, rows read back):
    (column names, rows as (line, {column: cell})) of a UTF-8 CSV file with a header (a BOM is dropped).

    A file that cannot be opened or has no header is an InvalidParameterError naming it (as
    `what`). A line that is not UTF-8, a cell over csv's 131,072-character limit or a line over
    MAX_LINE bytes is one too, naming the file and line; the rows are then a list. With
    `tolerant` they are read as they are consumed, and such a row is (line, reason) instead of a
    dict. Rows with fewer cells get None for the missing ones.
    """
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise InvalidParameterError(f"{path}: cannot read this CSV ({exc.strerror or exc})") from None
    lines = text_lines(stream)
    problems: list[str] = []

    def decoded() -> Iterator[str]:
        for line in lines:
            if isinstance(line, BadLine):
                problems.append(str(line))
                yield _BAD_LINE + "\n"
            else:
                yield line

    reader = csv.reader(decoded())
    try:
        header = next(reader, None)
    except (csv.Error, OSError) as exc:
        stream.close()
        raise InvalidParameterError(f"{path}: not a {what} with a header line ({exc})") from None
    if header is None or header == [_BAD_LINE] or not any(header):
        stream.close()
        if problems:
            raise InvalidParameterError(f"{path}: {problems[0]} at line 1; save it as UTF-8 text (any "
                                        "spreadsheet's \"CSV UTF-8\" format)")
        raise InvalidParameterError(f"{path}: not a {what} with a header line (the first line is empty)")

    def rows() -> Iterator[tuple[int, dict[str, str] | str]]:
        with stream:
            while True:
                try:
                    row = next(reader, None)
                    reason = problems.pop() if row == [_BAD_LINE] else None
                except csv.Error as exc:  # a cell over the csv module's size limit, ...
                    row, reason = [], f"not a {what} ({exc})"
                except OSError as exc:
                    raise InvalidParameterError(f"{path}: cannot read this CSV ({exc.strerror or exc})") from None
                if row is None:
                    return
                if reason is not None:
                    if not tolerant:
                        raise InvalidParameterError(f"{path}: {reason} at line {reader.line_num}; save the CSV as "
                                                    "UTF-8 text (any spreadsheet's \"CSV UTF-8\" format)")
                    yield reader.line_num, reason
                elif row:
                    yield reader.line_num, dict(zip(header, row + [None] * (len(header) - len(row))))

    return header, (rows() if tolerant else list(rows()))
