"""facerace export: a whole model as one ONNX graph, uint8 face chips -> calibrated probabilities.

The graph holds the face network (with any fine-tuned layers), the mirror-image averaging,
the head and its temperature: `probabilities = run(chips (n, s, s, 3) uint8 RGB)`, the
same numbers as `Predictor.predict_proba(Predictor.embed(chips))`. A model on fused networks
("a+b") takes one chip input per network, since each network has its own alignment: inputs
`chips_<network>` (dashes as underscores, e.g. `chips_dlib_resnet_v1_onnx` 150 px and
`chips_sface` 112 px), in the order of the model's backbone name, as `FacePipeline.align` cuts
them. Exporting needs PyTorch; running the file needs only ONNX Runtime.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from facerace.backbones import BACKBONES, create_network, require_torch, split_backbones
from facerace.errors import InvalidParameterError
from facerace.files import partial_name
from facerace.model import load_model, tuned_file


def input_names(backbone: str) -> list[str]:
    """The exported graph's chip inputs for a model on `backbone`: "chips", or one per network of a fused one."""
    names = split_backbones(backbone)
    return ["chips"] if len(names) == 1 else [f"chips_{n.replace('-', '_')}" for n in names]


def export_onnx(model: str | Path = "default", path: str | Path = "facerace.onnx") -> Path:
    """Write `model` as one ONNX file at `path` (inputs `input_names`, output "probabilities"); return the path."""
    torch = require_torch("facerace export")
    from torch import nn

    config, head = load_model(model)
    names = split_backbones(config.backbone)
    missing = [n for n in names if BACKBONES[n].network is None]
    if missing:
        raise InvalidParameterError(f"cannot export a model on backbone {', '.join(missing)}: it has no PyTorch network")
    tuned = tuned_file(model, config)
    networks = [create_network(n, config.backbone_weights or None, tuned) for n in names]
    flips = [config.flip_average] * len(names) if isinstance(config.flip_average, bool) else list(config.flip_average)

    class Whole(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.descriptors = nn.ModuleList(nn.Sequential(*net.split(1)) for net, _, _ in networks)
            self.head = head.to_torch()

        def forward(self, *chips: torch.Tensor) -> torch.Tensor:
            features = []
            for descriptor, (_, normalise, _), flip, c in zip(self.descriptors, networks, flips, chips):
                x = normalise(c)
                f = descriptor(x)
                features.append((f + descriptor(x.flip(3))) / 2 if flip else f)
            return self.head(torch.cat(features, dim=1))

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = input_names(config.backbone)
    examples = tuple(torch.zeros(1, spec.chip_size, spec.chip_size, 3, dtype=torch.uint8) for _, _, spec in networks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        partial = partial_name(out)  # renamed when complete: a reader never loads half a graph
        try:
            torch.onnx.export(Whole().eval(), examples, str(partial), input_names=inputs,
                              output_names=["probabilities"],
                              dynamic_axes={**{i: {0: "batch"} for i in inputs}, "probabilities": {0: "batch"}},
                              opset_version=17, dynamo=False)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    return out
