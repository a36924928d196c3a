"""chips -> embeddings: the one registry of face networks.

Each entry names where its class lives (imported on first use, so the registry imports no
network and `import facerace` loads no framework), whether it needs a weights file of its
own, whether it can run fine-tuned layers, and the PyTorch network that computes the same
embeddings (used to fine-tune and to export). A new backbone is one `register_backbone` call
here and one module beside this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np

from facerace.backbones.base import Backbone, InputSpec, require_torch, tuned_space
from facerace.errors import InvalidParameterError, check_choice

__all__ = ["BACKBONES", "FUSE", "Backbone", "BackboneEntry", "FusedBackbone", "InputSpec", "chip_spec",
           "create_backbone", "create_network", "fine_tunable", "register_backbone", "require_torch",
           "split_backbones", "tuned_space"]

#: Joins the names of fused backbones: "dlib-resnet-v1-onnx+sface" concatenates both networks' embeddings.
FUSE = "+"


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)


@dataclass(frozen=True)
class BackboneEntry:
    """One face network: `cls` and `network` are "module:attribute" paths, imported on use.

    `network(weights, tuned) -> (torch module with .split(n), normalise)` is the PyTorch network
    computing the same embeddings; `fine_tuned_by` is the backbone that runs a model whose last
    layers were fine-tuned on this one (set for the backbones `--unfreeze` works on).
    """

    name: str
    cls: str
    needs_weights: bool = False
    tunable: bool = False
    needs_torch: bool = False
    network: str | None = None
    fine_tuned_by: str | None = None


BACKBONES: dict[str, BackboneEntry] = {}


def register_backbone(entry: BackboneEntry) -> BackboneEntry:
    """Add `entry` to the registry (names are unique)."""
    if entry.name in BACKBONES:
        raise ValueError(f"backbone {entry.name!r} is registered twice")
    BACKBONES[entry.name] = entry
    return entry


_DLIB_NET = "facerace.backbones.dlib_torch:load_network"
register_backbone(BackboneEntry("dlib-resnet-v1", "facerace.backbones.dlib:DlibDescriptor", network=_DLIB_NET))
register_backbone(BackboneEntry("dlib-resnet-v1-onnx", "facerace.backbones.dlib:DlibDescriptorOnnx", tunable=True,
                                network=_DLIB_NET))
register_backbone(BackboneEntry("dlib-torch", "facerace.backbones.dlib:DlibDescriptorTorch", needs_torch=True,
                                network=_DLIB_NET, fine_tuned_by="dlib-resnet-v1-onnx"))
register_backbone(BackboneEntry("sface", "facerace.backbones.sface:SFace", network="facerace.backbones.sface_torch:load_network"))
register_backbone(BackboneEntry("vggface", "facerace.backbones.vggface:VGGFaceBackbone", needs_weights=True,
                                tunable=True, needs_torch=True, network="facerace.backbones.vggface:load_network",
                                fine_tuned_by="vggface"))


def split_backbones(name: str) -> list[str]:
    """The registered networks a (possibly fused, "a+b") backbone name names, each checked."""
    names = name.split(FUSE)
    for part in names:
        check_choice("backbone", part, tuple(BACKBONES))
    if len(names) > 1 and len(set(names)) < len(names):
        raise InvalidParameterError(f"fused backbone {name} names a network twice")
    return names


class FusedBackbone:
    """Several networks as one: `embed(tuple of chip arrays, one per network)` concatenates their embeddings.

    Each network takes its own chips (`input_specs`), so `facerace.faces.FacePipeline` cuts them.
    """

    def __init__(self, parts: tuple[Backbone, ...]) -> None:
        self.parts = parts
        self.name = FUSE.join(p.name for p in parts)
        self.space = FUSE.join(p.space for p in parts)
        self.version = " + ".join(p.version for p in parts)
        self.dim = sum(p.dim for p in parts)
        self.input_specs = tuple(p.input_spec for p in parts)
        self.input_spec = parts[0].input_spec

    def embed(self, chips: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.concatenate([p.embed(c) for p, c in zip(self.parts, chips)], axis=1)


def _entry(name: str, weights: str | Path | None, tuned: str | Path | None) -> BackboneEntry:
    entry = BACKBONES[check_choice("backbone", name, tuple(BACKBONES))]
    if weights and not entry.needs_weights:
        raise InvalidParameterError(f"backbone {name} takes no weights file (only "
                                    f"{', '.join(n for n, e in BACKBONES.items() if e.needs_weights)} do)")
    if entry.needs_weights and not weights:
        raise InvalidParameterError(f"the {name} backbone needs its weights file: --backbone-weights FILE "
                                    "(for vggface the public vgg_face_weights.h5 or a tutorial race model; "
                                    "facerace downloads nothing)")
    for path in (weights, tuned):
        if path and not Path(path).is_file():
            raise InvalidParameterError(f"weights file {path} does not exist")
    return entry


def create_backbone(name: str = "dlib-resnet-v1-onnx", weights: str | Path | None = None,
                    tuned: str | Path | None = None) -> Backbone:
    """Build the backbone called `name`: its base weights from file `weights` where it needs one,
    and the fine-tuned layers of file `tuned` swapped in. A fused name ("a+b") gives a FusedBackbone."""
    if FUSE in name:
        if weights or tuned:
            raise InvalidParameterError(f"fused backbone {name} takes no weights file or fine-tuned layers")
        return FusedBackbone(tuple(create_backbone(part) for part in split_backbones(name)))
    entry = _entry(name, weights, tuned)
    if tuned and not entry.tunable:
        raise InvalidParameterError(f"backbone {name} cannot run fine-tuned layers (use one of "
                                    f"{', '.join(n for n, e in BACKBONES.items() if e.tunable)})")
    if entry.needs_torch:
        require_torch(f"the {name} backbone")
    kwargs = {"weights": weights} if entry.needs_weights else {}
    return _load(entry.cls)(**kwargs, **({"tuned": tuned} if tuned else {}))


def create_network(name: str, weights: str | Path | None = None, tuned: str | Path | None = None
                   ) -> tuple[Any, Any, InputSpec]:
    """(PyTorch module in eval mode, its input normalisation of uint8 (n, s, s, 3) chip tensors, input spec)
    computing backbone `name`'s embeddings, with the layers of fine-tuned file `tuned` swapped in."""
    entry = _entry(name, weights, None)
    if entry.network is None:
        raise InvalidParameterError(f"backbone {name} has no PyTorch network (those that do: "
                                    f"{', '.join(n for n, e in BACKBONES.items() if e.network)})")
    require_torch(f"the PyTorch network of {name}")
    net, normalise = _load(entry.network)(weights, tuned)
    return net, normalise, _load(entry.cls).input_spec


def chip_spec(name: str) -> InputSpec:
    """The chips backbone `name` takes (size, padding, alignment), without building it (a fused one: its first network's)."""
    return _load(BACKBONES[split_backbones(name)[0]].cls).input_spec


def fine_tunable() -> tuple[str, ...]:
    """Backbones whose last layers `facerace train --unfreeze N` can fine-tune."""
    return tuple(n for n, e in BACKBONES.items() if e.fine_tuned_by)
