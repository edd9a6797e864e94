"""Turn ordinary torch layers and models into BatchEnsemble / hyper-batch-ensemble ones.

from_linear / from_conv2d COPY the source's weight (and bias, into every member's bias row); the
source module is left untouched and shares no storage with the result. convert_ replaces every
nn.Linear / nn.Conv2d inside a model by its BatchEnsemble counterpart, in place.

A converted model takes member-major inputs (E*B rows, rows k*B .. (k+1)*B-1 are member k):
feed hyperkern.nn.tile(x, E).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hyperkern.nn.layers import (BatchEnsembleConv2d, BatchEnsembleLinear, HyperBatchEnsembleConv2d,
                                 HyperBatchEnsembleLinear)

__all__ = ["from_linear", "from_conv2d", "convert_"]


def _copy_common_(dst, src: nn.Module):
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if dst.bias is not None:
            dst.bias.copy_(src.bias.detach().expand_as(dst.bias))


def from_linear(linear: nn.Linear, *, ensemble_size: int, num_hparams: int | None = None, **kwargs):
    """A BatchEnsembleLinear (or, with num_hparams, a HyperBatchEnsembleLinear) holding a copy of
    linear's weight and, in every member's row, a copy of its bias.

    kwargs go to the layer's constructor (init, init_std, backend, tie_fast_weights, ...); device and
    dtype default to the source's. Pass init="ones" to make every member start equal to `linear`.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    kwargs.setdefault("device", linear.weight.device)
    kwargs.setdefault("dtype", linear.weight.dtype)
    bias = linear.bias is not None
    if num_hparams is None:
        layer = BatchEnsembleLinear(linear.in_features, linear.out_features, bias, ensemble_size=ensemble_size,
                                    **kwargs)
    else:
        layer = HyperBatchEnsembleLinear(linear.in_features, linear.out_features, bias, ensemble_size=ensemble_size,
                                         num_hparams=num_hparams, **kwargs)
    _copy_common_(layer, linear)
    return layer


def _conv_padding(conv: nn.Conv2d):
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; only zero padding is supported")
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        # 'same' (stride 1): torch pads total d*(k-1), the extra element on the right/bottom when odd.
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError(f"conv uses padding='same' with an even effective kernel {tuple(conv.kernel_size)}, "
                             "which needs asymmetric padding; only symmetric zero padding is supported")
        return tuple(t // 2 for t in totals)
    return tuple(conv.padding)


def from_conv2d(conv: nn.Conv2d, *, ensemble_size: int, num_hparams: int | None = None, **kwargs):
    """A BatchEnsembleConv2d (or, with num_hparams, a HyperBatchEnsembleConv2d) holding a copy of
    conv's weight and, in every member's row, a copy of its bias; same kernel, stride, padding,
    dilation and groups. kwargs go to the constructor; device and dtype default to the source's.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    kwargs.setdefault("device", conv.weight.device)
    kwargs.setdefault("dtype", conv.weight.dtype)
    args = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _conv_padding(conv), conv.dilation,
            conv.groups, conv.bias is not None)
    if num_hparams is None:
        layer = BatchEnsembleConv2d(*args, ensemble_size=ensemble_size, **kwargs)
    else:
        layer = HyperBatchEnsembleConv2d(*args, ensemble_size=ensemble_size, num_hparams=num_hparams, **kwargs)
    _copy_common_(layer, conv)
    return layer


def convert_(model: nn.Module, *, ensemble_size: int, **kwargs) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d inside model (nested modules included) by a
    BatchEnsembleLinear / BatchEnsembleConv2d holding a copy of its weights (from_linear / from_conv2d).

    In place; returns the model (or the converted layer when `model` itself is an nn.Linear or
    nn.Conv2d, which cannot be replaced in place). nn.MultiheadAttention is skipped (its forward
    reads its projections' weights directly). Other modules are left as they are (BatchNorm
    stays shared across members, as in the reference). kwargs go to the layers' constructors.
    The converted model expects member-major inputs (tile(x, E)).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        return from_linear(model, ensemble_size=ensemble_size, **kwargs)
    if isinstance(model, nn.Conv2d):
        return from_conv2d(model, ensemble_size=ensemble_size, **kwargs)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            continue  # reads out_proj.weight directly in its functional forward; left unconverted
        if isinstance(child, nn.Linear):
            setattr(model, name, from_linear(child, ensemble_size=ensemble_size, **kwargs))
        elif isinstance(child, nn.Conv2d):
            setattr(model, name, from_conv2d(child, ensemble_size=ensemble_size, **kwargs))
        else:
            convert_(child, ensemble_size=ensemble_size, **kwargs)
    return model
