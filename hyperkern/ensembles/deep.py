"""Deep ensembles (E networks of one architecture and one hyperparameter setting, different seeds) and
the machinery shared with hyper-deep ensembles: a weighted set of independently trained plain
networks."""
from __future__ import annotations


import torch

from hyperkern.ensembles._common import (EnsembleBase, ModelSpec, TrainConfig, as_dataset, atomic_save, loaded_config,
                                         load_checkpoint)
from hyperkern.ensembles._loop import member_log_probs
from hyperkern.ensembles.executors import get_executor
from hyperkern.ensembles.search import (RunDirectory, build_member, data_fingerprint, make_task, require_some,
                                        run_trials)
from hyperkern.nn.hparams import HyperParameter, HyperParameterSpace

__all__ = ["DeepEnsemble", "default_hparams", "default_search_space", "resolve_model_spec"]

DEFAULT_L2 = 1.0
DEFAULT_DROPOUT = 0.05
LABEL_SMOOTHING_RANGE = (1e-3, 0.2)


def resolve_model_spec(model, train_y: torch.Tensor, train_x: torch.Tensor, num_classes: int | None = None,
                       val_y: torch.Tensor | None = None) -> ModelSpec:
    """A ModelSpec from a spec or a zoo name; with a name, the input shape comes from the data and the
    number of classes from num_classes or the largest label seen (+1)."""
    if isinstance(model, ModelSpec):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a hyperkern.models name (e.g. 'mlp') or a ModelSpec, got {type(model).__name__}")
    if num_classes is None:
        seen = int(train_y.max()) if val_y is None else max(int(train_y.max()), int(val_y.max()))
        num_classes = seen + 1
    return ModelSpec(model, int(num_classes), tuple(train_x.shape[1:]))


def default_hparams(spec: ModelSpec) -> dict:
    """Untuned defaults: every L2 group at DEFAULT_L2 (divided by n_train in the loss), dropout
    DEFAULT_DROPOUT where the model has dropout, no label smoothing."""
    model = spec.build("plain", 1)
    hparams = {n: DEFAULT_L2 for n in model.l2_group_names}
    if "dropout" in model.hparam_space:
        hparams["dropout"] = DEFAULT_DROPOUT
    hparams["label_smoothing"] = 0.0
    return hparams


def default_search_space(spec: ModelSpec) -> HyperParameterSpace:
    """The model's own space (L2 per layer group and dropout, log-uniform; docs/method.md section 2 ranges)
    plus label smoothing, log-uniform over LABEL_SMOOTHING_RANGE."""
    space = spec.build("plain", 1).hparam_space
    return HyperParameterSpace(list(space) + [HyperParameter("label_smoothing", *LABEL_SMOOTHING_RANGE, True)])


class _PlainMembers(EnsembleBase):
    """A weighted set of plain networks: members (state dicts + hyperparameters), member_weights."""

    def _init_common(self, model, ensemble_size, config, seed, run_dir, executor, progress):
        self._init_base(model, ensemble_size, config, seed, run_dir, progress)
        self.executor = get_executor(executor)
        self.members: list[dict] = []
        self._modules = None
        self.trained_trial_ids: list[str] = []
        self.loaded_trial_ids: list[str] = []
        self.failed_trials: list[dict] = []

    def _prepare(self, train, val, num_classes):
        x, y = as_dataset("train", train)
        xv, yv = as_dataset("val", val)
        if tuple(xv.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"val inputs have shape {tuple(xv.shape[1:])} per row, train {tuple(x.shape[1:])}")
        self.model_spec = resolve_model_spec(self.model, y, x, num_classes, yv)
        return x, y, xv, yv

    def _run_dir(self, identity: dict):
        return None if self.run_dir is None else RunDirectory(self.run_dir, identity)

    def _set_members(self, results: list[dict], weights):
        self.members = [{"trial_id": r["trial_id"], "hparams": dict(r["hparams"]), "init_seed": r["init_seed"],
                         "data_seed": r["data_seed"], "state_dict": r["state_dict"],
                         "train_seconds": float(r["train_seconds"])} for r in results]
        self.member_weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self._modules = None
        self.fitted = True

    def _member_modules(self):
        if self._modules is None:
            modules = []
            for m in self.members:
                net = build_member(self.model_spec, m["hparams"])
                net.load_state_dict(m["state_dict"])
                modules.append(net.to(self.config.device).eval())
            self._modules = modules
        return self._modules

    def member_log_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(E, N, C) log-probabilities of the members (distinct networks; see member_weights)."""
        self._check_fitted()
        x = self._check_x(x)
        return torch.stack([member_log_probs(net, x, 1, self.config.eval_batch_size, device=self.config.device)[0]
                            for net in self._member_modules()])

    def num_parameters(self) -> int:
        """Parameters of all distinct member networks together."""
        self._check_fitted()
        return sum(sum(p.numel() for p in net.parameters()) for net in self._member_modules())

    @property
    def train_seconds(self) -> float:
        return sum(m["train_seconds"] for m in self.members)

    # ---- persistence ----
    def _extra_state(self) -> dict:
        return {}

    def save(self, path: str) -> None:
        """Write the fitted ensemble to path (a torch file of tensors and plain data)."""
        self._check_fitted()
        atomic_save({"kind": f"hyperkern.{type(self).__name__}", "version": 1,
                     "model_spec": self.model_spec.to_dict(), "config": self.config.to_dict(),
                     "ensemble_size": self.ensemble_size, "seed": self.seed, "members": self.members,
                     "member_weights": self.member_weights, "extra": self._extra_state()}, path)

    @classmethod
    def load(cls, path: str, device=None):
        """A fitted ensemble from save(path) (torch.load with weights_only=True), on device (default:
        the one it trained on, or the CPU when that is CUDA and this torch has none)."""
        state = load_checkpoint(path)
        if not isinstance(state, dict) or state.get("kind") != f"hyperkern.{cls.__name__}":
            raise ValueError(f"{path}: not a saved {cls.__name__} (kind {state.get('kind') if isinstance(state, dict) else type(state).__name__!r})")
        spec = ModelSpec.from_dict(state["model_spec"])
        obj = cls.__new__(cls)
        obj._init_common(spec, int(state["ensemble_size"]), loaded_config(state["config"], device, str(path)),
                         state["seed"], None, "local", False)
        obj.model_spec = spec
        obj._set_members(state["members"], state["member_weights"])
        obj._load_extra_state(state.get("extra", {}))
        return obj

    def _load_extra_state(self, extra: dict) -> None:
        pass


class DeepEnsemble(_PlainMembers):
    """E networks of one architecture and hyperparameter setting, trained independently from seeds
    seed, seed+1, ..., seed+E-1 (init and data order); the prediction averages their probabilities.

    Args:
        model: a hyperkern.models name ("mlp", "lenet5", "resnet20", "wrn28_10") or a ModelSpec.
        ensemble_size: E.
        hparams: {L2 group name: strength, "dropout": rate, "label_smoothing": eps}; missing keys take
            default_hparams (the L2 strengths are divided by n_train in the loss).
        config: TrainConfig (epochs, batch size, SGD settings, device).
        seed: base seed. run_dir: optional directory making the training resumable (one trial file per
            finished member, epoch checkpoints for the member in progress).
        executor: "local" (default), "process", "ray", or an Executor: where members train. A member
            that fails on all its attempts is left out (failed_trials, a RuntimeWarning, a record in
            run_dir/failed/); TrialsFailedError if every member failed.
        num_classes: with a model name, the number of classes (default: largest label + 1).
        progress: show progress bars.
    """

    def __init__(self, model="mlp", ensemble_size: int = 4, hparams: dict | None = None,
                 config: TrainConfig | None = None, seed: int = 0, run_dir: str | None = None,
                 executor="local", num_classes: int | None = None, progress: bool = True):
        self._init_common(model, ensemble_size, config, seed, run_dir, executor, progress)
        self.hparams = dict(hparams or {})
        self.num_classes = num_classes

    def fit(self, train, val):
        """Train the E members on train; val is used for nothing but must be given for symmetry with the
        other trainers (it may be the same split as for them). Returns self."""
        x, y, xv, yv = self._prepare(train, val, self.num_classes)
        hparams = {**default_hparams(self.model_spec), **self.hparams}
        tasks = [make_task(f"member-{k}", self.model_spec, self.config, hparams, self.seed + k, self.seed + k,
                           progress=self.progress and self.executor.name == "local")
                 for k in range(self.ensemble_size)]
        run_dir = self._run_dir({"method": "deep", "model": self.model_spec.to_dict(), "config": self.config.to_dict(),
                                 "hparams": hparams, "ensemble_size": self.ensemble_size, "seed": self.seed,
                                 "data": data_fingerprint(x, y, xv, yv)})
        results, self.trained_trial_ids, self.loaded_trial_ids, failed = run_trials(
            tasks, {"train": (x, y), "val": (xv, yv)}, self.executor, run_dir, progress=self.progress,
            desc="deep ensemble")
        require_some(results, failed, "deep ensemble")
        self.failed_trials = [failed[t] for t in sorted(failed)]  # members left out (warned by run_trials)
        self.hparams = hparams
        self._set_members([results[t["trial_id"]] for t in tasks if t["trial_id"] in results], None)
        return self

    @classmethod
    def from_trials(cls, model_spec: ModelSpec, trials: list[dict], config: TrainConfig | None = None,
                    seed: int = 0) -> "DeepEnsemble":
        """A fitted DeepEnsemble made of already trained trial results (e.g. one hyperparameter
        setting's stratified seeds from a HyperDeepEnsemble search; one trial gives a single model)."""
        if not trials:
            raise ValueError("trials must hold at least one trial result")
        obj = cls(model_spec, len(trials), dict(trials[0]["hparams"]), config, seed, progress=False)
        obj.model_spec = model_spec
        obj._set_members(trials, None)
        return obj

    def _extra_state(self):
        return {"hparams": self.hparams}

    def _load_extra_state(self, extra):
        self.hparams = dict(extra.get("hparams", {}))
