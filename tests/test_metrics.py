import math
import sys

import numpy as np
import pytest
import torch

from hyperkern import metrics


def _random_probs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * 2, dim=-1)


def test_accuracy_nll_brier_known_values():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 2, 0, 1])
    assert metrics.accuracy(probs, labels) == pytest.approx(0.5)
    expected_nll = -(math.log(0.7) + math.log(0.6) + math.log(0.25) + math.log(0.4)) / 4
    assert metrics.nll(probs, labels) == pytest.approx(expected_nll, rel=1e-6)
    rows = [0.3**2 + 0.2**2 + 0.1**2, 0.1**2 + 0.3**2 + 0.4**2, 0.75**2 + 0.5**2 + 0.25**2, 0.5**2 + 0.6**2 + 0.1**2]
    assert metrics.brier(probs, labels) == pytest.approx(sum(rows) / 4, rel=1e-6)
    # numpy input gives the same numbers
    assert metrics.brier(probs.numpy(), labels.numpy()) == pytest.approx(sum(rows) / 4, rel=1e-6)


def test_nll_of_zero_probability_is_finite_and_large():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    value = metrics.nll(probs, torch.tensor([1, 0]))
    assert math.isfinite(value) and value > 300


def _ece_loop(probs, labels, num_bins):
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    pred = probs.argmax(1)
    total = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        mask = (conf > lo) & (conf <= hi) if b > 0 else (conf <= hi)
        if mask.any():
            total += mask.sum() / len(conf) * abs((pred[mask] == labels[mask]).mean() - conf[mask].mean())
    return total


def test_ece_known_value_and_loop_reference():
    # ten rows at confidence 0.9, eight correct: ECE = |0.8 - 0.9| = 0.1
    probs = torch.tensor([[0.9, 0.1]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert metrics.ece(probs, labels) == pytest.approx(0.1, abs=1e-9)
    probs = _random_probs(500, 7, seed=3)
    labels = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(4))
    for bins in (1, 10, 15):
        assert metrics.ece(probs, labels, num_bins=bins) == pytest.approx(_ece_loop(probs, labels.numpy(), bins), abs=1e-12)
    # perfectly calibrated one-hot correct predictions: zero
    assert metrics.ece(torch.eye(4), torch.arange(4)) == pytest.approx(0.0)


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 0.5 belongs to the bin (0.4, 0.5] with 5 bins, not (0.5, 0.6]
    edges, counts, conf, acc = metrics.calibration_bins(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), num_bins=5)
    assert counts.tolist() == [0, 0, 1, 0, 0]


def test_ensemble_nll_matches_naive_and_is_stable():
    lp = torch.log_softmax(torch.randn(3, 50, 5, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 5, (50,))
    naive = -torch.log(lp.exp().mean(0)[torch.arange(50), labels]).mean()
    assert metrics.ensemble_nll(lp, labels) == pytest.approx(float(naive), rel=1e-12)
    # log-probabilities far below float64's range: exp underflows to 0, logsumexp does not
    tiny = torch.full((2, 1, 2), -5000.0, dtype=torch.float64)
    tiny[0, 0, 0], tiny[1, 0, 0] = -1000.0, -1001.0
    tiny[:, 0, 1] = 0.0
    expected = 1000.0 - math.log1p(math.exp(-1.0)) + math.log(2.0)
    assert metrics.ensemble_nll(tiny, torch.tensor([0])) == pytest.approx(expected, rel=1e-12)
    # one member: equals nll of that member
    assert metrics.ensemble_nll(lp[:1], labels) == pytest.approx(metrics.nll(lp[0].exp(), labels), rel=1e-10)


def test_disagreement_and_average_kl():
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    b = torch.tensor([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    members = torch.stack([a, b])
    assert metrics.disagreement(members) == pytest.approx(0.5)  # rows 1 and 3 differ
    assert metrics.disagreement(torch.stack([a, a, a])) == 0.0
    assert metrics.disagreement(a[None]) == 0.0

    def kl(p, q):
        return float((p * (p / q).log()).sum(1).mean())

    c = _random_probs(4, 2, seed=9)
    three = torch.stack([a, b, c])
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    expected = sum(kl(three[i], three[j]) for i, j in pairs) / len(pairs)
    assert metrics.average_kl(three) == pytest.approx(expected, rel=1e-12)
    assert metrics.average_kl(torch.stack([a, a])) == pytest.approx(0.0, abs=1e-15)


def test_summarize_with_repeat_weights_equals_explicit_repeats():
    lp = torch.log_softmax(torch.randn(3, 40, 4, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 4, (40,))
    weighted = metrics.summarize(lp, labels, weights=torch.tensor([2.0, 0.0, 1.0]))
    repeated = metrics.summarize(lp[[0, 0, 2]], labels)
    for key in ("accuracy", "nll", "ece", "brier"):
        assert weighted[key] == pytest.approx(repeated[key], rel=1e-12)
    assert weighted["nll"] == pytest.approx(metrics.ensemble_nll(lp[[0, 0, 2]], labels), rel=1e-12)
    assert weighted["ensemble_size"] == 3.0


@pytest.mark.parametrize("bad, match", [
    (lambda p, y: metrics.accuracy(p[0], y), "probs must be 2-D"),
    (lambda p, y: metrics.nll(p, y[:-1]), r"labels must have shape \(6,\)"),
    (lambda p, y: metrics.brier(p, y.double()), "integer class indices"),
    (lambda p, y: metrics.ece(p, y + 10), r"labels must lie in \[0, 3\)"),
    (lambda p, y: metrics.ensemble_nll(p, y), r"member_log_probs must be 3-D"),
    (lambda p, y: metrics.disagreement([1, 2]), "torch.Tensor or numpy array"),
    (lambda p, y: metrics.ece(p, y, num_bins=0), "num_bins must be a positive int"),
])
def test_bad_input_names_the_argument(bad, match):
    probs = _random_probs(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises((ValueError, TypeError), match=match):
        bad(probs, labels)


def test_reliability_diagram_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    probs = _random_probs(100, 4)
    labels = torch.randint(0, 4, (100,))
    path = metrics.reliability_diagram({"a": probs, "b": probs.numpy()}, labels, tmp_path / "rel.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_reliability_diagram_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="hyperkern\\[plot\\]"):
        metrics.reliability_diagram(_random_probs(5, 2), torch.zeros(5, dtype=torch.long), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
