"""Frames per second of `facerace stream` on a 640x480 video with 1-3 real faces moving.

    python benchmarks/stream.py --fairface ../shared/datasets/fairface [--frames 150]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from facerace import Predictor
from facerace.apps.stream import stream
from facerace.training.runs import environment


def make_video(path: Path, faces: list[np.ndarray], frames: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (640, 480))
    for i in range(frames):
        frame = np.full((480, 640, 3), 190, np.uint8)
        n = 1 + (i // (frames // 3 + 1)) % 3  # 1, then 2, then 3 faces
        for k, face in enumerate(faces[:n]):
            x = (40 + 200 * k + 2 * i) % (640 - 150)
            y = 60 + 140 * (k % 2)
            frame[y:y + 150, x:x + 150] = face
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=150)
    args = ap.parse_args()
    with open(args.fairface / "fairface_label_val.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:3]
    faces = [np.asarray(Image.open(args.fairface / r["file"]).convert("RGB").resize((150, 150))) for r in rows]
    predictor = Predictor()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "bench.mp4"
        make_video(video, faces, args.frames)
        list(stream(str(video), predictor, max_frames=3))  # load the model outside the timing
        for every in (1, 5):
            start = time.perf_counter()
            n_faces = sum(len(fr.faces) for fr in stream(str(video), predictor, classify_every=every))
            results.append((every, args.frames / (time.perf_counter() - start), n_faces / args.frames))
    env = environment()
    print(f"\n640x480 video, {args.frames} frames, 1-3 faces; 1 process; {env['date']}; {env['machine']}\n")
    print("| classify every | frames/s | faces per frame |")
    print("|---|---|---|")
    for every, fps, per in results:
        print(f"| {every} frame(s) | {fps:.1f} | {per:.2f} |")


if __name__ == "__main__":
    main()
