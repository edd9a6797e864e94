"""The C++ autograd of the cpp backend (csrc/autograd.cpp): gradients reach exactly the inputs that
require them, whichever optional tensors are absent (absent ones have no autograd edge, so the
edge index of every later input shifts), against the float64 member loops."""
import pytest
import torch

import hyperkern
from hyperkern._backends import backend_status
from hyperkern.ops import reference as ref

pytestmark = pytest.mark.skipif(backend_status("cpu")["cpp"] is not None, reason="cpp backend unavailable")

E, B = 3, 2


def _linear_args(hyper, bias, delta_bias):
    f = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    x, w, r, s = f(E * B, 5), f(4, 5), f(E, 5), f(E, 4)
    b = f(E, 4) if bias else None
    if not hyper:
        return [x, w, r, s, b], ()
    return [x, w, f(4, 5), r, s, f(E, 5), f(E, 4), f(E * B, 4), b, f(E, 4) if delta_bias else None,
            f(E * B, 4) if delta_bias else None], ()


def _conv_args(hyper, bias, delta_bias):
    args, _ = _linear_args(hyper, bias, delta_bias)
    x = torch.randn(E * B, 5, 6, 6, dtype=torch.float64)
    args[0] = x
    args[1] = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    if hyper:
        args[2] = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    return args, (1, 1, 1, 1)


OPS = {
    "batch_linear": (hyperkern.ops.batch_ensemble_linear, ref.batch_ensemble_linear_reference, _linear_args, False),
    "hyper_linear": (hyperkern.ops.hyper_batch_ensemble_linear, ref.hyper_batch_ensemble_linear_reference,
                     _linear_args, True),
    "batch_conv": (hyperkern.ops.batch_ensemble_conv2d, ref.batch_ensemble_conv2d_reference, _conv_args, False),
    "hyper_conv": (hyperkern.ops.hyper_batch_ensemble_conv2d, ref.hyper_batch_ensemble_conv2d_reference, _conv_args,
                   True),
}


@pytest.mark.parametrize("bias,delta_bias", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("name", list(OPS))
def test_gradients_reach_exactly_the_inputs_that_require_them(name, bias, delta_bias):
    op, reference, make, hyper = OPS[name]
    torch.manual_seed(0)
    args, geo = make(hyper, bias, delta_bias)
    present = [i for i, t in enumerate(args) if t is not None]
    for trial in range(4):
        wanted = {i for i in present if (i + trial) % 3 != 0}  # a different subset each time, x included or not
        if not wanted:
            continue
        ins = [None if t is None else t.clone().requires_grad_(i in wanted) for i, t in enumerate(args)]
        ref_ins = [None if t is None else t.clone().requires_grad_(i in wanted) for i, t in enumerate(args)]
        y = op(*ins, *geo, backend="cpp")
        y_ref = reference(*ref_ins, *geo)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(y_ref)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        for i, (a, b) in enumerate(zip(ins, ref_ins)):
            if a is None:
                continue
            if i in wanted:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"input {i}: {m}")
            else:
                assert a.grad is None, f"input {i} got a gradient it did not ask for"


# Double backward (create_graph=True) is supported since the backward ops' Autograd kernels run a
# differentiable composition: tests/test_ops_double_backward.py.


@pytest.mark.parametrize("scheme", ["member", "one_conv"])
@pytest.mark.parametrize("name", list(OPS))
def test_backward_fills_no_zero_gradient_for_kept_outputs(name, scheme, monkeypatch):
    """The kept, non-differentiable outputs (delta_out, the conv train ops' activations) get no gradient
    of zeros: autograd would otherwise allocate and fill one per call (set_materialize_grads(false)).
    Read from the profiler: no aten::zeros / aten::zero_ outside the ops' own kernels."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("HYPERKERN_CPU_CONV", scheme)
    op, _, make, _ = OPS[name]
    args, geometry = make(op is not hyperkern.ops.batch_ensemble_linear and "hyper" in name, True, True)
    args = [a.float().requires_grad_() if a is not None else None for a in args]
    y = op(*args, *geometry)
    g = torch.randn_like(y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y.backward(g)

    def inside_op(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("hyperkern::"):
                return True
            p = p.cpu_parent
        return False
    fills = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_")
             and not inside_op(e)]
    assert fills == []
    assert all(a.grad is not None for a in args if a is not None)
