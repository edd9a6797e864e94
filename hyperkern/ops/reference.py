"""The truth every fast path is tested against: float64 loops over ensemble members.

Each function computes member k from its own rows with its own effective weight, in float64,
and returns float64. Slow on purpose; never used on a hot path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _f64(t):
    return None if t is None else t.to(torch.float64)


def batch_ensemble_linear_reference(x, weight, r, s, bias=None):
    x, weight, r, s, bias = map(_f64, (x, weight, r, s, bias))
    E = r.shape[0]
    B = x.shape[0] // E
    outs = []
    for k in range(E):
        w_k = weight * torch.outer(s[k], r[k])  # W_k = W * (s_k r_k^T)
        y = x[k * B:(k + 1) * B] @ w_k.T
        if bias is not None:
            y = y + bias[k]
        outs.append(y)
    return torch.cat(outs)


def hyper_batch_ensemble_linear_reference(x, weight, delta, r, s, u, v, e1, bias=None, delta_bias=None, e2=None):
    x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2 = map(
        _f64, (x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2))
    E = r.shape[0]
    B = x.shape[0] // E
    outs = []
    for k in range(E):
        for i in range(k * B, (k + 1) * B):  # each row carries its own hyperparameters
            w_i = weight * torch.outer(s[k], r[k]) + delta * torch.outer(v[k] * e1[i], u[k])
            y = x[i] @ w_i.T
            if bias is not None:
                y = y + bias[k]
            if delta_bias is not None:
                y = y + delta_bias[k] * e2[i]
            outs.append(y)
    return torch.stack(outs)


def hyper_batch_ensemble_linear_hp_reference(x, weight, delta, r, s, u, v, hparams, embedding, bias=None,
                                             delta_bias=None):
    """hyper_batch_ensemble_linear_hp: row i's embedding [e1_i | e2_i] = embedding @ hparams_i (float64),
    then the hyper member loop. embedding: (out, m), or (2*out, m) with delta_bias."""
    hparams, embedding = _f64(hparams), _f64(embedding)
    out = weight.shape[0]
    e = torch.stack([embedding @ hparams[i] for i in range(hparams.shape[0])]) if hparams.shape[0] else \
        hparams.new_zeros((0, embedding.shape[0]))
    e1, e2 = e[:, :out], (e[:, out:] if delta_bias is not None else None)
    return hyper_batch_ensemble_linear_reference(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2)


def batch_ensemble_conv2d_reference(x, weight, r, s, bias=None, stride=1, padding=0, dilation=1, groups=1):
    x, weight, r, s, bias = map(_f64, (x, weight, r, s, bias))
    E = r.shape[0]
    B = x.shape[0] // E
    outs = []
    out_c, cg = weight.shape[0], weight.shape[1]
    for k in range(E):
        # r_k scales input channels: output channel o of group g = o // (out/groups) reads input
        # channels g*cg .. (g+1)*cg-1, so its effective input scale is r_k[g*cg + c].
        r_eff = r[k].view(groups, cg).repeat_interleave(out_c // groups, dim=0)  # (out, cg)
        w_k = weight * s[k][:, None, None, None] * r_eff[:, :, None, None]
        y = F.conv2d(x[k * B:(k + 1) * B], w_k, None, stride, padding, dilation, groups)
        if bias is not None:
            y = y + bias[k][:, None, None]
        outs.append(y)
    return torch.cat(outs)


def hyper_batch_ensemble_conv2d_reference(x, weight, delta, r, s, u, v, e1, bias=None, delta_bias=None, e2=None,
                                          stride=1, padding=0, dilation=1, groups=1):
    """e1, e2: (E*B, out) per-image embeddings, broadcast over the output's spatial positions."""
    x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2 = map(
        _f64, (x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2))
    E = r.shape[0]
    B = x.shape[0] // E
    outs = []
    for k in range(E):
        for i in range(k * B, (k + 1) * B):
            a = batch_ensemble_conv2d_reference(x[i:i + 1], weight, r[k:k + 1], s[k:k + 1], None,
                                                stride, padding, dilation, groups)
            d = batch_ensemble_conv2d_reference(x[i:i + 1], delta, u[k:k + 1], (v[k] * e1[i])[None], None,
                                                stride, padding, dilation, groups)
            y = a + d
            if bias is not None:
                y = y + bias[k][:, None, None]
            if delta_bias is not None:
                y = y + (delta_bias[k] * e2[i])[:, None, None]
            outs.append(y)
    return torch.cat(outs)
