"""facerace: the perceived race category of every face in a photo, offline.

Predictions are perceived, coarse, contested social categories, not identity; see the
model card of each model. `import facerace` loads no model and touches no network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from facerace.version import __version__

__all__ = ["analyze", "audit", "Predictor", "embed", "train", "evaluate", "export_onnx", "TrainConfig", "HeadParams",
           "load_image", "FaceResult", "ImageResult", "list_models", "__version__"]

_LAZY = {
    "analyze": ".predictor",
    "audit": ".apps.audit",
    "Predictor": ".predictor",
    "embed": ".predictor",
    "train": ".training.train",
    "evaluate": ".training.evaluate",
    "export_onnx": ".export",
    "TrainConfig": ".training.config",
    "HeadParams": ".head",
    "load_image": ".images",
    "FaceResult": ".results",
    "ImageResult": ".results",
    "list_models": ".model",
}

if TYPE_CHECKING:
    from facerace.apps.audit import audit
    from facerace.export import export_onnx
    from facerace.head import HeadParams
    from facerace.images import load_image
    from facerace.model import list_models
    from facerace.predictor import Predictor, analyze, embed
    from facerace.results import FaceResult, ImageResult
    from facerace.training.config import TrainConfig
    from facerace.training.evaluate import evaluate
    from facerace.training.train import train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'facerace' has no attribute {name!r}")
