"""hyperkern.ops.hyper_batch_ensemble_linear_hp: the hyper-batch linear op that embeds the hyperparameters
itself ([e1 | e2] = hparams @ embedding^T inside the op), on every backend this machine runs (cpp on the
CPU, torch, Triton in its interpreter), against the float64 member loop, in the forward and in every
gradient (hparams and embedding included); gradcheck, gradgradcheck, opcheck, torch.compile of the layer;
and the point of the op: the layer's forward no longer saves an (E*B, out) embedding for the backward.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import hyperkern
from hyperkern.nn import HyperBatchEnsembleLinear
from hyperkern.ops import reference as ref

NAMES = ("x", "weight", "delta", "r", "s", "u", "v", "hparams", "embedding", "bias", "delta_bias")
_CPU = hyperkern.backend_status("cpu", "hyper_batch_ensemble_linear_hp")
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(_CPU[name] is not None, reason=str(_CPU[name])))
            for name in ("cpp", "torch", "triton")]
# max |error| / max |reference| per dtype (forward and gradients alike)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def hp_args(E, B, fin, fout, m, bias=True, delta_bias=True, dtype=torch.float64, seed=0):
    """[x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias]; embedding (2*out, m) with delta_bias."""
    g = torch.Generator().manual_seed(seed)
    f = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    args = [f(E * B, fin), f(fout, fin) / fin ** 0.5, f(fout, fin) / fin ** 0.5, 1 + 0.5 * f(E, fin),
            1 + 0.5 * f(E, fout), 1 + 0.5 * f(E, fin), 1 + 0.5 * f(E, fout),
            torch.rand(E * B, m, generator=g, dtype=torch.float64), f(fout * (2 if delta_bias else 1), m),
            f(E, fout) if bias else None, f(E, fout) if delta_bias else None]
    return [None if a is None else a.to(dtype) for a in args]


def grads_of(fn, args, grad_out, requires=None):
    """fn(*args) and the gradient of <fn(*args), grad_out> for every tensor argument (None stays None);
    requires: names whose leaves require grad (default all)."""
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


def op(backend):
    return lambda *a: hyperkern.ops.hyper_batch_ensemble_linear_hp(*a, backend=backend)


def check_against_reference(backend, args, dtype, requires=None):
    tol = TOLERANCE[dtype]
    grad_out = torch.randn(args[0].shape[0], args[1].shape[0], dtype=torch.float64)
    y_ref, g_ref = grads_of(ref.hyper_batch_ensemble_linear_hp_reference, [None if a is None else a.double()
                                                                           for a in args], grad_out, requires)
    y, g = grads_of(op(backend), args, grad_out, requires)
    assert y.dtype == dtype
    assert_scaled_close(y, y_ref, tol, "output")
    for name, a, b in zip(NAMES, g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == dtype, f"grad {name} has dtype {a.dtype}"
            assert_scaled_close(a, b, tol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E", [1, 3, 4])
@pytest.mark.parametrize("bias,delta_bias", [(True, True), (False, False), (True, False), (False, True)])
def test_matches_member_loop_float64(backend, E, bias, delta_bias):
    args = hp_args(E, 3, 7, 9, 4, bias, delta_bias)
    check_against_reference(backend, args, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,B,fin,fout,m", [(4, 5, 16, 33, 5), (3, 70, 40, 300, 2)])
def test_matches_member_loop_float32(backend, E, B, fin, fout, m):
    """(3, 70, 40, 300): several row chunks and column pieces in the CPU passes."""
    if backend == "triton" and B > 8:
        pytest.skip("the Triton interpreter is slow; small shapes only")
    check_against_reference(backend, hp_args(E, B, fin, fout, m, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
def test_matches_member_loop_bfloat16(backend):
    check_against_reference(backend, hp_args(4, 6, 24, 20, 5, dtype=torch.bfloat16), torch.bfloat16)


def test_cpp_wide_layer_float32_many_pieces():
    """out > 512: several column chunks (d(hparams) partials per chunk) and several 128-wide pieces."""
    if _CPU["cpp"] is not None:
        pytest.skip(_CPU["cpp"])
    check_against_reference("cpp", hp_args(2, 9, 8, 700, 3, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 12])
@pytest.mark.parametrize("B", [4, 7])
@pytest.mark.parametrize("delta_bias", [True, False])
def test_cpp_every_hparam_count(m, B, delta_bias):
    """The CPU kernels' two forms: m = 1 .. 8 compiled for that m (e in registers, d(embedding) per tile of
    4 rows; B = 7 leaves a partial tile), m > 8 the general loops; both in float64 and float32."""
    if _CPU["cpp"] is not None:
        pytest.skip(_CPU["cpp"])
    check_against_reference("cpp", hp_args(3, B, 10, 21, m, delta_bias=delta_bias), torch.float64)
    check_against_reference("cpp", hp_args(2, B, 12, 40, m, delta_bias=delta_bias, dtype=torch.float32),
                            torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_fast_weights(backend):
    """u IS r and v IS s (the hyper layers' default): the cpp forward scales x once for both GEMMs; the
    shared tensors' gradients are the sums of their two roles."""
    args = hp_args(3, 5, 8, 6, 4)
    args[5], args[6] = args[3], args[4]
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    leaves[5], leaves[6] = leaves[3], leaves[4]
    ref_leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    ref_leaves[5], ref_leaves[6] = ref_leaves[3], ref_leaves[4]
    grad_out = torch.randn(15, 6, dtype=torch.float64)
    y = hyperkern.ops.hyper_batch_ensemble_linear_hp(*leaves, backend=backend)
    y_ref = ref.hyper_batch_ensemble_linear_hp_reference(*ref_leaves)
    assert_scaled_close(y, y_ref, 1e-12, "output")
    y.backward(grad_out)
    y_ref.backward(grad_out)
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        if a is not None:
            assert_scaled_close(a.grad, b.grad, 1e-12, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tied_backward_at_gemm_size(dtype):
    """The CPU backward's tied path (u IS r, float / double, (E*B, in) at least 64K elements): both dx
    GEMMs accumulate into one buffer and du comes out as colsum(x * P) - dr. Against the float64 member
    loop; and the backward op itself returns, in the r and u slots, what it returns for an untied copy
    of the same values (the subtraction makes du exact, not only the sum)."""
    if _CPU["cpp"] is not None:
        pytest.skip(_CPU["cpp"])
    args = hp_args(2, 160, 256, 48, 3, dtype=dtype)
    args[5] = args[3]
    leaves = [a.detach().clone().requires_grad_() for a in args]
    leaves[5] = leaves[3]
    ref_leaves = [a.detach().clone().requires_grad_() for a in args]
    ref_leaves[5] = ref_leaves[3]
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(320, 48, generator=g, dtype=torch.float64)
    y = hyperkern.ops.hyper_batch_ensemble_linear_hp(*leaves, backend="cpp")
    y.backward(grad_out.to(dtype))
    y_ref = ref.hyper_batch_ensemble_linear_hp_reference(*ref_leaves)
    y_ref.backward(grad_out)
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        assert_scaled_close(a.grad, b.grad, TOLERANCE[dtype], f"grad {name}")

    x, w, d, r, s, u, v, hp, emb, bias, db = (a.detach() for a in args)
    _, delta_out = torch.ops.hyperkern.hyper_batch_ensemble_linear_hp(x, w, d, r, s, r, v, hp, emb, bias, db)
    gy = grad_out.to(dtype)
    tied = torch.ops.hyperkern.hyper_batch_ensemble_linear_hp_backward(gy, x, w, d, r, s, r, v, hp, emb, db,
                                                                       delta_out, True, True, True)
    untied = torch.ops.hyperkern.hyper_batch_ensemble_linear_hp_backward(gy, x, w, d, r, s, r.clone(), v, hp,
                                                                         emb, db, delta_out, True, True, True)
    for name, a, b in zip(("x", "weight", "delta", "r", "s", "u", "v"), tied, untied):
        assert_scaled_close(a, b, TOLERANCE[dtype], f"backward op, tied against untied: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_hparams_grad(backend):
    """hparams not requiring grad (the weight step of the trainer): its gradient is skipped, the rest holds."""
    args = hp_args(3, 4, 6, 5, 3)
    check_against_reference(backend, args, torch.float64, requires=set(NAMES) - {"hparams"})
    check_against_reference(backend, args, torch.float64, requires={"hparams"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    args = hp_args(3, 0, 5, 4, 2)
    y, g = grads_of(op(backend), args, torch.zeros(0, 4, dtype=torch.float64))
    assert y.shape == (0, 4)
    for name, grad, a in zip(NAMES, g, args):
        assert grad.shape == a.shape, name
        assert torch.count_nonzero(grad) == 0, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_and_gradgradcheck(backend, bias):
    args = [None if a is None else a.requires_grad_(True) for a in hp_args(2, 2, 3, 3, 2, bias, bias)]
    fn = op(backend)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_backends_agree_with_the_e1_e2_op():
    """The op equals embedding the hyperparameters first and calling hyper_batch_ensemble_linear."""
    args = hp_args(4, 3, 6, 5, 3)
    x, w, d, r, s, u, v, hp, emb, b, db = args
    e = F.linear(hp, emb)
    expected = hyperkern.ops.hyper_batch_ensemble_linear(x, w, d, r, s, u, v, e[:, :5], b, db, e[:, 5:],
                                                         backend="torch")
    for p in BACKENDS:
        if _CPU[p.values[0]] is None:
            torch.testing.assert_close(op(p.values[0])(*args), expected, rtol=1e-12, atol=1e-12)


def test_bad_input_names_the_argument():
    args = hp_args(2, 3, 4, 5, 3)
    call = hyperkern.ops.hyper_batch_ensemble_linear_hp
    bad = list(args)
    bad[8] = args[8][:5]  # an (out, m) embedding with delta_bias given
    with pytest.raises(ValueError, match=r"embedding must have shape \(10, 3\) \(\(2\*out_features, num_hparams\)"):
        call(*bad, backend="torch")
    bad = list(args)
    bad[10] = None  # (2*out, m) embedding without delta_bias
    with pytest.raises(ValueError, match=r"embedding must have shape \(5, 3\)"):
        call(*bad)
    bad = list(args)
    bad[7] = args[7][:4]
    with pytest.raises(ValueError, match=r"hparams must have shape \(6, num_hparams\)"):
        call(*bad)
    bad = list(args)
    bad[7] = args[7][:, 0]
    with pytest.raises(ValueError, match="hparams must be 2-D"):
        call(*bad)
    bad = list(args)
    bad[8] = args[8].float()
    with pytest.raises(TypeError, match="embedding has dtype torch.float32"):
        call(*bad)
    bad = list(args)
    bad[7] = args[7].clone()
    bad[7][1, 1] = float("nan")
    with pytest.raises(ValueError, match="hparams contains NaN"):
        call(*bad)
    bad = list(args)
    bad[8] = torch.ones(10, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="embedding must be a floating tensor"):
        call(*bad)


def test_direct_op_call_with_bad_shapes_raises():
    if _CPU["cpp"] is not None:
        pytest.skip(_CPU["cpp"])
    args = hp_args(2, 3, 4, 5, 3)
    bad = list(args)
    bad[8] = args[8][:5]
    with pytest.raises(RuntimeError, match="embedding"):
        torch.ops.hyperkern.hyper_batch_ensemble_linear_hp(*bad)
    bad = list(args)
    bad[7] = args[7][:4]
    with pytest.raises(RuntimeError, match="hparams must have shape"):
        torch.ops.hyperkern.hyper_batch_ensemble_linear_hp(*bad)


def test_opcheck_cpp_ops():
    if _CPU["cpp"] is not None:
        pytest.skip(_CPU["cpp"])
    for bias in (True, False):
        args = [None if a is None else a.float().requires_grad_(True) for a in hp_args(2, 3, 5, 4, 3, bias, bias)]
        torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_linear_hp.default, tuple(args))
        x, w, d, r, s, u, v, hp, emb, _, db = [None if a is None else a.detach() for a in args]
        _, delta_out = torch.ops.hyperkern.hyper_batch_ensemble_linear_hp(x, w, d, r, s, u, v, hp, emb, None, db)
        g = torch.randn(6, 4)
        for flags in ((bias, True, True), (bias, False, False)):
            torch.library.opcheck(torch.ops.hyperkern.hyper_batch_ensemble_linear_hp_backward.default,
                                  (g, x, w, d, r, s, u, v, hp, emb, db, delta_out, *flags))


# ---------------------------------------------------------------------------------------------
# the layer

def _layer(backend, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = HyperBatchEnsembleLinear(12, 10, bias, ensemble_size=4, num_hparams=3, backend=backend, dtype=dtype)
    with torch.no_grad():  # an embedding that matters (the default init is ~1e-4)
        layer.embedding.weight.normal_(0.0, 0.5)
        if bias:
            layer.delta_bias.normal_()
    return layer


def _old_forward(layer, x, hparams):
    """The layer's forward before this op: embed(), then the e1 / e2 op."""
    e1, e2 = layer.embed(hparams)
    T = math.prod(x.shape[1:-1])
    if T != 1:
        e1 = e1.repeat_interleave(T, 0)
        e2 = None if e2 is None else e2.repeat_interleave(T, 0)
    y = hyperkern.ops.hyper_batch_ensemble_linear(x.reshape(-1, layer.in_features), layer.weight, layer.delta,
                                                  layer.r, layer.s, layer.u, layer.v, e1, layer.bias,
                                                  layer.delta_bias, e2, backend=layer.backend)
    return y.reshape(*x.shape[:-1], layer.out_features)


def _outputs_and_grads(layer, fn, x, hparams):
    layer.zero_grad()
    x, hparams = x.clone().requires_grad_(True), hparams.clone().requires_grad_(True)
    y = fn(x, hparams)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, hparams.grad, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("middle", [(), (3,)])
def test_layer_equals_the_old_e1_e2_path(backend, bias, middle):
    layer = _layer(backend, bias)
    x = torch.randn(4 * 5, *middle, 12)
    hparams = torch.rand(4 * 5, 3)
    new = _outputs_and_grads(layer, lambda a, h: layer(a, h), x, hparams)
    old = _outputs_and_grads(layer, lambda a, h: _old_forward(layer, a, h), x, hparams)
    exact = backend == "torch" and not middle  # the same composition of the same ops
    for a, b in zip(new[:3], old[:3]):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    for name in old[3]:
        if exact:
            assert torch.equal(new[3][name], old[3][name]), name
        else:
            torch.testing.assert_close(new[3][name], old[3][name], rtol=2e-5, atol=2e-6, msg=name)


def saved_storages(layer, fn) -> dict:
    """{storage pointer: (bytes, shape of the first tensor saved on it)} of what autograd saves while fn()
    runs, the layer's parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in storages and t.untyped_storage().nbytes() > 0:
            storages[key] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "torch"])
def test_layer_forward_does_not_save_the_embeddings(backend):
    """The fused backends save x, delta_out and hparams for the backward; the old path also kept e
    ((E*B, 2*out), e1 and e2 being views of it). No saved tensor is (E*B, 2*out) or a second (E*B, out) one."""
    layer = _layer(backend)
    N, out = 4 * 64, layer.out_features
    x, hparams = torch.randn(N, 12), torch.rand(N, 3).requires_grad_(True)
    new = saved_storages(layer, lambda: layer(x, hparams)).values()
    old = saved_storages(layer, lambda: _old_forward(layer, x, hparams)).values()
    new_bytes, new_shapes = sum(b for b, _ in new), [shape for _, shape in new]
    old_bytes = sum(b for b, _ in old)
    assert (N, 2 * out) not in new_shapes
    assert new_shapes.count((N, out)) <= 1, new_shapes  # delta_out only
    assert old_bytes - new_bytes >= N * 2 * out * 4, (old_bytes, new_bytes)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
def test_layer_compiles_fullgraph(backend):
    layer = _layer(backend)
    x, hparams = torch.randn(8, 2, 12), torch.rand(8, 3)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y_c, gx_c, gh_c, g_c = _outputs_and_grads(layer, lambda a, h: compiled(a, h), x, hparams)
    y_e, gx_e, gh_e, g_e = _outputs_and_grads(layer, lambda a, h: layer(a, h), x, hparams)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(gh_c, gh_e)
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], msg=name)
