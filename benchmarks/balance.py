"""Group-balanced training (`--balance`) measured on held-out FairFace *train* faces (never val).

    python benchmarks/balance.py --fairface ../shared/datasets/fairface [--recipe default|fast] [--seeds 0 1]

FairFace train is split once (seed 2026, stratified by race x gender) into 80% to train on (with the
recipe's own 12% early-stopping split inside it) and 20% held out. For each `--balance` option the
recipe's head is trained and scored on the held-out 20%: overall accuracy, the worst race x gender group
(of >= 50 faces), the gap between genders (men - women, points) and ECE per gender. Prints a markdown
table. Embeddings come from the cache (computed on first use).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_model import RECIPES  # noqa: E402

from facerace.labels import get_scheme  # noqa: E402
from facerace.training.config import BALANCE, TrainConfig  # noqa: E402
from facerace.training.metrics import expected_calibration_error  # noqa: E402
from facerace.training.runs import environment  # noqa: E402
from facerace.training.train import fit_head, load_embeddings, stratified_split, train_pipeline  # noqa: E402

HELD_OUT_SEED = 2026


def scores(y: np.ndarray, probs: np.ndarray, races: list[str], genders: np.ndarray) -> dict:
    """Accuracy overall, per race x gender (groups of >= 50 faces), worst group, gender gap, ECE per gender."""
    right = probs.argmax(1) == y
    groups = {}
    for r in range(len(races)):
        for g in ("Female", "Male"):
            m = (y == r) & (genders == g)
            if m.sum() >= 50:
                groups[f"{races[r]} {g.lower()}"] = (float(right[m].mean()), int(m.sum()))
    worst = min(groups, key=lambda k: groups[k][0])
    by_gender = {g: float(right[genders == g].mean()) for g in ("Female", "Male")}
    ece = {g: expected_calibration_error(probs[genders == g].max(1), right[genders == g]) for g in ("Female", "Male")}
    return {"accuracy": float(right.mean()), "worst": (worst, *groups[worst]), "groups": groups,
            "gap": 100 * (by_gender["Male"] - by_gender["Female"]), "by_gender": by_gender, "ece": ece}


def show(option: str, seed: str, s: dict) -> dict:
    """Print one table row of `scores` output; return it."""
    print(f"| {option} | {seed} | {s['accuracy']:.4f} | {s['by_gender']['Female']:.4f} | "
          f"{s['by_gender']['Male']:.4f} | {s['gap']:.2f} | {s['worst'][0]} {s['worst'][1]:.3f} "
          f"({s['worst'][2]}) | {s['ece']['Female']:.3f} / {s['ece']['Male']:.3f} |", flush=True)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--recipe", default="default", help="a recipe of scripts/build_model.py")
    ap.add_argument("--options", nargs="+", default=list(BALANCE), choices=BALANCE)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--ensemble", action="store_true", help="also score the mean probabilities of the seeds' heads")
    ap.add_argument("--hidden", type=int, help="override the recipe's hidden units")
    ap.add_argument("--dropout", type=float, help="override the recipe's dropout")
    ap.add_argument("--flip-average", choices=("on", "off"), help="override the recipe's mirror averaging (all networks)")
    ap.add_argument("--workers", type=int)
    args = ap.parse_args()

    base = TrainConfig(data=(f"fairface:{args.fairface}",), scheme="fairface7", **RECIPES[args.recipe])
    overrides = {k: v for k, v in (("hidden", args.hidden), ("dropout", args.dropout)) if v is not None}
    base = replace(base, head=replace(base.head, **overrides))
    if args.flip_average:
        base = replace(base, flip_average=args.flip_average == "on")
    x, y, samples, _, _ = load_embeddings(base, train_pipeline(base), workers=args.workers, quiet=True)
    genders = np.array([s.gender or "unknown" for s in samples])
    strata = y * 2 + (genders == "Female")
    fit_rows, held = stratified_split(strata, 0.2, HELD_OUT_SEED)
    x_fit, y_fit, samples_fit = x[fit_rows], y[fit_rows], [samples[i] for i in fit_rows]
    races = list(get_scheme(base.scheme).classes)
    env = environment()
    print(f"\nrecipe `{args.recipe}` ({base.backbone}, flip {base.flip_average}, {base.head}); FairFace train: {len(fit_rows)} faces to train on, "
          f"{len(held)} held out ({(genders[held] == 'Female').sum()} women); {env['date']}; {env['machine']}\n")
    print("| balance | seed | held-out accuracy | women | men | gap (points) | worst group (n) | ECE women / men |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for option in args.options:
        probs = []
        for seed in args.seeds:
            config = replace(base, balance=option, seed=seed)
            tr, va = stratified_split(y_fit, config.val_fraction, config.seed)
            head = fit_head(config, x_fit, y_fit, samples_fit, (tr, va))
            probs.append(head.predict_proba(x[held]))
            results[(option, seed)] = show(option, str(seed), scores(y[held], probs[-1], races, genders[held]))
        if args.ensemble:
            show(option, "mean of " + ", ".join(map(str, args.seeds)),
                 scores(y[held], np.mean(probs, axis=0), races, genders[held]))
    first = results[(args.options[0], args.seeds[0])]["groups"]
    print("\nper race x gender group, held-out accuracy (mean over seeds):\n")
    print("| group | n | " + " | ".join(args.options) + " |")
    print("|---|---|" + "---|" * len(args.options))
    for group, (_, n) in first.items():
        cells = [np.mean([results[(o, s)]["groups"][group][0] for s in args.seeds]) for o in args.options]
        print(f"| {group} | {n} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
