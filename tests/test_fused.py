"""Fused backbones ("a+b"): one detection, each network's own chips and flip, embeddings concatenated;
train, evaluate, predict, embed and export handle them."""

import json

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from facerace.apps.cli import main
from facerace.errors import InvalidParameterError
from facerace.faces import FacePipeline
from facerace.predictor import Predictor

FUSED = "dlib-resnet-v1-onnx+sface"


def test_fused_pipeline_concatenates_each_networks_own_embedding(faces):
    rgb = np.asarray(Image.open(faces[0]).convert("RGB"))
    fused = FacePipeline("yunet", FUSED, flip_average=(True, False))
    found = fused.faces(rgb)
    dlib_chips, sface_chips = found.chips
    assert dlib_chips.shape == (1, 150, 150, 3) and sface_chips.shape == (1, 112, 112, 3)
    vectors = fused.embed(found.chips)
    dlib = FacePipeline("yunet", "dlib-resnet-v1-onnx", flip_average=True)
    sface = FacePipeline("yunet", "sface")
    expected = np.concatenate([dlib.embed(dlib.faces(rgb).chips), sface.embed(sface.faces(rgb).chips)], axis=1)
    assert vectors.shape == (1, 256) and np.allclose(vectors, expected, atol=1e-5)
    assert fused.flips == (True, False) and fused.get_backbone().dim == 256
    key = fused.cache_key(fallback=0.25)
    assert dlib.cache_key(fallback=0.25) in key and sface.cache_key(fallback=0.25) in key
    assert "/sface" in sface.cache_key() and FacePipeline("yunet", FUSED, flip_average=True).cache_key() != key
    assert fused.embed(fused.align(rgb, [])[1]).shape == (0, 256)


def test_fused_settings_are_checked(capsys):
    with pytest.raises(InvalidParameterError, match="one flip setting"):
        FacePipeline(backbone=FUSED, flip_average=(True, False, True)).members
    with pytest.raises(InvalidParameterError, match="Did you mean 'sface'"):
        FacePipeline(backbone="dlib-resnet-v1-onnx+sfac").members
    with pytest.raises(InvalidParameterError, match="twice"):
        FacePipeline(backbone="sface+sface").members
    with pytest.raises(InvalidParameterError, match="tuple of 2"):
        FacePipeline(backbone=FUSED).embed(np.zeros((1, 150, 150, 3), np.uint8))
    with pytest.raises(InvalidParameterError, match="one network"):
        FacePipeline(backbone="sface", flip_average=(True, False))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "fairface:x", "--backbone", "dlib-resnet-v1-onnx+nope"])
    assert exit_.value.code == 2 and "unknown backbone 'nope'" in capsys.readouterr().err


def test_fused_model_trains_predicts_evaluates_embeds_and_exports(tiny_fairface, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    args = ["--data", f"fairface:{tiny_fairface}", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--workers", "1"]
    run = tmp_path / "run"
    assert main(["train", *args, "--output", str(run), "--backbone", FUSED, "--flip-average", "on,off",
                 "--max-epochs", "10", "--val-fraction", "0.34"]) == 0
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["backbone"] == FUSED and config["flip_average"] == [True, False]
    assert config["chip_size"] == [150, 112] and config["chip_padding"] == [0.25, 0.0]
    assert json.loads((run / "config.json").read_text())["flip_average"] == [True, False]

    predictor = Predictor(run)
    assert predictor.pipeline.flips == (True, False)
    result = predictor.predict_image(FIXTURES / "354.jpg")
    assert abs(sum(result.faces[0].probabilities.values()) - 1) < 1e-6

    assert main(["evaluate", "--model", str(run), *args, "--split", "val", "--output", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 21

    assert main(["embed", str(FIXTURES / "354.jpg"), "--model", str(run), "--output", str(tmp_path / "e.npz")]) == 0
    assert np.load(tmp_path / "e.npz")["embeddings"].shape == (1, 256)

    exported = tmp_path / "fused.onnx"
    assert main(["export", "--model", str(run), "--output", str(exported)]) == 0
    rgb = np.asarray(Image.open(FIXTURES / "354.jpg").convert("RGB"))
    chips = predictor.pipeline.faces(rgb).chips
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["chips_dlib_resnet_v1_onnx", "chips_sface"]
    out = session.run(None, {"chips_dlib_resnet_v1_onnx": chips[0], "chips_sface": chips[1]})[0]
    assert np.abs(out - predictor.predict_proba(predictor.embed(chips))).max() < 1e-4


def test_a_loaded_head_keeps_its_layout_for_export(tmp_path):
    pytest.importorskip("torch")
    from facerace.head import HeadParams, RaceHead

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 6)).astype(np.float32), np.arange(60) % 3
    head = RaceHead(("a", "b", "c"), HeadParams(hidden=8, max_epochs=2)).fit(x, y, x, y)
    head.save(tmp_path / "h.safetensors")
    loaded = RaceHead.load(tmp_path / "h.safetensors", ("a", "b", "c"))
    assert loaded.params.hidden == 8  # not the default 512: export rebuilds the layers from it
    import torch

    with torch.no_grad():
        out = loaded.to_torch()(torch.from_numpy(x[:4])).numpy()
    assert np.allclose(out, head.predict_proba(x[:4]), atol=1e-5)
