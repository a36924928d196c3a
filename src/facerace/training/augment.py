"""Training-time augmentation of aligned face chips: mirror, small rotations/crops, colour jitter."""

from __future__ import annotations

import numpy as np


def augment(chip: np.ndarray, rng: np.random.Generator, *, rotation: float = 10.0, scale: float = 0.1,
            shift: float = 0.05, colour: float = 0.2) -> np.ndarray:
    """A randomly transformed copy of an (s, s, 3) uint8 chip.

    Mirrors half the time, rotates by up to `rotation` degrees, zooms by up to `scale`,
    shifts by up to `shift` of the side (edges reflected), and scales brightness, contrast
    and saturation by factors within 1 +- `colour`.
    """
    import cv2

    size = chip.shape[0]
    if rng.random() < 0.5:
        chip = chip[:, ::-1]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-rotation, rotation),
                                     1 + rng.uniform(-scale, scale))
    matrix[:, 2] += rng.uniform(-shift, shift, 2) * size
    out = cv2.warpAffine(np.ascontiguousarray(chip), matrix, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT).astype(np.float32)
    brightness, contrast, saturation = 1 + rng.uniform(-colour, colour, 3)
    grey = out @ np.array([0.299, 0.587, 0.114], np.float32)
    out = grey[..., None] + (out - grey[..., None]) * saturation
    out = (out - out.mean()) * contrast + out.mean() * brightness
    return np.clip(out, 0, 255).astype(np.uint8)


def view(chip: np.ndarray, index: int, seed: int) -> np.ndarray:
    """View `index` of a chip: 0 the chip, 1 its mirror image, 2 and up random augmentations seeded by (seed, index)."""
    if index == 0:
        return chip
    if index == 1:
        return np.ascontiguousarray(chip[:, ::-1])
    return augment(chip, np.random.default_rng([seed, index]))
