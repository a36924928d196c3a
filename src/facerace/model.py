"""Model directories: a safetensors head, a JSON config with its SHA-256, and a model card.

A model is a folder holding `config.json`, the weights file it names and, for shipped
models, `MODEL_CARD.md`. Shipped models live in the package under `weights/<name>/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facerace.backbones import InputSpec
from facerace.errors import ModelIntegrityError, ModelNotFoundError
from facerace.faces import MIN_FACE, FacePipeline
from facerace.files import sha256_file
from facerace.head import RaceHead

SHIPPED = ("default",)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "head.safetensors"
TUNED_FILE = "backbone.safetensors"
DIGESTS_FILE = "training_files.npy"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's pipeline and read its weights."""

    name: str
    version: str
    scheme: str
    classes: tuple[str, ...]
    backbone: str
    backbone_version: str
    detector: str
    chip_size: int
    chip_padding: float
    threshold: float
    threshold_rule: str
    flip_average: bool = False
    weights: str = WEIGHTS_FILE
    sha256: str = ""
    backbone_weights: str = ""
    tuned: str = ""
    tuned_sha256: str = ""
    trained_on: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    training_files: str = ""
    training_files_sha256: str = ""
    caveat: str = ""

    def threshold_for(self, scheme: str) -> float:
        """The uncertainty threshold of `scheme`: its own when stored (coarser schemes have higher
        probabilities), else the model's (`threshold`, for configs written before per-scheme ones)."""
        return self.thresholds.get(scheme, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{**d, "classes": tuple(d["classes"])})


def shipped_dir(name: str) -> Path:
    """The package folder of the shipped model `name`."""
    return Path(str(resources.files("facerace") / "weights" / name))


def resolve(model: str | Path) -> Path:
    """Turn a shipped model name or a model/run folder into the folder holding config.json."""
    if str(model) in SHIPPED:
        path = shipped_dir(str(model))
    else:
        path = Path(model)
        if (path / "model" / CONFIG_FILE).is_file():  # a training run folder
            path = path / "model"
    if not (path / CONFIG_FILE).is_file():
        raise ModelNotFoundError(
            f"no facerace model at {str(model)!r}: expected a shipped name ({', '.join(SHIPPED)}) "
            f"or a folder with {CONFIG_FILE} (for example runs/train/NAME made by `facerace train`)"
        )
    return path


def load_config(model: str | Path) -> ModelConfig:
    """Read a model's config.json."""
    path = resolve(model)
    return ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))


def _verified(path: Path, expected: str) -> Path:
    """`path`, after checking it exists and has SHA-256 `expected`."""
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; rebuild the model with `facerace train`")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{path} has SHA-256 {actual}, but {path.parent / CONFIG_FILE} expects {expected}; "
            "the file is damaged or was replaced: reinstall facerace or retrain the model"
        )
    return path


def load_model(model: str | Path) -> tuple[ModelConfig, RaceHead]:
    """Read config and head, refusing weights whose SHA-256 differs from the config's."""
    path = resolve(model)
    config = load_config(path)
    return config, RaceHead.load(_verified(path / config.weights, config.sha256), config.classes)


def tuned_file(model: str | Path, config: ModelConfig) -> Path | None:
    """The model's fine-tuned backbone layers file (SHA-256 checked), or None for a frozen backbone."""
    return _verified(resolve(model) / config.tuned, config.tuned_sha256) if config.tuned else None


def training_digests(model: str | Path, config: ModelConfig) -> np.ndarray | None:
    """The sorted 8-byte SHA-256 prefixes (uint64) of the images `model` was trained on (SHA-256 checked),
    or None for a model saved without them."""
    if not config.training_files:
        return None
    return np.load(_verified(resolve(model) / config.training_files, config.training_files_sha256),
                   allow_pickle=False)


def digest_prefixes(digests: Sequence[str]) -> np.ndarray:
    """The uint64 prefixes (first 8 bytes) of hex SHA-256 digests, in order: how model folders store files."""
    return np.array([int(d[:16], 16) for d in digests], dtype=np.uint64).reshape(-1)


def model_pipeline(model: str | Path, config: ModelConfig, *, detector: str | None = None, min_face: int = MIN_FACE,
                   upsample: int = 1, backbone: str | None = None, backbone_weights: str | Path | None = None
                   ) -> FacePipeline:
    """The face pipeline of `model` (its detector, chips, network with fine-tuned layers, flip averaging), with
    another `detector`, or another `backbone` (weights file `backbone_weights`, its own chips) instead."""
    if backbone is not None:
        return FacePipeline(detector or config.detector, backbone, str(backbone_weights) if backbone_weights else None,
                            flip_average=config.flip_average, min_face=min_face, upsample=upsample)
    tuned = tuned_file(model, config)
    return FacePipeline(detector or config.detector, config.backbone, config.backbone_weights or None,
                        str(tuned) if tuned else None, config.flip_average, min_face, upsample,
                        InputSpec(config.chip_size, config.chip_padding))


def save_model(path: Path, config: ModelConfig, head: RaceHead, tuned: dict[str, np.ndarray] | None = None,
               training_files: Sequence[str] = ()) -> ModelConfig:
    """Write head weights, fine-tuned backbone layers (if any, as float16), the digests of the training
    images (`training_files`: hex SHA-256s, stored as 8-byte prefixes) and config (with SHA-256s) into `path`."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    head.save(path / config.weights)
    extra = {}
    if tuned:
        # float16 halves the file (the package ships one); layers are computed in float32 after loading
        save_file({k: np.ascontiguousarray(v, np.float16) for k, v in tuned.items()}, str(path / TUNED_FILE))
        extra = {"tuned": TUNED_FILE, "tuned_sha256": sha256_file(path / TUNED_FILE)}
    if training_files:
        extra.update(write_training_digests(path, training_files))
    final = ModelConfig.from_dict({**config.to_dict(), "sha256": sha256_file(path / config.weights), **extra})
    (path / CONFIG_FILE).write_text(json.dumps(final.to_dict(), indent=2) + "\n")
    return final


def write_training_digests(path: Path, digests: Sequence[str]) -> dict[str, str]:
    """Write the training images' digest prefixes into model folder `path`; the config entries naming the file."""
    np.save(path / DIGESTS_FILE, np.unique(digest_prefixes(digests)), allow_pickle=False)
    return {"training_files": DIGESTS_FILE, "training_files_sha256": sha256_file(path / DIGESTS_FILE)}


def list_models() -> list[dict[str, Any]]:
    """The shipped models: name, version, classes, backbone, thresholds per scheme, measured accuracy and
    the caveat of its model card (e.g. the data it was trained and measured on)."""
    out = []
    for name in SHIPPED:
        try:
            c = load_config(name)
        except ModelNotFoundError:
            continue
        out.append({"name": name, "version": c.version, "scheme": c.scheme, "classes": list(c.classes),
                    "backbone": c.backbone, "detector": c.detector, "threshold": c.threshold,
                    "thresholds": {c.scheme: c.threshold, **c.thresholds}, "trained_on": c.trained_on,
                    "caveat": c.caveat, "metrics": c.metrics, "path": str(shipped_dir(name))})
    return out
