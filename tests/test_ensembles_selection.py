import math

import numpy as np
import pytest
import torch

from hyperkern import metrics
from hyperkern.ensembles import greedy_selection


def _naive_greedy(lp, labels, size, replacement):
    """The definition, spelled out with metrics.ensemble_nll on explicit member lists."""
    chosen, best = [], math.inf
    while len(chosen) < size:
        scores = []
        for c in range(lp.shape[0]):
            if not replacement and c in chosen:
                scores.append(math.inf)
                continue
            scores.append(metrics.ensemble_nll(lp[chosen + [c]], labels))
        c = int(np.argmin(scores))
        if not scores[c] < best:
            break
        chosen.append(c)
        best = scores[c]
    return chosen


def _pool(p, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(p, n, c, generator=g, dtype=torch.float64) * 3
    logits[:, torch.arange(n), labels] += torch.rand(p, 1, generator=g, dtype=torch.float64) * 3  # varied skill
    return torch.log_softmax(logits, dim=-1), labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("replacement", [True, False])
def test_matches_the_definition(seed, replacement):
    lp, labels = _pool(7, 40, 5, seed)
    got = greedy_selection(lp, labels, size=6, replacement=replacement)
    assert got == _naive_greedy(lp, labels, 6, replacement)
    assert got[0] == int(torch.tensor([metrics.ensemble_nll(lp[[i]], labels) for i in range(7)]).argmin())
    if not replacement:
        assert len(set(got)) == len(got)


def test_repeats_act_as_weights():
    # model 0 is sharp on class 0 and poor on class 1, model 1 mediocre on both: the best mixture
    # weights model 0 about 2:1, which greedy with replacement reaches by choosing it twice.
    labels = torch.tensor([0] * 60 + [1] * 40)
    p0 = torch.tensor([[0.95, 0.05]] * 60 + [[0.6, 0.4]] * 40, dtype=torch.float64)
    p1 = torch.tensor([[0.5, 0.5]] * 60 + [[0.1, 0.9]] * 40, dtype=torch.float64)
    lp = torch.stack([p0, p1]).log()
    chosen = greedy_selection(lp, labels, size=3)
    assert chosen == [0, 1, 0]
    assert chosen == _naive_greedy(lp, labels, 3, True)
    assert greedy_selection(lp, labels, size=3, replacement=False) == [0, 1]


def test_stops_early_when_nothing_improves():
    labels = torch.tensor([0, 1, 2, 1])
    perfect = torch.full((4, 3), -50.0, dtype=torch.float64)
    perfect[torch.arange(4), labels] = 0.0
    noisy = torch.log_softmax(torch.randn(4, 3, dtype=torch.float64), dim=-1)
    lp = torch.stack([noisy, perfect, noisy * 2])
    assert greedy_selection(lp, labels, size=4) == [1]
    # identical models: the second copy never strictly improves
    lp = torch.stack([noisy, noisy])
    assert greedy_selection(lp, labels, size=4) == [0]


def test_ties_go_to_lowest_index_and_numpy_input():
    lp, labels = _pool(3, 20, 4, 0)
    pool = torch.cat([lp[1:2], lp[1:2], lp[0:1]])
    assert greedy_selection(pool.numpy(), labels.numpy(), size=1) == greedy_selection(pool, labels, 1)
    assert greedy_selection(pool, labels, size=1)[0] in (0, 2)
    if metrics.ensemble_nll(lp[1:2], labels) < metrics.ensemble_nll(lp[0:1], labels):
        assert greedy_selection(pool, labels, size=1) == [0]


def test_tiny_probabilities_are_handled_in_log_space():
    labels = torch.tensor([0, 1])
    a = torch.tensor([[0.0, -800.0], [-900.0, 0.0]], dtype=torch.float64)  # perfect-ish
    b = torch.tensor([[-2000.0, 0.0], [0.0, -2000.0]], dtype=torch.float64)  # always wrong, p = e^-2000
    chosen = greedy_selection(torch.stack([b, a]), labels, size=3)
    assert chosen == [1]


@pytest.mark.parametrize("call, match", [
    (lambda lp, y: greedy_selection(lp[0], y, 2), r"shape \(P, N, C\)"),
    (lambda lp, y: greedy_selection(lp, y[:-1], 2), r"labels must have shape \(10,\)"),
    (lambda lp, y: greedy_selection(lp, y + 3, 2), r"labels must lie in \[0, 3\)"),
    (lambda lp, y: greedy_selection(lp, y, 0), "size must be a positive int"),
    (lambda lp, y: greedy_selection(lp, y.double(), 2), "integer"),
    (lambda lp, y: greedy_selection(lp.long(), y, 2), "floating"),
])
def test_bad_input(call, match):
    lp, labels = _pool(4, 10, 3, 1)
    with pytest.raises((ValueError, TypeError), match=match):
        call(lp, labels)
