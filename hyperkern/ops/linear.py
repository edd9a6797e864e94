"""Rank-1 ensemble linear ops: the public functional API, validation and backend dispatch.

Rows are member-major: x has E*B rows, rows k*B .. (k+1)*B-1 belong to member k, E = r.shape[0].

The "torch" backend below is the plain composition. The fused backends live in
hyperkern/ops/_cpp_linear.py and hyperkern/ops/_triton_linear.py; each exposes functions with the
same positional arguments (already validated) as torch.library custom ops with fake and autograd
registrations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hyperkern._backends import implementation, kernel_first
from hyperkern.ops._validate import check_embeddings_finite, check_hparams_finite, validate_linear, validate_linear_hp

__all__ = ["batch_ensemble_linear", "hyper_batch_ensemble_linear", "hyper_batch_ensemble_linear_hp"]

def _members(t: torch.Tensor, E: int) -> torch.Tensor:
    """(E*B, D) -> (E, B, D) view (or copy for non-viewable strides)."""
    return t.reshape(E, t.shape[0] // E, t.shape[-1])


# Every reshape below names its sizes: with an empty batch (E*B = 0 rows) a -1 would be ambiguous.

def _torch_batch_ensemble_linear(x, weight, r, s, bias):
    E, (N, fin), fout = r.shape[0], x.shape, weight.shape[0]
    h = F.linear((_members(x, E) * r[:, None, :]).reshape(N, fin), weight)
    y = _members(h, E) * s[:, None, :]
    if bias is not None:
        y = y + bias[:, None, :]
    return y.reshape(N, fout)


def _torch_hyper_batch_ensemble_linear(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2):
    E, (N, fin), fout = r.shape[0], x.shape, weight.shape[0]
    xm = _members(x, E)
    h = _members(F.linear((xm * r[:, None, :]).reshape(N, fin), weight), E)
    hd = _members(F.linear((xm * u[:, None, :]).reshape(N, fin), delta), E)
    y = h * s[:, None, :] + hd * v[:, None, :] * _members(e1, E)
    if bias is not None:
        y = y + bias[:, None, :]
    if delta_bias is not None:
        y = y + delta_bias[:, None, :] * _members(e2, E)
    return y.reshape(N, fout)


def _torch_hyper_batch_ensemble_linear_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias):
    # The plain composition, exactly the layer's embed() then the e1 / e2 op: autograd keeps what the
    # composition's ops keep (e1, e2 among them); the fused backends do not.
    e = F.linear(hparams, embedding)
    fout = weight.shape[0]
    e1, e2 = (e, None) if delta_bias is None else (e[:, :fout], e[:, fout:])
    return _torch_hyper_batch_ensemble_linear(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2)


def batch_ensemble_linear(x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
                          bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """BatchEnsemble linear layer for all members at once: y = ((x * r_k) @ weight^T) * s_k + bias_k.

    Args:
        x: (E*B, in) member-major rows.
        weight: (out, in), shared slow weight (nn.Linear layout).
        r: (E, in) input fast weights; s: (E, out) output fast weights; bias: (E, out) or None.
        backend: "auto" | "torch" | "cpp" | "triton" (see hyperkern.available_backends()).
    Returns:
        (E*B, out) member-major outputs.
    """
    args = (x, weight, r, s, bias)
    # The cpp kernels check the arguments: the Python checks run only if one refuses them (kernel_first).
    y = kernel_first("linear", "batch_ensemble_linear", backend, x, _torch_batch_ensemble_linear, args)
    if y is not None:
        return y
    validate_linear(*args)
    return implementation("linear", "batch_ensemble_linear", backend, x.device, _torch_batch_ensemble_linear)(*args)


def hyper_batch_ensemble_linear(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, r: torch.Tensor,
                                s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, e1: torch.Tensor,
                                bias: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                                e2: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Hyper-batch-ensemble linear layer (Wenzel et al. 2020, eq. 7) for all members at once:

        y = s_k * ((x * r_k) @ weight^T) + (v_k * e1) * ((x * u_k) @ delta^T) + bias_k + delta_bias_k * e2

    Args:
        x: (E*B, in) member-major rows.
        weight, delta: (out, in) shared weights.
        r, u: (E, in); s, v: (E, out) fast weights.
        e1: (E*B, out) per-row embedding of each row's hyperparameters (kernel part).
        bias, delta_bias: (E, out) or None; e2: (E*B, out) per-row embedding (bias part), given with delta_bias.
        backend: "auto" | "torch" | "cpp" | "triton".
    Returns:
        (E*B, out) member-major outputs.
    """
    return _hyper_batch_ensemble_linear(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, backend, True)


def _hyper_batch_ensemble_linear(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, backend: str,
                                 check_embeddings: bool) -> torch.Tensor:
    """hyper_batch_ensemble_linear; check_embeddings=False skips the finiteness check of e1 and e2 (a
    device sync on CUDA), for callers that computed them from checked hyperparameters (the layers)."""
    args = (x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2)
    y = kernel_first("linear", "hyper_batch_ensemble_linear", backend, x, _torch_hyper_batch_ensemble_linear, args)
    if y is not None:  # the kernel accepted the shapes; the values are checked through y
        if check_embeddings:
            check_embeddings_finite(e1, e2, y)
        return y
    validate_linear(x, weight, r, s, bias, delta, u, v, e1, delta_bias, e2, hyper=True,
                    check_embeddings=check_embeddings)
    run = implementation("linear", "hyper_batch_ensemble_linear", backend, x.device, _torch_hyper_batch_ensemble_linear)
    return run(*args)


def hyper_batch_ensemble_linear_hp(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, r: torch.Tensor,
                                   s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, hparams: torch.Tensor,
                                   embedding: torch.Tensor, bias: torch.Tensor | None = None,
                                   delta_bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """hyper_batch_ensemble_linear with the hyperparameter embedding computed inside the op:

        [e1 | e2] = hparams @ embedding^T
        y = s_k * ((x * r_k) @ weight^T) + (v_k * e1) * ((x * u_k) @ delta^T) + bias_k + delta_bias_k * e2

    The (E*B, out) embeddings e1, e2 are never saved for the backward (it recomputes them from
    hparams, which is tiny); gradients flow to every tensor argument, hparams and embedding included.

    Where e is computed, per backend:
        cpp on CPU: fused in-kernel. e1, e2 are computed per row inside the forward's epilogue and
            recomputed inside the backward's pass over the output gradient, which also reduces
            d(embedding) and d(hparams) directly: no (E*B, out) tensor of e or of its gradient exists.
        triton: fused in-kernel. The forward, grad input and grad weight kernels compute each tile's
            e1, e2 from hparams and the transposed embedding (m outer products per tile; the number of
            hyperparameters m is a compile-time constant, one kernel build per m); the row-wise backward
            kernel reduces d(embedding) and d(hparams) from de1, de2 in registers into per-tile partial
            sums. No (E*B, out) tensor of e or of its gradient exists; the (E*B, out) tensors are y and
            the kept Delta product (x * u_k) @ delta^T, as on the CPU.
        cpp on CUDA: fused in-kernel for m = 1..8 hyperparameters, as on the CPU (the epilogue and the
            backward's pass over the output gradient compute e1, e2 per element from hparams and the
            transposed embedding and reduce d(embedding), d(hparams) into per-block partial sums).
            Other m: transient. The forward computes e = hparams @ embedding^T into a temporary that
            is freed when it returns; the backward recomputes it, runs the e1 / e2 op's backward kernels
            and reduces d(embedding) = de^T hparams, d(hparams) = de @ embedding. Saved for the
            backward: the same tensors as on the CPU.
        torch: the plain composition (F.linear for e, then the e1 / e2 composition); its autograd keeps
            what those ops keep, e1 and e2 included.

    Args:
        x: (E*B, in) member-major rows.
        weight, delta: (out, in) shared weights.
        r, u: (E, in); s, v: (E, out) fast weights.
        hparams: (E*B, m) per-row normalised hyperparameters (HyperParameterSpace.normalize).
        embedding: the embedding weight, nn.Linear(m, out or 2*out, bias=False).weight: (out, m) without
            delta_bias, (2*out, m) with it (rows [0, out) give e1, rows [out, 2*out) give e2).
        bias, delta_bias: (E, out) or None.
        backend: "auto" | "torch" | "cpp" | "triton".
    Returns:
        (E*B, out) member-major outputs.
    """
    return _hyper_batch_ensemble_linear_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias,
                                           backend, True)


def _hyper_batch_ensemble_linear_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, backend: str,
                                    check_hparams: bool) -> torch.Tensor:
    """hyper_batch_ensemble_linear_hp; check_hparams=False skips the finiteness check of hparams and
    embedding (a device sync on CUDA), for callers that checked them (the layers)."""
    args = (x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias)
    y = kernel_first("linear", "hyper_batch_ensemble_linear_hp", backend, x, _torch_hyper_batch_ensemble_linear_hp,
                     args)
    if y is not None:
        if check_hparams:
            check_hparams_finite(hparams, embedding)
        return y
    validate_linear_hp(*args, check_hparams)
    return implementation("linear", "hyper_batch_ensemble_linear_hp", backend, x.device,
                          _torch_hyper_batch_ensemble_linear_hp)(*args)
