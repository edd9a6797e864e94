"""Member-major helpers: tile a minibatch for all members, split outputs per member, the ensemble's
prediction from member-major logits, per-row dropout.

Member-major: a batch of E*B rows where rows k*B .. (k+1)*B-1 belong to ensemble member k.
"""
from __future__ import annotations

import torch

__all__ = ["tile", "untile", "ensemble_proba", "rowwise_dropout", "relu_rowwise_dropout"]


def _check_e(ensemble_size) -> int:
    if not isinstance(ensemble_size, int) or isinstance(ensemble_size, bool) or ensemble_size < 1:
        raise ValueError(f"ensemble_size must be a positive int, got {ensemble_size!r}")
    return ensemble_size


def tile(x: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """(B, ...) -> (E*B, ...): the same minibatch for every member, member-major ([x; x; ...; x]).

    The rows of x.repeat(E, 1, ...): row k*B + b is x[b] for every member k (NOT [x1, x1, x2, x2, ...]),
    built by one torch.cat: one operator and kernel, where repeat dispatches about 30 operators on the
    host (unfold, arange, cat, views) and takes 3x its time at a CIFAR minibatch.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    E = _check_e(ensemble_size)
    return torch.cat([x] * E)


def untile(y: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """(E*B, ...) member-major -> (E, B, ...): out[k] holds member k's rows (a view when possible)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    E = _check_e(ensemble_size)
    if y.dim() < 1 or y.shape[0] % E:
        raise ValueError(f"y.shape[0] must be divisible by ensemble_size={E} (member-major E*B rows), "
                         f"got shape {tuple(y.shape)}")
    return y.reshape(E, y.shape[0] // E, *y.shape[1:])


def ensemble_proba(logits: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """(E*B, C) member-major logits -> (B, C): the ensemble's prediction, the mean over the members of
    their softmax probabilities (the mean of probabilities, not the softmax of the mean logits).

    Half-precision logits are averaged in float32. Any trailing dimensions are kept: (E*B, ..., C) ->
    (B, ..., C), the softmax over the last one.
    """
    members = untile(logits, ensemble_size)
    if members.dtype in (torch.float16, torch.bfloat16):
        members = members.float()
    return members.softmax(-1).mean(0)


def rowwise_dropout(x: torch.Tensor, rate: torch.Tensor, training: bool = True) -> torch.Tensor:
    """Inverted dropout with one rate per row: element x[i, ...] is zeroed with probability rate[i]
    and kept ones are scaled by 1 / (1 - rate[i]), so E[output] = x for every row.

    Args:
        x: (N, ...) input.
        rate: (N,) or (N, 1) per-row dropout probabilities in [0, 1).
        training: identity when False.
    """
    if not training:
        return x
    rate = _row_rates(x, rate)
    keep = torch.rand_like(x) >= rate
    return x * keep / (1.0 - rate).clamp_min(_MIN_KEEP)  # rate = 1 drops everything (0, not NaN)


_MIN_KEEP = 1e-6  # the smallest keep probability 1 - rate: rate = 1 drops everything (0, not NaN)


def _row_rates(x: torch.Tensor, rate) -> torch.Tensor:
    """rate (N,) or (N, 1) -> (N, 1, ..., 1) in x's dtype, broadcastable against x (N, ...)."""
    if not isinstance(rate, torch.Tensor):
        raise TypeError(f"rate must be a torch.Tensor of shape ({x.shape[0]},), got {type(rate).__name__}")
    if rate.dim() == 2 and rate.shape[1] == 1:
        rate = rate[:, 0]
    if rate.dim() != 1 or rate.shape[0] != x.shape[0]:
        raise ValueError(f"rate must have shape ({x.shape[0]},), one dropout rate per row of x, got {tuple(rate.shape)}")
    return rate.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class _ReluRowwiseDropout(torch.autograd.Function):
    """y = relu(x) * keep / max(1 - rate, _MIN_KEEP), keeping only y (and the per-row rates) for the
    backward: where y > 0 the ReLU was active and the element kept, so dx = g * scale * (y > 0), and
    d rate_i = sum_j g_ij * y_ij * scale_i (zero where the keep probability was clamped)."""

    @staticmethod
    def forward(ctx, x, rate):
        keep_prob = (1.0 - rate).clamp_min(_MIN_KEEP)
        keep = torch.rand_like(x) >= rate
        y = torch.relu(x).mul_(keep).div_(keep_prob)  # rowwise_dropout's arithmetic, bit for bit
        ctx.save_for_backward(y, keep_prob.reciprocal(), rate)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        y, scale, rate = ctx.saved_tensors
        active = y > 0
        grad_x = grad * scale * active if ctx.needs_input_grad[0] else None
        grad_rate = None
        if ctx.needs_input_grad[1]:
            per_row = (grad * y).sum(dim=tuple(range(1, y.dim())), keepdim=True)
            grad_rate = per_row * scale * ((1.0 - rate) >= _MIN_KEEP)
        return grad_x, grad_rate


def relu_rowwise_dropout(x: torch.Tensor, rate: torch.Tensor, training: bool = True) -> torch.Tensor:
    """rowwise_dropout(relu(x), rate, training) in one autograd node that keeps only its output for the
    backward (and the (N,) rates): relu then dropout would keep relu's output, the keep mask and, when
    the rates need a gradient, the masked product, besides the output the next layer keeps anyway.
    Same random draws as rowwise_dropout(F.relu(x), ...), so the same result for the same RNG state.
    Gradients flow to x and to rate (through the 1 / (1 - rate) scaling); no double backward."""
    if not training:
        return torch.relu(x)
    return _ReluRowwiseDropout.apply(x, _row_rates(x, rate))
