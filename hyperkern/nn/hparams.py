"""Hyperparameter spaces and the per-member log-uniform distributions of hyper-batch ensembles.

HyperParameterSpace names the hyperparameters a model is conditioned on (e.g. one L2 strength per
layer group and a dropout rate), with their ranges and scale, and maps values between their
original scale and the normalised [0, 1] the models' embeddings see (docs/method.md section 2):

    z = (log lam - log low) / (log high - log low)        (log scale)
    z = (lam - low) / (high - low)                          (linear scale)

EnsembleLogUniform holds, for every member k and hyperparameter j, a log-uniform distribution
logU(a_kj, b_kj) with trainable xi = (log a, log b), each of shape (E, m) (docs/method.md section 3):
reparameterised sampling of one lambda per row (member-major), mean, entropy and clipping.

The interface the trainers use:

    space = model.hparam_space
    dist = EnsembleLogUniform(space, ensemble_size=E)
    lam = dist.rsample(B)                      # (E*B, m), original scale, member-major rows
    logits = model(tile(x, E), space.normalize(lam))
    loss = ce + model.l2_penalty(lam) / n_train
    ...
    test_lam = dist.mean(B)                    # (E*B, m): each member at its distribution's mean
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, NamedTuple

import torch
import torch.nn as nn

__all__ = ["HyperParameter", "HyperParameterSpace", "EnsembleLogUniform"]


class HyperParameter(NamedTuple):
    """One named hyperparameter with its range [low, high] and scale (log=True: log-uniform)."""

    name: str
    low: float
    high: float
    log: bool = True


def _as_hparam(item) -> HyperParameter:
    if isinstance(item, HyperParameter):
        hp = item
    elif isinstance(item, (tuple, list)) and len(item) in (3, 4):
        hp = HyperParameter(*item)
    else:
        raise TypeError(f"each hyperparameter must be a HyperParameter or a tuple (name, low, high[, log]), got {item!r}")
    if not isinstance(hp.name, str) or not hp.name:
        raise TypeError(f"hyperparameter name must be a non-empty str, got {hp.name!r}")
    low, high = float(hp.low), float(hp.high)
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise ValueError(f"hyperparameter {hp.name!r} needs finite low < high, got low={hp.low!r}, high={hp.high!r}")
    if hp.log and low <= 0:
        raise ValueError(f"hyperparameter {hp.name!r} is log-scaled and needs low > 0, got low={hp.low!r}")
    return HyperParameter(hp.name, low, high, bool(hp.log))


class HyperParameterSpace:
    """An ordered set of named hyperparameters; column j of every hparams/lambda matrix is hyperparameter j.

    Args:
        hparams: HyperParameter objects or (name, low, high[, log]) tuples, or a mapping
            name -> (low, high[, log]). Order defines the columns.
    """

    def __init__(self, hparams: Iterable | Mapping):
        if isinstance(hparams, Mapping):
            hparams = [(name, *spec) for name, spec in hparams.items()]
        items = [_as_hparam(h) for h in hparams]
        if not items:
            raise ValueError("a HyperParameterSpace needs at least one hyperparameter")
        names = [h.name for h in items]
        if len(set(names)) != len(names):
            raise ValueError(f"hyperparameter names must be unique, got {names}")
        self._items = tuple(items)
        self._index = {h.name: j for j, h in enumerate(items)}
        self._bounds_cache: dict = {}  # (dtype, device) -> _bounds' tensors

    def __getstate__(self):
        # the cached bound tensors (possibly on a GPU) are not part of the space's value
        return {k: v for k, v in self.__dict__.items() if k != "_bounds_cache"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._bounds_cache = {}

    # ---- description ----
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self._items)

    @property
    def num_hparams(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def __getitem__(self, name: str) -> HyperParameter:
        return self._items[self.index(name)]

    def __contains__(self, name) -> bool:
        return name in self._index

    def __eq__(self, other) -> bool:
        return isinstance(other, HyperParameterSpace) and self._items == other._items

    def __hash__(self):
        return hash(self._items)

    def __repr__(self) -> str:
        inner = ", ".join(f"{h.name}=[{h.low:g}, {h.high:g}]{' log' if h.log else ''}" for h in self._items)
        return f"HyperParameterSpace({inner})"

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown hyperparameter {name!r}; this space has {list(self.names)}") from None

    @property
    def all_log(self) -> bool:
        return all(h.log for h in self._items)

    def _bounds(self, like: torch.Tensor):
        """(offset, width, log mask) per column in the normalisation's working scale, as tensors like `like`.

        Made once per dtype and device and kept: building them from Python lists is a host-to-device copy
        from pageable memory on every call (one per normalize() on CUDA, and a copy that a CUDA graph
        cannot capture). Always made outside inference mode, so autograd can save them later."""
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        key = (dtype, like.device)
        cached = self._bounds_cache.get(key)
        if cached is not None:
            return cached
        off = [math.log(h.low) if h.log else h.low for h in self._items]
        width = [(math.log(h.high) - math.log(h.low)) if h.log else (h.high - h.low) for h in self._items]
        with torch.inference_mode(False):
            cached = (torch.tensor(off, dtype=dtype, device=like.device),
                      torch.tensor(width, dtype=dtype, device=like.device),
                      torch.tensor([h.log for h in self._items], device=like.device))
        if not torch.compiler.is_compiling():
            self._bounds_cache[key] = cached
        return cached

    def log_bounds(self, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log low, log high) as (m,) tensors (log-scaled spaces)."""
        low = torch.tensor([math.log(h.low) for h in self._items], dtype=dtype, device=device)
        high = torch.tensor([math.log(h.high) for h in self._items], dtype=dtype, device=device)
        return low, high

    def _check_width(self, name: str, t):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (..., {self.num_hparams}), got {type(t).__name__}")
        if t.dim() < 1 or t.shape[-1] != self.num_hparams:
            raise ValueError(f"{name} must have shape (..., {self.num_hparams}) with columns {list(self.names)}, "
                             f"got {tuple(t.shape)}")

    # ---- scale conversion ----
    def normalize(self, lam: torch.Tensor) -> torch.Tensor:
        """Original-scale values (..., m) -> normalised z in [0, 1] (..., m); values outside a range are clamped."""
        self._check_width("lam", lam)
        off, width, is_log = self._bounds(lam)
        lam = lam if lam.is_floating_point() else lam.to(off.dtype)
        work = torch.where(is_log, torch.log(lam.clamp_min(torch.finfo(lam.dtype).tiny)), lam)
        return ((work - off) / width).clamp(0.0, 1.0)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised z (..., m) in [0, 1] -> original-scale values (..., m)."""
        self._check_width("z", z)
        off, width, is_log = self._bounds(z)
        work = off + z * width
        return torch.where(is_log, torch.exp(work), work)

    def denormalize_column(self, z_column: torch.Tensor, name: str) -> torch.Tensor:
        """Normalised values of one hyperparameter (any shape) -> its original scale. Traceable by torch.compile."""
        h = self[name]
        if h.log:
            lo, hi = math.log(h.low), math.log(h.high)
            return torch.exp(lo + z_column * (hi - lo))
        return h.low + z_column * (h.high - h.low)

    def to_dict(self, lam_row) -> dict[str, float]:
        """One original-scale row (m,) -> {name: value}."""
        values = lam_row.tolist() if isinstance(lam_row, torch.Tensor) else list(lam_row)
        if len(values) != self.num_hparams:
            raise ValueError(f"lam_row must have {self.num_hparams} values ({list(self.names)}), got {len(values)}")
        return dict(zip(self.names, (float(v) for v in values)))

    def from_dict(self, values: Mapping[str, float], dtype=None, device=None) -> torch.Tensor:
        """{name: value} with every name of the space -> an original-scale row (m,)."""
        missing = [n for n in self.names if n not in values]
        extra = [n for n in values if n not in self._index]
        if missing or extra:
            raise ValueError(f"values must name exactly {list(self.names)}; missing {missing}, unknown {extra}")
        return torch.tensor([float(values[n]) for n in self.names], dtype=dtype, device=device)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=None, device=None) -> torch.Tensor:
        """n independent draws over the full ranges (log-uniform / uniform per scale): (n, m), original scale.

        This is the random search of hyper-deep ensembles.
        """
        u = torch.rand(n, self.num_hparams, generator=generator, dtype=dtype, device=device)
        return self.denormalize(u)

    def log_uniform_mean(self) -> torch.Tensor:
        """(m,) mean of the log-uniform distribution over each full range: (high - low) / (log high - log low)."""
        return torch.tensor([(h.high - h.low) / (math.log(h.high) - math.log(h.low)) for h in self._items],
                            dtype=torch.float64)


class EnsembleLogUniform(nn.Module):
    """Per-member log-uniform distributions logU(a_kj, b_kj) over a log-scaled HyperParameterSpace.

    Trainable parameters log_low = log a and log_high = log b, each (E, m) (the paper's xi).

    Args:
        space: the HyperParameterSpace (every hyperparameter log-scaled).
        ensemble_size: E.
        init_delta: half-width of the initial intervals (default 0.2, the reference).
        init_space: "log" (default): [log c - delta, log c + delta] around log c, with c the
            log-uniform mean of the full range, i.e. a narrow interval whatever the range's scale;
            "linear" (the reference WRN script): [c - delta, c + delta] in the original scale.
        init_noise: std of a Gaussian jitter of each member's centre, in the same space (default
            0.1 * init_delta, as the reference), so members start at different distributions.
        centre: optional (m,) original-scale values to centre the intervals at instead of the
            log-uniform means of the ranges (e.g. a tuned setting).
        dtype, device: of the parameters (default float32).

    The initial intervals are clipped into the ranges (see clip_).
    """

    def __init__(self, space: HyperParameterSpace, ensemble_size: int, *, init_delta: float = 0.2,
                 init_space: str = "log", init_noise: float | None = None, centre=None,
                 generator: torch.Generator | None = None, dtype=None, device=None):
        super().__init__()
        if not isinstance(space, HyperParameterSpace):
            raise TypeError(f"space must be a HyperParameterSpace, got {type(space).__name__}")
        if not space.all_log:
            raise ValueError("EnsembleLogUniform needs every hyperparameter log-scaled; linear-scale ones: "
                             f"{[h.name for h in space if not h.log]}")
        if not isinstance(ensemble_size, int) or isinstance(ensemble_size, bool) or ensemble_size < 1:
            raise ValueError(f"ensemble_size must be a positive int, got {ensemble_size!r}")
        if init_space not in ("log", "linear"):
            raise ValueError(f"init_space must be 'log' or 'linear', got {init_space!r}")
        if init_delta <= 0:
            raise ValueError(f"init_delta must be > 0, got {init_delta!r}")
        self.space = space
        self.ensemble_size = ensemble_size
        init_noise = 0.1 * init_delta if init_noise is None else float(init_noise)
        E, m = ensemble_size, space.num_hparams
        if centre is None:
            centre = space.log_uniform_mean()  # (m,) float64
        else:
            centre = torch.as_tensor(centre, dtype=torch.float64).detach().cpu()
            if centre.shape != (m,) or not bool(torch.isfinite(centre).all()) or bool((centre <= 0).any()):
                raise ValueError(f"centre must hold {m} positive finite values (one per hyperparameter of "
                                 f"{list(space.names)}), got {centre.tolist()}")
        noise = torch.randn(E, m, generator=generator, dtype=torch.float64) * init_noise
        if init_space == "log":
            c = centre.log() + noise
            log_low, log_high = c - init_delta, c + init_delta
        else:
            c = centre + noise
            log_low = (c - init_delta).clamp_min(1e-8).log()
            log_high = (c + init_delta).clamp_min(2e-8).log()
        dtype = dtype or torch.get_default_dtype()
        self.log_low = nn.Parameter(log_low.to(dtype=dtype, device=device))
        self.log_high = nn.Parameter(log_high.to(dtype=dtype, device=device))
        self.clip_()

    @property
    def xi(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log a, log b), each (E, m)."""
        return self.log_low, self.log_high

    def _per_row(self, t: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        if batch_size is None:
            return t
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return t.repeat_interleave(batch_size, dim=0)  # member-major (E*B, m)

    def rsample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reparameterised draw per row: (E*B, m) original-scale lambdas, member-major (rows k*B.. are member k).

        lam = exp(log a + u (log b - log a)), u ~ U(0, 1); gradients flow to log_low and log_high.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        E, m = self.log_low.shape
        u = torch.rand(E, batch_size, m, generator=generator, dtype=self.log_low.dtype, device=self.log_low.device)
        width = (self.log_high - self.log_low)[:, None, :]
        return torch.exp(self.log_low[:, None, :] + u * width).reshape(E * batch_size, m)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """As rsample, without gradients."""
        with torch.no_grad():
            return self.rsample(batch_size, generator)

    def mean(self, batch_size: int | None = None) -> torch.Tensor:
        """Mean of each distribution, (b - a) / (log b - log a): (E, m), or (E*B, m) member-major rows."""
        width = self.log_high - self.log_low
        return self._per_row((self.log_high.exp() - self.log_low.exp()) / width, batch_size)

    def entropy(self) -> torch.Tensor:
        """Entropy of each distribution, 0.5 (log a + log b) + log(log b - log a): (E, m)."""
        return 0.5 * (self.log_low + self.log_high) + torch.log(self.log_high - self.log_low)

    @torch.no_grad()
    def clip_(self):
        """Project into the ranges, in place: log low_j <= log a <= log b <= log high_j with log a < log b.

        As the reference: eps = 1e-6 * (log high - log low) / 2; log a is clipped to
        [log low, log high - 2 eps], then log b to [log a + eps, log high].
        """
        lo, hi = self.space.log_bounds(dtype=self.log_low.dtype, device=self.log_low.device)
        eps = 1e-6 * 0.5 * (hi - lo)
        self.log_low.copy_(torch.minimum(torch.maximum(self.log_low, lo), hi - 2 * eps))
        self.log_high.copy_(torch.minimum(torch.maximum(self.log_high, self.log_low + eps), hi))
        return self

    def extra_repr(self) -> str:
        return f"ensemble_size={self.ensemble_size}, space={self.space!r}"
