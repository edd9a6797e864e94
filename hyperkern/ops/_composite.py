"""The gradients of the rank-1 ensemble ops as a composition of differentiable torch ops: what the
Triton backend's backward runs when autograd records it (create_graph=True: double backward for
gradient penalties, Hessian-vector products), and the derivative of its backward ops. A first-order
backward runs the fused kernels instead. (The cpp backend has the same composition in C++,
csrc/composite.cpp.)

One composition serves all four ops: a linear layer is a 1x1 convolution of 1x1 images. Rows are
member-major (rows k*B .. (k+1)*B-1 belong to member k); for member k, with x_r = x * r_k and
x_u = x * u_k per input channel:

    y    = s_k * conv(x_r, W) + (v_k * e1) * conv(x_u, D) + bias_k + delta_bias_k * e2
    dx   = r_k * conv_input_grad(g * s_k, W) + u_k * conv_input_grad(g * v_k * e1, D)
    dW   = conv_weight_grad(g * s_k, x_r),   dD = conv_weight_grad(g * v_k * e1, x_u)
    dr_k = sum over k's rows and pixels of x * conv_input_grad(g * s_k, W)   (du_k alike with D)
    ds_k = sum g * conv(x_r, W),  dv_k = sum g * e1 * conv(x_u, D),  de1 = sum_pixels g * v_k * conv(x_u, D)
    dbias_k = sum g,  ddelta_bias_k = sum g * e2,  de2 = delta_bias_k * sum_pixels g
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["GRAD_NAMES", "rank1_grads", "vjp_of"]

# The gradients, in the hyper ops' argument order.
GRAD_NAMES = ("x", "weight", "delta", "r", "s", "u", "v", "e1", "bias", "delta_bias", "e2")


def rank1_grads(grad, x, weight, r, s, need: dict, delta=None, u=None, v=None, e1=None, delta_bias=None, e2=None,
                stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1) -> dict:
    """{name: gradient} for the names in GRAD_NAMES that need[name] asks for (the hyper names only when
    delta is given, delta_bias / e2 only when delta_bias is). x, grad: (E*B, C[, H, W]) (2-D: the linear
    ops); weight, delta: (O, C/groups[, kh, kw]); r, u: (E, C); s, v, bias, delta_bias: (E, O); e1, e2:
    (E*B, O). Differentiable (in every input, grad included) to any order."""
    linear = x.dim() == 2
    if linear:
        grad, x, weight = grad[..., None, None], x[..., None, None], weight[..., None, None]
        delta = None if delta is None else delta[..., None, None]
    N, E = x.shape[0], r.shape[0]
    B = N // E
    want = {name: bool(need.get(name, False)) for name in GRAD_NAMES}

    def per_row(t):  # (E, C) -> (N, C)
        return t[:, None].expand(E, B, t.shape[1]).reshape(N, t.shape[1])

    def channels(t):  # (N, C) -> (N, C, 1, 1)
        return t[:, :, None, None]

    def member_sum(t):  # (N, C, H, W) -> (E, C)
        rows = t.sum((2, 3))
        return rows.reshape(E, B, rows.shape[1]).sum(1)

    def conv(inp, w):
        return F.conv2d(inp, w, None, stride, padding, dilation, groups)

    def conv_backward(g, inp, w, need_input, need_weight):
        if not (need_input or need_weight):
            return None, None
        gi, gw, _ = torch.ops.aten.convolution_backward(g, inp, w, None, list(stride), list(padding), list(dilation),
                                                        False, [0, 0], groups, [need_input, need_weight, False])
        return gi, gw

    out = {}
    R = channels(per_row(r))
    xr = x * R
    dxr, dw = conv_backward(grad * channels(per_row(s)), xr, weight, want["x"] or want["r"], want["weight"])
    if want["x"]:
        out["x"] = dxr * R
    if want["weight"]:
        out["weight"] = dw
    if want["r"]:
        out["r"] = member_sum(dxr * x)
    if want["s"]:
        out["s"] = member_sum(grad * conv(xr, weight))
    if want["bias"]:
        out["bias"] = member_sum(grad)
    if delta is not None:
        U, V, E1 = channels(per_row(u)), channels(per_row(v)), channels(e1)
        xu = x * U
        dxu, dd = conv_backward(grad * V * E1, xu, delta, want["x"] or want["u"], want["delta"])
        if want["x"]:
            out["x"] = out["x"] + dxu * U
        if want["delta"]:
            out["delta"] = dd
        if want["u"]:
            out["u"] = member_sum(dxu * x)
        if want["v"] or want["e1"]:
            hd = conv(xu, delta)
            if want["v"]:
                out["v"] = member_sum(grad * E1 * hd)
            if want["e1"]:
                out["e1"] = (grad * V * hd).sum((2, 3))
        if delta_bias is not None:
            if want["delta_bias"]:
                out["delta_bias"] = member_sum(grad * channels(e2))
            if want["e2"]:
                out["e2"] = grad.sum((2, 3)) * per_row(delta_bias)
    if linear:
        out = {k: (t.flatten(1) if k in ("x", "weight", "delta") else t) for k, t in out.items()}
    return out


def vjp_of(composite, num_tensor_args: int):
    """A register_autograd backward for a backward op computed by `composite(*tensor_args, *flags)`
    (a function of differentiable torch ops returning the op's outputs): the vector-Jacobian product
    of the composition, recorded when autograd records (create_graph=True), so to any order.

    Its setup_context saves the op's first num_tensor_args arguments (tensors or None) and keeps the
    rest as constants."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:num_tensor_args])
        ctx.flags = inputs[num_tensor_args:]

    def backward(ctx, *grad_outputs):
        create_graph = torch.is_grad_enabled()
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:num_tensor_args]
        with torch.enable_grad():
            # recorded on the saved tensors themselves when the graph is kept (higher order), on fresh
            # leaves otherwise
            ins = [t if t is None or (create_graph and t.requires_grad) else
                   t.detach().requires_grad_(bool(need) and t.is_floating_point())
                   for t, need in zip(saved, needs)]
            outs = composite(*ins, *ctx.flags)
            pairs = [(o, g) for o, g in zip(outs, grad_outputs)
                     if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
            wanted = [i for i, (t, need) in enumerate(zip(ins, needs)) if need and t is not None and t.requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], [ins[i] for i in wanted], [g for _, g in pairs],
                                        allow_unused=True, create_graph=create_graph) if pairs and wanted else ()
        result = [None] * len(ctx.needs_input_grad)
        for i, g in zip(wanted, grads):
            result[i] = g if g is not None else torch.zeros_like(saved[i])
        return tuple(result)

    return setup_context, backward
