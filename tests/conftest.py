"""Shared fixtures: real FairFace val faces shipped in tests/fixtures, and bad inputs made on the fly."""

from __future__ import annotations

import csv
import io
import os
import struct
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

FIXTURES = Path(__file__).parent / "fixtures"


def run_cli(*args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `facerace ARGS...` run in-process; argparse's usage errors give their code."""
    from facerace.apps.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()
#: The real datasets (../shared/datasets from the repository root, or $FACERACE_DATASETS).
DATASETS = Path(os.environ.get("FACERACE_DATASETS", Path(__file__).parents[1] / ".." / "shared" / "datasets"))


#: Set to 1 (as .ci/run does) where every test must run: a skipped test is then reported as a failure.
REQUIRE_ALL = "FACERACE_REQUIRE_ALL_TESTS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With FACERACE_REQUIRE_ALL_TESTS=1 a skip (a missing browser, dataset or package) fails, with its reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get(REQUIRE_ALL) == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but {REQUIRE_ALL}=1 requires every test to run: {reason}"


def fixture_labels() -> list[dict[str, str]]:
    with open(FIXTURES / "fairface_val_labels.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def faces() -> list[Path]:
    """Seven real FairFace val crops (224x224), one per race."""
    return [FIXTURES / r["file"] for r in fixture_labels()]


@pytest.fixture(scope="session")
def face_rgb(faces) -> np.ndarray:
    return np.asarray(Image.open(faces[0]).convert("RGB"))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="session")
def chips(faces) -> np.ndarray:
    """28 real aligned chips: each fixture face as is, mirrored, darker and brighter."""
    from facerace.align import Aligner
    from facerace.detect import Detection

    aligner = Aligner(150, 0.25)  # dlib's standard chip
    out = []
    for path in faces:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        for image in (rgb, rgb[:, ::-1], rgb * 0.6, rgb * 1.3):
            image = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
            out.append(aligner.align(image, [Detection((37, 37, 150, 150), 1.0)])[1][0])  # a FairFace crop's face region
    return np.stack(out)


def needs_dataset(name: str) -> Path:
    """The path of a real dataset, or skip saying exactly what is missing."""
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"needs the real dataset folder {path.resolve()} (set FACERACE_DATASETS to the folder "
                    f"holding fairface/ and utkface/)")
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, faces) -> dict[str, Path]:
    """Every awkward input of SYSTEM.md section 4, written to files."""
    d = tmp_path_factory.mktemp("bad")
    face = Image.open(faces[0]).convert("RGB")
    out: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        out[name.split(".")[0]] = d / name
        img.save(d / name, **kw)

    (d / "notes.jpg").write_text("this is a text file, not a picture\n")
    out["not_image"] = d / "notes.jpg"
    buf = io.BytesIO()
    face.save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    out["truncated"] = d / "truncated.jpg"
    buf = io.BytesIO()
    face.save(buf, "PNG")
    (d / "corrupt.png").write_bytes(buf.getvalue()[:100] + b"\x00" * 500 + buf.getvalue()[600:])
    out["corrupt_png"] = d / "corrupt.png"
    (d / "empty.jpg").write_bytes(b"")
    out["empty"] = d / "empty.jpg"
    (d / "bomb.png").write_bytes(png_header_only(40000, 40000))
    out["bomb"] = d / "bomb.png"
    save("gray.png", face.convert("L"))
    save("rgba.png", face.convert("RGBA"))
    g16 = (np.asarray(face.convert("L"), dtype=np.uint16) * 257)
    save("sixteen.png", Image.fromarray(g16))
    save("cmyk.jpg", face.convert("CMYK"))
    save("palette.png", face.convert("P", palette=Image.Palette.ADAPTIVE))
    rotated = face.rotate(90, expand=True)  # stored sideways, EXIF says rotate back
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    save("exif_rotated.jpg", rotated, exif=exif)
    frames = [face, Image.new("RGB", face.size, (0, 0, 0))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated"] = d / "animated.gif"
    save("blank.jpg", Image.new("RGB", (400, 300), (120, 160, 200)))
    grid = Image.new("RGB", (6 * 224, 5 * 224), (255, 255, 255))
    for i in range(30):
        grid.paste(Image.open(faces[i % len(faces)]).convert("RGB"), ((i % 6) * 224, (i // 6) * 224))
    save("thirty.jpg", grid, quality=92)
    tiny = Image.new("RGB", (400, 300), (255, 255, 255))
    tiny.paste(face.resize((30, 30)), (200, 150))  # the face inside is about 20 px wide
    save("tiny_face.png", tiny)
    return out


@pytest.fixture(scope="session")
def tiny_fairface(tmp_path_factory):
    """21 images: each fixture, its mirror and a brighter copy, labelled with the fixture's race."""
    root = tmp_path_factory.mktemp("ff")
    for split in ("train", "val"):
        (root / split).mkdir()
        lines = ["file,age,gender,race,service_test"]
        for r in fixture_labels():
            img = Image.open(FIXTURES / r["file"]).convert("RGB")
            for i, variant in enumerate((img, ImageOps.mirror(img), img.point(lambda v: min(255, v + 25)))):
                name = f"{split}/{r['file'][:-4]}_{i}.jpg"
                variant.save(root / name, quality=95)
                lines.append(f"{name},{r['age']},{r['gender']},{r['race']},False")
        (root / f"fairface_label_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def synthetic_heldout(k: int = 7, per_class: int = 20):
    """Held-out faces (quantify.HeldOut) of a model that gives its true class 0.6 and spreads the rest evenly."""
    from facerace.quantify import HeldOut

    probs = np.full((k * per_class, k), 0.4 / (k - 1))
    labels = np.repeat(np.arange(k), per_class)
    probs[np.arange(len(labels)), labels] = 0.6
    return HeldOut(probs, labels)


@pytest.fixture(scope="module")
def model_with_heldout(tmp_path_factory):
    """The shipped default's head and config plus synthetic held-out statistics (audit tests)."""
    import json
    import shutil

    from facerace.model import CONFIG_FILE, HELDOUT_FILE, ModelConfig, load_config, resolve, save_heldout

    folder = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(resolve("default"), folder)
    (folder / HELDOUT_FILE).unlink(missing_ok=True)
    digest = save_heldout(folder / HELDOUT_FILE, synthetic_heldout())
    config = ModelConfig.from_dict({**load_config(folder).to_dict(), "heldout": HELDOUT_FILE, "heldout_sha256": digest})
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    return folder
