"""Rank-1 ensemble layers: BatchEnsemble (Wen et al. 2020) and hyper-batch ensemble (Wenzel et al. 2020).

Every layer here takes **member-major** rows: the input's first dimension is E*B, and rows
k*B .. (k+1)*B-1 belong to ensemble member k (E = ensemble_size). Use hyperkern.nn.tile(x, E) to
feed the same minibatch to every member and hyperkern.nn.untile(y, E) to get (E, B, ...) back.

The layers own parameters and call the public ops in hyperkern.ops; they do not care which backend
("torch", "cpp", "triton") runs the op: the `backend` constructor argument is passed through.

Fast weights (r, s and, when untied, u, v) are listed by `fast_parameters()`: trainers give them no
weight decay and (in the reference) half the learning rate.
"""
from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

import hyperkern.ops as ops
from hyperkern._backends import BACKENDS
from hyperkern._backends import is_compiling as _is_compiling
from hyperkern.ops.conv import _hyper_batch_ensemble_conv2d_hp as _hyper_conv2d_hp
from hyperkern.ops.linear import _hyper_batch_ensemble_linear_hp as _hyper_linear_hp
from hyperkern.ops.penalty import PenaltyStats, hyper_l2_penalty, penalty_backend, penalty_stats  # noqa: F401

__all__ = ["BatchEnsembleLinear", "BatchEnsembleConv2d", "HyperBatchEnsembleLinear", "HyperBatchEnsembleConv2d",
           "FAST_INITS", "check_hparams"]

FAST_INITS = ("normal", "random_sign", "ones")


def _check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_fast_init(init: str, init_std: float):
    if init not in FAST_INITS:
        raise ValueError(f"init must be one of {FAST_INITS}, got {init!r}")
    if not isinstance(init_std, (int, float)) or isinstance(init_std, bool) or init_std < 0:
        raise ValueError(f"init_std must be a non-negative float, got {init_std!r}")


def _check_backend(backend: str):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_linear_input(x, in_features: int, ensemble_size: int):
    """x (E*B, ..., in_features): member-major along the FIRST dimension. The op sees the rows
    flattened, so a first dimension that is not a multiple of E would split one example's positions
    between members (silently): it is refused here, by name."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (E*B, ..., in_features={in_features}) with E*B member-major "
                         f"rows, got {tuple(x.shape)}")
    if x.shape[0] % ensemble_size:
        raise ValueError(f"x.shape[0] = {x.shape[0]} must be divisible by the ensemble size E = {ensemble_size}: "
                         "the first dimension is member-major (E blocks of B examples; the middle dimensions of "
                         f"an N-D input belong to their example), got x of shape {tuple(x.shape)}")


def _he_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Keras 'he_normal' (the reference's conv init): truncated normal at +-2 std, variance 2 / fan_in."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    std = math.sqrt(2.0 / max(fan_in, 1)) / 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]
    return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


def _linear_init_(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default weight init (Kaiming uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)))."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _describe_values(t: torch.Tensor) -> str:
    """'values in [lo, hi]' of the finite entries, plus how many are NaN or infinite (min/max of a
    tensor with one NaN is NaN, which hid where the finite values lie)."""
    finite = torch.isfinite(t)
    parts = []
    if bool(finite.any()):
        values = t[finite]
        parts.append(f"finite values in [{values.min().item():.4g}, {values.max().item():.4g}]")
    for name, count in (("NaN", int(torch.isnan(t).sum())), ("infinite", int(torch.isinf(t).sum()))):
        if count:
            parts.append(f"{count} {name} of {t.numel()}")
    return ", ".join(parts)


def check_hparams(hparams, rows: int, num_hparams: int, check_range: bool = True) -> torch.Tensor:
    """Validate a member-major hyperparameter matrix: a floating tensor of shape (rows, num_hparams) in [0, 1].

    The range check needs the values (a device sync), so it is skipped under torch.compile, while a CUDA
    graph is being captured (no sync is possible there; the capture sees the values of one call only)
    and when check_range=False (models check once at their boundary and not again in every layer).
    """
    if not isinstance(hparams, torch.Tensor):
        raise TypeError(f"hparams must be a torch.Tensor of shape (E*B, {num_hparams}) with normalised "
                        f"hyperparameters in [0, 1], got {type(hparams).__name__}")
    if not hparams.is_floating_point():
        raise TypeError(f"hparams must be a floating tensor, got {hparams.dtype}")
    if hparams.dim() != 2 or hparams.shape[1] != num_hparams:
        raise ValueError(f"hparams must have shape (E*B, num_hparams={num_hparams}), one row of normalised "
                         f"hyperparameters per input row, got {tuple(hparams.shape)}")
    if hparams.shape[0] != rows:
        raise ValueError(f"hparams must have one row per input row: expected shape ({rows}, {num_hparams}), "
                         f"got {tuple(hparams.shape)}")
    if (check_range and not _is_compiling() and hparams.device.type != "meta" and hparams.numel() > 0
            and not (hparams.is_cuda and torch.cuda.is_current_stream_capturing())):
        # one reduction and one read: a NaN makes the minimum NaN and every comparison with NaN is false;
        # an infinity is outside [0, 1]
        lo, hi = torch.aminmax(hparams.detach())  # no autograd node for a check
        if not (lo.item() >= 0 and hi.item() <= 1):
            raise ValueError("hparams must be normalised hyperparameters in [0, 1] (use "
                             "HyperParameterSpace.normalize on values in their original scale), got "
                             + _describe_values(hparams))
    return hparams


# The op arguments a layer's forward reads with _RankOneEnsembleLayer._tensors, in the ops' order.
_BATCH_PARAMS = ("weight", "r", "s", "bias")
_HYPER_PARAMS = ("weight", "delta", "r", "s", "u", "v", "embedding", "bias", "delta_bias")


class _RankOneEnsembleLayer(nn.Module):
    """Shared machinery: fast-weight init and listing, ensemble-size bookkeeping."""

    ensemble_size: int

    def _tensors(self, names: tuple[str, ...]) -> list:
        """The named parameters for a forward call, read from _parameters: nn.Module.__getattr__ costs
        about 1 us a name, a tenth of a small hyper layer's Python time (docs/benchmark-history.md).
        Attribute reads where something moved a parameter out of _parameters (torch.nn.utils.parametrize,
        weight_norm, a sharding wrapper). "embedding" names the embedding layer's weight."""
        p = self._parameters
        try:
            return [p[n] if n != "embedding" else self._modules["embedding"]._parameters["weight"] for n in names]
        except KeyError:
            return [getattr(self, n) if n != "embedding" else self.embedding.weight for n in names]

    def _init_fast_(self, t: torch.Tensor):
        with torch.no_grad():
            if self.init == "normal":
                nn.init.normal_(t, mean=1.0, std=self.init_std)
            elif self.init == "random_sign":
                # +-1 with equal probability (edward2's RandomSign(0.5)).
                t.copy_(torch.randint(0, 2, t.shape, device=t.device).to(t.dtype) * 2 - 1)
            else:
                nn.init.ones_(t)

    def named_fast_parameters(self):
        """(name, parameter) for the fast weights r, s (and u, v when untied)."""
        seen = set()
        for name in ("r", "s", "u", "v"):
            p = getattr(self, name, None)
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def fast_parameters(self):
        """The fast weights (no weight decay for them; the reference halves their learning rate)."""
        for _, p in self.named_fast_parameters():
            yield p


# --------------------------------------------------------------------------------------------------
# BatchEnsemble
# --------------------------------------------------------------------------------------------------
class BatchEnsembleLinear(_RankOneEnsembleLayer):
    r"""BatchEnsemble linear layer: for every row x of member k,

        y = ((x * r_k) @ weight^T) * s_k + bias_k

    i.e. member k uses the weight W_k = weight * (s_k r_k^T).

    Rows are member-major along the FIRST dimension: input (E*B, ..., in_features), where rows
    k*B .. (k+1)*B-1 of dimension 0 belong to member k, with every position of the middle dimensions
    of such a row (e.g. the tokens of a sequence) going to the same member; output
    (E*B, ..., out_features) in the same order. x.shape[0] must be a multiple of E (a ValueError
    otherwise); an empty batch (x.shape[0] == 0) gives an empty output.

    Args:
        in_features, out_features, bias: as nn.Linear.
        ensemble_size: E, the number of members (keyword-only).
        init: fast-weight init, "normal" (N(1, init_std^2), the reference), "random_sign" (+-1) or
            "ones" (every member starts equal to the shared layer).
        init_std: standard deviation of the "normal" fast-weight init (default 0.5).
        backend: op backend, "auto" | "torch" | "cpp" | "triton" (see hyperkern.available_backends()).
        device, dtype: as nn.Linear.

    Parameters:
        weight: (out_features, in_features) shared slow weight, initialised as nn.Linear's.
        r: (E, in_features) and s: (E, out_features) fast weights.
        bias: (E, out_features) per-member bias, initialised to zero (or None).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, ensemble_size: int,
                 init: str = "normal", init_std: float = 0.5, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        self.ensemble_size = _check_positive_int("ensemble_size", ensemble_size)
        _check_fast_init(init, init_std)
        _check_backend(backend)
        self.init, self.init_std, self.backend = init, float(init_std), backend
        E = self.ensemble_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.r = nn.Parameter(torch.empty(E, in_features, **factory))
        self.s = nn.Parameter(torch.empty(E, out_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(E, out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        _linear_init_(self.weight)
        self._init_fast_(self.r)
        self._init_fast_(self.s)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_linear_input(x, self.in_features, self.ensemble_size)
        params = self._tensors(_BATCH_PARAMS)
        if x.dim() == 2:  # no reshape (each would be an autograd view node on every call)
            return ops.batch_ensemble_linear(x, *params, backend=self.backend)
        lead = x.shape[:-1]
        y = ops.batch_ensemble_linear(x.reshape(-1, self.in_features), *params, backend=self.backend)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"ensemble_size={self.ensemble_size}, init={self.init!r}, init_std={self.init_std}, "
                f"backend={self.backend!r}")


def _conv_args(kernel_size, stride, padding, dilation, groups):
    for name, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
        pair = _pair(value)
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
            raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same":
            _check_positive_int("groups", groups)
            return _pair(kernel_size), _pair(stride), "same", _pair(dilation), groups
        else:
            raise ValueError(f"padding must be an int or a pair of ints (explicit zero padding), 'valid' or 'same' "
                             f"(TensorFlow's rule), got {padding!r}")
    pad = _pair(padding)
    if len(pad) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pad):
        raise ValueError(f"padding must be a non-negative int or a pair of them, got {padding!r}")
    _check_positive_int("groups", groups)
    return _pair(kernel_size), _pair(stride), pad, _pair(dilation), groups


def _same_padding(x: torch.Tensor, kernel_size, stride, dilation):
    """TensorFlow's padding='same' for x (N, C, H, W): (x, padding) to give the conv op.

    Per spatial dimension, as TensorFlow: out = ceil(in / stride),
    pad_total = max((out - 1) * stride + (k - 1) * dilation + 1 - in, 0), pad_before = pad_total // 2
    and pad_after = pad_total - pad_before (the extra element after, e.g. (0, 1) for a 3x3 kernel at
    stride 2 on an even size). The symmetric part goes to the op as its padding; when pad_after >
    pad_before the difference is zero-padded onto x (bottom / right) first with F.pad.
    """
    before, extra = [], []
    for size, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        before.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if extra[0] or extra[1]:
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return x, (before[0], before[1])


class BatchEnsembleConv2d(_RankOneEnsembleLayer):
    r"""BatchEnsemble 2-D convolution: for every image x of member k,

        y = conv2d(x * r_k[:, None, None], weight) * s_k[:, None, None] + bias_k[:, None, None]

    (r_k scales input channels; s_k and bias_k scale and shift output channels).

    Images are member-major: input (E*B, in_channels, H, W), where images k*B .. (k+1)*B-1 belong
    to member k; output (E*B, out_channels, H_out, W_out) in the same order.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as nn.Conv2d.
            padding: explicit zero padding, an int or a pair (top/bottom, left/right); "valid" (0); or
            "same", TensorFlow's rule at any stride, computed per side from the input size at every
            forward: pad_total = max((ceil(in / stride) - 1) * stride + (k - 1) * dilation + 1 - in, 0),
            pad_total // 2 before and the rest after (asymmetric, e.g. (0, 1) for a 3x3 kernel at
            stride 2 on an even size, which an int padding cannot express; the output is
            ceil(in / stride)). The layer then keeps padding == "same".
        ensemble_size: E (keyword-only).
        init, init_std: fast-weight init, "normal" N(1, init_std^2) (default std 0.5), "random_sign", "ones".
        backend: op backend, "auto" | "torch" | "cpp" | "triton".
        device, dtype: as nn.Conv2d.

    Parameters:
        weight: (out_channels, in_channels / groups, kh, kw), He-normal (Keras' truncated he_normal,
            as the reference).
        r: (E, in_channels), s: (E, out_channels) fast weights; bias: (E, out_channels), zeros (or None).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, ensemble_size: int, init: str = "normal",
                 init_std: float = 0.5, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.kernel_size, self.stride, self.padding, self.dilation, self.groups = _conv_args(
            kernel_size, stride, padding, dilation, groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                             f"by groups ({groups})")
        self.ensemble_size = _check_positive_int("ensemble_size", ensemble_size)
        _check_fast_init(init, init_std)
        _check_backend(backend)
        self.init, self.init_std, self.backend = init, float(init_std), backend
        E = self.ensemble_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.r = nn.Parameter(torch.empty(E, in_channels, **factory))
        self.s = nn.Parameter(torch.empty(E, out_channels, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(E, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        _he_normal_(self.weight)
        self._init_fast_(self.r)
        self._init_fast_(self.s)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (E*B, in_channels={self.in_channels}, H, W) with E*B member-major "
                             f"images, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        x, padding = self._pad(x)
        return ops.batch_ensemble_conv2d(x, *self._tensors(_BATCH_PARAMS), self.stride, padding, self.dilation,
                                         self.groups, backend=self.backend)

    def _pad(self, x):
        """(x, padding for the op): self.padding as is, or padding='same' resolved for x's size."""
        if self.padding == "same":
            return _same_padding(x, self.kernel_size, self.stride, self.dilation)
        return x, self.padding

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return (s + f", bias={self.bias is not None}, ensemble_size={self.ensemble_size}, init={self.init!r}, "
                f"init_std={self.init_std}, backend={self.backend!r}")


# --------------------------------------------------------------------------------------------------
# Hyper-batch ensemble
# --------------------------------------------------------------------------------------------------
class _HyperMixin:
    """Parameters and maths shared by the hyper-batch-ensemble layers (docs/method.md section 2)."""

    def _init_hyper(self, num_hparams, tie_fast_weights, embedding_std, in_size, out_size, bias, factory):
        self.num_hparams = _check_positive_int("num_hparams", num_hparams)
        if not isinstance(embedding_std, (int, float)) or embedding_std < 0:
            raise ValueError(f"embedding_std must be a non-negative float, got {embedding_std!r}")
        self.tie_fast_weights = bool(tie_fast_weights)
        self.embedding_std = float(embedding_std)
        E = self.ensemble_size
        if self.tie_fast_weights:
            # The SAME Parameter objects (the reference's fast_weights_eq_contraint): u is r, v is s.
            self.u = self.r
            self.v = self.s
        else:
            self.u = nn.Parameter(torch.empty(E, in_size, **factory))
            self.v = nn.Parameter(torch.empty(E, out_size, **factory))
        if bias:
            self.delta_bias = nn.Parameter(torch.empty(E, out_size, **factory))
        else:
            self.register_parameter("delta_bias", None)
        # e(z) = embedding(z): e1 = first out columns (kernel), e2 = next out columns (bias).
        self.embedding = nn.Linear(self.num_hparams, out_size * (2 if bias else 1), bias=False, **factory)

    def _reset_hyper(self):
        if not self.tie_fast_weights:
            self._init_fast_(self.u)
            self._init_fast_(self.v)
        if self.delta_bias is not None:
            nn.init.zeros_(self.delta_bias)
        nn.init.normal_(self.embedding.weight, 0.0, self.embedding_std)

    def embed(self, hparams: torch.Tensor):
        """(e1, e2) for normalised hparams (E*B, num_hparams): e1 (E*B, out), e2 (E*B, out) or None."""
        e = F.linear(hparams.to(self.embedding.weight.dtype), self.embedding.weight)
        if self.bias is None:
            return e, None
        # one split (one autograd node whose backward is one cat) rather than two slices (two nodes,
        # each filling a zero tensor shaped like e in the backward)
        e1, e2 = e.split(self._out_size, dim=1)
        return e1, e2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.tie_fast_weights:
            for tied, source in (("u", "r"), ("v", "s")):
                a, b = state_dict.get(prefix + tied), state_dict.get(prefix + source)
                if a is not None and b is not None and (a.shape != b.shape or not torch.equal(a, b)):
                    error_msgs.append(f"{prefix}{tied} differs from {prefix}{source} in the state dict, but this "
                                      f"layer ties {tied} to {source} (tie_fast_weights=True); build the layer with "
                                      "tie_fast_weights=False to load untied fast weights")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def l2_penalty(self, lam: torch.Tensor, hparams: torch.Tensor, lam_bias: torch.Tensor | None = None):
        r"""Mean over rows i of lam_i * ||weight + delta * e1_i||^2 (+ the bias analogue), a scalar.

        Per row i of member k the penalised kernel is weight + delta * e1_i (e1 broadcast over the
        output dimension) and the penalised bias is bias_k + delta_bias_k * e2_i; fast weights are not
        penalised (the reference's regularize_fast_weights=False). Computed by expanding the square
        (docs/method.md section 2), so no per-row weight is built:

            mean(lam) ||W||^2 + 2 sum(W * Delta * mean(lam e1)) + sum(Delta^2 * mean(lam e1^2))

        Args:
            lam: (E*B,) or (E*B, 1) per-row L2 strengths in their original scale (member-major rows).
            hparams: (E*B, num_hparams) the same rows' normalised hyperparameters (they give e1, e2).
            lam_bias: per-row L2 strengths for the bias (default: lam).
        """
        rows = hparams.shape[0] if isinstance(hparams, torch.Tensor) else -1
        check_hparams(hparams, rows, self.num_hparams, check_range=False)
        E = self.ensemble_size
        if rows % E:
            raise ValueError(f"hparams has {rows} rows, which is not divisible by ensemble_size={E} "
                             "(rows are member-major: E blocks of B rows)")
        lam = _check_lam("lam", lam, rows)
        lam_bias = lam if lam_bias is None else _check_lam("lam_bias", lam_bias, rows)
        stats = penalty_stats(torch.stack((lam, lam_bias), 1).to(self.weight.dtype), hparams, E)
        w, d, a, b, db = self._penalty_args()
        return hyper_l2_penalty([w], [d], [a], [b], [db], stats, [0], [1], backend=penalty_backend(self.backend))

    def _penalty_args(self):
        """(weight, delta, embedding weight, bias, delta_bias): this layer's entries in the lists
        hyperkern.ops.hyper_l2_penalty takes (bias and delta_bias None without a bias)."""
        return self.weight, self.delta, self.embedding.weight, self.bias, self.delta_bias


def _check_lam(name: str, lam, rows: int) -> torch.Tensor:
    if not isinstance(lam, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({rows},) with per-row L2 strengths, "
                        f"got {type(lam).__name__}")
    if lam.dim() == 2 and lam.shape[1] == 1:
        lam = lam[:, 0]
    if lam.dim() != 1 or lam.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},) or ({rows}, 1), one L2 strength per row, "
                         f"got {tuple(lam.shape)}")
    return lam


class HyperBatchEnsembleLinear(_HyperMixin, BatchEnsembleLinear):
    r"""Hyper-batch-ensemble linear layer (Wenzel et al. 2020, eq. 7). For row i of member k,

        y_i = s_k * ((x_i * r_k) @ weight^T) + (v_k * e1_i) * ((x_i * u_k) @ delta^T)
              + bias_k + delta_bias_k * e2_i,           [e1_i | e2_i] = embedding(hparams_i)

    Rows are member-major along the FIRST dimension: x (E*B, ..., in_features) and hparams
    (E*B, num_hparams), where rows k*B .. (k+1)*B-1 of dimension 0 belong to member k and each row
    carries its own normalised hyperparameters in [0, 1] (HyperParameterSpace.normalize), shared by
    every position of that row's middle dimensions. x.shape[0] must be a multiple of E (a ValueError
    otherwise); an empty batch gives an empty output.

    Args:
        in_features, out_features, bias: as nn.Linear.
        ensemble_size: E; num_hparams: m, the width of hparams (keyword-only).
        tie_fast_weights: True (default, the reference): u IS r and v IS s (the same Parameter
            objects). False: u, v are separate parameters.
        init, init_std: fast-weight init (default "normal" with std 0.75, the reference's hyper-batch init).
        embedding_std: std of the embedding's N(0, std^2) init (default 1e-4: training starts as a
            plain BatchEnsemble).
        backend, device, dtype: as BatchEnsembleLinear.

    Parameters (besides BatchEnsembleLinear's): delta (out, in) initialised like weight; u (E, in),
    v (E, out) when untied; delta_bias (E, out), zeros; embedding (nn.Linear(num_hparams,
    out or 2*out, bias=False)) mapping hparams to e1 (and e2 when the layer has a bias).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, ensemble_size: int,
                 num_hparams: int, tie_fast_weights: bool = True, init: str = "normal", init_std: float = 0.75,
                 embedding_std: float = 1e-4, backend: str = "auto", device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        object.__setattr__(self, "_building", True)  # reset_parameters waits until every parameter exists
        BatchEnsembleLinear.__init__(self, in_features, out_features, bias, ensemble_size=ensemble_size,
                                     init=init, init_std=init_std, backend=backend, **factory)
        self.delta = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self._out_size = out_features
        self._init_hyper(num_hparams, tie_fast_weights, embedding_std, in_features, out_features, bias, factory)
        self._building = False
        self.reset_parameters()

    def reset_parameters(self):
        if getattr(self, "_building", False):
            return  # parameters not all created yet; __init__ calls this again at the end
        BatchEnsembleLinear.reset_parameters(self)
        _linear_init_(self.delta)
        self._reset_hyper()

    def forward(self, x: torch.Tensor, hparams: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """x (E*B, ..., in_features), hparams (E*B, num_hparams) in [0, 1] -> (E*B, ..., out_features).

        check_range=False skips the [0, 1] check (a device sync); models check once at their input.
        """
        _check_linear_input(x, self.in_features, self.ensemble_size)
        check_hparams(hparams, x.shape[0], self.num_hparams, check_range)
        # The op embeds the hyperparameters itself ([e1 | e2] = hparams @ embedding.weight^T, as embed()
        # computes them): the (E*B, out) embeddings are never saved for the backward.
        weight, delta, r, s, u, v, emb, bias, delta_bias = self._tensors(_HYPER_PARAMS)
        hp = hparams if hparams.dtype == emb.dtype else hparams.to(emb.dtype)
        if x.dim() == 2:  # no reshapes (autograd view nodes on every call)
            return _hyper_linear_hp(x, weight, delta, r, s, u, v, hp, emb, bias, delta_bias, self.backend, False)
        lead = x.shape[:-1]
        T = math.prod(x.shape[1:-1])  # positions per row (named: with no rows a -1 would be ambiguous)
        if T != 1:  # extra middle dims: every position of row i uses row i's hyperparameters (tiny to repeat)
            hp = hp.repeat_interleave(T, 0)
        # hparams were checked above and the embedding is this layer's own: no per-layer finiteness check
        # (on CUDA it would be a device sync in every layer)
        y = _hyper_linear_hp(x.reshape(x.shape[0] * T, self.in_features), weight, delta, r, s, u, v, hp, emb, bias,
                             delta_bias, self.backend, False)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_hparams={self.num_hparams}, tie_fast_weights={self.tie_fast_weights}, "
                f"embedding_std={self.embedding_std}")


class HyperBatchEnsembleConv2d(_HyperMixin, BatchEnsembleConv2d):
    r"""Hyper-batch-ensemble 2-D convolution (Wenzel et al. 2020, eq. 7, per channel). For image i of member k,

        y_i = s_k * conv(x_i * r_k, weight) + (v_k * e1_i) * conv(x_i * u_k, delta)
              + bias_k + delta_bias_k * e2_i,           [e1_i | e2_i] = embedding(hparams_i)

    with r_k, u_k on input channels and s_k, v_k, e1_i, bias_k, delta_bias_k, e2_i on output
    channels (broadcast over the spatial positions).

    Images are member-major: x (E*B, in_channels, H, W), hparams (E*B, num_hparams) in [0, 1];
    images k*B .. (k+1)*B-1 belong to member k.

    Args: as BatchEnsembleConv2d plus num_hparams, tie_fast_weights (default True: u IS r, v IS s),
    embedding_std (default 1e-4); init_std defaults to 0.75 (the reference's hyper-batch init).
    Parameters (besides BatchEnsembleConv2d's): delta (same shape as weight, He-normal), u, v when
    untied, delta_bias (E, out_channels) zeros, embedding nn.Linear(num_hparams, out or 2*out, bias=False).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, ensemble_size: int, num_hparams: int,
                 tie_fast_weights: bool = True, init: str = "normal", init_std: float = 0.75,
                 embedding_std: float = 1e-4, backend: str = "auto", device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        object.__setattr__(self, "_building", True)  # reset_parameters waits until every parameter exists
        BatchEnsembleConv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                     bias, ensemble_size=ensemble_size, init=init, init_std=init_std,
                                     backend=backend, **factory)
        self.delta = nn.Parameter(torch.empty_like(self.weight))
        self._out_size = out_channels
        self._init_hyper(num_hparams, tie_fast_weights, embedding_std, in_channels, out_channels, bias, factory)
        self._building = False
        self.reset_parameters()

    def reset_parameters(self):
        if getattr(self, "_building", False):
            return
        BatchEnsembleConv2d.reset_parameters(self)
        _he_normal_(self.delta)
        self._reset_hyper()

    def forward(self, x: torch.Tensor, hparams: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """x (E*B, in_channels, H, W), hparams (E*B, num_hparams) in [0, 1] -> (E*B, out_channels, H', W').

        check_range=False skips the [0, 1] check (a device sync); models check once at their input.
        """
        self._check_x(x)
        check_hparams(hparams, x.shape[0], self.num_hparams, check_range)
        weight, delta, r, s, u, v, emb, bias, delta_bias = self._tensors(_HYPER_PARAMS)
        hp = hparams if hparams.dtype == emb.dtype else hparams.to(emb.dtype)
        x, padding = self._pad(x)
        # e1 / e2 = embed(hparams) computed inside the op (no per-layer F.linear + split and their autograd
        # nodes); no per-layer finiteness check of hparams / embedding: see HyperBatchEnsembleLinear
        return _hyper_conv2d_hp(x, weight, delta, r, s, u, v, hp, emb, bias, delta_bias, self.stride, padding,
                                self.dilation, self.groups, self.backend, False)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_hparams={self.num_hparams}, tie_fast_weights={self.tie_fast_weights}, "
                f"embedding_std={self.embedding_std}")
