"""A PyTorch port of dlib's ResNet face descriptor, with the weights read by `dlib_format`.

Numerically the same network as dlib's own (see tests/test_dlib_torch.py); the base for
fine-tuning and for the ONNX export.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facerace.backbones.dlib_format import CHIP_SIZE, MEAN_RGB, STAGES, network, read_dlib_resnet, state_dict
from facerace.errors import InvalidParameterError


class Affine(nn.Module):
    """dlib's `affine` layer in CONV_MODE: a fixed per-channel scale and shift."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[:, None, None] + self.beta[:, None, None]


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's `add_prev`: a + b, the smaller zero-padded at the end of channels, rows and columns."""
    size = [max(p, q) for p, q in zip(a.shape[1:], b.shape[1:])]

    def pad(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, size[2] - w, 0, size[1] - h, 0, size[0] - c)) if [c, h, w] != size else t

    return pad(a) + pad(b)


class Residual(nn.Module):
    """dlib's `ares` / `ares_down`: relu(block(x) + x), or with x average-pooled 2x2 when downsampling.

    The block is con 3x3 (stride 2 and no padding when downsampling, else stride 1 and
    padding 1), affine, relu, con 3x3, affine.
    """

    def __init__(self, in_channels: int, channels: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.affine2 = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2) if self.down else x
        return F.relu(add_zero_padded(y, shortcut))


class DlibResNet(nn.Module):
    """dlib's ResNet face descriptor: (n, 3, 150, 150) from `chips_to_tensor` -> (n, 128).

    Its `units` are the stem, 14 residual blocks and the pooled fc layer, in order;
    `split(n)` cuts it before the last n of them (for fine-tuning).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 7, stride=2), Affine(32), nn.ReLU(), nn.MaxPool2d(3, stride=2))
        blocks = []
        in_channels = 32
        for channels, count, down in STAGES:
            for i in range(count):
                blocks.append(Residual(in_channels, channels, down and i == 0))
                in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, 128, bias=False)

    @property
    def units(self) -> list[nn.Module]:
        """Stem, residual blocks, then mean-pool + fc: what `split` counts."""
        return [self.stem, *self.blocks, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), self.fc)]

    def split(self, unfreeze: int) -> tuple[nn.Module, nn.Module]:
        """(prefix, suffix) sharing this module's layers: suffix(prefix(x)) == self(x); suffix has the last `unfreeze` units."""
        units = self.units
        if not 1 <= unfreeze <= len(units):
            raise InvalidParameterError(f"unfreeze must be within 1..{len(units)} for dlib's ResNet, got {unfreeze}")
        return nn.Sequential(*units[: len(units) - unfreeze]), nn.Sequential(*units[len(units) - unfreeze :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    @torch.no_grad()
    def load_dlib(self, net: dict[str, Any]) -> DlibResNet:
        """Copy the weights of `dlib_format.network(...)` into this module."""
        self.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict(net).items()})
        return self


def load_dlib_resnet(path: str | Path | None = None) -> DlibResNet:
    """The port with the weights of dlib's model file (default: `face-recognition-models`'), in eval mode."""
    return DlibResNet().load_dlib(network(read_dlib_resnet(path))).eval()


def load_network(weights: None = None, tuned: str | Path | None = None
                 ) -> tuple[DlibResNet, Callable[[torch.Tensor], torch.Tensor]]:
    """(the port with the layers of fine-tuned file `tuned` swapped in, in eval mode; `normalise`).

    dlib's network takes no weights file of its own: `weights` exists for the registry's one signature."""
    from safetensors.torch import load_file

    net = load_dlib_resnet()
    if tuned:
        net.load_state_dict(load_file(str(tuned)), strict=False)
    return net, normalise


def normalise(chips: torch.Tensor) -> torch.Tensor:
    """dlib's `input_rgb_image_sized<150>` on a tensor: (n, 150, 150, 3) uint8 RGB -> (n, 3, 150, 150) (x - mean) / 256."""
    mean = torch.tensor(MEAN_RGB, dtype=torch.float32)[:, None, None]
    return (chips.permute(0, 3, 1, 2).float() - mean) / 256


def chips_to_tensor(chips: np.ndarray) -> torch.Tensor:
    """`normalise` for numpy chips, checking their shape and type."""
    chips = np.asarray(chips)
    if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3) or chips.dtype != np.uint8:
        raise ValueError(f"expected (n, {CHIP_SIZE}, {CHIP_SIZE}, 3) uint8 chips, got {chips.shape} {chips.dtype}")
    return normalise(torch.from_numpy(chips))


def save_onnx(model: DlibResNet, path: str | Path) -> None:
    """Write `model` as ONNX (opset 17), input "chips" (n, 3, 150, 150) -> output "descriptors" (n, 128)."""
    with warnings.catch_warnings():
        # The trace fixes the spatial sizes (the network takes 150x150 chips only); the batch axis stays dynamic.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter is deprecated, but the torch.export one needs the extra `onnxscript` package.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, CHIP_SIZE, CHIP_SIZE),),
            str(path),
            input_names=["chips"],
            output_names=["descriptors"],
            dynamic_axes={"chips": {0: "batch"}, "descriptors": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
