"""Writers for `facerace predict` rows: table, json, jsonl, csv; each row written as it comes."""

from __future__ import annotations

import json
from typing import IO, Any, Sequence

FORMATS = ("table", "json", "jsonl", "csv")


class RowWriter:
    """Writes output rows (dicts with ROW_KEYS) to a text stream in one format."""

    def __init__(self, stream: IO[str], fmt: str, classes: Sequence[str]) -> None:
        self.stream, self.fmt, self.classes = stream, fmt, tuple(classes)
        self.count = 0
        if fmt == "json":
            stream.write("[")
        elif fmt == "csv":
            import csv

            self._csv = csv.writer(stream, lineterminator="\n")
            self._csv.writerow(["path", "face", "status", "x", "y", "w", "h", "label", "confidence", "uncertain",
                                *(f"p_{c}" for c in self.classes), "error"])
        elif fmt == "table":
            stream.write(f"{'path':<40} {'face':>4} {'status':<9} {'label':<16} {'conf':>5} {'uncertain':<9} box\n")

    def write(self, row: dict[str, Any]) -> None:
        if self.fmt == "json":
            self.stream.write(("," if self.count else "") + "\n  " + json.dumps(row))
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(row) + "\n")
        elif self.fmt == "csv":
            box = row["box"] or [None] * 4
            probs = row["probabilities"] or {}
            self._csv.writerow([row["path"], row["face"], row["status"], *box, row["label"], row["confidence"],
                                row["uncertain"], *(probs.get(c) for c in self.classes), row.get("error")])
        else:
            path = row["path"] if len(row["path"]) <= 40 else "..." + row["path"][-37:]
            conf = f"{row['confidence']:.2f}" if row["confidence"] is not None else ""
            label = row["label"] or (row.get("error") or "")[:60]
            unc = "" if row["uncertain"] is None else ("yes" if row["uncertain"] else "no")
            face = "" if row["face"] is None else row["face"]
            box = " ".join(map(str, row["box"])) if row["box"] else ""
            self.stream.write(f"{path:<40} {face!s:>4} {row['status']:<9} {label:<16} {conf:>5} {unc:<9} {box}\n")
        self.count += 1
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n" if self.count else "]\n")
        self.stream.flush()
