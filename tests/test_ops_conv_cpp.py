"""The "cpp" backend of the rank-1 ensemble conv2d ops (hyperkern._C, CPU kernels) against the float64
member loop in hyperkern.ops.reference: forward and every gradient, fp64 / fp32 / bf16, NCHW and
channels-last, stride / padding / dilation / groups, gradcheck, opcheck and torch.compile."""
import contextlib

import pytest
import torch

import hyperkern
from hyperkern._backends import backend_status
from hyperkern.ops import reference as ref

_REASON = backend_status("cpu")["cpp"]
if _REASON is None:  # registers the ops' fake kernels and autograd formulas (hyperkern.ops imports it lazily)
    from hyperkern.ops import _cpp_conv

pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpp backend unavailable: {_REASON}")

CL = torch.channels_last
# The CPU kernels' two schemes (csrc/cpu/rank1_conv.cpp): one convolution per member with folded weights,
# and the one-convolution scheme of csrc/one_conv.h with the CPU scaling pass; "auto" picks by shape.
SCHEMES = ["member", "one_conv"]


@pytest.fixture(params=SCHEMES)
def scheme(request, monkeypatch):
    monkeypatch.setenv("HYPERKERN_CPU_CONV", request.param)
    return request.param


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _be_args(E, B, C, O, groups=1, hw=(7, 8), k=3, bias=True, dtype=torch.float64, channels_last=False):
    x = torch.randn(E * B, C, *hw, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    w = torch.randn(O, C // groups, k, k, dtype=dtype) / (C // groups * k * k) ** 0.5
    r = 1 + 0.5 * torch.randn(E, C, dtype=dtype)
    s = 1 + 0.5 * torch.randn(E, O, dtype=dtype)
    b = torch.randn(E, O, dtype=dtype) if bias else None
    return [x, w, r, s, b]


def _hyper_args(E, B, C, O, groups=1, hw=(7, 8), bias=True, delta_bias=True, dtype=torch.float64,
                channels_last=False):
    x, w, r, s, b = _be_args(E, B, C, O, groups, hw, bias=bias, dtype=dtype, channels_last=channels_last)
    d = torch.randn_like(w)
    u = 1 + 0.5 * torch.randn(E, C, dtype=dtype)
    v = 1 + 0.5 * torch.randn(E, O, dtype=dtype)
    e1 = torch.randn(E * B, O, dtype=dtype)
    db = torch.randn(E, O, dtype=dtype) if delta_bias else None
    e2 = torch.randn(E * B, O, dtype=dtype) if delta_bias else None
    return [x, w, d, r, s, u, v, e1, b, db, e2]


def _grads(y, inputs, g):
    need = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, need, g)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def _check_against_reference(op, ref_op, args, geo, atol, rtol, channels_last=False):
    """Forward and every gradient of the cpp op vs the float64 member loop (atol relative to each
    tensor's largest entry + 1)."""
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in args]
    y = op(*inputs, *geo, backend="cpp")
    assert y.dtype == args[0].dtype
    if channels_last:
        assert y.is_contiguous(memory_format=CL)
    else:
        assert y.is_contiguous()
    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in args]
    y_ref = ref_op(*ref_inputs, *geo)
    torch.testing.assert_close(y.double(), y_ref, atol=atol * (y_ref.abs().max().item() + 1), rtol=rtol)
    g = torch.randn_like(y_ref)
    got = _grads(y, inputs, g.to(y.dtype))
    want = _grads(y_ref, ref_inputs, g)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None
            continue
        scale = b.abs().max().item() + 1
        torch.testing.assert_close(a.double(), b, atol=atol * scale, rtol=rtol, msg=lambda m: f"input {i}: {m}")
    if channels_last:
        assert got[0].is_contiguous(memory_format=CL)


# (E, B, C, O, groups, stride, padding, dilation, hw)
CASES = [
    (3, 2, 4, 6, 1, 1, 1, 1, (7, 8)),
    (1, 1, 3, 5, 1, 1, 0, 1, (5, 5)),  # E = 1, B = 1
    (7, 2, 4, 4, 1, 1, 1, 1, (6, 6)),  # E = 7: not a multiple of the thread count
    (2, 3, 4, 6, 2, 2, 0, 1, (7, 8)),  # groups, stride
    (4, 1, 6, 6, 3, (2, 1), (1, 2), (2, 1), (9, 8)),  # B = 1, asymmetric everything
    (2, 2, 4, 8, 4, 1, 2, 2, (6, 7)),  # depthwise-like groups == C, dilation
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("E,B,C,O,groups,stride,padding,dilation,hw", CASES)
def test_batch_ensemble_conv2d_fp64_matches_member_loop(E, B, C, O, groups, stride, padding, dilation, hw,
                                                        channels_last, bias, scheme):
    args = _be_args(E, B, C, O, groups, hw, bias=bias, channels_last=channels_last)
    _check_against_reference(hyperkern.ops.batch_ensemble_conv2d, ref.batch_ensemble_conv2d_reference, args,
                             (stride, padding, dilation, groups), 1e-10, 1e-10, channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias,delta_bias", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("E,B,C,O,groups,stride,padding,dilation,hw", CASES[:5])
def test_hyper_batch_ensemble_conv2d_fp64_matches_member_loop(E, B, C, O, groups, stride, padding, dilation, hw,
                                                              bias, delta_bias, channels_last, scheme):
    args = _hyper_args(E, B, C, O, groups, hw, bias, delta_bias, channels_last=channels_last)
    _check_against_reference(hyperkern.ops.hyper_batch_ensemble_conv2d, ref.hyper_batch_ensemble_conv2d_reference,
                             args, (stride, padding, dilation, groups), 1e-10, 1e-10, channels_last)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("E", [1, 4, 7])
def test_fp32_matches_member_loop_with_any_thread_count(threads, channels_last, E, scheme):
    # float32 runs through oneDNN: members run one per thread, leftovers with all threads.
    with _threads(threads):
        args = _be_args(E, 3, 8, 16, 1, (10, 9), dtype=torch.float32, channels_last=channels_last)
        _check_against_reference(hyperkern.ops.batch_ensemble_conv2d, ref.batch_ensemble_conv2d_reference, args,
                                 (1, 1, 1, 1), 2e-4, 2e-4, channels_last)
        args = _hyper_args(E, 3, 8, 16, 2, (10, 9), dtype=torch.float32, channels_last=channels_last)
        _check_against_reference(hyperkern.ops.hyper_batch_ensemble_conv2d,
                                 ref.hyper_batch_ensemble_conv2d_reference, args, (2, 1, 1, 2), 2e-4, 2e-4,
                                 channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_matches_member_loop(channels_last, scheme):
    args = _be_args(4, 2, 16, 16, 1, (8, 8), dtype=torch.bfloat16, channels_last=channels_last)
    _check_against_reference(hyperkern.ops.batch_ensemble_conv2d, ref.batch_ensemble_conv2d_reference, args,
                             (1, 1, 1, 1), 2e-2, 2e-2, channels_last)
    args = _hyper_args(4, 2, 16, 16, 1, (8, 8), dtype=torch.bfloat16, channels_last=channels_last)
    _check_against_reference(hyperkern.ops.hyper_batch_ensemble_conv2d, ref.hyper_batch_ensemble_conv2d_reference,
                             args, (1, 1, 1, 1), 2e-2, 2e-2, channels_last)


def test_member_major_layout_is_respected():
    # Swapping members 0 and 1's fast weights must swap exactly their output blocks.
    x, w, r, s, b = _be_args(3, 2, 4, 5, dtype=torch.float32)
    y = hyperkern.ops.batch_ensemble_conv2d(x, w, r, s, b, 1, 1, backend="cpp")
    perm = [1, 0, 2]
    y_sw = hyperkern.ops.batch_ensemble_conv2d(torch.cat([x[2:4], x[0:2], x[4:]]), w, r[perm], s[perm], b[perm], 1, 1,
                                               backend="cpp")
    torch.testing.assert_close(y_sw[0:2], y[2:4])
    torch.testing.assert_close(y_sw[2:4], y[0:2])
    torch.testing.assert_close(y_sw[4:], y[4:])


def test_gradcheck_fp64(scheme):
    geo = ([2, 1], [1, 0], [1, 2], 2)
    x, w, r, s, b = (t.requires_grad_() for t in _be_args(2, 2, 4, 4, 2, (4, 5)))
    torch.autograd.gradcheck(lambda *a: torch.ops.hyperkern.batch_ensemble_conv2d(*a, *geo), (x, w, r, s, b))
    args = [t.requires_grad_() for t in _hyper_args(2, 1, 2, 4, 2, (4, 5))]
    for save_hd in (True, False):  # hd kept from the forward, or recomputed in the backward
        torch.autograd.gradcheck(
            lambda *a: torch.ops.hyperkern.hyper_batch_ensemble_conv2d(*a, *geo, save_hd)[0], args)


def test_hyper_saves_hd_only_when_e1_needs_grad():
    args = _hyper_args(2, 2, 4, 4, dtype=torch.float32)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    y, hd = torch.ops.hyperkern.hyper_batch_ensemble_conv2d(*args, *geo, True)
    _, none = torch.ops.hyperkern.hyper_batch_ensemble_conv2d(*args, *geo, False)
    assert none.numel() == 0
    # hd is the delta branch without e1: conv(x * u_k, delta) * v_k
    x, w, d, r, s, u, v = args[:7]
    want = ref.batch_ensemble_conv2d_reference(x, d, u, v, None, 1, 1)
    torch.testing.assert_close(hd.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last, scheme):
    geo = ([1, 2], [1, 0], [1, 1], 2)
    x, w, r, s, b = (t.requires_grad_() for t in _be_args(2, 2, 4, 6, 2, (5, 6), dtype=torch.float32,
                                                           channels_last=channels_last))
    torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_conv2d, (x, w, r, s, b, *geo))
    torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_conv2d, (x, w, r, s, None, *geo))
    # the train op: the per-member scheme keeps nothing for its backward (an empty pre), the one-convolution
    # scheme the unscaled convolution pre = conv(x * r_k, W)
    y, pre = torch.ops.hyperkern.batch_ensemble_conv2d_train(x.detach(), w.detach(), r.detach(), s.detach(),
                                                             b.detach(), *geo)
    if scheme == "member":
        assert pre.numel() == 0
    else:
        want = ref.batch_ensemble_conv2d_reference(x.detach(), w.detach(), r.detach(), torch.ones_like(s), None,
                                                   *geo[:3], groups=geo[3])
        torch.testing.assert_close(pre.double(), want, atol=1e-4, rtol=1e-4)
        assert pre.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y, torch.ops.hyperkern.batch_ensemble_conv2d(x, w, r, s, b, *geo))
    torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_conv2d_train,
                          (x.detach(), w.detach(), r.detach(), s.detach(), b.detach(), *geo))
    g = torch.randn(4, 6, 5, 2)
    torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_conv2d_backward,
                          (g, x.detach(), w.detach(), r.detach(), s.detach(), *geo, [True, False, True, True, False]))
    args = [t.requires_grad_() for t in _hyper_args(2, 2, 4, 6, 2, (5, 6), dtype=torch.float32,
                                                    channels_last=channels_last)]
    for save_hd in (True, False):
        torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_conv2d, (*args, *geo, save_hd))
    no_db = args[:9] + [None, None]
    torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_conv2d, (*no_db, *geo, True))
    # the train op: the per-member scheme keeps hd (when save_hd) and no branches, the one-convolution scheme
    # the branches h and hr and no hd
    detached = [t.detach() for t in args]
    for save_hd in (True, False):
        torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_conv2d_train, (*detached, *geo, save_hd))
        y_t, hd_t, h_t, hr_t = torch.ops.hyperkern.hyper_batch_ensemble_conv2d_train(*detached, *geo, save_hd)
        if scheme == "member":
            assert h_t.numel() == hr_t.numel() == 0 and (hd_t.numel() > 0) == save_hd
        else:
            assert hd_t.numel() == 0 and h_t.shape == hr_t.shape == y_t.shape
        torch.testing.assert_close(y_t, torch.ops.hyperkern.hyper_batch_ensemble_conv2d(*detached, *geo, save_hd)[0])
    plain = [t.detach() for t in args]
    y, hd = torch.ops.hyperkern.hyper_batch_ensemble_conv2d(*plain, *geo, True)
    mask = [True, True, False, True, True, False, True, True, True, True, False]
    for saved in (hd, hd.new_empty(0)):
        torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_conv2d_backward,
                              (torch.randn_like(y), *plain[:8], *plain[9:], saved, *geo, mask))
    if scheme == "one_conv":  # the backward reading the kept branches
        _, _, h_t, hr_t = torch.ops.hyperkern.hyper_batch_ensemble_conv2d_train(*plain, *geo, False)
        torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_conv2d_backward,
                              (torch.randn_like(y), *plain[:8], *plain[9:], hd.new_empty(0), *geo, mask, h_t, hr_t))
        torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_conv2d_backward,
                              (g, x.detach(), w.detach(), r.detach(), s.detach(), *geo, [True, False, True, True, False],
                               pre))


def test_torch_compile_fullgraph_matches_eager():
    # Through the backend's entry points, forward and backward (the public API under torch.compile is
    # covered by tests/test_models_compile.py).
    geo = ((1, 1), (1, 1), (1, 1), 1)

    def loss(x, w, r, s, b, d, u, v, e1, db, e2):
        y = _cpp_conv.batch_ensemble_conv2d(x, w, r, s, b, *geo)
        z = _cpp_conv.hyper_batch_ensemble_conv2d(y, w, d, r, s, u, v, e1, b, db, e2, *geo)
        return (z * z).sum()

    x, w, r, s, b = _be_args(2, 3, 6, 6, dtype=torch.float32, channels_last=True)
    _, _, d, _, _, u, v, e1, _, db, e2 = _hyper_args(2, 3, 6, 6, dtype=torch.float32)
    inputs = [t.requires_grad_() for t in (x, w, r, s, b, d, u, v, e1, db, e2)]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(loss(*inputs), inputs)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_)


def test_torch_compile_inductor_forward():
    x, w, r, s, b = _be_args(2, 2, 4, 4, dtype=torch.float32)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    fn = torch.compile(lambda *a: torch.relu(_cpp_conv.batch_ensemble_conv2d(*a, *geo)), fullgraph=True)
    torch.testing.assert_close(fn(x, w, r, s, b),
                               torch.relu(hyperkern.ops.batch_ensemble_conv2d(x, w, r, s, b, 1, 1, backend="torch")))


@pytest.mark.parametrize("channels_last", [False, True])
def test_zero_images(scheme, channels_last):
    x, w, r, s, b = (t.requires_grad_() for t in _be_args(2, 1, 4, 4, dtype=torch.float32))
    x0 = x[:0].detach()
    if channels_last:
        x0 = x0.contiguous(memory_format=CL)
    x0.requires_grad_()
    y = hyperkern.ops.batch_ensemble_conv2d(x0, w, r, s, b, 1, 1, backend="cpp")
    assert y.shape == (0, 4, 7, 8)
    dx, dw, dr, ds, db = torch.autograd.grad(y.sum(), (x0, w, r, s, b))
    assert dx.shape == x0.shape
    for t in (dw, dr, ds, db):
        assert torch.count_nonzero(t) == 0
    args = [t.requires_grad_() for t in _hyper_args(2, 1, 4, 4, dtype=torch.float32)]
    args[0], args[7], args[10] = (t[:0].detach().requires_grad_() for t in (args[0], args[7], args[10]))
    y = hyperkern.ops.hyper_batch_ensemble_conv2d(*args, 1, 1, backend="cpp")
    assert y.shape == (0, 4, 7, 8)
    grads = torch.autograd.grad(y.sum(), [a for a in args if a.numel() > 0])
    for t in grads:
        assert torch.count_nonzero(t) == 0


@pytest.mark.parametrize("hw,C,E,B,one_conv", [((6, 6), 4, 4, 2, True), ((32, 32), 16, 4, 16, False),
                                               ((8, 8), 64, 4, 4, True), ((16, 16), 32, 1, 8, False)])
def test_auto_scheme_mirror_matches_the_kernel(hw, C, E, B, one_conv, monkeypatch):
    """The fake kernels' mirror of the CPU scheme rule (_cpp_conv.cpu_uses_one_conv) agrees with the kernel:
    the one-convolution train op keeps pre, the per-member one an empty tensor; small members (B * O * Ho * Wo
    below the threshold) take the one-convolution scheme."""
    monkeypatch.delenv("HYPERKERN_CPU_CONV", raising=False)
    x, w, r, s, b = _be_args(E, B, C, C, 1, hw, dtype=torch.float32)
    assert _cpp_conv.cpu_uses_one_conv(x, r, w, hw) == one_conv
    _, pre = torch.ops.hyperkern.batch_ensemble_conv2d_train(x, w, r, s, b, [1, 1], [1, 1], [1, 1], 1)
    assert (pre.dim() == 4) == one_conv


def test_bad_scheme_setting_is_refused(monkeypatch):
    monkeypatch.setenv("HYPERKERN_CPU_CONV", "fastest")
    x, w, r, s, b = _be_args(2, 1, 4, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="HYPERKERN_CPU_CONV must be auto, member or one_conv"):
        torch.ops.hyperkern.batch_ensemble_conv2d(x, w, r, s, b, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="HYPERKERN_CPU_CONV must be auto, member or one_conv"):
        _cpp_conv.cpu_scheme()


def test_bad_inputs_raise_instead_of_crashing():
    x, w, r, s, b = _be_args(2, 2, 4, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="r must have shape"):
        hyperkern.ops.batch_ensemble_conv2d(x, w, r[:, :3], s, b, backend="cpp")
    with pytest.raises(ValueError, match="divisible"):
        hyperkern.ops.batch_ensemble_conv2d(x[:3], w, r, s, b, backend="cpp")
    # Calling the raw op with inconsistent shapes is stopped by the kernel's own checks.
    with pytest.raises(RuntimeError, match="s must have shape"):
        torch.ops.hyperkern.batch_ensemble_conv2d(x, w, r, s[:, :4], b, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.hyperkern.batch_ensemble_conv2d(x, w, r, s, b, [1, 1], [0, 0], [1, 1], 2)
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        torch.ops.hyperkern.batch_ensemble_conv2d_backward(torch.zeros(4, 6, 3, 3), x, w, r, s, [1, 1], [0, 0],
                                                           [1, 1], 1, [True] * 5)
    args = _hyper_args(2, 2, 4, 6, dtype=torch.float32)
    args[7] = args[7][:3]
    with pytest.raises(RuntimeError, match="e1 must have shape"):
        torch.ops.hyperkern.hyper_batch_ensemble_conv2d(*args, [1, 1], [0, 0], [1, 1], 1, False)
