"""`facerace predict` on FairFace val with the local engine and with Ray (1 and 2 worker nodes), to Parquet.

    python benchmarks/scale.py --fairface ../shared/datasets/fairface [--n 2871] [--small 28] [--configs ray:2]

Each configuration runs in a fresh process: the Ray cluster (if any) is started once and timed
("cluster start"), then `facerace predict` runs on the first `--small` images and on the first
`--n`, through the CLI, to Parquet. The two wall times give the job's start-up cost (the
intercept: process pool or actors, model loads, scheduling) and its throughput after start-up
(the slope). Ray runs on a cluster made here with ray.cluster_utils.Cluster: a head node with
0 CPUs (the driver's) and 1 or 2 worker nodes of 1 CPU each, one actor per node. Peak memory:
the largest resident total of the process tree (driver, Ray's daemons, workers), sampled every
0.2 s; per actor: the largest resident size of one actor process.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import rss_mb, tree_pids  # noqa: E402

CONFIGS = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]


def one(engine: str, workers: int, listings: list[Path], out: Path, model: str) -> dict:
    """Run one configuration on each listing in this process: the cluster (if any) is started once, first."""
    import pyarrow.dataset as pds

    from facerace.apps.cli import main

    result: dict = {"cluster_s": 0.0, "runs": []}
    cluster = None
    if engine == "ray":
        import ray
        from ray.cluster_utils import Cluster

        start = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                "object_store_memory": 200 * 2**20})
        for _ in range(workers):
            cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
        ray.init(address=cluster.address, logging_level="warning")
        result["cluster_s"] = time.perf_counter() - start
    try:
        for i, listing in enumerate(listings):
            target = out / str(i)
            start = time.perf_counter()
            code = main(["predict", str(listing), "--root", "/", "-o", str(target), "--workers", str(workers),
                         "--model", model, "--engine", engine, "--format", "parquet"])
            seconds = time.perf_counter() - start
            assert code == 0
            table = pds.dataset(target, format="parquet").to_table(columns=["face"])
            result["runs"].append({"seconds": seconds, "rows": len(table),
                                   "faces": len(table) - table["face"].null_count})
    finally:
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()
    return result


def measure(engine: str, workers: int, listings: list[Path], model: str) -> dict:
    """Run one configuration in a child process, sampling its process tree's memory."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--one", engine, str(workers), str(Path(tmp) / "out"), model,
               *map(str, listings)]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        peak, actor, done = [0.0], [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                total = 0.0
                for pid in tree_pids(child.pid):
                    rss = rss_mb(pid)
                    total += rss
                    if b"RowsActor" in _cmdline(pid):
                        actor[0] = max(actor[0], rss)
                peak[0] = max(peak[0], total)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        out, _ = child.communicate()
        done.set()
        sampler.join()
        if child.returncode:
            raise SystemExit(f"{engine} x{workers} failed ({child.returncode})")
        return {**json.loads(out.strip().splitlines()[-1]), "peak_mb": peak[0], "actor_mb": actor[0]}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        engine, workers, out, model, *listings = sys.argv[2:]
        print(json.dumps(one(engine, int(workers), [Path(p) for p in listings], Path(out), model)))
        return
    from facerace.training.runs import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--n", type=int, default=2871)
    ap.add_argument("--small", type=int, default=28)
    ap.add_argument("--model", default="default")
    ap.add_argument("--configs", default=",".join(f"{e}:{w}" for e, w in CONFIGS),
                    help="ENGINE:WORKERS, comma-separated (default: all four)")
    args = ap.parse_args()
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    with open(args.fairface / "fairface_label_val.csv", newline="") as f:
        files = [str((args.fairface / r["file"]).resolve()) for r in csv.DictReader(f)][: args.n]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        listings = []
        for size in (args.small, len(files)):
            listings.append(Path(tmp) / f"first{size}.csv")
            listings[-1].write_text("path\n" + "\n".join(files[:size]) + "\n")
        for engine, workers in configs:
            m = measure(engine, workers, listings, args.model)
            print(f"{engine} x{workers}: {m}", file=sys.stderr, flush=True)
            small, full = m["runs"]
            rate = (full["faces"] - small["faces"]) / (full["seconds"] - small["seconds"])
            startup = small["seconds"] - small["faces"] / rate
            cluster = f"{m['cluster_s']:.1f}" if engine == "ray" else "-"
            actor = f"{m['actor_mb']:.0f}" if engine == "ray" else "-"
            lines.append(f"| {engine} | {workers} | {full['faces']} / {full['rows']} | {cluster} | "
                         f"{full['seconds']:.1f} | {startup:.1f} | {rate:.2f} | {rate / workers:.2f} | "
                         f"{m['peak_mb']:.0f} | {actor} |")
    env = environment()
    print(f"\nmodel `{args.model}`, first {len(files)} FairFace val images (start-up: the intercept through a run "
          f"on the first {args.small}); {env['date']}; {env['machine']}\n")
    print("| engine | workers | faces / rows | cluster start s | job wall s | job start-up s | "
          "faces/s after start-up | per worker | peak memory MB | per actor MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
