"""VGG-Face (Parkhi et al., 2015) in PyTorch, with the weights of the public Keras `.h5` files.

The layout is the Keras model of serengil's tutorial and of deepface: 13 convolutions 3x3, then
fc6/fc7/fc8 as convolutions (7x7, 1x1, 1x1). The same loader reads `vgg_face_weights.h5`
(2622 identities) and the tutorial-style race models, whose class layer is a 1x1 convolution
with N classes in place of fc8. Nothing is ever downloaded: users give the file's path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facerace.backbones.base import InputSpec, tuned_space
from facerace.errors import InvalidParameterError, MissingDependencyError, ModelNotFoundError, WeightsFileError

CHIP_SIZE = 224
BLOCKS = (2, 2, 3, 3, 3)
LAYER_NAMES = tuple(f"conv{b + 1}_{i + 1}" for b, n in enumerate(BLOCKS) for i in range(n)) + ("fc6", "fc7", "fc8")
BATCH = 32


class VGGFace(nn.Module):
    """VGG-Face: (n, 3, 224, 224) from `chips_to_tensor` -> (n, classes) logits (no softmax)."""

    def __init__(self, classes: int = 2622, widths: tuple[int, ...] = (64, 128, 256, 512, 512), fc: int = 4096) -> None:
        super().__init__()
        if len(widths) != len(BLOCKS):
            raise InvalidParameterError(f"widths needs {len(BLOCKS)} values (one per block), got {widths}")
        self.classes, self.widths, self.fc = classes, tuple(widths), fc
        layers: list[tuple[str, nn.Module]] = []
        in_channels = 3
        for b, (count, width) in enumerate(zip(BLOCKS, widths)):
            for i in range(count):
                layers += [(f"conv{b + 1}_{i + 1}", nn.Conv2d(in_channels, width, 3, padding=1)),
                           (f"relu{b + 1}_{i + 1}", nn.ReLU())]
                in_channels = width
            layers.append((f"pool{b + 1}", nn.MaxPool2d(2, 2)))
        for name, module in (("fc6", nn.Conv2d(in_channels, fc, 7)), ("fc7", nn.Conv2d(fc, fc, 1))):
            layers += [(name, module), (f"relu{name[2:]}", nn.ReLU()), (f"drop{name[2:]}", nn.Dropout(0.5))]
        self.body = nn.Sequential(OrderedDict(layers))
        self.fc8 = nn.Conv2d(fc, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.body(x)).flatten(1)

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """fc7 after its ReLU, (n, fc): the usual VGG-Face face descriptor."""
        return self.body(x).flatten(1)

    def weight_layers(self) -> list[nn.Module]:
        """The 16 layers with weights in order: conv1_1 .. conv5_3, fc6, fc7, fc8."""
        return [m for m in self.body if isinstance(m, nn.Conv2d)] + [self.fc8]

    def split(self, unfreeze: int) -> tuple[nn.Module, nn.Module]:
        """(frozen prefix, trainable suffix) with `suffix(prefix(x)) == descriptor(x)`.

        The suffix holds the last `unfreeze` of the 15 layers conv1_1 .. fc7 (0: it only
        flattens). Both share this model's modules, so loaded weights are used.
        """
        convs = [i for i, m in enumerate(self.body) if isinstance(m, nn.Conv2d)]
        if not 0 <= unfreeze <= len(convs):
            raise InvalidParameterError(
                f"unfreeze must be 0..{len(convs)} (layers conv1_1..fc7 from the end), got {unfreeze}"
            )
        cut = convs[len(convs) - unfreeze] if unfreeze else len(self.body)
        return self.body[:cut], nn.Sequential(self.body[cut:], nn.Flatten())


def _checked_chips(chips: np.ndarray) -> np.ndarray:
    chips = np.asarray(chips)
    if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3) or chips.dtype != np.uint8:
        raise ValueError(f"expected (n, {CHIP_SIZE}, {CHIP_SIZE}, 3) uint8 RGB chips, got {chips.shape} {chips.dtype}")
    return chips


def normalise(chips: torch.Tensor) -> torch.Tensor:
    """(n, 224, 224, 3) uint8 RGB tensor -> (n, 3, 224, 224) float32 x / 255, as the Keras models were fed."""
    return chips.permute(0, 3, 1, 2).float() / 255


def chips_to_tensor(chips: np.ndarray) -> torch.Tensor:
    """`normalise` for numpy chips, checking their shape and type."""
    return normalise(torch.from_numpy(_checked_chips(chips)))


def _attribute(group: Any, name: str) -> list[str]:
    """A Keras list-of-names attribute, also when Keras split it into `name0`, `name1`, ..."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values += list(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _keras_layers(path: Path, read: Callable[[Any], Any]) -> list[tuple[str, list[Any]]]:
    """(name, [read(dataset) per weight]) of each Keras layer with weights, in `layer_names` order."""
    try:
        import h5py
    except ImportError as exc:
        raise MissingDependencyError("reading Keras .h5 weights needs h5py: pip install h5py") from exc
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such file; pass the path of a Keras VGG-Face .h5 weights file")
    if not h5py.is_hdf5(path):
        raise WeightsFileError(f"{path}: not an HDF5 file; expected Keras .h5 weights "
                               "(model.save_weights or model.save)")
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        names = _attribute(root, "layer_names")
        if not names:
            raise WeightsFileError(f"{path}: no `layer_names` attribute, so no Keras layers; expected a Keras 2 "
                                   "model.save_weights or model.save file (Keras 3 .weights.h5 is not read)")
        layers = [(name, [read(root[name][w]) for w in _attribute(root[name], "weight_names")]) for name in names]
    return [(name, weights) for name, weights in layers if weights]


def _check_count(path: Path, layers: list[tuple[str, list[Any]]]) -> None:
    if len(layers) != len(LAYER_NAMES):
        raise WeightsFileError(
            f"{path}: found {len(layers)} layers with weights ({', '.join(n for n, _ in layers)}), expected "
            f"{len(LAYER_NAMES)} (13 convolutions, fc6, fc7 and the class layer); is it a VGG-Face Keras file?"
        )


def _split_weights(path: Path, index: int, name: str, weights: list[Any]) -> tuple[Any, Any]:
    """The (4-D kernel, 1-D bias) pair of one Keras convolution."""
    shapes = [w.shape for w in weights]
    if [len(s) for s in shapes] != [4, 1]:
        raise WeightsFileError(f"{path}: layer {index} ({name!r}, for {LAYER_NAMES[index]}) has weights of shapes "
                               f"{shapes}, expected a 4-D kernel and a 1-D bias")
    return weights[0], weights[1]


def _sizes(path: Path, layers: list[tuple[str, list[Any]]]) -> dict[str, Any]:
    _check_count(path, layers)
    outs = [int(_split_weights(path, i, name, w)[0].shape[3]) for i, (name, w) in enumerate(layers)]
    return {"classes": outs[15], "widths": tuple(outs[i] for i in np.cumsum(BLOCKS) - 1), "fc": outs[13]}


def infer_shape(path: str | Path) -> dict[str, Any]:
    """The `VGGFace(**kwargs)` that fits a Keras .h5 file, from its shapes alone (no weights are read)."""
    path = Path(path)
    # np.broadcast_to gives a stand-in of each dataset's shape without reading or allocating it.
    return _sizes(path, _keras_layers(path, lambda d: np.broadcast_to(np.float32(0), d.shape)))


@torch.no_grad()
def load_keras_h5(path: str | Path, model: VGGFace | None = None) -> VGGFace:
    """VGG-Face with the weights of a Keras .h5 file, in eval mode.

    Reads files of `model.save_weights` and of `model.save` (under `model_weights`), both the
    2622-identity `vgg_face_weights.h5` and tutorial-style race models (the class layer a 1x1
    convolution with N classes). Layers with weights are matched to conv1_1 .. fc8 by order and
    shape; with `model=None` the widths, fc and classes are read from the file.
    """
    path = Path(path)
    layers = _keras_layers(path, lambda d: d[()])
    model = VGGFace(**_sizes(path, layers)) if model is None else model
    _check_count(path, layers)
    for index, (module, (name, weights)) in enumerate(zip(model.weight_layers(), layers, strict=True)):
        kernel, bias = _split_weights(path, index, name, weights)
        expected = tuple(module.weight.permute(2, 3, 1, 0).shape)
        if kernel.shape != expected or bias.shape != (expected[3],):
            raise WeightsFileError(
                f"{path}: layer {index} ({name!r}, for {LAYER_NAMES[index]}) has kernel {kernel.shape} and bias "
                f"{bias.shape}, expected {expected} and {(expected[3],)} (Keras layout kh, kw, in, out)"
            )
        module.weight.copy_(torch.from_numpy(np.asarray(kernel, np.float32)).permute(3, 2, 0, 1))
        module.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
    return model.eval()


@torch.no_grad()
def load_tuned(model: VGGFace, path: str | Path) -> VGGFace:
    """Replace `model`'s tensors by those of a fine-tuned layers file (safetensors, names of `state_dict()`)."""
    from safetensors.torch import load_file

    state = model.state_dict()
    tensors = load_file(str(path))
    wrong = [f"{k} {tuple(v.shape)}" + (f" (expected {tuple(state[k].shape)})" if k in state else " (unknown name)")
             for k, v in tensors.items() if k not in state or v.shape != state[k].shape]
    if wrong:
        raise WeightsFileError(f"{path}: tensors that do not fit this VGGFace: {', '.join(wrong)}; "
                               "expected names and shapes of VGGFace.state_dict(), e.g. body.fc7.weight")
    model.load_state_dict(tensors, strict=False)
    return model


def load_network(weights: str | Path | None = None, tuned: str | Path | None = None
                 ) -> tuple[VGGFace, Callable[[torch.Tensor], torch.Tensor]]:
    """(VGGFace of Keras file `weights` with the layers of fine-tuned file `tuned`, in eval mode; `normalise`)."""
    if not weights:
        raise InvalidParameterError("the vggface network needs its weights file: --backbone-weights vgg_face_weights.h5")
    net = load_keras_h5(weights)
    return (load_tuned(net, tuned) if tuned else net).eval(), normalise


class VGGFaceBackbone:
    """The VGG-Face fc7 descriptor of a user-supplied Keras .h5 file, behind the `Backbone` protocol.

    `tuned`: a fine-tuned layers file (see `load_tuned`) applied on top; it changes `space`.
    """

    name = "vggface"
    input_spec = InputSpec(chip_size=CHIP_SIZE, padding=0.25)

    def __init__(self, weights: str | Path, threads: int = 1, tuned: str | Path | None = None) -> None:
        self.weights = Path(weights)
        self.threads = threads
        self.tuned = str(tuned) if tuned else None
        self._sha256: str | None = None
        self._dim: int | None = None
        self._model: VGGFace | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            from facerace.files import sha256_file

            self._sha256 = sha256_file(self.weights)
        return self._sha256

    @property
    def space(self) -> str:
        return tuned_space(f"vggface:{self.sha256[:16]}", self.tuned)

    @property
    def version(self) -> str:
        return f"torch {metadata.version('torch')}; {self.weights.name} sha256 {self.sha256}"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = infer_shape(self.weights)["fc"]
        return self._dim

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(n, 224, 224, 3) uint8 RGB chips -> (n, dim) float32 fc7 descriptors."""
        chips = _checked_chips(chips)
        if len(chips) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self._model is None:
            self._model = load_keras_h5(self.weights)
            if self.tuned:
                load_tuned(self._model, self.tuned)
            self._dim = self._model.fc
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                batches = [chips[i : i + BATCH] for i in range(0, len(chips), BATCH)]
                out = [self._model.descriptor(chips_to_tensor(batch)) for batch in batches]
        finally:
            torch.set_num_threads(threads)
        return torch.cat(out).numpy().astype(np.float32, copy=False)
