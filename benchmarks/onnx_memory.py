"""Resident memory of a process running the default model's networks, with and without ONNX Runtime's memory arena.

    python benchmarks/onnx_memory.py [--batch 32]

Each configuration runs in a fresh process: both networks (dlib, SFace) embed one face, then one
batch of `--batch` faces (a crowd photo), then one face again; the table gives the resident
memory after each step. facerace turns the arena off (`backbones/base.onnx_session`); with it,
the memory a crowd photo took stays with the process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_one(arena: bool, batch: int) -> list[float]:
    """Resident MB after one face, after a batch, and after one face again, in this process."""
    import os

    import numpy as np
    import onnxruntime as ort

    from facerace.backbones.dlib_onnx import cached_onnx
    from facerace.backbones.sface import cached_sface_onnx

    def rss() -> float:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    sessions = []
    for path, side in ((cached_onnx(), 150), (cached_sface_onnx(), 112)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_cpu_mem_arena = arena
        sessions.append((ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), side))
    chips = np.random.default_rng(0).integers(0, 256, (batch, 150, 150, 3), dtype=np.uint8)
    out = []
    for n in (1, batch, 1):
        for session, side in sessions:
            session.run(None, {"chips": chips[:n, :side, :side]})
        out.append(rss())
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(run_one(sys.argv[2] == "on", int(sys.argv[3]))))
        return
    from facerace.training.runs import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    env = environment()
    print(f"\n{env['date']}; {env['machine']}; batch {args.batch}\n")
    print("| ONNX Runtime memory arena | MB after 1 face | after a batch | after 1 face again |")
    print("|---|---|---|---|")
    for arena in ("on", "off"):
        out = subprocess.run([sys.executable, __file__, "--one", arena, str(args.batch)], check=True,
                             capture_output=True, text=True).stdout
        print(f"| {arena} | " + " | ".join(f"{v:.0f}" for v in json.loads(out.splitlines()[-1])) + " |")


if __name__ == "__main__":
    main()
