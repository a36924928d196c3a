"""Draw face boxes with label and confidence on an image (for --annotate and video)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from facerace.results import FaceResult

COLOURS = {"certain": (46, 204, 113), "uncertain": (241, 196, 15), "too_small": (160, 160, 160)}


def annotate(rgb: np.ndarray, faces: Sequence[FaceResult]) -> Image.Image:
    """A copy of the image with each face's box and `label confidence` (or `?`, `too small`) drawn."""
    img = Image.fromarray(rgb).copy()
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 300))
    try:
        font = ImageFont.load_default(size=max(12, round(max(img.size) / 40)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for face in faces:
        x, y, w, h = face.box
        if face.status != "ok":  # too_small, or pending in a stream
            colour, text = COLOURS["too_small"], face.status.replace("_", " ")
        else:
            colour = COLOURS["uncertain" if face.uncertain else "certain"]
            text = f"{face.label} {face.confidence:.0%}" + (" (uncertain)" if face.uncertain else "")
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        ty = y - (bottom - top) - 2 * width if y - (bottom - top) - 2 * width >= 0 else y + h
        draw.rectangle([x, ty, x + (right - left) + 2 * width, ty + (bottom - top) + 2 * width], fill=colour)
        draw.text((x + width, ty + width - (top - y)), text, fill=(0, 0, 0), font=font)
    return img
