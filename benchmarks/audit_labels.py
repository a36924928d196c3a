"""`facerace audit --labels` end to end, as a reviewer would check it: folders of another dataset, a labelled
random sample per folder in a CSV beside them (paths relative to the CSV, utk5 labels), error and coverage per
folder and class.

    python benchmarks/audit_labels.py --utkface ../shared/datasets/utkface --work /tmp/audit-labels

Folders: `--folders` folders of `--faces` UTKFace images each, with different class mixes (drawn
without replacement, seeded), linked into `--work`. The images are predicted once (`facerace.audit`
writes faces.jsonl); then `--draws` times a uniform random sample of `--labelled` faces per folder
is written as labels.csv (in a sub-folder, paths relative to it) and audited with `--from
faces.jsonl --by folder --labels labels.csv` (no --scheme: the labels' scheme is chosen). The truth
is each folder's true composition among the faces the detector found.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np

import facerace
from facerace.apps.audit import Engine
from facerace.training.runs import environment

UTK5 = ("White", "Black", "Asian", "Indian", "Others")
MIXES = ([0.6, 0.1, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.1, 0.1], [0.2, 0.1, 0.2, 0.4, 0.1], [0.3, 0.3, 0.1, 0.1, 0.2])


def utk_label(name: str) -> int | None:
    parts = name.split("_")
    return int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() and int(parts[2]) < 5 else None


def build(utkface: Path, work: Path, folders: int, faces: int, rng: np.random.Generator) -> dict[str, str]:
    """Link the folders' images into `work`; return resolved image path -> true utk5 class."""
    files = sorted(p for p in (utkface / "UTKFace").iterdir() if p.suffix == ".jpg" and utk_label(p.name) is not None)
    pools = [[p for p in files if utk_label(p.name) == c] for c in range(5)]
    truth = {}
    for f in range(folders):
        folder = work / f"folder{f + 1}"
        folder.mkdir(parents=True)
        counts = np.round(np.array(MIXES[f % len(MIXES)]) * faces).astype(int)
        for c, k in enumerate(counts):
            chosen = rng.choice(len(pools[c]), k, replace=False)
            for i in chosen:
                image = pools[c][i]
                os.symlink(image, folder / image.name)
                truth[str((folder / image.name).resolve())] = UTK5[c]
            left = np.ones(len(pools[c]), bool)
            left[chosen] = False
            pools[c] = [p for p, keep in zip(pools[c], left) if keep]  # no image in two folders
    return truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utkface", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="a new folder for the linked images and the runs")
    ap.add_argument("--folders", type=int, default=3)
    ap.add_argument("--faces", type=int, default=300, help="images per folder")
    ap.add_argument("--labelled", type=int, default=100, help="labelled faces per folder")
    ap.add_argument("--draws", type=int, default=50, help="labelled samples drawn (audits run)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    truth = build(args.utkface, args.work, args.folders, args.faces, rng)
    folders = sorted(str(p) for p in args.work.iterdir() if p.is_dir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        facerace.audit(folders, by="folder", model=args.model, out=args.work / "predicted", replicates=50,
                       engine=Engine(workers=1), quiet=True)
    rows = [json.loads(line) for line in (args.work / "predicted" / "faces.jsonl").read_text().splitlines()]
    found = [r for r in rows if r["status"] == "ok"]
    by_folder: dict[str, list[dict]] = {}
    for r in found:
        by_folder.setdefault(str(Path(r["path"]).parent), []).append(r)
    true_shares = {g: np.array([sum(truth[str(Path(r["path"]).resolve())] == c for r in faces) / len(faces)
                                for c in UTK5]) for g, faces in by_folder.items()}
    everyone = np.concatenate([[truth[str(Path(r["path"]).resolve())] for r in found]])
    true_shares["all"] = np.array([np.mean(everyone == c) for c in UTK5])
    labels_dir = args.work / "labels"
    labels_dir.mkdir()
    errors: dict[str, list[np.ndarray]] = {}
    hits: dict[str, list[np.ndarray]] = {}
    widths: list[float] = []
    for draw in range(args.draws):
        picked = [faces[i] for faces in by_folder.values()
                  for i in rng.choice(len(faces), min(args.labelled, len(faces)), replace=False)]
        with open(labels_dir / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", "face", "label"], *[
                [os.path.relpath(r["path"], labels_dir), r["face"], truth[str(Path(r["path"]).resolve())]]
                for r in picked]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = facerace.audit(predictions=args.work / "predicted" / "faces.jsonl", by="folder",
                                    model=args.model, labels=labels_dir / "labels.csv", quiet=True)
        assert result.scheme == "utk5" and result.method == "validated"
        for g in result.groups:
            est, low, high = (np.array(v) for v in (g.estimate, g.ci_low, g.ci_high))
            t = true_shares[g.name]
            errors.setdefault(g.name, []).append(np.abs(est - t))
            hits.setdefault(g.name, []).append((low <= t + 1e-9) & (t <= high + 1e-9))
            widths.append(float(np.mean(high - low)))
    env = environment()
    print(f"model `{args.model}`; {args.folders} folders of {args.faces} UTKFace images ({len(found)} faces found), "
          f"{args.labelled} labelled per folder, {args.draws} draws; seed {args.seed}; {env['date']}; "
          f"{env['machine']}; facerace {env['facerace']}\n")
    print("| group | " + " | ".join(f"{c}: MAE / coverage" for c in UTK5) + " | all classes |")
    print("|---" * (len(UTK5) + 2) + "|")
    for g in errors:
        e, h = np.array(errors[g]), np.array(hits[g])
        print(f"| {'all' if g == 'all' else Path(g).name} | "
              + " | ".join(f"{100 * e[:, c].mean():.2f} / {h[:, c].mean():.0%}" for c in range(len(UTK5)))
              + f" | {100 * e.mean():.2f} / {h.mean():.1%} |")
    print(f"\nmean interval width {100 * np.mean(widths):.1f} points")


if __name__ == "__main__":
    main()
