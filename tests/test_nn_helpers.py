"""tile / untile, per-row dropout, from_linear / from_conv2d / convert_, per-member batch norm."""
import pytest
import torch
import torch.nn as nn

import hyperkern.nn as hnn
from hyperkern.ops import reference as ref

F64 = torch.float64


def test_tile_is_member_major_and_untile_inverts_it():
    x = torch.arange(6.0).reshape(3, 2)
    t = hnn.tile(x, 2)
    assert t.tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5]]  # [x; x], not [x1, x1, x2, ...]
    u = hnn.untile(t, 2)
    assert u.shape == (2, 3, 2) and torch.equal(u[0], x) and torch.equal(u[1], x)
    img = torch.randn(4, 3, 5, 5)
    assert torch.equal(hnn.untile(hnn.tile(img, 3), 3)[2], img)
    with pytest.raises(ValueError, match="divisible by ensemble_size=4"):
        hnn.untile(t, 4)
    with pytest.raises(ValueError, match="ensemble_size must be a positive int"):
        hnn.tile(x, 0)


def test_rowwise_dropout_uses_each_rows_rate():
    torch.manual_seed(0)
    rates = torch.tensor([0.001, 0.1, 0.5, 0.9])
    x = torch.ones(4, 40000)
    y = hnn.rowwise_dropout(x, rates, training=True)
    dropped = (y == 0).double().mean(1)
    torch.testing.assert_close(dropped, rates.double(), atol=0.01, rtol=0)
    for i, p in enumerate(rates.tolist()):  # kept units are scaled by 1 / (1 - p_i): E[y_i] = x_i
        kept = y[i][y[i] != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
    torch.testing.assert_close(y.mean(1), torch.ones(4), atol=0.03, rtol=0)
    # image-shaped rows and a (N, 1) rate column; identity in eval
    img = torch.ones(2, 3, 50, 50)
    yi = hnn.rowwise_dropout(img, torch.tensor([[0.0], [0.75]]))
    assert torch.all(yi[0] == 1) and abs((yi[1] == 0).double().mean().item() - 0.75) < 0.03
    assert hnn.rowwise_dropout(x, rates, training=False) is x
    with pytest.raises(ValueError, match=r"^rate must have shape \(4,\)"):
        hnn.rowwise_dropout(x, rates[:3])


@pytest.mark.parametrize("shape", [(6, 7), (6, 2, 3, 3)])
def test_relu_rowwise_dropout_equals_relu_then_dropout_and_keeps_only_its_output(shape):
    """Same draws, values and gradients (x and the rates, float64) as rowwise_dropout(relu(x)), including
    a rate of 1 (keep probability clamped: no gradient) and a rate of 0; and what autograd keeps for
    the backward is the output and the rates only."""
    x0 = torch.randn(*shape, dtype=F64)
    rate0 = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0, 0.2], dtype=F64)
    g = torch.randn(*shape, dtype=F64)
    results = []
    for fused in (False, True):
        x, rate = x0.clone().requires_grad_(), rate0.clone().requires_grad_()
        torch.manual_seed(3)
        saved = []

        def pack(t):
            saved.append(t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = hnn.relu_rowwise_dropout(x, rate) if fused else hnn.rowwise_dropout(torch.relu(x), rate)
        y.backward(g)
        results.append((y.detach(), x.grad, rate.grad, saved, y))
    (y_ref, gx_ref, gr_ref, saved_ref, _), (y, gx, gr, saved, y_out) = results
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gr, gr_ref, rtol=1e-12, atol=1e-12)
    assert gr[4] == 0 and gr[0] != 0  # rate 1: clamped, no gradient; rate 0: a gradient
    full = [t for t in saved if t.numel() == y.numel()]
    assert len(full) == 1 and full[0].untyped_storage().data_ptr() == y_out.untyped_storage().data_ptr()
    assert sum(t.numel() for t in saved) < sum(t.numel() for t in saved_ref) / 2
    assert torch.equal(hnn.relu_rowwise_dropout(x0, rate0, training=False), torch.relu(x0))
    with pytest.raises(ValueError, match=r"^rate must have shape \(6,\)"):
        hnn.relu_rowwise_dropout(x0, rate0[:3])


def test_from_linear_and_conv2d_copy_the_weights():
    lin = nn.Linear(5, 4).double()
    be = hnn.from_linear(lin, ensemble_size=3, init="ones", backend="torch")
    assert be.weight.dtype == F64 and be.weight.data_ptr() != lin.weight.data_ptr()
    torch.testing.assert_close(be.weight, lin.weight, rtol=0, atol=0)
    torch.testing.assert_close(be.bias, lin.bias.expand(3, 4), rtol=0, atol=0)
    x = torch.randn(2, 5, dtype=F64)
    torch.testing.assert_close(be(hnn.tile(x, 3)), hnn.tile(lin(x), 3))  # r = s = 1: every member is lin
    with torch.no_grad():
        be.weight.add_(1.0)
    assert not torch.allclose(be.weight, lin.weight)  # a copy, not shared storage

    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3).double()
    bc = hnn.from_conv2d(conv, ensemble_size=2, backend="torch")
    assert (bc.stride, bc.padding, bc.groups) == ((2, 2), (1, 1), 3)
    xi = torch.randn(4, 3, 7, 7, dtype=F64)
    want = ref.batch_ensemble_conv2d_reference(xi, conv.weight, bc.r, bc.s, conv.bias.expand(2, 6), 2, 1, 1, 3)
    torch.testing.assert_close(bc(xi), want)
    hc = hnn.from_conv2d(nn.Conv2d(3, 4, 3, padding="same"), ensemble_size=2, num_hparams=2)
    assert isinstance(hc, hnn.HyperBatchEnsembleConv2d) and hc.padding == (1, 1)
    with pytest.raises(TypeError, match="^linear must be an nn.Linear"):
        hnn.from_linear(conv, ensemble_size=2)


def test_convert_replaces_nested_layers_and_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4 * 5 * 5, 8), nn.Tanh())),
                          nn.Linear(8, 3)).double()
    x = torch.randn(3, 2, 5, 5, dtype=F64)
    before = model(x)
    out = hnn.convert_(model, ensemble_size=2, init="ones", backend="torch")
    assert out is model
    assert isinstance(model[0], hnn.BatchEnsembleConv2d) and isinstance(model[2][1][0], hnn.BatchEnsembleLinear)
    assert isinstance(model[3], hnn.BatchEnsembleLinear)
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    torch.testing.assert_close(model(hnn.tile(x, 2)), hnn.tile(before, 2))
    assert len(list(hnn.fast_parameters(model))) == 6
    assert len(list(hnn.slow_parameters(model))) == 6  # 3 weights + 3 biases
    single = hnn.convert_(nn.Linear(3, 2), ensemble_size=2)
    assert isinstance(single, hnn.BatchEnsembleLinear)


def test_ensemble_batch_norm_matches_one_batch_norm_per_member():
    torch.manual_seed(0)
    E, B, C = 3, 4, 5
    ebn = hnn.EnsembleBatchNorm2d(C, ensemble_size=E).double()
    with torch.no_grad():
        ebn.weight.normal_()
        ebn.bias.normal_()
    bns = [nn.BatchNorm2d(C).double() for _ in range(E)]
    for k, bn in enumerate(bns):
        with torch.no_grad():
            bn.weight.copy_(ebn.weight[k])
            bn.bias.copy_(ebn.bias[k])
    x = torch.randn(E * B, C, 3, 3, dtype=F64) * torch.arange(1, E + 1, dtype=F64).repeat_interleave(B)[:, None, None, None]
    for _ in range(2):  # training: batch statistics per member and running stats per member
        y = ebn(x)
        want = torch.cat([bn(x[k * B:(k + 1) * B]) for k, bn in enumerate(bns)])
        torch.testing.assert_close(y, want)
    for k, bn in enumerate(bns):
        torch.testing.assert_close(ebn.running_mean[k], bn.running_mean)
        torch.testing.assert_close(ebn.running_var[k], bn.running_var)
    ebn.eval()
    [bn.eval() for bn in bns]
    torch.testing.assert_close(ebn(x), torch.cat([bn(x[k * B:(k + 1) * B]) for k, bn in enumerate(bns)]))
    with pytest.raises(ValueError, match=r"^x must have shape \(E\*B, num_features=5"):
        ebn(x[:5])
