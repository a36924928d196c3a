"""chips -> embeddings: frozen face networks behind one interface."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import InvalidParameterError, MissingDependencyError, check_choice


@dataclass(frozen=True)
class InputSpec:
    """What chips a backbone expects: square side in pixels and dlib-style padding."""

    chip_size: int
    padding: float


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


def dlib_model_file(name: str) -> Path:
    """A model file of the `face-recognition-models` package, found without importing it.

    (Its `__init__` needs `pkg_resources`, which setuptools >= 81 no longer ships.)
    """
    spec = util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("face-recognition-models is not installed: pip install face-recognition-models")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing: reinstall face-recognition-models")
    return path


class DlibResNet:
    """dlib's ResNet-34-like 128-d face descriptor (`face-recognition-models`, CC0 weights)."""

    name = "dlib-resnet-v1"
    space = "dlib-resnet-v1"
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

            self._net = dlib.face_recognition_model_v1(str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat")))
        vectors = self._net.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
        return np.array([np.asarray(v) for v in vectors], dtype=np.float32)


class DlibResNetOnnx(DlibResNet):
    """The same network and weights as `DlibResNet`, run by ONNX Runtime (about 10x faster on a CPU).

    The ONNX graph is built from dlib's weights file on first use (`facerace.dlib_onnx`) and
    cached; descriptors equal dlib's to ~1e-6. `tuned`: a fine-tuned layers file
    (safetensors, PyTorch names) whose layers replace dlib's; it changes the embedding `space`.
    """

    name = "dlib-resnet-v1-onnx"

    def __init__(self, threads: int = 1, tuned: str | Path | None = None) -> None:
        self.threads = threads
        self.tuned = str(tuned) if tuned else None
        self._net = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_net": None}

    @property
    def space(self) -> str:  # type: ignore[override]
        return tuned_space(DlibResNet.space, self.tuned)

    @property
    def version(self) -> str:
        return f"{super().version}; onnxruntime {metadata.version('onnxruntime')}"

    def embed(self, chips: np.ndarray) -> np.ndarray:
        if len(chips) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self._net is None:
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise MissingDependencyError("the dlib-resnet-v1-onnx backbone needs onnxruntime: "
                                             "pip install onnxruntime onnx") from exc
            from .dlib_onnx import cached_onnx

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            self._net = ort.InferenceSession(str(cached_onnx(self.tuned)), options,
                                             providers=["CPUExecutionProvider"])
        return self._net.run(None, {"chips": np.ascontiguousarray(chips, dtype=np.uint8)})[0]


class DlibResNetTorch(DlibResNet):
    """The same network and weights as `DlibResNet`, run by the PyTorch port (`facerace.dlib_torch`): the one to fine-tune."""

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
        from .dlib_torch import chips_to_tensor, load_dlib_resnet

        if self._net is None:
            self._net = load_dlib_resnet()
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            return np.concatenate([self._net(chips_to_tensor(chips[i : i + 32])).numpy()
                                   for i in range(0, len(chips), 32)])


def require_torch(what: str):
    """The `torch` module, or a MissingDependencyError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(f"{what} needs PyTorch: pip install 'facerace[torch]'") from exc
    return torch


def tuned_space(space: str, tuned: str | None) -> str:
    """The embedding space of a network with the layers of fine-tuned file `tuned` swapped in."""
    if not tuned:
        return space
    from .model import sha256_file

    return f"{space}-ft-{sha256_file(Path(tuned))[:16]}"


def _vggface(weights: str | Path | None = None, tuned: str | Path | None = None) -> Backbone:
    if not weights:
        raise InvalidParameterError("the vggface backbone needs its weights file: --backbone-weights vgg_face_weights.h5 "
                                    "(the public Keras file or a tutorial race model; facerace downloads nothing)")
    require_torch("the vggface backbone")
    from .vggface import VGGFaceBackbone

    return VGGFaceBackbone(weights, tuned=tuned)


BACKBONES = {"dlib-resnet-v1": DlibResNet, "dlib-resnet-v1-onnx": DlibResNetOnnx, "dlib-torch": DlibResNetTorch,
             "vggface": _vggface}
#: Backbones that need a weights file of their own (users supply it).
WEIGHTED = ("vggface",)
#: Backbones that can swap in the layers of a fine-tuned file (`tuned`).
TUNABLE = ("dlib-resnet-v1-onnx", "vggface")


def embed_chips(backbone: Backbone, chips: np.ndarray, *, flip_average: bool = False) -> np.ndarray:
    """Embeddings of chips; with `flip_average`, the mean of each chip's and its mirror image's."""
    if not flip_average or len(chips) == 0:
        return backbone.embed(chips)
    both = backbone.embed(np.concatenate([chips, chips[:, :, ::-1]]))
    return (both[: len(chips)] + both[len(chips) :]) / 2


def create_backbone(name: str = "dlib-resnet-v1-onnx", weights: str | Path | None = None,
                    tuned: str | Path | None = None) -> Backbone:
    """Build the backbone called `name`: its base weights from file `weights` where it needs one,
    and the fine-tuned layers of file `tuned` swapped in."""
    check_choice("backbone", name, tuple(BACKBONES))
    if weights and name not in WEIGHTED:
        raise InvalidParameterError(f"backbone {name} takes no weights file (only {', '.join(WEIGHTED)} do)")
    if tuned and name not in TUNABLE:
        raise InvalidParameterError(f"backbone {name} cannot run fine-tuned layers (use one of {', '.join(TUNABLE)})")
    for path in (weights, tuned):
        if path and not Path(path).is_file():
            raise InvalidParameterError(f"weights file {path} does not exist")
    kwargs = {"weights": weights} if name in WEIGHTED else {}
    return BACKBONES[name](**kwargs, **({"tuned": tuned} if tuned else {}))
