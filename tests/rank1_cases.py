"""Shared by the tests of the cpp conv and linear kernels: random op arguments (float64, with the
layouts of csrc/ops.cpp), autograd of an op call, and the error measure every kernel is held to."""
import torch

# max |error| / max(|reference|, 1e-3) per dtype (forward and gradients alike)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def conv_args(E, B, C, O, groups, hw, hyper, bias=True):
    """[x, weight, r, s, bias] or, hyper, [x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2]; 3x3."""
    w = rand(O, C // groups, 3, 3) / (C // groups * 9) ** 0.5
    args = [rand(E * B, C, *hw), w, 1 + 0.5 * rand(E, C), 1 + 0.5 * rand(E, O)]
    if not hyper:
        return args + [rand(E, O) if bias else None]
    return args[:2] + [torch.randn_like(w)] + args[2:] + [
        1 + 0.5 * rand(E, C), 1 + 0.5 * rand(E, O), rand(E * B, O), rand(E, O) if bias else None,
        rand(E, O) if bias else None, rand(E * B, O) if bias else None]


def linear_args(E, B, fin, fout, hyper, bias=True):
    args = [rand(E * B, fin), rand(fout, fin) / fin ** 0.5, rand(E, fin), rand(E, fout)]
    if not hyper:
        return args + [rand(E, fout) if bias else None]
    return args[:2] + [rand(fout, fin) / fin ** 0.5] + args[2:] + [
        rand(E, fin), rand(E, fout), rand(E * B, fout), rand(E, fout) if bias else None,
        rand(E, fout) if bias else None, rand(E * B, fout) if bias else None]


def output_and_grads(fn, args, grad_out):
    """fn(*args) and the gradient of <fn(*args), grad_out> for every tensor argument (None stays None)."""
    leaves = [None if a is None else a.detach().clone().requires_grad_(True) for a in args]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_out.to(device=y.device, dtype=y.dtype)))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def assert_scaled_close(actual, expected, tol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-3), f"{what}: max error {err:.3e} > {tol:.1e} * max |reference| {scale:.3e}"
