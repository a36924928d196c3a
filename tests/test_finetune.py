"""Fine-tuning: augmentation, the split network, the tuned layers in the ONNX path, and `train --unfreeze` end to end."""

import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import FIXTURES  # noqa: E402

from facerace.apps.cli import main  # noqa: E402
from facerace.backbones.dlib_format import network, read_dlib_resnet  # noqa: E402
from facerace.backbones.dlib_onnx import build_onnx  # noqa: E402
from facerace.backbones.dlib_torch import chips_to_tensor, load_dlib_resnet  # noqa: E402
from facerace.errors import InvalidParameterError  # noqa: E402
from facerace.head import HeadParams, RaceHead  # noqa: E402
from facerace.predictor import Predictor  # noqa: E402
from facerace.training.augment import augment, view  # noqa: E402
from facerace.training.config import TrainConfig  # noqa: E402
from facerace.training.train import resume, train  # noqa: E402


@pytest.fixture(scope="module")
def dlib_net():
    torch.set_num_threads(1)
    return load_dlib_resnet()


def test_views_are_the_chip_its_mirror_then_seeded_augmentations(chips):
    chip = chips[0]
    assert view(chip, 0, 7) is chip
    assert np.array_equal(view(chip, 1, 7), chip[:, ::-1])
    a, b = view(chip, 2, 7), view(chip, 2, 7)
    assert a.dtype == np.uint8 and a.shape == chip.shape and np.array_equal(a, b)
    assert not np.array_equal(a, view(chip, 3, 7)) and not np.array_equal(a, view(chip, 2, 8))
    # an augmentation stays close to the face: same mean colour within 25%, not a copy
    out = augment(chip, np.random.default_rng(0))
    assert 0.75 < out.mean() / chip.mean() < 1.25 and not np.array_equal(out, chip)


@pytest.mark.parametrize("unfreeze", [1, 2, 5, 16])
def test_split_composes_to_the_whole_network(dlib_net, chips, unfreeze):
    x = chips_to_tensor(chips[:4])
    prefix, suffix = dlib_net.split(unfreeze)
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(x)), dlib_net(x), atol=1e-5)
    n_suffix = sum(p.numel() for p in suffix.parameters())
    assert n_suffix + sum(p.numel() for p in prefix.parameters()) == sum(p.numel() for p in dlib_net.parameters())
    assert (n_suffix == 256 * 128) == (unfreeze == 1)  # unit 1 is the fc layer alone


def test_split_refuses_counts_outside_the_network(dlib_net):
    for bad in (0, 17):
        with pytest.raises(InvalidParameterError, match="unfreeze must be within 1..16"):
            dlib_net.split(bad)


def test_tuned_layers_reach_the_onnx_graph_used_for_prediction(dlib_net, chips):
    ort = pytest.importorskip("onnxruntime")
    net = load_dlib_resnet()
    _, suffix = net.split(3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in suffix.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=generator))
    tuned = {n: p.detach().numpy() for n, p in net.named_parameters() if any(p is q for q in suffix.parameters())}
    assert len(tuned) == 2 * 4 * 2 + 1  # two blocks of conv+affine pairs, and fc
    session = ort.InferenceSession(build_onnx(weights=tuned), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"chips": chips[:6]})[0]
    with torch.no_grad():
        torch_out = net(chips_to_tensor(chips[:6])).numpy()
        base_out = dlib_net(chips_to_tensor(chips[:6])).numpy()
    assert np.abs(onnx_out - torch_out).max() < 1e-4
    assert np.abs(onnx_out - base_out).max() > 1e-2  # the tuned layers changed the descriptor


def test_tuned_layers_must_fit_dlibs_network():
    net = network(read_dlib_resnet())
    with pytest.raises(ValueError, match="not a weight"):
        build_onnx(weights={"blocks.99.conv1.weight": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        build_onnx(weights={"fc.weight": np.zeros((3, 3), np.float32)})
    assert net["fc"].shape == (128, 256)


def test_head_layout_round_trips_between_numpy_and_torch():
    torch.manual_seed(0)
    mean, scale = torch.randn(8), torch.rand(8) + 0.5
    x = torch.randn(10, 8)
    for params in (HeadParams(hidden=5, dropout=0.5), HeadParams(hidden=0)):
        layers = RaceHead.torch_layers(8, 3, params).eval()
        race_head = RaceHead.from_torch(layers, mean.numpy(), scale.numpy(), ("a", "b", "c"), params)
        race_head.temperature_ = 1.7
        with torch.no_grad():
            expected = torch.softmax(layers((x - mean) / scale) / 1.7, 1).numpy()
            assert np.allclose(race_head.predict_proba(x.numpy()), expected, atol=1e-5)
            # and back: the numpy head as one PyTorch module (what export writes)
            assert np.allclose(race_head.to_torch()(x).numpy(), expected, atol=1e-5)


def test_train_unfreeze_end_to_end_then_resume_matches_an_uninterrupted_run(tiny_fairface, tmp_path, chips):
    cache = tmp_path / "cache"
    common = ["--data", f"fairface:{tiny_fairface}", "--cache-dir", str(cache), "--quiet", "--workers", "1",
              "--backbone", "dlib-torch", "--unfreeze", "2", "--views", "3", "--val-fraction", "0.34",
              "--patience", "10"]
    full = tmp_path / "full"
    assert main(["train", *common, "--out", str(full), "--max-epochs", "4"]) == 0
    for name in ("loss.png", "history.csv", "checkpoint.pt", "model/backbone.safetensors", "model/head.safetensors"):
        assert (full / name).stat().st_size > 0, name
    metrics = json.loads((full / "metrics.json").read_text())
    report = metrics["data"][f"fairface:{tiny_fairface}"]
    assert report["used"] == 21 and report["views"]["shape"][:2] == [21, 3] and metrics["epochs_run"] == 4
    config = json.loads((full / "model" / "config.json").read_text())
    assert config["backbone"] == "dlib-resnet-v1-onnx" and config["tuned"] == "backbone.safetensors"

    # the model predicts through the ONNX graph with its tuned layers, and differs from the frozen network
    predictor = Predictor(full)
    result = predictor.predict_image(FIXTURES / "354.jpg")
    assert result.faces[0].probabilities is not None
    assert predictor.get_backbone().space.startswith("dlib-resnet-v1-ft-")
    # and exports to one ONNX file that computes the same probabilities
    exported = tmp_path / "tuned.onnx"
    assert main(["export", "--model", str(full), "--output", str(exported)]) == 0
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    expected = predictor.predict_proba(predictor.embed(chips[:6]))
    assert np.abs(session.run(None, {"chips": chips[:6]})[0] - expected).max() < 1e-4

    # evaluate scores the tuned network, not embeddings the frozen one left in the same cache
    args = ["--data", f"fairface:{tiny_fairface}", "--split", "val", "--cache-dir", str(cache), "--quiet",
            "--workers", "1"]
    assert main(["evaluate", "--model", "default", *args, "--out", str(tmp_path / "ev-default")]) == 0
    assert main(["evaluate", "--model", str(full), *args, "--out", str(tmp_path / "ev-tuned")]) == 0
    with open(tmp_path / "ev-tuned" / "predictions.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["path"].endswith("354_0.jpg"))
    probabilities = Predictor(full, detector="yunet").predict_image(row["path"]).faces[0].probabilities
    assert all(abs(float(row[c]) - p) < 1e-3 for c, p in probabilities.items())

    # an interrupted run (2 epochs done) resumed to 4 epochs retraces the uninterrupted one, from stored views
    part = tmp_path / "part"
    config = TrainConfig(data=(f"fairface:{tiny_fairface}",), backbone="dlib-torch", unfreeze=2, views=3,
                         val_fraction=0.34, head=HeadParams(patience=10, max_epochs=2))
    train(config, out=part, cache_dir=cache, workers=1, quiet=True)
    settings = json.loads((part / "config.json").read_text())
    (part / "config.json").write_text(json.dumps({**settings, "head": {**settings["head"], "max_epochs": 4}}))
    resume(part, cache_dir=cache, workers=1, quiet=True)
    resumed = json.loads((part / "metrics.json").read_text())
    assert resumed["data"][f"fairface:{tiny_fairface}"]["computed_now"] == 0
    a, b = (np.loadtxt(r / "history.csv", delimiter=",", skiprows=1) for r in (full, part))
    assert np.allclose(a, b, atol=1e-4)


def test_train_unfreeze_usage_errors(tiny_fairface, tmp_path, capsys):
    base = ["train", "--data", f"fairface:{tiny_fairface}", "--quiet", "--cache-dir", str(tmp_path)]
    assert main([*base, "--unfreeze", "2"]) == 2  # the default backbone runs in ONNX Runtime: not trainable
    assert "PyTorch backbone" in capsys.readouterr().err
    assert main([*base, "--backbone", "dlib-torch", "--unfreeze", "40", "--out", str(tmp_path / "r1")]) == 2
    assert "within 1..16" in capsys.readouterr().err
    assert main([*base, "--backbone", "vggface", "--unfreeze", "2", "--out", str(tmp_path / "r2")]) == 2
    assert "weights file" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text('{"data": [], "weights": null}')
    assert main(["train", "--resume", str(tmp_path / "old")]) == 2
    assert "not written by this facerace version" in capsys.readouterr().err


def test_vggface_fine_tunes_from_a_keras_file_and_predicts(tiny_fairface, tmp_path):
    pytest.importorskip("h5py")
    from test_vggface import keras_layers, small_model, write_h5

    weights = tmp_path / "vgg_face_weights.h5"
    write_h5(weights, keras_layers(small_model()))
    run = tmp_path / "run"
    assert main(["train", "--data", f"fairface:{tiny_fairface}", "--cache-dir", str(tmp_path / "cache"), "--quiet",
                 "--workers", "1", "--backbone", "vggface", "--backbone-weights", str(weights), "--unfreeze", "2",
                 "--views", "2", "--val-fraction", "0.34", "--max-epochs", "2", "--out", str(run)]) == 0
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["backbone"] == "vggface" and config["chip_size"] == 224
    assert config["backbone_weights"] == str(weights.resolve())
    result = Predictor(run).predict_image(FIXTURES / "354.jpg")
    assert len(result.faces[0].probabilities) == 7
    # the same file serves `facerace embed`: the fc7 descriptor of every face
    npz = tmp_path / "vgg.npz"
    assert main(["embed", str(FIXTURES / "354.jpg"), "--backbone", "vggface", "--backbone-weights", str(weights),
                 "--output", str(npz)]) == 0
    assert np.load(npz)["embeddings"].shape == (1, 16)
    # the default model's head cannot classify VGG-Face embeddings; dlib's C++ engine (fused with SFace as in the
    # default model) computes its own
    with pytest.raises(InvalidParameterError, match="does not compute"):
        Predictor("default", backbone="vggface", backbone_weights=weights).predict_proba(np.zeros((1, 16)))
    same = Predictor("default", backbone="dlib-resnet-v1+sface")
    assert same.pipeline.flips == (True, False) and same.predict_proba(np.zeros((1, 256))).shape == (1, 7)

    # and the fine-tuned VGG-Face model exports to one ONNX file with the Predictor's probabilities
    ort = pytest.importorskip("onnxruntime")
    exported = tmp_path / "vgg.onnx"
    assert main(["export", "--model", str(run), "--output", str(exported)]) == 0
    chips = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    predictor = Predictor(run)
    expected = predictor.predict_proba(predictor.embed(chips))
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"chips": chips})[0] - expected).max() < 1e-4


def test_export_gives_the_predictors_probabilities(tmp_path, faces):
    from PIL import Image

    from facerace.export import input_names

    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "default.onnx"
    assert main(["export", "--model", "default", "--output", str(path)]) == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predictor = Predictor("default")
    found = [predictor.pipeline.faces(np.asarray(Image.open(f).convert("RGB"))).chips for f in faces]
    chips = [np.concatenate(parts) for parts in zip(*found)] if predictor.pipeline.fused \
        else [np.concatenate(found)]
    names = input_names(predictor.config.backbone)
    exported = session.run(None, dict(zip(names, chips)))[0]
    expected = predictor.predict_proba(predictor.embed(tuple(chips) if predictor.pipeline.fused else chips[0]))
    assert exported.shape == (len(faces), 7) and np.abs(exported - expected).max() < 1e-4


def test_dlib_torch_backbone_embeds_as_the_onnx_one(chips):
    from facerace.backbones import create_backbone

    torch_backbone, onnx_backbone = create_backbone("dlib-torch"), create_backbone("dlib-resnet-v1-onnx")
    assert torch_backbone.space == onnx_backbone.space
    assert np.abs(torch_backbone.embed(chips[:4]) - onnx_backbone.embed(chips[:4])).max() < 1e-4
    assert torch_backbone.embed(chips[:0]).shape == (0, 128)
