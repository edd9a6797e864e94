"""backend="triton" of the rank-1 ensemble conv2d ops against the float64 member loop.

On a machine without a GPU these run the Triton kernels in the interpreter (TRITON_INTERPRET=1, set by
conftest.py) on tiny float32 shapes; on a GPU they run the compiled kernels. Every gradient is compared,
not only the output.
"""
import pytest
import torch

import hyperkern
from hyperkern._backends import backend_status
from hyperkern.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(backend_status(DEVICE)["triton"] is not None,
                                reason=f"triton backend unavailable: {backend_status(DEVICE)['triton']}")

# fp32 kernels vs the float64 truth; on a GPU fp32 dots may use TF32 like cuDNN's convolutions
TOL = dict(atol=2e-4, rtol=2e-4) if DEVICE == "cpu" else dict(atol=3e-2, rtol=3e-2)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _batch_args(E, B, cin, cout, hw, k, groups=1, bias=True, channels_last=False, dtype=torch.float32):
    x = _rand(E * B, cin, *hw, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kh, kw = (k, k) if isinstance(k, int) else k
    w = _rand(cout, cin // groups, kh, kw, dtype=dtype)
    r, s = _rand(E, cin, dtype=dtype), _rand(E, cout, dtype=dtype)
    b = _rand(E, cout, dtype=dtype) if bias else None
    return [x, w, r, s, b]


def _hyper_args(E, B, cin, cout, hw, k, groups=1, bias=True, delta_bias=True, channels_last=False,
                dtype=torch.float32):
    x, w, r, s, b = _batch_args(E, B, cin, cout, hw, k, groups, bias, channels_last, dtype)
    d = _rand(*w.shape, dtype=dtype)
    u, v, e1 = _rand(E, cin, dtype=dtype), _rand(E, cout, dtype=dtype), _rand(E * B, cout, dtype=dtype)
    db = _rand(E, cout, dtype=dtype) if delta_bias else None
    e2 = _rand(E * B, cout, dtype=dtype) if delta_bias else None
    return [x, w, d, r, s, u, v, e1, b, db, e2]


def _check_against_reference(op, reference, args, conv, needs=None):
    """Forward and the gradient of every tensor argument (or of those flagged in needs) vs float64."""
    present = [i for i, a in enumerate(args) if a is not None]
    needs = needs if needs is not None else [True] * len(present)
    for i, need in zip(present, needs):
        args[i].requires_grad_(need)
    args64 = [None if a is None else a.detach().double().requires_grad_(a.requires_grad) for a in args]
    y = op(*args, *conv, backend="triton")
    y64 = reference(*args64, *conv)
    torch.testing.assert_close(y.double(), y64.detach(), **TOL)
    grad = torch.randn_like(y)
    leaves = [args[i] for i, need in zip(present, needs) if need]
    grads = torch.autograd.grad(y, leaves, grad)
    grads64 = torch.autograd.grad(y64, [args64[i] for i, need in zip(present, needs) if need], grad.double())
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        scale = max(1.0, g64.abs().max().item())
        torch.testing.assert_close(g.double() / scale, g64 / scale, **TOL, msg=lambda m: f"gradient {i}: {m}")
    return y, grads


ALL = None  # every tensor argument requires a gradient
X_ONLY = [True, False, False, False, False]  # only the input-gradient kernel runs

# (E, B, cin, cout, (H, W), k, stride, padding, dilation, groups, channels_last, bias, needs)
BATCH_CASES = [
    pytest.param(2, 2, 3, 5, (5, 5), 3, 1, 1, 1, 1, False, True, ALL, id="3x3-pad1"),
    pytest.param(2, 1, 4, 6, (6, 7), 3, 2, 1, 1, 1, True, True, ALL, id="stride2-nhwc"),
    pytest.param(2, 2, 4, 6, (7, 6), 3, (2, 1), (1, 2), 2, 2, False, True, ALL, id="groups2-dilation2-asym"),
    pytest.param(1, 2, 3, 5, (5, 5), 1, 2, 0, 1, 1, True, False, ALL, id="E1-1x1-stride2-nhwc-nobias"),
    pytest.param(2, 1, 3, 4, (8, 7), (3, 2), 3, 1, 2, 1, False, True, X_ONLY, id="stride3-dilation2-x-grad-only"),
    pytest.param(2, 1, 4, 4, (5, 6), 3, 1, 1, 1, 4, True, False, ALL, id="depthwise-nhwc"),
]


@pytest.mark.parametrize("E,B,cin,cout,hw,k,stride,padding,dilation,groups,channels_last,bias,needs", BATCH_CASES)
def test_batch_ensemble_conv2d_triton_matches_member_loop(E, B, cin, cout, hw, k, stride, padding, dilation,
                                                          groups, channels_last, bias, needs):
    args = _batch_args(E, B, cin, cout, hw, k, groups, bias, channels_last)
    y, grads = _check_against_reference(hyperkern.ops.batch_ensemble_conv2d, ref.batch_ensemble_conv2d_reference,
                                        args, (stride, padding, dilation, groups), needs)
    # the output and dx keep the input's memory format, as F.conv2d does (the kernels run channels-last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout) and grads[0].is_contiguous(memory_format=layout)


NO_X = [False] + [True] * 10  # only the weight-gradient kernel (and the bias sums) run

# (E, B, cin, cout, (H, W), k, stride, padding, dilation, groups, channels_last, bias, delta_bias, needs)
HYPER_CASES = [
    pytest.param(2, 2, 3, 5, (6, 5), 3, 2, 1, 1, 1, False, True, True, ALL, id="stride2-pad1-all-terms"),
    pytest.param(2, 2, 4, 6, (7, 6), 3, (2, 1), (1, 2), 2, 2, True, False, False, ALL, id="groups2-dilation2-nhwc"),
    pytest.param(1, 2, 3, 4, (5, 4), 1, 1, 0, 1, 1, False, False, True, NO_X[:10],
                 id="E1-1x1-delta-bias-only-no-x-grad"),
]


@pytest.mark.parametrize("E,B,cin,cout,hw,k,stride,padding,dilation,groups,channels_last,bias,delta_bias,needs",
                         HYPER_CASES)
def test_hyper_batch_ensemble_conv2d_triton_matches_member_loop(E, B, cin, cout, hw, k, stride, padding, dilation,
                                                                groups, channels_last, bias, delta_bias, needs):
    args = _hyper_args(E, B, cin, cout, hw, k, groups, bias, delta_bias, channels_last)
    _check_against_reference(hyperkern.ops.hyper_batch_ensemble_conv2d, ref.hyper_batch_ensemble_conv2d_reference,
                             args, (stride, padding, dilation, groups), needs)


def test_weight_gradient_split_across_programs(monkeypatch):
    """Force the weight-gradient kernel to split each member's pixels into 7-pixel ranges that cut
    through images (4x4 outputs): the partial sums must still add up (batch: atomic reduction of
    partial G_k; hyper: per-image segments for de1 inside a program)."""
    from hyperkern.kernels import rank1_conv

    def seven_pixel_ranges(E, B, Ho, Wo, *rest):
        return 7, -(-(B * Ho * Wo) // 7)

    monkeypatch.setattr(rank1_conv, "_pixels_per_program", seven_pixel_ranges)
    conv = (1, 1, 1, 1)
    _check_against_reference(hyperkern.ops.batch_ensemble_conv2d, ref.batch_ensemble_conv2d_reference,
                             _batch_args(2, 2, 3, 4, (4, 4), 3), conv, [False] + [True] * 4)
    _check_against_reference(hyperkern.ops.hyper_batch_ensemble_conv2d, ref.hyper_batch_ensemble_conv2d_reference,
                             _hyper_args(2, 2, 3, 4, (4, 4), 3), conv, NO_X)


def test_non_contiguous_input_and_member_layout():
    """A strided view of x works, and member k's images use member k's fast weights."""
    x, w, r, s, b = _batch_args(2, 2, 3, 4, (6, 10), 3)
    x_view = x[:, :, :, ::2]  # (4, 3, 6, 5), stride 2 along W
    y = hyperkern.ops.batch_ensemble_conv2d(x_view, w, r, s, b, 1, 1, backend="triton")
    torch.testing.assert_close(y.double(), ref.batch_ensemble_conv2d_reference(x_view, w, r, s, b, 1, 1), **TOL)
    # swapping the two members' vectors must swap the two halves of the batch
    y_swapped = hyperkern.ops.batch_ensemble_conv2d(x_view[[2, 3, 0, 1]], w, r.flip(0), s.flip(0), b.flip(0), 1, 1,
                                                    backend="triton")
    torch.testing.assert_close(y_swapped, y[[2, 3, 0, 1]], atol=1e-5, rtol=1e-5)


def test_float64_matches_member_loop_tightly():
    """float64 runs the same kernels with float64 accumulators: forward and every gradient agree with
    the float64 loop to rounding."""
    tight = dict(atol=1e-10, rtol=1e-10)
    for op, reference, args in (
            (hyperkern.ops.batch_ensemble_conv2d, ref.batch_ensemble_conv2d_reference,
             _batch_args(2, 1, 2, 3, (4, 5), 3, dtype=torch.float64)),
            (hyperkern.ops.hyper_batch_ensemble_conv2d, ref.hyper_batch_ensemble_conv2d_reference,
             _hyper_args(2, 1, 2, 3, (4, 5), 3, dtype=torch.float64))):
        for a in args:
            a.requires_grad_(True)
        y = op(*args, 2, 1, backend="triton")
        y64 = reference(*args, 2, 1)
        torch.testing.assert_close(y, y64, **tight)
        grad = torch.randn_like(y)
        for g, g64 in zip(torch.autograd.grad(y, args, grad), torch.autograd.grad(y64, args, grad)):
            torch.testing.assert_close(g, g64, **tight)


def test_opcheck_custom_ops():
    """Schema, fake (meta) impl, autograd registration and AOT dispatch of the custom ops."""
    from hyperkern.ops import _triton_conv  # noqa: F401 (registers the ops)

    x, w, r, s, b = _batch_args(2, 1, 3, 4, (4, 4), 2)
    for t in (x, w, r, s, b):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_conv2d_triton.default,
                          (x, w, r, s, b, [2, 2], [1, 1], [1, 1], 1))
    args = _hyper_args(2, 1, 3, 4, (3, 3), 1, channels_last=True)
    for t in args:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_conv2d_triton.default,
                          (*args, [1, 1], [1, 1], [1, 1], 1))


def test_torch_compile_fullgraph():
    """The fake impls let torch.compile trace both ops (and their backward) without a graph break.
    (Calls the backend module directly: this tests the custom ops, not the public dispatcher.)"""
    from hyperkern.ops import _triton_conv

    x, w, r, s, b = _batch_args(2, 1, 3, 4, (4, 4), 2)
    args = _hyper_args(2, 1, 3, 4, (4, 4), 2)

    def f(x, w, r, s, b, hargs):
        y = _triton_conv.batch_ensemble_conv2d(x, w, r, s, b, (1, 1), (1, 1), (1, 1), 1)
        h = _triton_conv.hyper_batch_ensemble_conv2d(*hargs, (2, 2), (1, 1), (1, 1), 1)
        return y.sum() + h.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for t in [x, w, r, s, b] + [a for a in args if a is not None]:
        t.requires_grad_(True)
    out = compiled(x, w, r, s, b, args)
    out.backward()
    expected = f(x.detach(), w.detach(), r.detach(), s.detach(), b.detach(),
                 [None if a is None else a.detach() for a in args])
    torch.testing.assert_close(out.detach(), expected, **TOL)
    assert w.grad is not None and args[2].grad is not None and args[7].grad is not None
