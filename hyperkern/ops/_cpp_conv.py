"""The "cpp" backend of the rank-1 ensemble conv2d ops: torch.library custom ops implemented in the
compiled extension hyperkern._C (csrc/cpu/rank1_conv.cpp, csrc/cuda/rank1_conv.cu), with their fake
(meta) kernels for torch.compile registered here and their autograd in C++ (csrc/autograd.cpp).

Layout: x is (E*B, C, H, W) member-major, images k*B .. (k+1)*B-1 belong to member k, NCHW or
channels-last (outputs follow x's memory format). weight, delta: (O, C/groups, kh, kw); r, u: (E, C);
s, v, bias, delta_bias: (E, O); e1, e2: (E*B, O), one row per image. Arguments arrive validated by
hyperkern.ops.conv (stride, padding, dilation as int pairs).

Double backward: the backward ops' Autograd kernels (csrc/composite.cpp) run the fused kernels for a
first-order backward and a differentiable ATen composition when create_graph=True.
"""
from __future__ import annotations

import os

import torch
from torch._prims_common import suggest_memory_format

from hyperkern import _C  # noqa: F401  (registers the torch.ops.hyperkern schemas and kernels)
from hyperkern.ops._validate import validate_conv2d, validate_conv2d_hp

__all__ = ["batch_ensemble_conv2d", "hyper_batch_ensemble_conv2d", "hyper_batch_ensemble_conv2d_hp"]

_ops = torch.ops.hyperkern


def _output_hw(x, weight, stride, padding, dilation):
    return tuple((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def _activation(x, channels, hw):
    """An empty (E*B, channels, *hw) tensor in x's memory format, as the kernels allocate it."""
    return torch.empty((x.shape[0], channels, *hw), dtype=x.dtype, device=x.device,
                       memory_format=suggest_memory_format(x))


def _empty(x):
    return x.new_empty((0,))


def cpu_scheme() -> str:
    """HYPERKERN_CPU_CONV as csrc/cpu/rank1_conv.cpp reads it: "auto" (unset), "member" or "one_conv"."""
    setting = os.environ.get("HYPERKERN_CPU_CONV") or "auto"
    if setting not in ("auto", "member", "one_conv"):
        raise RuntimeError(f"HYPERKERN_CPU_CONV must be auto, member or one_conv, got '{setting}'")
    return setting


# csrc/cpu/rank1_conv.cpp's kOneConvMaxMemberOutput (the measurements behind it are there)
ONE_CONV_MAX_MEMBER_OUTPUT = 32768


def cpu_uses_one_conv(x, r, weight, hw) -> bool:
    """Whether the CPU kernels run the one-convolution scheme for this op: csrc/cpu/rank1_conv.cpp's
    uses_one_conv (each member's output B * O * Ho * Wo below ONE_CONV_MAX_MEMBER_OUTPUT elements, unless
    HYPERKERN_CPU_CONV forces a scheme), mirrored here for the fake kernels: that scheme's train ops keep
    activations for the backward."""
    setting = cpu_scheme()
    if setting != "auto":
        return setting == "one_conv"
    B = x.shape[0] // r.shape[0]
    return B * weight.shape[0] * hw[0] * hw[1] < ONE_CONV_MAX_MEMBER_OUTPUT


def _one_conv_on(x, r, weight, hw) -> bool:
    """Whether the kernel for x's device runs the one-convolution scheme (CUDA always; CPU by its rule)."""
    return x.device.type == "cuda" or cpu_uses_one_conv(x, r, weight, hw)


def _kept(x, y, one_conv):
    """An activation a train op keeps for its backward: the one-convolution scheme keeps one like y (CUDA,
    and the CPU where it runs it), the CPU's per-member scheme none."""
    return torch.empty_like(y) if one_conv else _empty(x)


# _fake_checks: the fake (meta) kernels check the arguments as the CPU and CUDA kernels do. They also
# serve a call with one meta tensor among CPU ones (the dispatcher picks the Meta kernel), which
# hyperkern.ops.conv runs without its Python checks first (hyperkern._backends.kernel_first).

# ---- batch_ensemble_conv2d ------------------------------------------------------------------------

@torch.library.register_fake("hyperkern::batch_ensemble_conv2d")
def _batch_ensemble_conv2d_fake(x, weight, r, s, bias, stride, padding, dilation, groups):
    validate_conv2d(x, weight, r, s, bias, stride, padding, dilation, groups)  # see _fake_checks
    return _activation(x, weight.shape[0], _output_hw(x, weight, stride, padding, dilation))


def _fake_grads(x, output_mask, shapes):
    """Fake gradients of a backward op: empty where output_mask is false, grad_x (shape None) in x's
    memory format, the rest with the given shapes."""
    out = []
    for need, shape in zip(output_mask, shapes):
        if not need:
            out.append(_empty(x))
        elif shape is None:
            out.append(torch.empty_like(x, memory_format=suggest_memory_format(x)))
        else:
            out.append(x.new_empty(shape))
    return tuple(out)


@torch.library.register_fake("hyperkern::batch_ensemble_conv2d_train")
def _batch_ensemble_conv2d_train_fake(x, weight, r, s, bias, stride, padding, dilation, groups):
    """(y, pre): the one-convolution scheme keeps pre = conv(x * r_k, weight) for its backward, the CPU's
    per-member scheme nothing."""
    y = _batch_ensemble_conv2d_fake(x, weight, r, s, bias, stride, padding, dilation, groups)
    return y, _kept(x, y, _one_conv_on(x, r, weight, y.shape[2:]))


@torch.library.register_fake("hyperkern::batch_ensemble_conv2d_backward")
def _batch_ensemble_conv2d_backward_fake(grad_y, x, weight, r, s, stride, padding, dilation, groups, output_mask,
                                         pre=None):
    E, O = s.shape
    return _fake_grads(x, output_mask, (None, weight.shape, r.shape, (E, O), (E, O)))


# Autograd: csrc/autograd.cpp (the train op's pre is saved for the backward).


# ---- hyper_batch_ensemble_conv2d ------------------------------------------------------------------

@torch.library.register_fake("hyperkern::hyper_batch_ensemble_conv2d")
def _hyper_batch_ensemble_conv2d_fake(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding,
                                      dilation, groups, save_hd):
    validate_conv2d(x, weight, r, s, bias, stride, padding, dilation, groups, delta, u, v, e1, delta_bias, e2,
                    hyper=True, check_embeddings=False)
    return _hyper_outputs(x, weight, stride, padding, dilation, save_hd)


def _hyper_outputs(x, weight, stride, padding, dilation, save_hd):
    """The hyper conv ops' (y, hd): hd only when save_hd."""
    hw = _output_hw(x, weight, stride, padding, dilation)
    y = _activation(x, weight.shape[0], hw)
    return y, (_activation(x, weight.shape[0], hw) if save_hd else _empty(x))


@torch.library.register_fake("hyperkern::hyper_batch_ensemble_conv2d_train")
def _hyper_batch_ensemble_conv2d_train_fake(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding,
                                            dilation, groups, save_hd):
    """(y, hd, h, hr): the one-convolution scheme (CUDA, and the CPU where it runs it) keeps the branches h and
    hr, the CPU's per-member scheme hd (when save_hd)."""
    validate_conv2d(x, weight, r, s, bias, stride, padding, dilation, groups, delta, u, v, e1, delta_bias, e2,
                    hyper=True, check_embeddings=False)
    return _hyper_train_outputs(x, weight, r, stride, padding, dilation, save_hd)


def _hyper_train_outputs(x, weight, r, stride, padding, dilation, save_hd):
    """The hyper conv train ops' (y, hd, h, hr)."""
    one_conv = _one_conv_on(x, r, weight, _output_hw(x, weight, stride, padding, dilation))
    y, hd = _hyper_outputs(x, weight, stride, padding, dilation, save_hd and not one_conv)
    return y, hd, _kept(x, y, one_conv), _kept(x, y, one_conv)


@torch.library.register_fake("hyperkern::hyper_batch_ensemble_conv2d_backward")
def _hyper_batch_ensemble_conv2d_backward_fake(grad_y, x, weight, delta, r, s, u, v, e1, delta_bias, e2, hd, stride,
                                               padding, dilation, groups, output_mask, h=None, hr=None):
    E, O = s.shape
    shapes = (None, weight.shape, weight.shape, r.shape, (E, O), r.shape, (E, O), e1.shape, (E, O), (E, O), e1.shape)
    mask = list(output_mask[:9]) + [need and delta_bias is not None for need in output_mask[9:]]
    return _fake_grads(x, mask, shapes)


# Autograd: csrc/autograd.cpp (hd is non-differentiable; the train op's outputs are saved for the backward).


# ---- hyper_batch_ensemble_conv2d_hp: (hparams, embedding) in place of (e1, e2) -------------------------

@torch.library.register_fake("hyperkern::hyper_batch_ensemble_conv2d_hp")
def _hyper_batch_ensemble_conv2d_hp_fake(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride,
                                         padding, dilation, groups, save_hd):
    validate_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride, padding, dilation,
                       groups, False)
    return _hyper_outputs(x, weight, stride, padding, dilation, save_hd)


@torch.library.register_fake("hyperkern::hyper_batch_ensemble_conv2d_hp_train")
def _hyper_batch_ensemble_conv2d_hp_train_fake(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias,
                                               stride, padding, dilation, groups, save_hd):
    validate_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride, padding, dilation,
                       groups, False)
    return _hyper_train_outputs(x, weight, r, stride, padding, dilation, save_hd)


@torch.library.register_fake("hyperkern::hyper_batch_ensemble_conv2d_hp_backward")
def _hyper_batch_ensemble_conv2d_hp_backward_fake(grad_y, x, weight, delta, r, s, u, v, hparams, embedding,
                                                  delta_bias, hd, stride, padding, dilation, groups, output_mask,
                                                  h=None, hr=None):
    E, O = s.shape
    shapes = (None, weight.shape, weight.shape, r.shape, (E, O), r.shape, (E, O), hparams.shape, embedding.shape,
              (E, O), (E, O))
    mask = list(output_mask[:10]) + [output_mask[10] and delta_bias is not None]
    return _fake_grads(x, mask, shapes)


# ---- entry points used by hyperkern.ops.conv (arguments validated there) ------------------------------

def batch_ensemble_conv2d(x, weight, r, s, bias, stride, padding, dilation, groups):
    """y = conv2d(x * r_k, weight) * s_k + bias_k per member k (member-major rows); see hyperkern.ops."""
    return _ops.batch_ensemble_conv2d(x, weight, r, s, bias, list(stride), list(padding), list(dilation), groups)


def hyper_batch_ensemble_conv2d(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation,
                                groups):
    """y = s_k * conv(x * r_k, W) + (v_k * e1) * conv(x * u_k, delta) + bias_k + delta_bias_k * e2 (member-major).

    On the CPU, hd = conv(x * u_k, delta) * v_k is kept for the backward only when de1 will be needed (e1
    requires grad with grad mode on): it costs one output-sized tensor and saves re-running that
    convolution. On CUDA the backward reads both branches' convolutions, kept whenever a gradient is taken.
    """
    save_hd = torch.is_grad_enabled() and e1.requires_grad
    y, _ = _ops.hyper_batch_ensemble_conv2d(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, list(stride),
                                            list(padding), list(dilation), groups, save_hd)
    return y


def hyper_batch_ensemble_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride, padding,
                                   dilation, groups):
    """hyper_batch_ensemble_conv2d with [e1 | e2] = hparams @ embedding^T computed inside the op (transient
    buffers, no operator call of their own); hd kept on the CPU as for the e1 op when hparams or embedding
    will need a gradient."""
    save_hd = torch.is_grad_enabled() and (hparams.requires_grad or embedding.requires_grad)
    y, _ = _ops.hyper_batch_ensemble_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias,
                                               list(stride), list(padding), list(dilation), groups, save_hd)
    return y


# The C++ ops check their arguments (csrc/rank1_conv.h): hyperkern.ops.conv runs them before its Python
# validation, which then only runs when one raises (hyperkern._backends.kernel_first).
for _fn in (batch_ensemble_conv2d, hyper_batch_ensemble_conv2d, hyper_batch_ensemble_conv2d_hp):
    _fn.checks_arguments = True
