"""The hyper layers' L2 penalty as one op for all layers of a model: hyper_l2_penalty.

Per hyper layer the penalty is the mean over rows i of lam_i ||W + Delta e1_i||^2 plus the bias term
(docs/method.md section 2). Expanding the square and using e1_i = A1 z_i, it needs only the rows'
statistics (penalty_stats, computed once per step for every layer) and three passes over the
weights. The "cpp" backend runs every layer in one op call (one kernel pass for the forward, one
backward op returning every layer's gradients; csrc/penalty.h has the formulas); the "torch"
backend is the per-layer composition below, also what runs without the extension.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from hyperkern._backends import implementation

__all__ = ["PenaltyStats", "penalty_stats", "hyper_l2_penalty"]

PENALTY_BACKENDS = ("auto", "torch", "cpp")


class PenaltyStats(NamedTuple):
    """The rows' statistics the hyper layers' L2 penalty needs, for G columns of strengths lam (rows, G)
    and the rows' normalised hyperparameters z (rows, m), packed per column as K = 1 + m + m^2 values
    [mean_i lam_i | mean_i lam_i z_i (m) | mean_i lam_i z_i z_i^T (m x m, row-major)]:

        overall (G, K)    the means over all rows
        member (E, G, K)  the means over each member's B rows

    The properties give the pieces as views: mean (G,), c = Z^T lam / rows (G, m),
    M = Z^T diag(lam) Z / rows (G, m, m), and per member mean_member (E, G), c_member (E, G, m),
    M_member (E, G, m, m)."""
    overall: torch.Tensor
    member: torch.Tensor

    @property
    def num_hparams(self) -> int:
        K = self.overall.shape[-1]  # 1 + m + m^2
        return (math.isqrt(4 * K - 3) - 1) // 2

    @property
    def mean(self) -> torch.Tensor:
        return self.overall[:, 0]

    @property
    def c(self) -> torch.Tensor:
        return self.overall[:, 1:1 + self.num_hparams]

    @property
    def M(self) -> torch.Tensor:
        m = self.num_hparams
        return self.overall[:, 1 + m:].unflatten(-1, (m, m))

    @property
    def mean_member(self) -> torch.Tensor:
        return self.member[:, :, 0]

    @property
    def c_member(self) -> torch.Tensor:
        return self.member[:, :, 1:1 + self.num_hparams]

    @property
    def M_member(self) -> torch.Tensor:
        m = self.num_hparams
        return self.member[:, :, 1 + m:].unflatten(-1, (m, m))


def penalty_stats(lam: torch.Tensor, hparams: torch.Tensor, ensemble_size: int) -> PenaltyStats:
    """PenaltyStats of per-row strengths lam (rows, G) and normalised hyperparameters (rows, m), rows
    member-major: computed once for every layer of a model (they share the rows).

    One batched product: per member, lam_k^T [1 | z | z z^T] over its rows (the features of every row
    laid side by side); the overall means are the mean of the members' (every member has B rows)."""
    z = hparams.to(lam.dtype)
    (rows, m), E, G = z.shape, ensemble_size, lam.shape[1]
    B = rows // E
    features = torch.cat((z.new_ones(rows, 1), z, (z.unsqueeze(2) * z.unsqueeze(1)).reshape(rows, m * m)), 1)
    member = torch.bmm(lam.reshape(E, B, G).transpose(1, 2), features.reshape(E, B, 1 + m + m * m)) / B
    return PenaltyStats(member.mean(0), member)


# ---------------------------------------------------------------------------------------------
# The "torch" backend: the per-layer composition

def _torch_layer_penalty(weight, delta, embedding, bias, delta_bias, stats: PenaltyStats, kernel: int, bias_col: int):
    """One layer's penalty from the rows' statistics, with the kernel's strengths in column `kernel` and
    the bias's in column `bias_col`.

    The row means of lam_i * e1_i and lam_i * e1_i^2 need no (rows, out) embeddings: with
    e1_i = A1 z_i, mean_i lam_i e1_i = A1 c and mean_i lam_i e1_i^2 = diag(A1 M A1^T), where
    c = Z^T lam / rows and M = Z^T diag(lam) Z / rows (m x m); the bias term uses the same identities
    per member over its B rows."""
    out, m = weight.shape[0], embedding.shape[1]
    W = weight.reshape(out, -1)  # (out, fan_in)
    D = delta.reshape(out, -1)
    A1 = embedding[:out]
    s = stats.overall[kernel]  # [mean | c | M]
    mean_lam_e1 = A1 @ s[1:1 + m]  # (out,)
    mean_lam_e1sq = ((A1 @ s[1 + m:].reshape(m, m)) * A1).sum(1)
    penalty = (s[0] * W.square().sum() + 2.0 * ((W * D).sum(1) * mean_lam_e1).sum()
               + (D.square().sum(1) * mean_lam_e1sq).sum())
    if bias is not None:
        A2 = embedding[out:]
        b, db = bias, delta_bias  # (E, out)
        sm = stats.member[:, bias_col]  # (E, K)
        mean_lb_e2 = sm[:, 1:1 + m] @ A2.t()  # (E, out)
        mean_lb_e2sq = torch.einsum("om,kmn,on->ko", A2, sm[:, 1 + m:].reshape(sm.shape[0], m, m), A2)
        per_member = sm[:, 0] * b.square().sum(1) + 2.0 * (b * db * mean_lb_e2).sum(1) \
            + (db.square() * mean_lb_e2sq).sum(1)
        penalty = penalty + per_member.mean()
    return penalty


def _torch_hyper_l2_penalty(weights, deltas, embeddings, biases, delta_biases, overall, member, kernel_cols, bias_cols):
    stats = PenaltyStats(overall, member)
    total = None
    for layer in zip(weights, deltas, embeddings, biases, delta_biases, kernel_cols, bias_cols):
        w, d, a, b, db, kg, bg = layer
        term = _torch_layer_penalty(w, d, a, b, db, stats, kg, bg)
        total = term if total is None else total + term
    return total


# ---------------------------------------------------------------------------------------------
# Validation

def _check_list(name: str, value, length: int | None):
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list with one entry per layer, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have one entry per layer ({length}, as weights), got {len(value)}")


def _fast_ok(weights, deltas, embeddings, biases, delta_biases, stats, kernel_cols, bias_cols) -> bool:
    """Plain comparisons that accept a valid call (a model's, every step) without building messages;
    anything else goes through _check_penalty_args, which names what is wrong (a few us a layer: each
    tensor attribute read costs 0.1-0.3 us)."""
    try:
        L = len(weights)
        if not (L and type(stats) is PenaltyStats and len(deltas) == L and len(embeddings) == L
                and len(biases) == L and len(delta_biases) == L and len(kernel_cols) == L and len(bias_cols) == L):
            return False
        overall, member = stats
        w0 = weights[0]
        dtype, device = w0.dtype, w0.device
        if not (w0.is_floating_point() and overall.dim() == 2 and member.dim() == 3
                and member.shape[1:] == overall.shape and overall.dtype == dtype and member.dtype == dtype
                and overall.device == device and member.device == device):
            return False
        G, K = overall.shape
        E, m = member.shape[0], embeddings[0].shape[-1]
        if K != 1 + m + m * m:
            return False
        for w, d, a, b, db, kg, bg in zip(weights, deltas, embeddings, biases, delta_biases, kernel_cols, bias_cols):
            shape = w.shape
            out = shape[0]
            if not (len(shape) >= 2 and d.shape == shape and w.dtype is dtype and d.dtype is dtype
                    and a.dtype is dtype and type(kg) is int and 0 <= kg < G and w.device == device
                    and d.device == device and a.device == device):
                return False
            if b is None:
                if db is not None or a.shape != (out, m):
                    return False
            elif not (a.shape == (2 * out, m) and b.shape == (E, out) and db.shape == (E, out)
                      and b.dtype is dtype and db.dtype is dtype and type(bg) is int and 0 <= bg < G
                      and b.device == device and db.device == device):
                return False
        return True
    except Exception:  # a wrong type somewhere: the full checks say which
        return False


def _check_penalty_args(weights, deltas, embeddings, biases, delta_biases, stats, kernel_cols, bias_cols):
    if _fast_ok(weights, deltas, embeddings, biases, delta_biases, stats, kernel_cols, bias_cols):
        return
    _check_list("weights", weights, None)
    if len(weights) == 0:
        raise ValueError("weights must list at least one layer (a model without hyper layers has no penalty)")
    L = len(weights)
    for name, value in (("deltas", deltas), ("embeddings", embeddings), ("biases", biases),
                        ("delta_biases", delta_biases), ("kernel_cols", kernel_cols), ("bias_cols", bias_cols)):
        _check_list(name, value, L)
    if not isinstance(stats, PenaltyStats):
        raise TypeError(f"stats must be a PenaltyStats (hyperkern.ops.penalty_stats), got {type(stats).__name__}")
    for n, t in zip(PenaltyStats._fields, stats):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"stats.{n} must be a torch.Tensor, got {type(t).__name__}")
    w0 = weights[0]
    if not isinstance(w0, torch.Tensor):
        raise TypeError(f"weights[0] must be a torch.Tensor, got {type(w0).__name__}")
    if not w0.is_floating_point():
        raise TypeError(f"weights[0] must be a floating tensor, got {w0.dtype}")
    dtype, device = w0.dtype, w0.device
    overall, member = stats
    if overall.dim() != 2 or member.dim() != 3 or tuple(member.shape[1:]) != tuple(overall.shape):
        raise ValueError("stats must be overall (G, K) and member (E, G, K) (hyperkern.ops.penalty_stats), got "
                         f"{tuple(overall.shape)} and {tuple(member.shape)}")
    G, E = overall.shape[0], member.shape[0]
    a0 = embeddings[0]
    m = a0.shape[1] if isinstance(a0, torch.Tensor) and a0.dim() == 2 else None
    if m is None or overall.shape[1] != 1 + m + m * m:
        raise ValueError(f"stats must hold K = 1 + m + m^2 values per column for the m hyperparameters of "
                         f"embeddings[0] (m, K = {m}, {overall.shape[1]})")
    for n, t in zip(PenaltyStats._fields, stats):
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"stats.{n} is {t.dtype} on {t.device} but weights[0] is {dtype} on {device}; the "
                            "statistics must share the weights' dtype and device (penalty_stats(lam.to(dtype), ...))")

    def same(name, t):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but weights[0] is {dtype} on {device}; all layers "
                            "must share one dtype and device")

    for i in range(L):
        w, d, a, b, db = weights[i], deltas[i], embeddings[i], biases[i], delta_biases[i]
        same(f"weights[{i}]", w)
        same(f"deltas[{i}]", d)
        same(f"embeddings[{i}]", a)
        if w.dim() < 2:
            raise ValueError(f"weights[{i}] must be (out, in) or (out, in, kh, kw), got shape {tuple(w.shape)}")
        if d.shape != w.shape:
            raise ValueError(f"deltas[{i}] must have weights[{i}]'s shape {tuple(w.shape)}, got {tuple(d.shape)}")
        if (b is None) != (db is None):
            raise ValueError(f"biases[{i}] and delta_biases[{i}] must be both tensors or both None (a hyper layer "
                             "with a bias has a delta bias)")
        out = w.shape[0]
        rows = out if b is None else 2 * out
        if a.dim() != 2 or tuple(a.shape) != (rows, m):
            raise ValueError(f"embeddings[{i}] must have shape ({rows}, {m}) (out = {out} rows"
                             f"{', twice that with a bias' if b is not None else ''}; m = {m} hyperparameters), "
                             f"got {tuple(a.shape)}")
        cols = (("kernel_cols", kernel_cols[i]),) + ((("bias_cols", bias_cols[i]),) if b is not None else ())
        for name, col in cols:
            if not isinstance(col, int) or isinstance(col, bool) or not 0 <= col < G:
                raise ValueError(f"{name}[{i}] must be a column index in [0, {G}) of the statistics, got {col!r}")
        if b is not None:
            same(f"biases[{i}]", b)
            same(f"delta_biases[{i}]", db)
            for name, t in ((f"biases[{i}]", b), (f"delta_biases[{i}]", db)):
                if tuple(t.shape) != (E, out):
                    raise ValueError(f"{name} must have shape (E, out) = ({E}, {out}), got {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------
# The public op

def hyper_l2_penalty(weights: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
                     embeddings: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                     delta_biases: Sequence[torch.Tensor | None], stats: PenaltyStats, kernel_cols: Sequence[int],
                     bias_cols: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """The hyper layers' L2 penalty, summed over layers, in one op (a 0-d tensor):

        sum_l mean_i [ lam_i[g_l] ||W_l + Delta_l e1_li||^2 + lam_i[h_l] ||b_lk + delta_b_lk e2_li||^2 ]

    over the rows i (member k = i // B), with [e1_li | e2_li] = embeddings[l] @ z_i, computed from the
    rows' statistics without per-row weights (docs/method.md section 2).

    Args:
        weights, deltas: per layer, the shared kernel and its delta, (out, in) or (out, in, kh, kw).
        embeddings: per layer, the embedding weight (out, m), or (2*out, m) with a bias.
        biases, delta_biases: per layer, (E, out) tensors, or None for a layer without a bias.
        stats: penalty_stats(lam, z, E) of the rows' strengths lam (rows, G) and normalised hyperparameters
            z (rows, m), in the weights' dtype.
        kernel_cols, bias_cols: per layer, the column of lam with the kernel's / the bias's strengths.
        backend: "auto" (the fused "cpp" op where the extension has it, else "torch"), "torch" (the
            per-layer composition) or "cpp".
    Gradients flow to every tensor argument (to the statistics through a composition of ATen ops).
    """
    _check_penalty_args(weights, deltas, embeddings, biases, delta_biases, stats, kernel_cols, bias_cols)
    if backend not in PENALTY_BACKENDS:
        raise ValueError(f"backend must be one of {PENALTY_BACKENDS} (there is no Triton kernel for the penalty), "
                         f"got {backend!r}")
    run = implementation("penalty", "hyper_l2_penalty", backend, weights[0].device, _torch_hyper_l2_penalty)
    return run(list(weights), list(deltas), list(embeddings), list(biases), list(delta_biases), *stats,
               list(kernel_cols), list(bias_cols))


def penalty_backend(layer_backend: str) -> str:
    """The penalty's backend for layers built with `layer_backend`: "torch" keeps the plain composition,
    any other runs the fused op where it exists ("auto")."""
    return "torch" if layer_backend == "torch" else "auto"
