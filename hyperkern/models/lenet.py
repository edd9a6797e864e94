"""LeNet-5 (the paper's LeNet experiments), plain / batch / hyper-batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hyperkern.models._base import EnsembleModel, call_layer, l2_space

__all__ = ["LeNet5", "lenet5"]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class LeNet5(EnsembleModel):
    """conv5x5(6, pad 2) -> ReLU -> maxpool2 -> conv5x5(16) -> ReLU -> maxpool2 -> flatten -> dropout
    -> fc(120) -> ReLU -> dropout -> fc(84) -> ReLU -> dropout -> fc(num_classes).

    Input (N, in_channels, H, W) with (H, W) = input_size (28 for Fashion-MNIST, 32 for CIFAR; smaller
    inputs such as 8x8 digits with conv2_padding=2),
    member-major rows for the ensemble variants (N = E*B). Output logits (N, num_classes).

    Hyperparameters (hparam_names): l2_conv1, l2_conv2, l2_fc1, l2_fc2 (kernel and bias of each
    layer), l2_dense_kernel, l2_dense_bias (output layer), dropout (per row in the hyper_batch
    variant; the fixed `dropout` argument otherwise).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, variant: str = "plain", ensemble_size: int = 4,
                 input_size=28, conv2_padding: int = 0, dropout: float = 0.0, l2_range=(1e-3, 1e3), dropout_range=(1e-3, 0.9),
                 backend: str = "auto", fast_init: str = "normal", fast_init_std: float | None = None,
                 tie_fast_weights: bool = True, embedding_std: float = 1e-4, device=None, dtype=None):
        super().__init__()
        h, w = _pair(input_size)
        # spatial size after conv(pad 2, k5) -> pool2 -> conv(k5, pad conv2_padding) -> pool2
        p2 = int(conv2_padding)
        fh, fw = ((h // 2) + 2 * p2 - 4) // 2, ((w // 2) + 2 * p2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ValueError(f"input_size {(h, w)} is too small for LeNet-5 with conv2_padding={p2} (needs 12x12; "
                             "conv2_padding=2 takes inputs down to 4x4, e.g. 8x8 digits)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        names = ["l2_conv1", "l2_conv2", "l2_fc1", "l2_fc2", "l2_dense_kernel", "l2_dense_bias"]
        space = l2_space(names, l2_range, dropout_range)
        self._setup(variant, ensemble_size, space, num_classes, in_channels)
        self.input_size, self.dropout = (h, w), float(dropout)
        b = self._builder(variant, ensemble_size, space.num_hparams, backend=backend, fast_init=fast_init,
                          fast_init_std=fast_init_std, tie_fast_weights=tie_fast_weights,
                          embedding_std=embedding_std, device=device, dtype=dtype)
        self.conv1 = b.conv(in_channels, 6, 5, 1, 2, bias=True)
        self.conv2 = b.conv(6, 16, 5, 1, p2, bias=True)
        self.fc1 = b.linear(16 * fh * fw, 120)
        self.fc2 = b.linear(120, 84)
        self.dense = b.linear(84, num_classes)
        for name in ("conv1", "conv2", "fc1", "fc2"):
            self._register_l2(getattr(self, name), f"l2_{name}")
        self._register_l2(self.dense, "l2_dense_kernel", "l2_dense_bias")
        self._dropout_column = space.index("dropout")

    def forward(self, x: torch.Tensor, hparams: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, hparams)
        self._check_image(x)
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"x must have spatial size input_size={self.input_size}, got {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(call_layer(self.conv1, x, hparams)), 2)
        h = F.max_pool2d(F.relu(call_layer(self.conv2, h, hparams)), 2)
        h = self._drop(h.flatten(1), hparams)
        h = self._relu_drop(call_layer(self.fc1, h, hparams), hparams)
        h = self._relu_drop(call_layer(self.fc2, h, hparams), hparams)
        return call_layer(self.dense, h, hparams)


def lenet5(num_classes: int = 10, in_channels: int = 1, *, variant: str = "plain", ensemble_size: int = 4,
           **kwargs) -> LeNet5:
    """LeNet-5: see LeNet5 (input_size=28 by default; 32 for CIFAR)."""
    return LeNet5(num_classes, in_channels, variant=variant, ensemble_size=ensemble_size, **kwargs)
