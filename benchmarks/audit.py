"""How well `facerace audit` estimates the composition of collections whose true mix is known.

    python benchmarks/audit.py --fairface ../shared/datasets/fairface --utkface ../shared/datasets/utkface
    python benchmarks/audit.py --fairface ... --utkface ... --study validated --sizes 1000

`--study adjusted` (the default) compares the label-free methods. `--study validated` compares,
on the same random mixes, what a labelled uniform random sample of each collection gives
(`audit --labels`): `validated` (prediction-powered inference), `validated++` (PPI++'s
power-tuned weight), the labelled faces alone, and `adjusted` without labels, for samples of
`--labelled` faces; and how often the label-free shift test (the warning suggesting --sample)
fires. It needs only the model head's probabilities on cached embeddings, so rerunning it for a
new model takes a minute once the embeddings are cached.

Collections are random mixes: class shares drawn from a Dirichlet(0.7, ..., 0.7), then that
many faces of each class drawn without replacement from FairFace val (scored in fairface7) or
UTKFace (utk5, cross-dataset); a mix that needs more faces of a class than the data has is
drawn again (counted). Without replacement, a collection varies around the population as a
real one does; drawing 1,000 faces with replacement from a few hundred per class would make
every collection share its pool's quirks, an error no audit of a real collection has. For each method: the mean absolute error of the estimated
shares (points, over mixes and classes), how often the 95% interval holds the true share,
and the mean interval width. The model's probabilities come from its own pipeline (the
detector's largest face, else the dataset's known face region, as in `facerace evaluate`);
embeddings are cached in --cache-dir.

The method behind `adjusted` is chosen first on the model's held-out TRAIN faces (2-fold:
the confusion matrix from one half, mixes drawn from the other), never on val or UTKFace.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from facerace.labels import convert_label, get_scheme, mapping_matrix
from facerace.model import load_config, load_heldout, load_model, model_pipeline
from facerace.quantify import ADJUSTED, METHODS, HeldOut, estimate, merged, shares, shift_test, top_histogram, validated
from facerace.training.datasets import open_dataset
from facerace.training.embeddings import CropEmbedder, embed_files
from facerace.training.runs import environment

SHOWN = [m for m in METHODS if m != "adjusted"]


def probabilities(model: str, spec: str, split: str, scheme: str, cache_dir: Path | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities in the model's scheme, true class indices in `scheme`) for every usable image."""
    config, head = load_model(model)
    ds = open_dataset(spec, split)
    keep = [s for s in ds.samples if convert_label(s.label, ds.scheme, scheme) is not None]
    emb = embed_files([s.path for s in keep], CropEmbedder(model_pipeline(model, config), ds.face_padding),
                      cache_dir=cache_dir, workers=1, progress=False)
    classes = get_scheme(scheme).classes
    y = np.array([classes.index(convert_label(s.label, ds.scheme, scheme)) for s, ok in zip(keep, emb.ok) if ok])
    return head.predict_proba(emb.vectors), y


def trial(probs: np.ndarray, y: np.ndarray, n_classes: int, heldout: HeldOut, merge: np.ndarray, size: int,
          mixes: int, replicates: int, seed: int, methods: list[str]) -> dict[str, dict[str, float]]:
    """MAE and 95th percentile of the errors (points), interval coverage and mean width, seconds per audit, of
    every method over `mixes` random collections of `size` faces (errors: one per collection and class)."""
    rng = np.random.default_rng(seed)
    pools = [np.nonzero(y == c)[0] for c in range(n_classes)]
    errors = {m: [] for m in methods}
    hits = {m: [] for m in methods}
    widths = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    redrawn = 0
    for _ in range(mixes):
        counts = rng.multinomial(size, rng.dirichlet(np.full(n_classes, 0.7)))
        while np.any(counts > [len(p) for p in pools]):  # more faces of a class than the data has: redraw
            redrawn += 1
            counts = rng.multinomial(size, rng.dirichlet(np.full(n_classes, 0.7)))
        faces = np.concatenate([rng.choice(pool, k, replace=False) for pool, k in zip(pools, counts)])
        truth = counts / size
        for m in methods:
            started = time.perf_counter()
            s = shares(probs[faces], m, heldout, merge=merge, replicates=replicates, random_state=rng)
            seconds[m] += time.perf_counter() - started
            errors[m].append(np.abs(s.estimate - truth))
            hits[m].append((s.low <= truth + 1e-9) & (truth <= s.high + 1e-9))
            widths[m].append(s.high - s.low)
    return {m: {"mae": 100 * float(np.mean(errors[m])), "p95": 100 * float(np.percentile(errors[m], 95)),
                "coverage": float(np.mean(hits[m])),
                "width": 100 * float(np.mean(widths[m])), "seconds": seconds[m] / mixes, "redrawn": redrawn}
            for m in methods}


def collections(y: np.ndarray, n_classes: int, size: int, mixes: int, rng: np.random.Generator):
    """`mixes` random collections of `size` faces (indices into y, shuffled): Dirichlet(0.7) class shares, each
    class's faces drawn without replacement (a mix needing more faces of a class than the data has is drawn
    again); yields (faces, true shares)."""
    pools = [np.nonzero(y == c)[0] for c in range(n_classes)]
    for _ in range(mixes):
        counts = rng.multinomial(size, rng.dirichlet(np.full(n_classes, 0.7)))
        while np.any(counts > [len(p) for p in pools]):
            counts = rng.multinomial(size, rng.dirichlet(np.full(n_classes, 0.7)))
        faces = rng.permutation(np.concatenate([rng.choice(pool, k, replace=False) for pool, k in zip(pools, counts)]))
        yield faces, counts / size


#: The estimators a labelled sample allows (quantify.validated's weight: 1 PPI, None PPI++, 0 the sample alone).
LABELLED = {"validated": 1.0, "validated++ (power-tuned)": None, "labelled only": 0.0}


def validated_trial(probs: np.ndarray, y: np.ndarray, heldout: HeldOut, merge: np.ndarray, size: int,
                    labelled: list[int], mixes: int, replicates: int, seed: int) -> dict[str, object]:
    """Per labelled-sample size and estimator (and `adjusted`, which needs no labels): MAE (points), 95% interval
    coverage and mean width (points) over `mixes` random collections of `size` faces, each with a uniform random
    labelled sample (nested: the first n faces of the shuffled collection); and the shift test's firing rate."""
    rng = np.random.default_rng(seed)
    k = merge.shape[1]
    coarse = merged(probs, merge)
    rows: dict[tuple[int, str], list[list[np.ndarray]]] = {}
    fired, p_values = [], []
    for faces, truth in collections(y, k, size, mixes, rng):
        s = shares(probs[faces], ADJUSTED, heldout, merge=merge, replicates=replicates, random_state=rng)
        adjusted = (s.estimate, s.low, s.high)
        mix = estimate(probs[faces], ADJUSTED, heldout)
        p = shift_test(top_histogram(probs[faces]), heldout, mix, random_state=rng)[1]
        fired.append(p < 0.05)
        p_values.append(p)
        mean = coarse[faces].mean(0)
        for n in labelled:
            sample = faces[:n]
            found = {name: validated(mean, size, coarse[sample], y[sample], weight=w) for name, w in LABELLED.items()}
            found["adjusted (no labels)"] = adjusted
            for name, (est, low, high) in found.items():
                rows.setdefault((n, name), []).append([np.abs(est - truth), (low <= truth + 1e-9) & (truth <= high + 1e-9),
                                                       high - low])
    summary = {key: {"mae": 100 * float(np.mean([r[0] for r in v])), "coverage": float(np.mean([r[1] for r in v])),
                     "width": 100 * float(np.mean([r[2] for r in v]))} for key, v in rows.items()}
    return {"rows": summary, "fired": float(np.mean(fired)), "mixes": mixes,
            "median_p": float(np.median(p_values))}


def validated_table(title: str, size: int, result: dict[str, object]) -> None:
    print(f"\n{title}: {result['mixes']} collections of {size} faces\n")
    print("| labelled faces | method | MAE (points) | 95% interval coverage | mean interval width (points) |")
    print("|---|---|---|---|---|")
    for (n, name), r in result["rows"].items():  # type: ignore[union-attr]
        print(f"| {n} | {name} | {r['mae']:.2f} | {r['coverage']:.1%} | {r['width']:.1f} |")
    print(f"\nLabel-free shift test (p < 0.05, the warning that suggests --sample): fired on {result['fired']:.1%} "
          f"of the collections (median p = {result['median_p']:.3f})")


def table(title: str, results: dict[int, dict[str, dict[str, float]]]) -> None:
    print(f"\n{title}\n")
    print("| faces | method | MAE (points) | 95th percentile of errors (points) | 95% interval coverage "
          "| mean interval width (points) | s per audit |")
    print("|---|---|---|---|---|---|---|")
    for size, per_method in results.items():
        redrawn = int(next(iter(per_method.values()))["redrawn"])
        print(f"| {size} | ({redrawn} mixes drawn again: more faces of a class than the data has) | | | | | |")
        for m, r in per_method.items():
            print(f"| {size} | {m} | {r['mae']:.2f} | {r['p95']:.1f} | {r['coverage']:.1%} | {r['width']:.1f} "
                  f"| {r['seconds']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--utkface", type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--mixes", type=int, default=200)
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--replicates", type=int, default=500, help="bootstrap replicates per interval")
    ap.add_argument("--cache-dir", type=Path, help="embedding cache (default: facerace's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--study", choices=("adjusted", "validated"), default="adjusted",
                    help="adjusted: the label-free methods; validated: a labelled random sample of each collection")
    ap.add_argument("--labelled", type=int, nargs="+", default=[50, 100, 200, 400],
                    help="--study validated: labelled faces per collection")
    args = ap.parse_args()

    config = load_config(args.model)
    heldout = load_heldout(args.model, config)
    k = len(config.classes)
    env = environment()
    print(f"model `{args.model}` ({config.version}, held-out faces {len(heldout.labels)}); {args.mixes} mixes "
          f"(Dirichlet alpha 0.7) per size; {args.replicates} bootstrap replicates; seed {args.seed}; "
          f"{env['date']}; {env['machine']}; facerace {env['facerace']}")

    jobs = [("FairFace val, fairface7", f"fairface:{args.fairface}", "val", "fairface7")]
    if args.utkface:
        jobs.append(("UTKFace (cross-dataset), utk5", f"utkface:{args.utkface}", "all", "utk5"))
    if args.study == "validated":
        for title, spec, split, scheme in jobs:
            probs, y = probabilities(args.model, spec, split, scheme, args.cache_dir)
            merge = mapping_matrix(config.scheme, scheme)
            for size in args.sizes:
                result = validated_trial(probs, y, heldout, merge, size, args.labelled, args.mixes, args.replicates,
                                         args.seed)
                validated_table(f"{title} (n = {len(y)} images)", size, result)
        return

    # choosing `adjusted` on held-out TRAIN faces: confusion matrix from one half, mixes from the other
    rng = np.random.default_rng(args.seed)
    half = np.zeros(len(heldout.labels), bool)
    for c in range(k):
        rows = rng.permutation(np.nonzero(heldout.labels == c)[0])
        half[rows[: len(rows) // 2]] = True
    selection: dict[int, dict[str, dict[str, float]]] = {}
    for size in args.sizes:
        folds = [trial(heldout.probabilities[~a], heldout.labels[~a], k,
                       HeldOut(heldout.probabilities[a], heldout.labels[a]), np.eye(k), size, args.mixes // 2,
                       args.replicates, args.seed + i, ["pacc", "em"]) for i, a in enumerate((half, ~half))]
        selection[size] = {m: {key: (folds[0][m][key] + folds[1][m][key]) / (1 if key == "redrawn" else 2)
                               for key in folds[0][m]} for m in folds[0]}
    table("Choosing the adjusted method on the held-out 12% of FairFace train (2-fold, fairface7)", selection)

    for title, spec, split, scheme in jobs:
        probs, y = probabilities(args.model, spec, split, scheme, args.cache_dir)
        merge = mapping_matrix(config.scheme, scheme)
        results = {size: trial(probs, y, merge.shape[1], heldout, merge, size, args.mixes, args.replicates,
                               args.seed, SHOWN) for size in args.sizes}
        table(f"{title} (n = {len(y)} images)", results)


if __name__ == "__main__":
    main()
