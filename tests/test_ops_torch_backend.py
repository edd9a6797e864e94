"""The torch backend (the plain composition) against the float64 member loop."""
import pytest
import torch

import hyperkern
from hyperkern.ops import reference as ref


def _linear_args(E, B, fin, fout, bias=True, dtype=torch.float64):
    x = torch.randn(E * B, fin, dtype=dtype)
    w = torch.randn(fout, fin, dtype=dtype)
    r = torch.randn(E, fin, dtype=dtype)
    s = torch.randn(E, fout, dtype=dtype)
    b = torch.randn(E, fout, dtype=dtype) if bias else None
    return x, w, r, s, b


@pytest.mark.parametrize("E,B,fin,fout", [(1, 1, 3, 5), (4, 3, 17, 9), (7, 2, 16, 33)])
def test_batch_ensemble_linear_torch_matches_member_loop(E, B, fin, fout):
    args = _linear_args(E, B, fin, fout)
    y = hyperkern.ops.batch_ensemble_linear(*args, backend="torch")
    torch.testing.assert_close(y, ref.batch_ensemble_linear_reference(*args))


def test_member_major_layout_is_respected():
    # Member 1's rows must use member 1's fast weights: swapping r rows must change only the
    # corresponding row blocks.
    x, w, r, s, b = _linear_args(2, 3, 4, 5)
    y = hyperkern.ops.batch_ensemble_linear(x, w, r, s, b, backend="torch")
    y0 = (x[:3] * r[0]) @ w.T * s[0] + b[0]
    torch.testing.assert_close(y[:3], y0)


@pytest.mark.parametrize("E,B,bias", [(1, 1, False), (3, 2, True)])
def test_hyper_batch_ensemble_linear_torch_matches_member_loop(E, B, bias):
    fin, fout = 6, 5
    x, w, r, s, b = _linear_args(E, B, fin, fout, bias)
    d = torch.randn(fout, fin, dtype=torch.float64)
    u, v = torch.randn(E, fin, dtype=torch.float64), torch.randn(E, fout, dtype=torch.float64)
    e1 = torch.randn(E * B, fout, dtype=torch.float64)
    db = torch.randn(E, fout, dtype=torch.float64) if bias else None
    e2 = torch.randn(E * B, fout, dtype=torch.float64) if bias else None
    y = hyperkern.ops.hyper_batch_ensemble_linear(x, w, d, r, s, u, v, e1, b, db, e2, backend="torch")
    torch.testing.assert_close(y, ref.hyper_batch_ensemble_linear_reference(x, w, d, r, s, u, v, e1, b, db, e2))


@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (1, (2, 1), (1, 2), 2)])
def test_batch_ensemble_conv2d_torch_matches_member_loop(groups, stride, padding, dilation):
    E, B, cin, cout = 3, 2, 4, 6
    x = torch.randn(E * B, cin, 7, 8, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, 3, 3, dtype=torch.float64)
    r, s, b = torch.randn(E, cin, dtype=torch.float64), torch.randn(E, cout, dtype=torch.float64), \
        torch.randn(E, cout, dtype=torch.float64)
    y = hyperkern.ops.batch_ensemble_conv2d(x, w, r, s, b, stride, padding, dilation, groups, backend="torch")
    torch.testing.assert_close(y, ref.batch_ensemble_conv2d_reference(x, w, r, s, b, stride, padding, dilation, groups))


def test_hyper_batch_ensemble_conv2d_torch_matches_member_loop():
    E, B, cin, cout = 2, 2, 3, 4
    f = lambda *sh: torch.randn(*sh, dtype=torch.float64)  # noqa: E731
    x, w, d = f(E * B, cin, 5, 5), f(cout, cin, 3, 3), f(cout, cin, 3, 3)
    r, u, s, v, b, db = f(E, cin), f(E, cin), f(E, cout), f(E, cout), f(E, cout), f(E, cout)
    e1, e2 = f(E * B, cout), f(E * B, cout)
    y = hyperkern.ops.hyper_batch_ensemble_conv2d(x, w, d, r, s, u, v, e1, b, db, e2, 1, 1, backend="torch")
    torch.testing.assert_close(y, ref.hyper_batch_ensemble_conv2d_reference(x, w, d, r, s, u, v, e1, b, db, e2, 1, 1))


def test_bad_inputs_name_the_argument():
    x, w, r, s, b = _linear_args(4, 2, 8, 5)
    with pytest.raises(ValueError, match="divisible by the ensemble size"):
        hyperkern.ops.batch_ensemble_linear(x[:7], w, r, s, b)
    with pytest.raises(ValueError, match=r"^r must have shape \(4, 8\)"):
        hyperkern.ops.batch_ensemble_linear(x, w, r[:, :7], s, b)
    with pytest.raises(ValueError, match=r"^s must have shape"):
        hyperkern.ops.batch_ensemble_linear(x, w, r, s[:, :4], b)
    with pytest.raises(ValueError, match=r"^bias must have shape"):
        hyperkern.ops.batch_ensemble_linear(x, w, r, s, b[:3])
    with pytest.raises(TypeError, match="^s has dtype"):
        hyperkern.ops.batch_ensemble_linear(x, w, r, s.float(), b)
    with pytest.raises(ValueError, match="backend must be one of"):
        hyperkern.ops.batch_ensemble_linear(x, w, r, s, b, backend="cuda")
    with pytest.raises(TypeError, match="^x must be a torch.Tensor"):
        hyperkern.ops.batch_ensemble_linear(x.numpy(), w, r, s, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["e1", "e2"])
def test_non_finite_embeddings_are_refused(bad, which):
    E, B, fin, fout = 2, 3, 4, 5
    x, w, r, s, b = _linear_args(E, B, fin, fout, dtype=torch.float32)
    f = lambda *sh: torch.randn(*sh)  # noqa: E731
    args = dict(delta=f(fout, fin), u=f(E, fin), v=f(E, fout), e1=f(E * B, fout), delta_bias=f(E, fout),
                e2=f(E * B, fout))
    args[which][4, 2] = bad
    with pytest.raises(ValueError, match=f"^{which} contains NaN or Inf"):
        hyperkern.ops.hyper_batch_ensemble_linear(x, w, args["delta"], r, s, args["u"], args["v"], args["e1"], b,
                                                  args["delta_bias"], args["e2"], backend="torch")
    # finite values whose sum overflows float32 are still accepted
    huge = torch.full((E * B, fout), 3e38)
    hyperkern.ops.hyper_batch_ensemble_linear(x, w, args["delta"], r, s, args["u"], args["v"], huge, b,
                                              args["delta_bias"], huge, backend="torch")


def test_auto_backend_order(monkeypatch):
    """"auto": cpp on the CPU; on CUDA cpp before Triton (measured faster on an H200, docs/benchmark-history.md),
    Triton where cpp is missing, the torch composition where neither is there."""
    from hyperkern import _backends
    op = "batch_ensemble_conv2d"
    cuda = torch.device("cuda")
    monkeypatch.setitem(_backends._STATUS, ("cuda", op), {"torch": None, "cpp": None, "triton": None})
    assert _backends.resolve_backend("auto", cuda, op) == "cpp"
    monkeypatch.setitem(_backends._STATUS, ("cuda", op), {"torch": None, "cpp": "not built", "triton": None})
    assert _backends.resolve_backend("auto", cuda, op) == "triton"
    monkeypatch.setitem(_backends._STATUS, ("cuda", op), {"torch": None, "cpp": "not built", "triton": "missing"})
    assert _backends.resolve_backend("auto", cuda, op) == "torch"
    with pytest.raises(ValueError, match="backend='cpp' is not available for cuda tensors: not built"):
        _backends.resolve_backend("cpp", cuda, op)
