"""Per-member batch normalisation for member-major batches.

The reference nets share BatchNorm across members (plain nn.BatchNorm2d over all E*B rows); this
module is the per-member option: member k's rows are normalised with member k's own batch
statistics, running statistics and affine parameters.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EnsembleBatchNorm2d"]


class EnsembleBatchNorm2d(nn.Module):
    """BatchNorm2d with separate statistics and affine parameters per ensemble member.

    Input (E*B, C, H, W) member-major (images k*B .. (k+1)*B-1 belong to member k); output the same
    shape. Parameters weight, bias: (E, C); buffers running_mean, running_var: (E, C).
    Member k's slice behaves exactly like an nn.BatchNorm2d(C) applied to member k's B images.
    """

    def __init__(self, num_features: int, *, ensemble_size: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, value in (("num_features", num_features), ("ensemble_size", ensemble_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_features, self.ensemble_size = num_features, ensemble_size
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        shape = (ensemble_size, num_features)
        if affine:
            self.weight = nn.Parameter(torch.empty(shape, **factory))
            self.bias = nn.Parameter(torch.empty(shape, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E, C = self.ensemble_size, self.num_features
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != C or x.shape[0] % E:
            raise ValueError(f"x must have shape (E*B, num_features={C}, H, W) with E*B divisible by "
                             f"ensemble_size={E} (member-major), got {tuple(x.shape)}")
        N, _, H, W = x.shape
        B = N // E
        # (E*B, C, H, W) -> (B, E*C, H, W): channel e*C + c is member e's channel c.
        xb = x.reshape(E, B, C, H, W).transpose(0, 1).reshape(B, E * C, H, W)
        use_batch_stats = self.training or not self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(xb,
                         self.running_mean.view(-1) if self.track_running_stats else None,
                         self.running_var.view(-1) if self.track_running_stats else None,
                         self.weight.reshape(-1) if self.affine else None,
                         self.bias.reshape(-1) if self.affine else None,
                         use_batch_stats, momentum, self.eps)
        return y.reshape(B, E, C, H, W).transpose(0, 1).reshape(N, C, H, W)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, ensemble_size={self.ensemble_size}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")
