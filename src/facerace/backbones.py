"""chips -> embeddings: frozen face networks behind one interface."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Protocol

import numpy as np

from .errors import check_choice


@dataclass(frozen=True)
class InputSpec:
    """What chips a backbone expects: square side in pixels and dlib-style padding."""

    chip_size: int
    padding: float


class Backbone(Protocol):
    """A frozen face network: `embed(chips (n, s, s, 3) uint8) -> (n, dim) float32`."""

    name: str
    version: str
    input_spec: InputSpec
    dim: int

    def embed(self, chips: np.ndarray) -> np.ndarray: ...


class DlibResNet:
    """dlib's ResNet-34-like 128-d face descriptor (`face-recognition-models`, CC0 weights)."""

    name = "dlib-resnet-v1"
    input_spec = InputSpec(chip_size=150, padding=0.25)
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
            import face_recognition_models

            self._net = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
        vectors = self._net.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
        return np.array([np.asarray(v) for v in vectors], dtype=np.float32)


BACKBONES = {"dlib-resnet-v1": DlibResNet}


def create_backbone(name: str = "dlib-resnet-v1") -> Backbone:
    """Build the backbone called `name`."""
    return BACKBONES[check_choice("backbone", name, tuple(BACKBONES))]()
