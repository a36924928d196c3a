"""Training-set size vs accuracy for dlib, SFace and the two fused (issue 10), from stored embeddings.

Reads the embeddings written by benchmarks/embed_study.py (the integrated pipeline's computation:
dlib flip-averaged, SFace plain) and fits facerace's RaceHead exactly as `facerace train` does:
N training images drawn stratified (seed 0) from FairFace train, 12% of them held out
(`stratified_split`, seed 0) for early stopping, temperature and hyper-parameter choice.
FairFace val and UTKFace are touched only to report the final numbers.

    python benchmarks/fusion_study.py --emb /work/coord/emb --fairface ../shared/datasets/fairface \
        --utkface ../shared/datasets/utkface [--sizes 4000 8000 16000 30100] [--mirror]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from facerace.training.datasets import open_dataset
from facerace.head import HeadParams, RaceHead
from facerace.labels import convert_label, convert_probabilities, get_scheme
from facerace.training.metrics import classification_metrics
from facerace.training.train import stratified_split

CLASSES = get_scheme("fairface7").classes
#: Hyper-parameter candidates for the fused head (the rest: facerace.train defaults), chosen on held-out train.
GRID = [{"hidden": 512, "dropout": 0.6, "weight_decay": 3e-3},
        {"hidden": 1024, "dropout": 0.6, "weight_decay": 3e-3},
        {"hidden": 512, "dropout": 0.7, "weight_decay": 1e-2},
        {"hidden": 0, "dropout": 0.0, "weight_decay": 1e-3}]


def load(emb: Path, names: list[str], dlib_cache: Path | None) -> dict[str, dict]:
    """path -> stored row (dlib, sface, sface_mirror) for the npz files that exist; dlib descriptors missing
    there are read from `dlib_cache` (an embeddings.sqlite of the default pipeline) where it holds them."""
    import sqlite3

    from facerace.faces import FacePipeline

    db = sqlite3.connect(f"file:{dlib_cache}?mode=ro", uri=True) if dlib_cache else None
    rows: dict[str, dict] = {}
    for name in names:
        for file in (emb / f"{name}.npz", emb / f"{name}.partial.npz"):
            if file.is_file():
                with np.load(file) as z:
                    arrays = {k: z[k] for k in ("path", "ok", "dlib", "sface", "sface_mirror", "digest")}
                key = FacePipeline("yunet", "dlib-resnet-v1-onnx", flip_average=True).cache_key(
                    fallback=0.3 if name.startswith("utkface") else 0.25)
                for i, p in enumerate(arrays["path"]):
                    if not arrays["ok"][i]:
                        continue
                    row = {k: arrays[k][i] for k in ("dlib", "sface", "sface_mirror")}
                    if np.isnan(row["dlib"][0]) and db is not None:
                        found = db.execute("SELECT vector FROM embeddings WHERE pipeline=? AND digest=?",
                                           (key, str(arrays["digest"][i]))).fetchone()
                        if found:
                            row["dlib"] = np.frombuffer(found[0], np.float32)
                    rows[str(p)] = row
                break
    return rows


def features(rows: list[dict], kind: str) -> np.ndarray:
    """The descriptor `kind` (dlib, sface, fused, sface-mirror, fused-mirror) of every row."""
    def sface(r: dict) -> np.ndarray:
        return (r["sface"] + r["sface_mirror"]) / 2 if kind.endswith("mirror") else r["sface"]

    parts = {"dlib": lambda r: [r["dlib"]], "sface": lambda r: [sface(r)], "sface-mirror": lambda r: [sface(r)],
             "fused": lambda r: [r["dlib"], sface(r)], "fused-mirror": lambda r: [r["dlib"], sface(r)]}[kind]
    return np.array([np.concatenate(parts(r)) for r in rows], np.float32)


def complete(row: dict) -> bool:
    """Whether both descriptors of a stored row are there."""
    return not (np.isnan(row["dlib"][0]) or np.isnan(row["sface"][0]))


def labelled(spec: str, split: str, rows: dict[str, dict]) -> tuple[list, list[dict], str]:
    """(samples, their stored rows, the dataset's scheme) of a dataset, the ones with both descriptors only."""
    ds = open_dataset(spec, split)
    samples = [s for s in ds.samples if str(s.path) in rows and complete(rows[str(s.path)])]
    return samples, [rows[str(s.path)] for s in samples], ds.scheme


def fit(x: np.ndarray, y: np.ndarray, params: dict, saved: Path | None = None) -> tuple[RaceHead, float, float]:
    """RaceHead on x, y with 12% held out as `facerace train` does; (head, held-out accuracy, held-out loss).

    `saved`: a head file written by an earlier run of the same fit, read instead of fitting again."""
    tr, va = stratified_split(y, 0.12, 0)
    if saved is not None and saved.is_file():
        head = RaceHead.load(saved, CLASSES)
    else:
        head = RaceHead(CLASSES, HeadParams(**params), random_state=0).fit(x[tr], y[tr], x[va], y[va])
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            head.save(saved)
    probs = head.predict_proba(x[va])
    return head, float(np.mean(probs.argmax(1) == y[va])), float(-np.mean(np.log(probs[np.arange(len(va)), y[va]])))


def subset(y: np.ndarray, n: int) -> np.ndarray:
    """n indices drawn stratified (seed 0); all when n >= len(y)."""
    if n >= len(y):
        return np.arange(len(y))
    keep, _ = stratified_split(y, 1 - n / len(y), 0)
    return np.sort(keep)


def scores(head: RaceHead, x: np.ndarray, y: np.ndarray, scheme_from: str, scheme_to: str) -> dict:
    probs = convert_probabilities(head.predict_proba(x), "fairface7", scheme_to)
    m = classification_metrics(y, probs, get_scheme(scheme_to).classes)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "ece": m["ece"], "n": m["n"]}


def evaluate(head: RaceHead, kind: str, val, utk) -> dict:
    """Val 7-class, 6-class and UTKFace utk5 (all, men, women) scores."""
    out = {}
    samples, rows, scheme = val
    x = features(rows, kind)
    for target in ("fairface7", "race6"):
        y = np.array([get_scheme(target).classes.index(convert_label(s.label, scheme, target)) for s in samples])
        out[f"val_{target}"] = scores(head, x, y, scheme, target)
    if utk and utk[0]:
        samples, rows, scheme = utk
        x = features(rows, kind)
        y = np.array([get_scheme("utk5").classes.index(s.label) for s in samples], int)
        gender = np.array([s.gender for s in samples])
        for name, mask in (("utk5", np.ones(len(y), bool)), ("utk5_men", gender == "Male"),
                           ("utk5_women", gender == "Female")):
            out[name] = scores(head, x[mask], y[mask], scheme, "utk5")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emb", type=Path, required=True)
    ap.add_argument("--fairface", required=True)
    ap.add_argument("--utkface")
    ap.add_argument("--dlib-cache", type=Path, help="embeddings.sqlite with default-pipeline dlib descriptors")
    ap.add_argument("--sizes", type=int, nargs="*", default=[4000, 8000, 16000, 30100])
    ap.add_argument("--kinds", nargs="+", default=["dlib", "sface", "fused"])
    ap.add_argument("--grid", action="store_true", help="choose the fused head's hyper-parameters on held-out train "
                                                         "(lowest held-out loss, on all train images there are)")
    ap.add_argument("--mirror", action="store_true", help="does SFace's mirror image pay? (held-out train only)")
    ap.add_argument("--out", type=Path, default=Path("runs/fusion_study.json"))
    args = ap.parse_args()
    names = ["fairface-train-a", "fairface-train-rev", "fairface-train-rev2", "fairface-train-rest", "fairface-val",
             "utkface-sample"]
    rows = load(args.emb, names, args.dlib_cache)
    samples, train_rows, _ = labelled(f"fairface:{args.fairface}", "train", rows)
    y = np.array([CLASSES.index(s.label) for s in samples])
    print(f"{len(samples)} FairFace train images with both descriptors", flush=True)
    results: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}

    if args.mirror:
        have = np.array([not np.isnan(r["sface_mirror"][0]) for r in train_rows])
        idx = np.nonzero(have)[0]
        fit_part, test_part = stratified_split(y[idx], 0.25, 0)
        for kind in ("sface", "sface-mirror", "fused", "fused-mirror"):
            x = features([train_rows[i] for i in idx], kind)
            head, _, _ = fit(x[fit_part], y[idx][fit_part], {})
            acc = float(np.mean(head.predict(x[test_part]) == y[idx][test_part]))
            results.setdefault("mirror", {})[kind] = {"n_fit": len(fit_part), "n_test": len(test_part), "accuracy": acc}
            print(f"mirror study {kind}: held-out train accuracy {acc:.4f} ({len(test_part)} faces)", flush=True)

    if args.grid:
        keep = subset(y, len(y))  # on all the train images there are
        x = features([train_rows[i] for i in keep], "fused")
        for params in GRID:
            t = time.time()
            _, acc, loss = fit(x, y[keep], params)
            results.setdefault("grid", []).append({"n": int(len(keep)), **params, "heldout_accuracy": acc,
                                                   "heldout_loss": loss})
            print(f"grid n={len(keep)} {params}: held-out accuracy {acc:.4f}, loss {loss:.4f} "
                  f"({time.time() - t:.0f} s)", flush=True)

    val = labelled(f"fairface:{args.fairface}", "val", rows)
    utk = labelled(f"utkface:{args.utkface}", "all", rows) if args.utkface else None
    largest = max((g["n"] for g in results.get("grid", [])), default=0)
    best = min((g for g in results.get("grid", []) if g["n"] == largest), key=lambda g: g["heldout_loss"], default={})
    fused_params = {k: best[k] for k in ("hidden", "dropout", "weight_decay")} if best else {}
    for n in args.sizes:
        keep = subset(y, n)
        for kind in args.kinds:
            params = fused_params if kind == "fused" else {}
            t = time.time()
            # a saved head is reused only for the very same images and settings
            tag = hashlib.sha1(json.dumps([sorted(str(samples[i].path) for i in keep), params]).encode()).hexdigest()
            head, heldout, _ = fit(features([train_rows[i] for i in keep], kind), y[keep], params,
                                args.out.parent / "heads" / f"{kind}-{len(keep)}-{tag[:12]}.safetensors")
            entry = {"n": int(len(keep)), "kind": kind, "params": params, "heldout_accuracy": heldout,
                     **evaluate(head, kind, val, utk)}
            results["sizes"] = [e for e in results.get("sizes", []) if (e["n"], e["kind"]) != (entry["n"], kind)]
            results["sizes"].append(entry)
            print(f"n={len(keep)} {kind}: held-out {heldout:.4f} val7 {entry['val_fairface7']['accuracy']:.4f} "
                  f"val6 {entry['val_race6']['accuracy']:.4f}"
                  + (f" utk5 {entry['utk5']['accuracy']:.4f}" if utk else "") + f" ({time.time() - t:.0f} s)",
                  flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    """The study as a markdown table."""
    lines = ["| train images | descriptor | held-out train | val 7-class | val 6-class | val macro-F1 | val ECE "
             "| UTK utk5 | men | women |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in results.get("sizes", []):
        u = [f"{e[k]['accuracy']:.3f}" if k in e else "-" for k in ("utk5", "utk5_men", "utk5_women")]
        lines.append(f"| {e['n']} | {e['kind']} | {e['heldout_accuracy']:.3f} | {e['val_fairface7']['accuracy']:.3f} "
                     f"| {e['val_race6']['accuracy']:.3f} | {e['val_fairface7']['macro_f1']:.3f} "
                     f"| {e['val_fairface7']['ece']:.3f} | {' | '.join(u)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
