"""Wall time and peak memory (whole process tree) of `facerace train` on FairFace train.

    python benchmarks/train.py --fairface ../shared/datasets/fairface [--skip-cold]
    python benchmarks/train.py --fairface ../shared/datasets/fairface --finetune --cache-dir ~/.cache/facerace

Cold: a new, empty embedding cache (every image is read, detected, aligned and embedded).
Warm: the same command again with that cache (only hashing and head training).
--finetune: instead, `--backbone dlib-torch --unfreeze 5 --views 8 --max-epochs 3` (the `accurate`
recipe cut to 3 epochs), with the stored views in --cache-dir if they are there (warm) or
computed first (cold). Peak RSS counts the stored views' file pages mapped into the process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import tree_rss_mb

from facerace.training.runs import environment

FINETUNE = ["--backbone", "dlib-torch", "--unfreeze", "5", "--views", "8", "--max-epochs", "3"]


def timed_train(fairface: Path, cache: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "facerace", "train", "--data", f"fairface:{fairface}", "--cache-dir", str(cache),
           "--out", str(out), "--quiet", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"facerace train failed with exit code {proc.returncode}")
    return time.perf_counter() - start, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--cache-dir", type=Path, help="cache to use (default: a new temporary one)")
    ap.add_argument("--skip-cold", action="store_true", help="only the warm run (the cache must be filled)")
    ap.add_argument("--finetune", action="store_true", help="time fine-tuning (3 epochs) instead of a head")
    args = ap.parse_args()
    extra, kind = (FINETUNE, "fine-tune " + " ".join(FINETUNE)) if args.finetune else ([], "head")
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        rows = []
        if not args.skip_cold:
            rows.append((f"{kind}, cold cache", *timed_train(args.fairface, cache, Path(tmp) / "cold", extra)))
        rows.append((f"{kind}, warm cache", *timed_train(args.fairface, cache, Path(tmp) / "warm", extra)))
    env = environment()
    print(f"\nfacerace train on {args.fairface} (train split); {env['date']}; {env['machine']}\n")
    print("| run | wall time | peak RSS (process tree) |")
    print("|---|---|---|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds / 60:.1f} min ({seconds:.0f} s) | {peak:.0f} MB |")


if __name__ == "__main__":
    main()
