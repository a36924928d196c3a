"""VGG-Face in PyTorch against Keras-layout .h5 files written here (small widths, random weights)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")

from facerace.backbones.vggface import (  # noqa: E402
    VGGFace,
    VGGFaceBackbone,
    chips_to_tensor,
    infer_shape,
    load_keras_h5,
    load_tuned,
)
from facerace.errors import InvalidParameterError, ModelNotFoundError, WeightsFileError  # noqa: E402

SMALL = {"classes": 5, "widths": (4, 4, 8, 8, 8), "fc": 16}
BLOCK_SIZES = (2, 2, 3, 3, 3)


def small_model(seed: int = 0, **kwargs) -> VGGFace:
    torch.manual_seed(seed)
    model = VGGFace(**{**SMALL, **kwargs})
    for layer in model.weight_layers():  # default init gives near-zero fc outputs at this depth
        torch.nn.init.normal_(layer.weight, std=(2 / layer.weight[0].numel()) ** 0.5)
        torch.nn.init.normal_(layer.bias, std=0.1)
    return model.eval()


def keras_layers(model: VGGFace, head: str = "conv2d") -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """(layer name, [(weight name, array)]) in the order and layout of serengil's Keras VGG-Face.

    Each convolution follows a weightless ZeroPadding2D; fc6..fc8 are convolutions; `head`
    renames the class layer (the race tutorial's `predictions`).
    """
    weights = iter(model.weight_layers())
    count = {"conv2d": 0, "zero_padding2d": 0, "max_pooling2d": 0, "dropout": 0}

    def name(kind: str) -> str:
        count[kind] += 1
        return f"{kind}_{count[kind]}"

    def conv(layer_name: str) -> tuple[str, list[tuple[str, np.ndarray]]]:
        module = next(weights)
        kernel = module.weight.detach().permute(2, 3, 1, 0).numpy()
        return layer_name, [(f"{layer_name}/kernel:0", kernel), (f"{layer_name}/bias:0", module.bias.detach().numpy())]

    layers = []
    for size in BLOCK_SIZES:
        for _ in range(size):
            layers += [(name("zero_padding2d"), []), conv(name("conv2d"))]
        layers.append((name("max_pooling2d"), []))
    layers += [conv(name("conv2d")), (name("dropout"), []), conv(name("conv2d")), (name("dropout"), [])]
    layers += [conv(name("conv2d") if head == "conv2d" else head), ("flatten_1", []), ("activation_1", [])]
    return layers


def write_h5(path, layers, whole: bool = False) -> None:
    """A Keras 2 `save_weights` file, or a `save` file with the weights under `model_weights`."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if whole else f
        if whole:
            f.attrs["model_config"] = b'{"class_name": "Sequential"}'
        root.attrs["layer_names"] = np.array([n.encode() for n, _ in layers])
        for layer_name, weights in layers:
            group = root.create_group(layer_name)
            group.attrs["weight_names"] = np.array([w.encode() for w, _ in weights], dtype="S")
            for weight_name, array in weights:
                group.create_dataset(weight_name, data=array)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("whole", [False, True], ids=["save_weights", "save"])
def test_keras_file_loads_to_the_same_network(tmp_path, x, whole) -> None:
    reference = small_model()
    path = tmp_path / "vgg_face_weights.h5"
    write_h5(path, keras_layers(reference), whole=whole)
    assert infer_shape(path) == SMALL
    loaded = load_keras_h5(path)
    assert (loaded.classes, loaded.widths, loaded.fc) == (5, (4, 4, 8, 8, 8), 16) and not loaded.training
    with torch.no_grad():
        expected, got = reference(x), loaded(x)
        assert got.shape == (2, 5) and expected.abs().max() > 1e-3
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(loaded.descriptor(x), reference.descriptor(x))
    into = load_keras_h5(path, VGGFace(**SMALL))
    torch.testing.assert_close(into.body.fc6.weight, reference.body.fc6.weight)


def test_kernels_are_transposed_from_keras_layout(tmp_path) -> None:
    layers = keras_layers(small_model())
    conv1_1 = next(weights for _, weights in layers if weights)
    kernel = np.zeros((3, 3, 3, 4), np.float32)  # (kh, kw, in, out)
    kernel[0, 2, 1, 3] = 7.0
    conv1_1[0] = (conv1_1[0][0], kernel)
    write_h5(tmp_path / "w.h5", layers)
    weight = load_keras_h5(tmp_path / "w.h5").body.conv1_1.weight  # (out, in, kh, kw)
    assert weight[3, 1, 0, 2] == 7.0 and weight.abs().sum() == 7.0


def test_race_model_file_loads_with_its_class_layer(tmp_path, x) -> None:
    reference = small_model(classes=7)
    write_h5(tmp_path / "race_model_single_batch.h5", keras_layers(reference, head="predictions"))
    loaded = load_keras_h5(tmp_path / "race_model_single_batch.h5")
    assert loaded.classes == 7
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))
        assert loaded(x).shape == (2, 7)


def test_files_that_do_not_fit_say_what_is_wrong(tmp_path) -> None:
    layers = keras_layers(small_model())
    write_h5(tmp_path / "missing.h5", [layer for layer in layers if layer[0] != "conv2d_7"])
    with pytest.raises(WeightsFileError, match=r"missing\.h5: found 15 layers with weights .*expected 16"):
        load_keras_h5(tmp_path / "missing.h5")
    write_h5(tmp_path / "small.h5", layers)
    with pytest.raises(WeightsFileError, match=r"layer 0 \('conv2d_1', for conv1_1\) has kernel \(3, 3, 3, 4\).*"
                                               r"expected \(3, 3, 3, 64\)"):
        load_keras_h5(tmp_path / "small.h5", VGGFace(classes=5, widths=(64, 4, 8, 8, 8), fc=16))
    thin = {"conv2d_2": 1}  # conv1_2 with 1 input channel instead of 4
    bad = [(n, [(w, a[..., : thin[n], :] if a.ndim == 4 else a) for w, a in ws] if n in thin else ws)
           for n, ws in layers]
    write_h5(tmp_path / "shape.h5", bad)
    with pytest.raises(WeightsFileError, match=r"layer 1 \('conv2d_2', for conv1_2\) has kernel \(3, 3, 1, 4\)"):
        load_keras_h5(tmp_path / "shape.h5")
    (tmp_path / "not.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(WeightsFileError, match=r"not\.h5: not an HDF5 file"):
        load_keras_h5(tmp_path / "not.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(WeightsFileError, match="no `layer_names`"):
        load_keras_h5(tmp_path / "empty.h5")
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load_keras_h5(tmp_path / "absent.h5")


@pytest.mark.parametrize("unfreeze", [0, 1, 2, 5, 15])
def test_split_shares_modules_and_composes_to_the_descriptor(x, unfreeze) -> None:
    model = small_model()
    prefix, suffix = model.split(unfreeze)
    with torch.no_grad():
        torch.testing.assert_close(suffix(prefix(x)), model.descriptor(x))
    trainable = model.weight_layers()[:15][15 - unfreeze :]
    assert {id(p) for p in suffix.parameters()} == {id(p) for m in trainable for p in m.parameters()}
    assert not {id(p) for p in prefix.parameters()} & {id(p) for p in suffix.parameters()}
    assert not {id(p) for p in model.fc8.parameters()} & {id(p) for p in [*prefix.parameters(), *suffix.parameters()]}


def test_split_rejects_counts_outside_the_layers() -> None:
    model = small_model()
    for unfreeze in (-1, 16):
        with pytest.raises(InvalidParameterError, match=r"unfreeze must be 0\.\.15"):
            model.split(unfreeze)


def test_full_size_model_has_vgg_faces_parameter_count() -> None:
    with torch.device("meta"):
        model = VGGFace()
    assert sum(p.numel() for p in model.parameters()) == 145_002_878
    assert len(model.weight_layers()) == 16 and model.fc8.out_channels == 2622


def test_chips_to_tensor_scales_to_unit_range() -> None:
    chips = np.zeros((1, 224, 224, 3), np.uint8)
    chips[0, 5, 6] = (255, 0, 51)
    t = chips_to_tensor(chips)
    assert t.shape == (1, 3, 224, 224) and t.dtype == torch.float32
    np.testing.assert_allclose(t[0, :, 5, 6].numpy(), [1.0, 0.0, 0.2])
    with pytest.raises(ValueError, match=r"expected \(n, 224, 224, 3\) uint8"):
        chips_to_tensor(np.zeros((1, 224, 224, 3), np.float32))


def test_backbone_embeds_chips_lazily_and_pickles(tmp_path) -> None:
    reference = small_model()
    path = tmp_path / "vgg_face_weights.h5"
    write_h5(path, keras_layers(reference))
    backbone = VGGFaceBackbone(path)
    assert backbone.dim == 16 and backbone._model is None
    assert backbone.space.startswith("vggface:") and len(backbone.space) == len("vggface:") + 16
    assert backbone.input_spec.chip_size == 224 and "torch" in backbone.version
    assert backbone.embed(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 16)
    clone = pickle.loads(pickle.dumps(backbone))
    chips = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    out = backbone.embed(chips)
    assert out.shape == (2, 16) and out.dtype == np.float32
    with torch.no_grad():
        np.testing.assert_allclose(out, reference.descriptor(chips_to_tensor(chips)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clone.embed(chips), out, rtol=1e-5, atol=1e-6)
    again = pickle.loads(pickle.dumps(backbone))
    assert again._model is None and again.space == backbone.space
    np.testing.assert_allclose(again.embed(chips), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8 RGB chips"):
        backbone.embed(np.zeros((2, 150, 150, 3), np.uint8))


def test_tuned_layers_replace_the_loaded_ones_and_change_the_space(tmp_path) -> None:
    from safetensors.torch import save_file

    write_h5(tmp_path / "w.h5", keras_layers(small_model()))
    tuned = small_model(seed=3)
    fc7 = {k: v.contiguous() for k, v in tuned.state_dict().items() if k.startswith("body.fc7.")}
    save_file(fc7, tmp_path / "ft.st")
    base, backbone = VGGFaceBackbone(tmp_path / "w.h5"), VGGFaceBackbone(tmp_path / "w.h5", tuned=tmp_path / "ft.st")
    assert backbone.space.startswith(base.space + "-ft-")
    chips = np.random.default_rng(1).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    backbone.embed(chips)
    torch.testing.assert_close(backbone._model.body.fc7.weight, tuned.body.fc7.weight)
    torch.testing.assert_close(backbone._model.body.fc6.weight, small_model().body.fc6.weight)
    save_file({"body.fc7.weight": torch.zeros(3, 16, 1, 1), "head.weight": torch.zeros(1)}, tmp_path / "bad.st")
    with pytest.raises(WeightsFileError, match=r"body\.fc7\.weight \(3, 16, 1, 1\) \(expected \(16, 16, 1, 1\)\), "
                                               r"head\.weight \(1,\) \(unknown name\)"):
        load_tuned(small_model(), tmp_path / "bad.st")
