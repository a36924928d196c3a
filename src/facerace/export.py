"""facerace export: a whole model as one ONNX graph, uint8 face chips -> calibrated probabilities.

The graph holds the face network (with any fine-tuned layers), the mirror-image averaging,
the head and its temperature: `probabilities = run(chips (n, s, s, 3) uint8 RGB)`, the
same numbers as `Predictor.predict_proba(Predictor.embed(chips))`. Exporting needs PyTorch;
running the file needs only ONNX Runtime.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .backbones import require_torch
from .errors import InvalidParameterError
from .finetune import NETWORKS, load_network
from .head import RaceHead
from .model import load_model, tuned_file

#: Prediction backbone -> the PyTorch network that computes the same embeddings: each fine-tuned model's
#: backbone, and the other engines of dlib's network.
_NETWORKS = {**{runner: network for network, runner in NETWORKS.items()},
             "dlib-resnet-v1": "dlib-torch", "dlib-torch": "dlib-torch"}


def export_onnx(model: str | Path = "default", path: str | Path = "facerace.onnx") -> Path:
    """Write `model` as one ONNX file at `path` (input "chips", output "probabilities"); return the path."""
    torch = require_torch("facerace export")
    from torch import nn

    config, head = load_model(model)
    if config.backbone not in _NETWORKS:
        raise InvalidParameterError(f"cannot export a model on backbone {config.backbone}")
    network = _NETWORKS[config.backbone]
    net, normalise, spec = load_network(network, config.backbone_weights or None, tuned_file(model, config))

    class Whole(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.descriptor = nn.Sequential(*net.split(1))
            self.head = _torch_head(head)

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


def _torch_head(head: RaceHead):
    """The numpy head as PyTorch layers: standardise, dense layers with ReLU, softmax(logits / temperature)."""
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    n = len(head.params_) // 2
    for i in range(n):
        w, b = head.params_[f"w{i}"], head.params_[f"b{i}"]
        dense = nn.Linear(*w.shape)
        with torch.no_grad():
            dense.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            dense.bias.copy_(torch.from_numpy(b))
        layers += [dense, nn.ReLU()] if i < n - 1 else [dense]

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(head.mean_))
            self.register_buffer("scale", torch.from_numpy(head.scale_))
            self.layers = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.layers((x - self.mean) / self.scale) / head.temperature_, dim=1)

    return Head()
