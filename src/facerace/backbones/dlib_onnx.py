"""dlib's ResNet face descriptor as an ONNX graph, built from its `.dat` file without PyTorch.

The graph takes uint8 chips (n, 150, 150, 3) RGB and returns the 128-d descriptors (n, 128),
numerically the same as dlib's own (tests/test_backbones.py). It is built once and cached
under the cache folder, keyed by the SHA-256 of the weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from facerace.backbones.dlib_format import CHIP_SIZE, MEAN_RGB, MODEL_FILE, apply_weights, network, read_dlib_resnet

OPSET = 17


def build_onnx(path: str | Path | None = None, weights: dict[str, np.ndarray] | None = None) -> bytes:
    """The serialised ONNX model of the network in dlib's file `path` (default: face-recognition-models').

    `weights` (PyTorch names, as saved by fine-tuning) replace the file's weights of those layers.
    """
    from onnx import TensorProto, checker, helper, numpy_helper

    net = apply_weights(network(read_dlib_resnet(path)), weights or {})
    nodes: list = []
    inits: list = []
    counter = iter(range(10**6))

    def const(array: np.ndarray) -> str:
        name = f"c{next(counter)}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def op(kind: str, inputs: list[str], **attrs: Any) -> str:
        out = f"t{next(counter)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def conv(x: str, layer: dict[str, Any]) -> str:
        py, px = layer["padding"]
        return op("Conv", [x, const(layer["weight"]), const(layer["bias"])], strides=list(layer["stride"]),
                  pads=[py, px, py, px], kernel_shape=list(layer["weight"].shape[2:]))

    def affine(x: str, layer: dict[str, Any]) -> str:
        return op("Add", [op("Mul", [x, const(layer["gamma"].reshape(1, -1, 1, 1))]),
                          const(layer["beta"].reshape(1, -1, 1, 1))])

    def pad_to(x: str, shape: tuple[int, int, int], target: tuple[int, int, int]) -> str:
        """dlib's add_prev zero-pads the smaller operand at the end of channels, rows and columns."""
        if shape == target:
            return x
        pads = np.array([0, 0, 0, 0, 0, *(t - s for s, t in zip(shape, target))], dtype=np.int64)
        name = f"p{next(counter)}"
        inits.append(numpy_helper.from_array(pads, name))
        return op("Pad", [x, name], mode="constant")

    x = op("Cast", ["chips"], to=TensorProto.FLOAT)
    x = op("Transpose", [x], perm=[0, 3, 1, 2])
    x = op("Mul", [op("Sub", [x, const(np.array(MEAN_RGB).reshape(1, 3, 1, 1))]), const(np.array(1 / 256))])
    x = op("Relu", [affine(conv(x, net["stem"]["conv"]), net["stem"]["affine"])])
    x = op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2])
    size = ((CHIP_SIZE - 7) // 2 + 1 - 3) // 2 + 1
    channels = 32
    for block in net["blocks"]:
        out_channels = block["conv1"]["weight"].shape[0]
        y = op("Relu", [affine(conv(x, block["conv1"]), block["affine1"])])
        y = affine(conv(y, block["conv2"]), block["affine2"])
        if block["down"]:
            y_size, short_size = (size - 3) // 2 + 1, (size - 2) // 2 + 1
            shortcut = op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
        else:
            y_size = short_size = size
            shortcut = x
        target = (max(out_channels, channels), max(y_size, short_size), max(y_size, short_size))
        y = pad_to(y, (out_channels, y_size, y_size), target)
        shortcut = pad_to(shortcut, (channels, short_size, short_size), target)
        x = op("Relu", [op("Add", [y, shortcut])])
        channels, size = target[0], target[1]
    x = op("ReduceMean", [x], axes=[2, 3], keepdims=0)
    nodes.append(helper.make_node("MatMul", [x, const(net["fc"].T)], ["descriptors"]))
    graph = helper.make_graph(
        nodes, "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info("chips", TensorProto.UINT8, ["n", CHIP_SIZE, CHIP_SIZE, 3])],
        [helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, ["n", 128])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="facerace")
    model.ir_version = 8
    checker.check_model(model)
    return model.SerializeToString()


def cached_onnx(weights: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """The ONNX file for face-recognition-models' weights (with a fine-tuned `weights` file's layers
    swapped in), built on first use into the cache folder and verified on every use
    (`facerace.files.cached_build`)."""
    from facerace.files import cached_build, default_cache_dir, dlib_model_file, sha256_file

    source = dlib_model_file(MODEL_FILE)
    key = sha256_file(source)[:16] + (f"-ft-{sha256_file(Path(weights))[:16]}" if weights else "")
    target = Path(cache_dir or default_cache_dir()) / "models" / f"dlib-resnet-v1-{key}.onnx"

    def build() -> bytes:
        from safetensors.numpy import load_file

        return build_onnx(source, load_file(str(weights)) if weights else None)

    return cached_build(target, build)
