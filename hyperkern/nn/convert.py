"""Turn ordinary torch layers and models into BatchEnsemble / hyper-batch-ensemble ones.

from_linear / from_conv2d COPY the source's weight (and bias, into every member's bias row); the
source module is left untouched and shares no storage with the result. convert_ replaces every
nn.Linear / nn.Conv2d inside a model by its BatchEnsemble counterpart (or, with num_hparams, its
hyper-batch-ensemble counterpart), in place.

A converted model takes member-major inputs (E*B rows, rows k*B .. (k+1)*B-1 are member k):
feed hyperkern.nn.tile(x, E); hyperkern.nn.ensemble_proba(logits, E) is the ensemble's prediction.
A model converted with num_hparams is called as model(x, hparams=h), h of shape (E*B, num_hparams)
in [0, 1], even when its forward does not know about hparams (nn.Sequential): convert_ hands h to
every hyper-batch layer for the duration of the call (see convert_).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from hyperkern.nn.layers import (BatchEnsembleConv2d, BatchEnsembleLinear, HyperBatchEnsembleConv2d,
                                 HyperBatchEnsembleLinear)

_RANK1 = (BatchEnsembleLinear, BatchEnsembleConv2d)  # the hyper-batch layers are subclasses
_HYPER = (HyperBatchEnsembleLinear, HyperBatchEnsembleConv2d)

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


def convert_(model: nn.Module, *, ensemble_size: int, num_hparams: int | None = None, **kwargs) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d inside model (nested modules included) by a
    BatchEnsembleLinear / BatchEnsembleConv2d holding a copy of its weights (from_linear / from_conv2d),
    or, with num_hparams, by a HyperBatchEnsembleLinear / HyperBatchEnsembleConv2d.

    Args:
        model: the module to convert, in place.
        ensemble_size: E, the number of members.
        num_hparams: None for a batch ensemble; m for a hyper-batch ensemble whose layers are
            conditioned on m hyperparameters per row (normalised to [0, 1], e.g. by
            HyperParameterSpace.normalize). Each hyper layer gets its own embedding of them.
        kwargs: go to the layers' constructors (init, init_std, backend, ...).

    Returns the model (or the converted layer when `model` itself is an nn.Linear or nn.Conv2d,
    which cannot be replaced in place). nn.MultiheadAttention is skipped (its forward reads its
    projections' weights directly), and so are layers that are already rank-1 ensemble layers.
    Other modules are left as they are (BatchNorm stays shared across members, as in the reference).
    The converted model expects member-major inputs (tile(x, E)).

    Hyper-batch layers need the hparams in their forward, which containers such as nn.Sequential do
    not pass. So when num_hparams is given and model's own forward has no `hparams` parameter,
    convert_ lets the model be called as `model(x, hparams=h)`: a forward pre-hook on the model takes
    h (E*B rows, num_hparams columns) out of the call, and a pre-hook on every hyper layer hands it to
    the layers called without one, for that call only. A model whose forward takes hparams itself is
    left to pass them. The hooks are plain picklable objects: the model copies, saves with
    torch.save, and compiles.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kwargs = dict(kwargs, ensemble_size=ensemble_size)
    if num_hparams is not None:
        kwargs["num_hparams"] = num_hparams
    if isinstance(model, nn.Linear):
        return from_linear(model, **kwargs)
    if isinstance(model, nn.Conv2d):
        return from_conv2d(model, **kwargs)
    _convert_children_(model, kwargs)
    if num_hparams is not None and "hparams" not in inspect.signature(model.forward).parameters:
        _HparamsThread.install(model)
    return model


def _convert_children_(module: nn.Module, kwargs: dict):
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.MultiheadAttention, *_RANK1)):
            continue  # MultiheadAttention reads out_proj.weight directly; rank-1 layers are converted already
        if isinstance(child, nn.Linear):
            setattr(module, name, from_linear(child, **kwargs))
        elif isinstance(child, nn.Conv2d):
            setattr(module, name, from_conv2d(child, **kwargs))
        else:
            _convert_children_(child, kwargs)


class _HparamsThread:
    """The hooks that carry model(x, hparams=h)'s h to the hyper layers of a converted model whose
    forward does not pass it (convert_). A module-level class, so the model pickles and deep-copies."""

    def __init__(self):
        self.hparams = None

    @classmethod
    def install(cls, model: nn.Module):
        if any(isinstance(getattr(h, "__self__", None), cls) for h in model._forward_pre_hooks.values()):
            thread = next(h.__self__ for h in model._forward_pre_hooks.values()
                          if isinstance(getattr(h, "__self__", None), cls))
        else:
            thread = cls()
            model.register_forward_pre_hook(thread.enter, with_kwargs=True)
            model.register_forward_hook(thread.leave, always_call=True)
        for m in model.modules():
            if isinstance(m, _HYPER) and not any(getattr(h, "__self__", None) is thread
                                                 for h in m._forward_pre_hooks.values()):
                m.register_forward_pre_hook(thread.supply, with_kwargs=True)

    def enter(self, module, args, kwargs):
        kwargs = dict(kwargs)
        self.hparams = kwargs.pop("hparams", None)
        return args, kwargs

    def leave(self, module, args, output):
        self.hparams = None

    def supply(self, module, args, kwargs):
        if len(args) >= 2 or "hparams" in kwargs:
            return None  # called with its hparams
        if self.hparams is None:
            raise TypeError(f"{type(module).__name__} needs the hyperparameters: call the converted model as "
                            f"model(x, hparams=h) with h of shape (E*B, {module.num_hparams}) in [0, 1], one row "
                            "per input row")
        return (*args, self.hparams), kwargs
