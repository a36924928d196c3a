"""Build a model from its recipe: train on FairFace train, evaluate, write config and model card.

    python scripts/build_model.py default --fairface ../shared/datasets/fairface [--utkface ../shared/datasets/utkface]
    python scripts/build_model.py finetuned --fairface ../shared/datasets/fairface [--utkface ...]

`default` (shipped: written into the package): a head on frozen dlib ResNet and SFace embeddings,
concatenated (issue 10; minutes once the embeddings are cached). `fast` (shipped): a head on dlib's
embeddings alone, one pass per face (issue 17: about twice the default's speed for a few points of
accuracy). `finetuned` (not shipped: written to runs/models/finetuned, see docs/BENCHMARKS.md for
why): the last 5 units of dlib's ResNet fine-tuned with the head (PyTorch; about an hour on 2 CPU
cores, resumable: rerun the same command after an interruption). Training uses FairFace train, women
and men (CC BY 4.0); UTKFace, if given, is used only for the cross-dataset score.
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import date
from pathlib import Path

from facerace.head import HeadParams
from facerace.model import SHIPPED, ModelConfig, gender_words, load_config, shipped_dir
from facerace.training.config import TrainConfig
from facerace.training.evaluate import evaluate
from facerace.training.modelcard import write_model_card
from facerace.training.train import resume, train

REPRODUCE = ("python scripts/build_model.py {name} --fairface ../shared/datasets/fairface "
             "--utkface ../shared/datasets/utkface")
#: Training settings of each model (the rest are TrainConfig's defaults).
RECIPES = {
    # dlib (mirror averaged) and SFace (its mirror did not pay) fused, 1024 hidden units: chosen on held-out
    # FairFace train (docs/BENCHMARKS.md, issue 10); every race x gender group weighed equally: chosen on held-out
    # FairFace train too (benchmarks/balance.py, issue 17)
    "default": {"backbone": "dlib-resnet-v1-onnx+sface", "flip_average": (True, False), "head": HeadParams(hidden=1024),
                "balance": "race,gender"},
    # dlib alone, one pass per face (no mirror): the speed option (issue 17); race x gender balanced, chosen on
    # held-out FairFace train (benchmarks/balance.py)
    "fast": {"backbone": "dlib-resnet-v1-onnx", "flip_average": False, "balance": "race,gender"},
    "finetuned": {"backbone": "dlib-torch", "unfreeze": 5, "views": 8},
}




def fairface_caveat(config: ModelConfig) -> str:
    """What every model trained on this project's FairFace folder must say wherever it is listed: who is fewer in
    its training data, and where per-group accuracy is measured."""
    mix = config.training_mix or {}
    cells = [(n, f"{c} {gender_words(g)}") for c, row in (mix.get("per_race_gender") or {}).items() for g, n in row.items()
             if g != "unknown"]
    women, total = (mix.get("per_gender") or {}).get("Female", 0), mix.get("images", 0)
    fewest = min(cells) if cells else None
    mix_words = "; ".join(([f"{women / total:.0%} women"] if total else [])
                          + ([f"the smallest group, {fewest[1]}, has {fewest[0]:,} faces"] if fewest else []))
    return ("Perceived race in FairFace's 7 categories, learnt from FairFace train" + (f" ({mix_words})" if mix_words else "")
            + ". Its accuracy per race x gender, on FairFace val and cross-dataset on UTKFace, is in its model card: "
            "lower for some groups, and on photos unlike FairFace's.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=RECIPES, help="which model to build")
    ap.add_argument("--fairface", required=True, type=Path, help="FairFace folder with fairface_label_train.csv")
    ap.add_argument("--utkface", type=Path, help="UTKFace folder (cross-dataset evaluation only)")
    ap.add_argument("--workers", type=int)
    args = ap.parse_args()

    version = date.today().strftime("%Y.%m.%d")
    out = Path("runs/train") / f"{args.name}-{version}"
    if (out / "checkpoint.pt").is_file():
        run = resume(out, workers=args.workers)
    else:
        config = TrainConfig(data=(f"fairface:{args.fairface}",), scheme="fairface7", **RECIPES[args.name])
        run = train(config, out=out, workers=args.workers)
    target = shipped_dir(args.name) if args.name in SHIPPED else Path("runs/models") / args.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run / "model", target)
    config = load_config(target)
    config = ModelConfig.from_dict({**config.to_dict(), "name": args.name, "version": version,
                                    "trained_on": config.trained_on.replace(str(args.fairface), "FairFace")})
    finish(args.name, target, config, args.fairface, args.utkface, workers=args.workers)


def unused_run_dir(name: str) -> Path:
    """runs/evaluate/NAME, or NAME-2, NAME-3, ... : the first that does not exist (evaluate creates it)."""
    path, n = Path("runs/evaluate") / name, 2
    while path.exists():
        path, n = Path("runs/evaluate") / f"{name}-{n}", n + 1
    return path


def finish(name: str, target: Path, config: ModelConfig, fairface: Path, utkface: Path | None, *,
           workers: int | None = None, cache_dir: Path | None = None) -> None:
    """Evaluate the model in `target` on FairFace val (and UTKFace), then write its config (with the measured
    accuracies and the FairFace caveat) and its model card."""
    jobs = [(f"fairface:{fairface}", "val", "fairface7"), (f"fairface:{fairface}", "val", "race6")]
    if utkface:
        jobs.append((f"utkface:{utkface}", "all", "utk5"))
    runs = [evaluate(name if name in SHIPPED else target, spec, split=split, scheme=scheme,
                     out=unused_run_dir(f"{name}-{config.version}-{spec.split(':')[0]}-{scheme}"),
                     workers=workers, cache_dir=cache_dir) for spec, split, scheme in jobs]
    evaluations = [m for _, m in runs]
    figure = runs[0][0] / "reliability.png"
    if figure.is_file():  # a plot that failed is a warning of evaluate's, not a lost model card
        shutil.copy(figure, target / "reliability.png")
    summary = {}
    for m in evaluations:
        key = f"{m['data']['spec'].split(':')[0]}_{m['data']['split']}_{m['scheme']}"
        summary[f"{key}_accuracy"] = round(m["accuracy"], 4)
        if m["scheme"] != "race6" and m["worst_group"]:
            w = m["worst_group"]
            summary[f"{key}_worst_group"] = f"{w['race']} {gender_words(w['gender'])} {w['accuracy']:.3f} (n={w['n']})"
        if m["scheme"] != "race6" and m["gender_gap"]:
            summary[f"{key}_gender_gap_points"] = round(m["gender_gap"]["points"], 1)
    own = {k: v for k, v in config.metrics.items() if k.startswith("validation_")}
    config = ModelConfig.from_dict({**config.to_dict(), "caveat": fairface_caveat(config),
                                    "metrics": {**own, **summary}})
    (target / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    write_model_card(target, config, evaluations, REPRODUCE.format(name=name),
                     figures=[("Calibration on FairFace val (7 classes)", "reliability.png")] if figure.is_file() else [])
    print(f"{name} model written to {target}")


if __name__ == "__main__":
    main()
