"""The "cpp" backend of the rank-1 linear ops (csrc/cpu/rank1_linear.cpp) against the float64 member loop.

Rows are member-major (rows k*B .. (k+1)*B-1 belong to member k). Every test here compares with
hyperkern.ops.reference, gradcheck, or opcheck; none times anything.
"""
import pytest
import torch

import hyperkern
from hyperkern.ops import reference as ref

_CPP_REASON = hyperkern.backend_status("cpu")["cpp"]
pytestmark = pytest.mark.skipif(_CPP_REASON is not None, reason=f"cpp backend unavailable: {_CPP_REASON}")

if _CPP_REASON is None:
    from hyperkern.ops import _cpp_linear

# max |error| / max |reference| allowed per dtype (forward and gradients alike).
TOLERANCE = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2.5e-3}

BE_NAMES = ("x", "weight", "r", "s", "bias")
HYPER_NAMES = ("x", "weight", "delta", "r", "s", "u", "v", "e1", "bias", "delta_bias", "e2")


def _be_args(E, B, fin, fout, bias=True, dtype=torch.float64):
    f = lambda *shape: torch.randn(*shape, dtype=torch.float64).to(dtype)  # noqa: E731
    return [f(E * B, fin), f(fout, fin), f(E, fin), f(E, fout), f(E, fout) if bias else None]


def _hyper_args(E, B, fin, fout, bias=True, delta_bias=True, dtype=torch.float64):
    f = lambda *shape: torch.randn(*shape, dtype=torch.float64).to(dtype)  # noqa: E731
    return [f(E * B, fin), f(fout, fin), f(fout, fin), f(E, fin), f(E, fout), f(E, fin), f(E, fout), f(E * B, fout),
            f(E, fout) if bias else None, f(E, fout) if delta_bias else None, f(E * B, fout) if delta_bias else None]


def _grads(fn, args, grad_out, backend=None):
    """Output and gradients of every tensor argument (None stays None)."""
    leaves = [None if a is None else a.detach().clone().requires_grad_(True) for a in args]
    y = fn(*leaves) if backend is None else fn(*leaves, backend=backend)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_out.to(y.dtype)))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def _assert_scaled_close(actual, expected, tol, what):
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-3), f"{what}: max error {err:.3e} > {tol:.1e} * max |reference| {scale:.3e}"


def _check_against_reference(op, reference, args, names, dtype):
    tol = TOLERANCE[dtype]
    y0 = reference(*args)
    grad_out = torch.randn(y0.shape, dtype=torch.float64).to(dtype)
    y_ref, g_ref = _grads(reference, args, grad_out)
    y, g = _grads(op, args, grad_out, backend="cpp")
    assert y.dtype == dtype and y.is_contiguous()
    _assert_scaled_close(y, y_ref, tol, "output")
    for name, a, b in zip(names, g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == dtype, f"grad {name} has dtype {a.dtype}"
            _assert_scaled_close(a, b, tol, f"grad {name}")


SHAPES = [
    (1, 1, 3, 5),      # E=1, B=1
    (4, 3, 17, 9),     # widths not multiples of 16
    (7, 2, 16, 33),    # E=7
    (2, 40, 8, 6),     # B large against the weight: the weight-scaling forward
    (3, 70, 40, 600),  # several row and column chunks in the member passes, several weight-pass blocks
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("E,B,fin,fout", SHAPES)
def test_batch_ensemble_linear_matches_member_loop(E, B, fin, fout, dtype):
    args = _be_args(E, B, fin, fout, dtype=dtype)
    _check_against_reference(hyperkern.ops.batch_ensemble_linear, ref.batch_ensemble_linear_reference, args,
                             BE_NAMES, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("E,B,fin,fout", [(1, 1, 3, 5), (4, 3, 17, 9), (7, 2, 16, 33), (2, 30, 24, 20)])
def test_hyper_batch_ensemble_linear_matches_member_loop(E, B, fin, fout, dtype):
    args = _hyper_args(E, B, fin, fout, dtype=dtype)
    _check_against_reference(hyperkern.ops.hyper_batch_ensemble_linear, ref.hyper_batch_ensemble_linear_reference,
                             args, HYPER_NAMES, dtype)


@pytest.mark.parametrize("E,B,fin,fout", [(4, 3, 17, 9), (2, 40, 8, 6)])
def test_batch_ensemble_linear_without_bias(E, B, fin, fout):
    args = _be_args(E, B, fin, fout, bias=False)
    _check_against_reference(hyperkern.ops.batch_ensemble_linear, ref.batch_ensemble_linear_reference, args,
                             BE_NAMES, torch.float64)


@pytest.mark.parametrize("bias,delta_bias", [(False, False), (True, False), (False, True)])
def test_hyper_batch_ensemble_linear_optional_terms(bias, delta_bias):
    args = _hyper_args(3, 4, 10, 7, bias=bias, delta_bias=delta_bias)
    _check_against_reference(hyperkern.ops.hyper_batch_ensemble_linear, ref.hyper_batch_ensemble_linear_reference,
                             args, HYPER_NAMES, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_large_gemm_outputs_start_from_zero(dtype):
    """Every GEMM output here has >= 2**16 elements (y, delta_out, dx, the Delta side, dDelta, G_k), so the
    CPU kernels memset it and let the GEMM accumulate into it (beta = 1). A first call with inputs a million
    times larger leaves its values in the reused buffers; the second call must not see them."""
    E, B, fin, fout = 2, 128, 256, 256
    for op, reference, make, names in ((hyperkern.ops.batch_ensemble_linear, ref.batch_ensemble_linear_reference,
                                        _be_args, BE_NAMES),
                                       (hyperkern.ops.hyper_batch_ensemble_linear,
                                        ref.hyper_batch_ensemble_linear_reference, _hyper_args, HYPER_NAMES)):
        big = [None if a is None else a * 1e6 for a in make(E, B, fin, fout, dtype=dtype)]
        _grads(op, big, torch.randn(E * B, fout, dtype=dtype) * 1e6, backend="cpp")
        _check_against_reference(op, reference, make(E, B, fin, fout, dtype=dtype), names, dtype)


def test_workspace_reuse_across_shapes_dtypes_and_setting(monkeypatch):
    """The per-thread scratch workspace: calls that grow, shrink and change the dtype of the cached
    buffers give the reference results, bit-identical with the workspace off; earlier outputs are
    never overwritten by later calls (nothing returned lives in the workspace)."""
    torch.manual_seed(0)
    calls = [(4, 3, 17, 9, torch.float64), (3, 70, 40, 600, torch.float32), (2, 30, 24, 20, torch.float64),
             (3, 70, 40, 600, torch.bfloat16), (4, 3, 17, 9, torch.float32)]
    kept = []
    for E, B, fin, fout, dtype in calls:
        for op, reference, make, names in ((hyperkern.ops.batch_ensemble_linear, ref.batch_ensemble_linear_reference,
                                            _be_args, BE_NAMES),
                                           (hyperkern.ops.hyper_batch_ensemble_linear,
                                            ref.hyper_batch_ensemble_linear_reference, _hyper_args, HYPER_NAMES)):
            args = make(E, B, fin, fout, dtype=dtype)
            grad_out = torch.randn(E * B, fout, dtype=dtype)
            monkeypatch.setenv("HYPERKERN_CPU_WORKSPACE", "1")
            y_on, g_on = _grads(op, args, grad_out, backend="cpp")
            monkeypatch.setenv("HYPERKERN_CPU_WORKSPACE", "0")
            y_off, g_off = _grads(op, args, grad_out, backend="cpp")
            assert torch.equal(y_on, y_off)
            for name, a, b in zip(names, g_on, g_off):
                assert (a is None and b is None) or torch.equal(a, b), name
            _check_against_reference(op, reference, args, names, dtype)
            kept.append((y_on, y_on.clone(), g_on, [None if t is None else t.clone() for t in g_on]))
    for y, y_copy, grads, grad_copies in kept:
        assert torch.equal(y, y_copy)
        for a, b in zip(grads, grad_copies):
            assert (a is None and b is None) or torch.equal(a, b)
    monkeypatch.setenv("HYPERKERN_CPU_WORKSPACE", "yes")
    with pytest.raises(RuntimeError, match="HYPERKERN_CPU_WORKSPACE must be 0 .off. or 1"):
        hyperkern.ops.batch_ensemble_linear(*_be_args(2, 3, 4, 5, dtype=torch.float32), backend="cpp")


def test_member_major_rows_use_their_own_member():
    # Changing member 1's fast weights may change only member 1's rows.
    x, w, r, s, b = _be_args(3, 4, 6, 5)
    y = hyperkern.ops.batch_ensemble_linear(x, w, r, s, b, backend="cpp")
    r2, s2, b2 = r.clone(), s.clone(), b.clone()
    r2[1] += 1.0
    s2[1] *= 2.0
    b2[1] -= 3.0
    y2 = hyperkern.ops.batch_ensemble_linear(x, w, r2, s2, b2, backend="cpp")
    torch.testing.assert_close(y2[:4], y[:4], rtol=0, atol=0)
    torch.testing.assert_close(y2[8:], y[8:], rtol=0, atol=0)
    assert not torch.allclose(y2[4:8], y[4:8])


def _non_contiguous(t):
    """Same values, non-contiguous storage: a transposed copy viewed back, or a strided slice."""
    if t is None:
        return None
    if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1:
        view = t.t().contiguous().t()
    else:
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        view = wide[:, ::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def test_non_contiguous_inputs_batch_ensemble():
    args = _be_args(3, 5, 12, 7)
    y, g = _grads(hyperkern.ops.batch_ensemble_linear, args, torch.ones(15, 7), backend="cpp")
    nc = [_non_contiguous(a) for a in args]
    y_nc, g_nc = _grads(hyperkern.ops.batch_ensemble_linear, nc, _non_contiguous(torch.ones(15, 7)), backend="cpp")
    torch.testing.assert_close(y_nc, y)
    for a, b in zip(g_nc, g):
        torch.testing.assert_close(a, b)
    # Row slices of a bigger batch are views with an offset.
    big = torch.randn(40, 12, dtype=torch.float64)
    sliced = big[10:25]
    torch.testing.assert_close(hyperkern.ops.batch_ensemble_linear(sliced, *args[1:], backend="cpp"),
                               ref.batch_ensemble_linear_reference(sliced, *args[1:]))


def test_non_contiguous_inputs_hyper():
    args = _hyper_args(2, 3, 9, 6)
    grad_out = torch.randn(6, 6, dtype=torch.float64)
    y, g = _grads(hyperkern.ops.hyper_batch_ensemble_linear, args, grad_out, backend="cpp")
    nc = [_non_contiguous(a) for a in args]
    y_nc, g_nc = _grads(hyperkern.ops.hyper_batch_ensemble_linear, nc, _non_contiguous(grad_out), backend="cpp")
    torch.testing.assert_close(y_nc, y)
    for a, b in zip(g_nc, g):
        torch.testing.assert_close(a, b)


def test_input_without_grad_skips_grad_x():
    # A first layer: x needs no gradient; the other gradients must not change.
    args = _be_args(2, 3, 5, 4)
    leaves = [a.clone().requires_grad_(i != 0) for i, a in enumerate(args)]
    y = hyperkern.ops.batch_ensemble_linear(*leaves, backend="cpp")
    grads = torch.autograd.grad(y.sum(), leaves[1:])
    ref_leaves = [a.clone().requires_grad_(True) for a in args]
    ref_grads = torch.autograd.grad(ref.batch_ensemble_linear_reference(*ref_leaves).sum(), ref_leaves[1:])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)

    hargs = _hyper_args(2, 3, 5, 4)
    leaves = [a.clone().requires_grad_(i != 0) for i, a in enumerate(hargs)]
    y = hyperkern.ops.hyper_batch_ensemble_linear(*leaves, backend="cpp")
    grads = torch.autograd.grad(y.sum(), leaves[1:])
    ref_leaves = [a.clone().requires_grad_(True) for a in hargs]
    ref_grads = torch.autograd.grad(ref.hyper_batch_ensemble_linear_reference(*ref_leaves).sum(), ref_leaves[1:])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64():
    be = [a.requires_grad_(True) for a in _be_args(3, 2, 5, 4)]
    assert torch.autograd.gradcheck(lambda *a: hyperkern.ops.batch_ensemble_linear(*a, backend="cpp"), be)
    hy = [a.requires_grad_(True) for a in _hyper_args(2, 2, 4, 3)]
    assert torch.autograd.gradcheck(lambda *a: hyperkern.ops.hyper_batch_ensemble_linear(*a, backend="cpp"), hy)
    hy_plain = [None if a is None else a.requires_grad_(True) for a in _hyper_args(2, 2, 4, 3, False, False)]
    assert torch.autograd.gradcheck(lambda *a: hyperkern.ops.hyper_batch_ensemble_linear(*a, backend="cpp"),
                                    hy_plain)


def _requires_grad(args):
    return [None if a is None else a.clone().requires_grad_(True) for a in args]


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_batch_ensemble_linear(bias):
    args = _requires_grad(_be_args(3, 2, 5, 4, bias=bias, dtype=torch.float32))
    torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_linear.default, tuple(args))
    x, w, r, s, _ = [None if a is None else a.detach() for a in args]
    g = torch.randn(6, 4)
    for compute_grad_x in (True, False):
        torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_linear_backward.default,
                              (g, x, w, r, s, bias, compute_grad_x))


@pytest.mark.parametrize("bias,delta_bias", [(True, True), (False, False)])
def test_opcheck_hyper_batch_ensemble_linear(bias, delta_bias):
    args = _requires_grad(_hyper_args(2, 3, 5, 4, bias=bias, delta_bias=delta_bias, dtype=torch.float32))
    torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_linear.default, tuple(args))
    x, w, d, r, s, u, v, e1, _, db, e2 = [None if a is None else a.detach() for a in args]
    _, delta_out = torch.ops.hyperkern.hyper_batch_ensemble_linear(x, w, d, r, s, u, v, e1, None, db, e2)
    g = torch.randn(6, 4)
    for compute_grad_x in (True, False):
        torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_linear_backward.default,
                              (g, x, w, d, r, s, u, v, e1, db, e2, delta_out, bias, compute_grad_x))


def _compiled_matches_eager(fn, args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    grad_out = torch.randn(args[0].shape[0], args[1].shape[0], dtype=args[0].dtype)
    y_c, g_c = _grads(compiled, args, grad_out)
    y_e, g_e = _grads(fn, args, grad_out)
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(g_c, g_e):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_forward_backward():
    _compiled_matches_eager(_cpp_linear.batch_ensemble_linear, _be_args(3, 2, 6, 5, dtype=torch.float32))
    _compiled_matches_eager(_cpp_linear.hyper_batch_ensemble_linear, _hyper_args(3, 2, 6, 5, dtype=torch.float32))


def test_torch_compile_fullgraph_through_public_api():
    _compiled_matches_eager(lambda *a: hyperkern.ops.batch_ensemble_linear(*a, backend="cpp"),
                            _be_args(3, 2, 6, 5, dtype=torch.float32))
    _compiled_matches_eager(lambda *a: hyperkern.ops.hyper_batch_ensemble_linear(*a, backend="cpp"),
                            _hyper_args(3, 2, 6, 5, dtype=torch.float32))


def test_empty_batch():
    x, w, r, s, b = _be_args(2, 1, 4, 3)
    y = hyperkern.ops.batch_ensemble_linear(x[:0], w, r, s, b, backend="cpp")
    assert y.shape == (0, 3)


def test_direct_op_call_with_bad_shapes_raises():
    # hyperkern.ops validates with readable errors; a direct torch.ops call must still fail cleanly.
    x, w, r, s, b = _be_args(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="divisible by the ensemble size"):
        torch.ops.hyperkern.batch_ensemble_linear(x[:5], w, r, s, b)
    with pytest.raises(RuntimeError, match=r"r must have shape \(2, 4\)"):
        torch.ops.hyperkern.batch_ensemble_linear(x, w, r[:, :3], s, b)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.hyperkern.batch_ensemble_linear(x, w, r, s, b[:1])
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.hyperkern.batch_ensemble_linear(x, w.float(), r, s, b)
    hx = _hyper_args(2, 3, 4, 5)
    bad_e1 = list(hx)
    bad_e1[7] = hx[7][:5]
    with pytest.raises(RuntimeError, match="e1 must have shape"):
        torch.ops.hyperkern.hyper_batch_ensemble_linear(*bad_e1)


def test_public_api_rejects_bad_input_before_the_kernel():
    x, w, r, s, b = _be_args(4, 2, 8, 5)
    with pytest.raises(ValueError, match="divisible by the ensemble size"):
        hyperkern.ops.batch_ensemble_linear(x[:7], w, r, s, b, backend="cpp")
    with pytest.raises(ValueError, match=r"^r must have shape \(4, 8\)"):
        hyperkern.ops.batch_ensemble_linear(x, w, r[:, :7], s, b, backend="cpp")
    hx = _hyper_args(2, 2, 3, 4)
    hx[7] = hx[7].clone()
    hx[7][0, 0] = float("nan")
    with pytest.raises(ValueError, match="e1 contains NaN"):
        hyperkern.ops.hyper_batch_ensemble_linear(*hx, backend="cpp")
