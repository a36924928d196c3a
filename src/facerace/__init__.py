"""facerace: the perceived race category of every face in a photo, offline.

Predictions are perceived, coarse, contested social categories, not identity; see the
model card of each model. `import facerace` loads no model and touches no network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["analyze", "Predictor", "load_image", "FaceResult", "ImageResult", "list_models", "__version__"]

_LAZY = {
    "analyze": ".predictor",
    "Predictor": ".predictor",
    "load_image": ".images",
    "FaceResult": ".results",
    "ImageResult": ".results",
    "list_models": ".model",
}

if TYPE_CHECKING:
    from .images import load_image
    from .model import list_models
    from .predictor import Predictor, analyze
    from .results import FaceResult, ImageResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'facerace' has no attribute {name!r}")
