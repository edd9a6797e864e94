"""Multilayer perceptron (the paper's MLP experiments), plain / batch / hyper-batch."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from hyperkern.models._base import EnsembleModel, call_layer, l2_space

__all__ = ["MLP", "mlp"]


class MLP(EnsembleModel):
    """Flatten -> [linear -> ReLU -> dropout] * len(hidden_features) -> linear.

    in_features: D, or an input shape (C, H, W); alternatively in_channels=C with input_size=H or (H, W).
    Inputs: (N, D) vectors or (N, C, H, W) images (flattened; C*H*W must equal in_features); rows
    member-major for the ensemble variants (N = E*B, rows k*B .. (k+1)*B-1 are member k).
    Output: logits (N, num_classes), same row order.

    Hyperparameters (hparam_names): l2_hidden1 .. l2_hiddenL (kernel and bias of hidden layer i),
    l2_dense_kernel, l2_dense_bias (output layer), dropout. In the hyper_batch variant every row
    carries its own normalised values: the dropout rate of row i is the denormalised 'dropout'
    column of hparams[i] (rowwise_dropout); plain and batch variants use the fixed `dropout`.
    """

    def __init__(self, num_classes: int = 10, in_features: int | Sequence[int] = 784, *, variant: str = "plain",
                 ensemble_size: int = 4, in_channels: int | None = None, input_size=None,
                 hidden_features: Sequence[int] = (200, 200), dropout: float = 0.0,
                 l2_range=(1e-3, 1e3), dropout_range=(1e-3, 0.9), backend: str = "auto", fast_init: str = "normal",
                 fast_init_std: float | None = None, tie_fast_weights: bool = True, embedding_std: float = 1e-4,
                 device=None, dtype=None):
        super().__init__()
        if in_channels is not None:  # the image models' signature: in_features = C * H * W
            if input_size is None:
                raise ValueError("in_channels needs input_size (H or (H, W)) to give in_features = C * H * W")
            hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            in_features = (int(in_channels), *hw)
        if not isinstance(in_features, int):
            in_features = math.prod(int(d) for d in in_features)
        hidden_features = tuple(int(h) for h in hidden_features)
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden_features):
            raise ValueError(f"in_features, num_classes and hidden_features must be positive, got {in_features}, "
                             f"{num_classes}, {hidden_features}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        names = [f"l2_hidden{i + 1}" for i in range(len(hidden_features))] + ["l2_dense_kernel", "l2_dense_bias"]
        space = l2_space(names, l2_range, dropout_range)
        self._setup(variant, ensemble_size, space, num_classes, in_channels=0)
        self.in_features = in_features
        self.dropout = float(dropout)
        b = self._builder(variant, ensemble_size, space.num_hparams, backend=backend, fast_init=fast_init,
                          fast_init_std=fast_init_std, tie_fast_weights=tie_fast_weights,
                          embedding_std=embedding_std, device=device, dtype=dtype)
        widths = (in_features, *hidden_features)
        self.hidden = nn.ModuleList(b.linear(widths[i], widths[i + 1]) for i in range(len(hidden_features)))
        self.dense = b.linear(widths[-1], num_classes)
        for i, layer in enumerate(self.hidden):
            self._register_l2(layer, f"l2_hidden{i + 1}")
        self._register_l2(self.dense, "l2_dense_kernel", "l2_dense_bias")
        self._dropout_column = space.index("dropout")

    def forward(self, x: torch.Tensor, hparams: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, hparams)
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(f"x must have shape (N, {self.in_features}) or (N, C, H, W) with C*H*W = "
                             f"{self.in_features}, got {tuple(x.shape)}")
        h = x.reshape(x.shape[0], self.in_features)
        for layer in self.hidden:
            h = self._relu_drop(call_layer(layer, h, hparams), hparams)
        return call_layer(self.dense, h, hparams)


def mlp(num_classes: int = 10, in_features: int | Sequence[int] = 784, *, variant: str = "plain",
        ensemble_size: int = 4, **kwargs) -> MLP:
    """The paper's MLP: see MLP. in_features may be an int or an input shape such as (1, 28, 28); or give
    in_channels= and input_size= as for the image models."""
    return MLP(num_classes, in_features, variant=variant, ensemble_size=ensemble_size, **kwargs)
