"""hyperkern.ops.hyper_batch_ensemble_conv2d_hp: the hyper-batch conv op that embeds the hyperparameters
itself ([e1 | e2] = hparams @ embedding^T per image inside the op), on every backend this machine runs (cpp on
the CPU in both of its schemes, torch, Triton in its interpreter at tiny shapes), against the float64
member loop (the conv reference with e from hparams), in the forward and in every gradient (hparams and
embedding included); geometry, channels-last, zero images, gradcheck / gradgradcheck, opcheck, torch.compile,
validation messages, and the layer calling it.
"""
import pytest
import torch

import hyperkern
from hyperkern.nn import HyperBatchEnsembleConv2d
from hyperkern.ops import reference as ref

NAMES = ("x", "weight", "delta", "r", "s", "u", "v", "hparams", "embedding", "bias", "delta_bias")
_CPU = hyperkern.backend_status("cpu", "hyper_batch_ensemble_conv2d_hp")
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(_CPU[name] is not None, reason=str(_CPU[name])))
            for name in ("cpp", "torch", "triton")]
CPP = pytest.mark.skipif(_CPU["cpp"] is not None, reason=str(_CPU["cpp"]))
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}
CL = torch.channels_last


@pytest.fixture(params=["member", "one_conv"])
def scheme(request, monkeypatch):
    monkeypatch.setenv("HYPERKERN_CPU_CONV", request.param)
    return request.param


def hp_args(E, B, C, O, m, groups=1, hw=(5, 6), k=3, bias=True, delta_bias=True, dtype=torch.float64, seed=0,
            channels_last=False):
    g = torch.Generator().manual_seed(seed)
    f = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    fan = (C // groups) * k * k
    args = [f(E * B, C, *hw), f(O, C // groups, k, k) / fan ** 0.5, f(O, C // groups, k, k) / fan ** 0.5,
            1 + 0.5 * f(E, C), 1 + 0.5 * f(E, O), 1 + 0.5 * f(E, C), 1 + 0.5 * f(E, O),
            torch.rand(E * B, m, generator=g, dtype=torch.float64), f(O * (2 if delta_bias else 1), m),
            f(E, O) if bias else None, f(E, O) if delta_bias else None]
    args = [None if a is None else a.to(dtype) for a in args]
    if channels_last:
        args[0] = args[0].contiguous(memory_format=CL)
    return args


def reference(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride, padding, dilation, groups):
    if x.shape[0] == 0:  # the member loop has no image to concatenate: the plain composition (float64)
        from hyperkern.ops.conv import _torch_hyper_batch_ensemble_conv2d_hp
        return _torch_hyper_batch_ensemble_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias,
                                                     delta_bias, stride, padding, dilation, groups)
    e = hparams.double() @ embedding.double().t()
    O = weight.shape[0]
    e1, e2 = e[:, :O], (e[:, O:] if delta_bias is not None else None)
    return ref.hyper_batch_ensemble_conv2d_reference(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride,
                                                     padding, dilation, groups)


def grads_of(fn, args, grad_out, requires=None):
    leaves = [None if a is None else a.detach().clone().requires_grad_(requires is None or n in requires)
              for n, a in zip(NAMES, args)]
    y = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, grad_out.to(y.dtype)))
    return y.detach(), [None if t is None or not t.requires_grad else next(grads) for t in leaves]


def assert_scaled_close(actual, expected, tol, what):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-3), f"{what}: max error {err:.3e} > {tol:.1e} * max |reference| {scale:.3e}"


def check(backend, args, geo, dtype, requires=None):
    tol = TOLERANCE[dtype]
    op = lambda *a: hyperkern.ops.hyper_batch_ensemble_conv2d_hp(*a, *geo, backend=backend)  # noqa: E731
    y_ref = reference(*[None if a is None else a.double() for a in args], *geo)
    grad_out = torch.randn(y_ref.shape, dtype=torch.float64)
    y_ref, g_ref = grads_of(lambda *a: reference(*a, *geo), [None if a is None else a.double() for a in args],
                            grad_out, requires)
    y, g = grads_of(op, args, grad_out, requires)
    assert y.dtype == dtype
    if args[0].is_contiguous(memory_format=CL) and not args[0].is_contiguous():
        assert y.is_contiguous(memory_format=CL)
    assert_scaled_close(y, y_ref, tol, "output")
    for name, a, b in zip(NAMES, g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == dtype, f"grad {name} has dtype {a.dtype}"
            assert_scaled_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,delta_bias", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_matches_reference_float64(backend, bias, delta_bias, m, scheme):
    if backend == "triton":
        args = hp_args(2, 1, 2, 4, m, hw=(3, 4), bias=bias, delta_bias=delta_bias)
    else:
        args = hp_args(3, 2, 4, 6, m, bias=bias, delta_bias=delta_bias)
    check(backend, args, ((1, 1), (1, 1), (1, 1), 1), torch.float64)


GEOMETRIES = [((1, 1), (0, 0), (1, 1), 1), ((2, 1), (1, 2), (1, 1), 2), ((1, 2), (2, 1), (2, 1), 1),
              ((2, 2), (1, 1), (1, 2), 2)]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_geometry_and_layout(backend, geo, channels_last, scheme):
    if _CPU[backend] is not None:
        pytest.skip(_CPU[backend])
    args = hp_args(2, 2, 4, 6, 2, groups=geo[3], hw=(7, 6), channels_last=channels_last)
    check(backend, args, geo, torch.float64)


@CPP
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision(dtype, channels_last, scheme):
    args = hp_args(2, 2, 4, 6, 3, dtype=dtype, channels_last=channels_last)
    check("cpp", args, ((1, 1), (1, 1), (1, 1), 1), dtype)


@CPP
@pytest.mark.parametrize("requires", [("hparams",), ("embedding",), ("x", "embedding"), ("weight", "delta_bias"),
                                      ("hparams", "bias")])
def test_partial_gradients(requires, scheme):
    check("cpp", hp_args(2, 2, 4, 6, 2), ((1, 1), (1, 1), (1, 1), 1), torch.float64, set(requires))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_zero_images(backend, channels_last, scheme):
    args = hp_args(2, 0, 4, 6, 2, channels_last=channels_last)
    check(backend, args, ((1, 1), (1, 1), (1, 1), 1), torch.float64)


@CPP
def test_gradcheck_and_gradgradcheck(scheme):
    args = [None if a is None else a.requires_grad_() for a in hp_args(2, 1, 2, 4, 2, hw=(4, 3))]
    fn = lambda *a: hyperkern.ops.hyper_batch_ensemble_conv2d_hp(*a, 1, 1, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.skipif(_CPU["triton"] is not None, reason=str(_CPU["triton"]))
def test_triton_gradcheck():
    args = [None if a is None else a.requires_grad_() for a in hp_args(2, 1, 2, 2, 1, hw=(3, 3), k=1)]
    fn = lambda *a: hyperkern.ops.hyper_batch_ensemble_conv2d_hp(*a, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, atol=1e-6)


@CPP
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last, scheme):
    ops = torch.ops.hyperkern
    geo = ([1, 2], [1, 0], [1, 1], 2)
    args = [None if a is None else a.requires_grad_()
            for a in hp_args(2, 2, 4, 6, 2, groups=2, dtype=torch.float32, channels_last=channels_last)]
    for save_hd in (True, False):
        torch.library.opcheck(ops.hyper_batch_ensemble_conv2d_hp, (*args, *geo, save_hd))
    no_db = args[:9] + [args[9], None]
    no_db[8] = args[8][:6].detach().requires_grad_()
    torch.library.opcheck(ops.hyper_batch_ensemble_conv2d_hp, (*no_db, *geo, True))
    plain = [t.detach() for t in args]
    for save_hd in (True, False):
        torch.library.opcheck(ops.hyper_batch_ensemble_conv2d_hp_train, (*plain, *geo, save_hd))
        y_t, hd_t, h_t, hr_t = ops.hyper_batch_ensemble_conv2d_hp_train(*plain, *geo, save_hd)
        torch.testing.assert_close(y_t, ops.hyper_batch_ensemble_conv2d_hp(*plain, *geo, save_hd)[0])
    y, hd = ops.hyper_batch_ensemble_conv2d_hp(*plain, *geo, True)
    for mask in ([True] * 11, [True, False, True, True, False, True, True, True, False, True, False],
                 [False] * 7 + [True, True, False, False]):
        for saved in (hd, hd.new_empty(0)):
            torch.library.opcheck(ops.hyper_batch_ensemble_conv2d_hp_backward,
                                  (torch.randn_like(y), *plain[:9], plain[10], saved, *geo, mask))
    _, _, h_t, hr_t = ops.hyper_batch_ensemble_conv2d_hp_train(*plain, *geo, False)
    if h_t.dim() == 4:
        torch.library.opcheck(ops.hyper_batch_ensemble_conv2d_hp_backward,
                              (torch.randn_like(y), *plain[:9], plain[10], hd.new_empty(0), *geo, [True] * 11, h_t,
                               hr_t))


@CPP
def test_backward_op_matches_hyper_op_chained():
    # the fused backward op's dhparams / dembedding are the e1 op's de1 / de2 chained through e = hparams @ emb^T
    ops = torch.ops.hyperkern
    geo = ([1, 1], [1, 1], [1, 1], 1)
    a = hp_args(2, 2, 4, 6, 3)
    hp, emb = a[7], a[8]
    e = hp @ emb.t()
    e1, e2 = e[:, :6].contiguous(), e[:, 6:].contiguous()
    y, hd = ops.hyper_batch_ensemble_conv2d_hp(*a, *geo, True)
    g = torch.randn_like(y)
    got = ops.hyper_batch_ensemble_conv2d_hp_backward(g, *a[:9], a[10], hd, *geo, [True] * 11)
    want = ops.hyper_batch_ensemble_conv2d_backward(g, *a[:7], e1, a[10], e2, hd, *geo, [True] * 11)
    for i in range(7):
        torch.testing.assert_close(got[i], want[i])
    de = torch.cat([want[7], want[10]], 1)
    torch.testing.assert_close(got[7], de @ emb)
    torch.testing.assert_close(got[8], de.t() @ hp)
    torch.testing.assert_close(got[9], want[8])
    torch.testing.assert_close(got[10], want[9])


@CPP
def test_torch_compile_fullgraph_matches_eager():
    args = [None if a is None else a.requires_grad_() for a in hp_args(2, 2, 4, 6, 2, dtype=torch.float32)]

    def loss(*a):
        return hyperkern.ops.hyper_batch_ensemble_conv2d_hp(*a, 1, 1, backend="cpp").square().sum()

    eager = torch.autograd.grad(loss(*args), [a for a in args if a is not None])
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*args), [a for a in args if a is not None])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_validation_names_the_argument():
    a = hp_args(2, 2, 4, 6, 2)
    op = hyperkern.ops.hyper_batch_ensemble_conv2d_hp
    bad = list(a)
    bad[7] = a[7][:3]
    with pytest.raises(ValueError, match="hparams"):
        op(*bad, backend="torch")
    bad = list(a)
    bad[8] = a[8][:6]
    with pytest.raises(ValueError, match="embedding"):
        op(*bad, backend="torch")
    bad = list(a)
    bad[8] = a[8].float()
    with pytest.raises(TypeError, match="embedding"):
        op(*bad, backend="torch")
    bad = list(a)
    bad[5] = a[5][:, :3]
    with pytest.raises(ValueError, match="u must"):
        op(*bad, backend="torch")
    bad = list(a)
    bad[7] = a[7].clone()
    bad[7][0, 0] = float("nan")
    with pytest.raises(ValueError, match="hparams"):
        op(*bad, backend="torch")
    with pytest.raises(ValueError, match="x must"):
        op(a[0][:, :3], *a[1:], backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_calls_the_op_and_matches_its_embed(backend, bias):
    torch.manual_seed(0)
    layer = HyperBatchEnsembleConv2d(4, 6, 3, ensemble_size=2, num_hparams=3, padding=1, bias=bias,
                                     backend=backend).double()
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    hp = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x, hp)
    e1, e2 = layer.embed(hp)
    want = hyperkern.ops.hyper_batch_ensemble_conv2d(x, layer.weight, layer.delta, layer.r, layer.s, layer.u, layer.v,
                                                     e1, layer.bias, layer.delta_bias, e2, 1, 1, backend="torch")
    torch.testing.assert_close(y, want)
    params = [x, hp] + [p for p in layer.parameters()]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b)
