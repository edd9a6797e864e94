"""Rank-1 ensemble conv2d ops: the public functional API, validation and backend dispatch.

x is member-major: (E*B, C, H, W), images k*B .. (k+1)*B-1 belong to member k, E = r.shape[0].
r (and u) scale input channels, s (and v*e1) scale output channels, bias (and delta_bias*e2) shift
them; all broadcast over the spatial positions. The fused backends live in
hyperkern/ops/_cpp_conv.py and hyperkern/ops/_triton_conv.py with the same positional arguments
(validated, stride/padding/dilation as int pairs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hyperkern._backends import implementation, kernel_first
from hyperkern.ops._validate import (check_embeddings_finite, check_hparams_finite, conv_geometry, validate_conv2d,
                                     validate_conv2d_hp)

__all__ = ["batch_ensemble_conv2d", "hyper_batch_ensemble_conv2d", "hyper_batch_ensemble_conv2d_hp"]


def _members(t: torch.Tensor, E: int) -> torch.Tensor:
    """(E*B, C, ...) -> (E, B, C, 1, 1) broadcastable view of per-row channel vectors or (E, B, C, H, W)."""
    return t.reshape(E, t.shape[0] // E, *t.shape[1:])


def _chan(v: torch.Tensor) -> torch.Tensor:
    """(E, C) -> (E, 1, C, 1, 1) for broadcasting against (E, B, C, H, W)."""
    return v[:, None, :, None, None]


def _torch_batch_ensemble_conv2d(x, weight, r, s, bias, stride, padding, dilation, groups):
    E = r.shape[0]
    xs = (_members(x, E) * _chan(r)).reshape(x.shape)
    h = F.conv2d(xs, weight, None, stride, padding, dilation, groups)
    y = _members(h, E) * _chan(s)
    if bias is not None:
        y = y + _chan(bias)
    return y.reshape(h.shape)


def _torch_hyper_batch_ensemble_conv2d(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2,
                                       stride, padding, dilation, groups):
    E = r.shape[0]
    xm = _members(x, E)
    h = F.conv2d((xm * _chan(r)).reshape(x.shape), weight, None, stride, padding, dilation, groups)
    hd = F.conv2d((xm * _chan(u)).reshape(x.shape), delta, None, stride, padding, dilation, groups)
    e1m = _members(e1, E)[..., None, None]
    y = _members(h, E) * _chan(s) + _members(hd, E) * _chan(v) * e1m
    if bias is not None:
        y = y + _chan(bias)
    if delta_bias is not None:
        y = y + _chan(delta_bias) * _members(e2, E)[..., None, None]
    return y.reshape(h.shape)


def _torch_hyper_batch_ensemble_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias,
                                          stride, padding, dilation, groups):
    # The plain composition, exactly the layer's embed() then the e1 / e2 op: autograd keeps what the
    # composition's ops keep (e1, e2 among them); the cpp backend does not.
    e = F.linear(hparams, embedding)
    out_c = weight.shape[0]
    e1, e2 = (e, None) if delta_bias is None else (e[:, :out_c], e[:, out_c:])
    return _torch_hyper_batch_ensemble_conv2d(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride,
                                              padding, dilation, groups)


class _ContiguousCopy(torch.autograd.Function):
    """x.contiguous() whose gradient comes back channels-last, as x was."""

    @staticmethod
    def forward(ctx, x):
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last)


def _cpu_channels_last_is_unsafe(x: torch.Tensor, weight: torch.Tensor, stride) -> bool:
    """A channels-last CPU input (and not also plain contiguous) in one of the cases torch's own CPU
    convolution (torch 2.13, oneDNN) gets wrong, which every backend's CPU path runs:
    - bfloat16: F.conv2d's weight gradient of a (4, 6, 3, 1) channels-last input, stride 2, padding 1
      was off by up to ~1e32 or inf/NaN in 35 of 40 seeds on CPUs with native bf16;
    - a 1x1 kernel at stride > 1, any dtype: x (4, 3, 8, 8), weight (5, 3, 1, 1), stride 2 gave wrong
      weight gradients in 16 of 20 seeds in float32 (and heap corruption was seen; oneDNN#6035); 3x3
      kernels, stride 1 and 16 or more channels were right.
    The ops convolve a contiguous copy of x instead and hand back the output and the gradient of x
    channels-last, so callers see the layout they passed."""
    if not (x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return False
    pointwise_strided = tuple(weight.shape[2:]) == (1, 1) and max(stride) > 1
    return x.dtype == torch.bfloat16 or pointwise_strided


def _guard_layout(run, x, weight, *rest):
    """run(x, weight, *rest), through a contiguous copy of x where _cpu_channels_last_is_unsafe; every conv
    op's arguments end with (stride, padding, dilation, groups)."""
    stride = rest[-4]
    if not _cpu_channels_last_is_unsafe(x, weight, stride):
        return run(x, weight, *rest)
    return run(_ContiguousCopy.apply(x), weight, *rest).contiguous(memory_format=torch.channels_last)


def batch_ensemble_conv2d(x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
                          bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1, *,
                          backend: str = "auto") -> torch.Tensor:
    """BatchEnsemble conv2d for all members at once:
    y = conv2d(x * r_k[:, None, None], weight) * s_k[:, None, None] + bias_k[:, None, None].

    Args:
        x: (E*B, C_in, H, W) member-major images.
        weight: (C_out, C_in/groups, kh, kw) shared weight (nn.Conv2d layout).
        r: (E, C_in); s, bias: (E, C_out).
        stride, padding, dilation: int or pair; groups: int.
        backend: "auto" | "torch" | "cpp" | "triton".
    Returns:
        (E*B, C_out, H_out, W_out) member-major outputs. A channels-last x on the CPU in bfloat16,
        or with a 1x1 kernel at stride > 1, is convolved as a contiguous copy (torch's CPU
        convolution is wrong there); the output and x's gradient still come back channels-last.
    """
    stride, padding, dilation, groups = conv_geometry(stride, padding, dilation, groups)
    args = (x, weight, r, s, bias, stride, padding, dilation, groups)
    # The cpp kernels check the tensors: the Python checks run only if one refuses them (kernel_first).
    y = kernel_first("conv", "batch_ensemble_conv2d", backend, x, _torch_batch_ensemble_conv2d, args, _guard_layout)
    if y is not None:
        return y
    validate_conv2d(*args)
    run = implementation("conv", "batch_ensemble_conv2d", backend, x.device, _torch_batch_ensemble_conv2d)
    return _guard_layout(run, *args)


def hyper_batch_ensemble_conv2d(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, r: torch.Tensor,
                                s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, e1: torch.Tensor,
                                bias: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                                e2: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1, *,
                                backend: str = "auto") -> torch.Tensor:
    """Hyper-batch-ensemble conv2d (Wenzel et al. 2020, eq. 7, per channel) for all members at once:

        y = s_k * conv(x * r_k, W) + (v_k * e1) * conv(x * u_k, delta) + bias_k + delta_bias_k * e2

    with r_k, u_k on input channels; s_k, v_k, bias_k, delta_bias_k and the per-image embeddings
    e1, e2 (E*B, C_out) on output channels, broadcast over the output's spatial positions.
    """
    return _hyper_batch_ensemble_conv2d(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding,
                                        dilation, groups, backend, True)


def _hyper_batch_ensemble_conv2d(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation,
                                 groups, backend: str, check_embeddings: bool) -> torch.Tensor:
    """hyper_batch_ensemble_conv2d; check_embeddings=False skips the finiteness check of e1 and e2 (a
    device sync on CUDA), for callers that computed them from checked hyperparameters (the layers)."""
    stride, padding, dilation, groups = conv_geometry(stride, padding, dilation, groups)
    args = (x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation, groups)
    y = kernel_first("conv", "hyper_batch_ensemble_conv2d", backend, x, _torch_hyper_batch_ensemble_conv2d, args,
                     _guard_layout)
    if y is not None:  # the kernel accepted the shapes; the values are checked through y
        if check_embeddings:
            check_embeddings_finite(e1, e2, y)
        return y
    validate_conv2d(x, weight, r, s, bias, stride, padding, dilation, groups, delta, u, v, e1, delta_bias, e2,
                    hyper=True, check_embeddings=check_embeddings)
    run = implementation("conv", "hyper_batch_ensemble_conv2d", backend, x.device, _torch_hyper_batch_ensemble_conv2d)
    return _guard_layout(run, *args)


def hyper_batch_ensemble_conv2d_hp(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, r: torch.Tensor,
                                   s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, hparams: torch.Tensor,
                                   embedding: torch.Tensor, bias: torch.Tensor | None = None,
                                   delta_bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                                   groups: int = 1, *, backend: str = "auto") -> torch.Tensor:
    """hyper_batch_ensemble_conv2d with the hyperparameter embedding computed inside the op:

        [e1 | e2] = hparams @ embedding^T                        (one row per image)
        y = s_k * conv(x * r_k, W) + (v_k * e1) * conv(x * u_k, delta) + bias_k + delta_bias_k * e2

    e1, e2 (E*B, C_out) are never saved for the backward (it recomputes them from hparams, which is
    tiny); gradients flow to every tensor argument, hparams and embedding included.

    Where e is computed, per backend:
        cpp (CPU and CUDA): transient, inside the op's kernel with no operator call of its own: a small
            primitive (CPU: a loop; CUDA: one small kernel) fills (E*B, C_out) buffers for e1 / e2, the
            hyper op's kernels run on them, and its backward reduces the kernels' de1 / de2 into
            d(embedding) = de^T hparams and d(hparams) = de @ embedding with another (csrc/one_conv.h:
            P::embed, P::embed_backward).
        triton and torch: the plain composition (F.linear for e, then the e1 / e2 op of that backend); its
            autograd keeps what those ops keep, e1 and e2 included.

    Args:
        x: (E*B, C_in, H, W) member-major images, NCHW or channels-last.
        weight, delta: (C_out, C_in/groups, kh, kw) shared weights.
        r, u: (E, C_in); s, v: (E, C_out) fast weights.
        hparams: (E*B, m) per-image normalised hyperparameters (HyperParameterSpace.normalize).
        embedding: the embedding weight, nn.Linear(m, C_out or 2*C_out, bias=False).weight: (C_out, m)
            without delta_bias, (2*C_out, m) with it (rows [0, C_out) give e1, [C_out, 2*C_out) give e2).
        bias, delta_bias: (E, C_out) or None.
        stride, padding, dilation: int or pair; groups: int.
        backend: "auto" | "torch" | "cpp" | "triton".
    Returns:
        (E*B, C_out, H_out, W_out) member-major outputs (channels-last x: channels-last output).
    """
    return _hyper_batch_ensemble_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride,
                                           padding, dilation, groups, backend, True)


def _hyper_batch_ensemble_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride,
                                    padding, dilation, groups, backend: str, check_hparams: bool) -> torch.Tensor:
    """hyper_batch_ensemble_conv2d_hp; check_hparams=False skips the finiteness check of hparams and
    embedding (a device sync on CUDA), for callers that checked them (the layers)."""
    stride, padding, dilation, groups = conv_geometry(stride, padding, dilation, groups)
    args = (x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride, padding, dilation, groups)
    y = kernel_first("conv", "hyper_batch_ensemble_conv2d_hp", backend, x, _torch_hyper_batch_ensemble_conv2d_hp,
                     args, _guard_layout)
    if y is not None:
        if check_hparams:
            check_hparams_finite(hparams, embedding)
        return y
    validate_conv2d_hp(*args, check_hparams)
    run = implementation("conv", "hyper_batch_ensemble_conv2d_hp", backend, x.device,
                         _torch_hyper_batch_ensemble_conv2d_hp)
    return _guard_layout(run, *args)
