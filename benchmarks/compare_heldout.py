"""Two models trained on the same split, compared on their held-out training faces (paired).

    python benchmarks/compare_heldout.py MODEL_A MODEL_B

Each model folder's `heldout.safetensors` holds its calibrated probabilities on the held-out
part of FairFace train and the true classes; the two models must share that split (same data,
seed and validation fraction), which is checked. Prints accuracy and log loss of each, and the
paired differences with their standard errors: the way a training choice (a mirror pass, a
backbone) is decided without looking at FairFace val or UTKFace.
"""

from __future__ import annotations

import argparse
import numpy as np

from facerace.model import load_config, load_heldout


def heldout(model: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, classes), true classes (n,)) of a model's held-out faces (SHA-256 checked)."""
    held = load_heldout(model, load_config(model))
    return held.probabilities, held.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="model A: a name (default) or a model folder")
    ap.add_argument("b", help="model B: a name or a model folder")
    args = ap.parse_args()
    (pa, ya), (pb, yb) = heldout(args.a), heldout(args.b)
    if len(ya) != len(yb) or not (ya == yb).all():
        raise SystemExit("the two models were not held out on the same faces: train both on the same data and seed")
    rows = np.arange(len(ya))
    right = {m: (p.argmax(1) == ya).astype(float) for m, p in (("A", pa), ("B", pb))}
    loss = {m: -np.log(np.clip(p[rows, ya], 1e-12, None)) for m, p in (("A", pa), ("B", pb))}
    print(f"{len(ya)} held-out faces\n\n| | A ({args.a}) | B ({args.b}) | A - B (paired SE) |\n|---|---|---|---|")
    for name, values in (("accuracy", right), ("log loss", loss)):
        diff = values["A"] - values["B"]
        print(f"| {name} | {values['A'].mean():.4f} | {values['B'].mean():.4f} | "
              f"{diff.mean():+.4f} ({diff.std(ddof=1) / np.sqrt(len(diff)):.4f}) |")
    print(f"\nright only with A: {int((right['A'] > right['B']).sum())}, right only with B: "
          f"{int((right['B'] > right['A']).sum())}")


if __name__ == "__main__":
    main()
