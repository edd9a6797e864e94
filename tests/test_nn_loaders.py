"""State-dict loaders: each source layer's maths is written here in plain torch from its documented
parameterisation (names, shapes and row layout of TabM, torch-uncertainty, edward2), loaded into a
hyperkern layer and compared."""
import numpy as np
import pytest
import torch

import hyperkern.nn as hnn

F64 = torch.float64
RNG = np.random.default_rng(0)


def _r(*shape):
    return torch.randn(*shape, dtype=F64)


def test_tabm_loader_and_batch_major_layout():
    k, B, din, dout = 3, 5, 4, 6
    sd = {"weight": _r(dout, din), "r": _r(k, din), "s": _r(k, dout), "bias": _r(k, dout)}
    x = _r(B, k, din)  # TabM: batch-major (B, k, D)
    # tabm.LinearBatchEnsemble.forward: x * r -> @ weight.T -> * s -> + bias (broadcast over B)
    want = (x * sd["r"]) @ sd["weight"].T * sd["s"] + sd["bias"]
    layer = hnn.load_tabm_(hnn.BatchEnsembleLinear(din, dout, ensemble_size=k, backend="torch", dtype=F64), sd)
    rows = hnn.tabm_to_member_major(x)
    assert torch.equal(rows[2 * B + 1], x[1, 2])  # row k*B + b is x[b, k]
    y = hnn.member_major_to_tabm(layer(rows), k)
    assert y.shape == (B, k, dout)
    torch.testing.assert_close(y, want)
    # prefixes (a layer inside a TabM model) and a bias-free source
    sd2 = {"backbone.0.weight": sd["weight"], "backbone.0.r": sd["r"], "backbone.0.s": sd["s"]}
    nobias = hnn.BatchEnsembleLinear(din, dout, False, ensemble_size=k, backend="torch", dtype=F64)
    hnn.load_tabm_(nobias, sd2, prefix="backbone.0.")
    torch.testing.assert_close(hnn.member_major_to_tabm(nobias(rows), k), (x * sd["r"]) @ sd["weight"].T * sd["s"])
    with pytest.raises(ValueError, match=r"TabM 'r' must have shape \(3, 4\)"):
        hnn.load_tabm_(layer, {**sd, "r": _r(2, din)})
    with pytest.raises(ValueError, match="has no bias"):
        hnn.load_tabm_(layer, sd2, prefix="backbone.0.")


def test_torch_uncertainty_loaders():
    M, B, din, dout = 2, 3, 5, 4
    sd = {"linear.weight": _r(dout, din), "r_group": _r(M, din), "s_group": _r(M, dout), "bias": _r(M, dout)}
    x = _r(M * B, din)
    # BatchLinear.forward: repeat_interleave the (M, D) groups over each estimator's B examples
    R, S, Bi = (sd[n].repeat_interleave(B, 0) for n in ("r_group", "s_group", "bias"))
    want = (x * R) @ sd["linear.weight"].T * S + Bi
    layer = hnn.load_torch_uncertainty_(hnn.BatchEnsembleLinear(din, dout, ensemble_size=M, backend="torch",
                                                                dtype=F64), sd)
    torch.testing.assert_close(layer(x), want)

    cin, cout = 3, 4
    sdc = {"conv.weight": _r(cout, cin, 3, 3), "r_group": _r(M, cin), "s_group": _r(M, cout), "bias": _r(M, cout)}
    xc = _r(M * B, cin, 6, 6)
    R, S, Bi = (sdc[n].repeat_interleave(B, 0)[:, :, None, None] for n in ("r_group", "s_group", "bias"))
    want = torch.nn.functional.conv2d(xc * R, sdc["conv.weight"], padding=1) * S + Bi
    conv = hnn.load_torch_uncertainty_(hnn.BatchEnsembleConv2d(cin, cout, 3, padding=1, ensemble_size=M,
                                                               backend="torch", dtype=F64), sdc)
    torch.testing.assert_close(conv(xc), want)
    with pytest.raises(KeyError, match="no 'conv.weight'"):
        hnn.load_torch_uncertainty_(conv, sd)


def _keras_conv2d_valid(x_nhwc, kernel_hwio):
    """Keras Conv2D, channels-last, padding='valid', stride 1: y[n,h,w,o] = sum_ijc x[n,h+i,w+j,c] K[i,j,c,o]."""
    kh, kw = kernel_hwio.shape[:2]
    Ho, Wo = x_nhwc.shape[1] - kh + 1, x_nhwc.shape[2] - kw + 1
    y = 0
    for i in range(kh):
        for j in range(kw):
            y = y + x_nhwc[:, i:i + Ho, j:j + Wo, :] @ kernel_hwio[i, j]
    return y


def test_edward2_dense_loader():
    E, B, din, dout = 4, 2, 5, 3
    w = {"dense_batch_ensemble/kernel:0": RNG.standard_normal((din, dout)), "dense_batch_ensemble/alpha:0":
         RNG.standard_normal((E, din)), "dense_batch_ensemble/gamma:0": RNG.standard_normal((E, dout)),
         "dense_batch_ensemble/ensemble_bias:0": RNG.standard_normal((E, dout))}
    kernel, alpha, gamma, bias = (torch.from_numpy(v) for v in w.values())
    x = _r(E * B, din)
    # DenseBatchEnsemble.call (rank 1): reshape to (E, B, in), * alpha, @ kernel (in, out), * gamma, + bias
    want = (((x.reshape(E, B, din) * alpha[:, None]) @ kernel) * gamma[:, None] + bias[:, None]).reshape(E * B, dout)
    layer = hnn.load_edward2_(hnn.BatchEnsembleLinear(din, dout, ensemble_size=E, backend="torch", dtype=F64), w)
    torch.testing.assert_close(layer(x), want)
    with pytest.raises(ValueError, match=r"edward2 'kernel' must have shape \(5, 3\)"):
        hnn.load_edward2_(layer, {**w, "dense_batch_ensemble/kernel:0": RNG.standard_normal((dout, din))})


def test_edward2_conv_loader_channels_last():
    E, B, cin, cout, k = 2, 3, 3, 4, 3
    w = {"conv/conv2d/kernel:0": RNG.standard_normal((k, k, cin, cout)), "conv/alpha:0": RNG.standard_normal((E, cin)),
         "conv/gamma:0": RNG.standard_normal((E, cout)), "conv/bias:0": RNG.standard_normal((E, cout))}
    kernel, alpha, gamma, bias = (torch.from_numpy(v) for v in w.values())
    x_nhwc = _r(E * B, 7, 6, cin)
    # Conv2DBatchEnsemble.call (rank 1, channels_last): tile alpha/gamma/bias per example, member-major
    a, g, b = (t.repeat_interleave(B, 0)[:, None, None, :] for t in (alpha, gamma, bias))
    want_nhwc = _keras_conv2d_valid(x_nhwc * a, kernel) * g + b
    layer = hnn.load_edward2_(hnn.BatchEnsembleConv2d(cin, cout, k, ensemble_size=E, backend="torch", dtype=F64), w)
    y = layer(x_nhwc.permute(0, 3, 1, 2))
    torch.testing.assert_close(y.permute(0, 2, 3, 1), want_nhwc)
