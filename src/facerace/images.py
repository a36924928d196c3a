"""Images in, RGB uint8 arrays out: one loader for paths, bytes, files, PIL images and arrays."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facerace.errors import ImageError, InvalidParameterError, check_choice

ImageInput = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]

#: Images with more pixels than this are refused (decompression-bomb guard): 50 megapixels.
MAX_PIXELS = 50_000_000

#: Channel orders of in-memory pixels: "rgb" (PIL, imageio, matplotlib) or "bgr" (OpenCV: cv2.imread, VideoCapture).
COLORS = ("rgb", "bgr")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                  ".heic", ".heif", ".avif")

#: The only Pillow decoders ever asked to open a file, whatever its name says (the formats the README lists; JPEG
#: includes camera MPO files, PPM the PGM/PBM variants, HEIF comes from pillow-heif): a file in another format
#: (EPS, which would run Ghostscript, PSD, FITS, ...) is "not an image" before any other plugin reads it.
DECODERS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM", "HEIF", "AVIF")


def _register_heif() -> None:
    """Let PIL open HEIC/HEIF photos (phones write them) through pillow-heif; AVIF is Pillow's own."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # then HEIC files are reported as an unsupported format
        return
    register_heif_opener()


_register_heif()


def _decoders() -> list[str]:
    """The DECODERS this Pillow has (HEIF only with pillow-heif, AVIF only where Pillow was built with it)."""
    Image.init()
    return [name for name in DECODERS if name in Image.OPEN]


def describe(image: ImageInput) -> str:
    """A short human name for an image input, used in results and error messages."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, bytes):
        return f"<{len(image)} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {'x'.join(map(str, image.shape))}>"
    if isinstance(image, Image.Image):
        return f"<PIL {image.mode} {image.width}x{image.height}>"
    return getattr(image, "name", "<file>")


def load_image(image: ImageInput, *, max_pixels: int = MAX_PIXELS, color: str = "rgb") -> np.ndarray:
    """Return the image as an RGB uint8 array of shape (H, W, 3).

    Accepts a path, bytes, a binary file object, a PIL image or a numpy array
    (H x W gray, H x W x 3 RGB or H x W x 4 RGBA). EXIF orientation is applied once;
    every PIL mode is converted to RGB; the first frame of an animation is used.
    `color` is the channel order of a numpy array: "rgb" (default) or "bgr" (OpenCV's
    `cv2.imread` and `VideoCapture`, BGRA for 4 channels); files and PIL images are always
    decoded as RGB, so "bgr" with them is refused (InvalidParameterError).
    Raises ImageError (naming the source and the reason) for anything that is not a
    readable image or has more than `max_pixels` pixels.
    """
    name = describe(image)
    check_choice("color", color, COLORS)
    if isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image, name, max_pixels)
        return np.ascontiguousarray(rgb[:, :, ::-1]) if color == "bgr" and image.ndim == 3 else rgb
    if color != "rgb":
        raise InvalidParameterError(f'color="{color}" describes numpy arrays (OpenCV\'s BGR pixels); {name} is '
                                    f"{type(image).__name__}, which is decoded as RGB: drop color=")
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, name, max_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            if not path.is_file():
                raise ImageError(name, "no such file" if not path.exists() else "not a file")
            if path.stat().st_size == 0:
                raise ImageError(name, "empty file (0 bytes)")
            f = open(path, "rb")
        except OSError as exc:  # permission denied, a name too long, an I/O error, ...
            raise ImageError(name, f"cannot read the file ({exc.strerror or exc})") from None
        with f:
            return _decode(f, name, max_pixels)
    if isinstance(image, bytes):
        if not image:
            raise ImageError(name, "empty file (0 bytes)")
        return _decode(io.BytesIO(image), name, max_pixels)
    if hasattr(image, "read"):
        return _decode(image, name, max_pixels)
    raise ImageError(name, f"unsupported input type {type(image).__name__}")


def _decode(stream: BinaryIO, name: str, max_pixels: int) -> np.ndarray:
    try:
        # Our own pixel limit is checked before decoding; PIL's own guard stays as a backstop.
        with Image.open(stream, formats=_decoders()) as img:
            _check_size(img.width, img.height, name, max_pixels)
            img.seek(0)
            return _pil_to_rgb(img, name, max_pixels)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image in a supported format (JPEG, PNG, BMP, GIF, WebP, TIFF, PPM/PGM, "
                               "HEIC/HEIF or AVIF)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(name, f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(name, f"corrupt or truncated image ({exc})") from None


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            name,
            f"image too large: {width}x{height} = {width * height:,} pixels "
            f"exceeds the limit of {max_pixels:,} (pass max_pixels= to raise it)",
        )
    if width == 0 or height == 0:
        raise ImageError(name, "image has no pixels")


def _pil_to_rgb(img: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    _check_size(img.width, img.height, name, max_pixels)
    img.load()
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(img), name, max_pixels)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _array_to_rgb(arr: np.ndarray, name: str, max_pixels: int) -> np.ndarray:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageError(name, f"array of shape {arr.shape} is not an image (want HxW, HxWx3 or HxWx4)")
    _check_size(arr.shape[1], arr.shape[0], name, max_pixels)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        top = arr.max() if arr.size else 0.0
        factor = 255.0 if top <= 1.0 else (255.0 / 65535.0 if top > 255 else 1.0)
        arr = np.clip(arr * factor + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = (arr[:, :, :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)
