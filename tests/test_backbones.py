"""dlib's weights file read without dlib, and the ONNX Runtime backbone against dlib itself."""

import numpy as np
import pytest
from conftest import cosine

from facerace.backbones import create_backbone
from facerace.backbones.dlib_format import MEAN_RGB, MODEL_FILE, network, read_dlib_resnet
from facerace.backbones.dlib_onnx import cached_onnx
from facerace.files import dlib_model_file


def test_reader_finds_dlibs_face_recognition_resnet():
    parsed = read_dlib_resnet()
    assert parsed["input"]["size"] == (150, 150)
    np.testing.assert_allclose(parsed["input"]["mean_rgb"], MEAN_RGB, atol=1e-4)
    kinds = [layer["type"] for layer in parsed["layers"]]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "con": 29, "affine": 29, "relu": 29, "add_prev": 14, "avg_pool": 5, "max_pool": 1, "fc": 1}
    net = network(parsed)
    assert len(net["blocks"]) == 14 and sum(b["down"] for b in net["blocks"]) == 4
    assert net["stem"]["conv"]["weight"].shape == (32, 3, 7, 7) and net["fc"].shape == (128, 256)


def test_reader_rejects_other_and_truncated_files(tmp_path):
    with pytest.raises(ValueError):
        read_dlib_resnet(dlib_model_file("shape_predictor_5_face_landmarks.dat"))
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(dlib_model_file(MODEL_FILE).read_bytes()[:-10])
    with pytest.raises(ValueError):
        read_dlib_resnet(truncated)


def test_onnx_backbone_is_dlibs_network(chips):
    reference = create_backbone("dlib-resnet-v1").embed(chips)
    fast = create_backbone("dlib-resnet-v1-onnx").embed(chips)
    assert fast.shape == reference.shape == (len(chips), 128)
    assert cosine(fast, reference).min() >= 0.9999
    np.testing.assert_allclose(fast, reference, atol=1e-4)


def test_onnx_file_is_built_once_and_cached(tmp_path):
    first = cached_onnx(cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cached_onnx(cache_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    # no partial files left behind: the network and its recorded SHA-256
    assert sorted(first.parent.iterdir()) == [first, first.with_name(first.name + ".sha256")]


def test_flip_average_is_the_mean_of_chip_and_mirror(chips):
    from facerace.faces import FacePipeline

    backbone = create_backbone("dlib-resnet-v1-onnx")
    both = FacePipeline(flip_average=True).embed(chips[:4])
    expected = (backbone.embed(chips[:4]) + backbone.embed(np.ascontiguousarray(chips[:4, :, ::-1]))) / 2
    np.testing.assert_allclose(both, expected, atol=1e-5)
    assert not np.allclose(both, backbone.embed(chips[:4]), atol=1e-3)
