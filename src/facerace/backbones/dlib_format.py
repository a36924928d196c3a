"""Reading dlib's ResNet face-descriptor network from its `.dat` file (numpy only).

`dlib_face_recognition_resnet_model_v1.dat` (package `face-recognition-models`) holds the
network of dlib's `examples/dnn_face_recognition_ex.cpp` in dlib's own serialisation:

- integers: a control byte (low 4 bits: byte count, high bit: sign), then the absolute value
  in that many little-endian bytes (`dlib/serialize.h`);
- floats and doubles: `float_details`, i.e. an int64 mantissa then an int16 exponent, both
  as integers above; value = mantissa * 2**exponent, exponents 32000/32001/32002 meaning
  inf/-inf/nan (`dlib/float_details.h`);
- strings: a length, then the bytes; bools: one byte, ASCII '1' or '0';
- tensors (version 2): num_samples, k, nr, nc, then raw little-endian float32 values;
  alias tensors (version 1): only their shape (`dlib/dnn/tensor.h`).

The network nests like its C++ type (`dlib/dnn/core.h`): `add_loss_layer` writes its version,
the loss details, then its subnetwork; every `add_layer` writes its version, then its whole
subnetwork, then its own layer details and run-time state; tag and skip layers write only a
version. So the file holds all wrapper versions outermost first, then the input layer, then
the layer details innermost (input side) first.

The descriptor is the 128-d output of the final `fc_no_bias` layer, not normalised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
#: dlib's `input_rgb_image_sized<150>` means (red, green, blue), as stored in the model file.
MEAN_RGB = (122.782, 117.001, 104.298)
CHIP_SIZE = 150

#: (channels, residual blocks, first block downsamples) per stage, input side first.
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))

_FLOAT_SPECIALS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


class _Stream:
    """A cursor over bytes in dlib's serialisation format."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def int(self) -> int:
        control = self.bytes(1)[0]
        value = int.from_bytes(self.bytes(control & 0x0F), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        return _FLOAT_SPECIALS[exponent] if exponent in _FLOAT_SPECIALS else math.ldexp(mantissa, exponent)

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError("unexpected end of dlib model file")
        self.pos += n
        return out

    def string(self) -> str:
        return self.bytes(self.int()).decode("ascii")

    def peek_string(self) -> str | None:
        """The string at the cursor, or None if the bytes there can't be one; never moves."""
        start = self.pos
        try:
            return self.string()
        except (UnicodeDecodeError, ValueError):
            return None
        finally:
            self.pos = start

    def bool(self) -> bool:
        return {b"1": True, b"0": False}[self.bytes(1)]

    def version(self, expected: int, what: str) -> None:
        found = self.int()
        if found != expected:
            raise ValueError(f"{what}: serialisation version {found}, expected {expected}")

    def tensor(self) -> np.ndarray:
        """A `tensor`, as a float32 array of shape (num_samples, k, nr, nc)."""
        self.version(2, "tensor")
        shape = tuple(self.int() for _ in range(4))
        count = math.prod(shape)
        return np.frombuffer(self.bytes(4 * count), dtype="<f4").astype(np.float32).reshape(shape)

    def alias_shape(self) -> tuple[int, int, int, int]:
        """An `alias_tensor`: just a shape (num_samples, k, nr, nc)."""
        self.version(1, "alias_tensor")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]


def _read_con(s: _Stream) -> dict[str, Any]:
    params = s.tensor().ravel()
    num_filters, nr, nc = s.int(), s.int(), s.int()
    stride = (s.int(), s.int())
    padding = (s.int(), s.int())
    filters, biases = s.alias_shape(), s.alias_shape()
    for _ in range(4):  # learning-rate and weight-decay multipliers (training only)
        s.float()
    n_weights = math.prod(filters)
    if filters[0] != num_filters or filters[2:] != (nr, nc) or params.size != n_weights + math.prod(biases):
        raise ValueError("con_ layer: parameter sizes don't match its shape")
    weight = params[:n_weights].reshape(filters)
    return {"type": "con", "weight": weight, "bias": params[n_weights:], "stride": stride, "padding": padding}


def _read_affine(s: _Stream) -> dict[str, Any]:
    params = s.tensor().ravel()
    gamma, beta = s.alias_shape(), s.alias_shape()
    mode = s.int()
    if mode != 0:  # dlib's CONV_MODE: one scale and shift per channel
        raise ValueError(f"affine_ layer in mode {mode}, expected CONV_MODE (0)")
    n = math.prod(gamma)
    if params.size != n + math.prod(beta):
        raise ValueError("affine_ layer: parameter sizes don't match its shape")
    return {"type": "affine", "gamma": params[:n], "beta": params[n:]}


def _read_pool(kind: str) -> Callable[[_Stream], dict[str, Any]]:
    def read(s: _Stream) -> dict[str, Any]:
        window = (s.int(), s.int())
        stride = (s.int(), s.int())
        padding = (s.int(), s.int())
        return {"type": kind, "window": window, "stride": stride, "padding": padding}

    return read


def _read_fc(s: _Stream) -> dict[str, Any]:
    num_outputs, num_inputs = s.int(), s.int()
    params = s.tensor()
    s.alias_shape(), s.alias_shape()  # weights and biases views of params
    bias_mode = s.int()
    for _ in range(4):  # learning-rate and weight-decay multipliers (training only)
        s.float()
    if bias_mode != 1 or params.shape != (num_inputs, num_outputs, 1, 1):  # 1: dlib's FC_NO_BIAS
        raise ValueError("fc_ layer: expected a bias-free num_inputs x num_outputs matrix")
    return {"type": "fc", "weight": params[:, :, 0, 0].T.copy()}


_LAYER_READERS = {
    "con_4": _read_con,
    "affine_": _read_affine,
    "relu_": lambda s: {"type": "relu"},
    "max_pool_2": _read_pool("max_pool"),
    "avg_pool_2": _read_pool("avg_pool"),
    "add_prev_": lambda s: {"type": "add_prev"},
    "fc_2": _read_fc,
}


def read_dlib_resnet(path: str | Path | None = None) -> dict[str, Any]:
    """Parse dlib's face-descriptor network file (default: the one of `face-recognition-models`).

    Returns {"loss": {...}, "input": {"mean_rgb", "size"}, "layers": [...]}, where "layers"
    lists the computational layers input side first, each a dict with "type" (con, affine,
    relu, max_pool, avg_pool, add_prev, fc) and its numpy parameters / settings. Tag and skip
    layers store nothing but a version, so they are not listed.
    """
    s = _Stream(Path(path or _default_path()).read_bytes())
    s.version(1, "add_loss_layer")
    if (loss := s.string()) != "loss_metric_2":
        raise ValueError(f"unexpected loss layer {loss!r}")
    loss_details = {"type": "loss_metric", "margin": s.float(), "distance_threshold": s.float()}

    wrappers = []  # versions of add_layer (2), tag and skip (1) wrappers, outermost first
    while s.peek_string() != "input_rgb_image_sized":
        wrappers.append(s.int())
    if wrappers.pop() != 3:
        raise ValueError("expected the innermost add_layer to be serialisation version 3")
    if set(wrappers) - {1, 2}:
        raise ValueError(f"unexpected layer versions {sorted(set(wrappers))}")

    s.string()
    mean_rgb = (s.float(), s.float(), s.float())
    size = (s.int(), s.int())
    layers = []
    for i in range(wrappers.count(2) + 1):
        name = s.string()
        if name not in _LAYER_READERS:
            raise ValueError(f"unsupported dlib layer {name!r}")
        layers.append(_LAYER_READERS[name](s))
        for _ in range(3):  # setup-called / gradient-stale / output-disabled flags
            s.bool()
        for _ in range(3):  # cleared run-time tensors: x_grad, cached output, gradients
            s.tensor()
        if i == 0:
            s.int()  # the input add_layer's sample_expansion_factor
    if s.pos != len(s.data):
        raise ValueError(f"{len(s.data) - s.pos} unread bytes at the end of the dlib model file")
    return {"loss": loss_details, "input": {"mean_rgb": mean_rgb, "size": size}, "layers": layers}


def check_input(parsed: dict[str, Any]) -> None:
    """Refuse a file whose input layer differs from the 150 px chips and means assumed here."""
    if parsed["input"]["size"] != (CHIP_SIZE, CHIP_SIZE) or not np.allclose(
        parsed["input"]["mean_rgb"], MEAN_RGB, rtol=0, atol=1e-4
    ):
        raise ValueError(f"unexpected input layer {parsed['input']}; expected {CHIP_SIZE} px chips, means {MEAN_RGB}")


def network(parsed: dict[str, Any]) -> dict[str, Any]:
    """Group the flat layer list into the ResNet's parts, checking every layer against the architecture.

    Returns {"stem": {"conv", "affine"}, "blocks": [{"down", "conv1", "affine1", "conv2", "affine2"}, ...],
    "fc": (128, 256) weight}; convolutions are {"weight", "bias", "stride", "padding"} dicts.
    """
    check_input(parsed)
    layers = iter(parsed["layers"])
    position = 0

    def take(kind: str, **settings: Any) -> dict[str, Any]:
        nonlocal position
        layer = next(layers, None)
        if layer is None or layer["type"] != kind:
            raise ValueError(f"layer {position}: found {layer and layer['type']}, expected {kind}: "
                             "not dlib's face-recognition ResNet")
        for key, want in settings.items():
            if tuple(layer[key]) != want:
                raise ValueError(f"layer {position} ({kind}): {key} {layer[key]}, expected {want}")
        position += 1
        return layer

    stem = {"conv": take("con", stride=(2, 2), padding=(0, 0)), "affine": take("affine")}
    take("relu")
    take("max_pool", window=(3, 3), stride=(2, 2), padding=(0, 0))
    blocks = []
    for _, count, first_down in STAGES:
        for i in range(count):
            down = first_down and i == 0
            stride, padding = ((2, 2), (0, 0)) if down else ((1, 1), (1, 1))
            block = {"down": down, "conv1": take("con", stride=stride, padding=padding), "affine1": take("affine")}
            take("relu")
            block.update(conv2=take("con", stride=(1, 1), padding=(1, 1)), affine2=take("affine"))
            if down:
                take("avg_pool", window=(2, 2), stride=(2, 2), padding=(0, 0))
            take("add_prev")
            take("relu")
            blocks.append(block)
    take("avg_pool", window=(0, 0), stride=(1, 1), padding=(0, 0))  # avg_pool_everything
    fc = take("fc")["weight"]
    if next(layers, None) is not None:
        raise ValueError("extra layers after the final fc layer: not dlib's face-recognition ResNet")
    return {"stem": stem, "blocks": blocks, "fc": fc}


def _parts(net: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """PyTorch parameter name (as in `dlib_torch.DlibResNet`) -> (layer dict of `net`, key in it)."""
    names = {"stem.0.weight": (net["stem"]["conv"], "weight"), "stem.0.bias": (net["stem"]["conv"], "bias"),
             "stem.1.gamma": (net["stem"]["affine"], "gamma"), "stem.1.beta": (net["stem"]["affine"], "beta"),
             "fc.weight": (net, "fc")}
    for i, block in enumerate(net["blocks"]):
        for part, keys in (("conv1", ("weight", "bias")), ("affine1", ("gamma", "beta")),
                           ("conv2", ("weight", "bias")), ("affine2", ("gamma", "beta"))):
            names.update({f"blocks.{i}.{part}.{k}": (block[part], k) for k in keys})
    return names


def state_dict(net: dict[str, Any]) -> dict[str, np.ndarray]:
    """The weights of `network(...)` under PyTorch parameter names."""
    return {name: layer[key] for name, (layer, key) in _parts(net).items()}


def apply_weights(net: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Replace weights of `net` in place by `tensors` (PyTorch names, e.g. a fine-tuned suffix); return `net`."""
    parts = _parts(net)
    for name, value in tensors.items():
        if name not in parts:
            raise ValueError(f"{name!r} is not a weight of dlib's ResNet")
        layer, key = parts[name]
        if layer[key].shape != value.shape:
            raise ValueError(f"{name}: shape {value.shape}, expected {layer[key].shape}")
        layer[key] = np.asarray(value, np.float32)
    return net


def _default_path() -> Path:
    from facerace.files import dlib_model_file

    return dlib_model_file(MODEL_FILE)
