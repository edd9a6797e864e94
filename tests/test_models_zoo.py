"""The model zoo: parameter counts, every variant against a float64 loop over members (and rows),
E=1 equivalence, state-dict round trip, the L2 / fast-weight interface, per-row dropout, bad input."""
import io

import pytest
import torch
import torch.nn as nn

import hyperkern.models as M
import hyperkern.nn as hnn

F64 = torch.float64

# tiny configurations of every architecture: (factory, kwargs, input shape)
TINY = {
    "mlp": (M.mlp, dict(in_features=(1, 4, 3), hidden_features=(8, 6)), (1, 4, 3)),
    "lenet5": (M.lenet5, dict(in_channels=2, input_size=12), (2, 12, 12)),
    "resnet20": (M.resnet20, dict(depth=8, width=2), (3, 8, 8)),
    "wrn28_10": (M.wrn28_10, dict(depth=10, width=1), (3, 8, 8)),
}


def _build(arch, variant, E=2, **extra):
    factory, kwargs, shape = TINY[arch]
    model = factory(5, variant=variant, ensemble_size=E, backend="torch", dtype=F64, **{**kwargs, **extra})
    return model, shape


def _randomise_(model, emb_std=0.3):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (emb_std if "embedding" in name else 0.4) + (1.0 if name.endswith(
                (".r", ".s", ".u", ".v")) else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return model


# ---------------------------------------------------------------------------------------------
# parameter counts (the paper's WRN-28-10 numbers)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,expected", [("plain", 36.5e6), ("batch", 36.6e6), ("hyper_batch", 73.1e6)])
def test_wrn28_10_parameter_counts(variant, expected):
    model = M.wrn28_10(10, variant=variant, ensemble_size=4, device="meta")
    count = sum(p.numel() for p in model.parameters())  # tied u = r, v = s counted once
    assert abs(count - expected) / expected < 0.01, count
    assert model.num_hparams == 6 and model.hparam_names[0] == "l2_input_conv"


def test_resnet20_parameter_count():
    count = sum(p.numel() for p in M.resnet20(10, device="meta").parameters())
    assert abs(count - 0.27e6) / 0.27e6 < 0.02, count


# ---------------------------------------------------------------------------------------------
# every variant = a float64 loop over members built from the same parameters
# ---------------------------------------------------------------------------------------------
def _member_plain(arch, model, k, e_row=None):
    """A plain model holding member k's effective weights (and, for hyper layers, row i's:
    W_i = W * (s_k r_k^T) + Delta * ((v_k * e1_i) u_k^T), b_i = b_k + db_k * e2_i)."""
    factory, kwargs, _ = TINY[arch]
    plain = factory(5, variant="plain", backend="torch", dtype=F64, **kwargs)
    plain.eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (hnn.BatchEnsembleLinear, hnn.BatchEnsembleConv2d)):
                tgt = plain.get_submodule(name)
                spatial = [1] * (mod.weight.dim() - 2)  # conv kernels: (out, in, kh, kw)
                rk = mod.r[k].reshape(1, -1, *spatial)  # input scale
                w = mod.weight * mod.s[k].reshape(-1, 1, *spatial) * rk
                b = None if mod.bias is None else mod.bias[k].clone()
                if isinstance(mod, (hnn.HyperBatchEnsembleLinear, hnn.HyperBatchEnsembleConv2d)):
                    emb = e_row @ mod.embedding.weight.T
                    out = mod.weight.shape[0]
                    uk = mod.u[k].reshape(1, -1, *spatial)
                    w = w + mod.delta * (mod.v[k] * emb[:out]).reshape(-1, 1, *spatial) * uk
                    if b is not None:
                        b = b + mod.delta_bias[k] * emb[out:]
                tgt.weight.copy_(w)
                if b is not None:
                    tgt.bias.copy_(b)
            elif isinstance(mod, hnn.EnsembleBatchNorm2d):
                tgt = plain.get_submodule(name)
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(tgt, attr).copy_(getattr(mod, attr)[k])
            elif isinstance(mod, nn.BatchNorm2d):
                plain.get_submodule(name).load_state_dict(mod.state_dict())
    return plain


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("variant", ["batch", "hyper_batch"])
def test_variant_equals_float64_member_loop(arch, variant):
    E, B = 2, 2
    model, shape = _build(arch, variant, E)
    _randomise_(model).eval()
    x = torch.randn(E * B, *shape, dtype=F64)
    if variant == "batch":
        y = model(x)
        want = torch.cat([_member_plain(arch, model, k)(x[k * B:(k + 1) * B]) for k in range(E)])
    else:
        z = torch.rand(E * B, model.num_hparams, dtype=F64)
        y = model(x, z)
        want = torch.cat([_member_plain(arch, model, i // B, z[i])(x[i:i + 1]) for i in range(E * B)])
    assert y.shape == (E * B, 5)
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("variant", ["batch", "hyper_batch"])
def test_per_member_batch_norm_equals_member_loop(variant):
    E, B = 3, 2
    model, shape = _build("resnet20", variant, E, bn="per_member")
    assert any(isinstance(m, hnn.EnsembleBatchNorm2d) for m in model.modules())
    _randomise_(model).eval()
    x = torch.randn(E * B, *shape, dtype=F64)
    z = torch.rand(E * B, model.num_hparams, dtype=F64)
    if variant == "batch":
        want = torch.cat([_member_plain("resnet20", model, k)(x[k * B:(k + 1) * B]) for k in range(E)])
        torch.testing.assert_close(model(x), want)
    else:
        want = torch.cat([_member_plain("resnet20", model, i // B, z[i])(x[i:i + 1]) for i in range(E * B)])
        torch.testing.assert_close(model(x, z), want)


@pytest.mark.parametrize("arch", list(TINY))
def test_batch_with_one_member_and_unit_fast_weights_equals_plain(arch):
    plain, shape = _build(arch, "plain")
    _randomise_(plain)
    batch, _ = _build(arch, "batch", E=1, fast_init="ones")
    with torch.no_grad():
        for name, mod in batch.named_modules():
            if isinstance(mod, (hnn.BatchEnsembleLinear, hnn.BatchEnsembleConv2d)):
                src = plain.get_submodule(name)
                mod.weight.copy_(src.weight)
                if mod.bias is not None:
                    mod.bias.copy_(src.bias[None])
            elif isinstance(mod, nn.BatchNorm2d):
                mod.load_state_dict(plain.get_submodule(name).state_dict())
    x = torch.randn(3, *shape, dtype=F64)
    for train in (True, False):  # batch statistics too
        plain.train(train)
        batch.train(train)
        torch.testing.assert_close(batch(x), plain(x))


def test_hyper_batch_with_zero_embedding_equals_batch():
    hyper, shape = _build("resnet20", "hyper_batch", E=2)
    _randomise_(hyper)
    batch, _ = _build("resnet20", "batch", E=2)
    batch.load_state_dict(hyper.state_dict(), strict=False)
    with torch.no_grad():
        for m in hyper.modules():
            if isinstance(m, (hnn.HyperBatchEnsembleLinear, hnn.HyperBatchEnsembleConv2d)):
                m.embedding.weight.zero_()
    x = torch.randn(4, *shape, dtype=F64)
    torch.testing.assert_close(hyper(x, torch.rand(4, 6, dtype=F64)), batch(x))  # train mode: shared BN stats


# ---------------------------------------------------------------------------------------------
# state dict, parameters, L2 interface
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(TINY))
def test_state_dict_round_trip(arch):
    torch.manual_seed(0)
    a, shape = _build(arch, "hyper_batch", bn="per_member") if arch in ("resnet20", "wrn28_10") else \
        _build(arch, "hyper_batch")
    _randomise_(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    b, _ = _build(arch, "hyper_batch", bn="per_member") if arch in ("resnet20", "wrn28_10") else \
        _build(arch, "hyper_batch")
    b.load_state_dict(torch.load(buf))
    a.eval()
    b.eval()
    x, z = torch.randn(4, *shape, dtype=F64), torch.rand(4, a.num_hparams, dtype=F64)
    torch.testing.assert_close(b(x, z), a(x, z), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["plain", "batch", "hyper_batch"])
def test_fast_and_slow_parameters_partition_the_model(variant):
    model, _ = _build("resnet20", variant)
    fast, slow = list(model.fast_parameters()), list(model.slow_parameters())
    rank1 = [m for m in model.modules() if isinstance(m, (hnn.BatchEnsembleLinear, hnn.BatchEnsembleConv2d))]
    assert len(fast) == 2 * len(rank1)  # r and s (u, v are the same tensors when tied)
    assert {id(p) for p in fast}.isdisjoint({id(p) for p in slow})
    assert {id(p) for p in fast} | {id(p) for p in slow} == {id(p) for p in model.parameters()}
    names = [n for n, _ in model.named_fast_parameters()]
    assert all(n.endswith((".r", ".s")) for n in names) and "dense.r" in names if variant != "plain" else not names


def _explicit_mlp_penalty(model, lam, z):
    """The MLP's penalty written out per row: group l2_hidden{i} -> hidden[i] kernel and bias,
    l2_dense_kernel / l2_dense_bias -> output layer."""
    E = model.ensemble_size
    B = lam.shape[0] // E
    names = list(model.hparam_names)
    total = 0.0
    layers = [(layer, f"l2_hidden{i + 1}", f"l2_hidden{i + 1}") for i, layer in enumerate(model.hidden)]
    layers.append((model.dense, "l2_dense_kernel", "l2_dense_bias"))
    for layer, kg, bg in layers:
        out = layer.out_features
        acc = 0.0
        for i in range(lam.shape[0]):
            e = z[i] @ layer.embedding.weight.T
            w = layer.weight + layer.delta * e[:out, None]
            b = layer.bias[i // B] + layer.delta_bias[i // B] * e[out:]
            acc = acc + lam[i, names.index(kg)] * w.square().sum() + lam[i, names.index(bg)] * b.square().sum()
        total = total + acc / lam.shape[0]
    return total


def test_hyper_model_l2_penalty_per_row_and_per_group():
    model, _ = _build("mlp", "hyper_batch", E=2)
    _randomise_(model)
    dist = hnn.EnsembleLogUniform(model.hparam_space, 2, dtype=F64)
    lam = dist.rsample(3)
    z = model.hparam_space.normalize(lam)
    torch.testing.assert_close(model.l2_penalty(lam), _explicit_mlp_penalty(model, lam, z))
    # gradients reach the distribution's parameters through lam and the embeddings
    model.l2_penalty(lam).backward()
    assert dist.log_low.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"^lam must have shape \(E\*B, 5\)"):
        model.l2_penalty(lam[:, :4])


def test_plain_and_batch_l2_penalty_and_weight_decay_groups():
    model, shape = _build("resnet20", "batch", E=2)
    _randomise_(model)
    lam = model.hparam_space.sample(1, dtype=F64)[0]
    want = 0.0
    groups = dict(zip(model.hparam_names, lam))
    for layer, kg, bg in model._l2_layers:
        want = want + groups[kg] * layer.weight.square().sum()
        if layer.bias is not None:
            want = want + groups[bg] * layer.bias.square().sum(1).mean()
    torch.testing.assert_close(model.l2_penalty(lam), want)
    torch.testing.assert_close(model.l2_penalty(model.hparam_space.to_dict(lam)), want)
    assert set(model.l2_groups()) == set(model.hparam_names)
    # weight decay groups step exactly like SGD on loss + scale * l2_penalty
    scale = 1e-3
    x = torch.randn(4, *shape, dtype=F64)
    twin, _ = _build("resnet20", "batch", E=2)
    twin.load_state_dict(model.state_dict())
    opt_wd = torch.optim.SGD(model.weight_decay_param_groups(lam, scale=scale), lr=0.1)
    opt_loss = torch.optim.SGD(twin.parameters(), lr=0.1)
    model(x).square().mean().backward()
    (twin(x).square().mean() + scale * twin.l2_penalty(lam)).backward()
    opt_wd.step()
    opt_loss.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    names = {g["name"] for g in model.weight_decay_param_groups(lam)}
    assert "fast" in names and "l2_dense_bias/E" in names


def test_hyper_mlp_dropout_rate_is_per_row():
    torch.manual_seed(0)
    model = M.mlp(3, in_features=4, hidden_features=(4000, 8), variant="hyper_batch", ensemble_size=2,
                  backend="torch")
    seen = {}
    model.hidden[1].register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0].detach()))
    with torch.no_grad():  # make every hidden-1 unit positive so zeros come from dropout only
        layer = model.hidden[0]
        layer.weight.zero_()
        layer.bias.fill_(1.0)
        layer.r.fill_(1.0)
        layer.s.fill_(1.0)
    space = model.hparam_space
    lam = torch.tensor([[1.0] * 4 + [0.05]] * 2 + [[1.0] * 4 + [0.6]] * 2)  # member 0: rate 0.05, member 1: 0.6
    model.train()
    model(torch.randn(4, 4), space.normalize(lam))
    zero_frac = (seen["h"] == 0).float().mean(1)
    torch.testing.assert_close(zero_frac, torch.tensor([0.05, 0.05, 0.6, 0.6]), atol=0.03, rtol=0)
    model.eval()
    model(torch.randn(4, 4), space.normalize(lam))
    assert torch.all(seen["h"] != 0)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    model, shape = _build("resnet20", "hyper_batch", E=2)
    x, z = torch.randn(4, *shape, dtype=F64), torch.rand(4, 6, dtype=F64)
    with pytest.raises(ValueError, match=r"^x must have shape \(E\*B, in_channels=3, H, W\)"):
        model(torch.randn(4, 1, 8, 8, dtype=F64), z)
    with pytest.raises(ValueError, match=r"^x.shape\[0\] = 3 must be divisible by ensemble_size = 2"):
        model(x[:3], z[:3])
    with pytest.raises(ValueError, match=r"^hparams must be normalised hyperparameters in \[0, 1\]"):
        model(x, z * 3)
    with pytest.raises(ValueError, match=r"^hparams must have shape \(E\*B, num_hparams=6\)"):
        model(x, z[:, :5])
    with pytest.raises(ValueError, match="^hparams must have one row per input row"):
        model(x, z[:2])
    with pytest.raises(TypeError, match="needs forward\\(x, hparams\\)"):
        model(x)
    batch, _ = _build("resnet20", "batch", E=2)
    with pytest.raises(TypeError, match="^hparams is only accepted by variant='hyper_batch'"):
        batch(x, z)
    mlp, _ = _build("mlp", "batch", E=2)
    with pytest.raises(ValueError, match=r"^x must have shape \(N, 12\)"):
        mlp(torch.randn(4, 13, dtype=F64))
    with pytest.raises(ValueError, match="^variant must be one of"):
        M.resnet20(variant="hyper")
    with pytest.raises(ValueError, match="^bn must be one of"):
        M.wrn28_10(variant="batch", bn="member")


def test_image_signature_for_mlp_and_small_inputs_for_lenet():
    mlp = M.mlp(10, in_channels=1, input_size=8, hidden_features=(6,), variant="batch", backend="torch")
    assert mlp.in_features == 64
    images = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(mlp(images), mlp(images.reshape(4, 64)))  # flattening = the vector input
    lenet = M.lenet5(10, 1, input_size=8, conv2_padding=2, variant="plain", backend="torch")
    assert lenet.fc1.in_features == 16 * 2 * 2 and lenet(images).shape == (4, 10)
    with pytest.raises(ValueError, match="too small for LeNet-5"):
        M.lenet5(10, 1, input_size=8)
