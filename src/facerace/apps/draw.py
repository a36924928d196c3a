"""Draw face boxes with label and confidence on an image (for --annotate and video)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from facerace.errors import InvalidParameterError
from facerace.results import FaceResult

COLOURS = {"certain": (46, 204, 113), "uncertain": (241, 196, 15), "too_small": (160, 160, 160)}


def annotate(rgb: np.ndarray, faces: Sequence[FaceResult], tags: Sequence[str] = ()) -> Image.Image:
    """A copy of the image with each face's box and `label confidence` (or `?`, `too small`) drawn, after the
    face's tag if given (e.g. a track id in a video)."""
    img = Image.fromarray(rgb).copy()
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 300))
    try:
        font = ImageFont.load_default(size=max(12, round(max(img.size) / 40)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for i, face in enumerate(faces):
        x, y, w, h = face.box
        if face.status != "ok":  # too_small, or pending in a stream
            colour, text = COLOURS["too_small"], face.status.replace("_", " ")
        else:
            colour = COLOURS["uncertain" if face.uncertain else "certain"]
            text = f"{face.label} {face.confidence:.0%}" + (" (uncertain)" if face.uncertain else "")
        text = f"{tags[i]} {text}" if i < len(tags) else text
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        ty = y - (bottom - top) - 2 * width if y - (bottom - top) - 2 * width >= 0 else y + h
        draw.rectangle([x, ty, x + (right - left) + 2 * width, ty + (bottom - top) + 2 * width], fill=colour)
        draw.text((x + width, ty + width - (top - y)), text, fill=(0, 0, 0), font=font)
    return img


def annotation_paths(paths: Sequence[str], folder: Path) -> dict[str, Path]:
    """Where `--annotate FOLDER` saves each image's picture: FOLDER / its path relative to the folder
    holding all the inputs, so `a/x.jpg` and `a/x.png`, or `a__b/c.jpg` and `a/b__c.jpg`, stay apart
    and keep their extension. Raises InvalidParameterError if a picture would overwrite an input."""
    resolved = {p: Path(p).resolve() for p in paths}
    if not resolved:
        return {}
    base = Path(os.path.commonpath([r.parent for r in resolved.values()]))
    targets = {p: folder / r.relative_to(base) for p, r in resolved.items()}
    inputs = set(resolved.values())
    clash = next((t for t in targets.values() if t.resolve() in inputs), None)
    if clash is not None:
        raise InvalidParameterError(f"--annotate {folder} would overwrite the input {clash}: "
                                    "choose a folder outside the inputs")
    return targets


def save_picture(img: Image.Image, target: Path) -> Path:
    """Save `img` at `target` in the format of its extension, or as `target` + ".png" where Pillow
    cannot write that format (e.g. .heic); written under a temporary name and renamed when complete;
    returns the path written."""
    from facerace.files import atomic_output

    fmt = Image.registered_extensions().get(target.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:  # no writer for this extension
        target, fmt = target.with_name(target.name + ".png"), "PNG"
    with atomic_output(target, "wb") as f:
        img.save(f, format=fmt)
    return target
