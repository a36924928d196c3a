"""Race-labelled face datasets read from their official layouts.

A dataset is named `KIND:PATH`:
- `fairface:DIR`  DIR holds `fairface_label_{train,val}.csv` (header `file,age,gender,race,...`)
  and the image folders they name; one split may be missing.
- `utkface:DIR`   DIR is the `UTKFace` image folder or its parent; labels are in the file
  names `{age}_{gender}_{race}_{datetime}.jpg.chip.jpg`; malformed names are reported, skipped.
- `folder:DIR`    one sub-folder per class (`DIR/White/*.jpg`, ...), or `DIR/<split>/<class>/`.
- `csv:FILE`      a CSV with a path column and a label column (see `open_dataset`), and
  optionally `split`, `gender` and `age` columns; relative paths are against the CSV's folder.
  Genders read as "Female"/"Male" whatever their usual spelling (f, woman, MALE); an empty cell,
  "unknown" or "N/A" is an unknown gender.

Class names of `folder` and `csv` data are matched to the label schemes (case, spaces and
underscores ignored; "Latino", "Hispanic", "Other" accepted), and the finest scheme that
holds all of them becomes the dataset's scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from facerace.errors import DatasetError, InvalidParameterError, check_choice

KINDS = ("fairface", "utkface", "folder", "csv")
UTK_RACES = ("White", "Black", "Asian", "Indian", "Others")
UTK_GENDERS = ("Male", "Female")
#: FairFace's age groups; UTKFace's ages are binned into the same groups.
AGE_GROUPS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")


@dataclass(frozen=True)
class Sample:
    """One labelled image: path, class name in the dataset's scheme, gender and age group if known."""

    path: Path
    label: str
    gender: str | None = None
    age: str | None = None


@dataclass
class Dataset:
    """The samples of one split and what was wrong with the rest.

    `face_padding` locates the face in a crop when the detector finds none (fraction of
    the face size on each side, dlib's `get_face_chip` convention).
    """

    kind: str
    root: Path
    split: str
    scheme: str
    face_padding: float
    samples: list[Sample]
    problems: list[str] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.root}"

    @property
    def title(self) -> str:
        """The dataset and split in words, without its location: "FairFace train", "folder faces (all)"."""
        known = {"fairface": "FairFace", "utkface": "UTKFace"}
        return f"{known[self.kind]} {self.split}" if self.kind in known else f"{self.kind} {self.root.name} ({self.split})"


def parse_spec(spec: str) -> tuple[str, Path]:
    """Split `KIND:PATH` into its parts, validating KIND."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise DatasetError(f"dataset {spec!r} must be written KIND:PATH with KIND one of {', '.join(KINDS)}, "
                           "e.g. fairface:data/fairface")
    return check_choice("dataset kind", kind, KINDS), Path(path)


def open_dataset(spec: str, split: str = "train", *, path_column: str = "path",
                 label_column: str = "label") -> Dataset:
    """Read the samples of `split` from a dataset named `KIND:PATH`.

    `path_column` and `label_column` name the columns of a `csv:` dataset.
    """
    kind, root = parse_spec(spec)
    if kind == "csv":
        if not root.is_file():
            raise DatasetError(f"{root}: no such CSV file (from {spec!r})")
        return read_csv(root, split, path_column, label_column)
    if not root.is_dir():
        hint = archive_hint(root) if root.is_file() else ""
        raise DatasetError(f"{root}: not a folder (from {spec!r}){hint}")
    reader = {"fairface": read_fairface, "utkface": read_utkface, "folder": read_folder}[kind]
    return reader(root, split)


def archive_hint(path: Path) -> str:
    """How to extract an official archive, if `path` is one."""
    name = path.name.lower()
    if name.endswith(".zip"):
        return (f". It is a zip archive: extract it with `unzip {path} -d {path.parent / path.stem}` and put "
                "the fairface_label_*.csv files beside the extracted train/ and val/ folders")
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return (f". It is a tar archive: extract it with `tar -xzf {path} -C {path.parent}`, then use the "
                "UTKFace folder it makes")
    return ""


_ALIASES = {"latino": "Latino_Hispanic", "hispanic": "Latino_Hispanic", "latinohispanic": "Latino_Hispanic",
            "other": "Others"}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def canonical_label(name: str) -> str | None:
    """The scheme class name a free-form label stands for, or None."""
    from facerace.labels import SCHEMES

    names = {_norm(c): c for s in SCHEMES.values() for c in s.classes}
    return names.get(_norm(name)) or _ALIASES.get(_norm(name))


_GENDERS = {"f": "Female", "female": "Female", "woman": "Female", "women": "Female", "w": "Female",
            "m": "Male", "male": "Male", "man": "Male", "men": "Male"}


def canonical_gender(raw: str | None) -> str | None:
    """"Female" or "Male" for their usual spellings (f, woman, MALE, ...), None for an empty cell, "unknown"
    or "?"; any other label as given (spaces trimmed), so that one gender is never counted as two groups."""
    text = (raw or "").strip()
    if _norm(text) in ("", "unknown", "na", "none", "null"):
        return None
    return _GENDERS.get(_norm(text), text)


def infer_scheme(labels: set[str], source: str) -> str:
    """The finest scheme whose classes include every label."""
    from facerace.labels import SCHEMES

    for name in ("fairface7", "race6", "utk5", "race4"):
        if labels <= set(SCHEMES[name].classes):
            return name
    known = sorted({c for s in SCHEMES.values() for c in s.classes})
    raise DatasetError(f"{source}: the labels {sorted(labels)} do not fit one scheme; use class names from: "
                       f"{', '.join(known)}")


def _labelled(kind: str, root: Path, split: str, rows: list[tuple[Path, str, str | None, str | None, str]]) -> Dataset:
    """Build a Dataset from (path, raw label, gender, age, where) rows, checking files and labels."""
    samples, problems = [], []
    for path, raw, gender, age, where in rows:
        label = canonical_label(raw)
        if label is None:
            problems.append(f"{where}: unknown label {raw!r}")
        elif not path.is_file():
            problems.append(f"{where}: {path} is missing")
        else:
            samples.append(Sample(path, label, canonical_gender(gender), age or None))
    if not samples:
        raise DatasetError(f"{root}: no usable labelled images" + (f"; first problem: {problems[0]}" if problems else ""))
    return Dataset(kind, root, split, infer_scheme({s.label for s in samples}, str(root)), 0.25, samples, problems)


def read_folder(root: Path, split: str) -> Dataset:
    """One sub-folder per class, optionally below a split folder (`root/<split>/<class>/`)."""
    from facerace.images import IMAGE_SUFFIXES

    base = root / split if (root / split).is_dir() else root
    files = [(d, f) for d in sorted(p for p in base.iterdir() if p.is_dir() and p.name not in ("train", "val", "test"))
             for f in sorted(d.rglob("*")) if f.is_file()]
    rows = [(f, d.name, None, None, str(f.relative_to(root))) for d, f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise DatasetError(f"{base}: no class sub-folders with images (want {base}/<class>/<image>.jpg)")
    ds = _labelled("folder", root, split if base != root else "all", rows)
    ds.problems += [f"{f.relative_to(root)}: not an image file ({f.suffix or 'no extension'}), skipped"
                    for _, f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    return ds


def read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(column names, [(line number, row)]) of a CSV file, read by the one CSV reader (`csvread.read_csv`);
    DatasetError naming the file (and line) if it cannot be read, is not UTF-8 or not CSV."""
    from facerace.csvread import read_csv as read_rows

    try:
        fields, rows = read_rows(path)
    except InvalidParameterError as exc:
        raise DatasetError(str(exc)) from None
    return fields, [(line, row) for line, row in rows if isinstance(row, dict)]


def read_csv(path: Path, split: str, path_column: str, label_column: str) -> Dataset:
    """A CSV of image paths and labels (optional `split`, `gender`, `age` columns)."""
    fields, table = read_table(path)
    missing = [c for c in (path_column, label_column) if c not in fields]
    if missing:
        raise DatasetError(f"{path}: no column {missing[0]!r}; its columns are: {', '.join(fields)}. "
                           "Pass --path-column and --label-column")
    has_split = "split" in fields
    rows = [(path.parent / (r[path_column] or ""), r[label_column] or "", r.get("gender") or None,
             r.get("age") or None, f"{path.name}:{line}")
            for line, r in table if not has_split or r["split"] == split]
    return _labelled("csv", path, split if has_split else "all", rows)


def read_fairface(root: Path, split: str) -> Dataset:
    """FairFace's official layout: `fairface_label_{split}.csv` and the images it lists."""
    label_file = root / f"fairface_label_{split}.csv"
    if not label_file.is_file():
        present = sorted(p.name for p in root.glob("fairface_label_*.csv"))
        raise DatasetError(
            f"{label_file} not found; this folder has {', '.join(present) or 'no fairface_label_*.csv'}. "
            f"Pass --split with one of the splits present, or point to the folder that holds the label CSVs."
        )
    samples, problems = [], []
    from facerace.labels import SCHEMES

    races = SCHEMES["fairface7"].classes
    fields, table = read_table(label_file)
    missing = {"file", "race"} - set(fields)
    if missing:
        raise DatasetError(f"{label_file}: missing column(s) {sorted(missing)}; "
                           f"expected the official header file,age,gender,race,service_test")
    for line, row in table:
        path = root / (row["file"] or "")
        if row["race"] not in races:
            problems.append(f"{label_file.name}:{line}: unknown race {row['race']!r}")
        elif not path.is_file():
            problems.append(f"{label_file.name}:{line}: {row['file']} is missing")
        else:
            samples.append(Sample(path, row["race"], canonical_gender(row.get("gender")), row.get("age") or None))
    if not samples and problems:
        raise DatasetError(f"none of the images listed in {label_file} exist: {problems[0]}. "
                           + _fairface_images_hint(root, problems[0]))
    return Dataset("fairface", root, split, "fairface7", 0.25, samples, problems)


def _fairface_images_hint(root: Path, problem: str) -> str:
    """Where the listed images really are, if they are somewhere below `root`."""
    listed = problem.split(": ", 1)[1].removesuffix(" is missing")
    for candidate in sorted(root.glob(f"*/{listed}")) + sorted(root.glob(f"*/*/{listed}")):
        folder = candidate.parents[len(Path(listed).parts) - 1]
        return (f"They are under {folder}: the paths in the label CSV are relative to the CSV's folder, so move "
                f"the fairface_label_*.csv files into {folder} and use fairface:{folder}")
    return ("The paths in the label CSV are relative to the CSV's folder: put the CSVs beside the extracted "
            "train/ and val/ image folders")


def utk_age_group(age: int) -> str:
    """The FairFace age group of an age in years."""
    bounds = (2, 9, 19, 29, 39, 49, 59, 69)
    for bound, group in zip(bounds, AGE_GROUPS):
        if age <= bound:
            return group
    return AGE_GROUPS[-1]


def parse_utk_name(name: str) -> Sample | str:
    """A Sample for a UTKFace file name, or the reason the name is malformed."""
    fields = name.split("_")
    if len(fields) < 4:
        return "malformed name (want age_gender_race_datetime)"
    try:
        age, gender, race = int(fields[0]), int(fields[1]), int(fields[2])
    except ValueError:
        return "malformed name (age, gender and race must be integers)"
    if not (0 <= race < len(UTK_RACES) and 0 <= gender < 2 and 0 <= age <= 130):
        return f"out-of-range label (age={age}, gender={gender}, race={race})"
    return Sample(Path(name), UTK_RACES[race], UTK_GENDERS[gender], utk_age_group(age))


def read_utkface(root: Path, split: str) -> Dataset:
    """UTKFace: every `*.jpg` in the `UTKFace` folder (or `root` itself); the split is `all`."""
    if split not in ("all", "test", "val", "train"):
        raise DatasetError(f"unknown split {split!r} for utkface (it has one split: all)")
    folder = root / "UTKFace" if (root / "UTKFace").is_dir() else root
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg")
    if not files:
        raise DatasetError(f"{folder}: no .jpg files; point utkface: to the UTKFace folder or its parent")
    samples, problems = [], [f"{p.name}: not a .jpg file, skipped" for p in sorted(folder.iterdir())
                             if p.is_file() and p.suffix.lower() != ".jpg"]
    for p in files:
        parsed = parse_utk_name(p.name)
        if isinstance(parsed, str):
            problems.append(f"{p.name}: {parsed}")
        else:
            samples.append(Sample(p, parsed.label, parsed.gender, parsed.age))
    return Dataset("utkface", root, "all", "utk5", 0.3, samples, problems)


def race_gender_counts(samples: list[Sample], classes: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """{class: {gender: faces}} of `samples` (faces of unknown gender under "unknown"; genders sorted, "unknown"
    last), classes in the order of `classes` when given, else in order of first appearance."""
    counts: dict[str, dict[str, int]] = {c: {} for c in classes or ()}
    for s in samples:
        row = counts.setdefault(s.label, {})
        row[s.gender or "unknown"] = row.get(s.gender or "unknown", 0) + 1
    return {c: dict(sorted(row.items(), key=lambda kv: (kv[0] == "unknown", kv[0]))) for c, row in counts.items()
            if row}


def dataset_splits(spec: str) -> list[str]:
    """The splits a dataset has (FairFace: those with a label CSV; the others: their one split)."""
    kind, root = parse_spec(spec)
    if kind == "fairface" and root.is_dir():
        found = sorted(p.stem.removeprefix("fairface_label_") for p in root.glob("fairface_label_*.csv"))
        if not found:
            raise DatasetError(f"{root}: no fairface_label_*.csv; a FairFace folder holds fairface_label_train.csv, "
                               "fairface_label_val.csv and the train/ and val/ image folders they name")
        return found
    if kind == "folder" and root.is_dir():
        return [s for s in ("train", "val", "test") if (root / s).is_dir()] or ["all"]
    return ["all"]


def check_dataset(spec: str, *, path_column: str = "path", label_column: str = "label",
                  progress: bool = True) -> dict:
    """Counts per split, class, gender, age group and class x gender (genders sorted, faces of unknown gender
    as "unknown"), and every missing, unreadable or mislabelled file."""
    from collections import Counter

    from facerace.errors import ImageError
    from facerace.images import load_image
    from facerace.labels import SCHEMES
    from facerace.textout import progress_bar

    report: dict = {"spec": spec, "splits": {}, "problems": []}
    for split in dataset_splits(spec):
        ds = open_dataset(spec, split, path_column=path_column, label_column=label_column)
        unreadable = []
        for s in progress_bar(ds.samples, quiet=not progress, desc=f"checking {split}", unit="img", leave=False):
            try:
                load_image(s.path)
            except ImageError as exc:
                unreadable.append(f"{s.path}: {exc.reason}")
        classes = Counter(s.label for s in ds.samples)
        report["splits"][ds.split] = {
            "scheme": ds.scheme,
            "images": len(ds.samples) - len(unreadable),
            "per_class": {c: classes[c] for c in SCHEMES[ds.scheme].classes if classes[c]},
            "per_gender": dict(sorted(Counter(s.gender for s in ds.samples if s.gender).items())),
            "per_age": dict(sorted(Counter(s.age for s in ds.samples if s.age).items(),
                                   key=lambda kv: AGE_GROUPS.index(kv[0]) if kv[0] in AGE_GROUPS else 99)),
            "per_race_gender": race_gender_counts(ds.samples, SCHEMES[ds.scheme].classes)
                               if any(s.gender for s in ds.samples) else {},
        }
        report["problems"] += ds.problems + unreadable
    return report
