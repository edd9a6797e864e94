"""hyperkern.ops.hyper_l2_penalty: every hyper layer's L2 penalty in one op.

The fused "cpp" op against the per-layer composition (the "torch" backend) and against the penalty
written out per row, in float64: the value and every gradient, for linear and conv (4-D) weights, with
and without a bias, each layer with its own strength columns. Then gradcheck, double backward,
torch.library.opcheck, torch.compile, the gradients reaching lam and hparams (the composition the op
falls back to), the "torch" fallback, the models' one op call, and the errors.
"""
import os
import subprocess
import sys

import pytest
import torch

import hyperkern.nn as hnn
from hyperkern import ops
from hyperkern._backends import backend_status
from hyperkern.ops.penalty import PenaltyStats, _fast_ok, _torch_layer_penalty, penalty_stats

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CPP = {d: backend_status(d, "hyper_l2_penalty")["cpp"] for d in DEVICES}
needs_cpp = pytest.mark.skipif(CPP["cpu"] is not None, reason=str(CPP["cpu"]))
E, B, M, G = 3, 4, 5, 4  # members, rows per member, hyperparameters, strength columns

# (weight shape, bias, kernel column, bias column): linear and conv weights, with and without a bias
LAYERS = [((6, 4), True, 0, 3), ((8, 3, 3, 3), False, 1, 0), ((5, 2, 3, 3), True, 2, 1), ((7, 5), False, 3, 2)]


def _layers(dtype=F64, device="cpu", layers=LAYERS, seed=0):
    """(weights, deltas, embeddings, biases, delta_biases, kernel_cols, bias_cols), parameters requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def param(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype=dtype, device=device).requires_grad_()

    out = ([], [], [], [], [], [], [])
    for shape, bias, kg, bg in layers:
        o = shape[0]
        for lst, value in zip(out, (param(*shape), param(*shape), param(o * (2 if bias else 1), M),
                                    param(E, o) if bias else None, param(E, o) if bias else None, kg, bg)):
            lst.append(value)
    return out


def _rows(dtype=F64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    lam = (torch.rand(E * B, G, generator=g, dtype=F64) * 10).to(dtype=dtype, device=device)
    z = torch.rand(E * B, M, generator=g, dtype=F64).to(dtype=dtype, device=device)
    return lam, z


def _params(w, d, a, b, db):
    return w + d + a + [t for t in b if t is not None] + [t for t in db if t is not None]


def _per_row(w, d, a, b, db, kc, bc, lam, z):
    """The penalty written out: sum over layers of mean_i lam_i[g] ||W + D e1_i||^2 + lam_i[h] ||b_k + db_k e2_i||^2."""
    total = 0.0
    for W, D, A, bias, dbias, kg, bg in zip(w, d, a, b, db, kc, bc):
        out = W.shape[0]
        e = z @ A.T
        bcast = (-1,) + (1,) * (W.dim() - 1)
        acc = 0.0
        for i in range(z.shape[0]):
            acc = acc + lam[i, kg] * (W + D * e[i, :out].reshape(bcast)).square().sum()
            if bias is not None:
                acc = acc + lam[i, bg] * (bias[i // B] + dbias[i // B] * e[i, out:]).square().sum()
        total = total + acc / z.shape[0]
    return total


def _composition(w, d, a, b, db, kc, bc, stats):
    """Today's per-layer composition, summed: what each layer computed before the fused op."""
    return sum(_torch_layer_penalty(*layer, stats, kg, bg) for *layer, kg, bg in zip(w, d, a, b, db, kc, bc))


def test_penalty_stats_are_the_row_means():
    lam, z = _rows()
    s = penalty_stats(lam, z, E)
    torch.testing.assert_close(s.mean, lam.mean(0))
    torch.testing.assert_close(s.c, lam.T @ z / (E * B))
    torch.testing.assert_close(s.M, torch.einsum("ng,na,nb->gab", lam, z, z) / (E * B))
    lm, zm = lam.reshape(E, B, G), z.reshape(E, B, M)
    torch.testing.assert_close(s.mean_member, lm.mean(1))
    torch.testing.assert_close(s.c_member, torch.einsum("ebg,ebm->egm", lm, zm) / B)
    torch.testing.assert_close(s.M_member, torch.einsum("ebg,eba,ebc->egac", lm, zm, zm) / B)
    assert s.num_hparams == M and s.overall.shape == (G, 1 + M + M * M) and s.member.shape == (E, G, 1 + M + M * M)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_value_and_gradients_match_the_composition_and_the_per_row_sum(backend):
    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    params = _params(w, d, a, b, db)
    got = ops.hyper_l2_penalty(w, d, a, b, db, penalty_stats(lam, z, E), kc, bc, backend=backend)
    assert got.shape == () and got.dtype == F64
    want = _composition(w, d, a, b, db, kc, bc, penalty_stats(lam, z, E))
    explicit = _per_row(w, d, a, b, db, kc, bc, lam, z)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, explicit)
    for g_got, g_want, g_explicit in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params),
                                         torch.autograd.grad(explicit, params)):
        torch.testing.assert_close(g_got, g_want)
        torch.testing.assert_close(g_got, g_explicit)


@needs_cpp
def test_gradients_reach_lam_and_hparams():
    """Statistics that carry a graph (lam, hparams requiring grad) take the composition: every gradient
    still matches, the strengths' and the hyperparameters' included."""
    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    lam.requires_grad_()
    z.requires_grad_()
    inputs = _params(w, d, a, b, db) + [lam, z]
    got = ops.hyper_l2_penalty(w, d, a, b, db, penalty_stats(lam, z, E), kc, bc, backend="cpp")
    want = _per_row(w, d, a, b, db, kc, bc, lam, z)
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(g_got, g_want)


@needs_cpp
def test_the_fused_op_runs_once_forward_and_once_backward():
    """With the statistics free of a graph: one hyperkern::hyper_l2_penalty call for all layers and one
    backward op call for all their gradients."""
    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    stats = penalty_stats(lam, z, E)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.hyper_l2_penalty(w, d, a, b, db, stats, kc, bc, backend="cpp").backward()
    names = [e.name for e in prof.events()]
    assert names.count("hyperkern::hyper_l2_penalty") >= 1 and names.count("hyperkern::hyper_l2_penalty_backward") >= 1
    # besides them only autograd's: the seed gradient (ones_like) and AccumulateGrad's detach
    allowed = {"aten::ones_like", "aten::empty_like", "aten::fill_", "aten::empty_strided", "aten::detach"}
    assert {n for n in names if n.startswith("aten::")} <= allowed, sorted(set(names))


@needs_cpp
def test_gradcheck_and_gradgradcheck():
    layers = [((3, 2), True, 0, 1), ((2, 1, 2, 2), False, 1, 0)]
    w, d, a, b, db, kc, bc = _layers(layers=layers)
    lam, z = _rows()
    stats = penalty_stats(lam, z, E)
    params = _params(w, d, a, b, db)
    nw = len(w)

    def f(*p):  # params in _params order: weights, deltas, embeddings, the bias, the delta bias
        return ops.hyper_l2_penalty(list(p[:nw]), list(p[nw:2 * nw]), list(p[2 * nw:3 * nw]), [p[3 * nw], None],
                                    [p[3 * nw + 1], None], stats, kc, bc, backend="cpp")

    assert torch.autograd.gradcheck(f, params)
    assert torch.autograd.gradgradcheck(f, params)
    # the statistics too (the composition's path)
    lam.requires_grad_()
    z.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lam, z, *p: ops.hyper_l2_penalty(w, d, a, b, db, penalty_stats(lam, z, E), kc, bc, backend="cpp"),
        [lam, z])


@needs_cpp
def test_double_backward_matches_the_torch_backend():
    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    stats = penalty_stats(lam, z, E)
    params = _params(w, d, a, b, db)

    def second_order(backend):
        p = ops.hyper_l2_penalty(w, d, a, b, db, stats, kc, bc, backend=backend)
        grads = torch.autograd.grad(p, params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), params)

    for got, want in zip(second_order("cpp"), second_order("torch")):
        torch.testing.assert_close(got, want)


@needs_cpp
def test_backward_op_direct_call_matches_the_composition():
    """The backward op, fused (nothing requires grad) and as its differentiable composition, against autograd
    of the composition; an empty tensor for a layer without a bias."""
    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    stats = penalty_stats(lam, z, E)
    params = _params(w, d, a, b, db)
    want = torch.autograd.grad(_composition(w, d, a, b, db, kc, bc, stats) * 0.7, params)
    g = torch.tensor(0.7, dtype=F64)
    det = [[t.detach() if t is not None else None for t in lst] for lst in (w, d, a, b, db)]
    for args in (det, (w, d, a, b, db)):
        dW, dD, dA, dB, dDB = torch.ops.hyperkern.hyper_l2_penalty_backward(g, *args, *stats, kc, bc)
        assert [t.numel() for t, bias in zip(dB, b) if bias is None] == [0, 0]
        got = dW + dD + dA + [t for t, bias in zip(dB, b) if bias is not None] + \
            [t for t, bias in zip(dDB, b) if bias is not None]
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)


@needs_cpp
def test_opcheck():
    w, d, a, b, db, kc, bc = _layers(layers=[((3, 2), True, 0, 1), ((2, 1, 2, 2), False, 1, 0)])
    lam, z = _rows()
    stats = penalty_stats(lam, z, E)
    op, backward = torch.ops.hyperkern.hyper_l2_penalty.default, torch.ops.hyperkern.hyper_l2_penalty_backward.default
    torch.library.opcheck(op, (w, d, a, b, db, *stats, kc, bc))  # parameters require grad: the autograd Function
    det = [[t.detach() if t is not None else None for t in lst] for lst in (w, d, a, b, db)]
    torch.library.opcheck(op, (*det, *stats, kc, bc))  # nothing requires grad: the kernel
    g = torch.tensor(1.3, dtype=F64)
    torch.library.opcheck(backward, (g, *det, *stats, kc, bc))  # the fused backward kernel
    torch.library.opcheck(backward, (g.requires_grad_(), w, d, a, b, db, *stats, kc, bc))  # its composition


@needs_cpp
def test_torch_compile_fullgraph():
    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    params = _params(w, d, a, b, db)

    def f(lam, z):
        return ops.hyper_l2_penalty(w, d, a, b, db, penalty_stats(lam, z, E), kc, bc, backend="cpp")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(lam, z), f(lam, z)
    torch.testing.assert_close(got, want)
    for x, y in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(x, y)


@needs_cpp
def test_a_models_penalty_compiles_fullgraph():
    from hyperkern.models import resnet20

    torch._dynamo.reset()
    model = resnet20(10, variant="hyper_batch", ensemble_size=2, dtype=F64, depth=8, width=2)
    lam = model.hparam_space.denormalize(torch.rand(4, model.num_hparams, dtype=F64))
    compiled = torch.compile(model.l2_penalty, fullgraph=True, backend="aot_eager")
    params = [t for layer, _, _ in model._l2_layers for t in layer._penalty_args() if t is not None]
    got, want = compiled(lam), model.l2_penalty(lam)
    torch.testing.assert_close(got, want)
    for x, y in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(x, y)
    torch._dynamo.reset()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_float64(dtype):
    w, d, a, b, db, kc, bc = _layers(dtype=dtype)
    lam, z = _rows(dtype=dtype)
    got = ops.hyper_l2_penalty(w, d, a, b, db, penalty_stats(lam, z, E), kc, bc, backend="cpp")
    grads = torch.autograd.grad(got, _params(w, d, a, b, db))
    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    want = ops.hyper_l2_penalty(w, d, a, b, db, penalty_stats(lam, z, E), kc, bc, backend="torch")
    wgrads = torch.autograd.grad(want, _params(w, d, a, b, db))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-2}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().item())
    for x, y in zip(grads, wgrads):
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol * y.abs().max().item())


@needs_cpp
def test_the_result_does_not_depend_on_the_thread_count():
    w, d, a, b, db, kc, bc = _layers(layers=[((96, 64, 3, 3), True, 0, 1), ((300, 200), False, 1, 0)], seed=3)
    lam, z = _rows()
    stats = penalty_stats(lam, z, E)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            p = ops.hyper_l2_penalty(w, d, a, b, db, stats, kc, bc, backend="cpp")
            results.append([p] + list(torch.autograd.grad(p, _params(w, d, a, b, db))))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_the_cpu():
    if CPP["cuda"] is not None:
        pytest.skip(CPP["cuda"])
    many = LAYERS * 7  # more layers than one launch's table holds
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
        results = {}
        for device in ("cpu", "cuda"):
            w, d, a, b, db, kc, bc = _layers(dtype=dtype, device=device, layers=many)
            lam, z = _rows(dtype=dtype, device=device)
            p = ops.hyper_l2_penalty(w, d, a, b, db, penalty_stats(lam, z, E), kc, bc, backend="cpp")
            results[device] = [p] + list(torch.autograd.grad(p, _params(w, d, a, b, db)))
        for x, y in zip(results["cuda"], results["cpu"]):
            torch.testing.assert_close(x.cpu(), y, rtol=tol, atol=tol)


def test_auto_and_the_torch_fallback(monkeypatch):
    """backend="auto" takes the fused op where the extension has it and the composition otherwise (a
    HYPERKERN_SKIP_EXTENSION install); "triton" is refused by name."""
    from hyperkern import _backends

    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    stats = penalty_stats(lam, z, E)
    want = ops.hyper_l2_penalty(w, d, a, b, db, stats, kc, bc, backend="torch")
    torch.testing.assert_close(ops.hyper_l2_penalty(w, d, a, b, db, stats, kc, bc), want)
    no_cpp = {key: dict(value, cpp="the compiled extension hyperkern._C could not be imported (test)")
              for key, value in _backends._STATUS.items()}
    monkeypatch.setattr(_backends, "_STATUS", no_cpp)
    monkeypatch.setattr(_backends, "_IMPLS", {})
    assert _backends.resolve_backend("auto", torch.device("cpu"), "hyper_l2_penalty") == "torch"
    torch.testing.assert_close(ops.hyper_l2_penalty(w, d, a, b, db, stats, kc, bc), want)
    with pytest.raises(ValueError, match="backend='cpp' is not available"):
        ops.hyper_l2_penalty(w, d, a, b, db, stats, kc, bc, backend="cpp")
    with pytest.raises(ValueError, match="no Triton kernel for the penalty"):
        ops.hyper_l2_penalty(w, d, a, b, db, stats, kc, bc, backend="triton")


def test_without_the_extension_the_models_take_the_composition():
    """As in a HYPERKERN_SKIP_EXTENSION install (hyperkern._C not importable): the penalty still works."""
    code = """
import sys
sys.modules["hyperkern._C"] = None  # the import fails as where the extension was never built
import torch
from hyperkern import _backends
from hyperkern.models import resnet20
assert _backends._CPP_ERROR is not None
model = resnet20(10, variant="hyper_batch", ensemble_size=2, depth=8, width=2)
lam = model.hparam_space.denormalize(torch.rand(4, model.num_hparams))
model.l2_penalty(lam).backward()
assert all(p.grad is not None for p in model.slow_parameters() if p.dim() > 1)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_models_and_layers_use_one_op(backend):
    """A hyper model's l2_penalty: the op once for all layers, equal to the layers' own penalties summed."""
    from hyperkern.models import resnet20

    model = resnet20(10, variant="hyper_batch", ensemble_size=2, backend=backend, dtype=F64, depth=8, width=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding" in name or "delta" in name:
                p.normal_(0, 0.3)
    lam = model.hparam_space.denormalize(torch.rand(4, model.num_hparams, dtype=F64))
    total = model.l2_penalty(lam)
    names = list(model.hparam_names)
    layers = 0.0
    for layer, kg, bg in model._l2_layers:
        cols = torch.stack((lam[:, names.index(kg)], lam[:, names.index(bg)]), 1)
        z = model.hparam_space.normalize(lam)
        layers = layers + layer.l2_penalty(cols[:, 0], z, cols[:, 1])
    torch.testing.assert_close(total, layers)
    if backend == "auto" and CPP["cpu"] is None:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.l2_penalty(lam).backward()
        names = [e.name for e in prof.events()]
        assert names.count("hyperkern::hyper_l2_penalty_backward") >= 1
        assert not any(n in names for n in ("aten::mv", "aten::square", "aten::pow"))


def test_empty_and_bad_inputs_name_the_argument():
    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    stats = penalty_stats(lam, z, E)
    assert _fast_ok(w, d, a, b, db, stats, kc, bc)

    def call(*args):  # the fast path refuses each bad call, which the full checks then name
        assert not _fast_ok(*args)
        return ops.hyper_l2_penalty(*args)

    with pytest.raises(ValueError, match="^weights must list at least one layer"):
        call([], [], [], [], [], stats, [], [])
    with pytest.raises(TypeError, match="^weights must be a list"):
        call(w[0], d, a, b, db, stats, kc, bc)
    with pytest.raises(ValueError, match=r"^deltas must have one entry per layer \(4, as weights\), got 3"):
        call(w, d[:3], a, b, db, stats, kc, bc)
    with pytest.raises(ValueError, match=r"^deltas\[1\] must have weights\[1\]'s shape"):
        call(w, [d[0], d[0], d[2], d[3]], a, b, db, stats, kc, bc)
    with pytest.raises(ValueError, match=r"^embeddings\[0\] must have shape \(12, 5\)"):
        call(w, d, [a[0][:6]] + a[1:], b, db, stats, kc, bc)
    with pytest.raises(ValueError, match=r"^biases\[0\] and delta_biases\[0\] must be both"):
        call(w, d, a, b, [None] + db[1:], stats, kc, bc)
    with pytest.raises(ValueError, match=r"^biases\[2\] must have shape \(E, out\) = \(3, 5\)"):
        call(w, d, a, b[:2] + [b[2][:2]] + b[3:], db, stats, kc, bc)
    with pytest.raises(ValueError, match=r"^kernel_cols\[1\] must be a column index in \[0, 4\)"):
        call(w, d, a, b, db, stats, [0, 4, 0, 0], bc)
    with pytest.raises(ValueError, match=r"^bias_cols\[0\] must be a column index"):
        call(w, d, a, b, db, stats, kc, [-1, 0, 0, 0])
    with pytest.raises(TypeError, match="^stats must be a PenaltyStats"):
        call(w, d, a, b, db, tuple(stats.overall), kc, bc)
    with pytest.raises(ValueError, match="^stats must hold K = 1 \\+ m \\+ m\\^2 values"):
        call(w, d, a, b, db, penalty_stats(lam, z[:, :4], E), kc, bc)
    with pytest.raises(TypeError, match=r"^stats.overall is torch.float32"):
        call(w, d, a, b, db, penalty_stats(lam.float(), z, E), kc, bc)
    with pytest.raises(TypeError, match=r"^weights\[2\] is torch.float32"):
        call(w[:2] + [w[2].float()] + w[3:], d, a, b, db, stats, kc, bc)
    with pytest.raises(TypeError, match=r"^delta_biases\[2\] is torch.float64 on meta but weights\[0\] is "):
        call(w, d, a, b, db[:2] + [db[2].to("meta")] + db[3:], stats, kc, bc)
    with pytest.raises(ValueError, match="^backend must be one of"):
        ops.hyper_l2_penalty(w, d, a, b, db, stats, kc, bc, backend="gpu")


@needs_cpp
def test_raw_op_refuses_what_would_be_memory_unsafe():
    w, d, a, b, db, kc, bc = _layers()
    lam, z = _rows()
    stats = penalty_stats(lam, z, E)
    det = [[t.detach() if t is not None else None for t in lst] for lst in (w, d, a, b, db)]
    op = torch.ops.hyperkern.hyper_l2_penalty
    with pytest.raises(RuntimeError, match="weights must list at least one layer"):
        op([], [], [], [], [], *stats, [], [])
    with pytest.raises(RuntimeError, match="kernel_cols\\[0\\] = 9 is not a column"):
        op(*det, *stats, [9, 0, 0, 0], bc)
    with pytest.raises(RuntimeError, match="must have one entry per layer"):
        op(*det, *stats, kc[:2], bc)
    with pytest.raises(RuntimeError, match="embeddings\\[1\\] must be"):
        op(det[0], det[1], [det[2][0], det[2][0]] + det[2][2:], det[3], det[4], *stats, kc, bc)
    with pytest.raises(RuntimeError, match="member_stats"):
        op(*det, stats.overall, stats.member[:, :2], kc, bc)
    with pytest.raises(RuntimeError, match=r"deltas\[2\] must have weights\[0\]'s dtype"):
        op(det[0], det[1][:2] + [det[1][2].float()] + det[1][3:], *det[2:], *stats, kc, bc)


def test_penalty_stats_type_is_exported():
    assert ops.PenaltyStats is PenaltyStats and hnn.layers.PenaltyStats is PenaltyStats
