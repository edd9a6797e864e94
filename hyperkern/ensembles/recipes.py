"""Named training recipes: the reference scripts' defaults, and the project's own tuned departures.

A recipe fixes everything about how the batch-type arms (batch and hyper-batch ensembles) start and
train that the paper's method leaves to its code, and the schedule and validation split of every
method. `hyperkern compare --recipe NAME` and `hyperkern train --recipe NAME` use them; from Python,
`get_recipe(name)` returns one and its methods give the values.

- "reference": every default of uncertainty-baselines' baselines/cifar/hyperbatchensemble.py and
  batchensemble.py, scaled to the run's epochs: SGD-Nesterov with one warm-up epoch in 250 and the
  learning rate x0.2 at 100/250, 200/250 and 225/250 of the run; 5% of the data held out for
  validation (the reference's train_proportion 0.95); fast weights N(1, 0.5^2) for the batch
  ensemble and N(1, 0.75^2) for the hyper-batch ensemble; the hyper-batch distributions start at
  each range's log-uniform mean, the centre jittered per member by N(0, 0.02^2) and the bounds
  [max(c - 0.2, 1e-8), c + 0.2], all in the linear scale; Adam 1e-3 and tau 1e-3 on them; both
  batch-type arms start from the same setting (the ranges' log-uniform means: the reference's
  batch-ensemble L2 default, 3e-4 on CIFAR, is the hyper-batch L2 range's mean divided by N) and
  neither uses label smoothing.
- "tuned": the project's defaults, each departure from "reference" chosen on held-out data (never
  the test split; docs/method.md lists the evidence): the cosine schedule, 20% (digits) or 10% of
  the data for validation, both batch-type arms start from the random search's best setting (in
  `compare`; `train` uses the untuned defaults) WITH its label smoothing, the hyper-batch MLP's
  fast weights at N(1, 0.25^2), the distributions +-0.2 wide in log space around that setting, and
  Adam 3e-3 on digits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hyperkern.nn.hparams import HyperParameterSpace

__all__ = ["Recipe", "RECIPES", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    """How the methods train; see the module docstring. Plain data, so it goes into results.json."""

    name: str
    lr_schedule: str  # TrainConfig.lr_schedule of every method
    val_fraction: float | None  # None: the dataset's default (0.2 on digits, 0.1 elsewhere)
    start: str  # where the batch-type arms start: "tuned" (the search's best / the defaults) or "range-mean"
    label_smoothing: bool  # whether the batch-type arms use the starting setting's label smoothing
    batch_fast_init_std: float
    hyper_fast_init_std: float
    hyper_fast_init_std_mlp: float  # the MLP has no normalisation layer to absorb the fast-weight scales
    init_space: str  # EnsembleLogUniform init_space of the hyper-batch distributions
    hparam_lr: float
    hparam_lr_digits: float  # 40 epochs of 17 steps leave 226 distribution steps on digits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved_val_fraction(self, dataset: str) -> float:
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.2 if dataset == "digits" else 0.1

    def fast_init_std(self, model: str, method: str) -> float:
        """Initial std of the fast weights r, s (and u, v): N(1, std^2)."""
        if method == "batch":
            return self.batch_fast_init_std
        if method != "hyper_batch":
            raise ValueError(f"method must be 'batch' or 'hyper_batch', got {method!r}")
        return self.hyper_fast_init_std_mlp if model == "mlp" else self.hyper_fast_init_std

    def distribution_lr(self, dataset: str) -> float:
        """Adam learning rate of the hyper-batch distribution step."""
        return self.hparam_lr_digits if dataset == "digits" else self.hparam_lr

    def batch_type_start(self, space: HyperParameterSpace, setting: dict) -> tuple[dict, dict, float]:
        """Where the batch-type arms start. space: the hyper-batch model's hyperparameter space;
        setting: the tuned (or default) setting, label_smoothing included.

        Returns (batch_hparams, hyper_init_hparams, label_smoothing): the batch ensemble's fixed
        hyperparameters, the centres of the hyper-batch distributions, and the label smoothing
        both arms train with. The two arms always share the start and the label smoothing."""
        if self.start == "range-mean":
            start = space.to_dict(space.log_uniform_mean())
        elif self.start == "tuned":
            start = {k: float(v) for k, v in setting.items() if k in space}
        else:  # pragma: no cover - the RECIPES below are the only instances
            raise ValueError(f"unknown start {self.start!r}")
        smoothing = float(setting.get("label_smoothing", 0.0)) if self.label_smoothing else 0.0
        return {**start, "label_smoothing": smoothing}, dict(start), smoothing


RECIPES = {
    "reference": Recipe(name="reference", lr_schedule="reference", val_fraction=0.05, start="range-mean",
                        label_smoothing=False, batch_fast_init_std=0.5, hyper_fast_init_std=0.75,
                        hyper_fast_init_std_mlp=0.75, init_space="linear", hparam_lr=1e-3, hparam_lr_digits=1e-3),
    "tuned": Recipe(name="tuned", lr_schedule="cosine", val_fraction=None, start="tuned", label_smoothing=True,
                    batch_fast_init_std=0.5, hyper_fast_init_std=0.75, hyper_fast_init_std_mlp=0.25,
                    init_space="log", hparam_lr=1e-3, hparam_lr_digits=3e-3),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called name ("reference" or "tuned")."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]
