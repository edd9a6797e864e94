"""ResNet-20 (He et al. 2016, CIFAR) and Wide ResNet 28-10 (Zagoruyko & Komodakis 2016, the paper's
reference: pre-activation blocks), plain / batch / hyper-batch.

Hyperparameters (hparam_names), as the reference: l2_input_conv, l2_group1, l2_group2, l2_group3
(every conv of that residual group, shortcut convs included), l2_dense_kernel, l2_dense_bias.
Batch norm is shared across members by default (bn="shared", the reference); bn="per_member" gives
every member its own statistics and affine parameters. Convolutions have no bias; the dense layer has one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hyperkern.models._base import EnsembleModel, LayerBuilder, call_layer, l2_space

__all__ = ["ResNet20", "WideResNet", "resnet20", "wrn28_10"]

_GROUP_NAMES = ["l2_input_conv", "l2_group1", "l2_group2", "l2_group3", "l2_dense_kernel", "l2_dense_bias"]


class _BasicBlock(nn.Module):
    """Post-activation basic block (ResNet v1): relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)),
    shortcut = bn(conv1x1(x)) when the shape changes."""

    def __init__(self, b: LayerBuilder, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = b.conv(cin, cout, 3, stride, 1)
        self.bn1 = b.batch_norm(cout)
        self.conv2 = b.conv(cout, cout, 3, 1, 1)
        self.bn2 = b.batch_norm(cout)
        if stride != 1 or cin != cout:
            self.shortcut_conv = b.conv(cin, cout, 1, stride, 0)
            self.shortcut_bn = b.batch_norm(cout)
        else:
            self.shortcut_conv = self.shortcut_bn = None

    def convs(self):
        return [c for c in (self.conv1, self.conv2, self.shortcut_conv) if c is not None]

    def forward(self, x, hparams):
        y = F.relu(self.bn1(call_layer(self.conv1, x, hparams)))
        y = self.bn2(call_layer(self.conv2, y, hparams))
        shortcut = x if self.shortcut_conv is None else self.shortcut_bn(call_layer(self.shortcut_conv, x, hparams))
        return F.relu(y + shortcut)


class _PreActBlock(nn.Module):
    """Pre-activation block (WRN, the reference's version 2):
    conv(relu(bn(conv(relu(bn(x)))))) + shortcut(x), shortcut = conv1x1(x) when the shape changes
    (applied to x itself, as the reference)."""

    def __init__(self, b: LayerBuilder, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = b.batch_norm(cin)
        self.conv1 = b.conv(cin, cout, 3, stride, 1)
        self.bn2 = b.batch_norm(cout)
        self.conv2 = b.conv(cout, cout, 3, 1, 1)
        self.shortcut_conv = b.conv(cin, cout, 1, stride, 0) if (stride != 1 or cin != cout) else None

    def convs(self):
        return [c for c in (self.conv1, self.conv2, self.shortcut_conv) if c is not None]

    def forward(self, x, hparams):
        y = call_layer(self.conv1, F.relu(self.bn1(x)), hparams)
        y = call_layer(self.conv2, F.relu(self.bn2(y)), hparams)
        shortcut = x if self.shortcut_conv is None else call_layer(self.shortcut_conv, x, hparams)
        return y + shortcut


class _ResNetBase(EnsembleModel):
    """The CIFAR ResNets' shared construction: input conv (stem channels) -> 3 groups of blocks with
    `widths` channels (strides 1, 2, 2) -> dense, with the L2 groups of the module docstring.
    depth = 6n + depth_offset gives n blocks per group. Post-activation networks (ResNet-20) get
    input_bn after the input conv, pre-activation ones (WRN) final_bn after the last group."""

    def __init__(self, num_classes, in_channels, *, block, depth, depth_offset, width, widths, stem, preact, variant,
                 ensemble_size, bn, l2_range, backend, fast_init, fast_init_std, tie_fast_weights, embedding_std,
                 device, dtype):
        super().__init__()
        if (depth - depth_offset) % 6 or depth < 6 + depth_offset:
            examples = ", ".join(str(6 * n + depth_offset) for n in (1, 2, 3, 4, 6))
            raise ValueError(f"depth must be 6n+{depth_offset} with n >= 1 ({examples}, ...), got {depth!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        space = l2_space(_GROUP_NAMES, l2_range)
        self._setup(variant, ensemble_size, space, num_classes, in_channels)
        b = LayerBuilder(variant, ensemble_size, space.num_hparams, bn=bn, backend=backend, fast_init=fast_init,
                         fast_init_std=fast_init_std, tie_fast_weights=tie_fast_weights, embedding_std=embedding_std,
                         device=device, dtype=dtype)
        self.depth, self.width, self.bn = depth, width, bn
        num_blocks = (depth - depth_offset) // 6
        self.input_conv = b.conv(in_channels, stem, 3, 1, 1)
        self.groups = nn.ModuleList()
        cin = stem
        for g, group_width in enumerate(widths):
            blocks = nn.ModuleList()
            for i in range(num_blocks):
                blocks.append(block(b, cin, group_width, (1 if g == 0 else 2) if i == 0 else 1))
                cin = group_width
            self.groups.append(blocks)
        self.dense = b.linear(cin, num_classes)
        self._register_l2(self.input_conv, "l2_input_conv")
        for g, blocks in enumerate(self.groups):
            for blk in blocks:
                for conv in blk.convs():
                    self._register_l2(conv, f"l2_group{g + 1}")
        self._register_l2(self.dense, "l2_dense_kernel", "l2_dense_bias")
        if preact:
            self.final_bn = b.batch_norm(cin)
        else:
            self.input_bn = b.batch_norm(stem)

    def _features(self, x, hparams):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, hparams: torch.Tensor | None = None) -> torch.Tensor:
        """x (E*B, in_channels, H, W) member-major [, hparams (E*B, m) in [0, 1]] -> logits (E*B, num_classes)."""
        self._check_inputs(x, hparams)
        self._check_image(x)
        h = self._features(x, hparams)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return call_layer(self.dense, h, hparams)


class ResNet20(_ResNetBase):
    """ResNet-20 for CIFAR (He et al. 2016): conv3x3(w) -> bn -> relu -> 3 groups of (depth-2)/6 basic
    blocks with w, 2w, 4w channels (strides 1, 2, 2) -> global average pool -> dense.

    width: channels of the first group (16 in the paper; smaller for quick tests). depth: 6n+2.
    Input (E*B, in_channels, H, W) member-major (any H, W >= 4); output logits (E*B, num_classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, variant: str = "plain", ensemble_size: int = 4,
                 depth: int = 20, width: int = 16, bn: str = "shared", l2_range=(0.1, 100.0), backend: str = "auto",
                 fast_init: str = "normal", fast_init_std: float | None = None, tie_fast_weights: bool = True,
                 embedding_std: float = 1e-4, device=None, dtype=None):
        super().__init__(num_classes, in_channels, block=_BasicBlock, depth=depth, depth_offset=2, width=width,
                         widths=(width, 2 * width, 4 * width), stem=width, preact=False, variant=variant,
                         ensemble_size=ensemble_size, bn=bn, l2_range=l2_range, backend=backend, fast_init=fast_init,
                         fast_init_std=fast_init_std, tie_fast_weights=tie_fast_weights,
                         embedding_std=embedding_std, device=device, dtype=dtype)

    def _features(self, x, hparams):
        h = F.relu(self.input_bn(call_layer(self.input_conv, x, hparams)))
        for blocks in self.groups:
            for blk in blocks:
                h = blk(h, hparams)
        return h


class WideResNet(_ResNetBase):
    """Wide ResNet depth-k (pre-activation, as the reference): conv3x3(16) -> 3 groups of (depth-4)/6
    blocks with 16k, 32k, 64k channels (strides 1, 2, 2) -> bn -> relu -> global average pool -> dense.

    WRN-28-10: depth=28, width=10 (36.5M parameters plain on CIFAR-10).
    Input (E*B, in_channels, H, W) member-major; output logits (E*B, num_classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, variant: str = "plain", ensemble_size: int = 4,
                 depth: int = 28, width: int = 10, bn: str = "shared", l2_range=(0.1, 100.0), backend: str = "auto",
                 fast_init: str = "normal", fast_init_std: float | None = None, tie_fast_weights: bool = True,
                 embedding_std: float = 1e-4, device=None, dtype=None):
        super().__init__(num_classes, in_channels, block=_PreActBlock, depth=depth, depth_offset=4, width=width,
                         widths=(16 * width, 32 * width, 64 * width), stem=16, preact=True, variant=variant,
                         ensemble_size=ensemble_size, bn=bn, l2_range=l2_range, backend=backend, fast_init=fast_init,
                         fast_init_std=fast_init_std, tie_fast_weights=tie_fast_weights,
                         embedding_std=embedding_std, device=device, dtype=dtype)

    def _features(self, x, hparams):
        h = call_layer(self.input_conv, x, hparams)
        for blocks in self.groups:
            for blk in blocks:
                h = blk(h, hparams)
        return F.relu(self.final_bn(h))


def resnet20(num_classes: int = 10, in_channels: int = 3, *, variant: str = "plain", ensemble_size: int = 4,
             **kwargs) -> ResNet20:
    """ResNet-20 (see ResNet20; width= and depth= shrink it for tests)."""
    return ResNet20(num_classes, in_channels, variant=variant, ensemble_size=ensemble_size, **kwargs)


def wrn28_10(num_classes: int = 10, in_channels: int = 3, *, variant: str = "plain", ensemble_size: int = 4,
             **kwargs) -> WideResNet:
    """Wide ResNet 28-10 (see WideResNet; depth= and width= shrink it for tests)."""
    return WideResNet(num_classes, in_channels, variant=variant, ensemble_size=ensemble_size, **kwargs)
