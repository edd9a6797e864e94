"""HyperParameterSpace normalisation and the per-member log-uniform distributions (docs/method.md sections 2, 3)."""
import math
import pickle

import pytest
import torch

from hyperkern.nn import EnsembleLogUniform, HyperParameter, HyperParameterSpace

F64 = torch.float64


def _space():
    return HyperParameterSpace([("l2", 0.1, 100.0), HyperParameter("dropout", 1e-3, 0.9), ("smooth", 0.0, 0.2, False)])


def test_space_normalisation_known_values_and_round_trip():
    space = _space()
    assert space.names == ("l2", "dropout", "smooth") and space.num_hparams == 3 and space.index("dropout") == 1
    lam = torch.tensor([[0.1, 0.9, 0.0], [100.0, 1e-3, 0.2], [math.sqrt(10.0), 0.03, 0.05]], dtype=F64)
    z = space.normalize(lam)
    want = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0],
                         [0.5, math.log(0.03 / 1e-3) / math.log(900.0), 0.25]], dtype=F64)
    torch.testing.assert_close(z, want)
    torch.testing.assert_close(space.denormalize(z), lam)
    torch.testing.assert_close(space.denormalize_column(z[:, 1], "dropout"), lam[:, 1])
    # out-of-range values are clamped into [0, 1]
    assert space.normalize(torch.tensor([1e4, 1.0, -1.0], dtype=F64)).tolist() == [1.0, 1.0, 0.0]
    assert space.to_dict(lam[2]) == pytest.approx({"l2": math.sqrt(10), "dropout": 0.03, "smooth": 0.05})
    torch.testing.assert_close(space.from_dict(space.to_dict(lam[2]), dtype=F64), lam[2])


def test_space_sample_covers_the_range_log_uniformly():
    space = HyperParameterSpace({"l2": (1e-3, 1e3)})
    lam = space.sample(20000, generator=torch.Generator().manual_seed(0), dtype=F64)[:, 0]
    assert lam.min() >= 1e-3 and lam.max() <= 1e3
    # log-uniform: each decade holds ~1/6 of the draws
    decade = torch.floor(torch.log10(lam)).clamp(-3, 2)
    counts = torch.bincount((decade + 3).long(), minlength=6).double() / lam.numel()
    assert torch.all((counts - 1 / 6).abs() < 0.015)


def test_space_bad_input():
    with pytest.raises(ValueError, match="low > 0"):
        HyperParameterSpace([("l2", 0.0, 1.0)])
    with pytest.raises(ValueError, match="unique"):
        HyperParameterSpace([("a", 1, 2), ("a", 1, 3)])
    with pytest.raises(ValueError, match=r"^lam must have shape \(\.\.\., 3\)"):
        _space().normalize(torch.ones(4, 2))
    with pytest.raises(KeyError, match="unknown hyperparameter"):
        _space().index("lr")


def _dist(E=3, **kw):
    space = HyperParameterSpace([("l2", 1e-3, 1e3), ("dropout", 1e-3, 0.9)])
    return EnsembleLogUniform(space, E, dtype=F64, **kw)


def test_init_is_narrow_around_the_log_uniform_mean():
    d = _dist(E=4, init_noise=0.0)
    c = torch.tensor([(1e3 - 1e-3) / math.log(1e6), (0.9 - 1e-3) / math.log(900.0)], dtype=F64)
    assert d.log_low.shape == (4, 2) and d.log_high.shape == (4, 2)
    torch.testing.assert_close(d.log_low, (c.log() - 0.2).expand(4, 2))
    torch.testing.assert_close(d.log_high, (c.log() + 0.2).expand(4, 2))
    jittered = _dist(E=4, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(jittered.log_low[0], jittered.log_low[1])  # members start apart
    lin = _dist(E=2, init_space="linear", init_noise=0.0)
    torch.testing.assert_close(lin.log_high[:, 1].exp(), (c[1] + 0.2).expand(2))
    assert torch.all(lin.log_low[:, 1] == math.log(1e-3))  # c - 0.2 < low: clipped into the range


def test_rsample_member_major_in_interval_and_reparameterised():
    d = _dist(E=3)
    with torch.no_grad():
        d.log_low.copy_(torch.tensor([[-6.0, -6.0], [0.0, -3.0], [5.0, -1.0]], dtype=F64))
        d.log_high.copy_(torch.tensor([[-5.0, -5.0], [1.0, -2.0], [6.0, -0.5]], dtype=F64))
    B = 500
    lam = d.rsample(B, generator=torch.Generator().manual_seed(0))
    assert lam.shape == (3 * B, 2)
    for k in range(3):  # rows k*B .. (k+1)*B-1 come from member k's interval
        block = lam[k * B:(k + 1) * B].log()
        assert torch.all(block >= d.log_low[k] - 1e-12) and torch.all(block <= d.log_high[k] + 1e-12)
    # lam = exp(a + u (b - a)): d lam / d a = lam (1 - u), d lam / d b = lam u
    g = torch.Generator().manual_seed(1)
    lam = d.rsample(4, generator=g)
    u = (lam.log() - d.log_low.repeat_interleave(4, 0)) / (d.log_high - d.log_low).repeat_interleave(4, 0)
    lam.sum().backward()
    want_low = (lam * (1 - u)).detach().reshape(3, 4, 2).sum(1)
    want_high = (lam * u).detach().reshape(3, 4, 2).sum(1)
    torch.testing.assert_close(d.log_low.grad, want_low)
    torch.testing.assert_close(d.log_high.grad, want_high)


def test_mean_and_entropy_against_numerical_integration():
    d = _dist(E=2)
    with torch.no_grad():
        d.log_low.copy_(torch.tensor([[-3.0, -4.0], [1.0, -2.0]], dtype=F64))
        d.log_high.copy_(torch.tensor([[2.0, -1.0], [1.5, -0.2]], dtype=F64))
    a, b = d.log_low.exp(), d.log_high.exp()
    # integrate over lam on a fine grid: p(lam) = 1 / (lam (log b - log a))
    t = torch.linspace(0, 1, 200001, dtype=F64)
    lam = a[..., None] + t * (b - a)[..., None]
    p = 1 / (lam * (d.log_high - d.log_low)[..., None])
    mean = torch.trapezoid(lam * p, lam, dim=-1)
    entropy = torch.trapezoid(-p * p.log(), lam, dim=-1)
    torch.testing.assert_close(d.mean(), mean, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d.entropy(), entropy, rtol=1e-5, atol=1e-6)
    rows = d.mean(batch_size=3)
    assert rows.shape == (6, 2) and torch.equal(rows[3], d.mean()[1])


def test_clip_keeps_intervals_in_range_and_ordered():
    d = _dist(E=3)
    lo, hi = math.log(1e-3), math.log(1e3)
    with torch.no_grad():
        d.log_low.copy_(torch.tensor([[-20.0, 0.0], [3.0, -2.0], [10.0, -1.0]], dtype=F64))
        d.log_high.copy_(torch.tensor([[20.0, -3.0], [2.0, -1.0], [12.0, 5.0]], dtype=F64))
    d.clip_()
    assert d.log_low[0, 0] == lo and d.log_high[0, 0] == hi
    assert torch.all(d.log_low < d.log_high)
    assert torch.all(d.log_high[:, 0] <= hi) and torch.all(d.log_low[:, 0] >= lo)
    assert d.log_high[2, 1] == math.log(0.9)  # dropout's upper bound
    assert d.log_low[1, 0] == 3.0 and d.log_high[1, 0] > 3.0  # crossed interval: b lifted just above a
    assert d.log_high[1, 0].item() - 3.0 == pytest.approx(1e-6 * 0.5 * (hi - lo))
    assert torch.isfinite(d.entropy()).all()


def test_distribution_needs_log_space():
    with pytest.raises(ValueError, match="log-scaled"):
        EnsembleLogUniform(_space(), 2)


def test_normalize_bounds_are_made_once_and_serve_autograd_after_inference_mode():
    # the bounds are built once per (dtype, device), not copied from Python lists on every call (on CUDA a
    # pageable host-to-device copy per normalize, which a CUDA graph cannot capture)
    space = HyperParameterSpace([("l2", 1e-5, 1e-3, True), ("dropout", 0.0, 0.5, False)])
    lam = torch.tensor([[1e-4, 0.2], [1e-3, 0.0]], dtype=torch.float64)
    with torch.inference_mode():  # first made under inference mode ...
        z_inf = space.normalize(lam)
    assert space._bounds(lam)[0] is space._bounds(lam)[0]
    assert space._bounds(lam.float())[0].dtype == torch.float32  # a cache entry per dtype
    lam_g = lam.clone().requires_grad_(True)
    z = space.normalize(lam_g)  # ... and still usable by autograd, which saves the width
    z.sum().backward()
    assert torch.equal(z.detach(), z_inf)
    torch.testing.assert_close(z.detach(), torch.tensor([[0.5, 0.4], [1.0, 0.0]], dtype=torch.float64))
    # d z / d lam = 1 / (lam * log(high / low)) for the log column, 1 / (high - low) for the linear one
    expected = torch.tensor([[1 / (1e-4 * math.log(100.0)), 2.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(lam_g.grad[:, 1], expected[:, 1])
    torch.testing.assert_close(lam_g.grad[0, 0], expected[0, 0])
    clone = pickle.loads(pickle.dumps(space))  # the cache is not part of the pickled value
    assert clone == space and clone._bounds_cache == {}
    torch.testing.assert_close(clone.normalize(lam), z_inf)
