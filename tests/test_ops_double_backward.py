"""Double backward on every backend: gradient penalties and Hessian-vector products do not depend on
the backend. A backward recorded by autograd (create_graph=True) runs a differentiable composition
(csrc/composite.cpp for "cpp", hyperkern/ops/_composite.py for "triton"); a first-order backward still
runs the fused backward kernels.

gradgradcheck runs in float64 on tiny shapes; under Triton's interpreter in its fast mode (random
projections instead of every element: each evaluation runs interpreted kernels).
"""
import pytest
import torch

from hyperkern import ops
from hyperkern._backends import backend_status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ("torch", "cpp", "triton") if backend_status(DEVICE)[b] is None]
E, B = 2, 2


def _f(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


def _args(name):
    """Positional tensor arguments (every optional one present) and the conv geometry."""
    if "linear" in name:
        x, w, d, cin, cout, geo = _f(E * B, 3), _f(2, 3), _f(2, 3), 3, 2, {}
    else:  # groups, stride and padding exercised
        x, w, d, cin, cout = _f(E * B, 2, 3, 3), _f(2, 1, 2, 2), _f(2, 1, 2, 2), 2, 2
        geo = dict(stride=2, padding=1, groups=2)
    if not name.startswith("hyper"):
        return [x, w, 1 + _f(E, cin) / 2, 1 + _f(E, cout) / 2, _f(E, cout)], geo
    if name.endswith("_hp"):  # hparams (E*B, m) and the embedding (2*out, m) in place of e1, e2
        return [x, w, d, 1 + _f(E, cin) / 2, 1 + _f(E, cout) / 2, 1 + _f(E, cin) / 2, 1 + _f(E, cout) / 2,
                torch.rand(E * B, 2, dtype=torch.float64, device=DEVICE), _f(2 * cout, 2), _f(E, cout),
                _f(E, cout)], geo
    return [x, w, d, 1 + _f(E, cin) / 2, 1 + _f(E, cout) / 2, 1 + _f(E, cin) / 2, 1 + _f(E, cout) / 2,
            _f(E * B, cout), _f(E, cout), _f(E, cout), _f(E * B, cout)], geo


NAMES = ["batch_ensemble_linear", "hyper_batch_ensemble_linear", "hyper_batch_ensemble_linear_hp",
         "batch_ensemble_conv2d", "hyper_batch_ensemble_conv2d"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_gradgradcheck(name, backend):
    op = getattr(ops, name)
    args, geo = _args(name)
    args = [a.requires_grad_() for a in args]
    interpreted = backend == "triton" and DEVICE == "cpu"
    assert torch.autograd.gradgradcheck(lambda *a: op(*a, backend=backend, **geo), args, fast_mode=interpreted)


def _seen_ops(fn):
    """The hyperkern ops dispatched while fn runs."""
    seen = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "hyperkern":
                seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_first_order_runs_fused_and_create_graph_gives_the_same_gradients(name, backend):
    op = getattr(ops, name)
    args, geo = _args(name)
    args = [a.requires_grad_() for a in args]
    y = op(*args, backend=backend, **geo)
    g = torch.randn_like(y)
    fused, composed = {}, {}
    seen = _seen_ops(lambda: fused.update(enumerate(torch.autograd.grad(y, args, g, retain_graph=True))))
    assert any(s.endswith("_backward") for s in seen), seen  # the fused backward op ran
    seen = _seen_ops(lambda: composed.update(enumerate(torch.autograd.grad(y, args, g, create_graph=True))))
    assert not any(s.endswith("_backward") for s in seen), seen  # the composition ran instead
    for i in fused:
        torch.testing.assert_close(composed[i], fused[i], rtol=1e-9, atol=1e-9, msg=lambda m: f"input {i}: {m}")
    assert composed[0].requires_grad and composed[1].requires_grad  # dx, dweight: recorded, differentiable


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("name", ["hyper_batch_ensemble_linear", "hyper_batch_ensemble_linear_hp",
                                  "hyper_batch_ensemble_conv2d"])
def test_gradient_penalty_and_hessian_vector_product_match_the_torch_backend(name, backend):
    op = getattr(ops, name)
    args, geo = _args(name)

    def penalty_grads(backend):
        ins = [a.detach().clone().requires_grad_() for a in args]
        y = op(*ins, backend=backend, **geo)
        (gx, gw) = torch.autograd.grad((y * y).sum(), ins[:2], create_graph=True)
        loss = (y.sum() + gx.square().sum() + gw.square().sum())  # a gradient penalty on x and on the weight
        return torch.autograd.grad(loss, ins)

    for got, want in zip(penalty_grads(backend), penalty_grads("torch")):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="cpp backend unavailable")
def test_backward_op_called_directly_is_differentiable():
    """The internal backward ops are ops of their own: differentiated directly, they agree with the
    composition's derivative (what opcheck's autograd checks exercise)."""
    x, w, r, s, _ = [a.requires_grad_() for a in _args("batch_ensemble_linear")[0]]
    g = _f(E * B, 2).requires_grad_()
    dx, dw, dr, ds, db = torch.ops.hyperkern.batch_ensemble_linear_backward(g, x, w, r, s, True, True)
    assert all(t.requires_grad for t in (dx, dw, dr, ds, db))
    assert torch.autograd.gradcheck(
        lambda *a: torch.ops.hyperkern.batch_ensemble_linear_backward(*a, True, True), (g, x, w, r, s))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="cpp backend unavailable")
def test_backward_ops_recorded_with_bad_shapes_raise():
    """A raw backward op call that autograd records (so the composition runs) with inconsistent shapes
    raises, as the fused kernels do; it never crashes (E = 0 would divide by zero)."""
    x, w, r, s, _ = [a.requires_grad_() for a in _args("batch_ensemble_linear")[0]]
    g = _f(E * B, 2)
    with pytest.raises(RuntimeError, match="E >= 1"):
        torch.ops.hyperkern.batch_ensemble_linear_backward(g, x, w, r[:0], s[:0], True, True)
    with pytest.raises(RuntimeError, match="rows"):
        torch.ops.hyperkern.batch_ensemble_linear_backward(g[:3], x[:3], w, r, s, True, True)
    with pytest.raises(RuntimeError):
        torch.ops.hyperkern.batch_ensemble_linear_backward(g, x, w, r[:, :2], s, True, True)
    args, _ = _args("hyper_batch_ensemble_conv2d")
    args = [a.requires_grad_() for a in args]
    x, w, d, r, s, u, v, e1, b, db, e2 = args
    gy = _f(E * B, 2, 3, 3)
    with pytest.raises(RuntimeError):
        torch.ops.hyperkern.hyper_batch_ensemble_conv2d_backward(gy, x, w, d, r, s, u, v, e1[:3], db, e2, x.new_empty(0),
                                                                 [1, 1], [1, 1], [1, 1], 2, [True] * 11)
