"""hyperkern.nn layers against the float64 member loops of hyperkern.ops.reference."""

import pytest
import torch

import hyperkern
import hyperkern.nn as hnn
from hyperkern.ops import reference as ref

F64 = torch.float64


def _randomise_(layer):
    """Give every parameter (embeddings included) O(1) random values so each term matters."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


# ---------------------------------------------------------------------------------------------
# BatchEnsemble layers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_batch_ensemble_linear_matches_member_loop(bias):
    E, B = 3, 4
    layer = _randomise_(hnn.BatchEnsembleLinear(5, 7, bias, ensemble_size=E, backend="torch", dtype=F64))
    x = torch.randn(E * B, 5, dtype=F64)
    want = ref.batch_ensemble_linear_reference(x, layer.weight, layer.r, layer.s, layer.bias)
    torch.testing.assert_close(layer(x), want)
    # extra middle dimensions keep each row with its member: (E*B, T, in)
    x3 = torch.randn(E * B, 2, 5, dtype=F64)
    y3 = layer(x3)
    for t in range(2):
        torch.testing.assert_close(y3[:, t], ref.batch_ensemble_linear_reference(x3[:, t], layer.weight, layer.r,
                                                                                 layer.s, layer.bias))


@pytest.mark.parametrize("stride,padding,dilation,groups,bias", [(1, 1, 1, 1, True), (2, 0, 1, 2, False),
                                                                  ((2, 1), (1, 2), 2, 1, True)])
def test_batch_ensemble_conv2d_matches_member_loop(stride, padding, dilation, groups, bias):
    E, B = 2, 3
    layer = _randomise_(hnn.BatchEnsembleConv2d(4, 6, 3, stride, padding, dilation, groups, bias, ensemble_size=E,
                                                backend="torch", dtype=F64))
    x = torch.randn(E * B, 4, 7, 8, dtype=F64)
    want = ref.batch_ensemble_conv2d_reference(x, layer.weight, layer.r, layer.s, layer.bias, layer.stride,
                                               layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x), want)


def test_parameters_shapes_and_init():
    torch.manual_seed(1)
    E = 64
    lin = hnn.BatchEnsembleLinear(300, 200, ensemble_size=E)
    assert lin.weight.shape == (200, 300) and lin.r.shape == (E, 300) and lin.s.shape == (E, 200)
    assert lin.bias.shape == (E, 200) and torch.count_nonzero(lin.bias) == 0
    # nn.Linear's weight init: U(-1/sqrt(in), 1/sqrt(in))
    assert lin.weight.abs().max() <= 300 ** -0.5 and lin.weight.abs().max() > 0.9 * 300 ** -0.5
    # fast weights N(1, 0.5^2)
    assert abs(lin.r.mean().item() - 1) < 0.02 and abs(lin.r.std().item() - 0.5) < 0.02
    conv = hnn.BatchEnsembleConv2d(64, 128, 3, ensemble_size=E, init="random_sign")
    assert set(conv.r.unique().tolist()) == {-1.0, 1.0} and set(conv.s.unique().tolist()) == {-1.0, 1.0}
    # He normal (truncated at 2 std, variance 2 / fan_in)
    fan_in = 64 * 9
    assert abs(conv.weight.var().item() * fan_in / 2 - 1) < 0.05
    assert conv.weight.abs().max() <= 2 * (2 / fan_in) ** 0.5 / 0.8796 + 1e-6
    hyper = hnn.HyperBatchEnsembleLinear(100, 50, ensemble_size=E, num_hparams=3, init_std=0.75)
    assert abs(hyper.r.std().item() - 0.75) < 0.03
    assert abs(hyper.embedding.weight.std().item() - 1e-4) < 2e-5
    ones = hnn.BatchEnsembleLinear(4, 3, ensemble_size=2, init="ones")
    assert torch.all(ones.r == 1) and torch.all(ones.s == 1)
    # reset_parameters re-draws
    before = conv.weight.clone()
    conv.reset_parameters()
    assert not torch.equal(before, conv.weight)


def test_extra_repr_and_docstrings_state_layout():
    layer = hnn.HyperBatchEnsembleConv2d(3, 8, 3, padding=1, ensemble_size=4, num_hparams=6)
    text = repr(layer)
    assert "ensemble_size=4" in text and "num_hparams=6" in text and "tie_fast_weights=True" in text
    for cls in (hnn.BatchEnsembleLinear, hnn.BatchEnsembleConv2d, hnn.HyperBatchEnsembleLinear,
                hnn.HyperBatchEnsembleConv2d):
        assert "member-major" in cls.__doc__.lower() or "member-major" in (cls.__init__.__doc__ or "").lower()


# ---------------------------------------------------------------------------------------------
# Hyper-batch layers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_hyper_linear_matches_member_loop(tie, bias):
    E, B, m = 2, 3, 4
    layer = _randomise_(hnn.HyperBatchEnsembleLinear(5, 6, bias, ensemble_size=E, num_hparams=m, tie_fast_weights=tie,
                                                     backend="torch", dtype=F64))
    x, z = torch.randn(E * B, 5, dtype=F64), torch.rand(E * B, m, dtype=F64)
    e = z @ layer.embedding.weight.T  # the embedding, written out: e = E_l z
    e1, e2 = (e[:, :6], e[:, 6:]) if bias else (e, None)
    want = ref.hyper_batch_ensemble_linear_reference(x, layer.weight, layer.delta, layer.r, layer.s, layer.u, layer.v,
                                                     e1, layer.bias, layer.delta_bias, e2)
    torch.testing.assert_close(layer(x, z), want)


@pytest.mark.parametrize("tie,bias,stride,groups", [(True, False, 1, 1), (False, True, 2, 2)])
def test_hyper_conv2d_matches_member_loop(tie, bias, stride, groups):
    E, B, m = 2, 2, 3
    layer = _randomise_(hnn.HyperBatchEnsembleConv2d(4, 6, 3, stride, 1, 1, groups, bias, ensemble_size=E,
                                                     num_hparams=m, tie_fast_weights=tie, backend="torch", dtype=F64))
    x, z = torch.randn(E * B, 4, 6, 5, dtype=F64), torch.rand(E * B, m, dtype=F64)
    e = z @ layer.embedding.weight.T
    e1, e2 = (e[:, :6], e[:, 6:]) if bias else (e, None)
    want = ref.hyper_batch_ensemble_conv2d_reference(x, layer.weight, layer.delta, layer.r, layer.s, layer.u, layer.v,
                                                     e1, layer.bias, layer.delta_bias, e2, layer.stride,
                                                     layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x, z), want)


def test_tied_fast_weights_are_the_same_parameter():
    tied = hnn.HyperBatchEnsembleLinear(4, 3, ensemble_size=2, num_hparams=2, backend="torch")
    assert tied.u is tied.r and tied.v is tied.s
    with torch.no_grad():
        tied.r.add_(1.0)
    assert torch.equal(tied.u, tied.r)
    # each parameter once: weight, r, s, bias, delta, delta_bias, embedding.weight
    assert len(list(tied.parameters())) == 7
    assert [n for n, _ in tied.named_fast_parameters()] == ["r", "s"]
    untied = hnn.HyperBatchEnsembleConv2d(4, 3, 1, ensemble_size=2, num_hparams=2, tie_fast_weights=False)
    assert untied.u is not untied.r and not torch.equal(untied.u, untied.r)
    assert [n for n, _ in untied.named_fast_parameters()] == ["r", "s", "u", "v"]
    # gradient reaches r through both products when tied
    x, z = torch.randn(4, 4), torch.rand(4, 2)
    tied(x, z).sum().backward()
    assert tied.r.grad is not None and tied.r.grad.abs().sum() > 0


def test_hyper_state_dict_round_trip_and_tied_load_check():
    a = _randomise_(hnn.HyperBatchEnsembleLinear(4, 3, ensemble_size=2, num_hparams=2, backend="torch"))
    b = hnn.HyperBatchEnsembleLinear(4, 3, ensemble_size=2, num_hparams=2, backend="torch")
    b.load_state_dict(a.state_dict())
    x, z = torch.randn(4, 4), torch.rand(4, 2)
    torch.testing.assert_close(b(x, z), a(x, z), rtol=0, atol=0)
    assert b.u is b.r
    untied = _randomise_(hnn.HyperBatchEnsembleLinear(4, 3, ensemble_size=2, num_hparams=2, tie_fast_weights=False))
    with pytest.raises(RuntimeError, match="tie_fast_weights"):
        b.load_state_dict(untied.state_dict())


def test_embedding_starts_as_batch_ensemble():
    """With the default N(0, 1e-4^2) embedding the hyper layer is (almost) the BatchEnsemble layer."""
    E, B = 2, 3
    h = hnn.HyperBatchEnsembleLinear(8, 5, ensemble_size=E, num_hparams=3, backend="torch", dtype=F64)
    x, z = torch.randn(E * B, 8, dtype=F64), torch.rand(E * B, 3, dtype=F64)
    be = ref.batch_ensemble_linear_reference(x, h.weight, h.r, h.s, h.bias)
    diff = (h(x, z) - be).abs().max().item()
    assert 0 < diff < 1e-2


@pytest.mark.parametrize("bias", [True, False])
def test_l2_penalty_equals_explicit_per_row_sum(bias):
    E, B, m = 3, 4, 5
    for layer in (hnn.HyperBatchEnsembleLinear(6, 4, bias, ensemble_size=E, num_hparams=m, dtype=F64),
                  hnn.HyperBatchEnsembleConv2d(3, 4, 3, bias=bias, ensemble_size=E, num_hparams=m, dtype=F64)):
        _randomise_(layer)
        z = torch.rand(E * B, m, dtype=F64)
        lam, lam_b = torch.rand(E * B, dtype=F64) * 10, torch.rand(E * B, dtype=F64)
        e = z @ layer.embedding.weight.T
        out = layer.weight.shape[0]
        bcast = (-1,) + (1,) * (layer.weight.dim() - 1)
        want = 0.0
        for i in range(E * B):
            k = i // B
            w_i = layer.weight + layer.delta * e[i, :out].reshape(bcast)
            want = want + lam[i] * w_i.square().sum()
            if bias:
                b_i = layer.bias[k] + layer.delta_bias[k] * e[i, out:]
                want = want + lam_b[i] * b_i.square().sum()
        want = want / (E * B)
        got = layer.l2_penalty(lam, z, lam_bias=lam_b if bias else None)
        torch.testing.assert_close(got, want)
        # the same gradients as the explicit sum, for every parameter, the hyperparameters and the strengths
        z.requires_grad_()
        lam.requires_grad_()
        inputs = [p for p in layer.parameters() if p.requires_grad] + [z, lam]
        got = layer.l2_penalty(lam, z, lam_bias=lam_b if bias else None)
        e = z @ layer.embedding.weight.T
        want = 0.0
        for i in range(E * B):
            w_i = layer.weight + layer.delta * e[i, :out].reshape(bcast)
            want = want + lam[i] * w_i.square().sum()
            if bias:
                want = want + lam_b[i] * (layer.bias[i // B] + layer.delta_bias[i // B] * e[i, out:]).square().sum()
        for g_got, g_want in zip(torch.autograd.grad(got, inputs, allow_unused=True, materialize_grads=True),
                                 torch.autograd.grad(want / (E * B), inputs, allow_unused=True, materialize_grads=True)):
            torch.testing.assert_close(g_got, g_want)
        z.requires_grad_(False)
        lam = lam.detach()
        # lam given as a column works too, and lam_bias defaults to lam
        torch.testing.assert_close(layer.l2_penalty(lam[:, None], z), layer.l2_penalty(lam, z, lam_bias=lam))
    # gradients flow to the embedding (the penalty depends on e1)
    layer.embedding.weight.grad = None
    layer.l2_penalty(lam, z).backward()
    assert layer.embedding.weight.grad.abs().sum() > 0


def test_layer_bad_inputs_name_the_argument():
    lin = hnn.BatchEnsembleLinear(4, 3, ensemble_size=2, backend="torch")
    with pytest.raises(ValueError, match="^x must have shape"):
        lin(torch.randn(4, 5))
    with pytest.raises(ValueError, match="divisible by the ensemble size"):
        lin(torch.randn(3, 4))
    conv = hnn.BatchEnsembleConv2d(3, 4, 3, ensemble_size=2, backend="torch")
    with pytest.raises(ValueError, match=r"^x must have shape \(E\*B, in_channels=3"):
        conv(torch.randn(2, 4, 5, 5))
    hyp = hnn.HyperBatchEnsembleLinear(4, 3, ensemble_size=2, num_hparams=3, backend="torch")
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"^hparams must have shape \(E\*B, num_hparams=3\)"):
        hyp(x, torch.rand(4, 2))
    with pytest.raises(ValueError, match="^hparams must have one row per input row"):
        hyp(x, torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"^hparams must be normalised hyperparameters in \[0, 1\]"):
        hyp(x, torch.rand(4, 3) + 1)
    with pytest.raises(TypeError, match="^hparams must be a torch.Tensor"):
        hyp(x, [[0.5] * 3] * 4)
    one_nan = torch.full((4, 3), 0.5)
    one_nan[1, 2] = float("nan")  # the range said [nan, nan]: where the finite values lie, and how many are NaN
    with pytest.raises(ValueError, match=r"got finite values in \[0.5, 0.5\], 1 NaN of 12$"):
        hyp(x, one_nan)
    hyp(x, torch.rand(4, 3) + 1, check_range=False)  # models check the range once, layers may skip it
    with pytest.raises(ValueError, match="^lam must have shape"):
        hyp.l2_penalty(torch.rand(3), torch.rand(4, 3))
    for kwargs, match in ((dict(ensemble_size=0), "^ensemble_size"), (dict(ensemble_size=2, init="uniform"), "^init"),
                          (dict(ensemble_size=2, backend="cuda"), "^backend")):
        with pytest.raises(ValueError, match=match):
            hnn.BatchEnsembleLinear(4, 3, **kwargs)
    with pytest.raises(ValueError, match="^padding"):
        hnn.BatchEnsembleConv2d(3, 4, 3, padding="full", ensemble_size=2)


@pytest.mark.parametrize("family", ["linear", "conv"])
@pytest.mark.parametrize("backend", ["auto", "torch", "cpp", "triton"])
def test_layers_run_on_every_available_backend(backend, family):
    """The layer code does not care which backend runs the op: same result as the member loop."""
    for op in (f"batch_ensemble_{family}", f"hyper_batch_ensemble_{family}"):
        op = op.replace("_conv", "_conv2d")
        reason = hyperkern.backend_status("cpu", op)[backend] if backend != "auto" else None
        if reason is not None:
            pytest.skip(f"backend {backend!r} cannot run {op} here: {reason}")
    E, B = 2, 2
    if family == "linear":
        lin = _randomise_(hnn.HyperBatchEnsembleLinear(16, 16, ensemble_size=E, num_hparams=2, backend=backend))
        x, z = torch.randn(E * B, 16), torch.rand(E * B, 2)
        e = z @ lin.embedding.weight.T
        want = ref.hyper_batch_ensemble_linear_reference(x, lin.weight, lin.delta, lin.r, lin.s, lin.u, lin.v,
                                                         e[:, :16], lin.bias, lin.delta_bias, e[:, 16:])
        torch.testing.assert_close(lin(x, z).double(), want, rtol=1e-4, atol=1e-4)
        be = _randomise_(hnn.BatchEnsembleLinear(16, 16, ensemble_size=E, backend=backend))
        want = ref.batch_ensemble_linear_reference(x, be.weight, be.r, be.s, be.bias)
        torch.testing.assert_close(be(x).double(), want, rtol=1e-4, atol=1e-4)
    else:
        conv = _randomise_(hnn.BatchEnsembleConv2d(16, 16, 3, padding=1, ensemble_size=E, backend=backend))
        xc = torch.randn(E * B, 16, 4, 4)
        want = ref.batch_ensemble_conv2d_reference(xc, conv.weight, conv.r, conv.s, conv.bias, 1, 1)
        torch.testing.assert_close(conv(xc).double(), want, rtol=1e-4, atol=1e-3)
        hc = _randomise_(hnn.HyperBatchEnsembleConv2d(16, 16, 3, padding=1, ensemble_size=E, num_hparams=2,
                                                      backend=backend))
        z = torch.rand(E * B, 2)
        e = z @ hc.embedding.weight.T
        want = ref.hyper_batch_ensemble_conv2d_reference(xc, hc.weight, hc.delta, hc.r, hc.s, hc.u, hc.v, e[:, :16],
                                                         hc.bias, hc.delta_bias, e[:, 16:], 1, 1)
        torch.testing.assert_close(hc(xc, z).double(), want, rtol=1e-4, atol=2e-3)


def test_hyper_layers_do_not_reread_their_own_embeddings(monkeypatch):
    """The public hyper ops check e1 / e2 for NaN / Inf (reading the values: a device sync on CUDA);
    the layers compute e1, e2 from checked hparams and skip that per-layer check."""
    from hyperkern.ops import _validate

    E, B, m = 2, 3, 4
    lin = hnn.HyperBatchEnsembleLinear(5, 6, ensemble_size=E, num_hparams=m)
    conv = hnn.HyperBatchEnsembleConv2d(3, 4, 3, padding=1, ensemble_size=E, num_hparams=m)
    hp = torch.rand(E * B, m)
    x, img = torch.randn(E * B, 5), torch.randn(E * B, 3, 6, 6)
    want = (lin(x, hp), conv(img, hp))
    reads = []
    monkeypatch.setattr(_validate, "check_finite", lambda name, t: reads.append(name))
    got = (lin(x, hp), conv(img, hp))
    assert reads == []
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.undo()
    e1 = lin.embed(hp)[0].detach().clone()
    e1[1, 2] = float("nan")
    with pytest.raises(ValueError, match="e1 contains NaN or Inf"):
        hyperkern.ops.hyper_batch_ensemble_linear(x, lin.weight, lin.delta, lin.r, lin.s, lin.u, lin.v, e1,
                                                  lin.bias, lin.delta_bias, lin.embed(hp)[1])


@pytest.mark.parametrize("hyper", [False, True], ids=["batch", "hyper"])
def test_linear_layers_follow_parametrizations_and_functional_call(hyper):
    """The layers read their parameters from _parameters (cheaper than attribute access) and fall back
    to attributes where a parametrization moved one out: both ways must give what attribute reads give."""
    import torch.nn.utils.parametrize as P
    from torch.func import functional_call

    from hyperkern.nn import BatchEnsembleLinear, HyperBatchEnsembleLinear

    torch.manual_seed(0)
    kw = dict(ensemble_size=2)
    layer = HyperBatchEnsembleLinear(5, 3, num_hparams=2, **kw) if hyper else BatchEnsembleLinear(5, 3, **kw)
    x, hp = torch.randn(4, 5), torch.rand(4, 2)
    call = (lambda m, **p: m(x, hp)) if hyper else (lambda m, **p: m(x))
    y0 = call(layer)

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    P.register_parametrization(layer, "weight", Double())
    with torch.no_grad():
        expected_layer = HyperBatchEnsembleLinear(5, 3, num_hparams=2, **kw) if hyper else BatchEnsembleLinear(5, 3, **kw)
        expected_layer.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
                                         for k, v in layer.state_dict().items()})
        expected_layer.weight.mul_(2)
    torch.testing.assert_close(call(layer), call(expected_layer))
    assert not torch.allclose(call(layer), y0)
    P.remove_parametrizations(layer, "weight", leave_parametrized=False)  # a plain parameter again, the original
    torch.testing.assert_close(call(layer), y0)

    params = {n: torch.zeros_like(p) if n == "r" else p for n, p in layer.named_parameters()}
    y = functional_call(layer, params, (x, hp) if hyper else (x,))
    assert not torch.allclose(y, y0)
    # r = 0 removes the weight branch: what is left is the bias (and for the hyper layer its Delta
    # branch, whose u is r when tied)
    if not hyper:
        torch.testing.assert_close(y, layer.bias.repeat_interleave(2, 0))
