"""Models side by side per gender and race x gender, on FairFace val and on UTKFace (cross-dataset).

    python benchmarks/genders.py --fairface ../shared/datasets/fairface --utkface ../shared/datasets/utkface \
        --model OLD_MODEL_DIR --model default [--model fast]

For each dataset: accuracy overall and per gender, the gap between genders (men - women, points), ECE per
gender, and per race x gender group the accuracy of every model with its change against the first model
(groups of fewer than 50 faces are marked, not rated). Embeddings are cached, so a rerun only re-scores.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from facerace.training.datasets import open_dataset
from facerace.training.evaluate import evaluate
from facerace.training.metrics import expected_calibration_error, wilson
from facerace.training.runs import environment

GENDERS = ("Female", "Male")
SMALL = 50


def scored(model: str, spec: str, split: str, scheme: str, gender: dict[str, str | None],
           workers: int | None) -> dict:
    """Per face: true class, right or wrong, confidence, gender (joined on path through `gender`)."""
    run, metrics = evaluate(model, spec, split=split, scheme=scheme, workers=workers, quiet=True)
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"true": np.array([r["true"] for r in rows]), "right": np.array([r["true"] == r["predicted"] for r in rows]),
            "confidence": np.array([float(r["confidence"]) for r in rows]),
            "gender": np.array([gender.get(r["path"]) or "unknown" for r in rows]), "accuracy": metrics["accuracy"]}


def rate(right: np.ndarray) -> str:
    k, n = int(right.sum()), len(right)
    if n < SMALL:
        return f"({n} faces: too few)"
    lo, hi = wilson(k, n)
    return f"{k / n:.3f} ({lo:.2f}-{hi:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--utkface", type=Path)
    ap.add_argument("--model", action="append", required=True, help="model name or folder (repeat; first = base)")
    ap.add_argument("--workers", type=int)
    args = ap.parse_args()
    jobs = [(f"fairface:{args.fairface}", "val", "fairface7")]
    if args.utkface:
        jobs.append((f"utkface:{args.utkface}", "all", "utk5"))
    env = environment()
    print(f"\n{env['date']}; {env['machine']}; models: " + ", ".join(f"`{m}`" for m in args.model))
    for spec, split, scheme in jobs:
        gender = {str(s.path): s.gender for s in open_dataset(spec, split).samples}
        runs = [scored(m, spec, split, scheme, gender, args.workers) for m in args.model]
        base = runs[0]
        print(f"\n### {spec.split(':')[0]} {split}, {scheme} ({len(base['true'])} faces)\n")
        print("| model | accuracy | women | men | gap (points) | ECE women | ECE men |")
        print("|---|---|---|---|---|---|---|")
        for m, r in zip(args.model, runs):
            acc = {g: r["right"][r["gender"] == g] for g in GENDERS}
            ece = {g: expected_calibration_error(r["confidence"][r["gender"] == g], acc[g].astype(float))
                   for g in GENDERS}
            print(f"| `{m}` | {rate(r['right'])} | {rate(acc['Female'])} | {rate(acc['Male'])} | "
                  f"{100 * (acc['Male'].mean() - acc['Female'].mean()):+.1f} | {ece['Female']:.3f} | {ece['Male']:.3f} |")
        print("\n| race x gender | n | " + " | ".join(f"`{m}`" for m in args.model)
              + " | " + " | ".join(f"change `{m}`" for m in args.model[1:]) + " |")
        print("|---|---|" + "---|" * (2 * len(args.model) - 1))
        worst = {}
        for race in sorted(set(base["true"])):
            for g in GENDERS:
                mask = (base["true"] == race) & (base["gender"] == g)
                n = int(mask.sum())
                accs = [r["right"][(r["true"] == race) & (r["gender"] == g)] for r in runs]
                if n >= SMALL:
                    for m, a in zip(args.model, accs):
                        if a.mean() < worst.get(m, (1.0, ""))[0]:
                            worst[m] = (float(a.mean()), f"{race} {g.lower()}", n)
                changes = [f"{100 * (a.mean() - accs[0].mean()):+.1f}" if n >= SMALL else "-" for a in accs[1:]]
                print(f"| {race} {g.lower()} | {n} | " + " | ".join(rate(a) for a in accs) + " | "
                      + " | ".join(changes) + " |")
        print("\nworst race x gender group (of >= 50 faces): "
              + "; ".join(f"`{m}` {w[1]} {w[0]:.3f} ({w[2]} faces)" for m, w in worst.items()))


if __name__ == "__main__":
    main()
