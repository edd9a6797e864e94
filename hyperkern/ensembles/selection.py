"""Greedy ensemble selection (Caruana et al., 2004) on validation NLL (docs/method.md section 4)."""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["greedy_selection"]

# A candidate must lower the NLL by more than this (relative) to be picked: re-picking the only
# member changes the NLL by rounding alone, which must not count as an improvement.
_TOLERANCE = 1e-12


def greedy_selection(val_log_probs, labels, size: int, replacement: bool = True,
                     max_picks: int | None = None) -> list[int]:
    """Choose an ensemble from a pool of P models by forward greedy selection on validation NLL.

    val_log_probs: (P, N, C) log-probabilities of every pool model on the N validation rows.
    labels: (N,) class indices.
    size: the number of DISTINCT models to choose (>= 1), as the reference's
        `while len(set(ens)) < max_ens_size` (uncertainty-baselines hyperdeepensemble.py).
    replacement: a model may be chosen more than once (repeats act as integer weights and do not
        count towards size).
    max_picks: a bound on the picks, repeats included (default 100 * size): with replacement the
        NLL can keep falling by ever smaller steps while re-weighting the same few models; the
        bound stops that loop. Without replacement picks and distinct models are the same.

    Step 1 takes the model with the lowest NLL. Each later step adds the candidate whose addition
    gives the lowest NLL of the averaged prediction, -mean_i log((1/n) sum_{k in chosen} p_k(y_i|x_i))
    (logsumexp, so tiny probabilities are exact), and stops early when no candidate lowers it.
    Ties go to the lowest pool index; a change within 1e-12 (relative) is no improvement. Returns the chosen pool indices in order of selection.
    """
    if isinstance(val_log_probs, np.ndarray):
        val_log_probs = torch.from_numpy(val_log_probs)
    if not isinstance(val_log_probs, torch.Tensor) or not val_log_probs.is_floating_point():
        raise TypeError("val_log_probs must be a floating torch.Tensor or numpy array of shape (P, N, C)")
    if val_log_probs.dim() != 3 or min(val_log_probs.shape) < 1:
        raise ValueError(f"val_log_probs must have shape (P, N, C) with P, N, C >= 1 (P pool models, N validation "
                         f"rows, C classes), got {tuple(val_log_probs.shape)}")
    pool, n, num_classes = val_log_probs.shape
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer torch.Tensor or numpy array of shape (N,)")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per validation row of val_log_probs), "
                         f"got {tuple(labels.shape)}")
    labels = labels.long().cpu()
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if max_picks is None:
        max_picks = 100 * size
    if isinstance(max_picks, bool) or not isinstance(max_picks, int) or max_picks < size:
        raise ValueError(f"max_picks must be an int >= size ({size}), got {max_picks!r}")

    # log p_k(y_i | x_i) for every pool model: (P, N)
    picked = val_log_probs.detach().cpu().double().gather(
        2, labels[None, :, None].expand(pool, n, 1)).squeeze(2)
    if bool(torch.isnan(picked).any()):
        raise ValueError("val_log_probs contains NaN at the labels' classes")
    chosen: list[int] = []
    running = torch.full((n,), -math.inf, dtype=torch.float64)  # logsumexp over chosen members
    best_nll = math.inf
    available = torch.ones(pool, dtype=torch.bool)
    distinct: set[int] = set()
    while len(distinct) < size and len(chosen) < max_picks:
        count = len(chosen) + 1
        candidate_nll = -(torch.logaddexp(running[None, :], picked) - math.log(count)).mean(dim=1)  # (P,)
        if not replacement:
            candidate_nll = candidate_nll.masked_fill(~available, math.inf)
        best = int(torch.argmin(candidate_nll))  # first minimum: lowest index wins ties
        value = float(candidate_nll[best])
        if chosen and not value < best_nll - _TOLERANCE * max(1.0, abs(best_nll)):  # rounding is no improvement
            break
        if not value < math.inf:  # every candidate is unavailable (without replacement)
            break
        chosen.append(best)
        distinct.add(best)
        best_nll = value
        running = torch.logaddexp(running, picked[best])
        available[best] = False
    return chosen
