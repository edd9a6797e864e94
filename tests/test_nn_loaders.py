"""State-dict loaders. TabM and torch-uncertainty: each source layer's maths is written here in plain
torch from its documented parameterisation (names, shapes and row layout), loaded into a hyperkern
layer and compared. edward2: golden fixtures made once from the REAL edward2 layers
(tools/make_edward2_fixtures.py, tests/fixtures/edward2/README.md) are loaded and their outputs,
gradients and L2 penalties matched, with numpy and torch only; then every mismatch the loader must
refuse. Also TensorFlow's padding='same' in the conv layers."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hyperkern
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




# --------------------------------------------------------------------------------------------------
# edward2: golden fixtures from the real layers (edward2 0.0.2, tensorflow-cpu 2.19.1, tf-keras 2.19.0)
# --------------------------------------------------------------------------------------------------
FIXTURES = Path(__file__).parent / "fixtures" / "edward2"
CASES = sorted(p.stem for p in FIXTURES.glob("*.npz"))
CPU_BACKENDS = [b for b in ("torch", "cpp") if b in hyperkern.available_backends()]
RTOL = 1e-5  # max |hyperkern - edward2| / max |edward2|, per tensor, float32


def _fixture(name):
    with np.load(FIXTURES / f"{name}.npz", allow_pickle=False) as d:
        f = {k: d[k] for k in d.files}
    return f, json.loads(str(f["config"]))


def _nweights(f):
    return len(f["w_names"])


def _build(cfg, backend="torch", **over):
    kind, E = cfg["kind"], cfg["E"]
    kw = dict(ensemble_size=E, backend=backend)
    if kind.startswith("hyper"):
        kw.update(num_hparams=len(cfg["ranges"]), tie_fast_weights=cfg["tied"])
    kw.update(over)
    bias = kw.pop("bias", cfg["bias"])
    if kind.endswith("dense"):
        cls = hnn.HyperBatchEnsembleLinear if kind.startswith("hyper") else hnn.BatchEnsembleLinear
        return cls(cfg["in_features"], cfg["units"], bias, **kw)
    cls = hnn.HyperBatchEnsembleConv2d if kind.startswith("hyper") else hnn.BatchEnsembleConv2d
    return cls(cfg["in_features"], cfg["units"], cfg["k"], cfg["stride"], cfg["padding"], cfg["dilation"], 1, bias,
               **kw)


def _space(cfg):
    return hnn.HyperParameterSpace([(f"h{j}", lo, hi) for j, (lo, hi) in enumerate(cfg["ranges"])])


def _attrs(f, cfg):
    """The hyperkern parameter behind each edward2 weight, in order, from the fixture's own names
    (written out here, independently of the loader)."""
    names = [n.split(":")[0].rsplit("/", 1)[-1] for n in f["w_names"]]
    if not cfg["kind"].startswith("hyper"):
        return [{"kernel": "weight", "alpha": "r", "gamma": "s", "ensemble_bias": "bias"}[n] for n in names]
    table = {"alpha": "r", "gamma": "s", "alpha_1": "u", "gamma_1": "v", "bias": "delta_bias", "ensemble_bias": "bias"}
    kernels = iter(["weight", "delta"])  # the dense / conv2d sub-layer's kernel, then the delta one's
    return [next(kernels) if n == "kernel" else table[n] for n in names]


def _keras_layout(t, attr, conv):
    """A hyperkern parameter (or its gradient) in edward2's layout."""
    if attr in ("weight", "delta"):
        return t.permute(2, 3, 1, 0) if conv else t.T
    return t


def _rel(got, want):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _run(layer, f, cfg):
    """Forward + backward of a loaded layer on the fixture's input: (y NHWC/NC, x.grad, penalty or None)."""
    conv, hyper = "conv" in cfg["kind"], cfg["kind"].startswith("hyper")
    x = torch.from_numpy(f["x"]).requires_grad_()
    # NHWC -> NCHW, made contiguous: a channels-last view would send the 1x1 stride-2 cases with few
    # input channels into oneDNN's 1x1 backward-weights kernel, which on AVX2 CPUs returns wrong weight
    # gradients and corrupts the heap (torch 2.13 / oneDNN 3.12; uxlfoundation/oneDNN#6035)
    xin = x.permute(0, 3, 1, 2).contiguous() if conv else x
    if hyper:
        z = _space(cfg).normalize(torch.from_numpy(f["lambdas"]))
        y = layer(xin, z)
    else:
        y = layer(xin)
    y = y.permute(0, 2, 3, 1) if conv else y
    (y * torch.from_numpy(f["g"])).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_edward2_golden_forward_backward_penalty(name, backend):
    """The real edward2 layer's output, gradients (input, every weight, the e-model) and L2 penalty."""
    f, cfg = _fixture(name)
    conv, hyper = "conv" in cfg["kind"], cfg["kind"].startswith("hyper")
    assert cfg["versions"]["edward2"] == "0.0.2"
    layer = _build(cfg, backend)
    weights = [f[f"w{i}"] for i in range(_nweights(f))]
    out = hnn.load_edward2_(layer, weights, embedding=[f["e_kernel"]] if hyper else None)
    assert out is layer
    attrs = _attrs(f, cfg)
    for i, attr in enumerate(attrs):  # every tensor landed where it belongs
        assert _rel(_keras_layout(getattr(layer, attr).detach(), attr, conv), weights[i]) == 0, attr
    if hyper:
        assert torch.equal(layer.embedding.weight.detach().T, torch.from_numpy(f["e_kernel"]))
        z = _space(cfg).normalize(torch.from_numpy(f["lambdas"]))
        assert _rel(z, f["z"]) < RTOL  # hyperkern's normalize is the reference's LogScaler
    y, gx = _run(layer, f, cfg)
    errs = {"y": _rel(y, f["y"]), "grad_x": _rel(gx, f["grad_x"])}
    for i, attr in enumerate(attrs):
        errs[f"grad {attr}"] = _rel(_keras_layout(getattr(layer, attr).grad, attr, conv), f[f"grad_w{i}"])
    if hyper:
        errs["grad e-model"] = _rel(layer.embedding.weight.grad.T, f["grad_e"])
        layer.zero_grad()
        lam = torch.from_numpy(f["lambdas"])
        k2i = cfg["lambda_key_to_index"]
        pen = layer.l2_penalty(lam[:, k2i[f"{cfg['name']}_l2_kernel"]], z, lam[:, k2i[f"{cfg['name']}_l2_bias"]])
        errs["penalty"] = _rel(pen.detach(), f["penalty"])
        pen.backward()
        for i, attr in enumerate(attrs):
            grad = getattr(layer, attr).grad
            grad = torch.zeros_like(getattr(layer, attr)) if grad is None else grad
            errs[f"penalty grad {attr}"] = _rel(_keras_layout(grad, attr, conv), f[f"pgrad_w{i}"]) \
                if np.abs(f[f"pgrad_w{i}"]).max() > 0 else grad.abs().max().item()
        errs["penalty grad e-model"] = _rel(layer.embedding.weight.grad.T, f["pgrad_e"])
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, f"{name} ({backend}): relative errors above {RTOL}: {bad}"


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("hyper")][:3] + ["conv_E3_k3_s2_same_8x8_bias"])
def test_edward2_loads_by_checkpoint_paths_and_named_variables(name):
    """The other accepted forms: {checkpoint path: array} (tf.train.Checkpoint keys, distinct) and
    layer.weights (named variables, in order) give the same layer as get_weights()."""
    f, cfg = _fixture(name)
    hyper = cfg["kind"].startswith("hyper")
    emb = [f["e_kernel"]] if hyper else None
    n = _nweights(f)
    ref = hnn.load_edward2_(_build(cfg), [f[f"w{i}"] for i in range(n)], embedding=emb)
    by_path = hnn.load_edward2_(_build(cfg), {str(f["w_ckpt_keys"][i]): f[f"w{i}"] for i in range(n)},
                                embedding=f["e_kernel"] if hyper else None)
    named = hnn.load_edward2_(_build(cfg), [_Var(str(f["w_names"][i]), f[f"w{i}"]) for i in range(n)],
                              embedding=[_Var("dense_e_0_0/kernel:0", f["e_kernel"])] if hyper else None)
    for layer in (by_path, named):
        for (k, a), b in zip(ref.state_dict().items(), layer.state_dict().values()):
            assert torch.equal(a, b), k


class _Var:
    """Stands in for a tf.Variable in layer.weights: a .name and .numpy()."""

    def __init__(self, name, value):
        self.name, self._value = name, np.asarray(value)
        self.shape = self._value.shape

    def numpy(self):
        return self._value


def _weights(f):
    return [f[f"w{i}"] for i in range(_nweights(f))]


def _named(f):
    return {str(n): f[f"w{i}"] for i, n in enumerate(f["w_names"])}


def _paths(f):
    return {str(k): f[f"w{i}"] for i, k in enumerate(f["w_ckpt_keys"])}


def test_edward2_conv_bias_is_ensemble_bias():
    """Conv2DBatchEnsemble names its bias 'ensemble_bias' (since 2020-08): loaded by name it is the bias."""
    f, cfg = _fixture("conv_E3_k3_s2_same_8x8_bias")
    layer = hnn.load_edward2_(_build(cfg), _named(f))
    assert torch.equal(layer.bias.detach(), torch.from_numpy(f["w3"]))
    assert _rel(_run(layer, f, cfg)[0], f["y"]) < RTOL


@pytest.mark.parametrize("form", [_weights, _named, _paths])
def test_edward2_refuses_a_bias_the_layer_lacks_and_the_reverse(form):
    f, cfg = _fixture("conv_E3_k3_s2_same_8x8_bias")
    with pytest.raises(ValueError, match=r"Conv2DBatchEnsemble\(use_bias=True\).*has bias \(ensemble_bias\) but "
                                         r"the layer was built with bias=False"):
        hnn.load_edward2_(_build(cfg, bias=False), form(f))
    f, cfg = _fixture("conv_E3_k3_s1_valid_6x6_nobias")
    with pytest.raises(ValueError, match="has no bias .* but the layer was built with bias=True"):
        hnn.load_edward2_(_build(cfg, bias=True), form(f))
    if form is _named:
        return  # a hyper layer's {w.name: array} keeps one kernel: see the test below
    f, cfg = _fixture("hyper_dense_E3_bias_untied")  # the hyper layers: ensemble_bias and bias (the delta bias)
    with pytest.raises(ValueError, match=r"has bias \(ensemble_bias and bias \(the delta bias\)\) but the layer was "
                                         "built with bias=False"):
        hnn.load_edward2_(_build(cfg, bias=False), form(f), embedding=f["e_kernel"][:, :cfg["units"]])


def test_edward2_hyper_weights_by_keras_name_are_refused():
    """Both kernels of a hyper layer are named '<name>/<name>/kernel:0': a {w.name: array} mapping keeps
    one of them, and the loader says so instead of leaving delta at its init."""
    f, cfg = _fixture("hyper_conv_E3_k3_s2_same_8x8_bias_untied")
    names = [str(n) for n in f["w_names"]]
    assert names.count("hyper/hyper/kernel:0") == 2
    with pytest.raises(ValueError, match=r"have no 'kernel' \(delta kernel\); edward2 names the main and the delta "
                                         "kernel alike"):
        hnn.load_edward2_(_build(cfg), _named(f), embedding=f["e_kernel"])
    with pytest.raises(ValueError, match="both name the 'weight'"):  # two paths that do not tell them apart
        hnn.load_edward2_(_build(cfg), {"a/hyper/kernel": f["w5"], "b/hyper/kernel": f["w7"]}, embedding=f["e_kernel"])


@pytest.mark.parametrize("form", [_weights, _paths])
def test_edward2_refuses_batch_vs_hyper(form):
    f, cfg = _fixture("conv_E3_k3_s2_same_8x8_bias")  # a batch source into a hyper layer
    hyper = hnn.HyperBatchEnsembleConv2d(2, 3, 3, 2, "same", ensemble_size=3, num_hparams=3)
    with pytest.raises(ValueError, match=r"Conv2DBatchEnsemble.*(but the layer is a HyperBatchEnsembleConv2d|"
                                         "which load into a BatchEnsembleConv2d, not a HyperBatchEnsembleConv2d)"):
        hnn.load_edward2_(hyper, form(f), embedding=np.zeros((3, 6), np.float32))
    f, cfg = _fixture("hyper_conv_E3_k3_s2_same_8x8_bias_untied")  # a hyper source into a batch layer
    batch = hnn.BatchEnsembleConv2d(2, 3, 3, 2, "same", ensemble_size=3)
    with pytest.raises(ValueError, match=r"Conv2DHyperBatchEnsemble.*(but the layer is a BatchEnsembleConv2d)"):
        hnn.load_edward2_(batch, form(f))
    f, cfg = _fixture("hyper_dense_E4_nobias_tied")  # 4 tensors, like a DenseBatchEnsemble with a bias
    batch = hnn.BatchEnsembleLinear(5, 3, ensemble_size=4)
    with pytest.raises(ValueError, match=r"DenseHyperBatchEnsemble.* but the layer is a BatchEnsembleLinear"):
        hnn.load_edward2_(batch, form(f))


@pytest.mark.parametrize("form", [_weights, _paths])
def test_edward2_refuses_tied_vs_untied(form):
    f, cfg = _fixture("hyper_conv_E3_k3_s2_same_8x8_bias_untied")
    with pytest.raises(ValueError, match=r"unties its fast weights \(fast_weights_eq_contraint=False: alpha_1, "
                                         r"gamma_1\) but the layer was built with tie_fast_weights=True"):
        hnn.load_edward2_(_build(cfg, tie_fast_weights=True), form(f), embedding=f["e_kernel"])
    f, cfg = _fixture("hyper_conv_E1_k3_s1_same_7x7_bias_tied")
    with pytest.raises(ValueError, match="ties its fast weights .* tie_fast_weights=False"):
        hnn.load_edward2_(_build(cfg, tie_fast_weights=False), form(f), embedding=f["e_kernel"])


def test_edward2_refuses_missing_extra_and_misshaped_tensors():
    f, cfg = _fixture("hyper_dense_E3_bias_untied")
    w, emb = _weights(f), f["e_kernel"]
    with pytest.raises(ValueError, match=r"must be a DenseHyperBatchEnsemble\(use_bias=True, "
                                         r"fast_weights_eq_contraint=False\)'s 8 tensors .*; got 7"):
        hnn.load_edward2_(_build(cfg), w[:-1], embedding=emb)
    with pytest.raises(ValueError, match="8 tensors .*; got 9"):
        hnn.load_edward2_(_build(cfg), w + [w[0]], embedding=emb)
    with pytest.raises(ValueError, match=r"tensor 5 'kernel' has shape \(3, 5\), expected \(5, 3\)"):
        hnn.load_edward2_(_build(cfg), w[:5] + [w[5].T] + w[6:], embedding=emb)
    p = _paths(f)
    with pytest.raises(ValueError, match=r"have no 'gamma'; got"):
        hnn.load_edward2_(_build(cfg), {k: v for k, v in p.items() if not k.startswith("layer/gamma/")}, embedding=emb)
    with pytest.raises(ValueError, match="'layer/dense/dropout_rate' is no weight of a DenseHyperBatchEnsemble"):
        hnn.load_edward2_(_build(cfg), {**p, "layer/dense/dropout_rate": np.zeros(1)}, embedding=emb)
    key = next(k for k in p if "/delta_dense/kernel" in k)
    with pytest.raises(ValueError, match=r"edward2 'kernel' \(delta kernel\) 'layer/delta_dense/kernel.*' must have "
                                         r"shape \(5, 3\)"):
        hnn.load_edward2_(_build(cfg), {**p, key: np.zeros((5, 4), np.float32)}, embedding=emb)
    named = [_Var(str(n), v) for n, v in zip(f["w_names"], w)]
    named[0], named[2] = named[2], named[0]  # alpha <-> alpha_1: same shapes, the names tell
    with pytest.raises(ValueError, match="tensor 0 is 'hyper/alpha_1:0', where 'alpha' belongs"):
        hnn.load_edward2_(_build(cfg), named, embedding=emb)
    f, cfg = _fixture("dense_E4_bias")  # dense weights into a conv layer
    with pytest.raises(ValueError, match=r"tensor 0 'kernel' has shape \(5, 3\), expected \(3, 3, 5, 3\)"):
        hnn.load_edward2_(hnn.BatchEnsembleConv2d(5, 3, 3, ensemble_size=4), _weights(f))
    with pytest.raises(ValueError, match="groups=1"):
        hnn.load_edward2_(hnn.BatchEnsembleConv2d(4, 4, 3, groups=2, ensemble_size=4), _weights(f))
    with pytest.raises(TypeError, match="weights must be one edward2 layer's weights"):
        hnn.load_edward2_(hnn.BatchEnsembleLinear(5, 3, ensemble_size=4), np.zeros((5, 3)))


def test_edward2_refuses_a_wrong_or_missing_embedding():
    f, cfg = _fixture("hyper_conv_E3_k3_s2_same_8x8_bias_untied")
    w, k = _weights(f), f["e_kernel"]
    with pytest.raises(ValueError, match=r"takes e\(lambdas\) from a separate e-model; pass its weights as "
                                         "embedding="):
        hnn.load_edward2_(_build(cfg), w)
    with pytest.raises(ValueError, match=r"one kernel of shape \(3, 6\).*got 2 tensors .* a bias \(use_bias=True\)"):
        hnn.load_edward2_(_build(cfg), w, embedding=[k, np.zeros(6, np.float32)])
    with pytest.raises(ValueError, match=r"hidden layers \(e_body_arch / e_shared_arch\)"):
        hnn.load_edward2_(_build(cfg), w, embedding=[np.zeros((3, 8)), np.zeros(8), np.zeros((8, 6))])
    with pytest.raises(ValueError, match=r"got shape \(3, 3\) \(a layer with a bias needs e1 and e2"):
        hnn.load_edward2_(_build(cfg), w, embedding=k[:, :3])
    f, cfg = _fixture("hyper_conv_E4_k3_s2_same_7x7_nobias_tied")
    with pytest.raises(ValueError, match=r"got shape \(3, 6\) \(a bias-free layer uses e1 only"):
        hnn.load_edward2_(_build(cfg), _weights(f), embedding=np.zeros((3, 6), np.float32))
    f, cfg = _fixture("conv_E3_k3_s2_same_8x8_bias")
    with pytest.raises(ValueError, match="embedding= is for the hyper layers"):
        hnn.load_edward2_(_build(cfg), _weights(f), embedding=k)


def test_edward2_unnamed_arrays_that_fit_two_variants_are_refused():
    """A dense layer with in == out == E: a DenseBatchEnsemble with a bias and a tied bias-free
    DenseHyperBatchEnsemble have 4 tensors of the same shapes; unnamed arrays cannot say which."""
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((3, 3)).astype(np.float32) for _ in range(4)]
    with pytest.raises(ValueError, match="fit both a DenseBatchEnsemble"):
        hnn.load_edward2_(hnn.BatchEnsembleLinear(3, 3, ensemble_size=3), w)
    names = ["d/kernel:0", "d/alpha:0", "d/gamma:0", "d/ensemble_bias:0"]
    layer = hnn.load_edward2_(hnn.BatchEnsembleLinear(3, 3, ensemble_size=3), [_Var(n, v) for n, v in zip(names, w)])
    assert torch.equal(layer.weight.detach(), torch.from_numpy(w[0]).T)


# --------------------------------------------------------------------------------------------------
# padding="same": TensorFlow's rule, per side, at any stride
# --------------------------------------------------------------------------------------------------
def _tf_same_pads(size, k, s, d):
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k,s,d,H,W", [(3, 2, 1, 8, 8), (3, 2, 1, 7, 8), (3, 1, 1, 5, 6), (2, 1, 1, 6, 5),
                                       (4, 3, 1, 10, 9), (1, 2, 1, 6, 7), (3, 1, 2, 7, 6), ((3, 2), (2, 1), 1, 8, 7)])
def test_same_padding_is_tensorflows(backend, k, s, d, H, W):
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (s, s) if isinstance(s, int) else s
    E, B = 2, 2
    x = torch.randn(E * B, 3, H, W, dtype=torch.float64, requires_grad=True)
    top, bottom = _tf_same_pads(H, kh, sh, d)
    left, right = _tf_same_pads(W, kw, sw, d)
    for hyper in (False, True):
        kw_ = dict(ensemble_size=E, backend=backend, dtype=torch.float64)
        if hyper:
            layer = hnn.HyperBatchEnsembleConv2d(3, 4, k, s, "same", d, num_hparams=2, embedding_std=0.5, **kw_)
            z = torch.rand(E * B, 2, dtype=torch.float64)
            y = layer(x, z)
            with torch.no_grad():
                e = layer.embed(z)
            want = hyperkern.ops.hyper_batch_ensemble_conv2d(
                F.pad(x, (left, right, top, bottom)), layer.weight, layer.delta, layer.r, layer.s, layer.u, layer.v,
                e[0], layer.bias, layer.delta_bias, e[1], s, 0, d, backend="torch")
        else:
            layer = hnn.BatchEnsembleConv2d(3, 4, k, s, "same", d, **kw_)
            y = layer(x)
            want = hyperkern.ops.batch_ensemble_conv2d(F.pad(x, (left, right, top, bottom)), layer.weight, layer.r,
                                                       layer.s, layer.bias, s, 0, d, backend="torch")
        assert layer.padding == "same" and "padding='same'" in repr(layer)
        assert y.shape[-2:] == (math.ceil(H / sh), math.ceil(W / sw))
        torch.testing.assert_close(y, want)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, layer.weight), g)
        wx, ww = torch.autograd.grad(want, (x, layer.weight), g)
        torch.testing.assert_close(gx, wx)
        torch.testing.assert_close(gw, ww)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_same_padding_at_stride_1_is_torchs_and_int_padding_is_unchanged():
    x = torch.randn(4, 3, 6, 7, dtype=torch.float64)
    for k in (3, 2, 4):  # torch's 'same' (stride 1) also puts the odd extra element after
        conv = torch.nn.Conv2d(3, 5, k, padding="same", bias=False, dtype=torch.float64)
        layer = hnn.BatchEnsembleConv2d(3, 5, k, padding="same", bias=False, ensemble_size=2, init="ones",
                                        backend="torch", dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
        torch.testing.assert_close(layer(x), conv(x))
    assert hnn.BatchEnsembleConv2d(3, 4, 3, padding="valid", ensemble_size=2).padding == (0, 0)
    assert hnn.BatchEnsembleConv2d(3, 4, 3, padding=(1, 2), ensemble_size=2).padding == (1, 2)
    with pytest.raises(ValueError, match="^padding must be .* 'valid' or 'same'"):
        hnn.BatchEnsembleConv2d(3, 4, 3, padding="full", ensemble_size=2)


def test_tabm_and_torch_uncertainty_refuse_hyper_layers():
    """Neither source has hyper-batch layers: a hyper layer would load its batch part and keep
    delta, u, v and the embedding at their init, silently."""
    E, din, dout = 2, 4, 3
    hyper = hnn.HyperBatchEnsembleLinear(din, dout, ensemble_size=E, num_hparams=1, backend="torch", dtype=F64)
    sd = {"weight": _r(dout, din), "r": _r(E, din), "s": _r(E, dout), "bias": _r(E, dout)}
    with pytest.raises(TypeError, match="TabM has no hyper-batch layers"):
        hnn.load_tabm_(hyper, sd)
    tu = {"linear.weight": sd["weight"], "r_group": sd["r"], "s_group": sd["s"], "bias": sd["bias"]}
    with pytest.raises(TypeError, match="torch-uncertainty has no hyper-batch layers"):
        hnn.load_torch_uncertainty_(hyper, tu)
