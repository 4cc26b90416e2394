"""Inception-v3 of the TF graph ``classify_image_graph_def.pb`` (2015-12-05) that ADM's evaluator runs.

This is the network pytorch-fid calls the "FID Inception": parameter names and shapes follow its port, so
its ``pt_inception-2015-12-05-6726825d.pth`` loads directly. Where the graph differs from torchvision's
Inception-v3: average pools inside the blocks ignore the padding, the last block max-pools, the classifier
has 1008 outputs, and the input is resized with TF1's bilinear rule and scaled by (x - 128) / 128.
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM's sFID keeps mixed_6/conv[..., :7]
WEIGHTS_ENV = "DITMOE_INCEPTION_WEIGHTS"  # where the tools and training look for the weights file by default


class InceptionFeatures(NamedTuple):
    pool: torch.Tensor     # (N, 2048) pool_3: FID, precision and recall
    spatial: torch.Tensor  # (N, 2023) mixed_6/conv[..., :7] flattened channel-last: sFID
    logits: torch.Tensor   # (N, 1008) pool_3 @ softmax weights, without the bias as in ADM
    probs: torch.Tensor    # (N, 1008) float64 softmax of the logits: Inception Score


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size) as TF1's ResizeBilinear (no half-pixel centres, edge clamped)."""
    rows, cols = _tf1_interpolation(x.shape[2], size), _tf1_interpolation(x.shape[3], size)
    return torch.einsum("oh,nchw,pw->ncop", rows.to(x), x, cols.to(x))


def _tf1_interpolation(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights: output i samples input i * n_in / n_out (float32, as TF computes it)."""
    source = np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out))
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    frac = source - low
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(weights, (np.arange(n_out), low), 1 - frac)
    np.add.at(weights, (np.arange(n_out), high), frac)
    return torch.from_numpy(weights)


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3 SAME average pool, which averages over the in-image pixels only."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class BasicConv2d(nn.Module):
    """Convolution without bias -> batch norm (TF's epsilon 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _Block(nn.Module):
    """An Inception block: parallel branches concatenated along channels."""

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionA(_Block):
    """35x35 block (TF mixed, mixed_1, mixed_2): out 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def branches(self, x):
        return [self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x))]


class InceptionB(_Block):
    """35x35 -> 17x17 reduction (TF mixed_3): out 480 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def branches(self, x):
        return [self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2)]


class InceptionC(_Block):
    """17x17 block with factorised 7x7 convolutions (TF mixed_4 .. mixed_7): out 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def branches(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return [self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                self.branch_pool(_avg_pool(x))]


class InceptionD(_Block):
    """17x17 -> 8x8 reduction (TF mixed_8): out 512 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def branches(self, x):
        tower = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return [self.branch3x3_2(self.branch3x3_1(x)),
                self.branch7x7x3_4(tower),
                F.max_pool2d(x, 3, stride=2)]


class InceptionE(_Block):
    """8x8 block with split 1x3/3x1 convolutions (TF mixed_9, mixed_10): out 2048 channels.

    The graph's last block (mixed_10) max-pools its pool branch where the paper average-pools.
    """

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.pool = _max_pool if max_pool else _avg_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def branches(self, x):
        tower = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x),
                self.branch3x3_2a(tower), self.branch3x3_2b(tower),
                self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                self.branch_pool(self.pool(x))]


class InceptionV3(nn.Module):
    """FID Inception. forward: (N, 3, H, W) pixel values in [0, 255] -> InceptionFeatures.

    Freshly built, the convolutions get He-normal weights so that a random network (tests) gives
    non-degenerate features; real use loads pytorch-fid's weights with ``load_inception``.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        x = images.float()
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, INPUT_SIZE)
        x = (x - 128) / 128                             # (N, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)                       # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                       # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                       # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                       # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                       # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        mixed_6_conv = branches[0]                      # (N, 192, 17, 17) TF mixed_6/conv
        x = self.Mixed_6e(torch.cat(branches, 1))       # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean((2, 3))                           # (N, 2048) pool_3
        spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17 * 17 * 7)
        logits = pool @ self.fc.weight.T                # (N, 1008)
        return InceptionFeatures(pool, spatial, logits, logits.double().softmax(1))


def load_inception(path, device="cpu") -> InceptionV3:
    """InceptionV3 with the state dict in ``path`` (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Inception weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise ValueError(f"{path}: not a PyTorch state dict ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    model = InceptionV3()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
                 for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshapen:
        problems = [f"{label}: {_first(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshapen)) if keys]
        raise ValueError(f"{path}: not the FID Inception state dict (pytorch-fid's "
                         f"pt_inception-2015-12-05-6726825d.pth); " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    return model.to(device)


def _first(names: list[str], count: int = 5) -> str:
    shown = ", ".join(names[:count])
    return shown if len(names) <= count else f"{shown}, ... ({len(names)} in all)"
