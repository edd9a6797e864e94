"""The "cpp" backend of the rank-1 ensemble linear ops: torch.ops.hyperkern.* defined in C++.

The schemas live in csrc/ops.cpp, the kernels in csrc/cpu/rank1_linear.cpp (CPU) and
csrc/cuda/rank1_linear.cu (CUDA). This module adds what the compiler stack needs around them: fake
(meta) implementations, so the ops trace under torch.compile(fullgraph=True). Their autograd
(calling the C++ backward ops) is registered in C++, csrc/autograd.cpp; the backward ops' own, which
makes double backward work (a differentiable ATen composition when create_graph=True, the fused
kernel otherwise), in csrc/composite.cpp.

Rows are member-major: x is (E*B, in) and rows k*B .. (k+1)*B-1 belong to member k (E = r.shape[0]).
The functions below take arguments already validated by hyperkern.ops.linear (they may be
non-contiguous; the kernels copy what they need).

hyperkern::hyper_batch_ensemble_linear returns (y, delta_out) with delta_out = (x * u_k) @ delta^T:
the backward needs it per row (de1 = g * v_k * delta_out), so the forward keeps it instead of
recomputing a GEMM. It is an internal, non-differentiable output; the public function returns y.
"""
from __future__ import annotations

import torch

from hyperkern import _C  # noqa: F401  (importing the extension registers the ops)
from hyperkern.ops._validate import validate_linear, validate_linear_hp

__all__ = ["batch_ensemble_linear", "hyper_batch_ensemble_linear", "hyper_batch_ensemble_linear_hp"]

_ops = torch.ops.hyperkern


# _fake_checks: the fake (meta) kernels check the arguments as the CPU and CUDA kernels do. They also
# serve a call with one meta tensor among CPU ones (the dispatcher picks the Meta kernel), which
# hyperkern.ops.linear runs without its Python checks first (hyperkern._backends.kernel_first).

# ---------------------------------------------------------------------------------------------
# batch_ensemble_linear

@torch.library.register_fake("hyperkern::batch_ensemble_linear")
def _batch_ensemble_linear_fake(x, weight, r, s, bias):
    validate_linear(x, weight, r, s, bias)  # see _fake_checks
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("hyperkern::batch_ensemble_linear_backward")
def _batch_ensemble_linear_backward_fake(grad_out, x, weight, r, s, has_bias, compute_grad_x):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    grad_bias = s.new_empty(s.shape) if has_bias else s.new_empty((0,))
    return grad_x, weight.new_empty(weight.shape), r.new_empty(r.shape), s.new_empty(s.shape), grad_bias


# Autograd of hyperkern::batch_ensemble_linear is registered in C++ (csrc/autograd.cpp).


def batch_ensemble_linear(x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """y = ((x * r_k) @ weight^T) * s_k + bias_k on member-major rows; (E*B, out), via the C++ op."""
    return _ops.batch_ensemble_linear(x, weight, r, s, bias)


# ---------------------------------------------------------------------------------------------
# hyper_batch_ensemble_linear

@torch.library.register_fake("hyperkern::hyper_batch_ensemble_linear")
def _hyper_batch_ensemble_linear_fake(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2):
    validate_linear(x, weight, r, s, bias, delta, u, v, e1, delta_bias, e2, hyper=True, check_embeddings=False)
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.register_fake("hyperkern::hyper_batch_ensemble_linear_backward")
def _hyper_batch_ensemble_linear_backward_fake(grad_out, x, weight, delta, r, s, u, v, e1, delta_bias, e2,
                                               delta_out, has_bias, compute_grad_x):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    grad_bias = s.new_empty(s.shape) if has_bias else s.new_empty((0,))
    has_delta_bias = delta_bias is not None
    grad_delta_bias = s.new_empty(s.shape) if has_delta_bias else s.new_empty((0,))
    grad_e2 = e1.new_empty(e1.shape) if has_delta_bias else e1.new_empty((0,))
    return (grad_x, weight.new_empty(weight.shape), delta.new_empty(delta.shape), r.new_empty(r.shape),
            s.new_empty(s.shape), u.new_empty(u.shape), v.new_empty(v.shape), e1.new_empty(e1.shape), grad_bias,
            grad_delta_bias, grad_e2)


# Autograd of hyperkern::hyper_batch_ensemble_linear is registered in C++ (csrc/autograd.cpp): delta_out
# is non-differentiable and saved for the backward.


def hyper_batch_ensemble_linear(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, r: torch.Tensor,
                                s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, e1: torch.Tensor,
                                bias: torch.Tensor | None, delta_bias: torch.Tensor | None,
                                e2: torch.Tensor | None) -> torch.Tensor:
    """y = s_k*((x*r_k) @ weight^T) + (v_k*e1)*((x*u_k) @ delta^T) + bias_k + delta_bias_k*e2 on
    member-major rows; (E*B, out), via the C++ op."""
    y, _ = _ops.hyper_batch_ensemble_linear(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2)
    return y


# ---------------------------------------------------------------------------------------------
# hyper_batch_ensemble_linear_hp: e(lambda) = hparams @ embedding^T inside the op (fused in the CPU
# kernels, and in the CUDA ones for m = 1..8, transient there otherwise); (y, delta_out) like
# hyper_batch_ensemble_linear.

@torch.library.register_fake("hyperkern::hyper_batch_ensemble_linear_hp")
def _hyper_batch_ensemble_linear_hp_fake(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias):
    validate_linear_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, False)
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.register_fake("hyperkern::hyper_batch_ensemble_linear_hp_backward")
def _hyper_batch_ensemble_linear_hp_backward_fake(grad_out, x, weight, delta, r, s, u, v, hparams, embedding,
                                                  delta_bias, delta_out, has_bias, compute_grad_x,
                                                  compute_grad_hparams):
    grad_x = x.new_empty(x.shape) if compute_grad_x else x.new_empty((0,))
    grad_hparams = hparams.new_empty(hparams.shape) if compute_grad_hparams else hparams.new_empty((0,))
    grad_bias = s.new_empty(s.shape) if has_bias else s.new_empty((0,))
    grad_delta_bias = s.new_empty(s.shape) if delta_bias is not None else s.new_empty((0,))
    return (grad_x, weight.new_empty(weight.shape), delta.new_empty(delta.shape), r.new_empty(r.shape),
            s.new_empty(s.shape), u.new_empty(u.shape), v.new_empty(v.shape), grad_hparams,
            embedding.new_empty(embedding.shape), grad_bias, grad_delta_bias)


# Autograd of hyperkern::hyper_batch_ensemble_linear_hp is registered in C++ (csrc/autograd.cpp): it saves
# x, the parameters, hparams, embedding and delta_out, never e1 / e2.


def hyper_batch_ensemble_linear_hp(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, r: torch.Tensor,
                                   s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, hparams: torch.Tensor,
                                   embedding: torch.Tensor, bias: torch.Tensor | None,
                                   delta_bias: torch.Tensor | None) -> torch.Tensor:
    """hyper_batch_ensemble_linear with [e1 | e2] = hparams @ embedding^T computed inside the C++ op;
    (E*B, out)."""
    y, _ = _ops.hyper_batch_ensemble_linear_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias)
    return y


# The C++ ops check their arguments (csrc/rank1_linear.h): hyperkern.ops.linear runs them before its
# Python validation, which then only runs when one raises (hyperkern._backends.kernel_first).
for _fn in (batch_ensemble_linear, hyper_batch_ensemble_linear, hyper_batch_ensemble_linear_hp):
    _fn.checks_arguments = True
