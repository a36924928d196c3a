"""Base types of the face networks: what chips they take and what they return."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from facerace.errors import MissingDependencyError, ModelIntegrityError
from facerace.files import sha256_file


@dataclass(frozen=True)
class InputSpec:
    """What chips a backbone expects: square side in pixels, dlib-style padding, and how they are cut
    (`alignment`: "dlib", dlib's 5-point chip; "sface", OpenCV's alignCrop on YuNet landmarks; see facerace.align)."""

    chip_size: int
    padding: float
    alignment: str = "dlib"


class Backbone(Protocol):
    """A frozen face network: `embed(chips (n, s, s, 3) uint8) -> (n, dim) float32`.

    Backbones with the same `space` give interchangeable embeddings (same network and weights).
    """

    name: str
    space: str
    version: str
    input_spec: InputSpec
    dim: int

    def embed(self, chips: np.ndarray) -> np.ndarray: ...


def require_torch(what: str):
    """The `torch` module, or a MissingDependencyError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(f"{what} needs PyTorch: pip install 'facerace[torch]'") from exc
    return torch


def tuned_space(space: str, tuned: str | Path | None) -> str:
    """The embedding space of a network with the layers of fine-tuned file `tuned` swapped in."""
    return f"{space}-ft-{sha256_file(Path(tuned))[:16]}" if tuned else space


def onnx_session(path: Path, threads: int, backbone: str):
    """An ONNX Runtime session on the network file `path` (CPU, `threads` threads) for backbone `backbone`;
    a file ONNX Runtime cannot load is a ModelIntegrityError."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError(f"the {backbone} backbone needs onnxruntime: pip install onnxruntime onnx") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no memory arena: with it, one crowd photo's batch kept ~230 MB per process for good (docs/BENCHMARKS.md)
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
        raise ModelIntegrityError(f"{path} is not a usable ONNX network ({type(exc).__name__}); "
                                  "delete it and facerace rebuilds it") from None


class OnnxBackbone:
    """A network run by ONNX Runtime on one graph file (`onnx_file()`, uint8 chips in), opened on first use
    with `threads` threads; pickles without the session."""

    name: str
    dim: int

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._net = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_net": None}

    def onnx_file(self) -> Path:
        """The ONNX graph this network runs (built or derived on first use)."""
        raise NotImplementedError

    def embed(self, chips: np.ndarray) -> np.ndarray:
        if len(chips) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self._net is None:
            self._net = onnx_session(self.onnx_file(), self.threads, self.name)
        return self._net.run(None, {"chips": np.ascontiguousarray(chips, dtype=np.uint8)})[0]
