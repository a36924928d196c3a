"""End-to-end speed of `Predictor` (read, detect, align, embed, classify) on FairFace val images.

    python benchmarks/speed.py --fairface ../shared/datasets/fairface [--model default --model fast] [--n 500]

Prints faces per second with 1 process and with all cores (median of the repeats, pool
start-up included), per-stage times, and the time to the first prediction in a fresh process.
Several `--model`s are measured side by side, alternating in each repeat, and compared with the first.
`--record` writes each shipped model's all-core figure into its config.json (`metrics`), where `facerace models`
shows it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from facerace import Predictor
from facerace.model import SHIPPED, shipped_dir
from facerace.training.runs import environment


def faces_per_second(paths: list[Path], workers: int, model: str, detector: str) -> tuple[float, dict[str, float]]:
    predictor = Predictor(model, detector=detector)
    start = time.perf_counter()
    results = list(predictor.predict_paths(paths, workers=workers))
    elapsed = time.perf_counter() - start
    n_faces = sum(len(r.faces) for r in results)
    stages = {k: statistics.median(r.timings_ms.get(k, 0) for r in results) for k in results[0].timings_ms}
    return n_faces / elapsed, stages


def first_prediction_seconds(path: Path, model: str) -> float:
    code = f"import facerace; facerace.Predictor({model!r}).predict_image({str(path)!r})"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def record(speeds: dict[str, float], where: str) -> None:
    """Write `speeds` (faces/s) of the shipped models among them into their config.json `metrics`."""
    for name, fps in speeds.items():
        if name not in SHIPPED:
            continue
        path = shipped_dir(name) / "config.json"
        config = json.loads(path.read_text())
        config["metrics"].update({"faces_per_second": round(fps, 1), "speed_measured": where})
        path.write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detector", default="yunet")
    ap.add_argument("--model", action="append", help="model to time (repeatable; default: default)")
    ap.add_argument("--record", action="store_true", help="write the all-core faces/s into shipped models' configs")
    args = ap.parse_args()
    models = args.model or ["default"]
    with open(args.fairface / "fairface_label_val.csv", newline="") as f:
        paths = [args.fairface / r["file"] for r in list(csv.DictReader(f))[: args.n]]
    cores = os.cpu_count() or 1
    rows = []
    for workers in sorted({1, cores}):
        runs: dict[str, list] = {m: [] for m in models}
        for _ in range(args.repeats):
            for m in models:
                runs[m].append(faces_per_second(paths, workers, m, args.detector))
        rows += [(m, workers, statistics.median(r[0] for r in runs[m]), runs[m][0][1]) for m in models]
    first = {m: statistics.median(first_prediction_seconds(paths[0], m) for _ in range(args.repeats)) for m in models}
    env = environment()
    print(f"\n{len(paths)} FairFace val images, detector {args.detector}; {env['date']}; {env['machine']}\n")
    print(f"| model | processes | faces/s (median of {args.repeats}) | vs `{models[0]}` | median ms per image: "
          "read / detect / align / embed+classify |")
    print("|---|---|---|---|---|")
    base = {w: fps for m, w, fps, _ in rows if m == models[0]}
    for m, workers, fps, st in rows:
        stages = " / ".join(f"{st[k]:.1f}" for k in ("read", "detect", "align", "embed_classify"))
        print(f"| `{m}` | {workers} | {fps:.1f} | {fps / base[workers]:.2f}x | {stages} |")
    if args.record:
        record({m: fps for m, w, fps, _ in rows if w == cores}, f"{env['date']}, {env['machine']}, {cores} processes")
    print("\ntime to first prediction in a fresh process (python start, import, model load, one image): "
          + ", ".join(f"`{m}` {s:.2f} s" for m, s in first.items()))


if __name__ == "__main__":
    main()
