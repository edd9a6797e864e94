"""Metrics for ensembles of classifiers (docs/method.md section 6).

Conventions:
  probs         (N, C) probabilities of one predictor (for an ensemble: the mean of its members'
                probabilities), rows sum to one.
  labels        (N,) integer class indices in [0, C).
  member_probs  (E, N, C) probabilities of each of the E members, member k in member_probs[k]
                (the member-major (E*B, C) output of a model reshapes to (E, B, C) by .view(E, B, C)).
  member_log_probs  (E, N, C) log-probabilities (log_softmax of each member's logits).

Every function accepts torch tensors or numpy arrays and returns a Python float.
Computations run in float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "accuracy",
    "nll",
    "ece",
    "brier",
    "ensemble_nll",
    "disagreement",
    "average_kl",
    "calibration_bins",
    "reliability_diagram",
    "summarize",
    "predictive_entropy",
    "mutual_information",
    "auroc",
    "aupr",
    "fpr_at_tpr",
    "ood_detection",
]

_TINY = torch.finfo(torch.float64).tiny


def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    return value.detach().cpu()


def _check_probs(name: str, probs, ndim: int) -> torch.Tensor:
    probs = _as_tensor(name, probs)
    if not probs.is_floating_point():
        raise TypeError(f"{name} must hold floating-point probabilities, got dtype {probs.dtype}")
    if probs.dim() != ndim:
        shape = "(N, C)" if ndim == 2 else "(E, N, C)"
        raise ValueError(f"{name} must be {ndim}-D with shape {shape}, got shape {tuple(probs.shape)}")
    if probs.shape[-1] < 1 or probs.shape[-2] < 1:
        raise ValueError(f"{name} must have at least one row and one class, got shape {tuple(probs.shape)}")
    return probs.to(torch.float64)


def _check_labels(labels, n: int, num_classes: int, probs_name: str) -> torch.Tensor:
    labels = _as_tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) (one class index per row of {probs_name}), "
                         f"got shape {tuple(labels.shape)}")
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) ({probs_name} has {num_classes} classes), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels


def accuracy(probs, labels) -> float:
    """Fraction of rows whose most probable class is the label. probs (N, C), labels (N,)."""
    p = _check_probs("probs", probs, 2)
    y = _check_labels(labels, p.shape[0], p.shape[1], "probs")
    return float((p.argmax(dim=1) == y).double().mean())


def nll(probs, labels) -> float:
    """Negative log-likelihood -mean_i log probs[i, labels[i]]. probs (N, C), labels (N,).

    Probabilities are clamped at the smallest positive float64 so that a zero probability gives a
    large finite value (about 708) rather than inf. For an ensemble prefer ensemble_nll, which works
    from the members' log-probabilities and never forms the tiny probabilities at all.
    """
    p = _check_probs("probs", probs, 2)
    y = _check_labels(labels, p.shape[0], p.shape[1], "probs")
    picked = p.gather(1, y[:, None]).squeeze(1)
    return float(-picked.clamp_min(_TINY).log().mean())


def calibration_bins(probs, labels, num_bins: int = 15):
    """Equal-width confidence bins on [0, 1] for the top-class confidence.

    Returns (bin_edges (num_bins+1,), counts (num_bins,), mean_confidence (num_bins,),
    accuracy (num_bins,)) as float64 numpy arrays; empty bins hold NaN confidence and accuracy.
    A confidence c lands in bin b with edges[b] < c <= edges[b+1] (confidence 0 goes to bin 0).
    """
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    p = _check_probs("probs", probs, 2)
    y = _check_labels(labels, p.shape[0], p.shape[1], "probs")
    confidence, predicted = p.max(dim=1)
    correct = (predicted == y).double()
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    # right-closed bins: bucketize with right=False gives index i such that edges[i-1] < c <= edges[i]
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, num_bins - 1)
    counts = torch.bincount(index, minlength=num_bins).double()
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = (conf_sum / counts).numpy()
        mean_acc = (acc_sum / counts).numpy()
    return edges.numpy(), counts.numpy(), mean_conf, mean_acc


def ece(probs, labels, num_bins: int = 15) -> float:
    """Expected calibration error with num_bins equal-width bins of top-class confidence:
    sum_b (n_b / N) * |accuracy_b - confidence_b|. probs (N, C), labels (N,)."""
    _, counts, conf, acc = calibration_bins(probs, labels, num_bins)
    n = counts.sum()
    if n == 0:
        return 0.0
    nonempty = counts > 0
    return float((counts[nonempty] / n * np.abs(acc[nonempty] - conf[nonempty])).sum())


def brier(probs, labels) -> float:
    """Brier score: mean over rows of sum over classes of (probs - onehot(labels))^2, in [0, 2]."""
    p = _check_probs("probs", probs, 2)
    y = _check_labels(labels, p.shape[0], p.shape[1], "probs")
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    return float(((p - onehot) ** 2).sum(dim=1).mean())


def ensemble_nll(member_log_probs, labels) -> float:
    """NLL of the ensemble's averaged prediction, -mean_i log((1/E) sum_k p_k(y_i | x_i)), computed
    as -mean_i (logsumexp_k log p_k(y_i | x_i) - log E), stable for tiny probabilities.

    member_log_probs: (E, N, C) log-probabilities of each member; labels (N,).
    """
    lp = _check_probs("member_log_probs", member_log_probs, 3)
    y = _check_labels(labels, lp.shape[1], lp.shape[2], "member_log_probs")
    e = lp.shape[0]
    picked = lp.gather(2, y[None, :, None].expand(e, -1, 1)).squeeze(2)  # (E, N)
    return float(-(torch.logsumexp(picked, dim=0) - math.log(e)).mean())


def disagreement(member_probs) -> float:
    """Mean pairwise disagreement: the fraction of rows on which two members' top classes differ,
    averaged over all unordered pairs of distinct members. member_probs (E, N, C); 0 for E = 1."""
    p = _check_probs("member_probs", member_probs, 3)
    e = p.shape[0]
    if e < 2:
        return 0.0
    top = p.argmax(dim=2)  # (E, N)
    differ = (top[:, None, :] != top[None, :, :]).double().mean(dim=2)  # (E, E)
    return float(differ.sum() / (e * (e - 1)))


def average_kl(member_probs) -> float:
    """Average KL divergence KL(p_k || p_l) = sum_c p_k log(p_k / p_l), averaged over rows and over
    all ordered pairs k != l of members. member_probs (E, N, C); 0 for E = 1.
    Probabilities are clamped at the smallest positive float64 inside the logarithms."""
    p = _check_probs("member_probs", member_probs, 3)
    e = p.shape[0]
    if e < 2:
        return 0.0
    logp = p.clamp_min(_TINY).log()
    # sum_c p_k (log p_k - log p_l) for all (k, l): (E, E, N)
    self_term = (p * logp).sum(dim=2)  # (E, N)
    cross = torch.einsum("knc,lnc->kln", p, logp)
    kl = self_term[:, None, :] - cross
    off_diagonal = ~torch.eye(e, dtype=torch.bool)
    return float(kl[off_diagonal].mean())


def summarize(member_log_probs, labels, weights=None, num_bins: int = 15) -> dict:
    """All metrics of an ensemble from its members' (E, N, C) log-probabilities.

    weights: optional (E,) non-negative member weights (e.g. repeat counts of a greedy selection);
    the ensemble prediction is sum_k w_k p_k / sum_k w_k. Returns a dict with accuracy, nll, ece,
    brier, disagreement, average_kl and ensemble_size (the number of member slots, repeats counted).
    """
    lp = _check_probs("member_log_probs", member_log_probs, 3)
    y = _check_labels(labels, lp.shape[1], lp.shape[2], "member_log_probs")
    if weights is None:
        w = torch.ones(lp.shape[0], dtype=torch.float64)
    else:
        w = _as_tensor("weights", weights).to(torch.float64)
        if w.shape != (lp.shape[0],) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be ({lp.shape[0]},) non-negative with a positive sum, got {w.tolist()}")
    logw = (w / w.sum()).clamp_min(_TINY).log()
    mixed = torch.logsumexp(lp + logw[:, None, None], dim=0)  # (N, C) log of the weighted mean
    probs = mixed.exp()
    picked = mixed.gather(1, y[:, None]).squeeze(1)
    member_probs = lp.exp()
    used = w > 0
    return {
        "accuracy": accuracy(probs, y),
        "nll": float(-picked.mean()),
        "ece": ece(probs, y, num_bins),
        "brier": brier(probs, y),
        "disagreement": disagreement(member_probs[used]),
        "average_kl": average_kl(member_probs[used]),
        "ensemble_size": float(w.sum()) if weights is not None else float(lp.shape[0]),
    }


def reliability_diagram(probs, labels, path, num_bins: int = 15, title: str | None = None):
    """Write a reliability diagram (accuracy against confidence per bin, with the gap to the diagonal
    and the ECE in the legend) as a PNG at path.

    probs: (N, C) probabilities, or a dict {name: (N, C) probabilities} to draw one panel per
    predictor side by side. Needs matplotlib (the optional extra: pip install "hyperkern[plot]").
    Returns the path written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("reliability_diagram needs matplotlib, which is not installed; "
                          'install it with: pip install "hyperkern[plot]" (or pip install matplotlib)') from exc
    panels = dict(probs) if isinstance(probs, dict) else {title or "model": probs}
    if not panels:
        raise ValueError("probs must be an (N, C) array or a non-empty dict of them")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, p) in zip(axes[0], panels.items()):
        edges, counts, conf, acc = calibration_bins(p, labels, num_bins)
        centers = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        filled = counts > 0
        ax.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=width, edgecolor="tab:red",
               fill=False, hatch="///", linewidth=0.8, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}\nECE {ece(p, labels, num_bins):.4f}", fontsize=9)
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Uncertainty scores and out-of-distribution detection. The scores are per example and come back as
# (N,) float64 tensors; the detection metrics return Python floats like the rest of this module.


def _weights_for(name: str, weights, e: int) -> torch.Tensor:
    if weights is None:
        return torch.full((e,), 1.0 / e, dtype=torch.float64)
    w = _as_tensor(name, weights).to(torch.float64)
    if w.shape != (e,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"{name} must be ({e},) finite and non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()


def _entropy_rows(p: torch.Tensor) -> torch.Tensor:
    """-sum_c p log p over the last dimension, with 0 log 0 = 0."""
    return -(p * p.clamp_min(_TINY).log()).sum(dim=-1)


def predictive_entropy(probs) -> torch.Tensor:
    """(N,) entropy -sum_c p_c log p_c (nats) of each row of probs (N, C): the total uncertainty of
    a predictor (for an ensemble, of its averaged prediction). 0 log 0 counts as 0."""
    return _entropy_rows(_check_probs("probs", probs, 2))


def mutual_information(member_probs, weights=None) -> torch.Tensor:
    """(N,) mutual information between the prediction and the member, H(sum_k w_k p_k) - sum_k w_k
    H(p_k): the members' disagreement (the epistemic part of the predictive entropy; 0 when every
    member predicts the same distribution). member_probs (E, N, C); weights: optional (E,)
    non-negative member weights (e.g. repeat counts of a greedy selection), uniform by default.
    Clamped at 0 against rounding."""
    p = _check_probs("member_probs", member_probs, 3)
    w = _weights_for("weights", weights, p.shape[0])
    mixed = torch.einsum("k,knc->nc", w, p)
    return (_entropy_rows(mixed) - torch.einsum("k,kn->n", w, _entropy_rows(p))).clamp_min(0.0)


def _detection_scores(scores_in, scores_out):
    """Scores as float64 numpy arrays, labels 1 for out-of-distribution (the positive class)."""
    arrays = []
    for name, value in (("scores_in", scores_in), ("scores_out", scores_out)):
        a = _as_tensor(name, value)
        if a.dim() != 1 or a.shape[0] < 1:
            raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {tuple(a.shape)}")
        if a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"{name} must hold real scores, got dtype {a.dtype}")
        a = a.to(torch.float64).numpy()
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds {int((~np.isfinite(a)).sum())} non-finite scores")
        arrays.append(a)
    scores = np.concatenate(arrays)
    labels = np.concatenate([np.zeros(arrays[0].shape[0]), np.ones(arrays[1].shape[0])])
    return scores, labels


def _roc_points(scores_in, scores_out):
    """True and false positive rates and precision at every distinct threshold, from the highest score
    down (a row is called out-of-distribution when its score is >= the threshold)."""
    scores, labels = _detection_scores(scores_in, scores_out)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]  # last row of each distinct score
    tp = np.cumsum(labels)[last]
    fp = (last + 1) - tp
    return tp / labels.sum(), fp / (labels.size - labels.sum()), tp / (tp + fp)


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve of telling out-of-distribution rows (positives) from in-distribution
    ones by score, higher meaning more likely out of distribution: the probability that a random OOD
    row scores above a random in-distribution row, ties counting one half (the trapezoidal area)."""
    tpr, fpr, _ = _roc_points(scores_in, scores_out)
    tpr, fpr = np.r_[0.0, tpr], np.r_[0.0, fpr]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def aupr(scores_in, scores_out) -> float:
    """Area under the precision-recall curve with out-of-distribution rows as the positive class, as
    average precision sum_n (R_n - R_{n-1}) P_n over the distinct thresholds (scikit-learn's
    average_precision_score; no interpolation)."""
    tpr, _, precision = _roc_points(scores_in, scores_out)
    return float(np.sum(np.diff(np.r_[0.0, tpr]) * precision))


def fpr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """False positive rate (the fraction of in-distribution rows flagged) at the highest threshold whose
    true positive rate (the fraction of OOD rows flagged) reaches tpr; FPR95 for tpr = 0.95."""
    if not isinstance(tpr, (int, float)) or isinstance(tpr, bool) or not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr!r}")
    rates, fpr, _ = _roc_points(scores_in, scores_out)
    return float(fpr[int(np.argmax(rates >= float(tpr) - 1e-12))])


def ood_detection(scores_in, scores_out) -> dict:
    """auroc, aupr and fpr95 (fpr_at_tpr at 0.95) of one score, OOD rows being the positives."""
    return {"auroc": auroc(scores_in, scores_out), "aupr": aupr(scores_in, scores_out),
            "fpr95": fpr_at_tpr(scores_in, scores_out, 0.95)}
