"""Load BatchEnsemble weights trained with other libraries into hyperkern layers.

Each loader copies into an existing BatchEnsembleLinear / BatchEnsembleConv2d of matching shape
and returns it; a missing key or a wrong shape raises an error naming the key and the expected shape.

Sources and their parameterisations (hyperkern: y = ((x * r_k) @ W^T) * s_k + bias_k, W (out, in)):

- TabM (tabm.LinearBatchEnsemble): weight (out, in), r (k, in), s (k, out), bias (k, out): the
  same maths and names. Its rows are BATCH-major, (B, k, D) (row b of member k at x[b, k]);
  hyperkern is member-major (E*B, D). Convert activations with tabm_to_member_major /
  member_major_to_tabm.
- torch-uncertainty (BatchLinear / BatchConv2d): linear.weight / conv.weight (torch layout), r_group
  (M, in), s_group (M, out), bias (M, out). Member-major rows (repeat_interleave), as hyperkern.
- edward2 (DenseBatchEnsemble / Conv2DBatchEnsemble, Keras): kernel (in, out) for dense and
  (kh, kw, in, out) for conv (channels-last inputs), alpha (E, in), gamma (E, out), and the bias
  ensemble_bias (dense) or bias (conv), (E, out). Member-major rows (tf.tile of the fast weights).
  Pass a mapping from Keras weight names (e.g. {w.name: w.numpy() for w in layer.weights}); name
  scopes and ':0' suffixes are ignored. Only rank-1 (rank=1) layers.
"""
from __future__ import annotations

from typing import Mapping

import torch

from hyperkern.nn.layers import BatchEnsembleConv2d, BatchEnsembleLinear

__all__ = ["tabm_to_member_major", "member_major_to_tabm", "load_tabm_", "load_torch_uncertainty_",
           "load_edward2_"]


def tabm_to_member_major(x: torch.Tensor) -> torch.Tensor:
    """TabM's batch-major (B, E, ...) -> hyperkern's member-major (E*B, ...) (row k*B + b is x[b, k])."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, E, ...) (TabM's batch-major layout), got {tuple(x.shape)}")
    B, E = x.shape[:2]
    return x.transpose(0, 1).reshape(E * B, *x.shape[2:])


def member_major_to_tabm(y: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """hyperkern's member-major (E*B, ...) -> TabM's batch-major (B, E, ...)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    E = ensemble_size
    if y.dim() < 1 or y.shape[0] % E:
        raise ValueError(f"y.shape[0] must be divisible by ensemble_size={E}, got shape {tuple(y.shape)}")
    return y.reshape(E, y.shape[0] // E, *y.shape[1:]).transpose(0, 1)


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.as_tensor(value)


def _check_layer(layer, conv_ok: bool = True):
    kinds = (BatchEnsembleLinear, BatchEnsembleConv2d) if conv_ok else (BatchEnsembleLinear,)
    if not isinstance(layer, kinds):
        raise TypeError(f"layer must be one of {[k.__name__ for k in kinds]}, got {type(layer).__name__}")


def _get(sd: Mapping, key: str, expected: tuple, source: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"{source} state dict has no {key!r} (keys: {sorted(sd)})")
    t = _as_tensor(sd[key])
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{source} {key!r} must have shape {tuple(expected)} to match the layer, got {tuple(t.shape)}")
    return t


def _copy_(layer, weight, r, s, bias, source: str, bias_key: str):
    if (bias is None) != (layer.bias is None):
        raise ValueError(f"{source}: the source {'has' if bias is not None else 'has no'} bias ({bias_key!r}) but "
                         f"the layer was built with bias={layer.bias is not None}")
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.r.copy_(r)
        layer.s.copy_(s)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def load_tabm_(layer: BatchEnsembleLinear, state_dict: Mapping, prefix: str = "") -> BatchEnsembleLinear:
    """Copy a TabM LinearBatchEnsemble's weight, r, s, bias into `layer` (a BatchEnsembleLinear).

    TabM computes y[b, k] = ((x[b, k] * r[k]) @ weight.T) * s[k] + bias[k] on (B, k, D) inputs; feed
    the loaded layer tabm_to_member_major(x) and map its output back with member_major_to_tabm.
    """
    _check_layer(layer, conv_ok=False)
    E, o, i = layer.ensemble_size, layer.out_features, layer.in_features
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    bias = _get(sd, "bias", (E, o), "TabM") if sd.get("bias") is not None else None
    return _copy_(layer, _get(sd, "weight", (o, i), "TabM"), _get(sd, "r", (E, i), "TabM"),
                  _get(sd, "s", (E, o), "TabM"), bias, "TabM", "bias")


def load_torch_uncertainty_(layer, state_dict: Mapping, prefix: str = ""):
    """Copy a torch-uncertainty BatchLinear (linear.weight) or BatchConv2d (conv.weight) with r_group,
    s_group and bias into a BatchEnsembleLinear / BatchEnsembleConv2d of the same shape."""
    _check_layer(layer)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    E = layer.ensemble_size
    if isinstance(layer, BatchEnsembleLinear):
        wkey, fin, fout = "linear.weight", layer.in_features, layer.out_features
    else:
        wkey, fin, fout = "conv.weight", layer.in_channels, layer.out_channels
    weight = _get(sd, wkey, tuple(layer.weight.shape), "torch-uncertainty")
    bias = _get(sd, "bias", (E, fout), "torch-uncertainty") if sd.get("bias") is not None else None
    return _copy_(layer, weight, _get(sd, "r_group", (E, fin), "torch-uncertainty"),
                  _get(sd, "s_group", (E, fout), "torch-uncertainty"), bias, "torch-uncertainty", "bias")


def _keras_key(name: str) -> str:
    name = name.split(":")[0]
    return name.rsplit("/", 1)[-1]


def load_edward2_(layer, weights: Mapping):
    """Copy an edward2 DenseBatchEnsemble (kernel (in, out), alpha, gamma, ensemble_bias) or
    Conv2DBatchEnsemble (kernel (kh, kw, in, out), alpha, gamma, bias) into a BatchEnsembleLinear /
    BatchEnsembleConv2d. `weights` maps Keras weight names (scopes and ':0' ignored) to arrays.

    Kernels are transposed to torch's layout: dense (in, out) -> (out, in); conv HWIO -> OIHW.
    A conv layer trained with padding='same' maps to BatchEnsembleConv2d(padding=k // 2) for odd
    kernels at stride 1 (TensorFlow pads 'same' asymmetrically when striding).
    """
    _check_layer(layer)
    sd = {}
    for name, value in weights.items():
        key = _keras_key(name)
        if key in sd:
            raise ValueError(f"edward2 weights hold two entries named {key!r} ({name!r}); pass one layer's weights")
        sd[key] = value
    E = layer.ensemble_size
    if isinstance(layer, BatchEnsembleLinear):
        fin, fout = layer.in_features, layer.out_features
        kernel = _get(sd, "kernel", (fin, fout), "edward2").transpose(0, 1)
        bias_key = "ensemble_bias"
    else:
        if layer.groups != 1:
            raise ValueError("edward2's Conv2DBatchEnsemble has no groups; the layer must have groups=1")
        fin, fout = layer.in_channels, layer.out_channels
        kh, kw = layer.kernel_size
        kernel = _get(sd, "kernel", (kh, kw, fin, fout), "edward2").permute(3, 2, 0, 1)
        bias_key = "bias"
    bias = _get(sd, bias_key, (E, fout), "edward2") if sd.get(bias_key) is not None else None
    return _copy_(layer, kernel, _get(sd, "alpha", (E, fin), "edward2"), _get(sd, "gamma", (E, fout), "edward2"),
                  bias, "edward2", bias_key)
