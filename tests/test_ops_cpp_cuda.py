"""The "cpp" backend's CUDA kernels (csrc/cuda/*.cu) against the float64 member loop of
hyperkern.ops.reference, computed on the CPU: forward and every gradient of the four rank-1 ops,
fp64 / fp32 / bf16, NCHW and channels-last, stride / padding / dilation / groups, plus gradcheck and
opcheck on the GPU. The CPU kernels have their own files (test_ops_linear_cpp.py, test_ops_conv_cpp.py);
these need a GPU and the extension built with CUDA, and skip otherwise.

TF32 is switched off in this module, so fp32 is checked at fp32 accuracy.
"""
import pytest
import torch

import hyperkern
from hyperkern.ops import reference as ref
from rank1_cases import TOLERANCE, assert_scaled_close, conv_args, linear_args, output_and_grads

_REASON = None if torch.cuda.is_available() else "no CUDA device"
if _REASON is None:
    _REASON = hyperkern.backend_status("cuda")["cpp"]
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpp CUDA kernels unavailable: {_REASON}")

CL = torch.channels_last
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _check(op, reference, args, dtype, channels_last=False, **kw):
    """The cpp op on the GPU in dtype against the float64 reference on the CPU: output and every gradient.
    The reference takes the inputs rounded to dtype, so the check measures the kernels' error, not the
    inputs' rounding (at bf16 and E = B = 1 that alone reached 3 % of a gradient's largest entry)."""
    args = [None if a is None else a.to(dtype).double() for a in args]
    y_ref = reference(*args, **kw)
    grad_out = torch.randn_like(y_ref).to(dtype).double()
    y_ref, g_ref = output_and_grads(lambda *a: reference(*a, **kw), args, grad_out)

    def on_gpu(t):
        if t is None:
            return None
        t = t.to(device="cuda", dtype=dtype)
        return t.contiguous(memory_format=CL) if channels_last and t.dim() == 4 else t

    y, g = output_and_grads(lambda *a: op(*a, **kw, backend="cpp"), [on_gpu(a) for a in args], grad_out)
    assert y.device.type == "cuda" and y.dtype == dtype
    assert y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    tol = TOLERANCE[dtype]
    assert_scaled_close(y, y_ref, tol, "output")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert a.dtype == dtype and a.device.type == "cuda", f"grad {i}: {a.dtype} on {a.device}"
            assert_scaled_close(a, b, tol, f"grad of argument {i}")
    if channels_last:
        assert g[0].is_contiguous(memory_format=CL)


# (E, B, C, O, groups, stride, padding, dilation, hw)
CONV_CASES = [
    (3, 2, 4, 6, 1, 1, 1, 1, (7, 8)),
    (1, 1, 3, 5, 1, 1, 0, 1, (5, 5)),  # E = 1, B = 1
    (2, 3, 4, 6, 2, 2, 0, 1, (7, 8)),  # groups, stride
    (4, 1, 6, 6, 3, (2, 1), (1, 2), (2, 1), (9, 8)),  # B = 1, asymmetric everything
    (2, 2, 16, 32, 1, 1, 1, 1, (8, 8)),  # positions a multiple of the vector width
    (4, 8, 32, 16, 1, 1, 1, 1, (16, 16)),  # positions over one warp's vector stride
]


@pytest.mark.parametrize("hyper", [False, True], ids=["batch", "hyper"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,B,C,O,groups,stride,padding,dilation,hw", CONV_CASES)
def test_conv_matches_member_loop(E, B, C, O, groups, stride, padding, dilation, hw, dtype, channels_last, hyper):
    op = hyperkern.ops.hyper_batch_ensemble_conv2d if hyper else hyperkern.ops.batch_ensemble_conv2d
    reference = ref.hyper_batch_ensemble_conv2d_reference if hyper else ref.batch_ensemble_conv2d_reference
    _check(op, reference, conv_args(E, B, C, O, groups, hw, hyper), dtype, channels_last,
           stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("hyper", [False, True], ids=["batch", "hyper"])
def test_conv_without_bias(hyper):
    op = hyperkern.ops.hyper_batch_ensemble_conv2d if hyper else hyperkern.ops.batch_ensemble_conv2d
    reference = ref.hyper_batch_ensemble_conv2d_reference if hyper else ref.batch_ensemble_conv2d_reference
    _check(op, reference, conv_args(3, 2, 4, 6, 1, (6, 6), hyper, bias=False), torch.float32, padding=1)


@pytest.mark.parametrize("hyper", [False, True], ids=["batch", "hyper"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,B,fin,fout", [(1, 1, 3, 5), (4, 3, 17, 9), (3, 70, 40, 600)])
def test_linear_matches_member_loop(E, B, fin, fout, dtype, hyper):
    op = hyperkern.ops.hyper_batch_ensemble_linear if hyper else hyperkern.ops.batch_ensemble_linear
    reference = ref.hyper_batch_ensemble_linear_reference if hyper else ref.batch_ensemble_linear_reference
    _check(op, reference, linear_args(E, B, fin, fout, hyper), dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# m = 1..8: e(lambda) fused into the epilogue and the pass over g (m = 1 and 8 the ends); m = 9: the
# transient path. fout 9 and 70 leave lanes of a 32-column tile past the row; B = 70 and 40 make several
# row splits per member, so the d(embedding) partials are summed over members and splits.
@pytest.mark.parametrize("E,B,fin,fout,m", [(1, 1, 3, 5, 1), (4, 3, 17, 9, 5), (3, 70, 40, 600, 3),
                                            (2, 40, 33, 70, 8), (2, 5, 7, 11, 9)])
def test_linear_hp_matches_member_loop(E, B, fin, fout, m, dtype, bias):
    """hyper_batch_ensemble_linear_hp on CUDA: output and every gradient, hparams and embedding included."""
    args = linear_args(E, B, fin, fout, True, bias)
    hparams = torch.rand(E * B, m, dtype=torch.float64)
    embedding = torch.randn(fout * (2 if bias else 1), m, dtype=torch.float64)
    _check(hyperkern.ops.hyper_batch_ensemble_linear_hp, ref.hyper_batch_ensemble_linear_hp_reference,
           args[:7] + [hparams, embedding] + args[8:10], dtype)


@pytest.mark.parametrize("m", [4, 9])
def test_linear_hp_without_hparams_grad(m):
    """hparams without grad (the trainer's weight step): the fused backward skips d(hparams) and the other
    gradients still match the float64 reference."""
    E, B, fin, fout = 3, 50, 24, 40
    args = linear_args(E, B, fin, fout, True, True)
    hparams = torch.rand(E * B, m, dtype=torch.float64)
    embedding = torch.randn(2 * fout, m, dtype=torch.float64)
    full = args[:7] + [hparams, embedding] + args[8:10]
    grad_out = torch.randn(E * B, fout, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(i != 7) for i, t in enumerate(full)]
    y_ref = ref.hyper_batch_ensemble_linear_hp_reference(*leaves)
    g_ref = torch.autograd.grad(y_ref, [t for t in leaves if t.requires_grad], grad_out)
    gpu = [t.detach().float().cuda().requires_grad_(i != 7) for i, t in enumerate(full)]
    y = hyperkern.ops.hyper_batch_ensemble_linear_hp(*gpu, backend="cpp")
    g = torch.autograd.grad(y, [t for t in gpu if t.requires_grad], grad_out.float().cuda())
    assert_scaled_close(y, y_ref, TOLERANCE[torch.float32], "output")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_scaled_close(a, b, TOLERANCE[torch.float32], f"grad {i}")


def _conv_hp_reference(x, weight, delta, r, s, u, v, hparams, embedding, bias=None, delta_bias=None, **geo):
    e = hparams.double() @ embedding.double().t()
    O = weight.shape[0]
    return ref.hyper_batch_ensemble_conv2d_reference(x, weight, delta, r, s, u, v, e[:, :O], bias, delta_bias,
                                                     e[:, O:] if delta_bias is not None else None, **geo)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,B,C,O,groups,stride,padding,dilation,hw", CONV_CASES[:4])
def test_conv_hp_matches_member_loop(E, B, C, O, groups, stride, padding, dilation, hw, dtype, channels_last, bias):
    """hyper_batch_ensemble_conv2d_hp on CUDA (e in transient buffers from CudaPrims::embed, d(hparams) and
    d(embedding) from CudaPrims::embed_backward): output and every gradient, hparams and embedding included."""
    args = conv_args(E, B, C, O, groups, hw, True, bias)
    hparams = torch.rand(E * B, 3, dtype=torch.float64)
    embedding = torch.randn(O * (2 if bias else 1), 3, dtype=torch.float64)
    _check(hyperkern.ops.hyper_batch_ensemble_conv2d_hp, _conv_hp_reference,
           args[:7] + [hparams, embedding] + args[8:10], dtype, channels_last, stride=stride, padding=padding,
           dilation=dilation, groups=groups)


def test_gradcheck_fp64():
    geo = ([2, 1], [1, 0], [1, 2], 2)
    cuda = lambda args: [t.cuda().requires_grad_() for t in args]  # noqa: E731
    torch.autograd.gradcheck(lambda *a: torch.ops.hyperkern.batch_ensemble_conv2d(*a, *geo),
                             cuda(conv_args(2, 2, 4, 4, 2, (4, 5), False)))
    hyper = cuda(conv_args(2, 1, 2, 4, 2, (4, 5), True))
    for save_hd in (True, False):
        torch.autograd.gradcheck(lambda *a: torch.ops.hyperkern.hyper_batch_ensemble_conv2d(*a, *geo, save_hd)[0],
                                 hyper)
    torch.autograd.gradcheck(torch.ops.hyperkern.batch_ensemble_linear, cuda(linear_args(2, 3, 4, 5, False)))


def test_batch_conv_backward_recomputes_what_the_forward_did_not_save():
    """The CUDA backward reads pre = conv(x * r_k, W) from the train op; without it (a direct call of the
    backward op) it recomputes pre, with the same gradients."""
    geo = ([1, 1], [1, 1], [1, 1], 1)
    x, w, r, s, b = (t.cuda().float() for t in conv_args(2, 3, 4, 6, 1, (6, 5), False))
    y, pre = torch.ops.hyperkern.batch_ensemble_conv2d_train(x, w, r, s, b, *geo)
    assert pre.shape == y.shape
    want = ref.batch_ensemble_conv2d_reference(x.cpu(), w.cpu(), r.cpu(), torch.ones_like(s.cpu()), None, 1, 1)
    assert_scaled_close(pre, want, TOLERANCE[torch.float32], "pre")
    g = torch.randn_like(y)
    mask = [True] * 5
    with_pre = torch.ops.hyperkern.batch_ensemble_conv2d_backward(g, x, w, r, s, *geo, mask, pre)
    without = torch.ops.hyperkern.batch_ensemble_conv2d_backward(g, x, w, r, s, *geo, mask)
    for a, b_ in zip(with_pre, without):
        torch.testing.assert_close(a, b_)
    only_s = torch.ops.hyperkern.batch_ensemble_conv2d_backward(g, x, w, r, s, *geo, [False, False, False, True, False])
    torch.testing.assert_close(only_s[3], with_pre[3])


def test_hyper_conv_backward_recomputes_what_the_forward_did_not_save():
    """The CUDA hyper backward reads the branches h = conv(x * r_k, W) and hr = conv(x * u_k, delta) from the
    train op; without them (a direct call of the backward op) it recomputes them, with the same gradients."""
    geo = ([1, 1], [1, 1], [1, 1], 1)
    args = [t.cuda().float() for t in conv_args(2, 3, 4, 6, 1, (6, 5), True)]
    y, hd, h, hr = torch.ops.hyperkern.hyper_batch_ensemble_conv2d_train(*args, *geo, True)
    x, w, d, r, s, u, v = (t.cpu() for t in args[:7])
    assert_scaled_close(h, ref.batch_ensemble_conv2d_reference(x, w, r, torch.ones_like(s), None, 1, 1),
                         TOLERANCE[torch.float32], "h")
    assert_scaled_close(hr, ref.batch_ensemble_conv2d_reference(x, d, u, torch.ones_like(v), None, 1, 1),
                         TOLERANCE[torch.float32], "hr")
    g = torch.randn_like(y)
    mask = [True] * 11
    with_branches = torch.ops.hyperkern.hyper_batch_ensemble_conv2d_backward(g, *args[:8], *args[9:], hd, *geo, mask,
                                                                             h, hr)
    without = torch.ops.hyperkern.hyper_batch_ensemble_conv2d_backward(g, *args[:8], *args[9:], hd, *geo, mask)
    for a, b_ in zip(with_branches, without):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(channels_last):
    geo = ([1, 2], [1, 0], [1, 1], 2)

    def gpu(args):
        out = [None if t is None else t.cuda().float() for t in args]
        return [t.contiguous(memory_format=CL) if channels_last and t is not None and t.dim() == 4 else t
                for t in out]

    x, w, r, s, b = (t.requires_grad_() for t in gpu(conv_args(2, 2, 4, 6, 2, (5, 6), False)))
    torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_conv2d, (x, w, r, s, b, *geo))
    plain = [t.detach() for t in (x, w, r, s, b)]
    torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_conv2d_train, (*plain, *geo))
    y, pre = torch.ops.hyperkern.batch_ensemble_conv2d_train(*plain, *geo)
    torch.library.opcheck(torch.ops.hyperkern.batch_ensemble_conv2d_backward,
                          (torch.randn_like(y), *plain[:4], *geo, [True, True, True, True, True], pre))
    args = [t.requires_grad_() for t in gpu(conv_args(2, 2, 4, 6, 2, (5, 6), True))]
    for save_hd in (True, False):
        torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_conv2d, (*args, *geo, save_hd))
    plain = [t.detach() for t in args]
    torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_conv2d_train, (*plain, *geo, True))
    y, hd, h, hr = torch.ops.hyperkern.hyper_batch_ensemble_conv2d_train(*plain, *geo, True)
    assert hd.numel() == 0 and h.shape == hr.shape == y.shape  # CUDA keeps the branches, not hd
    mask = [True, True, False, True, True, False, True, True, True, True, False]
    torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_conv2d_backward,
                          (torch.randn_like(y), *plain[:8], *plain[9:], hd, *geo, mask, h, hr))


def test_zero_images():
    x, w, r, s, b = (t.cuda().float().requires_grad_() for t in conv_args(2, 1, 4, 4, 1, (7, 8), False))
    x0 = x[:0].detach().requires_grad_()
    y = hyperkern.ops.batch_ensemble_conv2d(x0, w, r, s, b, 1, 1, backend="cpp")
    assert y.shape == (0, 4, 7, 8)
    for t in torch.autograd.grad(y.sum(), (w, r, s, b)):
        assert torch.count_nonzero(t) == 0


def test_hyper_batch_step_captures_in_a_cuda_graph():
    # normalize() used to copy its bounds from Python lists to the GPU on every call (a pageable
    # host-to-device copy that a CUDA graph cannot capture), and the model's hparams range check is a
    # device sync: GPU run 3 left hyper_batch out of the CUDA-graph timings for both reasons
    import torch.nn.functional as F

    from hyperkern import models as zoo
    from hyperkern.nn import EnsembleLogUniform, tile

    torch.manual_seed(0)
    E, B = 2, 4
    model = zoo.resnet20(num_classes=10, in_channels=3, variant="hyper_batch", ensemble_size=E, depth=8, width=4,
                         device="cuda", dtype=torch.float32)
    space = model.hparam_space
    dist = EnsembleLogUniform(space, E, dtype=torch.float32, device="cuda")
    x, y = torch.randn(B, 3, 8, 8, device="cuda"), torch.randint(0, 10, (B,), device="cuda")
    lam = dist.sample(B).detach()

    def step():
        logits = model(tile(x, E), space.normalize(lam))
        loss = F.cross_entropy(logits, tile(y, E)) + model.l2_penalty(lam) / 50000
        loss.backward()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_graph = step()
    model.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    grads_graph = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=False)
    loss_eager = step()
    grads_eager = [p.grad for p in model.parameters() if p.grad is not None]
    torch.testing.assert_close(loss_graph, loss_eager)
    assert len(grads_graph) == len(grads_eager) > 0
    for a, b in zip(grads_graph, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
