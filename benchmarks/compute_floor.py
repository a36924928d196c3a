"""What the face networks of a model cost per face, and the ceiling that puts on faces per second.

    python benchmarks/compute_floor.py --fairface ../shared/datasets/fairface [--model default] [--faces 100]

For each network of the model: multiply-add work per face (convolutions and dense layers, from
the ONNX graph's shapes), ONNX Runtime's time per face on one thread (its own chips of FairFace
val faces, one face per call as the predictor runs them; passes per face: 2 with the mirror
image), the rate that implies, and the most faces per second the networks alone allow on all
cores, before reading, detection and alignment are counted.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

from facerace import Predictor, load_image
from facerace.backbones.base import OnnxBackbone
from facerace.training.runs import environment


def gflops(path: Path) -> float:
    """Convolution and dense-layer work of one input (batch 1) of the ONNX graph `path`, in GFLOP (2 per multiply-add)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[:1]:
        dim.dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output]}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in weights:
            w = weights[node.input[1]]
            out = shapes.get(node.output[0], [])
            total += 2 * (int(np.prod(out[1:])) * int(np.prod(w[1:])) if node.op_type == "Conv" else int(np.prod(w)))
    return total / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--faces", type=int, default=100)
    args = ap.parse_args()
    pipeline = Predictor(args.model).pipeline
    with open(args.fairface / "fairface_label_val.csv", newline="") as f:
        files = [args.fairface / r["file"] for r in csv.DictReader(f)]
    chips: list[list[np.ndarray]] = [[] for _ in pipeline.members]
    for file in files:
        rgb = load_image(file)
        found = pipeline.large(pipeline.detect(rgb))[:1]
        if found:
            for i, member in enumerate(pipeline.members):
                chips[i].append(member.align(rgb, found)[1])
        if len(chips[0]) == args.faces:
            break
    cores = os.cpu_count() or 1
    env = environment()
    print(f"\nmodel `{args.model}`, {len(chips[0])} FairFace val faces, ONNX Runtime, 1 thread; {env['date']}; "
          f"{env['machine']}\n")
    print("| network | GFLOP per pass | passes per face | ms per face | GFLOP/s achieved |")
    print("|---|---|---|---|---|")
    total_ms = 0.0
    for member, member_chips in zip(pipeline.members, chips):
        backbone = member.get_backbone()
        if not isinstance(backbone, OnnxBackbone):
            raise SystemExit(f"{member.backbone} is not run by ONNX Runtime; this script measures those that are")
        work = gflops(backbone.onnx_file())
        passes = 2 if member.flip_average else 1
        member.embed(member_chips[0])  # load
        start = time.perf_counter()
        for chip in member_chips:
            member.embed(chip)
        ms = 1000 * (time.perf_counter() - start) / len(member_chips)
        total_ms += ms
        print(f"| {member.backbone} | {work:.2f} | {passes} | {ms:.1f} | {passes * work / ms * 1000:.0f} |")
    print(f"\nthe networks alone: {total_ms:.1f} ms per face, at most {1000 / total_ms:.1f} faces/s per core, "
          f"{cores * 1000 / total_ms:.1f} on {cores} cores (reading, detection and alignment not counted)")


if __name__ == "__main__":
    main()
