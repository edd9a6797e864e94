import math

import numpy as np
import pytest
import torch

from hyperkern import metrics
from hyperkern.ensembles import greedy_selection


def _naive_greedy(lp, labels, size, replacement, count="distinct"):
    """The definition, spelled out with metrics.ensemble_nll on explicit member lists. count:
    "distinct" (size counts distinct models, the reference) or "picks" (the old, wrong reading)."""
    chosen, best = [], math.inf
    while (len(set(chosen)) if count == "distinct" else len(chosen)) < size:
        scores = []
        for c in range(lp.shape[0]):
            if not replacement and c in chosen:
                scores.append(math.inf)
                continue
            scores.append(metrics.ensemble_nll(lp[chosen + [c]], labels))
        c = int(np.argmin(scores))
        if not scores[c] < (best - 1e-12 * max(1.0, abs(best)) if chosen else math.inf):
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
    # model 0 is sharp on class 0 and poor on class 1, model 1 mediocre on both, model 2 a weaker
    # copy of model 1's strengths: the best mixture weights model 0 about 2:1 against model 1,
    # which greedy with replacement reaches by choosing it twice; the repeat does not count as a
    # member, so size=3 goes on to a third distinct model when one still helps.
    labels = torch.tensor([0] * 60 + [1] * 40)
    p0 = torch.tensor([[0.95, 0.05]] * 60 + [[0.6, 0.4]] * 40, dtype=torch.float64)
    p1 = torch.tensor([[0.5, 0.5]] * 60 + [[0.1, 0.9]] * 40, dtype=torch.float64)
    lp = torch.stack([p0, p1]).log()
    assert greedy_selection(lp, labels, size=2) == [0, 1]  # two distinct models reached: stop
    # only 2 exist: it re-weights with repeats until nothing improves
    assert greedy_selection(lp, labels, size=3) == [0, 1, 0]
    assert greedy_selection(lp, labels, size=3) == _naive_greedy(lp, labels, 3, True)
    assert greedy_selection(lp, labels, size=3, replacement=False) == [0, 1]


@pytest.mark.parametrize("size", [3, 4])  # at size 2 a repeat cannot come before the second model
def test_size_counts_distinct_members(size):
    # a picks-counting selection stops at `size` picks; the reference stops at `size` DISTINCT
    # models, so whenever a repeat is picked it returns more picks, and as many distinct models as
    # it can (size, unless no candidate improves first)
    differs = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 4, (50,), generator=g)
        logits = torch.randn(5, 50, 4, generator=g, dtype=torch.float64) * 2
        logits[:, torch.arange(50), labels] += torch.tensor([4.0, 1, 1, 1, 1], dtype=torch.float64)[:, None]
        lp = torch.log_softmax(logits, dim=-1)  # one strong model, four weak: repeats of it pay
        got = greedy_selection(lp, labels, size=size)
        assert got == _naive_greedy(lp, labels, size, True)
        picks = _naive_greedy(lp, labels, size, True, count="picks")
        assert got[:len(picks)] == picks
        assert len(set(got)) <= size
        if len(set(got)) < size:  # stopped early: nothing improved
            assert got == _naive_greedy(lp, labels, 10 * size, True)
        differs += got != picks
    assert differs > 0  # the two readings part on these pools


def test_max_picks_bounds_the_loop():
    lp, labels = _pool(6, 50, 4, 3)
    full = greedy_selection(lp, labels, size=4)
    assert greedy_selection(lp, labels, size=4, max_picks=4) == full[:4]
    with pytest.raises(ValueError, match="max_picks must be an int >= size"):
        greedy_selection(lp, labels, size=4, max_picks=3)


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
