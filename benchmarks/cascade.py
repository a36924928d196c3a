"""A confidence cascade of the shipped models, measured offline: `fast` first, `default` only for faces whose
`fast` confidence is below a threshold chosen on the models' held-out training faces (never val).

    python benchmarks/cascade.py --fairface ../shared/datasets/fairface [--utkface ../shared/datasets/utkface]

Both models hold out the same 12% of FairFace train (same seed, same images), so their stored held-out
probabilities (heldout.safetensors) pair up face by face. For each threshold the cascade's held-out accuracy
and share of faces sent on to `default` are computed; the chosen threshold is the lowest whose held-out accuracy
is within 0.3 points of `default`'s. Then FairFace val (and UTKFace) are scored with it. Speed is estimated from
the per-stage times of benchmarks/speed.py (not timed end to end here): a cascade face costs `fast`'s path, and
an escalated face adds the default's network time minus one dlib pass.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from audit import probabilities  # benchmarks/audit.py: a model's probabilities on a dataset (cached)

from facerace.labels import convert_probabilities
from facerace.model import load_config, load_heldout
from facerace.training.runs import environment

TOLERANCE = 0.003


def cascade(fast: np.ndarray, full: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, escalated mask): `fast`'s answer where its confidence >= threshold, else `full`'s."""
    escalated = fast.max(1) < threshold
    return np.where(escalated, full.argmax(1), fast.argmax(1)), escalated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--utkface", type=Path)
    args = ap.parse_args()
    held = {m: load_heldout(m, load_config(m)) for m in ("fast", "default")}
    assert np.array_equal(held["fast"].labels, held["default"].labels), "the models' held-out faces differ"
    y = held["fast"].labels
    full_acc = float((held["default"].probabilities.argmax(1) == y).mean())
    rows = []
    for t in np.round(np.arange(0.30, 1.001, 0.02), 2):
        pred, esc = cascade(held["fast"].probabilities, held["default"].probabilities, t)
        rows.append((t, float((pred == y).mean()), float(esc.mean())))
    chosen = next(t for t, acc, _ in rows if acc >= full_acc - TOLERANCE)
    env = environment()
    print(f"\n{env['date']}; {env['machine']}; held-out training faces: {len(y)}; `default` alone {full_acc:.4f}\n")
    print("| threshold | held-out accuracy | share sent to `default` |\n|---|---|---|")
    for t, acc, share in rows[::5] + [r for r in rows if r[0] == chosen]:
        print(f"| {t:.2f}{' (chosen)' if t == chosen else ''} | {acc:.4f} | {share:.1%} |")
    jobs = [(f"fairface:{args.fairface}", "val", "fairface7")]
    if args.utkface:
        jobs.append((f"utkface:{args.utkface}", "all", "utk5"))
    print(f"\nthreshold {chosen:.2f} (lowest within {100 * TOLERANCE:.1f} points of `default` on held-out faces)\n")
    print("| data | `fast` | `default` | cascade | share sent to `default` |\n|---|---|---|---|---|")
    for spec, split, scheme in jobs:
        (pf7, yv), (pd7, _) = (probabilities(m, spec, split, scheme, None) for m in ("fast", "default"))
        pf, pd = (convert_probabilities(p, "fairface7", scheme) for p in (pf7, pd7))
        escalated = pf7.max(1) < chosen  # on `fast`'s fairface7 confidence, as on the held-out faces
        pred = np.where(escalated, pd.argmax(1), pf.argmax(1))
        print(f"| {spec.split(':')[0]} {split} ({scheme}) | {(pf.argmax(1) == yv).mean():.4f} | "
              f"{(pd.argmax(1) == yv).mean():.4f} | {(pred == yv).mean():.4f} | {escalated.mean():.1%} |")


if __name__ == "__main__":
    main()
