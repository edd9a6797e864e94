"""OOD metrics and uncertainty scores (hyperkern.metrics), checked against scikit-learn and by hand."""
import math

import numpy as np
import pytest
import torch

from hyperkern import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the independent check (test extra)")


def _cases():
    rng = np.random.default_rng(0)
    for t in range(60):
        n_in, n_out = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        if t % 3 == 0:  # many ties
            a, b = rng.integers(0, 4, n_in).astype(float), rng.integers(1, 5, n_out).astype(float)
        elif t % 3 == 1:
            a, b = rng.normal(size=n_in), rng.normal(size=n_out) + 0.7
        else:  # worse than chance
            a, b = rng.normal(size=n_in) + 1.0, rng.normal(size=n_out)
        yield a, b
    yield np.array([0.0, 0.0]), np.array([0.0])  # every score tied
    yield np.array([0.1, 0.2]), np.array([0.3, 0.4])  # perfect separation
    yield np.array([0.3, 0.4]), np.array([0.1, 0.2])  # perfectly wrong


@pytest.mark.parametrize("case", list(_cases()))
def test_detection_metrics_match_scikit_learn(case):
    scores_in, scores_out = case
    y = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
    s = np.r_[scores_in, scores_out]
    assert metrics.auroc(scores_in, scores_out) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    assert metrics.aupr(scores_in, scores_out) == pytest.approx(sklearn_metrics.average_precision_score(y, s),
                                                                abs=1e-12)
    fpr, tpr, _ = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    for level in (0.95, 0.5, 1.0):
        assert metrics.fpr_at_tpr(scores_in, scores_out, level) == pytest.approx(fpr[np.argmax(tpr >= level)],
                                                                                 abs=1e-12)
    out = metrics.ood_detection(torch.from_numpy(scores_in), torch.from_numpy(scores_out))
    assert set(out) == {"auroc", "aupr", "fpr95"} and all(isinstance(v, float) for v in out.values())


def test_detection_metric_errors():
    with pytest.raises(ValueError, match="non-finite"):
        metrics.auroc(np.array([0.1, np.nan]), np.array([0.2]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        metrics.aupr(np.array([]), np.array([0.2]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        metrics.auroc(np.zeros((2, 2)), np.array([0.2]))
    with pytest.raises(ValueError, match="tpr must lie"):
        metrics.fpr_at_tpr(np.array([0.1]), np.array([0.2]), 1.5)
    with pytest.raises(TypeError):
        metrics.auroc([0.1], [0.2])


def test_predictive_entropy_and_mutual_information_by_hand():
    uniform = torch.full((3, 4), 0.25, dtype=torch.float64)
    assert torch.allclose(metrics.predictive_entropy(uniform), torch.full((3,), math.log(4), dtype=torch.float64))
    onehot = torch.eye(4, dtype=torch.float64)[:3]
    assert torch.equal(metrics.predictive_entropy(onehot), torch.zeros(3, dtype=torch.float64))  # 0 log 0 = 0
    # members that agree: no mutual information, whatever their entropy
    agree = torch.softmax(torch.randn(1, 5, 3, dtype=torch.float64), -1).expand(4, 5, 3)
    assert torch.allclose(metrics.mutual_information(agree), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    # two confident members that disagree: log 2
    disagree = torch.stack([torch.eye(2, dtype=torch.float64)[[0]], torch.eye(2, dtype=torch.float64)[[1]]])
    assert metrics.mutual_information(disagree).item() == pytest.approx(math.log(2))
    # weights: a member of weight 0 does not count; weights (3, 1) give H(0.75, 0.25)
    assert metrics.mutual_information(disagree, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-12)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metrics.mutual_information(disagree, np.array([3.0, 1.0])).item() == pytest.approx(h)
    # MI = H(mean) - mean H on random members, and 0 <= MI <= H(mean)
    p = torch.softmax(torch.randn(3, 7, 5, dtype=torch.float64), -1)
    mi = metrics.mutual_information(p)
    expected = metrics.predictive_entropy(p.mean(0)) - torch.stack([metrics.predictive_entropy(q) for q in p]).mean(0)
    assert torch.allclose(mi, expected) and bool((mi >= 0).all())
    assert bool((mi <= metrics.predictive_entropy(p.mean(0)) + 1e-12).all())
    with pytest.raises(ValueError, match="weights"):
        metrics.mutual_information(p, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="3-D"):
        metrics.mutual_information(p[0])
