"""Hyper-deep ensembles (docs/method.md section 4, the paper's Algorithm 1).

hyper_ens(kappa, K): random search over kappa hyperparameter settings, all trained from the SAME
    init seed; greedy selection (with replacement) of K members on validation NLL.
hyper_deep_ens(kappa, K): hyper_ens, then stratification: every distinct selected setting is
    trained from K different inits (the search's model is the first of them); greedy selection of
    K members again from the union. Repeated choices act as integer weights in the average.
"""
from __future__ import annotations

import torch

from hyperkern.ensembles._common import TrainConfig
from hyperkern.ensembles.deep import _PlainMembers, default_search_space
from hyperkern.ensembles.search import data_fingerprint, make_task, require_some, run_trials
from hyperkern.ensembles.selection import greedy_selection
from hyperkern.nn.hparams import HyperParameterSpace

__all__ = ["HyperDeepEnsemble"]


class HyperDeepEnsemble(_PlainMembers):
    """Hyper-deep ensemble: random search with a fixed init, greedy selection, stratification over
    seeds, greedy selection again.

    Args:
        model: a hyperkern.models name or a ModelSpec.
        ensemble_size: K, the most members chosen (greedy selection may stop earlier).
        budget: kappa, the number of random-search trials.
        search_space: a HyperParameterSpace (names: the model's L2 groups, "dropout",
            "label_smoothing"; log-uniform); default default_search_space(model).
        config: TrainConfig for every trial. seed: the fixed init seed of the search (also the seed
            of the hyperparameter draws); stratification uses seeds seed+1 .. seed+K-1.
        stratify: False gives hyper_ens (no stratification).
        run_dir: directory making the search resumable (one file per finished trial).
        executor: "local", "process", "ray" or an Executor. num_classes, progress: as DeepEnsemble.
            A trial that fails on all its attempts is recorded (failed_trials, run_dir/failed/, a
            RuntimeWarning) and selection proceeds without it; TrialsFailedError if no search trial
            finished.

    After fit: members / member_weights (repeats of the final selection as weights), search_trials
    (every trial's hyperparameters and validation NLL), first_selection and final_selection (trial
    ids in order of selection), trained_trial_ids / loaded_trial_ids (this call / from run_dir),
    failed_trials (records of the trials that failed in this call).
    """

    def __init__(self, model="mlp", ensemble_size: int = 4, budget: int = 20,
                 search_space: HyperParameterSpace | None = None, config: TrainConfig | None = None, seed: int = 0,
                 stratify: bool = True, run_dir: str | None = None, executor="local", num_classes: int | None = None,
                 progress: bool = True):
        self._init_common(model, ensemble_size, config, seed, run_dir, executor, progress)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int (the number of search trials), got {budget!r}")
        if search_space is not None and not isinstance(search_space, HyperParameterSpace):
            raise TypeError(f"search_space must be a HyperParameterSpace, got {type(search_space).__name__}")
        self.budget = budget
        self.search_space = search_space
        self.stratify = bool(stratify)
        self.num_classes = num_classes
        self.search_trials: list[dict] = []
        self.first_selection: list[str] = []
        self.final_selection: list[str] = []

    def search_settings(self, space: HyperParameterSpace) -> list[dict]:
        """The budget hyperparameter settings of the random search: log-uniform draws from a generator
        seeded by seed (the same list on every call, which is what lets a search resume)."""
        g = torch.Generator().manual_seed(self.seed)
        draws = space.sample(self.budget, generator=g, dtype=torch.float64)
        return [space.to_dict(row) for row in draws]

    def fit(self, train, val):
        """Run the search on train, select on val (needed: selection is by validation NLL). Returns self."""
        x, y, xv, yv = self._prepare(train, val, self.num_classes)
        space = self.search_space or default_search_space(self.model_spec)
        settings = self.search_settings(space)
        identity = {"method": "hyper_deep", "model": self.model_spec.to_dict(), "config": self.config.to_dict(),
                    "space": [list(h) for h in space], "budget": self.budget, "ensemble_size": self.ensemble_size,
                    "seed": self.seed, "stratify": self.stratify, "data": data_fingerprint(x, y, xv, yv)}
        run_dir = self._run_dir(identity)
        shared = {"train": (x, y), "val": (xv, yv)}
        inner_bars = self.progress and self.executor.name == "local"
        K = self.ensemble_size

        # 1. random search, fixed init seed, then greedy selection with replacement
        search_tasks = [make_task(f"search-{i:03d}", self.model_spec, self.config, hp, self.seed, self.seed,
                                  progress=inner_bars) for i, hp in enumerate(settings)]
        results, trained, loaded, failed = run_trials(search_tasks, shared, self.executor, run_dir,
                                                      progress=self.progress,
                                                      desc=f"hyper-deep search ({self.budget} trials)")
        require_some(results, failed, "hyper-deep search")
        finished = [i for i, t in enumerate(search_tasks) if t["trial_id"] in results]  # failed ones left out
        search = [results[search_tasks[i]["trial_id"]] for i in finished]
        first = greedy_selection(torch.stack([r["val_log_probs"] for r in search]), yv, K, replacement=True)
        self.first_selection = [search[i]["trial_id"] for i in first]
        self.search_trials = [{"trial_id": r["trial_id"], "hparams": dict(r["hparams"]),
                               "val_nll": float(-r["val_log_probs"].double().gather(1, yv[:, None]).mean())}
                              for r in search]
        distinct = list(dict.fromkeys(finished[i] for i in first))  # selected settings (search indices), in order

        # 2. stratification: each selected setting from K inits (the search's model is init 0)
        pool = []
        if self.stratify and K > 1:
            strat_tasks = [make_task(f"stratify-{i:03d}-seed{j}", self.model_spec, self.config, settings[i],
                                     self.seed + j, self.seed + j, progress=inner_bars)
                           for i in distinct for j in range(1, K)]
            strat, trained2, loaded2, failed2 = run_trials(strat_tasks, shared, self.executor, run_dir,
                                                           progress=self.progress,
                                                           desc=f"hyper-deep stratification ({len(strat_tasks)} trials)")
            trained, loaded, failed = trained + trained2, loaded + loaded2, {**failed, **failed2}
            for i in distinct:
                pool.append(results[search_tasks[i]["trial_id"]])
                pool.extend(strat[f"stratify-{i:03d}-seed{j}"] for j in range(1, K)
                            if f"stratify-{i:03d}-seed{j}" in strat)
            final = greedy_selection(torch.stack([r["val_log_probs"] for r in pool]), yv, K, replacement=True)
        else:
            pool, final = search, first
        self.trained_trial_ids, self.loaded_trial_ids = trained, loaded
        self.failed_trials = [failed[t] for t in sorted(failed)]
        self.trial_seconds = {r["trial_id"]: float(r["train_seconds"]) for r in search + pool}
        self.final_selection = [pool[i]["trial_id"] for i in final]
        chosen = list(dict.fromkeys(final))
        counts = [final.count(i) for i in chosen]
        self._pool = pool
        self._set_members([pool[i] for i in chosen], counts)
        self.space = space
        return self

    @property
    def train_seconds(self) -> float:
        """Training time of every trial the method needed (search and stratification)."""
        trial_seconds = getattr(self, "trial_seconds", None)
        return sum(trial_seconds.values()) if trial_seconds else sum(m["train_seconds"] for m in self.members)

    def stratified_members(self, trial_id: str) -> list[dict]:
        """The K networks of the setting of search trial trial_id (itself and its stratified seeds), as
        trial results; available after fit for settings chosen by the first selection."""
        prefix = trial_id.replace("search-", "stratify-") + "-seed"
        return [r for r in getattr(self, "_pool", []) if r["trial_id"] == trial_id or r["trial_id"].startswith(prefix)]

    def _extra_state(self):
        return {"search_trials": self.search_trials, "first_selection": self.first_selection,
                "final_selection": self.final_selection, "budget": self.budget,
                "trial_seconds": getattr(self, "trial_seconds", {}), "failed_trials": self.failed_trials}

    def _load_extra_state(self, extra):
        self.search_trials = list(extra.get("search_trials", []))
        self.first_selection = list(extra.get("first_selection", []))
        self.final_selection = list(extra.get("final_selection", []))
        self.budget = int(extra.get("budget", 0))
        self.trial_seconds = dict(extra.get("trial_seconds", {}))
        self.failed_trials = list(extra.get("failed_trials", []))
