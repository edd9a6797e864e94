"""backend="triton" of the rank-1 ensemble conv2d ops: torch.library custom ops around the
implicit-GEMM kernels in hyperkern.kernels.rank1_conv (forward, input gradient, weight gradient; all
members in one launch per pass).

x is member-major: (E*B, C_in, H, W), images k*B .. (k+1)*B-1 belong to member k, E = r.shape[0].
Inputs arrive validated from hyperkern.ops.conv (shapes, dtypes, devices; stride/padding/dilation as
int pairs). Any layout works; the output (and dx), like F.conv2d's, is channels-last exactly when x
is. The kernels run on channels-last activations: x and the output gradient in another layout are
copied to channels-last at the op boundary and the results copied back, so a network kept in
torch.channels_last (model.to(memory_format=torch.channels_last)) runs without any copy.

Ops (namespace "hyperkern"), each with a fake impl for torch.compile:
  batch_ensemble_conv2d_triton(x, weight, r, s, bias?, stride, padding, dilation, groups)
  hyper_batch_ensemble_conv2d_triton(x, weight, delta, r, s, u, v, e1, bias?, delta_bias?, e2?, ...)
and their backward ops (..._backward) used by register_autograd. The backward runs the input-gradient
kernel when x needs a gradient and the weight-gradient kernel (which also reduces dr, ds, and for the
hyper op dDelta, du, dv, de1) when any of those need one; bias gradients are per-image channel sums of
the output gradient. Gradients the caller does not need come back as empty tensors and are None.
Double backward (create_graph=True) computes the gradients with the differentiable composition of
hyperkern.ops._composite instead; the backward ops' own derivative is that composition's
vector-Jacobian product.

float64 runs the same kernels with float64 accumulators and IEEE dots (DMMA on an H100: exact, for
gradcheck, not fast); float32 uses TF32 tensor cores when torch.backends.cudnn.allow_tf32 is set
(torch's default for convolutions) and 3xTF32 (about float32 accuracy) when it is not; bf16 / fp16
accumulate in float32. Weight-gradient reductions use float32 atomics, so the last bits of dW, dr, ds
(and dDelta, du, dv, de1) can differ from run to run.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from hyperkern.kernels import rank1_conv as _kernels
from hyperkern.ops._composite import rank1_grads, vjp_of

__all__ = ["batch_ensemble_conv2d", "hyper_batch_ensemble_conv2d"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when x is laid out NHWC (and not also plain contiguous), like F.conv2d."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _output_shape(x: Tensor, weight: Tensor, stride, padding, dilation):
    ho, wo = _kernels.conv2d_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3],
                                         stride, padding, dilation)
    return (x.shape[0], weight.shape[0], ho, wo)


def _empty_output(x: Tensor, weight: Tensor, stride, padding, dilation, memory_format=None) -> Tensor:
    return torch.empty(_output_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device,
                       memory_format=memory_format or _memory_format(x))


def _channels_last(t: Tensor) -> Tensor:
    """The kernels read and write activations channels-last (NHWC): the layout in which their tiles
    are contiguous 16-byte vectors (the layout tensor-core convolutions want; cuDNN too). Other
    layouts are copied at the op boundary; channels-last tensors pass through untouched."""
    return t.contiguous(memory_format=torch.channels_last)


def _like_input(result: Tensor, x: Tensor) -> Tensor:
    """A channels-last kernel result in x's memory format (a copy only when x is not channels-last)."""
    return result.contiguous(memory_format=_memory_format(x))


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _nothing(t: Tensor) -> Tensor:
    """Placeholder for a gradient nobody asked for (custom ops cannot return None)."""
    return t.new_empty(0)


def _as_input(acc: Tensor, like: Tensor) -> Tensor:
    """An accumulator-dtype gradient in the input's dtype, contiguous (as the fake impls promise)."""
    return acc.to(like.dtype, memory_format=torch.contiguous_format)


def _channel_sums(grad: Tensor) -> Tensor:
    """(E*B, C_out): each image's output gradient summed over its pixels, in the accumulator dtype."""
    return grad.sum(dim=(2, 3), dtype=_kernels.accumulator_dtype(grad.dtype))


# ----------------------------------------------------------------------------------------------
# batch ensemble
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hyperkern::batch_ensemble_conv2d_triton", mutates_args=())
def _batch_ensemble_conv2d_op(x: Tensor, weight: Tensor, r: Tensor, s: Tensor, bias: Optional[Tensor],
                              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                              groups: int) -> Tensor:
    out = _empty_output(x, weight, stride, padding, dilation, torch.channels_last)
    with _device_guard(x):
        _kernels.rank1_conv2d_forward(_channels_last(x), weight, r.contiguous(), s.contiguous(), _c(bias),
                                      stride, padding, dilation, groups, out)
    return _like_input(out, x)


@_batch_ensemble_conv2d_op.register_fake
def _(x, weight, r, s, bias, stride, padding, dilation, groups):
    return _empty_output(x, weight, stride, padding, dilation)


@torch.library.custom_op("hyperkern::batch_ensemble_conv2d_triton_backward", mutates_args=())
def _batch_ensemble_conv2d_backward_op(grad: Tensor, x: Tensor, weight: Tensor, r: Tensor, s: Tensor,
                                       has_bias: bool, stride: Sequence[int], padding: Sequence[int],
                                       dilation: Sequence[int], groups: int, input_grad: bool,
                                       weight_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dr, ds, dbias); the ones not asked for are empty."""
    r, s = r.contiguous(), s.contiguous()
    E = r.shape[0]
    dx, dw, dr, ds, db = (_nothing(x) for _ in range(5))
    grad_cl = _channels_last(grad) if input_grad or weight_grads else grad
    with _device_guard(x):
        if input_grad:
            dx = torch.empty_like(x, memory_format=torch.channels_last)
            _kernels.rank1_conv2d_input_grad(grad_cl, weight, r, s, stride, padding, dilation, groups, dx)
            dx = _like_input(dx, x)
        if weight_grads:
            grads = _kernels.rank1_conv2d_weight_grad(grad_cl, _channels_last(x), weight, r, s, stride, padding,
                                                      dilation, groups)
            dw, dr, ds = (_as_input(grads[name], t) for name, t in (("weight", weight), ("r", r), ("s", s)))
    if has_bias:
        db = _channel_sums(grad).view(E, -1, grad.shape[1]).sum(1).to(s.dtype)
    return dx, dw, dr, ds, db


@_batch_ensemble_conv2d_backward_op.register_fake
def _(grad, x, weight, r, s, has_bias, stride, padding, dilation, groups, input_grad, weight_grads):
    dx = torch.empty_like(x, memory_format=_memory_format(x)) if input_grad else _nothing(x)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grads else _nothing(x)
    dr = torch.empty_like(r, memory_format=torch.contiguous_format) if weight_grads else _nothing(x)
    ds = torch.empty_like(s, memory_format=torch.contiguous_format) if weight_grads else _nothing(x)
    db = torch.empty_like(s, memory_format=torch.contiguous_format) if has_bias else _nothing(x)
    return dx, dw, dr, ds, db


def _batch_ensemble_backward_composite(grad, x, weight, r, s, has_bias, stride, padding, dilation, groups, input_grad,
                                       weight_grads):
    """The backward op's outputs as differentiable torch ops (None where the op returns a placeholder)."""
    d = rank1_grads(grad, x, weight, r, s, dict(x=input_grad, weight=weight_grads, r=weight_grads, s=weight_grads,
                                                bias=has_bias),
                    stride=stride, padding=padding, dilation=dilation, groups=groups)
    return d.get("x"), d.get("weight"), d.get("r"), d.get("s"), d.get("bias")


_setup, _derivative = vjp_of(_batch_ensemble_backward_composite, 5)
torch.library.register_autograd("hyperkern::batch_ensemble_conv2d_triton_backward", _derivative,
                                setup_context=_setup)


def _batch_ensemble_setup_context(ctx, inputs, output):
    x, weight, r, s, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, r, s)
    ctx.conv = (bias is not None, list(stride), list(padding), list(dilation), groups)


def _batch_ensemble_backward(ctx, grad):
    x, weight, r, s = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups = ctx.conv
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
        d = rank1_grads(grad, x, weight, r, s, dict(x=need[0], weight=need[1], r=need[2], s=need[3],
                                                    bias=has_bias and need[4]),
                        stride=stride, padding=padding, dilation=dilation, groups=groups)
        return (d.get("x"), d.get("weight"), d.get("r"), d.get("s"), d.get("bias"), None, None, None, None)
    dx, dw, dr, ds, db = _batch_ensemble_conv2d_backward_op(
        grad, x, weight, r, s, has_bias and need[4], stride, padding, dilation, groups, need[0],
        need[1] or need[2] or need[3])
    return (dx if need[0] else None, dw if need[1] else None, dr if need[2] else None, ds if need[3] else None,
            db if has_bias and need[4] else None, None, None, None, None)


torch.library.register_autograd("hyperkern::batch_ensemble_conv2d_triton", _batch_ensemble_backward,
                                setup_context=_batch_ensemble_setup_context)


# ----------------------------------------------------------------------------------------------
# hyper-batch ensemble
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hyperkern::hyper_batch_ensemble_conv2d_triton", mutates_args=())
def _hyper_batch_ensemble_conv2d_op(x: Tensor, weight: Tensor, delta: Tensor, r: Tensor, s: Tensor, u: Tensor,
                                    v: Tensor, e1: Tensor, bias: Optional[Tensor], delta_bias: Optional[Tensor],
                                    e2: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                                    dilation: Sequence[int], groups: int) -> Tensor:
    out = _empty_output(x, weight, stride, padding, dilation, torch.channels_last)
    with _device_guard(x):
        _kernels.rank1_conv2d_forward(_channels_last(x), weight, r.contiguous(), s.contiguous(), _c(bias),
                                      stride, padding, dilation, groups, out,
                                      delta=delta, u=u.contiguous(), v=v.contiguous(),
                                      e1=e1.contiguous(), delta_bias=_c(delta_bias), e2=_c(e2))
    return _like_input(out, x)


@_hyper_batch_ensemble_conv2d_op.register_fake
def _(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation, groups):
    return _empty_output(x, weight, stride, padding, dilation)


@torch.library.custom_op("hyperkern::hyper_batch_ensemble_conv2d_triton_backward", mutates_args=())
def _hyper_batch_ensemble_conv2d_backward_op(
        grad: Tensor, x: Tensor, weight: Tensor, delta: Tensor, r: Tensor, s: Tensor, u: Tensor, v: Tensor,
        e1: Tensor, delta_bias: Optional[Tensor], e2: Optional[Tensor], has_bias: bool, stride: Sequence[int],
        padding: Sequence[int], dilation: Sequence[int], groups: int, input_grad: bool,
        weight_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                     Tensor]:
    """Returns (dx, dweight, ddelta, dr, ds, du, dv, de1, dbias, ddelta_bias, de2); the ones not asked
    for are empty (the delta_bias / e2 gradients exist when delta_bias is given)."""
    r, s, u, v, e1 = (t.contiguous() for t in (r, s, u, v, e1))
    E = r.shape[0]
    dx, dw, dd, dr, ds, du, dv, de1, db, ddb, de2 = (_nothing(x) for _ in range(11))
    grad_cl = _channels_last(grad) if input_grad or weight_grads else grad
    with _device_guard(x):
        if input_grad:
            dx = torch.empty_like(x, memory_format=torch.channels_last)
            _kernels.rank1_conv2d_input_grad(grad_cl, weight, r, s, stride, padding, dilation, groups, dx,
                                             delta=delta, u=u, v=v, e1=e1)
            dx = _like_input(dx, x)
        if weight_grads:
            grads = _kernels.rank1_conv2d_weight_grad(grad_cl, _channels_last(x), weight, r, s, stride, padding,
                                                      dilation, groups, delta=delta, u=u, v=v, e1=e1)
            dw, dd, dr, ds, du, dv, de1 = (_as_input(grads[name], t) for name, t in (
                ("weight", weight), ("delta", delta), ("r", r), ("s", s), ("u", u), ("v", v), ("e1", e1)))
    if has_bias or delta_bias is not None:
        sums = _channel_sums(grad)  # (E*B, C_out)
        if has_bias:
            db = sums.view(E, -1, grad.shape[1]).sum(1).to(x.dtype)
        if delta_bias is not None:
            ddb = (sums * e2).view(E, -1, grad.shape[1]).sum(1).to(x.dtype)
            de2 = (sums.view(E, -1, grad.shape[1]) * delta_bias[:, None, :]).reshape(sums.shape).to(x.dtype)
    return dx, dw, dd, dr, ds, du, dv, de1, db, ddb, de2


@_hyper_batch_ensemble_conv2d_backward_op.register_fake
def _(grad, x, weight, delta, r, s, u, v, e1, delta_bias, e2, has_bias, stride, padding, dilation, groups,
      input_grad, weight_grads):
    def like(t, cond):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if cond else _nothing(x)

    dx = torch.empty_like(x, memory_format=_memory_format(x)) if input_grad else _nothing(x)
    return (dx, like(weight, weight_grads), like(delta, weight_grads), like(r, weight_grads), like(s, weight_grads),
            like(u, weight_grads), like(v, weight_grads), like(e1, weight_grads), like(s, has_bias),
            like(s, delta_bias is not None), like(e1, delta_bias is not None))


def _hyper_backward_composite(grad, x, weight, delta, r, s, u, v, e1, delta_bias, e2, has_bias, stride, padding,
                              dilation, groups, input_grad, weight_grads):
    """The hyper backward op's outputs as differentiable torch ops."""
    db = delta_bias is not None
    d = rank1_grads(grad, x, weight, r, s, dict(x=input_grad, weight=weight_grads, delta=weight_grads, r=weight_grads,
                                                s=weight_grads, u=weight_grads, v=weight_grads, e1=weight_grads,
                                                bias=has_bias, delta_bias=db, e2=db),
                    delta, u, v, e1, delta_bias, e2, stride, padding, dilation, groups)
    return tuple(d.get(name) for name in ("x", "weight", "delta", "r", "s", "u", "v", "e1", "bias", "delta_bias",
                                          "e2"))


_setup, _derivative = vjp_of(_hyper_backward_composite, 11)
torch.library.register_autograd("hyperkern::hyper_batch_ensemble_conv2d_triton_backward", _derivative,
                                setup_context=_setup)


def _hyper_setup_context(ctx, inputs, output):
    x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, delta, r, s, u, v, e1, delta_bias, e2)
    ctx.conv = (bias is not None, list(stride), list(padding), list(dilation), groups)


def _hyper_backward(ctx, grad):
    x, weight, delta, r, s, u, v, e1, delta_bias, e2 = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups = ctx.conv
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
        has_db = delta_bias is not None
        d = rank1_grads(grad, x, weight, r, s, dict(zip(("x", "weight", "delta", "r", "s", "u", "v", "e1"), need[:8]),
                                                    bias=has_bias and need[8], delta_bias=has_db and need[9],
                                                    e2=has_db and need[10]),
                        delta, u, v, e1, delta_bias, e2, stride, padding, dilation, groups)
        return tuple(d.get(name) for name in ("x", "weight", "delta", "r", "s", "u", "v", "e1", "bias", "delta_bias",
                                              "e2")) + (None, None, None, None)
    weight_grads = any(need[1:8])
    outs = _hyper_batch_ensemble_conv2d_backward_op(grad, x, weight, delta, r, s, u, v, e1, delta_bias, e2,
                                                    has_bias and need[8], stride, padding, dilation, groups,
                                                    need[0], weight_grads)
    dx, dw, dd, dr, ds, du, dv, de1, db, ddb, de2 = outs
    grads = [dx, dw, dd, dr, ds, du, dv, de1]
    grads = [g if n else None for g, n in zip(grads, need[:8])]
    has_delta_bias = delta_bias is not None
    grads += [db if has_bias and need[8] else None, ddb if has_delta_bias and need[9] else None,
              de2 if has_delta_bias and need[10] else None]
    return tuple(grads) + (None, None, None, None)


torch.library.register_autograd("hyperkern::hyper_batch_ensemble_conv2d_triton", _hyper_backward,
                                setup_context=_hyper_setup_context)


# ----------------------------------------------------------------------------------------------
# entry points called by hyperkern.ops.conv (validated arguments)
# ----------------------------------------------------------------------------------------------
def batch_ensemble_conv2d(x, weight, r, s, bias, stride, padding, dilation, groups):
    """y = conv2d(x * r_k, weight) * s_k + bias_k for member-major x (E*B, C_in, H, W)."""
    return _batch_ensemble_conv2d_op(x, weight, r, s, bias, list(stride), list(padding), list(dilation), groups)


def hyper_batch_ensemble_conv2d(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation,
                                groups):
    """y = s_k * conv(x * r_k, W) + v_k * e1 * conv(x * u_k, delta) + bias_k + delta_bias_k * e2."""
    return _hyper_batch_ensemble_conv2d_op(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, list(stride),
                                           list(padding), list(dilation), groups)


def hyper_batch_ensemble_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride, padding,
                                   dilation, groups):
    """hyper_batch_ensemble_conv2d with [e1 | e2] = hparams @ embedding^T: e computed here (F.linear, freed
    after the backward), then the Triton conv op."""
    e = torch.nn.functional.linear(hparams, embedding)
    out_c = weight.shape[0]
    e1, e2 = (e, None) if delta_bias is None else (e[:, :out_c], e[:, out_c:])
    return hyper_batch_ensemble_conv2d(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding,
                                       dilation, groups)
