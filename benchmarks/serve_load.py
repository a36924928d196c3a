"""Bounded load test of `facerace serve` on loopback: concurrent clients posting real face photos.

    python benchmarks/serve_load.py --fairface ../shared/datasets/fairface [--requests 500] [--clients 8] [--crowd 200]
    python benchmarks/serve_load.py --uploads 60 --upload-mb 8.4 --workers 1     # memory of large uploads in flight

Starts the server, warms it up (--warmup requests, not counted), sends the requests, prints requests/s, latency percentiles,
errors and the server's memory (whole process tree) before and after, then stops it. With --crowd N it then posts a photo
of N FairFace faces in a grid (--crowd-repeats times, then --warmup ordinary requests) and prints the memory after each.
With --uploads N it only posts N photos of --upload-mb MiB at once (noise PNGs, no face) and prints the server's peak
memory (sampled every 20 ms) against README's bound: each upload in flight holds at most one copy of its body.
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
    ap.add_argument("--fairface", type=Path, help="FairFace folder (the photos of the request and crowd runs)")
    ap.add_argument("--uploads", type=int, default=0, help="only post this many large photos at once (memory run)")
    ap.add_argument("--upload-mb", type=float, default=8.4, help="size of each large photo in MiB")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="server processes")
    ap.add_argument("--warmup", type=int, default=200, help="requests before the 'before' memory reading")
    ap.add_argument("--crowd", type=int, default=0, help="then post a photo with this many faces (0: skip)")
    ap.add_argument("--crowd-repeats", type=int, default=3, help="how often the crowd photo is posted")
    args = ap.parse_args()
    if args.uploads:
        return uploads(args)
    if args.fairface is None:
        ap.error("--fairface is needed (unless --uploads)")
    with open(args.fairface / "fairface_label_val.csv", newline="") as f:
        photos = [(args.fairface / r["file"]).read_bytes() for r in list(csv.DictReader(f))[:100]]
    server, url = start_server(args)
    try:
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


def start_server(args: argparse.Namespace, *options: str) -> tuple[subprocess.Popen, str]:
    """`facerace serve` on a free loopback port, once it answers /v1/health."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "facerace", "serve", "--port", str(port),
                               "--workers", str(args.workers), "--timeout", "600", *options], stderr=subprocess.DEVNULL)
    with httpx.Client(timeout=60) as client:
        for _ in range(600):
            try:
                if client.get(url + "/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
    return server, url


def uploads(args: argparse.Namespace) -> None:
    """Post `args.uploads` noise PNGs of `args.upload_mb` MiB at once; print the server's idle and peak memory."""
    import threading

    import numpy as np

    side = int((args.upload_mb * 2**20 / 3) ** 0.5)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buf, "PNG", compress_level=0)
    body = buf.getvalue()
    limit_mb = max(10.0, len(body) / 2**20 + 1)
    server, url = start_server(args, "--max-upload-mb", str(limit_mb), "--max-connections", str(args.uploads + 4))
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_mb(server.pid))
            time.sleep(0.02)

    try:
        face = (Path(__file__).parents[1] / "tests" / "fixtures" / "1208.jpg").read_bytes()
        with httpx.Client(timeout=600) as client:  # a face and one large photo: networks loaded, buffers warm
            for warm in (face, body):
                client.post(url + "/v1/analyze", files={"file": ("warm.png", warm, "image/png")})
        idle = tree_rss_mb(server.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def post(i: int) -> int:
            with httpx.Client(timeout=600) as client:
                return client.post(url + "/v1/analyze", files={"file": (f"{i}.png", body, "image/png")}).status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(args.uploads) as pool:
            codes = list(pool.map(post, range(args.uploads)))
        elapsed = time.perf_counter() - start
        stop.set()
        sampler.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    env = environment()
    size = len(body) / 2**20
    growth = peak[0] - idle
    print(f"\n{args.uploads} concurrent uploads of {size:.1f} MiB (noise PNG, no face), {args.workers} server "
          f"process(es), --max-upload-mb {limit_mb:.1f}; {env['date']}; {env['machine']}\n")
    print("| uploads | MiB each | answers | seconds | server RSS idle | peak | growth | growth / (uploads x size) |")
    print("|---|---|---|---|---|---|---|---|")
    answers = ", ".join(f"{codes.count(c)}x {c}" for c in sorted(set(codes)))
    print(f"| {args.uploads} | {size:.1f} | {answers} | {elapsed:.1f} | {idle:.0f} MB | {peak[0]:.0f} MB | "
          f"{growth:.0f} MB | {growth / (args.uploads * len(body) / 1e6):.2f} |")


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
