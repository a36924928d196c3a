"""Wall time and peak memory (whole process tree) of `facerace train` on FairFace train.

    python benchmarks/train.py --fairface ../shared/datasets/fairface [--skip-cold]

Cold: a new, empty embedding cache (every image is read, detected, aligned and embedded).
Warm: the same command again with that cache (only hashing and head training).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import tree_rss_mb

from facerace.runs import environment


def timed_train(fairface: Path, cache: Path, out: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "facerace", "train", "--data", f"fairface:{fairface}", "--cache-dir", str(cache),
           "--out", str(out), "--quiet"]
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        rows = []
        if not args.skip_cold:
            rows.append(("cold cache", *timed_train(args.fairface, cache, Path(tmp) / "cold")))
        rows.append(("warm cache", *timed_train(args.fairface, cache, Path(tmp) / "warm")))
    env = environment()
    print(f"\nfacerace train on {args.fairface} (train split); {env['date']}; {env['machine']}\n")
    print("| run | wall time | peak RSS (process tree) |")
    print("|---|---|---|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds / 60:.1f} min ({seconds:.0f} s) | {peak:.0f} MB |")


if __name__ == "__main__":
    main()
