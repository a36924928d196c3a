import io

import numpy as np
import pytest
from PIL import Image

from facerace.errors import ImageError
from facerace.images import load_image


@pytest.mark.parametrize("kind", ["gray", "rgba", "sixteen", "cmyk", "palette", "exif_rotated", "animated"])
def test_every_mode_becomes_rgb_uint8(bad_inputs, kind):
    rgb = load_image(bad_inputs[kind])
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.std() > 10  # a real picture, not a blank or saturated frame


def test_sixteen_bit_is_scaled_not_clipped(bad_inputs, faces):
    gray = np.asarray(Image.open(faces[0]).convert("L"), dtype=float)
    rgb = load_image(bad_inputs["sixteen"])
    assert np.abs(rgb[:, :, 0].astype(float) - gray).max() <= 1


def test_exif_orientation_applied_once(bad_inputs, faces):
    upright = np.asarray(Image.open(faces[0]).convert("RGB"), dtype=float)
    rgb = load_image(bad_inputs["exif_rotated"]).astype(float)
    assert rgb.shape == upright.shape
    assert np.abs(rgb - upright).mean() < 8  # JPEG noise only


def test_inputs_of_every_type_agree(faces):
    path = faces[0]
    ref = load_image(path)
    data = path.read_bytes()
    for other in (str(path), data, io.BytesIO(data), Image.open(path), ref.copy()):
        assert np.array_equal(load_image(other), ref)


@pytest.mark.parametrize(
    "kind, reason",
    [("not_image", "not an image"), ("truncated", "truncated"), ("corrupt_png", "corrupt"),
     ("empty", "empty file"), ("bomb", "too large")],
)
def test_bad_files_raise_one_error_type_naming_file_and_reason(bad_inputs, kind, reason):
    with pytest.raises(ImageError) as info:
        load_image(bad_inputs[kind])
    assert reason in info.value.reason
    assert str(bad_inputs[kind]) in str(info.value)


def test_pixel_limit_is_configurable(faces):
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(faces[0], max_pixels=100)


def test_missing_file_and_bad_arrays():
    with pytest.raises(ImageError, match="no such file"):
        load_image("does/not/exist.jpg")
    with pytest.raises(ImageError, match="not an image"):
        load_image(np.zeros((4, 4, 7), np.uint8))
    float_img = load_image(np.full((8, 8), 0.5))
    assert float_img.dtype == np.uint8 and float_img[0, 0, 0] == 128
