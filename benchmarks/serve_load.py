"""Bounded load test of `facerace serve` on loopback: concurrent clients posting real face photos.

    python benchmarks/serve_load.py --fairface ../shared/datasets/fairface [--requests 500] [--clients 8] [--crowd 200]

Starts the server, warms it up (--warmup requests, not counted), sends the requests, prints requests/s, latency percentiles,
errors and the server's memory (whole process tree) before and after, then stops it. With --crowd N it then posts a photo
of N FairFace faces in a grid (--crowd-repeats times, then --warmup ordinary requests) and prints the memory after each.
"""

from __future__ import annotations

import argparse
import csv
import io
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from _proc import tree_rss_mb
from PIL import Image

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
    ap.add_argument("--crowd", type=int, default=0, help="then post a photo with this many faces (0: skip)")
    ap.add_argument("--crowd-repeats", type=int, default=3, help="how often the crowd photo is posted")
    args = ap.parse_args()
    with open(args.fairface / "fairface_label_val.csv", newline="") as f:
        photos = [(args.fairface / r["file"]).read_bytes() for r in list(csv.DictReader(f))[:100]]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "facerace", "serve", "--port", str(port),
                               "--workers", str(args.workers), "--timeout", "600"], stderr=subprocess.DEVNULL)
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
                ok = r.status_code == 200 and r.json()["status"] == "ok"
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
            rss_after = tree_rss_mb(server.pid)
            crowd_rows = crowd(args, url, photos, pool, one, server.pid) if args.crowd else []
        for c in clients:
            c.close()
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
    if crowd_rows:
        print(f"\nthen a {args.crowd}-face photo, {args.crowd_repeats} times, then {args.warmup} ordinary requests\n")
        print("| after | faces found | seconds | server RSS |")
        print("|---|---|---|---|")
        for row in crowd_rows:
            print("| " + " | ".join(row) + " |")


def crowd(args: argparse.Namespace, url: str, photos: list[bytes], pool: ThreadPoolExecutor, one, pid: int
          ) -> list[list[str]]:
    """Post a photo of `args.crowd` faces in a grid; the server's memory after each post and after ordinary ones."""
    side = int(args.crowd ** 0.5 + 0.999)
    cell = Image.open(io.BytesIO(photos[0])).size[0]
    grid = Image.new("RGB", (side * cell, side * cell))
    for i in range(args.crowd):
        grid.paste(Image.open(io.BytesIO(photos[i % len(photos)])).convert("RGB"), ((i % side) * cell, (i // side) * cell))
    buf = io.BytesIO()
    grid.save(buf, "JPEG", quality=90)
    rows = [["ordinary requests (start)", "", "", f"{tree_rss_mb(pid):.0f} MB"]]
    with httpx.Client(timeout=600) as client:
        for k in range(args.crowd_repeats):
            start = time.perf_counter()
            r = client.post(url + "/v1/analyze", files={"file": ("crowd.jpg", buf.getvalue(), "image/jpeg")})
            found = str(len(r.json().get("faces", []))) if r.status_code == 200 else f"HTTP {r.status_code}"
            rows.append([f"crowd photo {k + 1}", found, f"{time.perf_counter() - start:.1f}", f"{tree_rss_mb(pid):.0f} MB"])
    list(pool.map(one, range(args.warmup)))
    rows.append([f"{args.warmup} ordinary requests", "", "", f"{tree_rss_mb(pid):.0f} MB"])
    return rows


if __name__ == "__main__":
    main()
