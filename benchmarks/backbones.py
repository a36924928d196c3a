"""Parity and speed of every engine for dlib's face descriptor, on FairFace val chips.

    python benchmarks/backbones.py --fairface ../shared/datasets/fairface [--n 200]

Chips: the first n images of fairface_label_val.csv, aligned by dlib's 5-point model in the
face region of the 224x224 crop, 150x150, padding 0.25. Engines: dlib's own C++ network, the
ONNX graph facerace builds from dlib's weights (ONNX Runtime, 1 and 2 threads) and, if torch is
installed, the PyTorch port. Prints cosine similarity to dlib and ms per chip (batches of 32,
one untimed warm-up batch).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facerace.align import Aligner
from facerace.detect import Detection
from facerace.backbones import DlibResNetOnnx, create_backbone
from facerace.images import load_image
from facerace.training.runs import environment

BATCH = 32


def run_batched(embed: Callable[[np.ndarray], np.ndarray], chips: np.ndarray) -> tuple[np.ndarray, float]:
    """(descriptors, ms per chip), in batches of BATCH after one untimed warm-up batch."""
    embed(chips[:BATCH])
    start = time.perf_counter()
    out = np.concatenate([embed(chips[i : i + BATCH]) for i in range(0, len(chips), BATCH)])
    return out, 1000 * (time.perf_counter() - start) / len(chips)


def engines() -> list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]]:
    found = [("dlib C++ (dlib-resnet-v1)", "1", create_backbone("dlib-resnet-v1").embed)]
    found += [("ONNX Runtime (dlib-resnet-v1-onnx)", str(t), DlibResNetOnnx(threads=t).embed) for t in (1, 2)]
    try:
        import torch

        from facerace.backbones.dlib_torch import chips_to_tensor, load_dlib_resnet
    except ImportError:
        return found
    model = load_dlib_resnet()

    def torch_embed(threads: int) -> Callable[[np.ndarray], np.ndarray]:
        def embed(chips: np.ndarray) -> np.ndarray:
            torch.set_num_threads(threads)
            with torch.no_grad():
                return model(chips_to_tensor(chips)).numpy()

        return embed

    return found + [(f"PyTorch {torch.__version__} port", str(t), torch_embed(t)) for t in (1, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    with open(args.fairface / "fairface_label_val.csv", newline="") as f:
        paths = [args.fairface / r["file"] for r in list(csv.DictReader(f))[: args.n]]
    aligner = Aligner(150, 0.25)  # dlib's standard chip
    chips = np.stack([aligner.align(load_image(p), [Detection((37, 37, 150, 150), 1.0)])[1][0] for p in paths])
    rows, reference = [], None
    for name, threads, embed in engines():
        out, ms = run_batched(embed, chips)
        reference = out if reference is None else reference
        a, b = out.astype(np.float64), reference.astype(np.float64)
        sims = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        rows.append((name, threads, ms, sims.min(), statistics.median(sims), np.abs(out - reference).max()))
    env = environment()
    print(f"\nn = {len(chips)} FairFace val chips, batch {BATCH}; {env['date']}; {env['machine']}\n")
    print("| engine | threads | ms per chip | min cosine vs dlib | median cosine vs dlib | max abs diff vs dlib |")
    print("|---|---|---|---|---|---|")
    for name, threads, ms, low, mid, diff in rows:
        print(f"| {name} | {threads} | {ms:.1f} | {low:.7f} | {mid:.7f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
