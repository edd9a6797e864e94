"""Reference implementations of the BatchEnsemble layers of peer libraries, for the benchmarks.

These are the ways other PyTorch code computes a BatchEnsemble layer, written out here (no
dependency on those packages) so the suites can time hyperkern against them on the same shapes:

  TabM style (yandex-research/tabm, LinearBatchEnsemble): broadcast the fast weights over a view of
      the rows, no copy of r / s:  y = ((x.view(E, B, in) * r[:, None]) @ W^T) * s[:, None] + b[:, None]
  torch-uncertainty style (torch_uncertainty.layers.BatchLinear / BatchConv2d): materialise one
      factor row per input row with repeat_interleave (r_group, s_group, bias each become (E*B, .)),
      then  y = linear(x * R) * S + Bias;  the copies are what that layout costs.

Rows are member-major in both: rows k*B .. (k+1)*B-1 belong to member k (E = r.shape[0]), the
same layout as hyperkern, so every variant computes the same numbers from the same parameters.
The conv analogues apply r to input channels and s, b to output channels, broadcast over H, W.

Besides the peers, one strategy of hyperkern's own design space: member_loop_batch_ensemble_conv2d runs one
plain convolution per member with the folded weight W * s_k r_k^T (the cpp backend's arithmetic, written
with F.conv2d), optionally each member on its own CUDA stream so the E small convolutions can overlap.

Modules: TabMStyleLayer / TorchUncertaintyStyleLayer wrap an existing hyperkern BatchEnsembleLinear
or BatchEnsembleConv2d and compute with ITS parameters; swap_batch_ensemble_layers(model, style)
puts them into a batch-variant zoo model, giving "the same network written the peer's way".
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hyperkern.nn import BatchEnsembleConv2d, BatchEnsembleLinear, HyperBatchEnsembleConv2d, HyperBatchEnsembleLinear

__all__ = ["tabm_batch_ensemble_linear", "torch_uncertainty_batch_ensemble_linear", "tabm_batch_ensemble_conv2d",
           "torch_uncertainty_batch_ensemble_conv2d", "member_loop_batch_ensemble_conv2d", "TabMStyleLayer", "TorchUncertaintyStyleLayer", "PEER_STYLES",
           "swap_batch_ensemble_layers"]


# ---- linear ----
def tabm_batch_ensemble_linear(x, weight, r, s, bias=None):
    """TabM style: x (E*B, in) member-major, weight (out, in), r (E, in), s and bias (E, out) -> (E*B, out)."""
    E = r.shape[0]
    x3 = x.view(E, -1, x.shape[-1])
    y = (x3 * r[:, None]) @ weight.T * s[:, None]
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(x.shape[0], -1)


def torch_uncertainty_batch_ensemble_linear(x, weight, r, s, bias=None):
    """torch-uncertainty style: per-row factors materialised by repeat_interleave, then
    linear(x * R) * S + Bias. Same arguments and member-major layout as tabm_batch_ensemble_linear."""
    E = r.shape[0]
    rows_per_member = x.shape[0] // E
    r_rows = torch.repeat_interleave(r, rows_per_member, dim=0)
    s_rows = torch.repeat_interleave(s, rows_per_member, dim=0)
    y = F.linear(x * r_rows, weight) * s_rows
    if bias is not None:
        y = y + torch.repeat_interleave(bias, rows_per_member, dim=0)
    return y


# ---- conv2d ----
def tabm_batch_ensemble_conv2d(x, weight, r, s, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """TabM-style broadcasting for conv: x (E*B, C_in, H, W) member-major -> (E*B, C_out, H', W')."""
    E = r.shape[0]
    xs = (x.view(E, -1, *x.shape[1:]) * r[:, None, :, None, None]).view(x.shape)
    h = F.conv2d(xs, weight, None, stride, padding, dilation, groups)
    y = h.view(E, -1, *h.shape[1:]) * s[:, None, :, None, None]
    if bias is not None:
        y = y + bias[:, None, :, None, None]
    return y.view(h.shape)


def torch_uncertainty_batch_ensemble_conv2d(x, weight, r, s, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch-uncertainty BatchConv2d style: (E*B, C, 1, 1) factor tensors built with
    repeat_interleave, then conv(x * R) * S + Bias."""
    E = r.shape[0]
    rows_per_member = x.shape[0] // E
    r_rows = torch.repeat_interleave(r, rows_per_member, dim=0)[:, :, None, None]
    s_rows = torch.repeat_interleave(s, rows_per_member, dim=0)[:, :, None, None]
    y = F.conv2d(x * r_rows, weight, None, stride, padding, dilation, groups) * s_rows
    if bias is not None:
        y = y + torch.repeat_interleave(bias, rows_per_member, dim=0)[:, :, None, None]
    return y


def member_loop_batch_ensemble_conv2d(x, weight, r, s, bias=None, stride=1, padding=0, dilation=1, groups=1,
                                      streams=None):
    """One F.conv2d per member with the folded weight W_k = W * s_k r_k^T, outputs concatenated.
    streams: None, or one CUDA stream per member; member k then runs on streams[k] (autograd runs its
    backward there too) and the current stream waits for all of them."""
    E = r.shape[0]
    B = x.shape[0] // E
    O, cg = weight.shape[:2]
    in_scale = r.view(E, groups, 1, cg).expand(E, groups, O // groups, cg).reshape(E, O, cg)  # r of each W column

    def member(k):
        wk = weight * (s[k][:, None] * in_scale[k])[:, :, None, None]
        return F.conv2d(x[k * B:(k + 1) * B], wk, None if bias is None else bias[k], stride, padding, dilation,
                        groups)

    if streams is None:
        return torch.cat([member(k) for k in range(E)])
    main = torch.cuda.current_stream(x.device)
    outs = []
    for k, stream in enumerate(streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            outs.append(member(k))
    for stream, y in zip(streams, outs):
        main.wait_stream(stream)
        y.record_stream(main)  # allocated on a side stream, read by the main stream's cat
    return torch.cat(outs)


# ---- modules ----
class _PeerLayer(nn.Module):
    _linear = None
    _conv = None

    def __init__(self, layer: nn.Module):
        super().__init__()
        if isinstance(layer, (HyperBatchEnsembleLinear, HyperBatchEnsembleConv2d)) or not isinstance(
                layer, (BatchEnsembleLinear, BatchEnsembleConv2d)):
            raise TypeError(f"layer must be a hyperkern BatchEnsembleLinear or BatchEnsembleConv2d, got "
                            f"{type(layer).__name__}")
        self.layer = layer  # its parameters are this module's parameters

    def forward(self, x):
        m = self.layer
        if isinstance(m, BatchEnsembleLinear):
            lead = x.shape[:-1]
            y = type(self)._linear(x.reshape(-1, m.in_features), m.weight, m.r, m.s, m.bias)
            return y.reshape(*lead, m.out_features)
        x, padding = m._pad(x)  # padding="same" resolved for x's size, as the layer itself does
        return type(self)._conv(x, m.weight, m.r, m.s, m.bias, m.stride, padding, m.dilation, m.groups)


class TabMStyleLayer(_PeerLayer):
    """A hyperkern BatchEnsemble layer's parameters computed the TabM way (broadcast views)."""
    _linear = staticmethod(tabm_batch_ensemble_linear)
    _conv = staticmethod(tabm_batch_ensemble_conv2d)


class TorchUncertaintyStyleLayer(_PeerLayer):
    """A hyperkern BatchEnsemble layer's parameters computed the torch-uncertainty way (repeat_interleave)."""
    _linear = staticmethod(torch_uncertainty_batch_ensemble_linear)
    _conv = staticmethod(torch_uncertainty_batch_ensemble_conv2d)


PEER_STYLES = {"tabm": TabMStyleLayer, "torch_uncertainty": TorchUncertaintyStyleLayer}


def swap_batch_ensemble_layers(model: nn.Module, style: str) -> nn.Module:
    """Replace (in place) every BatchEnsembleLinear / BatchEnsembleConv2d child of model by the peer
    style's layer wrapping it (same parameters, same outputs); returns model."""
    if style not in PEER_STYLES:
        raise ValueError(f"style must be one of {tuple(PEER_STYLES)}, got {style!r}")
    cls = PEER_STYLES[style]
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (BatchEnsembleLinear, BatchEnsembleConv2d)) and not isinstance(
                    child, (HyperBatchEnsembleLinear, HyperBatchEnsembleConv2d)):
                setattr(parent, name, cls(child))
                swapped += 1
    if swapped == 0:
        raise ValueError("model has no BatchEnsembleLinear / BatchEnsembleConv2d layer to swap (use variant='batch')")
    return model
