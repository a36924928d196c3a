"""Embed every image of FairFace train/val and UTKFace once for the fused-backbone study (issue 10).

One YuNet pass per image feeds both networks exactly as the integrated pipeline does
(`--dlib-cache`: dlib descriptors another run of the default pipeline already cached are read, not recomputed):
the largest face of at least MIN_FACE px, else the dataset's known face region; dlib chip
(5-point shape model) -> dlib ONNX, flip-averaged (the default model's descriptor); SFace chip
(`facerace.align.SFaceAligner`) -> SFace, plain and (for `--mirror-limit` images per dataset) its
mirror image. Writes OUT/<dataset>-<split>.npz (paths, digests, dlib, sface, sface_mirror, detected,
landmark source), checkpointed every 500 images: rerun the same command to resume.

    python benchmarks/embed_study.py --fairface ../shared/datasets/fairface --utkface ../shared/datasets/utkface \
        --out /work/coord/emb
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from facerace.align import Aligner, SFaceAligner
from facerace.backbones.dlib import DlibDescriptorOnnx
from facerace.backbones.sface import SFace
from facerace.detect import YuNetDetector, known_face_region
from facerace.errors import ImageError
from facerace.faces import MIN_FACE
from facerace.files import sha256_file
from facerace.images import load_image
from facerace.training.datasets import open_dataset

FIELDS = ("dlib", "sface", "sface_mirror", "detected", "source", "digest", "path", "ok")


def embed_one(path: str, parts, padding: float, mirror: bool, dlib: np.ndarray | None = None,
              skip_dlib: bool = False) -> dict:
    """Both descriptors of one face-crop image; `dlib`: its dlib descriptor when a cache already holds it
    (`skip_dlib`: else leave it NaN, for `--fill-dlib` later)."""
    detector, aligner, dlib_net, sface_aligner, sface = parts
    try:
        rgb = load_image(path)
    except ImageError:
        return {"ok": False}
    faces = [d for d in detector.detect(rgb) if min(d.box[2], d.box[3]) >= MIN_FACE]
    face = faces[0] if faces else known_face_region(rgb.shape, padding)
    points, source = sface_aligner.landmarks(rgb, face)
    schip = sface_aligner.crop(rgb, points)[None]
    both = sface.embed(np.concatenate([schip, schip[:, :, ::-1]]) if mirror else schip)
    if dlib is None and skip_dlib:
        dlib = np.full(128, np.nan, np.float32)
    elif dlib is None:
        chip = aligner.align(rgb, [face])[1]
        pair = dlib_net.embed(np.concatenate([chip, chip[:, :, ::-1]]))
        dlib = (pair[0] + pair[1]) / 2
    return {"ok": True, "dlib": dlib, "sface": both[0],
            "sface_mirror": both[1] if mirror else np.full(128, np.nan, np.float32), "detected": bool(faces),
            "source": source}


def cached_dlib(cache: Path | None, padding: float, digest: str) -> np.ndarray | None:
    """The default pipeline's dlib descriptor of an image from another run's embedding cache (read-only), if there."""
    if cache is None:
        return None
    import sqlite3

    from facerace.faces import FacePipeline

    key = FacePipeline("yunet", "dlib-resnet-v1-onnx", flip_average=True).cache_key(fallback=padding)
    db = sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=60)
    try:
        row = db.execute("SELECT vector FROM embeddings WHERE pipeline=? AND digest=?", (key, digest)).fetchone()
    finally:
        db.close()
    return np.frombuffer(row[0], np.float32) if row else None


def fill_dlib(file: Path, padding: float, parts, cache: Path | None) -> None:
    """Fill the NaN dlib descriptors of a finished file: from `cache` where it holds them, else computed."""
    z = dict(np.load(file))
    todo = np.nonzero(np.isnan(z["dlib"][:, 0]) & z["ok"])[0]
    computed = 0
    for i in todo:
        vector = cached_dlib(cache, padding, str(z["digest"][i]))
        if vector is None:
            vector, computed = embed_one(str(z["path"][i]), parts, padding, False)["dlib"], computed + 1
        z["dlib"][i] = vector
    np.savez(file.with_suffix(".tmp.npz"), **z)
    file.with_suffix(".tmp.npz").replace(file)
    print(f"{file.name}: {len(todo)} dlib descriptors filled, {computed} of them computed", flush=True)


def to_cache(file: Path, padding: float, cache_dir: Path) -> None:
    """Store a file's descriptors in a facerace embedding cache under the keys the integrated pipeline looks up:
    dlib (default pipeline, mirror averaged) and SFace (plain), each under its own network's key."""
    from facerace.faces import FacePipeline
    from facerace.training.cache import EmbeddingCache

    z = np.load(file)
    cache = EmbeddingCache(cache_dir)
    try:
        for field, pipeline in (("dlib", FacePipeline("yunet", "dlib-resnet-v1-onnx", flip_average=True)),
                                ("sface", FacePipeline("yunet", "sface"))):
            rows = [(str(d), v, bool(det)) for d, v, det, ok in zip(z["digest"], z[field], z["detected"], z["ok"])
                    if ok and not np.isnan(v[0])]
            cache.put_many(pipeline.cache_key(fallback=padding), rows)
            print(f"{file.name}: {len(rows)} {field} descriptors -> {cache.path}", flush=True)
    finally:
        cache.close()


def run(name: str, paths: list[str], padding: float, out: Path, parts, mirror_limit: int,
        cache: Path | None = None, skip_dlib: bool = False) -> None:
    target = out / f"{name}.npz"
    partial = out / f"{name}.partial.npz"
    done: dict[str, list] = {k: [] for k in FIELDS}
    if target.is_file():
        print(name, "done already", flush=True)
        return
    if partial.is_file():
        with np.load(partial) as z:
            done = {k: list(z[k]) for k in FIELDS}
        for i, source in enumerate(done["source"]):  # the fixed fallback positions may have changed since
            if source == "box":
                r = embed_one(paths[i], parts, padding, i < mirror_limit)
                for k in ("dlib", "sface", "sface_mirror", "detected", "source"):
                    done[k][i] = r.get(k, done[k][i])
    start, t0 = len(done["path"]), time.time()
    for i in range(start, len(paths)):
        digest = sha256_file(paths[i])
        r = embed_one(paths[i], parts, padding, i < mirror_limit, cached_dlib(cache, padding, digest), skip_dlib)
        done["path"].append(paths[i])
        done["digest"].append(digest)
        done["ok"].append(r["ok"])
        done["dlib"].append(r.get("dlib", np.full(128, np.nan, np.float32)))
        done["sface"].append(r.get("sface", np.full(128, np.nan, np.float32)))
        done["sface_mirror"].append(r.get("sface_mirror", np.full(128, np.nan, np.float32)))
        done["detected"].append(r.get("detected", False))
        done["source"].append(r.get("source", "none"))
        if (i + 1) % 500 == 0 or i + 1 == len(paths):
            np.savez(partial.with_suffix(".tmp.npz"), **{k: np.array(v) for k, v in done.items()})
            partial.with_suffix(".tmp.npz").replace(partial)
            rate = (i + 1 - start) / (time.time() - t0)
            print(f"{name} {i + 1}/{len(paths)} {rate:.1f} img/s", flush=True)
    partial.replace(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fairface", type=Path, required=True)
    ap.add_argument("--utkface", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dlib-cache", type=Path, help="an embeddings.sqlite holding default-pipeline dlib descriptors")
    ap.add_argument("--skip-dlib", action="store_true", help="dlib only from --dlib-cache, else NaN (see --fill-dlib)")
    ap.add_argument("--fill-dlib", action="store_true", help="fill the NaN dlib descriptors of the finished files")
    ap.add_argument("--to-cache", type=Path, help="store the files' descriptors in this facerace cache folder")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per network")
    ap.add_argument("--mirror-limit", type=int, default=3000, help="images per dataset with SFace's mirror embedded")
    args = ap.parse_args()
    import cv2

    cv2.setNumThreads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = (YuNetDetector(), Aligner(150, 0.25), DlibDescriptorOnnx(threads=args.threads), SFaceAligner(),
             SFace(threads=args.threads))
    # FairFace train from its last row back (a `facerace train` of the default pipeline filling --dlib-cache goes
    # forward); a random 2,000 of UTKFace first, so that a cross-dataset score comes early.
    utk = np.random.default_rng(0).permutation(len(open_dataset(f"utkface:{args.utkface}", "all").samples))
    jobs = [(f"fairface:{args.fairface}", "val", "fairface-val", slice(None)),
            (f"utkface:{args.utkface}", "all", "utkface-sample", utk[:2000]),
            (f"fairface:{args.fairface}", "train", "fairface-train-rev", slice(None, -9001, -1)),
            (f"fairface:{args.fairface}", "train", "fairface-train-rev2", slice(-9001, None, -1)),
            (f"utkface:{args.utkface}", "all", "utkface-rest", utk[2000:])]
    for spec, split, name, rows in jobs:
        ds = open_dataset(spec, split)
        if args.fill_dlib or args.to_cache:
            for file in (args.out / f"{name}.npz", args.out / f"{name}.partial.npz"):
                if file.is_file() and args.fill_dlib:
                    fill_dlib(file, ds.face_padding, parts, args.dlib_cache)
                if file.is_file() and args.to_cache:
                    to_cache(file, ds.face_padding, args.to_cache)
            continue
        samples = ds.samples[rows] if isinstance(rows, slice) else [ds.samples[i] for i in rows]
        run(name, [str(s.path) for s in samples], ds.face_padding, args.out, parts,
            args.mirror_limit if name == "fairface-train-rev" else 0, args.dlib_cache, args.skip_dlib)


if __name__ == "__main__":
    main()
