"""Accuracy of a model on FairFace val (7 and 6 classes) and on UTKFace through the utk5 mapping.

    python benchmarks/accuracy.py --fairface ../shared/datasets/fairface --utkface ../shared/datasets/utkface

Prints a markdown table (and writes each evaluation's run folder under runs/evaluate/).
Embeddings are cached, so a second run only re-scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from facerace.training.evaluate import evaluate
from facerace.training.runs import environment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--utkface", type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--workers", type=int)
    args = ap.parse_args()
    jobs = [(f"fairface:{args.fairface}", "val", "fairface7"), (f"fairface:{args.fairface}", "val", "race6")]
    if args.utkface:
        jobs.append((f"utkface:{args.utkface}", "all", "utk5"))
    results = [evaluate(args.model, spec, split=split, scheme=scheme, workers=args.workers, quiet=True)
               for spec, split, scheme in jobs]
    env = environment()
    print(f"\nmodel `{args.model}`; {env['date']}; {env['machine']}; facerace {env['facerace']}\n")
    print("| data | scheme | n | faces detected | accuracy | macro-F1 | ECE | recall per class |")
    print("|---|---|---|---|---|---|---|---|")
    for _, m in results:
        recall = ", ".join(f"{c} {v['recall']:.2f}" for c, v in m["per_class"].items())
        print(f"| {m['data']['spec'].split(':')[0]} {m['data']['split']} | {m['scheme']} | {m['n']} | "
              f"{m['data']['face_detected_fraction']:.1%} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
              f"{m['ece']:.3f} | {recall} |")
    print("\nrun folders: " + ", ".join(str(r) for r, _ in results))


if __name__ == "__main__":
    main()
