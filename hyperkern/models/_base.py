"""What every zoo model shares: variant-aware layer construction, input checks, fast/slow parameter
split, L2 groups and penalties.

Variants:
  "plain"        nn.Conv2d / nn.Linear; forward(x), x (N, C, H, W) -> logits (N, classes).
  "batch"        BatchEnsemble layers; forward(x), x (E*B, C, H, W) member-major -> (E*B, classes).
  "hyper_batch"  hyper-batch-ensemble layers; forward(x, hparams) with hparams (E*B, m) in [0, 1]
                 (model.hparam_space.normalize(lam)) -> (E*B, classes), member-major.

Member-major: rows k*B .. (k+1)*B-1 belong to member k (hyperkern.nn.tile(x, E) builds them).

L2 hyperparameters: one per layer group (model.hparam_names); `l2_penalty(lam)` takes them in their
ORIGINAL scale:
  hyper_batch:  lam (E*B, m), the same rows' values whose normalisation was fed to forward; the
                penalty is the sum over hyper layers of the mean over rows of
                lam_i ||W + Delta e1_i||^2 (+ bias analogue), fast weights and embeddings excluded.
  plain, batch: lam (m,) or {name: value}; sum over groups of lam_g * ||theta_g||^2, with
                per-member biases (E, out) counted as the mean over members of ||b_k||^2.
Trainers add model.l2_penalty(lam) / n_train to the loss (docs/method.md section 3).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from hyperkern.nn.hparams import HyperParameter, HyperParameterSpace
from hyperkern.nn.layers import (BatchEnsembleConv2d, BatchEnsembleLinear, HyperBatchEnsembleConv2d,
                                 HyperBatchEnsembleLinear, _he_normal_, check_hparams, penalty_stats)
from hyperkern.nn.functional import relu_rowwise_dropout, rowwise_dropout
from hyperkern.nn.norm import EnsembleBatchNorm2d
from hyperkern.ops.penalty import hyper_l2_penalty, penalty_backend

VARIANTS = ("plain", "batch", "hyper_batch")
BN_MODES = ("shared", "per_member")
_RANK1 = (BatchEnsembleLinear, BatchEnsembleConv2d)


def call_layer(layer: nn.Module, x: torch.Tensor, hparams: torch.Tensor | None) -> torch.Tensor:
    """Apply a conv/linear layer of any variant; hyper layers get the (already checked) hparams."""
    if hparams is None:
        return layer(x)
    return layer(x, hparams, check_range=False)


class LayerBuilder:
    """Creates the conv / linear / batch-norm layers of one variant with shared settings."""

    def __init__(self, variant: str, ensemble_size: int, num_hparams: int, *, bn: str = "shared",
                 backend: str = "auto", fast_init: str = "normal", fast_init_std: float | None = None,
                 tie_fast_weights: bool = True, embedding_std: float = 1e-4, device=None, dtype=None):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        if not isinstance(ensemble_size, int) or isinstance(ensemble_size, bool) or ensemble_size < 1:
            raise ValueError(f"ensemble_size must be a positive int, got {ensemble_size!r}")
        self.variant, self.ensemble_size, self.num_hparams, self.bn_mode = variant, ensemble_size, num_hparams, bn
        self.factory = {"device": device, "dtype": dtype}
        if fast_init_std is None:
            fast_init_std = 0.75 if variant == "hyper_batch" else 0.5  # the references' defaults
        self.rank1 = {"ensemble_size": ensemble_size, "init": fast_init, "init_std": fast_init_std,
                      "backend": backend, **self.factory}
        self.hyper = {"num_hparams": num_hparams, "tie_fast_weights": tie_fast_weights,
                      "embedding_std": embedding_std}

    def conv(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = False):
        if self.variant == "plain":
            conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=bias, **self.factory)
            _he_normal_(conv.weight)  # the same init as the ensemble variants (Keras he_normal)
            if bias:
                nn.init.zeros_(conv.bias)
            return conv
        if self.variant == "batch":
            return BatchEnsembleConv2d(cin, cout, kernel_size, stride, padding, bias=bias, **self.rank1)
        return HyperBatchEnsembleConv2d(cin, cout, kernel_size, stride, padding, bias=bias, **self.rank1, **self.hyper)

    def linear(self, fin: int, fout: int, bias: bool = True):
        if self.variant == "plain":
            lin = nn.Linear(fin, fout, bias=bias, **self.factory)
            if bias:
                nn.init.zeros_(lin.bias)  # as the ensemble layers' biases
            return lin
        if self.variant == "batch":
            return BatchEnsembleLinear(fin, fout, bias, **self.rank1)
        return HyperBatchEnsembleLinear(fin, fout, bias, **self.rank1, **self.hyper)

    def batch_norm(self, channels: int):
        if self.variant != "plain" and self.bn_mode == "per_member":
            return EnsembleBatchNorm2d(channels, ensemble_size=self.ensemble_size, **self.factory)
        return nn.BatchNorm2d(channels, **self.factory)


class EnsembleModel(nn.Module):
    """Base class of the zoo models (see the module docstring for the variants and the L2 interface)."""

    variant: str
    ensemble_size: int
    in_channels: int
    num_classes: int
    hparam_space: HyperParameterSpace

    def _setup(self, variant: str, ensemble_size: int, hparam_space: HyperParameterSpace, num_classes: int,
               in_channels: int):
        self.variant = variant
        self.ensemble_size = 1 if variant == "plain" else ensemble_size
        self.hparam_space = hparam_space
        self.num_classes = num_classes
        self.in_channels = in_channels
        self._l2_layers: list[tuple[nn.Module, str, str]] = []

    @staticmethod
    def _builder(variant, ensemble_size, num_hparams, **kwargs) -> LayerBuilder:
        return LayerBuilder(variant, ensemble_size, num_hparams, **kwargs)

    def _drop(self, h: torch.Tensor, hparams: torch.Tensor | None) -> torch.Tensor:
        """Dropout for models with a "dropout" hyperparameter (self._dropout_column; self.dropout is the
        fixed rate of the plain and batch variants): hyper_batch rows each use their own rate."""
        if hparams is not None:
            return rowwise_dropout(h, self._row_dropout_rates(hparams), self.training)
        return F.dropout(h, self.dropout, self.training) if self.dropout > 0 else h

    def _row_dropout_rates(self, hparams: torch.Tensor) -> torch.Tensor:
        """Each hyper_batch row's dropout rate: its 'dropout' column, denormalised."""
        return self.hparam_space.denormalize_column(hparams[:, self._dropout_column], "dropout")

    def _relu_drop(self, h: torch.Tensor, hparams: torch.Tensor | None) -> torch.Tensor:
        """self._drop(F.relu(h), hparams), with hyper_batch rows' ReLU and dropout in one autograd node
        that keeps only its output for the backward (relu_rowwise_dropout)."""
        if hparams is not None:
            return relu_rowwise_dropout(h, self._row_dropout_rates(hparams), self.training)
        return self._drop(F.relu(h), None)

    def _register_l2(self, layer: nn.Module, kernel_group: str, bias_group: str | None = None):
        """layer's kernel (and delta) is penalised with hyperparameter kernel_group, its bias (and
        delta_bias) with bias_group (default: the same)."""
        for g in (kernel_group, bias_group or kernel_group):
            self.hparam_space.index(g)
        self._l2_layers.append((layer, kernel_group, bias_group or kernel_group))

    # ---- description ----
    @property
    def is_hyper(self) -> bool:
        return self.variant == "hyper_batch"

    @property
    def hparam_names(self) -> tuple[str, ...]:
        """Column names of hparams / lam (L2 strengths per layer group, then dropout where the model has it)."""
        return self.hparam_space.names

    @property
    def num_hparams(self) -> int:
        """m: the width of hparams (hyper_batch forward) and of lam (l2_penalty)."""
        return self.hparam_space.num_hparams

    @property
    def l2_group_names(self) -> tuple[str, ...]:
        seen = []
        for _, kg, bg in self._l2_layers:
            for g in (kg, bg):
                if g not in seen:
                    seen.append(g)
        return tuple(seen)

    # ---- fast / slow parameters ----
    def named_fast_parameters(self):
        """(name, parameter) of every fast weight (r, s; u, v when untied), each once."""
        seen = set()
        for mname, m in self.named_modules():
            if isinstance(m, _RANK1):
                for pname, p in m.named_fast_parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield (f"{mname}.{pname}" if mname else pname), p

    def fast_parameters(self):
        """Fast weights: no weight decay; the reference scales their gradients by 0.5."""
        for _, p in self.named_fast_parameters():
            yield p

    def slow_parameters(self):
        """Every other parameter (shared weights, deltas, biases, embeddings, batch norm), each once."""
        fast = {id(p) for p in self.fast_parameters()}
        for p in self.parameters():
            if id(p) not in fast:
                yield p

    def l2_groups(self) -> dict[str, list[nn.Parameter]]:
        """{hyperparameter name: the slow parameters its L2 strength applies to} (kernels and deltas,
        biases and delta biases; never fast weights, embeddings or batch norm)."""
        groups: dict[str, list[nn.Parameter]] = {g: [] for g in self.l2_group_names}
        for layer, kg, bg in self._l2_layers:
            groups[kg].append(layer.weight)
            if getattr(layer, "delta", None) is not None:
                groups[kg].append(layer.delta)
            if layer.bias is not None:
                groups[bg].append(layer.bias)
                if getattr(layer, "delta_bias", None) is not None:
                    groups[bg].append(layer.delta_bias)
        return groups

    # ---- input checks ----
    def _check_inputs(self, x, hparams, flat_ok: bool = False):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        N = x.shape[0] if x.dim() > 0 else 0
        if self.variant != "plain" and N % self.ensemble_size:
            raise ValueError(f"x.shape[0] = {N} must be divisible by ensemble_size = {self.ensemble_size} "
                             "(member-major rows: E blocks of B rows; use hyperkern.nn.tile(x, E))")
        if self.is_hyper:
            if hparams is None:
                raise TypeError(f"variant='hyper_batch' needs forward(x, hparams) with hparams of shape "
                                f"(E*B, {self.num_hparams}) in [0, 1], columns {list(self.hparam_names)}")
            check_hparams(hparams, N, self.num_hparams, check_range=True)
        elif hparams is not None:
            raise TypeError(f"hparams is only accepted by variant='hyper_batch'; this model is variant={self.variant!r}")

    def _check_image(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (E*B, in_channels={self.in_channels}, H, W), got {tuple(x.shape)}")

    # ---- L2 penalties ----
    def _lam_vector(self, lam) -> dict[str, torch.Tensor | float]:
        names = self.hparam_names
        if isinstance(lam, Mapping):
            missing = [g for g in self.l2_group_names if g not in lam]
            unknown = [k for k in lam if k not in names]
            if missing or unknown:
                raise ValueError(f"lam must give every L2 group {list(self.l2_group_names)}; missing {missing}, "
                                 f"unknown {unknown}")
            return dict(lam)
        if not isinstance(lam, torch.Tensor):
            lam = torch.as_tensor(lam, dtype=torch.float64)
        if lam.dim() != 1 or lam.shape[0] != len(names):
            raise ValueError(f"lam must have shape ({len(names)},) with columns {list(names)} for variant="
                             f"{self.variant!r} (or be a dict name -> value), got {tuple(lam.shape)}")
        return {n: lam[j] for j, n in enumerate(names)}

    def l2_penalty(self, lam) -> torch.Tensor:
        """The L2 penalty for hyperparameters lam in their ORIGINAL scale (not normalised); a scalar.

        hyper_batch: lam (E*B, m), one row per input row (member-major): sum over hyper layers of
            mean_i lam_i ||W + Delta e1_i||^2 (+ bias analogue), computed without per-row weights.
        plain / batch: lam (m,) or {name: value}: sum_g lam_g ||theta_g||^2, per-member biases as the
            mean over members. Columns that are not L2 strengths (dropout) are ignored.
        Add l2_penalty(lam) / n_train to the loss.
        """
        if self.is_hyper:
            if not isinstance(lam, torch.Tensor):
                raise TypeError(f"lam must be a torch.Tensor of shape (E*B, {self.num_hparams}) in the original "
                                f"scale, got {type(lam).__name__}")
            if lam.dim() != 2 or lam.shape[1] != self.num_hparams or lam.shape[0] % self.ensemble_size:
                raise ValueError(f"lam must have shape (E*B, {self.num_hparams}) with E*B divisible by "
                                 f"ensemble_size={self.ensemble_size}, columns {list(self.hparam_names)}; "
                                 f"got {tuple(lam.shape)}")
            z = self.hparam_space.normalize(lam)
            dtype = self._l2_layers[0][0].weight.dtype
            stats = penalty_stats(lam.to(dtype), z, self.ensemble_size)  # the rows' statistics, once for all layers
            # every hyper layer's penalty in one op call (one backward op for all their gradients)
            args = [layer._penalty_args() for layer, _, _ in self._l2_layers]
            index = self.hparam_space.index
            return hyper_l2_penalty([a[0] for a in args], [a[1] for a in args], [a[2] for a in args],
                                    [a[3] for a in args], [a[4] for a in args], stats,
                                    [index(kg) for _, kg, _ in self._l2_layers],
                                    [index(bg) for _, _, bg in self._l2_layers],
                                    backend=penalty_backend(self._l2_layers[0][0].backend))
        values = self._lam_vector(lam)

        def strength(g, like):
            v = values[g]
            return v.to(dtype=like.dtype, device=like.device) if isinstance(v, torch.Tensor) else float(v)

        total = None
        for layer, kg, bg in self._l2_layers:
            term = strength(kg, layer.weight) * layer.weight.square().sum()
            if layer.bias is not None:
                b2 = layer.bias.square().sum()
                if layer.bias.dim() == 2:  # (E, out): mean over members
                    b2 = b2 / layer.bias.shape[0]
                term = term + strength(bg, layer.bias) * b2
            total = term if total is None else total + term
        return total

    def weight_decay_param_groups(self, lam, *, scale: float = 1.0, other_weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups applying the per-group L2 of lam (plain / batch variants) as weight decay.

        Decoupled from the loss: torch's weight_decay wd adds wd * theta to the gradient, the gradient
        of (wd / 2) ||theta||^2, so a group with L2 strength lam_g (penalty lam_g ||theta||^2 * scale)
        gets weight_decay = 2 * scale * lam_g (divided by E for per-member biases, matching
        l2_penalty). Pass scale = 1 / n_train for the paper's normalisation. Fast weights get their
        own group with weight_decay 0 and "fast": True (so a trainer can scale their learning rate);
        parameters in no L2 group (batch norm) get other_weight_decay. Each group has a "name".
        """
        if self.is_hyper:
            raise ValueError("weight_decay_param_groups is for variant='plain' or 'batch'; hyper_batch models "
                             "take per-row strengths through l2_penalty(lam)")
        values = self._lam_vector(lam)
        groups: dict[tuple[str, float], list[nn.Parameter]] = {}
        assigned = set()
        for layer, kg, bg in self._l2_layers:
            groups.setdefault((kg, 1.0), []).append(layer.weight)
            assigned.add(id(layer.weight))
            if layer.bias is not None:
                factor = 1.0 / layer.bias.shape[0] if layer.bias.dim() == 2 else 1.0
                groups.setdefault((bg, factor), []).append(layer.bias)
                assigned.add(id(layer.bias))
        out = [{"params": ps, "weight_decay": 2.0 * scale * float(values[g]) * f, "name": g if f == 1.0 else f"{g}/E"}
               for (g, f), ps in groups.items()]
        fast = list(self.fast_parameters())
        if fast:
            out.append({"params": fast, "weight_decay": 0.0, "name": "fast", "fast": True})
        fast_ids = {id(p) for p in fast}
        other = [p for p in self.parameters() if id(p) not in assigned and id(p) not in fast_ids]
        if other:
            out.append({"params": other, "weight_decay": other_weight_decay, "name": "other"})
        return out

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, ensemble_size={self.ensemble_size}, num_classes={self.num_classes}, "
                f"hparams={list(self.hparam_names)}")


def l2_space(names, l2_range, dropout_range=None) -> HyperParameterSpace:
    """L2 strengths (log-uniform over l2_range) for each name, then 'dropout' when dropout_range is given."""
    low, high = _check_range("l2_range", l2_range)
    items = [HyperParameter(n, low, high, True) for n in names]
    if dropout_range is not None:
        dlow, dhigh = _check_range("dropout_range", dropout_range)
        if dhigh >= 1:
            raise ValueError(f"dropout_range must lie in (0, 1), got {dropout_range!r}")
        items.append(HyperParameter("dropout", dlow, dhigh, True))
    return HyperParameterSpace(items)


def _check_range(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not 0 < low < high:
        raise ValueError(f"{name} must satisfy 0 < low < high, got {value!r}")
    return low, high
