"""Load BatchEnsemble weights trained with other libraries into hyperkern layers.

Each loader copies into an existing BatchEnsembleLinear / BatchEnsembleConv2d of matching shape (and
load_edward2_ also into HyperBatchEnsembleLinear / HyperBatchEnsembleConv2d) and returns it; a missing
key or a wrong shape raises an error naming the key and the expected shape.

Sources and their parameterisations (hyperkern: y = ((x * r_k) @ W^T) * s_k + bias_k, W (out, in)):

- TabM (tabm.LinearBatchEnsemble): weight (out, in), r (k, in), s (k, out), bias (k, out): the
  same maths and names. Its rows are BATCH-major, (B, k, D) (row b of member k at x[b, k]);
  hyperkern is member-major (E*B, D). Convert activations with tabm_to_member_major /
  member_major_to_tabm.
- torch-uncertainty (BatchLinear / BatchConv2d): linear.weight / conv.weight (torch layout), r_group
  (M, in), s_group (M, out), bias (M, out). Member-major rows (repeat_interleave), as hyperkern.
- edward2 (DenseBatchEnsemble / Conv2DBatchEnsemble / DenseHyperBatchEnsemble /
  Conv2DHyperBatchEnsemble, Keras; channels-last conv): one layer's weights IN ORDER (a list as
  keras_layer.get_weights() or keras_layer.weights gives it) or by distinct paths (checkpoint keys),
  plus, for the hyper layers, the weights of the e-model that computes their e(lambdas). Member-major
  rows (tf.tile of the fast weights), as hyperkern. See load_edward2_ for the mapping and its checks.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
import torch

from hyperkern.nn.layers import BatchEnsembleConv2d, BatchEnsembleLinear, _HyperMixin

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


def _check_layer(layer, conv_ok: bool = True, hyper_ok: bool = True, source: str = "this source"):
    kinds = (BatchEnsembleLinear, BatchEnsembleConv2d) if conv_ok else (BatchEnsembleLinear,)
    if not isinstance(layer, kinds):
        raise TypeError(f"layer must be one of {[k.__name__ for k in kinds]}, got {type(layer).__name__}")
    if not hyper_ok and isinstance(layer, _HyperMixin):
        raise TypeError(f"layer is a {type(layer).__name__}: {source} has no hyper-batch layers, and loading "
                        "only the batch part would leave delta, the second fast weights and the embedding at "
                        "their init; load into a BatchEnsembleLinear / BatchEnsembleConv2d")


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
    _check_layer(layer, conv_ok=False, hyper_ok=False, source="TabM")
    E, o, i = layer.ensemble_size, layer.out_features, layer.in_features
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    bias = _get(sd, "bias", (E, o), "TabM") if sd.get("bias") is not None else None
    return _copy_(layer, _get(sd, "weight", (o, i), "TabM"), _get(sd, "r", (E, i), "TabM"),
                  _get(sd, "s", (E, o), "TabM"), bias, "TabM", "bias")


def load_torch_uncertainty_(layer, state_dict: Mapping, prefix: str = ""):
    """Copy a torch-uncertainty BatchLinear (linear.weight) or BatchConv2d (conv.weight) with r_group,
    s_group and bias into a BatchEnsembleLinear / BatchEnsembleConv2d of the same shape."""
    _check_layer(layer, hyper_ok=False, source="torch-uncertainty")
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


# --------------------------------------------------------------------------------------------------
# edward2
# --------------------------------------------------------------------------------------------------
class _Slot(NamedTuple):
    name: str  # edward2's Keras weight name (the last part of its path, without ':0')
    attr: str  # the hyperkern attribute it fills
    shape: tuple  # its shape in edward2's (Keras) layout

    def label(self) -> str:
        what = {"weight": "kernel", "delta": "delta kernel", "bias": "bias", "delta_bias": "delta bias"}.get(self.attr)
        return f"{self.name!r}" + (f" ({what})" if what and what != self.name else "")


def _e2_class(conv: bool, hyper: bool) -> str:
    return ("Conv2D" if conv else "Dense") + ("HyperBatchEnsemble" if hyper else "BatchEnsemble")


def _e2_config(conv: bool, hyper: bool, bias: bool, tied) -> str:
    s = f"{_e2_class(conv, hyper)}(use_bias={bias}"
    if hyper:
        s += f", fast_weights_eq_contraint={tied}"
    return s + ")"


def _e2_layout(layer, hyper: bool, bias: bool, tied) -> list:
    """edward2's weights in layer.weights / get_weights() order, for layer's sizes and the given variant."""
    conv = isinstance(layer, BatchEnsembleConv2d)
    E = layer.ensemble_size
    if conv:
        fin, fout = layer.in_channels, layer.out_channels
        kernel = (*layer.kernel_size, fin, fout)
    else:
        fin, fout = layer.in_features, layer.out_features
        kernel = (fin, fout)
    r, s, b = (E, fin), (E, fout), (E, fout)
    if not hyper:  # Keras Dense / Conv2D build (kernel), then alpha, gamma, ensemble_bias
        slots = [_Slot("kernel", "weight", kernel), _Slot("alpha", "r", r), _Slot("gamma", "s", s)]
        return slots + ([_Slot("ensemble_bias", "bias", b)] if bias else [])
    # the hyper layer's own weights first (alpha, gamma, [alpha_1, gamma_1], [bias]), then its two
    # sub-layers': conv2d / dense (kernel, [ensemble_bias]) and delta_conv2d / delta_dense (kernel)
    slots = [_Slot("alpha", "r", r), _Slot("gamma", "s", s)]
    if not tied:
        slots += [_Slot("alpha_1", "u", r), _Slot("gamma_1", "v", s)]
    if bias:
        slots.append(_Slot("bias", "delta_bias", b))
    slots.append(_Slot("kernel", "weight", kernel))
    if bias:
        slots.append(_Slot("ensemble_bias", "bias", b))
    return slots + [_Slot("kernel", "delta", kernel)]


def _e2_variants():
    for hyper in (False, True):
        for bias in (True, False):
            for tied in ((True, False) if hyper else (None,)):
                yield hyper, bias, tied


def _short_name(path: str) -> str:
    path = path.split(":")[0]
    if path.endswith("/.ATTRIBUTES/VARIABLE_VALUE"):
        path = path[: -len("/.ATTRIBUTES/VARIABLE_VALUE")]
    return path


def _keras_name(value):
    """The weight's path if value is a Keras / TensorFlow variable (.path in Keras 3, .name in TF), else None."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return None
    for attr in ("path", "name"):
        name = getattr(value, attr, None)
        if isinstance(name, str) and name:
            return name
    return None


def _to_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if not isinstance(value, np.ndarray) and hasattr(value, "numpy"):  # tf.Variable, tf.Tensor, Keras variable
        value = value.numpy()
    return torch.as_tensor(np.asarray(value))


def _fits(items, layout) -> bool:
    return len(items) == len(layout) and all(
        tuple(t.shape) == slot.shape and (name is None or _short_name(name).rsplit("/", 1)[-1] == slot.name)
        for (name, t), slot in zip(items, layout))


def _layout_str(layout) -> str:
    return "[" + ", ".join(f"{slot.label()} {slot.shape}" for slot in layout) + "]"


def _variant_mismatch(layer, conv, want, got) -> str:
    """Why a source of variant `got` cannot load into a layer of variant `want` ((hyper, bias, tied) each)."""
    (h0, b0, t0), (h1, b1, t1) = want, got
    src = f"the edward2 weights are a {_e2_config(conv, h1, b1, t1)}'s"
    if h0 != h1:
        return (f"{src}, but the layer is a {type(layer).__name__}: load them into a "
                f"{('HyperBatchEnsemble' if h1 else 'BatchEnsemble') + ('Conv2d' if conv else 'Linear')}")
    if b0 != b1:
        what = "ensemble_bias and bias (the delta bias)" if h1 else "ensemble_bias"
        return (f"{src}: the source {'has' if b1 else 'has no'} bias ({what}) but the layer was built with "
                f"bias={b0}")
    return (f"{src}: the source {'ties' if t1 else 'unties'} its fast weights (fast_weights_eq_contraint={t1}"
            f"{'' if t1 else ': alpha_1, gamma_1'}) but the layer was built with tie_fast_weights={t0}")


def _e2_from_sequence(layer, seq, conv, want) -> dict:
    items = [(_keras_name(v), _to_tensor(v)) for v in seq]
    layout = _e2_layout(layer, *want)
    others = [v for v in _e2_variants() if v != want and _fits(items, _e2_layout(layer, *v))]
    if _fits(items, layout):
        if others:  # unnamed arrays whose shapes fit two variants (dense layers with in == out == E)
            raise ValueError(f"edward2 weights: the {len(items)} unnamed arrays fit both a "
                             f"{_e2_config(conv, *want)} and a {_e2_config(conv, *others[0])} of these sizes; "
                             "pass layer.weights (named variables) or a mapping from checkpoint paths instead")
        return {slot.attr: (f"tensor {i} {slot.label()}", t) for i, (slot, (_, t)) in enumerate(zip(layout, items))}
    if others:
        raise ValueError(_variant_mismatch(layer, conv, want, others[0]))
    head = (f"edward2 weights for a {type(layer).__name__} must be a {_e2_config(conv, *want)}'s "
            f"{len(layout)} tensors in layer.weights / get_weights() order, {_layout_str(layout)}")
    if len(items) != len(layout):
        shapes = [tuple(t.shape) for _, t in items]
        raise ValueError(f"{head}; got {len(items)} with shapes {shapes}")
    for i, ((name, t), slot) in enumerate(zip(items, layout)):
        short = None if name is None else _short_name(name).rsplit("/", 1)[-1]
        if short is not None and short != slot.name:
            raise ValueError(f"{head}; tensor {i} is {name!r}, where {slot.label()} belongs")
        if tuple(t.shape) != slot.shape:
            raise ValueError(f"{head}; tensor {i} {slot.label()} has shape {tuple(t.shape)}, expected {slot.shape}")
    raise AssertionError("unreachable")  # pragma: no cover


_E2_BATCH_ATTRS = {"kernel": "weight", "alpha": "r", "gamma": "s", "ensemble_bias": "bias"}


def _e2_attr(short: str, parent: str, hyper: bool):
    """The hyperkern attribute a path's weight fills, judged as a hyper layer (hyper=True) or a batch one."""
    delta = parent.startswith("delta_")
    if hyper:
        table = {"kernel": "delta" if delta else "weight", "alpha": "u" if delta else "r",
                 "gamma": "v" if delta else "s", "alpha_1": "u", "gamma_1": "v", "ensemble_bias": "bias",
                 "bias": "delta_bias"}
        return table.get(short)
    return None if delta else _E2_BATCH_ATTRS.get(short)


def _e2_from_mapping(layer, mapping, conv, want) -> dict:
    hyper, bias, tied = want
    found = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise TypeError(f"edward2 weight paths must be str, got {type(key).__name__}")
        parts = _short_name(key).split("/")
        short, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
        attr = _e2_attr(short, parent, hyper)
        if attr is None:
            if not hyper and _e2_attr(short, parent, True) is not None:
                raise ValueError(f"edward2 weight {key!r} belongs to a {_e2_class(conv, True)} (alpha_1, gamma_1, "
                                 f"bias and delta_* are its weights), but the layer is a {type(layer).__name__}: "
                                 f"load a {_e2_class(conv, False)}'s kernel, alpha, gamma[, ensemble_bias]")
            raise ValueError(f"edward2 weight {key!r} is no weight of a {_e2_class(conv, hyper)}; expected the "
                             f"weights {_layout_str(_e2_layout(layer, *want))} (one layer's, by path)")
        if attr in found:
            raise ValueError(f"edward2 weights {found[attr][0]!r} and {key!r} both name the {attr!r} of a "
                             f"{_e2_class(conv, hyper)}: the paths must tell its tensors apart (edward2 names the "
                             "main and the delta kernel alike, e.g. 'c/c/kernel:0'; checkpoint paths say "
                             "'.../conv2d/kernel' and '.../delta_conv2d/kernel'); or pass layer.weights in order")
        found[attr] = (key, _to_tensor(value))
    layout = _e2_layout(layer, *want)
    need = {slot.attr for slot in layout}
    missing, extra = need - set(found), set(found) - need
    bias_attrs = {"bias", "delta_bias"} if hyper else {"bias"}
    if (missing == bias_attrs and not extra) or (extra == bias_attrs and not missing):
        raise ValueError(_variant_mismatch(layer, conv, want, (hyper, not bias, tied)))
    if hyper and ((missing == {"u", "v"} and not extra) or (extra == {"u", "v"} and not missing)):
        raise ValueError(_variant_mismatch(layer, conv, want, (hyper, bias, not tied)))
    if missing:
        slots = [slot for slot in layout if slot.attr in missing]
        hint = ""
        if "delta" in missing or "weight" in missing:
            hint = ("; edward2 names the main and the delta kernel alike ('c/c/kernel:0'), so a {name: array} "
                    "mapping keeps one of them: pass layer.weights in order, or checkpoint paths "
                    "('.../conv2d/kernel', '.../delta_conv2d/kernel')")
            if hyper and set(found) <= {"weight", "r", "s", "bias"}:
                target = "BatchEnsembleConv2d" if conv else "BatchEnsembleLinear"
                hint = (f"; these look like a {_e2_class(conv, False)}'s weights (kernel, alpha, gamma"
                        f"[, ensemble_bias]), which load into a {target}, not a {type(layer).__name__}; "
                        f"if they are a hyper layer's,{hint[1:]}")
        raise ValueError(f"edward2 weights for a {_e2_config(conv, *want)} have no "
                         f"{', '.join(s.label() for s in slots)}{hint}; got {sorted(k for k, _ in found.values())}")
    if extra:
        raise ValueError(f"edward2 weights {sorted(found[a][0] for a in extra)} have no place in a "
                         f"{_e2_config(conv, *want)}, whose weights are {_layout_str(layout)}")
    for slot in layout:
        key, t = found[slot.attr]
        if tuple(t.shape) != slot.shape:
            raise ValueError(f"edward2 {slot.label()} {key!r} must have shape {slot.shape} to match the layer, "
                             f"got {tuple(t.shape)}")
    return {attr: (repr(key), t) for attr, (key, t) in found.items()}


def _e2_embedding(layer, embedding) -> torch.Tensor:
    """The e-model's kernel (num_hparams, e_dim), checked, as hyperkern's embedding.weight (e_dim, num_hparams)."""
    m, out = layer.num_hparams, layer._out_size
    width = 2 * out if layer.bias is not None else out
    want = f"one kernel of shape ({m}, {width}) (Dense({width}, use_bias=False) on the {m} log-scaled lambdas)"
    if embedding is None:
        raise ValueError(f"edward2's {_e2_class(isinstance(layer, BatchEnsembleConv2d), True)} takes "
                         "e(lambdas) from a separate e-model; pass its weights as embedding= (e_model.get_weights(): "
                         f"{want}), or the layer's embedding stays at its init")
    if isinstance(embedding, Mapping):
        items = [(k, v) for k, v in embedding.items()]
    elif isinstance(embedding, (list, tuple)):
        items = [(_keras_name(v), v) for v in embedding]
    else:
        items = [(_keras_name(embedding), embedding)]
    tensors = [(name, _to_tensor(v)) for name, v in items]
    if len(tensors) != 1:
        shapes = [tuple(t.shape) for _, t in tensors]
        why = ("a bias (use_bias=True)" if len(tensors) == 2 and tensors[1][1].dim() == 1
               else "hidden layers (e_body_arch / e_shared_arch)")
        raise ValueError(f"the e-model must be {want}: hyperkern's per-layer embedding is one linear map without "
                         f"bias; got {len(tensors)} tensors {shapes}, i.e. {why}" if tensors else
                         f"the e-model must be {want}; got no tensors")
    name, k = tensors[0]
    if tuple(k.shape) != (m, width):
        note = ""
        if k.dim() == 2 and k.shape[0] == m and layer.bias is None and k.shape[1] == 2 * out:
            note = " (a bias-free layer uses e1 only: build the e-model with units, not 2 * units)"
        elif k.dim() == 2 and k.shape[0] == m and layer.bias is not None and k.shape[1] == out:
            note = " (a layer with a bias needs e1 and e2: 2 * units)"
        raise ValueError(f"the e-model must be {want}; got {'' if name is None else repr(name) + ' of '}shape "
                         f"{tuple(k.shape)}{note}")
    return k.transpose(0, 1)


def load_edward2_(layer, weights, *, embedding=None):
    """Copy one edward2 layer's weights into a hyperkern layer of the same sizes; returns the layer.

    Sources (edward2 0.0.2 on tf-keras 2; golden fixtures from the real layers in
    tests/fixtures/edward2), their weights in keras_layer.weights / get_weights() order, and targets:

    - DenseBatchEnsemble(rank=1) -> BatchEnsembleLinear:
      kernel (in, out), alpha (E, in), gamma (E, out)[, ensemble_bias (E, out)]
    - Conv2DBatchEnsemble(rank=1) -> BatchEnsembleConv2d (groups=1):
      kernel (kh, kw, in, out), alpha (E, in), gamma (E, out)[, ensemble_bias (E, out)]
    - DenseHyperBatchEnsemble -> HyperBatchEnsembleLinear, Conv2DHyperBatchEnsemble ->
      HyperBatchEnsembleConv2d (groups=1): alpha, gamma[, alpha_1, gamma_1][, bias], kernel
      [, ensemble_bias], kernel (the layer's own weights, then its sub-layer dense / conv2d's, then
      delta_dense / delta_conv2d's kernel, the delta kernel)

    Mapping onto hyperkern: kernel -> weight (dense (in, out) transposed; conv HWIO -> OIHW), alpha -> r,
    gamma -> s, ensemble_bias -> bias; in the hyper layers also the delta kernel -> delta, alpha_1 -> u,
    gamma_1 -> v (untied: fast_weights_eq_contraint=False; tied sources have no alpha_1 / gamma_1 and load
    into tie_fast_weights=True layers) and bias -> delta_bias.

    Args:
        layer: a BatchEnsembleLinear / BatchEnsembleConv2d / HyperBatchEnsembleLinear /
            HyperBatchEnsembleConv2d with the source's sizes, bias presence and (hyper) tying.
        weights: ONE edward2 layer's weights, either
            - in order: a list as keras_layer.get_weights() returns it (numpy arrays), or
              keras_layer.weights (variables, whose names are then checked too), or torch tensors; or
            - by full distinct paths: a mapping {path: array} whose paths tell every tensor apart, e.g.
              the keys of tf.train.Checkpoint(layer=keras_layer) ('layer/conv2d/kernel/.ATTRIBUTES/
              VARIABLE_VALUE', 'layer/delta_conv2d/kernel/...', 'layer/alpha_1/...'): the last part names
              the weight and a parent part starting with 'delta_' marks the delta sub-layer. Variable
              names (w.name) are NOT distinct in the hyper layers (both kernels are e.g. 'c/c/kernel:0').
        embedding: hyper layers only, required: the layer's e-model, whose output e(lambdas) edward2's
            hyper layers take as their third input ([x, lambdas, e]); the reference's e_factory
            default (no hidden layers, use_bias=False) is one Dense(e_dim, use_bias=False) on the
            log-scaled lambdas, e_dim = units (layer without bias) or 2 * units (e1 | e2). Pass
            e_model.get_weights() (or .weights, or the kernel itself), a (num_hparams, e_dim) kernel;
            it becomes embedding.weight = kernel.T (hyperkern's e1 | e2 split is edward2's).

    Every mismatch raises a ValueError naming the tensor and what was expected: missing or extra tensors,
    a bias in the source and not in the layer or the reverse, tied vs untied fast weights, a batch
    source for a hyper layer or the reverse, shapes (so dense vs conv and sizes), an e-model with a bias
    or hidden layers or the wrong width, a missing embedding; groups != 1 (edward2 has no groups).

    Using the loaded layer:
        - rows are member-major in both libraries (edward2 tiles its fast weights with tf.tile); conv
          inputs are NHWC in Keras: feed x.permute(0, 3, 1, 2).contiguous() and permute the output
          back (on CPU a channels-last view sends 1x1 stride-2 convs with few input channels into
          oneDNN's 1x1 backward-weights kernel, which gives wrong weight gradients and corrupts the heap
          on AVX2 machines with torch 2.13: uxlfoundation/oneDNN#6035).
        - padding: edward2's padding='same' is TensorFlow's rule (asymmetric at stride 2 on even
          sizes): build the conv layer with padding="same"; 'valid' is padding=0 (or "valid").
          The weights carry no padding, stride or dilation: give the layer the source's.
        - hparams: hyperkern's hparams are the e-model's input, the lambdas log-scaled into [0, 1]
          (the reference's LogScaler): HyperParameterSpace with the same ranges and column order as
          the source's lambdas, then space.normalize(lambdas).
        - L2 penalty: layer.l2_penalty(lambdas[:, i_kernel], hparams, lambdas[:, i_bias]) with i_* the
          source's lambda_key_to_index[name + '_l2_kernel' / '_l2_bias'] equals the term edward2's hyper
          layer adds with add_loss when built with regularize_fast_weights=False (the reference's
          setting; edward2's constructor default True also penalises the fast weights, which
          hyperkern does not).
        - edward2's rank > 1 fast weights (DenseBatchEnsemble(rank=2)) have no hyperkern counterpart.
    """
    _check_layer(layer)
    conv = isinstance(layer, BatchEnsembleConv2d)
    hyper = isinstance(layer, _HyperMixin)
    if conv and layer.groups != 1:
        raise ValueError("edward2's conv layers have no groups; the layer must have groups=1, "
                         f"got groups={layer.groups}")
    if not hyper and embedding is not None:
        raise ValueError(f"embedding= is for the hyper layers; a {type(layer).__name__} has no embedding")
    want = (hyper, layer.bias is not None, layer.tie_fast_weights if hyper else None)
    if isinstance(weights, Mapping):
        found = _e2_from_mapping(layer, weights, conv, want)
    elif isinstance(weights, (list, tuple)):
        found = _e2_from_sequence(layer, weights, conv, want)
    else:
        raise TypeError("weights must be one edward2 layer's weights: a list in layer.weights / get_weights() "
                        f"order, or a mapping from distinct paths; got {type(weights).__name__}")
    emb = _e2_embedding(layer, embedding) if hyper else None
    with torch.no_grad():
        for attr, (_, t) in found.items():
            if attr in ("weight", "delta"):
                t = t.permute(3, 2, 0, 1) if conv else t.transpose(0, 1)
            getattr(layer, attr).copy_(t)
        if emb is not None:
            layer.embedding.weight.copy_(emb)
    return layer
