"""Pieces every trainer shares: the training configuration, how models are built, data batching,
atomic checkpoint files (read back with torch.load(weights_only=True)), and the prediction /
evaluation API (predict_proba, member_proba, evaluate, save, load).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch
import torch.nn as nn

from hyperkern import metrics

__all__ = ["TrainConfig", "ModelSpec", "register_model", "atomic_save", "load_checkpoint", "as_dataset",
           "count_parameters", "EnsembleBase"]


LR_SCHEDULES = ("cosine", "constant", "reference")
# uncertainty-baselines' hyperbatchensemble.py: 250 epochs, 1 warm-up epoch, x0.2 at epochs 100, 200, 225
_REFERENCE_WARMUP = 1 / 250
_REFERENCE_DECAY_AT = (100 / 250, 200 / 250, 225 / 250)
_REFERENCE_DECAY_RATIO = 0.2


@dataclass
class TrainConfig:
    """How one network is trained (SGD with Nesterov momentum, as the paper's reference scripts).

    epochs: passes over the training split. batch_size: examples per step (per member: batch and
    hyper-batch ensembles tile each minibatch E times). lr: initial learning rate, decayed by
    lr_schedule ("cosine" to 0 over the run, "constant", or "reference": the reference scripts'
    shape scaled to the run, a linear warm-up over the first 1/250 of the steps (one epoch of 250),
    then x0.2 at 100/250, 200/250 and 225/250 of the steps). momentum, nesterov: SGD settings.
    eval_batch_size: rows per forward pass at prediction time. device: where training runs.
    fast_weight_lr_multiplier: batch ensembles scale the fast weights' gradients by this (0.5 as the
    reference). val_every: hyper-batch ensembles take a step on the lambda distributions every
    val_every training steps (3 in the paper); hparam_lr: Adam learning rate of that step (1e-3);
    entropy_weight: tau, the entropy bonus of that step (1e-3).
    """

    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    lr_schedule: str = "cosine"
    eval_batch_size: int = 1024
    device: str = "cpu"
    fast_weight_lr_multiplier: float = 0.5
    val_every: int = 3
    hparam_lr: float = 1e-3
    entropy_weight: float = 1e-3

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "val_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("lr", "hparam_lr"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TrainConfig.momentum must lie in [0, 1), got {self.momentum!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.fast_weight_lr_multiplier < 0 or self.entropy_weight < 0:
            raise ValueError("TrainConfig.fast_weight_lr_multiplier and entropy_weight must be non-negative")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def lr_at(self, step: int, total_steps: int) -> float:
        if self.lr_schedule == "constant":
            return self.lr
        total_steps = max(total_steps, 1)
        if self.lr_schedule == "reference":
            warmup = max(1, round(total_steps * _REFERENCE_WARMUP))
            if step < warmup:
                return self.lr * (step + 1) / warmup
            decays = sum(step >= round(total_steps * m) for m in _REFERENCE_DECAY_AT)
            return self.lr * _REFERENCE_DECAY_RATIO ** decays
        import math

        return 0.5 * self.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ModelSpec(name, ...) build models with builder(num_classes=, in_channels=, input_size=,
    variant=, ensemble_size=, **kwargs) (same keywords as the hyperkern.models zoo)."""
    _MODEL_BUILDERS[name] = builder


@dataclass
class ModelSpec:
    """Which network a trainer builds: a hyperkern.models zoo name ("mlp", "lenet5", "resnet20",
    "wrn28_10") or a name given to register_model, with the data's shape and extra keyword arguments.
    Plain data only, so it pickles into worker processes and into checkpoints."""

    name: str
    num_classes: int
    input_shape: tuple
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.input_shape = tuple(int(v) for v in self.input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")

    def builder(self) -> Callable[..., nn.Module]:
        if self.name in _MODEL_BUILDERS:
            return _MODEL_BUILDERS[self.name]
        import hyperkern.models as zoo

        fn = getattr(zoo, self.name, None)
        if fn is None or not callable(fn):
            raise ValueError(f"unknown model {self.name!r}: not in hyperkern.models and not registered with "
                             "hyperkern.ensembles.register_model")
        return fn

    def build(self, variant: str = "plain", ensemble_size: int = 1, **overrides) -> nn.Module:
        """builder(num_classes, <input description>, variant=, ensemble_size=, **kwargs, **overrides).

        The input is described with whichever keywords the builder takes: in_features (the MLP: the
        input shape (C, H, W)), in_channels (C) and input_size ((H, W))."""
        import inspect

        kwargs = dict(self.kwargs)
        kwargs.update(overrides)
        fn = self.builder()
        try:
            accepted = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins
            accepted = {}
        takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        c, h, w = self.input_shape
        described = {"in_features": self.input_shape, "in_channels": c, "input_size": (h, w)}
        for key, value in described.items():
            if key in accepted and key not in kwargs:
                kwargs[key] = value
        if takes_var_kw and not any(k in accepted for k in described):
            kwargs.setdefault("in_channels", c)  # register_model's promise: the image models' keywords
            kwargs.setdefault("input_size", (h, w))
        return fn(num_classes=self.num_classes, variant=variant, ensemble_size=ensemble_size, **kwargs)

    def to_dict(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(d["name"], int(d["num_classes"]), tuple(d["input_shape"]), dict(d.get("kwargs", {})))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied parameters counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside path, fsync, then os.replace: a reader (or a resumed
    run after a crash) sees either the old file or the complete new one, never a partial file."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def loaded_config(saved: dict, device=None, path: str = "") -> "TrainConfig":
    """The TrainConfig of a saved trainer, on `device` when given; else on the device it was saved
    from, except that a model trained on CUDA loads on the CPU (with a warning) where torch has no
    CUDA, instead of failing in .to('cuda')."""
    config = TrainConfig.from_dict(saved)
    if device is not None:
        config.device = str(torch.device(device))
    elif torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        import warnings

        warnings.warn(f"{path}: saved from {config.device}, which this torch cannot use; loading on the CPU "
                      "(pass device= to choose)", stacklevel=3)
        config.device = "cpu"
    return config


def load_checkpoint(path: str) -> Any:
    """torch.load(path, weights_only=True): tensors, dicts, lists and numbers only, so a hostile file
    cannot run code. Errors name the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a loadable hyperkern checkpoint (torch.load with weights_only=True "
                         f"refused or failed: {type(exc).__name__}: {exc})") from exc


def as_dataset(name: str, value):
    """(x, y) from an ArrayDataset or an (x, y) pair of tensors; checks shapes."""
    try:
        x, y = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an ArrayDataset or an (x, y) pair of tensors, got {type(value).__name__}") \
            from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must hold tensors x (N, ...) and y (N,)")
    if y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name}: x must be (N, ...) and y (N,) with the same N >= 1, got x {tuple(x.shape)} "
                         f"and y {tuple(y.shape)}")
    if y.is_floating_point():
        raise TypeError(f"{name}: y must hold integer class indices, got {y.dtype}")
    return x, y.long()


def batches(n: int, batch_size: int, generator: torch.Generator | None):
    """Index tensors of one epoch: a permutation (from generator) cut into batch_size pieces; the
    last, smaller piece is kept only if it holds at least half a batch (or is the only one)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < batch_size // 2:
        out = out[:-1]
    return out


def output_is_terminal() -> bool:
    """Whether stdout and stderr are both terminals. Progress is then drawn as tqdm bars (on stderr);
    otherwise (a log file, a pipe, CI) it is printed as plain lines, never as carriage-return updates."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress_bar(iterable=None, *, enabled: bool, **kwargs):
    """A tqdm bar on a terminal; off a terminal, one plain line per update (e.g. per finished trial)
    on stdout; nothing when not enabled. The epoch loop prints one line per epoch instead (_loop.py)."""
    if not enabled:
        return _NullBar(iterable)
    if not output_is_terminal():
        return _LineBar(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)


class _NullBar:
    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _LineBar(_NullBar):
    """progress_bar off a terminal: "desc: n/total" on stdout at every update, flushed."""

    def __init__(self, iterable=None, *, total=None, initial=0, desc=None, **kwargs):
        super().__init__(iterable)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.n, self.total, self.desc = int(initial), total, desc or "progress"

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        print(f"{self.desc}: {self.n}/{self.total if self.total is not None else '?'}", flush=True)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global RNG seeded by seed, restoring the caller's RNG states after (the
    CPU generator's, and the current CUDA device's when CUDA is in use)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.manual_seed(int(seed))
        yield


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


class EnsembleBase:
    """The shared prediction API. Subclasses implement member_log_proba(x) -> (E, N, C) and
    member_weights (None, or (E,) non-negative weights of the members in the averaged prediction)."""

    member_weights: torch.Tensor | None = None
    config: TrainConfig

    def _init_base(self, model, ensemble_size, config, seed, run_dir, progress):
        """Validate and store the arguments every trainer takes."""
        if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise ValueError(f"ensemble_size must be a positive int, got {ensemble_size!r}")
        if config is not None and not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.model = model
        self.ensemble_size = ensemble_size
        self.config = config or TrainConfig()
        self.seed = int(seed)
        self.run_dir = run_dir
        self.progress = progress
        self.fitted = False
        self.member_weights = None

    def _check_fitted(self):
        if not getattr(self, "fitted", False):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(train, val) or load(path) first")

    def _check_x(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating torch.Tensor of input images (N, C, H, W)")
        expected = tuple(self.model_spec.input_shape)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return x

    def member_log_proba(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def member_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(E, N, C) probabilities of each member on the N rows of x (member k in [k])."""
        return self.member_log_proba(x).exp()

    def predict_log_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) log of the ensemble's (weighted) mean of member probabilities, via logsumexp."""
        lp = self.member_log_proba(x)
        if self.member_weights is None:
            logw = torch.full((lp.shape[0],), -torch.log(torch.tensor(float(lp.shape[0]))).item())
        else:
            w = self.member_weights.to(torch.float64)
            logw = (w / w.sum()).clamp_min(torch.finfo(torch.float64).tiny).log()
        return torch.logsumexp(lp.double() + logw.double()[:, None, None], dim=0).to(lp.dtype)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) the ensemble prediction: the (weighted) mean of the members' probabilities."""
        return self.predict_log_proba(x).exp()

    def evaluate(self, test, num_bins: int = 15) -> dict:
        """Metrics of the ensemble on test (an ArrayDataset or (x, y)): accuracy, nll (of the averaged
        prediction), ece, brier, disagreement, average_kl, ensemble_size, num_parameters."""
        x, y = as_dataset("test", test)
        lp = self.member_log_proba(x)
        result = metrics.summarize(lp, y, weights=self.member_weights, num_bins=num_bins)
        result["num_parameters"] = self.num_parameters()
        return result

    def num_parameters(self) -> int:
        raise NotImplementedError
