"""backend="triton" of the rank-1 linear ops against the float64 member loop (hyperkern.ops.reference).

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); tensors are then CPU tensors. Shapes are tiny on
purpose: the interpreter is slow. With a GPU the same tests run on CUDA tensors.
"""
import pytest
import torch
import torch._library.custom_ops
import torch.utils._python_dispatch
import torch.utils._pytree

import hyperkern
from hyperkern._backends import backend_status
from hyperkern.ops import reference as ref

if backend_status("cuda" if torch.cuda.is_available() else "cpu")["triton"] is not None:
    pytest.skip(f"triton backend unavailable: {backend_status()['triton']}", allow_module_level=True)

from hyperkern.kernels import rank1_linear as kernels  # noqa: E402
# registers the hyperkern::*_triton ops and puts the backend module in sys.modules (torch.compile dispatch)
from hyperkern.ops import _triton_linear  # noqa: E402, F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
# On the GPU fp32 runs on TF32 tensor cores (tf32x3 under the default "highest" precision).
FP32_TOL = dict(rtol=2e-3, atol=2e-3) if ON_GPU else dict(rtol=1e-4, atol=1e-4)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _batch_args(E, B, fin, fout, bias=True, dtype=torch.float32):
    return [_randn(E * B, fin, dtype=dtype), _randn(fout, fin, dtype=dtype), _randn(E, fin, dtype=dtype),
            _randn(E, fout, dtype=dtype), _randn(E, fout, dtype=dtype) if bias else None]


def _hyper_args(E, B, fin, fout, bias=True, delta_bias=True, dtype=torch.float32):
    x, w, r, s, b = _batch_args(E, B, fin, fout, bias, dtype)
    d, u, v, e1 = _randn(fout, fin, dtype=dtype), _randn(E, fin, dtype=dtype), _randn(E, fout, dtype=dtype), \
        _randn(E * B, fout, dtype=dtype)
    db = _randn(E, fout, dtype=dtype) if delta_bias else None
    e2 = _randn(E * B, fout, dtype=dtype) if delta_bias else None
    return [x, w, d, r, s, u, v, e1, b, db, e2]


def _value_and_grads(fn, args, grad_out):
    """fn(*args) and the gradient of <fn(*args), grad_out> for every tensor argument (None stays None)."""
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    y = fn(*leaves)
    tensors = [a for a in leaves if a is not None]
    grads = iter(torch.autograd.grad(y, tensors, grad_out))
    return y.detach(), [None if a is None else next(grads) for a in leaves]


def _assert_matches_reference(triton_fn, reference_fn, args, names, **tol):
    probe = triton_fn(*args)
    grad_out = torch.randn_like(probe)
    y, grads = _value_and_grads(triton_fn, args, grad_out)
    args64 = [None if a is None else a.double() for a in args]
    y64, grads64 = _value_and_grads(reference_fn, args64, grad_out.double())
    assert y.dtype == args[0].dtype
    torch.testing.assert_close(y.double(), y64, **tol, msg=lambda m: f"output: {m}")
    for name, g, g64 in zip(names, grads, grads64):
        if g64 is None:
            assert g is None
            continue
        assert g is not None and g.shape == g64.shape and g.dtype == args[0].dtype, name
        torch.testing.assert_close(g.double(), g64, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def _batch_triton(*args):
    return hyperkern.ops.batch_ensemble_linear(*args, backend="triton")


def _hyper_triton(*args):
    return hyperkern.ops.hyper_batch_ensemble_linear(*args, backend="triton")


BATCH_NAMES = ["x", "weight", "r", "s", "bias"]
HYPER_NAMES = ["x", "weight", "delta", "r", "s", "u", "v", "e1", "bias", "delta_bias", "e2"]


# (E, B, in, out): E=1/B=1, several row tiles per member with B not a multiple of the tile, E=7,
# widths not multiples of 16
@pytest.mark.parametrize("E,B,fin,fout,bias", [(1, 1, 3, 5, True), (3, 37, 19, 45, True), (7, 2, 17, 33, False),
                                               (2, 16, 32, 16, False)])
def test_batch_ensemble_linear_matches_member_loop(E, B, fin, fout, bias):
    args = _batch_args(E, B, fin, fout, bias)
    _assert_matches_reference(_batch_triton, ref.batch_ensemble_linear_reference, args, BATCH_NAMES, **FP32_TOL)


@pytest.mark.parametrize("E,B,fin,fout,bias,delta_bias", [
    (1, 1, 3, 5, True, True), (3, 19, 21, 35, True, True), (3, 19, 21, 35, False, False), (7, 2, 17, 9, True, False),
    (2, 5, 16, 7, False, True)])
def test_hyper_batch_ensemble_linear_matches_member_loop(E, B, fin, fout, bias, delta_bias):
    args = _hyper_args(E, B, fin, fout, bias, delta_bias)
    _assert_matches_reference(_hyper_triton, ref.hyper_batch_ensemble_linear_reference, args, HYPER_NAMES,
                              **FP32_TOL)


@pytest.mark.parametrize("E,B,fin,fout,m,bias,delta_bias", [(1, 1, 3, 5, 2, True, True), (3, 19, 21, 35, 5, True, True),
                                                         (2, 5, 16, 7, 3, False, False)])
def test_hyper_batch_ensemble_linear_hp_matches_member_loop(E, B, fin, fout, m, bias, delta_bias):
    """The op with e(lambda) inside (hparams and the embedding weight given): every gradient, hparams and
    embedding included. Runs on the GPU in bench/gpu_suite.sh."""
    x, w, d, r, s, u, v, _, b, db, _ = _hyper_args(E, B, fin, fout, bias, delta_bias)
    hparams, embedding = torch.rand(E * B, m, device=DEVICE), _randn(2 * fout if delta_bias else fout, m)
    args = [x, w, d, r, s, u, v, hparams, embedding, b, db]
    names = ["x", "weight", "delta", "r", "s", "u", "v", "hparams", "embedding", "bias", "delta_bias"]
    _assert_matches_reference(lambda *a: hyperkern.ops.hyper_batch_ensemble_linear_hp(*a, backend="triton"),
                              ref.hyper_batch_ensemble_linear_hp_reference, args, names, **FP32_TOL)


class _NewTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every tensor an op call creates on new storage (factory ops and out-of-place results; views
    and in-place results share an input's storage), as (op, shape, numel). hyperkern's Python custom ops
    run their implementation under the mode too, so what they make inside is recorded as well."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = torch._library.custom_ops._maybe_get_opdef(func) if func.namespace == "hyperkern" else None
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.made.append((str(func), tuple(t.shape), t.numel()))
        return out


@pytest.mark.parametrize("delta_bias", [True, False])
def test_hyper_batch_ensemble_linear_hp_makes_no_embedding_sized_tensor(delta_bias):
    """e(lambda) inside the kernels: the forward makes no (E*B, out) tensor but y and the kept Delta product
    (x * u_k) @ Delta^T, the backward none at all (in < out, so dx is smaller), while every gradient, hparams
    and embedding included, is computed. The transient path (e1 = hparams @ embedding^T, de1, de2) fails this."""
    E, B, fin, fout, m = 2, 40, 6, 24, 3
    N = E * B
    x, w, d, r, s, u, v, _, b, db, _ = _hyper_args(E, B, fin, fout, True, delta_bias)
    hparams, embedding = torch.rand(N, m, device=DEVICE), _randn(2 * fout if delta_bias else fout, m)
    leaves = [None if a is None else a.detach().requires_grad_() for a in (x, w, d, r, s, u, v, hparams, embedding,
                                                                           b, db)]
    grad_out = _randn(N, fout)
    # once unrecorded: on a GPU the first call autotunes, and Triton's benchmark allocates a 256 MiB
    # buffer to flush the L2 cache between timings
    torch.autograd.grad(hyperkern.ops.hyper_batch_ensemble_linear_hp(*leaves, backend="triton"),
                        [t for t in leaves if t is not None], grad_out)
    with _NewTensors() as forward:
        y = hyperkern.ops.hyper_batch_ensemble_linear_hp(*leaves, backend="triton")
    with _NewTensors() as backward:
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_out)
    big = lambda made: [(op, shape) for op, shape, numel in made if numel >= N * fout]  # noqa: E731
    assert big(forward.made) == [("aten.empty.memory_format", (N, fout))] * 2, big(forward.made)  # y, delta_out
    assert big(backward.made) == [], big(backward.made)
    assert any(op.startswith("aten.sum") for op, _, _ in backward.made)  # the recorder saw the launchers' work
    args64 = [None if a is None else a.detach().double().requires_grad_() for a in leaves]
    y64 = ref.hyper_batch_ensemble_linear_hp_reference(*args64)
    grads64 = torch.autograd.grad(y64, [t for t in args64 if t is not None], grad_out.double())
    torch.testing.assert_close(y.detach().double(), y64.detach(), **FP32_TOL)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, **FP32_TOL)


def _strided(t):
    """Same values, non-contiguous layout (a transposed copy viewed back, or a column slice)."""
    return t.t().contiguous().t() if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 else \
        torch.cat([t, t], dim=-1)[..., ::2]


def test_non_contiguous_inputs_and_grad():
    E, B, fin, fout = 3, 7, 20, 12
    args = [None if a is None else _strided(a) for a in _hyper_args(E, B, fin, fout)]
    assert not any(a.is_contiguous() for a in args if a is not None)
    grad_out = _strided(_randn(E * B, fout))
    y, grads = _value_and_grads(_hyper_triton, args, grad_out)
    y64, grads64 = _value_and_grads(ref.hyper_batch_ensemble_linear_reference, [a.double() for a in args],
                                    grad_out.double())
    torch.testing.assert_close(y.double(), y64, **FP32_TOL)
    for name, g, g64 in zip(HYPER_NAMES, grads, grads64):
        torch.testing.assert_close(g.double(), g64, **FP32_TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
    bargs = [_strided(a) for a in _batch_args(E, B, fin, fout)]
    y, grads = _value_and_grads(_batch_triton, bargs, grad_out)
    y64, grads64 = _value_and_grads(ref.batch_ensemble_linear_reference, [a.double() for a in bargs],
                                    grad_out.double())
    torch.testing.assert_close(y.double(), y64, **FP32_TOL)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, **FP32_TOL)


def test_float64_path_is_exact_to_fp64_rounding():
    args = _hyper_args(2, 5, 7, 6, dtype=torch.float64)
    _assert_matches_reference(_hyper_triton, ref.hyper_batch_ensemble_linear_reference, args, HYPER_NAMES,
                              rtol=1e-10, atol=1e-10)
    bargs = _batch_args(3, 4, 9, 5, dtype=torch.float64)
    _assert_matches_reference(_batch_triton, ref.batch_ensemble_linear_reference, bargs, BATCH_NAMES,
                              rtol=1e-10, atol=1e-10)


def test_gradcheck_float64():
    bargs = [a.requires_grad_() for a in _batch_args(2, 2, 3, 4, dtype=torch.float64)]
    assert torch.autograd.gradcheck(_batch_triton, bargs, fast_mode=True)
    hargs = [a.requires_grad_() for a in _hyper_args(2, 2, 3, 4, dtype=torch.float64)]
    assert torch.autograd.gradcheck(_hyper_triton, hargs, fast_mode=True)


def test_partial_requires_grad_and_no_grad_mode():
    x, w, d, r, s, u, v, e1, b, db, e2 = _hyper_args(2, 3, 5, 4)
    w.requires_grad_()
    s.requires_grad_()
    y = _hyper_triton(x, w, d, r, s, u, v, e1, b, db, e2)
    gw, gs = torch.autograd.grad(y.sum(), (w, s))
    w64 = w.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    y64 = ref.hyper_batch_ensemble_linear_reference(x.double(), w64, d.double(), r.double(), s64, u.double(),
                                                    v.double(), e1.double(), b.double(), db.double(), e2.double())
    gw64, gs64 = torch.autograd.grad(y64.sum(), (w64, s64))
    torch.testing.assert_close(gw.double(), gw64, **FP32_TOL)
    torch.testing.assert_close(gs.double(), gs64, **FP32_TOL)
    with torch.no_grad():
        y_ng = _hyper_triton(x, w, d, r, s, u, v, e1, b, db, e2)
    assert not y_ng.requires_grad
    torch.testing.assert_close(y_ng, y.detach())


def test_e1_gradient_when_the_delta_product_was_not_stored():
    # Calling the op with save_delta_product=False makes the backward recompute (x * u_k) @ Delta^T.
    args = _hyper_args(2, 5, 6, 7)
    grad_out = _randn(10, 7)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    y, delta_product = torch.ops.hyperkern.hyper_batch_ensemble_linear_triton(*leaves, False)
    assert delta_product.shape == (0, 7) and not delta_product.requires_grad
    (de1,) = torch.autograd.grad(y, leaves[7], grad_out)
    args64 = [a.detach().double().requires_grad_() for a in args]
    y64 = ref.hyper_batch_ensemble_linear_reference(*args64)
    (de1_64,) = torch.autograd.grad(y64, args64[7], grad_out.double())
    torch.testing.assert_close(de1.double(), de1_64, **FP32_TOL)
    # stored by the forward: the product itself is (x * u_k) @ Delta^T
    x, w, d, r, s, u, v, e1, b, db, e2 = args
    _, stored = torch.ops.hyperkern.hyper_batch_ensemble_linear_triton(*args, True)
    expected = (x.double() * u.double().repeat_interleave(5, 0)) @ d.double().T
    torch.testing.assert_close(stored.double(), expected, **FP32_TOL)


def test_hp_gradients_when_the_delta_product_was_not_stored():
    # The hp op called with save_delta_product=False: the backward recomputes (x * u_k) @ Delta^T for the
    # d(embedding) / d(hparams) reductions of the row-wise kernel.
    x, w, d, r, s, u, v, _, b, db, _ = _hyper_args(2, 5, 6, 7)
    hp, emb = torch.rand(10, 2, device=DEVICE), _randn(14, 2)
    args = [x, w, d, r, s, u, v, hp, emb, b, db]
    grad_out = _randn(10, 7)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    y, delta_product = torch.ops.hyperkern.hyper_batch_ensemble_linear_hp_triton(*leaves, False)
    assert delta_product.shape == (0, 7)
    dhp, demb = torch.autograd.grad(y, leaves[7:9], grad_out)
    args64 = [a.detach().double().requires_grad_() for a in args]
    y64 = ref.hyper_batch_ensemble_linear_hp_reference(*args64)
    dhp64, demb64 = torch.autograd.grad(y64, args64[7:9], grad_out.double())
    torch.testing.assert_close(dhp.double(), dhp64, **FP32_TOL)
    torch.testing.assert_close(demb.double(), demb64, **FP32_TOL)


def test_empty_batch():
    x, w, r, s, b = _batch_args(2, 0, 5, 3)
    x.requires_grad_()
    w.requires_grad_()
    y = _batch_triton(x, w, r, s, b)
    assert y.shape == (0, 3)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == (0, 5) and torch.equal(gw, torch.zeros_like(gw))


def test_opcheck_all_ops():
    from torch.library import opcheck

    bargs = [a.requires_grad_() for a in _batch_args(2, 3, 5, 4)]
    opcheck(torch.ops.hyperkern.batch_ensemble_linear_triton, tuple(bargs))
    opcheck(torch.ops.hyperkern.batch_ensemble_linear_triton, (*bargs[:4], None))
    hargs = [a.requires_grad_() for a in _hyper_args(2, 3, 5, 4)]
    for save in (True, False):
        opcheck(torch.ops.hyperkern.hyper_batch_ensemble_linear_triton, (*hargs, save))
    opcheck(torch.ops.hyperkern.hyper_batch_ensemble_linear_triton, (*hargs[:8], None, None, None, True))
    g = _randn(6, 4)
    x, w, r, s, _ = [a.detach() for a in bargs]
    for flags in ((True, True, True), (False, False, True)):
        opcheck(torch.ops.hyperkern.batch_ensemble_linear_triton_backward, (g, x, w, r, s, *flags))
    x, w, d, r, s, u, v, e1, b, db, e2 = [a.detach() for a in hargs]
    _, hd = torch.ops.hyperkern.hyper_batch_ensemble_linear_triton(x, w, d, r, s, u, v, e1, b, db, e2, True)
    for flags in ((True, True, True, True, True), (False, False, False, True, False)):
        opcheck(torch.ops.hyperkern.hyper_batch_ensemble_linear_triton_backward,
                (g, x, w, d, r, s, u, v, e1, db, e2, hd, *flags))
    # the hp ops (e in-kernel), with and without delta_bias (embedding (2*out, m) / (out, m))
    hp = torch.rand(6, 3, device=DEVICE)
    for db_, emb in ((db, _randn(8, 3)), (None, _randn(4, 3))):
        hpargs = [t.detach().requires_grad_() for t in (x, w, d, r, s, u, v, hp, emb)]
        for save in (True, False):
            opcheck(torch.ops.hyperkern.hyper_batch_ensemble_linear_hp_triton, (*hpargs, b, db_, save))
        _, hd = torch.ops.hyperkern.hyper_batch_ensemble_linear_hp_triton(x, w, d, r, s, u, v, hp, emb, b, db_, True)
        for flags in ((True, True, True, True, True, True), (False, False, True, False, True, False),
                      (False, False, False, True, False, True)):
            opcheck(torch.ops.hyperkern.hyper_batch_ensemble_linear_hp_triton_backward,
                    (g, x, w, d, r, s, u, v, hp, emb, db_, hd, *flags))


def test_torch_compile_fullgraph_forward_and_backward():
    args = _hyper_args(2, 3, 6, 5)
    _, w2, r2, s2, b2 = _batch_args(2, 3, 5, 4)

    def two_layers(x, w, d, r, s, u, v, e1, b, db, e2):  # nothing but the custom ops: no C++ codegen here
        # the public API (validation and dispatch traced; hyperkern.ops._triton_linear is already imported)
        y = hyperkern.ops.hyper_batch_ensemble_linear(x, w, d, r, s, u, v, e1, b, db, e2, backend="triton")
        return hyperkern.ops.batch_ensemble_linear(y, w2, r2, s2, b2, backend="triton")

    compiled = torch.compile(two_layers, fullgraph=True, dynamic=False)
    grad_out = _randn(6, 4)
    eager_value, eager_grads = _value_and_grads(two_layers, args, grad_out)
    value, grads = _value_and_grads(compiled, args, grad_out)
    torch.testing.assert_close(value, eager_value, rtol=1e-5, atol=1e-5)
    for name, g, ge in zip(HYPER_NAMES, grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_python_fragment_coexists_with_the_cpp_library():
    import hyperkern._backends as backends

    if backends._CPP_ERROR is not None:
        pytest.skip(backends._CPP_ERROR)
    import sys

    assert "hyperkern._C" in sys.modules  # TORCH_LIBRARY(hyperkern) is registered ...
    for name in ("batch_ensemble_linear_triton", "batch_ensemble_linear_triton_backward",
                 "hyper_batch_ensemble_linear_triton", "hyper_batch_ensemble_linear_triton_backward"):
        op = getattr(torch.ops.hyperkern, name).default  # ... and the Python fragment's ops resolve next to it
        assert op._schema.name == f"hyperkern::{name}"


def test_dot_precision_follows_torch_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kernels.dot_precision(torch.float32) == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert kernels.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert kernels.dot_precision(torch.bfloat16) == "ieee"
    assert kernels.dot_precision(torch.float64) == "ieee"


def test_sm90_tile_table_is_complete_and_wgmma_shaped():
    # Every (kernel, operand class, op) the launchers can reach has tiles; tensor-core tiles are
    # wgmma-shaped (warpgroups of 4 warps, 64-row blocks) -- the static report checks the SASS.
    import itertools

    for key in itertools.product(("forward", "grad_input", "grad_weight"), ("16-bit", "tf32", "tf32x3", "fp64"),
                                 (False, True), (False, True), (False, True)):
        kind, cls, hyper, aligned, embed = key
        if embed and not hyper:
            continue
        tiles = kernels.tile_table(kind, cls, hyper, aligned, embed)
        assert tiles, key
        for m, n, k, warps, stages in tiles:
            assert warps % 4 == 0 and stages >= 1 and k >= 16 and n % 16 == 0
            if key[1] != "fp64":
                assert m % 64 == 0, (key, m)
    assert kernels.operand_layout_aligned((32, 48, 16), [_randn(4, 16)])
    assert not kernels.operand_layout_aligned((32, 19), [])
    assert not kernels.operand_layout_aligned((32,), [_randn(4, 17)[:, 1:]])  # 4-byte offset base pointer
    t = _randn(8, 6).t()
    assert kernels.unit_inner_stride(t).stride(-1) == 1 and torch.equal(kernels.unit_inner_stride(t), t)
    specs = kernels.sm90_compile_specs()
    names = {s["name"] for s in specs}
    assert {"rank1_linear_forward[batch]", "rank1_linear_forward[hyper]", "rank1_linear_grad_input[hyper]",
            "rank1_linear_grad_weight[hyper]", "rank1_linear_grad_rowwise[hyper]"} <= names
    for m in kernels.SM90_EMBED_M:  # the EMBED kernels (e in-kernel) for every checked number of hyperparameters
        assert {f"rank1_linear_{k}[embed m={m}]" for k in ("forward", "grad_input", "grad_weight",
                                                           "grad_rowwise")} <= names
    for spec in specs:
        assert set(spec["signature"]) == set(spec["fn"].arg_names)
        assert all(spec["signature"][name] == "constexpr" for name in spec["constexprs"])


def test_autotune_cache_key_separates_what_the_pruner_reads():
    # Both ops share one autotuned kernel per kind and pass same-dtype placeholders for the hyper-only
    # tensors: a key without HYPER made the hyper op reuse the batch op's tile at the same shape, which
    # did not fit in shared memory on an H200. Every argument the pruner reads must be in the key.
    for tuner in (kernels._forward, kernels._grad_input, kernels._grad_weight):
        assert {"HYPER", "EMBED", "M", "DOT_PRECISION", "ALIGNED", "E", "B", "IN", "OUT"} <= set(tuner.keys), \
            tuner.keys
    from hyperkern.kernels import rank1_conv

    # the conv ops have one autotuner per op, so HYPER is implied there
    assert rank1_conv._forward is not rank1_conv._hyper_forward
    for tuner in (rank1_conv._forward, rank1_conv._hyper_forward, rank1_conv._input_grad,
                  rank1_conv._hyper_input_grad, rank1_conv._weight_grad, rank1_conv._hyper_weight_grad):
        assert {"DOT_PRECISION", "ALIGNED"} <= set(tuner.keys), tuner.keys


def test_every_tile_pipeline_fits_sm90_shared_memory():
    # Measured on an H200 (Triton 3.6): the hyper grad_input tf32 tile (128, 128, 32) with 4 stages
    # asked for 262656 B = 4 stages x 4 operand tiles x 16 KiB + 512 B and could not launch.
    assert kernels.pipelined_shared_bytes("grad_input", "tf32", True, (128, 128, 32, 8, 4)) == 262144
    assert kernels.pipelined_shared_bytes("grad_input", "tf32", False, (128, 128, 32, 8, 4)) == 131072
    assert kernels.pipelined_shared_bytes("forward", "16-bit", True, (128, 64, 64, 8, 3)) == 3 * 2 * (
        128 * 64 + 2 * 64 * 64)
    assert kernels.pipelined_shared_bytes("grad_weight", "fp64", True, (32, 32, 32, 4, 2)) == 2 * 8 * 3 * 32 * 32
    for (kind, cls, hyper, _aligned), tiles in kernels._TILES.items():
        for tile in tiles:
            assert kernels.pipelined_shared_bytes(kind, cls, hyper, tile) <= kernels.SM90_MAX_SHARED, (kind, cls, tile)
    # the EMBED kernels load no e1 tile but M rows of embT (and M hp values) per stage
    assert kernels.pipelined_shared_bytes("grad_input", "tf32", True, (128, 128, 32, 8, 4), embed_m=3) == \
        4 * 4 * (3 * 128 * 32 + 3 * (128 + 32))
    assert kernels.pipelined_shared_bytes("forward", "tf32", True, (128, 64, 32, 8, 4), embed_m=8) == \
        kernels.pipelined_shared_bytes("forward", "tf32", True, (128, 64, 32, 8, 4))
    for (kind, cls, aligned), tiles in kernels._EMBED_TILES.items():
        for tile in tiles:
            assert kernels.pipelined_shared_bytes(kind, cls, True, tile, embed_m=max(kernels.SM90_EMBED_M)) <= \
                kernels.SM90_MAX_SHARED, (kind, cls, tile)
    # a smaller device (an A100: 166912 B per block) keeps only the tiles that fit, at least the smallest one
    tiles = kernels._TILES[("grad_input", "tf32", True, True)]
    fit = kernels.tiles_that_fit(tiles, "grad_input", "tf32", True, 166912)
    assert fit and all(kernels.pipelined_shared_bytes("grad_input", "tf32", True, t) <= 166912 for t in fit)
    assert len(fit) < len(tiles)
    assert kernels.tiles_that_fit(tiles, "grad_input", "tf32", True, 1) == [
        min(tiles, key=lambda t: kernels.pipelined_shared_bytes("grad_input", "tf32", True, t))]


@pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot is not faithful in the Triton interpreter; needs a GPU")
def test_bfloat16_on_gpu():
    args = [None if a is None else a.bfloat16() for a in _hyper_args(4, 100, 96, 80)]
    _assert_matches_reference(_hyper_triton, ref.hyper_batch_ensemble_linear_reference, args, HYPER_NAMES,
                              rtol=5e-2, atol=5e-1)



def test_static_gpu_report_verdicts_and_results_section(tmp_path):
    # The compile itself runs in CI (python -m bench.static_gpu_report --check); here its judgement
    # and the RESULTS.md section handling.
    report = pytest.importorskip("bench.static_gpu_report")
    clean = dict(module="m", name="k", dtype="bf16", config="c", mma="HGMMA", error=None, regs=200, stack=0, local=0,
                 LDL=0, STL=0, shared=100_000, HGMMA=4, HMMA=0, DMMA=0)
    assert report.problems(clean) == []
    assert report.problems(dict(clean, stack=16, LDL=2, STL=3))[0].startswith("spills")
    assert report.problems(dict(clean, HGMMA=0, HMMA=8)) == ["GEMM without HGMMA",
                                                             "HMMA (Ampere mma) in a Hopper GEMM build"]
    assert report.problems(dict(clean, shared=report.SM90_MAX_SHARED + 1))[0].startswith("shared memory")
    assert report.problems(dict(clean, mma="DMMA", dtype="fp64", HGMMA=0, DMMA=0)) == ["GEMM without DMMA"]
    assert report.problems(dict(clean, mma=None, HGMMA=0)) == []
    assert report.problems(dict(clean, error="boom"))[0].startswith("compile error")
    assert report.expected_mma(dict(gemm=True, dtype="fp64 strided")) == "DMMA"
    assert report.expected_mma(dict(gemm=True, dtype="fp32/tf32")) == "HGMMA"
    assert report.expected_mma(dict(gemm=False, dtype="bf16")) is None

    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\n## Op benchmark\n\nkeep me\n")
    report.write_results("first table", str(results))
    report.write_results("second table", str(results))
    text = results.read_text()
    assert text.count(report.SECTION) == 1 and "second table" in text and "first table" not in text
    assert "## Op benchmark\n\nkeep me\n" in text
    results.write_text(f"# results\n\n{report.SECTION}\n\nold\n\n## Later section\n\nkeep too\n")
    report.write_results("new", str(results))
    text = results.read_text()
    assert "old" not in text and "new" in text and text.endswith("## Later section\n\nkeep too\n")
    assert any(m.endswith(".rank1_linear") for m in report.kernel_modules())
