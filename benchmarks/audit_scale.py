"""`facerace audit --from` on millions of synthetic per-face rows: rows per second and peak memory.

    python benchmarks/audit_scale.py --rows 1000000 10000000 --formats jsonl parquet --work /tmp/audit_scale

Rows look like `facerace predict`'s (path, face, status, box, label, confidence, uncertain,
probabilities of the 7 fairface7 classes rounded to 4 decimals, landmarks, detection score):
probabilities drawn from a Dirichlet, 1% `no_face` rows, images in 20 folders. JSONL is one file;
Parquet a folder of files of 10,000 rows (as the Ray engine writes them). Each audit runs in its own
process (`--by folder --method adjusted --replicates 1000`, the defaults otherwise); peak memory is
that process's maximum resident set size (getrusage, read as it exits), the rate is rows / wall time of the whole
command (start-up, model check and the writing of the results included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")
CHUNK = 100_000
PART_ROWS = 10_000


def _chunks(n: int, seed: int = 0):
    """Synthetic rows in chunks of CHUNK: (paths, statuses, probabilities (m, 7))."""
    rng = np.random.default_rng(seed)
    for first in range(0, n, CHUNK):
        m = min(CHUNK, n - first)
        probs = np.round(rng.dirichlet(np.full(7, 0.5), m), 4)
        status = np.where(rng.random(m) < 0.01, "no_face", "ok")
        paths = [f"photos/set{i % 20:02d}/img_{i:08d}.jpg" for i in range(first, first + m)]
        yield paths, status, probs


def write_jsonl(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for paths, status, probs in _chunks(n):
            lines = []
            for p, s, pr in zip(paths, status, probs.tolist()):
                if s == "ok":
                    top = int(np.argmax(pr))
                    row = {"path": p, "face": 0, "status": "ok", "box": [12, 30, 96, 110], "label": CLASSES[top],
                           "confidence": pr[top], "uncertain": pr[top] < 0.5,
                           "probabilities": dict(zip(CLASSES, pr)),
                           "landmarks": {"left_eye": [40.1, 60.2], "right_eye": [70.3, 60.1], "nose": [55.0, 75.5],
                                         "mouth_left": [44.2, 90.0], "mouth_right": [66.8, 90.3]},
                           "detection_score": 0.9876}
                else:
                    row = {"path": p, "face": None, "status": s, "box": None, "label": None, "confidence": None,
                           "uncertain": None, "probabilities": None, "landmarks": None, "detection_score": None}
                lines.append(json.dumps(row))
            f.write("\n".join(lines) + "\n")


def write_parquet(folder: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facerace.apps.tables import predict_schema

    schema = predict_schema(CLASSES)
    folder.mkdir(parents=True)
    part = 0
    for paths, status, probs in _chunks(n):
        ok = status == "ok"
        struct = pa.StructArray.from_arrays([pa.array(probs[:, i], pa.float64()) for i in range(7)],
                                            fields=list(schema.field("probabilities").type),
                                            mask=pa.array(~ok))
        top = probs.argmax(1)
        columns = {
            "path": pa.array(paths, pa.string()), "face": pa.array(np.where(ok, 0, None).tolist(), pa.int32()),
            "status": pa.array(status.tolist(), pa.string()),
            "label": pa.array([CLASSES[t] if o else None for t, o in zip(top, ok)], pa.string()),
            "confidence": pa.array(np.where(ok, probs.max(1), np.nan), pa.float64(), mask=~ok),
            "probabilities": struct,
        }
        table = pa.table({name: columns.get(name, pa.nulls(len(paths), schema.field(name).type))
                          for name in schema.names}, schema=schema)
        for first in range(0, table.num_rows, PART_ROWS):
            pq.write_table(table.slice(first, PART_ROWS), folder / f"part-{part:05d}.parquet")
            part += 1


#: Runs the CLI and prints the process's peak resident memory (kB) as its last stderr line.
_MEASURED = ("import resource, sys\nfrom facerace.apps.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
             "finally:\n    print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
             "sys.exit(code)")


def run(source: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak MB) of one `facerace audit --from source` in its own process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURED, "audit", "--from", str(source), "--by", "folder",
                           "--out", str(out), "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"audit failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, int(done.stderr.split("peak_kb")[-1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--formats", nargs="+", default=["jsonl", "parquet"], choices=["jsonl", "parquet"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/audit_scale"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print("| rows | format | seconds | rows/s | peak memory (MB) |\n|---|---|---|---|---|")
    for n in sorted(args.rows):
        for kind in args.formats:
            source = args.work / (f"rows{n}.jsonl" if kind == "jsonl" else f"rows{n}.parquet.d")
            if not source.exists():
                (write_jsonl if kind == "jsonl" else write_parquet)(source, n)
            out = args.work / f"out-{kind}-{n}-{time.time_ns()}"
            seconds, peak = run(source, out)
            faces = json.loads((out / "composition.json").read_text())["faces"]
            print(f"| {n:,} | {kind} | {seconds:.1f} | {n / seconds:,.0f} | {peak:.0f} |  ({faces:,} faces)", flush=True)


if __name__ == "__main__":
    main()
