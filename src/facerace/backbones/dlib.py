"""dlib's ResNet face descriptor (`face-recognition-models`, CC0 weights), run three ways: dlib, ONNX Runtime, PyTorch."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from facerace.backbones.base import InputSpec, OnnxBackbone, require_torch, tuned_space
from facerace.backbones.dlib_format import CHIP_SIZE
from facerace.files import dlib_model_file


class DlibDescriptor:
    """dlib's ResNet-34-like 128-d face descriptor (`face-recognition-models`, CC0 weights)."""

    name = "dlib-resnet-v1"
    space = "dlib-resnet-v1"
    input_spec = InputSpec(chip_size=CHIP_SIZE, padding=0.25)
    dim = 128

    def __init__(self) -> None:
        self._net = None

    @property
    def version(self) -> str:
        return f"dlib {metadata.version('dlib-bin')}; face-recognition-models {metadata.version('face_recognition_models')}"

    def __getstate__(self) -> dict:
        return {"_net": None}

    def embed(self, chips: np.ndarray) -> np.ndarray:
        if len(chips) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self._net is None:
            import dlib

            self._net = dlib.face_recognition_model_v1(str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat")))
        vectors = self._net.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
        return np.array([np.asarray(v) for v in vectors], dtype=np.float32)


class DlibDescriptorOnnx(OnnxBackbone, DlibDescriptor):
    """The same network and weights as `DlibDescriptor`, run by ONNX Runtime (about 10x faster on a CPU).

    The ONNX graph is built from dlib's weights file on first use (`facerace.backbones.dlib_onnx`) and
    cached; descriptors equal dlib's to ~1e-6. `tuned`: a fine-tuned layers file
    (safetensors, PyTorch names) whose layers replace dlib's; it changes the embedding `space`.
    """

    name = "dlib-resnet-v1-onnx"

    def __init__(self, threads: int = 1, tuned: str | Path | None = None) -> None:
        super().__init__(threads)
        self.tuned = str(tuned) if tuned else None

    @property
    def space(self) -> str:  # type: ignore[override]
        return tuned_space(DlibDescriptor.space, self.tuned)

    @property
    def version(self) -> str:
        return f"{super().version}; onnxruntime {metadata.version('onnxruntime')}"

    def onnx_file(self) -> Path:
        from facerace.backbones.dlib_onnx import cached_onnx

        return cached_onnx(self.tuned)


class DlibDescriptorTorch(DlibDescriptor):
    """The same network and weights as `DlibDescriptor`, run by the PyTorch port (`facerace.backbones.dlib_torch`): the one to fine-tune."""

    name = "dlib-torch"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._net = None

    def __getstate__(self) -> dict:
        return {"threads": self.threads, "_net": None}

    @property
    def version(self) -> str:
        return f"{super().version}; torch {metadata.version('torch')}"

    def embed(self, chips: np.ndarray) -> np.ndarray:
        if len(chips) == 0:
            return np.zeros((0, self.dim), np.float32)
        torch = require_torch(self.name)
        from facerace.backbones.dlib_torch import chips_to_tensor, load_dlib_resnet

        if self._net is None:
            self._net = load_dlib_resnet()
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            return np.concatenate([self._net(chips_to_tensor(chips[i : i + 32])).numpy()
                                   for i in range(0, len(chips), 32)])
