"""The labelled sample of an audit: drawing it (`sample.csv` and face crops) and reading labels back.

A uniform random sample of each group's faces, labelled by a person, lets `facerace audit
--labels` correct the model's estimate on the collection itself (`quantify.validated`). The
guarantee holds only if the labelled faces are a uniform random sample of the audited ones:
`Sampler` draws one (seeded reservoir sampling, while the rows stream by), `read_labels` reads
the answers back, and `LabelFile.match` pairs them with the audited faces by resolved path and
face index. Rows that cannot be used are counted and listed by kind, never used, never fatal.
"""

from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from facerace.errors import InvalidParameterError
from facerace.files import atomic_output
from facerace.labels import MAPPINGS, SCHEMES, convert_probabilities, reachable
from facerace.quantify import Stratum
from facerace.textout import CsvWriter, json_text

#: sample.csv's columns (`label` left empty for the person labelling; `crop`: the face's picture).
SAMPLE_COLUMNS = ("path", "face", "group", "box", "label", "crop")
#: The answer for a detection that is not a face, and for one the person could not label.
NOT_A_FACE = "not a face"
SKIP = "skip"
#: The kinds of unusable label rows, in the order reports list them.
PROBLEMS = {
    "bad_row": "rows without a usable path or face index",
    "unknown_label": "labels that are not a class of the audit's scheme (or of a finer scheme that maps onto it)",
    "conflicting": "faces labelled more than once with different labels (none of their rows is used)",
    "no_face": "rows that match no classified face of the audit",
    "not_a_face": f"faces labelled {NOT_A_FACE!r} (detections that are not faces)",
}
#: How many rows of each kind reports list (all are counted).
LISTED = 50
#: Context around a face box in a crop, as a fraction of the box's larger side, on each side.
CONTEXT = 0.5
CROP_SIDE = 512


def face_key(path: Any, face: Any = 0) -> tuple[str, int]:
    """The key a labelled face is matched by: (resolved path, face index); URLs are kept as they are."""
    text = str(path)
    return (text if "://" in text else str(Path(text).resolve()), int(face))


def _norm(label: str) -> str:
    """A label as compared: case, spacing, `_` and `-` ignored (`east asian` is `East Asian`)."""
    text = unicodedata.normalize("NFKC", label).casefold().replace("_", " ").replace("-", " ")
    return " ".join(text.split())


def _names(scheme: str) -> dict[str, str | None]:
    """Normalised label -> class of `scheme` (None: no counterpart) for its classes and those of every finer
    scheme that maps onto it."""
    out: dict[str, str | None] = {}
    for (finer, coarser), table in MAPPINGS.items():
        if coarser == scheme:
            out.update({_norm(c): t for c, t in table.items()})
    out.update({_norm(c): c for c in SCHEMES[scheme].classes})
    return out


@dataclass(frozen=True)
class Matched:
    """The labels that pair with audited faces: key -> (group, class index) and every unusable row by kind."""

    labels: dict[tuple[str, int], int]
    problems: dict[str, list[str]]
    skipped: int
    duplicates: int
    file: str


@dataclass(frozen=True)
class LabelFile:
    """A labels CSV read: every usable row's (line, key, label as written), and the rows already unusable."""

    file: str
    rows: tuple[tuple[int, tuple[str, int], str], ...]
    problems: dict[str, list[str]] = field(default_factory=dict)
    skipped: int = 0

    def scheme(self, source: str) -> str:
        """The scheme reachable from `source` under which most labels are classes (ties: the finest)."""
        known = {s: sum(_names(s).get(_norm(label)) is not None for _, _, label in self.rows) for s in reachable(source)}
        return max(known, key=lambda s: (known[s], -reachable(source).index(s)))

    def match(self, faces: Iterable[tuple[str, int]], scheme: str) -> Matched:
        """The labels of the classified faces `faces` (keys) as class indices of `scheme`; the other rows by kind."""
        names, classes = _names(scheme), SCHEMES[scheme].classes
        problems = {k: list(v) for k, v in self.problems.items()}
        by_key: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for line, key, label in self.rows:
            if _norm(label) == NOT_A_FACE:
                problems["not_a_face"].append(f"line {line}: {key[0]} face {key[1]}")
            elif names.get(_norm(label)) is None:
                problems["unknown_label"].append(
                    f"line {line}: {label!r}" + (" has no counterpart in" if _norm(label) in names else " is not in")
                    + f" {scheme} ({', '.join(classes)})")
            else:
                by_key.setdefault(key, []).append((line, names[_norm(label)]))
        audited = set(faces)
        labels, duplicates = {}, 0
        for key, answers in by_key.items():
            lines = ", ".join(str(line) for line, _ in answers)
            if len({c for _, c in answers}) > 1:
                problems["conflicting"].append(f"lines {lines}: {key[0]} face {key[1]} is "
                                               + " and ".join(sorted({c for _, c in answers})))
            elif key not in audited:
                problems["no_face"].append(f"line{'s' * (len(answers) > 1)} {lines}: no classified face {key[1]} "
                                           f"in {key[0]}")
            else:
                labels[key] = classes.index(answers[0][1])
                duplicates += len(answers) - 1
        return Matched(labels, problems, self.skipped, duplicates, self.file)


def read_labels(path: str | Path) -> LabelFile:
    """The rows of a labels CSV: columns `path` and `label`, optional `face` (default 0).

    Paths are relative to the CSV's folder, or absolute. Empty labels and `skip` are counted as
    skipped; a row without a path or with a bad face index is a `bad_row` problem. Raises
    InvalidParameterError when the file cannot be read or lacks the columns.
    """
    from facerace.apps.sources import read_csv

    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"--labels {path}: no such file (a CSV with columns path,label[,face])")
    fields, rows = read_csv(path, "CSV file of labels")
    missing = [c for c in ("path", "label") if c not in fields]
    if missing:
        raise InvalidParameterError(f"--labels {path}: no column {' or '.join(map(repr, missing))}; its columns are: "
                                    f"{', '.join(fields) or '(none)'}. A labels CSV has columns path,label[,face]")
    problems: dict[str, list[str]] = {k: [] for k in PROBLEMS}
    out, skipped = [], 0
    for line, row in rows:
        where, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not label or _norm(label) == SKIP:
            skipped += 1
            continue
        face = (row.get("face") or "0").strip()
        if not where or "\x00" in where or not face.isdigit():
            problems["bad_row"].append(f"line {line}: " + ("no path" if not where or "\x00" in where
                                                             else f"face {face!r} is not a face index (0, 1, ...)"))
            continue
        target = where if "://" in where or Path(where).is_absolute() else path.parent / where
        try:
            out.append((line, face_key(target, int(face)), label))
        except (OSError, RuntimeError, ValueError) as exc:  # a path that cannot be resolved (loops, too long)
            problems["bad_row"].append(f"line {line}: {where!r}: {exc}")
    return LabelFile(str(path), tuple(out), problems, skipped)


class Collector:
    """What an audit keeps of its classified faces beside their per-group statistics, as the rows stream by: the
    labelled ones (matched by resolved path and face index, their probabilities in the audit's `scheme`, decided
    at the first face when None), each group's mean probabilities in that scheme, and the sample being drawn."""

    def __init__(self, labels: LabelFile | None, sampler: Sampler | None, scheme: str | None) -> None:
        self.labels, self.sampler, self.scheme = labels, sampler, scheme
        self._wanted = {key for _, key, _ in labels.rows} if labels is not None else set()
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}
        self._found: dict[tuple[str, int], tuple[list[str], np.ndarray]] = {}
        self._matched: Matched | None = None

    def add(self, row: dict[str, Any], groups: list[str], source: str, vector: np.ndarray) -> None:
        """One classified face: its row, its groups (`all` first, then its own if grouped), its probabilities in
        scheme `source`."""
        if self.scheme is None:
            self.scheme = self.labels.scheme(source) if self.labels is not None else source
        if self.sampler is not None:
            self.sampler.add(groups[-1], row)
        if self.labels is None:
            return
        coarse = convert_probabilities(vector[None], source, self.scheme)[0]
        for g in groups:
            self._sums[g] = self._sums.get(g, 0) + coarse
            self._counts[g] = self._counts.get(g, 0) + 1
        try:
            key = face_key(row.get("path"), row.get("face") or 0)
        except (OSError, RuntimeError, ValueError, TypeError):  # a path that cannot be resolved matches no label
            return
        if key in self._wanted:
            self._found[key] = (groups, coarse)

    def matched(self) -> Matched | None:
        """The labels paired with the audited faces (None without labels); call once all rows are in."""
        if self.labels is not None and self._matched is None:
            self._matched = self.labels.match(self._found, self.scheme or "")
        return self._matched

    def labelled_faces(self, group: str) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, K) in the audit's scheme, true class indices (n,)) of `group`'s labelled faces."""
        matched = self.matched()
        k = len(SCHEMES[self.scheme].classes) if self.scheme else 0
        keys = [key for key, (groups, _) in self._found.items() if group in groups and matched
                and key in matched.labels]
        if not keys:
            return np.zeros((0, k)), np.zeros(0, np.int64)
        return (np.stack([self._found[key][1] for key in keys]),
                np.array([matched.labels[key] for key in keys], np.int64))

    def labelled(self, group: str) -> int:
        return len(self.labelled_faces(group)[1])

    def strata(self, matched: Matched) -> dict[str, Stratum]:
        """Each group with at least 2 labelled faces as a `quantify.Stratum`."""
        out = {}
        for group, n in self._counts.items():
            probs, truth = self.labelled_faces(group)
            if len(truth) >= 2:
                out[group] = Stratum(self._sums[group] / n, n, probs, truth)
        return out


# ---- drawing the sample ---------------------------------------------------------------------------------
class Sampler:
    """A seeded uniform random sample of `size` faces per group, drawn while the rows stream by (reservoir
    sampling, algorithm R: every classified face of a group is equally likely to be in its sample)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if size < 1:
            raise InvalidParameterError(f"--sample must be at least 1 face per group, got {size}")
        self.size = size
        self._rng = np.random.default_rng(seed)
        self._seen: dict[str, int] = {}
        self.faces: dict[str, list[dict[str, Any]]] = {}

    def add(self, group: str, row: dict[str, Any]) -> None:
        """Offer one classified face (a per-face row) of `group`."""
        seen = self._seen.get(group, 0)
        kept = self.faces.setdefault(group, [])
        face = {"path": str(row.get("path")), "face": _index(row.get("face")), "box": _box(row.get("box"))}
        if seen < self.size:
            kept.append(face)
        else:
            slot = int(self._rng.integers(0, seen + 1))
            if slot < self.size:
                kept[slot] = face
        self._seen[group] = seen + 1

    def write(self, out: str | Path) -> Path:
        """Write `sample.csv` (label empty) and each face's crop under `sample/` in folder `out`; return the CSV.

        A face whose image cannot be read again keeps its row, with an empty `crop`."""
        out = Path(out)
        (out / "sample").mkdir(parents=True, exist_ok=True)
        rows = []
        for group in sorted(self.faces):
            for face in sorted(self.faces[group], key=lambda f: (f["path"], f["face"])):
                rows.append({"path": _resolved(face["path"]), "face": face["face"], "group": group,
                             "box": json_text(face["box"]), "label": "", "crop": ""})
        for i, row in enumerate(rows, 1):
            name = f"sample/{i:05d}.jpg"
            if save_crop(row["path"], json.loads(row["box"]), out / name):
                row["crop"] = name
        write_csv_atomic(out / "sample.csv", SAMPLE_COLUMNS, rows)
        return out / "sample.csv"


def _index(value: Any) -> int:
    """A row's face index as a whole number (0 where it has none or it is not one >= 0)."""
    try:
        return max(0, int(value))
    except (TypeError, ValueError, OverflowError):
        return 0


def _box(value: Any) -> list[int] | None:
    """A row's face box [x, y, w, h] in whole pixels (a list, or its JSON text in a CSV); None if it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        return None
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
        return None
    return [int(round(v)) for v in box]


def _resolved(path: str) -> str:
    """`path` as labels are matched (`face_key`), or as written if it cannot be resolved."""
    try:
        return face_key(path)[0]
    except (OSError, RuntimeError, ValueError):
        return path


def save_crop(image: str, box: Sequence[float] | None, target: Path) -> bool:
    """Save the face `box` ([x, y, w, h]) of `image` with CONTEXT around it, at most CROP_SIDE px, as JPEG."""
    from PIL import Image

    from facerace.errors import ImageError
    from facerace.images import load_image

    try:
        rgb = load_image(image)
    except (ImageError, OSError, InvalidParameterError):
        return False
    h, w = rgb.shape[:2]
    x, y, bw, bh = (float(v) for v in box) if box and len(box) == 4 else (0.0, 0.0, float(w), float(h))
    pad = CONTEXT * max(bw, bh)
    left, top = max(0, int(x - pad)), max(0, int(y - pad))
    right, bottom = min(w, int(np.ceil(x + bw + pad))), min(h, int(np.ceil(y + bh + pad)))
    if right <= left or bottom <= top:
        left, top, right, bottom = 0, 0, w, h
    crop = Image.fromarray(rgb[top:bottom, left:right])
    crop.thumbnail((CROP_SIDE, CROP_SIDE))
    crop.save(target, quality=90)
    return True


def write_csv_atomic(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write a CSV so that `path` always holds either the old or the whole new file (`files.atomic_output`),
    flushed to the disk before it replaces the old one."""
    with atomic_output(path, "w", newline="", encoding="utf-8") as f:
        writer = CsvWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
