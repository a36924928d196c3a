"""facerace export: a whole model as one ONNX graph, uint8 face chips -> calibrated probabilities.

The graph holds the face network (with any fine-tuned layers), the mirror-image averaging,
the head and its temperature: `probabilities = run(chips (n, s, s, 3) uint8 RGB)`, the
same numbers as `Predictor.predict_proba(Predictor.embed(chips))`. Exporting needs PyTorch;
running the file needs only ONNX Runtime.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from facerace.backbones import BACKBONES, create_network, require_torch
from facerace.errors import InvalidParameterError
from facerace.model import load_model, tuned_file


def export_onnx(model: str | Path = "default", path: str | Path = "facerace.onnx") -> Path:
    """Write `model` as one ONNX file at `path` (input "chips", output "probabilities"); return the path."""
    torch = require_torch("facerace export")
    from torch import nn

    config, head = load_model(model)
    if BACKBONES[config.backbone].network is None:
        raise InvalidParameterError(f"cannot export a model on backbone {config.backbone}: it has no PyTorch network")
    net, normalise, spec = create_network(config.backbone, config.backbone_weights or None, tuned_file(model, config))

    class Whole(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.descriptor = nn.Sequential(*net.split(1))
            self.head = head.to_torch()

        def forward(self, chips: torch.Tensor) -> torch.Tensor:
            x = normalise(chips)
            features = self.descriptor(x)
            if config.flip_average:
                features = (features + self.descriptor(x.flip(3))) / 2
            return self.head(features)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Whole().eval(), (torch.zeros(1, spec.chip_size, spec.chip_size, 3, dtype=torch.uint8),),
                          str(out), input_names=["chips"], output_names=["probabilities"],
                          dynamic_axes={"chips": {0: "batch"}, "probabilities": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    return out
