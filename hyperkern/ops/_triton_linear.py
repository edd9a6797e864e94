"""backend="triton" of the rank-1 ensemble linear ops: torch.library custom ops over the Triton
kernels in hyperkern.kernels.rank1_linear.

Rows are member-major: x has E*B rows and rows k*B .. (k+1)*B-1 belong to member k (E = r.shape[0]).

Ops (namespace "hyperkern"; these Python registrations add a library FRAGMENT next to the C++
TORCH_LIBRARY(hyperkern) block of hyperkern._C, under names of their own):

    hyperkern::batch_ensemble_linear_triton(x, weight, r, s, bias?) -> y
    hyperkern::batch_ensemble_linear_triton_backward(grad, x, weight, r, s, bias_grad, x_grad, weight_grads)
        -> (dx, dweight, dr, ds, dbias)
    hyperkern::hyper_batch_ensemble_linear_triton(x, weight, delta, r, s, u, v, e1, bias?, delta_bias?, e2?,
                                                  save_delta_product) -> (y, delta_product)
    hyperkern::hyper_batch_ensemble_linear_triton_backward(grad, x, weight, delta, r, s, u, v, e1, delta_bias?,
        e2?, delta_product, bias_grad, x_grad, weight_grads, e1_grad, delta_bias_grads)
        -> (dx, dweight, ddelta, dr, ds, du, dv, de1, dbias, ddelta_bias, de2)
    hyperkern::hyper_batch_ensemble_linear_hp_triton(x, weight, delta, r, s, u, v, hparams, embedding, bias?,
                                                     delta_bias?, save_delta_product) -> (y, delta_product)
    hyperkern::hyper_batch_ensemble_linear_hp_triton_backward(grad, x, weight, delta, r, s, u, v, hparams,
        embedding, delta_bias?, delta_product, bias_grad, x_grad, weight_grads, delta_bias_grad, embedding_grad,
        hparams_grad) -> (dx, dweight, ddelta, dr, ds, du, dv, dhparams, dembedding, dbias, ddelta_bias)

Each has a fake (meta) implementation, so torch.compile(fullgraph=True) traces through them, and the
forward ops have autograd formulas that call the backward ops (Triton kernels as well: grad input,
grad weight with the fast-weight reductions fused, and one row-wise pass for bias / embedding
gradients; see kernels/rank1_linear.py). The hp ops run those kernels in their EMBED mode: e1 / e2
computed per tile inside them, d(embedding) and d(hparams) reduced inside the row-wise pass. Gradients a backward op is not asked for come back as
empty tensors and are returned to autograd as None.

Double backward: a backward recorded by autograd (create_graph=True) computes the gradients with the
differentiable composition of hyperkern.ops._composite instead of the backward ops; the backward ops'
own derivative (register_autograd) is that composition's vector-Jacobian product.

The hyper op needs the pre-scale product (x * u_k) @ Delta^T for the e1 gradient: the forward
kernel stores it (delta_product, non-differentiable) when save_delta_product is true, which the
public wrapper sets when grad mode is on and e1 requires grad; otherwise delta_product is empty and
a backward that still needs it recomputes it with the forward kernel.

Precision: bf16 / fp16 accumulate in fp32; fp32 uses TF32 tensor cores per
torch.get_float32_matmul_precision() ("tf32" for "high"/"medium", "tf32x3" for the default
"highest"); fp64 runs a dedicated fp64 path (tl.dot on fp64 operands with an fp64 accumulator) on
the same kernels. Inputs may be non-contiguous (the kernels take strides); the small per-member
vectors are made contiguous here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hyperkern.kernels import rank1_linear as kernels
from hyperkern.ops._composite import rank1_grads, vjp_of

__all__ = ["batch_ensemble_linear", "hyper_batch_ensemble_linear", "hyper_batch_ensemble_linear_hp"]


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _none(t: Tensor) -> Tensor:
    """Placeholder output for a gradient that was not asked for."""
    return t.new_empty((0,))


def like(t: Tensor, want: bool) -> Tensor:
    """Fake output: a contiguous gradient shaped like t when asked for, else the placeholder."""
    return torch.empty_like(t, memory_format=torch.contiguous_format) if want else _none(t)


# ----------------------------------------------------------------------------------------------
# batch ensemble linear
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hyperkern::batch_ensemble_linear_triton", mutates_args=())
def _batch_forward(x: Tensor, weight: Tensor, r: Tensor, s: Tensor, bias: Optional[Tensor]) -> Tensor:
    y, _ = kernels.rank1_linear_forward(x, weight, r.contiguous(), s.contiguous(), _contig(bias))
    return y


@_batch_forward.register_fake
def _(x, weight, r, s, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("hyperkern::batch_ensemble_linear_triton_backward", mutates_args=())
def _batch_backward(grad: Tensor, x: Tensor, weight: Tensor, r: Tensor, s: Tensor, bias_grad: bool, x_grad: bool,
                    weight_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r, s = r.contiguous(), s.contiguous()
    grad = kernels.unit_inner_stride(grad)  # once here rather than in each launcher
    dx = kernels.rank1_linear_grad_input(grad, weight, r, s) if x_grad else _none(x)
    if weight_grads:
        dw, dr, ds = kernels.rank1_linear_grad_weight(grad, x, weight, r, s)
    else:
        dw, dr, ds = _none(weight), _none(r), _none(s)
    db = kernels.rank1_linear_grad_rowwise(grad, r.shape[0], True)[0] if bias_grad else _none(s)
    return dx, dw, dr, ds, db


@_batch_backward.register_fake
def _(grad, x, weight, r, s, bias_grad, x_grad, weight_grads):
    return like(x, x_grad), like(weight, weight_grads), like(r, weight_grads), like(s, weight_grads), \
        like(s, bias_grad)


def _batch_backward_composite(grad, x, weight, r, s, bias_grad, x_grad, weight_grads):
    """The backward op's outputs as differentiable torch ops (None where the op returns a placeholder)."""
    d = rank1_grads(grad, x, weight, r, s, dict(x=x_grad, weight=weight_grads, r=weight_grads, s=weight_grads,
                                                bias=bias_grad))
    return d.get("x"), d.get("weight"), d.get("r"), d.get("s"), d.get("bias")


_setup, _derivative = vjp_of(_batch_backward_composite, 5)
_batch_backward.register_autograd(_derivative, setup_context=_setup)


def _batch_setup_context(ctx, inputs, output):
    x, weight, r, s, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, r, s)


def _batch_autograd(ctx, grad):
    x, weight, r, s = ctx.saved_tensors
    need_x, need_w, need_r, need_s, need_b = ctx.needs_input_grad
    weight_grads = need_w or need_r or need_s
    bias_grad = ctx.has_bias and need_b
    if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
        d = rank1_grads(grad, x, weight, r, s, dict(x=need_x, weight=need_w, r=need_r, s=need_s, bias=bias_grad))
        return d.get("x"), d.get("weight"), d.get("r"), d.get("s"), d.get("bias")
    dx, dw, dr, ds, db = torch.ops.hyperkern.batch_ensemble_linear_triton_backward(
        grad, x, weight, r, s, bias_grad, need_x, weight_grads)
    return (dx if need_x else None, dw if need_w else None, dr if need_r else None, ds if need_s else None,
            db if bias_grad else None)


_batch_forward.register_autograd(_batch_autograd, setup_context=_batch_setup_context)


def batch_ensemble_linear(x: Tensor, weight: Tensor, r: Tensor, s: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y = ((x * r_k) @ weight^T) * s_k + bias_k on the Triton kernels (arguments validated by
    hyperkern.ops.batch_ensemble_linear). x: (E*B, in) member-major; returns (E*B, out)."""
    return torch.ops.hyperkern.batch_ensemble_linear_triton(x, weight, r, s, bias)


# ----------------------------------------------------------------------------------------------
# hyper-batch ensemble linear
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hyperkern::hyper_batch_ensemble_linear_triton", mutates_args=())
def _hyper_forward(x: Tensor, weight: Tensor, delta: Tensor, r: Tensor, s: Tensor, u: Tensor, v: Tensor, e1: Tensor,
                   bias: Optional[Tensor], delta_bias: Optional[Tensor], e2: Optional[Tensor],
                   save_delta_product: bool) -> tuple[Tensor, Tensor]:
    y, delta_product = kernels.rank1_linear_forward(
        x, weight, r.contiguous(), s.contiguous(), _contig(bias), delta, u.contiguous(), v.contiguous(), e1,
        _contig(delta_bias), e2, store_delta_out=save_delta_product)
    if delta_product is None:
        delta_product = x.new_empty((0, weight.shape[0]))
    return y, delta_product


@_hyper_forward.register_fake
def _(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, save_delta_product):
    rows = x.shape[0] if save_delta_product else 0
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((rows, weight.shape[0]))


def _delta_product(x, delta, u, out_features):
    """(x * u_k) @ Delta^T with the forward kernel (s = 1, no bias)."""
    ones = torch.ones((u.shape[0], out_features), dtype=x.dtype, device=x.device)
    return kernels.rank1_linear_forward(x, delta, u, ones)[0]


@torch.library.custom_op("hyperkern::hyper_batch_ensemble_linear_triton_backward", mutates_args=())
def _hyper_backward(grad: Tensor, x: Tensor, weight: Tensor, delta: Tensor, r: Tensor, s: Tensor, u: Tensor,
                    v: Tensor, e1: Tensor, delta_bias: Optional[Tensor], e2: Optional[Tensor], delta_product: Tensor,
                    bias_grad: bool, x_grad: bool, weight_grads: bool, e1_grad: bool,
                    delta_bias_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                     Tensor, Tensor, Tensor]:
    r, s, u, v = r.contiguous(), s.contiguous(), u.contiguous(), v.contiguous()
    grad, x, e1 = kernels.unit_inner_stride(grad), kernels.unit_inner_stride(x), kernels.unit_inner_stride(e1)
    E = r.shape[0]
    dx = kernels.rank1_linear_grad_input(grad, weight, r, s, delta, u, v, e1) if x_grad else _none(x)
    if weight_grads:
        dw, dr, ds, ddelta, du, dv = kernels.rank1_linear_grad_weight(grad, x, weight, r, s, e1, delta, u, v)
    else:
        dw, dr, ds, ddelta, du, dv = _none(weight), _none(r), _none(s), _none(delta), _none(u), _none(v)
    delta_bias_grads = delta_bias_grads and delta_bias is not None
    if e1_grad and delta_product.shape[0] != x.shape[0]:  # not stored by the forward: recompute it
        delta_product = _delta_product(x, delta, u, weight.shape[0])
    dbias, de1, ddb, de2 = kernels.rank1_linear_grad_rowwise(
        grad, E, bias_grad, v if e1_grad else None, delta_product if e1_grad else None,
        e2 if delta_bias_grads else None, _contig(delta_bias) if delta_bias_grads else None)
    return (dx, dw, ddelta, dr, ds, du, dv,
            de1 if e1_grad else _none(e1), dbias if bias_grad else _none(s),
            ddb if delta_bias_grads else _none(s), de2 if delta_bias_grads else _none(e1))


@_hyper_backward.register_fake
def _(grad, x, weight, delta, r, s, u, v, e1, delta_bias, e2, delta_product, bias_grad, x_grad, weight_grads,
      e1_grad, delta_bias_grads):
    db_grads = delta_bias_grads and delta_bias is not None
    return (like(x, x_grad), like(weight, weight_grads), like(delta, weight_grads), like(r, weight_grads),
            like(s, weight_grads), like(u, weight_grads), like(v, weight_grads), like(e1, e1_grad),
            like(s, bias_grad), like(s, db_grads), like(e1, db_grads))


def _hyper_backward_composite(grad, x, weight, delta, r, s, u, v, e1, delta_bias, e2, delta_product, bias_grad,
                              x_grad, weight_grads, e1_grad, delta_bias_grads):
    """The hyper backward op's outputs as differentiable torch ops (delta_product is recomputed)."""
    db = delta_bias_grads and delta_bias is not None
    d = rank1_grads(grad, x, weight, r, s, dict(x=x_grad, weight=weight_grads, delta=weight_grads, r=weight_grads,
                                                s=weight_grads, u=weight_grads, v=weight_grads, e1=e1_grad,
                                                bias=bias_grad, delta_bias=db, e2=db),
                    delta, u, v, e1, delta_bias, e2)
    return tuple(d.get(name) for name in ("x", "weight", "delta", "r", "s", "u", "v", "e1", "bias", "delta_bias",
                                          "e2"))


_setup, _derivative = vjp_of(_hyper_backward_composite, 12)
_hyper_backward.register_autograd(_derivative, setup_context=_setup)


def _hyper_setup_context(ctx, inputs, output):
    x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, _save = inputs
    ctx.has_bias = bias is not None
    ctx.has_delta_bias = delta_bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, delta, r, s, u, v, e1, delta_bias, e2, output[1])


def _hyper_autograd(ctx, grad, _grad_delta_product):
    x, weight, delta, r, s, u, v, e1, delta_bias, e2, delta_product = ctx.saved_tensors
    (need_x, need_w, need_d, need_r, need_s, need_u, need_v, need_e1, need_b, need_db, need_e2,
     _need_save) = ctx.needs_input_grad
    weight_grads = need_w or need_d or need_r or need_s or need_u or need_v
    bias_grad = ctx.has_bias and need_b
    db_grads = ctx.has_delta_bias and (need_db or need_e2)
    if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
        d = rank1_grads(grad, x, weight, r, s, dict(x=need_x, weight=need_w, delta=need_d, r=need_r, s=need_s,
                                                    u=need_u, v=need_v, e1=need_e1, bias=bias_grad,
                                                    delta_bias=db_grads and need_db, e2=db_grads and need_e2),
                        delta, u, v, e1, delta_bias, e2)
        return tuple(d.get(name) for name in ("x", "weight", "delta", "r", "s", "u", "v", "e1", "bias",
                                              "delta_bias", "e2")) + (None,)
    dx, dw, dd, dr, ds, du, dv, de1, dbias, ddb, de2 = torch.ops.hyperkern.hyper_batch_ensemble_linear_triton_backward(
        grad, x, weight, delta, r, s, u, v, e1, delta_bias, e2, delta_product, bias_grad, need_x, weight_grads,
        need_e1, db_grads)
    pick = lambda t, want: t if want else None  # noqa: E731
    return (pick(dx, need_x), pick(dw, need_w), pick(dd, need_d), pick(dr, need_r), pick(ds, need_s),
            pick(du, need_u), pick(dv, need_v), pick(de1, need_e1), pick(dbias, bias_grad),
            pick(ddb, db_grads and need_db), pick(de2, db_grads and need_e2), None)


_hyper_forward.register_autograd(_hyper_autograd, setup_context=_hyper_setup_context)


def hyper_batch_ensemble_linear(x: Tensor, weight: Tensor, delta: Tensor, r: Tensor, s: Tensor, u: Tensor, v: Tensor,
                                e1: Tensor, bias: Optional[Tensor], delta_bias: Optional[Tensor],
                                e2: Optional[Tensor]) -> Tensor:
    """y = s_k * ((x * r_k) @ weight^T) + (v_k * e1) * ((x * u_k) @ delta^T) + bias_k + delta_bias_k * e2 on
    the Triton kernels (arguments validated by hyperkern.ops.hyper_batch_ensemble_linear).
    x, e1, e2: (E*B, ...) member-major; returns (E*B, out)."""
    save_delta_product = torch.is_grad_enabled() and e1.requires_grad
    y, _ = torch.ops.hyperkern.hyper_batch_ensemble_linear_triton(x, weight, delta, r, s, u, v, e1, bias, delta_bias,
                                                                  e2, save_delta_product)
    return y


# ----------------------------------------------------------------------------------------------
# hyper-batch ensemble linear with e(lambda) = hparams @ embedding^T inside the op
# ----------------------------------------------------------------------------------------------
# e is computed INSIDE the Triton kernels (their EMBED mode, kernels/rank1_linear.py): the forward, grad
# input and grad weight kernels compute each tile's e1 / e2 from the rows' hyperparameters (E*B, m) and the
# transposed embedding (m, out or 2*out) with m outer products (_embed_tile), and the row-wise backward
# kernel reduces d(embedding) and d(hparams) from de1 = g * v_k * delta_product and de2 = g * delta_bias_k
# in registers into per-tile partials (ACC dtype) that its launcher sums. Autograd saves hparams and the
# embedding (tiny), never e1 / e2; no (E*B, out) tensor of e or de is made (the only (E*B, out) tensors
# are y and the kept Delta product). Double backward (create_graph=True) uses the differentiable
# composition (_hp_grads) instead.

@torch.library.custom_op("hyperkern::hyper_batch_ensemble_linear_hp_triton", mutates_args=())
def _hp_forward(x: Tensor, weight: Tensor, delta: Tensor, r: Tensor, s: Tensor, u: Tensor, v: Tensor, hparams: Tensor,
                embedding: Tensor, bias: Optional[Tensor], delta_bias: Optional[Tensor],
                save_delta_product: bool) -> tuple[Tensor, Tensor]:
    hp, embt = kernels.embedding_operands(hparams, embedding)
    y, delta_product = kernels.rank1_linear_forward(
        x, weight, r.contiguous(), s.contiguous(), _contig(bias), delta, u.contiguous(), v.contiguous(),
        delta_bias=_contig(delta_bias), store_delta_out=save_delta_product, hparams=hp, embedding_t=embt)
    if delta_product is None:
        delta_product = x.new_empty((0, weight.shape[0]))
    return y, delta_product


@_hp_forward.register_fake
def _(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, save_delta_product):
    rows = x.shape[0] if save_delta_product else 0
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((rows, weight.shape[0]))


@torch.library.custom_op("hyperkern::hyper_batch_ensemble_linear_hp_triton_backward", mutates_args=())
def _hp_backward(grad: Tensor, x: Tensor, weight: Tensor, delta: Tensor, r: Tensor, s: Tensor, u: Tensor, v: Tensor,
                 hparams: Tensor, embedding: Tensor, delta_bias: Optional[Tensor], delta_product: Tensor,
                 bias_grad: bool, x_grad: bool, weight_grads: bool, delta_bias_grad: bool, embedding_grad: bool,
                 hparams_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                              Tensor, Tensor]:
    r, s, u, v = r.contiguous(), s.contiguous(), u.contiguous(), v.contiguous()
    grad, x = kernels.unit_inner_stride(grad), kernels.unit_inner_stride(x)
    delta_bias = _contig(delta_bias)
    hp, embt = kernels.embedding_operands(hparams, embedding)
    e_grads = embedding_grad or hparams_grad
    dx = kernels.rank1_linear_grad_input(grad, weight, r, s, delta, u, v, hparams=hp, embedding_t=embt) \
        if x_grad else _none(x)
    if weight_grads:
        dw, dr, ds, dd, du, dv = kernels.rank1_linear_grad_weight(grad, x, weight, r, s, None, delta, u, v,
                                                                  hparams=hp, embedding_t=embt)
    else:
        dw, dr, ds, dd, du, dv = _none(weight), _none(r), _none(s), _none(delta), _none(u), _none(v)
    if e_grads and delta_product.shape[0] != x.shape[0]:  # not stored by the forward: recompute it
        delta_product = _delta_product(x, delta, u, weight.shape[0])
    dbias, ddb, demb, dhp = kernels.rank1_linear_grad_rowwise_embedded(
        grad, r.shape[0], bias_grad, hp, embt, v, delta_product if e_grads else None, delta_bias,
        delta_bias_grad, embedding_grad, hparams_grad)
    return (dx, dw, dd, dr, ds, du, dv, dhp if hparams_grad else _none(hparams),
            demb if embedding_grad else _none(embedding), dbias if bias_grad else _none(s),
            ddb if delta_bias is not None and delta_bias_grad else _none(s))


@_hp_backward.register_fake
def _(grad, x, weight, delta, r, s, u, v, hparams, embedding, delta_bias, delta_product, bias_grad, x_grad,
      weight_grads, delta_bias_grad, embedding_grad, hparams_grad):
    return (like(x, x_grad), like(weight, weight_grads), like(delta, weight_grads), like(r, weight_grads),
            like(s, weight_grads), like(u, weight_grads), like(v, weight_grads), like(hparams, hparams_grad),
            like(embedding, embedding_grad), like(s, bias_grad), like(s, delta_bias_grad and delta_bias is not None))


_HP_NAMES = ("x", "weight", "delta", "r", "s", "u", "v", "hparams", "embedding", "bias", "delta_bias")


def _hp_grads(grad, x, weight, delta, r, s, u, v, hparams, embedding, delta_bias, need: dict) -> tuple:
    """The gradients named by _HP_NAMES as differentiable torch ops (None where need says no): e recomputed,
    the e1 / e2 composition, then d(embedding) = de^T hparams and d(hparams) = de @ embedding."""
    has_e2 = delta_bias is not None
    e = F.linear(hparams, embedding)
    fout = weight.shape[0]
    e1, e2 = (e, None) if not has_e2 else (e[:, :fout], e[:, fout:])
    e_grads = need.get("hparams", False) or need.get("embedding", False)
    d = rank1_grads(grad, x, weight, r, s, dict(need, e1=e_grads, e2=e_grads and has_e2,
                                                delta_bias=has_e2 and need.get("delta_bias", False)),
                    delta, u, v, e1, delta_bias, e2)
    if e_grads:
        de = torch.cat([d["e1"], d["e2"]], 1) if has_e2 else d["e1"]
        if need.get("embedding", False):
            d["embedding"] = de.t() @ hparams
        if need.get("hparams", False):
            d["hparams"] = de @ embedding
    return tuple(d.get(name) for name in _HP_NAMES)


def _hp_backward_composite(grad, x, weight, delta, r, s, u, v, hparams, embedding, delta_bias, delta_product,
                           bias_grad, x_grad, weight_grads, delta_bias_grad, embedding_grad, hparams_grad):
    """The hp backward op's outputs as differentiable torch ops (delta_product is recomputed)."""
    return _hp_grads(grad, x, weight, delta, r, s, u, v, hparams, embedding, delta_bias,
                     dict(x=x_grad, weight=weight_grads, delta=weight_grads, r=weight_grads, s=weight_grads,
                          u=weight_grads, v=weight_grads, hparams=hparams_grad, embedding=embedding_grad,
                          bias=bias_grad, delta_bias=delta_bias_grad))


_setup, _derivative = vjp_of(_hp_backward_composite, 12)
_hp_backward.register_autograd(_derivative, setup_context=_setup)


def _hp_setup_context(ctx, inputs, output):
    x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, _save = inputs
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])
    # no zero-filled (E*B, out) gradient for the non-differentiable delta product (nor for an unused y)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, delta, r, s, u, v, hparams, embedding, delta_bias, output[1])


def _hp_autograd(ctx, grad, _grad_delta_product):
    if grad is None:  # y was not used (the grads are not materialised)
        return (None,) * 12
    x, weight, delta, r, s, u, v, hparams, embedding, delta_bias, delta_product = ctx.saved_tensors
    needs = ctx.needs_input_grad[:11]
    need = dict(zip(_HP_NAMES, needs))
    need["bias"] = ctx.has_bias and need["bias"]
    need["delta_bias"] = delta_bias is not None and need["delta_bias"]
    if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
        return _hp_grads(grad, x, weight, delta, r, s, u, v, hparams, embedding, delta_bias, need) + (None,)
    weight_grads = any(need[n] for n in ("weight", "delta", "r", "s", "u", "v"))
    out = torch.ops.hyperkern.hyper_batch_ensemble_linear_hp_triton_backward(
        grad, x, weight, delta, r, s, u, v, hparams, embedding, delta_bias, delta_product, need["bias"], need["x"],
        weight_grads, need["delta_bias"], need["embedding"], need["hparams"])
    return tuple(t if need[n] else None for n, t in zip(_HP_NAMES, out)) + (None,)


_hp_forward.register_autograd(_hp_autograd, setup_context=_hp_setup_context)


def hyper_batch_ensemble_linear_hp(x: Tensor, weight: Tensor, delta: Tensor, r: Tensor, s: Tensor, u: Tensor,
                                   v: Tensor, hparams: Tensor, embedding: Tensor, bias: Optional[Tensor],
                                   delta_bias: Optional[Tensor]) -> Tensor:
    """hyper_batch_ensemble_linear with [e1 | e2] = hparams @ embedding^T computed inside the Triton kernels
    (per tile, never as an (E*B, out) tensor; arguments validated by hyperkern.ops.hyper_batch_ensemble_linear_hp)."""
    save_delta_product = torch.is_grad_enabled() and (hparams.requires_grad or embedding.requires_grad)
    y, _ = torch.ops.hyperkern.hyper_batch_ensemble_linear_hp_triton(x, weight, delta, r, s, u, v, hparams, embedding,
                                                                     bias, delta_bias, save_delta_product)
    return y
