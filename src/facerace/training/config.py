"""TrainConfig: every setting of a training run, with its default written once.

The CLI builds it from its arguments (`from_flat`), a run folder's `config.json` is its
`to_dict()`, and `facerace train --resume` reads it back (`from_dict`, refusing unknown keys).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from facerace.errors import InvalidParameterError
from facerace.head import HeadParams

#: The values of TrainConfig.balance: which groups training weighs equally.
BALANCE = ("none", "race", "race,gender")


@dataclass(frozen=True)
class TrainConfig:
    """What to train on and how; `head` holds the head's hyper-parameters.

    `backbone` may fuse networks ("a+b": their embeddings concatenated); `flip_average` is then one
    setting for all or a tuple of one per network. `unfreeze=N` fine-tunes the network's last N units with the head on `views` views per
    image (0: frozen network, a head on cached embeddings). A stratified `val_fraction` of the
    data (seed `seed`) is held out for early stopping, calibration and the uncertainty
    threshold (the lowest confidence above which held-out faces are right `threshold_target`
    of the time). `balance` weighs training faces so that every class ("race") or every class x gender
    ("race,gender") group counts as much as every other in the loss and in early stopping ("none": every
    face counts once).
    """

    data: tuple[str, ...] = ()
    scheme: str = "fairface7"
    split: str = "train"
    val_fraction: float = 0.12
    seed: int = 0
    head: HeadParams = field(default_factory=HeadParams)
    detector: str = "yunet"
    backbone: str = "dlib-resnet-v1-onnx"
    backbone_weights: str | None = None
    flip_average: bool | tuple[bool, ...] = True
    unfreeze: int = 0
    views: int = 4
    backbone_learning_rate: float = 3e-5
    threshold_target: float = 0.8
    balance: str = "none"
    path_column: str = "path"
    label_column: str = "label"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the head's settings nested under "head")."""
        return {**asdict(self), "data": list(self.data)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The config `to_dict` wrote; unknown keys are refused."""
        unknown = set(d) - {f.name for f in fields(cls)} | set(d.get("head") or {}) - {f.name for f in fields(HeadParams)}
        if unknown:
            raise InvalidParameterError(f"unknown training setting(s) {sorted(unknown)}; known: "
                                        f"{', '.join(f.name for f in fields(cls))} and head "
                                        f"{', '.join(f.name for f in fields(HeadParams))}")
        flip = d.get("flip_average", cls.flip_average)
        return cls(**{**d, "data": tuple(d.get("data", ())), "head": HeadParams(**(d.get("head") or {})),
                      "flip_average": tuple(flip) if isinstance(flip, list) else flip})

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """The config from flat settings (the CLI's arguments): keys of this class or of HeadParams;
        other keys and None values are ignored, so unset options keep the defaults written here."""
        own = {f.name for f in fields(cls)} - {"head"}
        head = {f.name for f in fields(HeadParams)}
        given = {k: v for k, v in values.items() if v is not None}
        config = cls(**{k: v for k, v in given.items() if k in own})
        return replace(config, data=tuple(config.data), head=HeadParams(**{k: v for k, v in given.items() if k in head}))

    @property
    def head_params(self) -> HeadParams:
        """The head's settings with the epoch defaults of this kind of training filled in."""
        return self.head.resolved(fine_tuning=bool(self.unfreeze))
