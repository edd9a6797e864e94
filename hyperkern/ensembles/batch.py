"""Batch ensembles (Wen, Tran, Ba 2020; docs/method.md section 1): one network of rank-1 ensemble layers,
trained on member-major tiled minibatches."""
from __future__ import annotations

import os

import torch

from hyperkern.ensembles._common import (EnsembleBase, ModelSpec, TrainConfig, as_dataset, atomic_save,
                                         count_parameters, load_checkpoint, loaded_config, seeded)
from hyperkern.ensembles._loop import member_log_probs, train_network
from hyperkern.ensembles.deep import default_hparams, resolve_model_spec

__all__ = ["BatchEnsembleTrainer"]


class _SingleNetworkTrainer(EnsembleBase):
    """Shared by the batch and hyper-batch trainers: one member-major network of E members."""

    variant = "batch"

    def _init_common(self, model, ensemble_size, config, seed, run_dir, progress, num_classes):
        self._init_base(model, ensemble_size, config, seed, run_dir, progress)
        self.num_classes = num_classes
        self.network = None
        self.train_seconds = 0.0

    def _prepare(self, train, val):
        x, y = as_dataset("train", train)
        xv, yv = as_dataset("val", val) if val is not None else (None, None)
        self.model_spec = resolve_model_spec(self.model, y, x, self.num_classes, yv)
        return x, y, xv, yv

    def _build(self):
        with seeded(self.seed):
            return self.model_spec.build(self.variant, self.ensemble_size, **self._build_kwargs())

    def _build_kwargs(self) -> dict:
        return {}

    def _claim_run_dir(self, x, y, xv, yv, settings: dict, distributed=None):
        """Write / check run_dir/run.json so a checkpoint of a different run is never resumed (with
        data parallelism: rank 0 does, and a refusal is raised on every rank)."""
        if self.run_dir is None:
            return
        from hyperkern.ensembles.search import RunDirectory, data_fingerprint

        tensors = [t for t in (x, y, xv, yv) if t is not None]
        if distributed is not None and distributed.world_size > 1:
            settings = {**settings, "data_parallel_ranks": distributed.world_size}

        def claim():
            RunDirectory(self.run_dir, {"method": type(self).__name__, "model": self.model_spec.to_dict(),
                                        "config": self.config.to_dict(), "ensemble_size": self.ensemble_size,
                                        "seed": self.seed, "data": data_fingerprint(*tensors), **settings},
                         trials=False)

        claim() if distributed is None else distributed.call_on_main(claim)

    @property
    def checkpoint_path(self) -> str | None:
        """run_dir/checkpoint.pt: written after every epoch; fit resumes from it when it exists."""
        return None if self.run_dir is None else os.path.join(self.run_dir, "checkpoint.pt")

    def num_parameters(self) -> int:
        self._check_fitted()
        return count_parameters(self.network)

    def save(self, path: str) -> None:
        """Write the fitted ensemble to path (tensors and plain data only)."""
        self._check_fitted()
        atomic_save({"kind": f"hyperkern.{type(self).__name__}", "version": 1,
                     "model_spec": self.model_spec.to_dict(), "config": self.config.to_dict(),
                     "ensemble_size": self.ensemble_size, "seed": self.seed, "train_seconds": self.train_seconds,
                     "network": self.network.state_dict(), "extra": self._extra_state()}, path)

    @classmethod
    def load(cls, path: str, device=None):
        """A fitted trainer from save(path) (torch.load with weights_only=True), on device (default:
        the one it trained on, or the CPU when that is CUDA and this torch has none)."""
        state = load_checkpoint(path)
        if not isinstance(state, dict) or state.get("kind") != f"hyperkern.{cls.__name__}":
            raise ValueError(f"{path}: not a saved {cls.__name__}")
        obj = cls.__new__(cls)
        spec = ModelSpec.from_dict(state["model_spec"])
        obj._init_common(spec, int(state["ensemble_size"]), loaded_config(state["config"], device, str(path)),
                         state["seed"], None, False, None)
        obj.model_spec = spec
        obj._load_extra_state(state["extra"])
        obj.network = obj._build()
        obj.network.load_state_dict(state["network"])
        obj.network.to(obj.config.device).eval()
        obj.train_seconds = float(state.get("train_seconds", 0.0))
        obj.fitted = True
        return obj

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass


class BatchEnsembleTrainer(_SingleNetworkTrainer):
    """Trains a batch ensemble: model variant "batch" with E members.

    Every step tiles the minibatch E times member-major (hyperkern.nn.tile: rows k*B..(k+1)*B-1 are
    member k), tiles the labels the same way, and minimises the mean of the members' cross-entropies
    plus the L2 penalty of the slow weights and biases / n_train (fast weights r, s: no weight decay,
    gradients multiplied by config.fast_weight_lr_multiplier, 0.5 by default). Prediction tiles the
    test batch the same way and averages the members' probabilities.

    Args:
        model: a hyperkern.models name or a ModelSpec. ensemble_size: E.
        hparams: {L2 group: strength, "dropout": rate, "label_smoothing": eps} (defaults: default_hparams).
        config: TrainConfig. seed: init and data-order seed.
        run_dir: optional directory; run_dir/checkpoint.pt is written after every epoch and fit resumes
            from it (model, optimizer, data order and RNG state).
        num_classes, progress: as DeepEnsemble.
    """

    variant = "batch"

    def __init__(self, model="mlp", ensemble_size: int = 4, hparams: dict | None = None,
                 config: TrainConfig | None = None, seed: int = 0, run_dir: str | None = None,
                 num_classes: int | None = None, progress: bool = True):
        self._init_common(model, ensemble_size, config, seed, run_dir, progress, num_classes)
        self.hparams = dict(hparams or {})

    def _build_kwargs(self):
        return {"dropout": float(self.hparams["dropout"])} if "dropout" in self.hparams else {}

    def fit(self, train, val=None, *, on_epoch_end=None, distributed=None):
        """Train on train (val is not used by batch ensembles). on_epoch_end(epoch) is called after
        each epoch's checkpoint. distributed: a hyperkern.ensembles.distributed.DistributedContext for
        data-parallel training under torchrun (config.batch_size is then the global batch, sharded
        across the ranks before member-major tiling; rank 0 writes the checkpoints). Returns self."""
        x, y, _, _ = self._prepare(train, val)
        self.hparams = {**default_hparams(self.model_spec), **self.hparams}
        self._claim_run_dir(x, y, None, None, {"hparams": self.hparams}, distributed)
        self.network = self._build()
        main = distributed is None or distributed.is_main
        seed = self.seed * 1_000_003 + 7
        with seeded(seed if distributed is None else distributed.rank_seed(seed)):
            self.fit_info = train_network(self.network, x, y, self.config, self.hparams, data_seed=self.seed,
                                          checkpoint_path=self.checkpoint_path, on_epoch_end=on_epoch_end,
                                          progress=self.progress and main, desc="batch ensemble",
                                          distributed=distributed)
        self.train_seconds = self.fit_info["train_seconds"]
        self.network.eval()
        self.fitted = True
        return self

    def member_log_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(E, N, C) member log-probabilities: x tiled member-major, one forward pass per chunk."""
        self._check_fitted()
        x = self._check_x(x)
        return member_log_probs(self.network, x, self.ensemble_size, self.config.eval_batch_size,
                                device=self.config.device)

    def _extra_state(self):
        return {"hparams": self.hparams}

    def _load_extra_state(self, extra):
        self.hparams = dict(extra.get("hparams", {}))
