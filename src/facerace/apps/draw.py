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


#: Smallest label font (px); a label still wider than the picture at this size is cut with "…".
MIN_FONT = 8


def annotate(rgb: np.ndarray, faces: Sequence[FaceResult], tags: Sequence[str] = ()) -> Image.Image:
    """A copy of the image with each face's box and `label confidence` (or `?`, `too small`) drawn, after the
    face's tag if given (e.g. a track id in a video). Labels stay inside the picture: above the box where there
    is room, else below it or inside its top, shifted left at the right edge, and smaller on small pictures
    (where "(uncertain)" becomes "?")."""
    img = Image.fromarray(rgb).copy()
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 300))
    size = max(MIN_FONT, round(max(img.size) / 40))
    for i, face in enumerate(faces):
        x, y, w, h = face.box
        if face.status != "ok":  # too_small, or pending in a stream
            colour, text = COLOURS["too_small"], face.status.replace("_", " ")
        else:
            colour = COLOURS["uncertain" if face.uncertain else "certain"]
            text = f"{face.label} {face.confidence:.0%}" + (" (uncertain)" if face.uncertain else "")
        text = f"{tags[i]} {text}" if i < len(tags) else text
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        short = text.replace(" (uncertain)", " ?")  # for pictures too small for the whole label
        (left, top), text, font = label_layout(draw, (text, short), (x, y, w, h), img.size, size, width)
        right, bottom = label_size(draw, text, font)
        draw.rectangle([left, top, left + right + 2 * width, top + bottom + 2 * width], fill=colour)
        draw.text((left + width, top + width), text, fill=(0, 0, 0), font=font, anchor="lt")
    return img


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def label_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont
               ) -> tuple[int, int]:
    """Width and height of `text` drawn from its top-left corner (anchor "lt")."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, anchor="lt")
    return right, bottom


def label_layout(draw: ImageDraw.ImageDraw, texts: Sequence[str], box: tuple[int, int, int, int],
                 picture: tuple[int, int], size: int, pad: int
                 ) -> tuple[tuple[int, int], str, ImageFont.FreeTypeFont | ImageFont.ImageFont]:
    """Where a face's label goes, its text and font: the first of `texts` (a label, then shorter forms of it)
    that fits the picture's width (with `pad` around it) at a font between MIN_FONT and `size` px, at the
    largest such font (the last text cut with "…" if none fits); above the box, else below it, else inside its
    top; moved left or up so that it ends inside the picture."""
    width, height = picture
    x, y, w, h = box

    def fits(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> bool:
        return label_size(draw, text, font)[0] + 2 * pad <= width

    sizes = [size]
    while sizes[-1] > MIN_FONT:
        sizes.append(max(MIN_FONT, int(sizes[-1] * 0.85)))
    chosen = next(((t, f) for t in texts for f in map(_font, sizes) if fits(t, f)), None)
    if chosen is None:
        text, font = texts[-1], _font(MIN_FONT)
        while len(text) > 1 and not fits(text, font):
            text = text[:-2] + "…"
    else:
        text, font = chosen
    tw, th = (v + 2 * pad for v in label_size(draw, text, font))
    top = y - th if y - th >= 0 else y + h if y + h + th <= height else y
    return (max(0, min(x, width - tw)), max(0, min(top, height - th))), text, font


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
