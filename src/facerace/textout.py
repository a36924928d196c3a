"""Text that leaves facerace: CSV cells a spreadsheet will not run, JSON without NaN, terminal text without
control characters, Markdown and plot labels that show a name as written, and progress bars only on a terminal."""

from __future__ import annotations

import csv
import html
import json
import math
import numbers
import unicodedata
from typing import IO, Any, Iterable, Mapping, Sequence

#: A CSV cell starting with one of these is a formula to a spreadsheet (OWASP's list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

#: Invisible characters that reorder the text around them on a terminal (bidirectional controls).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def csv_cell(value: Any) -> Any:
    """`value` safe for a spreadsheet: numbers (numpy's too) and None unchanged; anything else is
    written as text (paths included), with a leading `'` if it starts with = + - @ tab or CR (the
    OWASP rule), and as valid UTF-8 (`utf8_text`: a file name's undecodable bytes as `\\udcXX`)."""
    if value is None or isinstance(value, numbers.Number):
        return value
    text = utf8_text(str(value))
    return "'" + text if text.startswith(FORMULA_STARTS) else text


class CsvWriter:
    """`csv.writer` whose every string cell goes through `csv_cell`; the only way facerace writes CSV.

    Rows are sequences, or dicts when `fieldnames` is given (like `csv.DictWriter`; missing keys
    are empty cells)."""

    def __init__(self, stream: IO[str], fieldnames: Sequence[str] | None = None) -> None:
        self._writer = csv.writer(stream, lineterminator="\n")
        self.fieldnames = tuple(fieldnames) if fieldnames is not None else None

    def writeheader(self) -> None:
        if self.fieldnames is None:
            raise TypeError("writeheader() needs the fieldnames given to CsvWriter")
        self.writerow(self.fieldnames)

    def writerow(self, row: Iterable[Any] | Mapping[str, Any]) -> None:
        if isinstance(row, Mapping):
            if self.fieldnames is None:
                raise TypeError("dict rows need the fieldnames given to CsvWriter")
            row = [row.get(name) for name in self.fieldnames]
        self._writer.writerow([csv_cell(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any] | Mapping[str, Any]]) -> None:
        for row in rows:
            self.writerow(row)


def json_text(data: Any, *, indent: int | None = None) -> str:
    """`data` as strict JSON, the only way facerace writes JSON: NaN and infinities (Python's or numpy's) become
    null, numpy scalars and arrays plain numbers and lists, anything else unknown its str()."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False, default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _finite(value.tolist())
    if isinstance(value, numbers.Real):
        return _finite(float(value))
    return value


#: The characters that make Markdown structure inside a line (emphasis, code, links, images, tables, HTML,
#: math, headings and list markers): each is backslash-escaped (CommonMark allows it for any punctuation).
_MARKDOWN_SPECIAL = frozenset("\\`*_[]()#+-!|~$=")


def markdown_text(text: object) -> str:
    """`text` (a file, folder or group name) for Markdown, shown as written: control characters and line breaks
    as visible escapes (`printable`), the characters of Markdown structure backslash-escaped, and `<`, `>`, `&`
    as HTML entities, so no name makes a heading, link, table cell, list, math or HTML tag."""
    out = []
    for ch in printable(text):
        if ch in "<>&":
            out.append(html.escape(ch))
        elif ch in _MARKDOWN_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def plot_text(text: object, *, width: int = 80) -> str:
    """`text` for a matplotlib label: control characters escaped (`printable`), `$` escaped so that it never
    starts mathtext, cut to `width` characters."""
    shown = printable(text)
    if len(shown) > width:
        shown = shown[:width - 1] + "…"
    return shown.replace("$", r"\$")


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """`text` for a terminal: control characters (escape sequences, CR, backspace, ...), bidirectional
    controls and undecodable bytes of file names shown as Python escapes (`\\x1b`, `\\u202e`), so a
    file name cannot move the cursor, recolour or rewrite what is shown. `keep_newlines` keeps `\\n`
    (for messages of several lines)."""
    out = []
    for ch in str(text):
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":  # a byte of a file name that is not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch in _BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Cs"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def utf8_text(text: str) -> str:
    """`text` as valid UTF-8 text: bytes of a file name that are not UTF-8 (surrogateescape's `\\udc80`-`\\udcff`)
    and other lone surrogates written as `\\udcXX` escapes, the rest unchanged (what Parquet and CSV cells hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def display_width(text: str) -> int:
    """Terminal columns `text` takes: wide (CJK) characters 2, combining marks 0, others 1."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def fit(text: str, width: int, *, keep: str = "start") -> str:
    """`text` cut to at most `width` terminal columns with `…` where it was cut (keeping its
    start, or with keep="end" its end, e.g. a path's file name), padded to `width`."""
    if display_width(text) > width:
        chars = list(text) if keep == "start" else list(reversed(text))
        kept: list[str] = []
        used = 1  # the ellipsis
        for ch in chars:
            used += display_width(ch)
            if used > width:
                break
            kept.append(ch)
        text = "".join(kept) + "…" if keep == "start" else "…" + "".join(reversed(kept))
    return text + " " * (width - display_width(text))


def progress_bar(iterable: Iterable[Any] | None = None, *, quiet: bool = False, **kwargs: Any):
    """A tqdm bar on stderr, shown only when stderr is a terminal and not `quiet`."""
    from tqdm import tqdm

    return tqdm(iterable, disable=True if quiet else None, **kwargs)
