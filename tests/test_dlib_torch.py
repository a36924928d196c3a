"""The PyTorch port of dlib's ResNet face descriptor against dlib itself, on real aligned chips."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import cosine  # noqa: E402

from facerace.backbones.dlib_format import MEAN_RGB, MODEL_FILE  # noqa: E402
from facerace.backbones.dlib_torch import add_zero_padded, chips_to_tensor, load_dlib_resnet, save_onnx  # noqa: E402
from facerace.files import dlib_model_file  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_dlib_resnet()


def test_chips_to_tensor_is_dlibs_input_layer() -> None:
    chips = np.zeros((2, 150, 150, 3), np.uint8)
    chips[1, 10, 20] = (255, 0, 7)
    x = chips_to_tensor(chips)
    assert x.shape == (2, 3, 150, 150) and x.dtype == torch.float32
    expected = (np.array([255, 0, 7], np.float32) - np.array(MEAN_RGB, np.float32)) / 256
    np.testing.assert_array_equal(x[1, :, 10, 20].numpy(), expected)
    np.testing.assert_array_equal(x[0, :, 0, 0].numpy(), -np.array(MEAN_RGB, np.float32) / 256)
    with pytest.raises(ValueError):
        chips_to_tensor(np.zeros((1, 112, 112, 3), np.uint8))


def test_add_zero_padded_pads_the_smaller_at_the_end() -> None:
    a = torch.ones(1, 2, 3, 3)
    b = torch.full((1, 1, 4, 4), 10.0)
    out = add_zero_padded(a, b)
    assert out.shape == (1, 2, 4, 4)
    assert out[0, 0, 0, 0] == 11 and out[0, 0, 3, 3] == 10 and out[0, 1, 0, 0] == 1 and out[0, 1, 3, 3] == 0


def test_descriptors_match_dlib(chips, model) -> None:
    import dlib

    net = dlib.face_recognition_model_v1(str(dlib_model_file(MODEL_FILE)))
    expected = np.array([np.asarray(v) for v in net.compute_face_descriptor(list(chips))], np.float32)
    with torch.no_grad():
        got = model(chips_to_tensor(chips)).numpy()
    assert got.shape == (len(chips), 128)
    assert cosine(got, expected).min() >= 0.9999
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_onnx_export_matches_torch(chips, model, tmp_path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "dlib_resnet.onnx"
    save_onnx(model, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = chips_to_tensor(chips[:5])
    (got,) = session.run(None, {"chips": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (5, 128)
    np.testing.assert_allclose(got, expected, atol=1e-5)
