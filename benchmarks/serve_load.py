"""Bounded load test of `facerace serve` on loopback: concurrent clients posting real face photos.

    python benchmarks/serve_load.py --fairface ../shared/datasets/fairface [--requests 500] [--clients 8]

Starts the server, warms it up (--warmup requests, not counted), sends the requests, prints requests/s, latency percentiles,
errors and the server's memory (whole process tree) before and after, then stops it.
"""

from __future__ import annotations

import argparse
import csv
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from _proc import tree_rss_mb

from facerace.training.runs import environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="server processes")
    ap.add_argument("--warmup", type=int, default=200, help="requests before the 'before' memory reading")
    args = ap.parse_args()
    with open(args.fairface / "fairface_label_val.csv", newline="") as f:
        photos = [(args.fairface / r["file"]).read_bytes() for r in list(csv.DictReader(f))[:100]]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "facerace", "serve", "--port", str(port),
                               "--workers", str(args.workers)], stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=60) as client:
            for _ in range(600):
                try:
                    if client.get(url + "/v1/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)

        def one(i: int) -> tuple[float, bool]:
            start = time.perf_counter()
            try:
                r = clients[i % args.clients].post(url + "/v1/analyze",
                                                   files={"file": (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")})
                ok = r.status_code == 200 and len(r.json()["faces"]) >= 1
            except httpx.HTTPError:
                ok = False
            return time.perf_counter() - start, ok

        clients = [httpx.Client(timeout=120) for _ in range(args.clients)]
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.warmup)))  # every worker loads its model and fills its buffers
            rss_before = tree_rss_mb(server.pid)
            start = time.perf_counter()
            results = list(pool.map(one, range(args.requests)))
            elapsed = time.perf_counter() - start
        for c in clients:
            c.close()
        rss_after = tree_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = sorted(r[0] * 1000 for r in results)
    q = statistics.quantiles(latencies, n=100)
    errors = sum(not ok for _, ok in results)
    env = environment()
    print(f"\n{args.requests} requests after {args.warmup} warm-up requests, {args.clients} clients, "
          f"{args.workers} server processes, real FairFace val photos; {env['date']}; {env['machine']}\n")
    print("| requests/s | p50 ms | p95 ms | p99 ms | errors | server RSS before | after | growth |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.requests / elapsed:.1f} | {q[49]:.0f} | {q[94]:.0f} | {q[98]:.0f} | {errors} | "
          f"{rss_before:.0f} MB | {rss_after:.0f} MB | {100 * (rss_after - rss_before) / rss_before:+.1f}% |")


if __name__ == "__main__":
    main()
