"""Trials and run directories: the resumable machinery behind deep and hyper-deep ensembles.

A trial trains one plain network (hyperparameters, init seed, data-order seed) and returns its
weights and validation log-probabilities. A run directory holds:

    run.json                 what the run is (model, data fingerprint, training config, search
                             settings); a different run in the same directory is refused
    trials/<trial_id>.pt     one file per finished trial, written atomically (tmp + os.replace)
    checkpoints/<id>.pt      the epoch checkpoint of a trial in progress (removed when it finishes)
    failed/<trial_id>.json   a trial that raised on every attempt: its error, traceback, attempts
                             (removed when a later run finishes the trial)

Running the same command with the same directory again skips every finished trial and resumes a
trial in progress from its last epoch, so a killed search loses at most one epoch of one trial.
Trials recorded as failed are tried again (a failure can be transient: a lost node, memory).
Whatever executor runs the trials (local, process pool, Ray), the driver writes these files.
Trial files are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
import warnings

import torch

from hyperkern.ensembles._common import (ModelSpec, TrainConfig, atomic_save, count_parameters, load_checkpoint,
                                         seeded)
from hyperkern.ensembles._loop import member_log_probs, train_network
from hyperkern.ensembles.executors import TrialFailure, TrialsFailedError

__all__ = ["RunDirectory", "run_member_trial", "run_trials", "data_fingerprint"]


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of the tensors' shapes, dtypes and bytes (identifies the data a run trained on)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class RunDirectory:
    """A run directory (see the module docstring). identity: a JSON-able dict describing the run;
    trials=False for single-network trainers (only run.json and their checkpoint.pt)."""

    def __init__(self, path: str, identity: dict, trials: bool = True):
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        if trials:
            for sub in ("trials", "checkpoints", "failed"):
                os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        identity = json.loads(json.dumps(identity, sort_keys=True))  # normalise (tuples -> lists)
        meta = os.path.join(self.path, "run.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                existing = json.load(f)
            if existing != identity:
                diff = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
                raise ValueError(f"{self.path} holds a different run (differs in {diff}); use another directory "
                                 "or delete this one to start over")
        else:
            tmp = f"{meta}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(identity, f, indent=1, sort_keys=True)
            os.replace(tmp, meta)
        # temporary files of writers that were killed mid-write
        for stale in glob.glob(os.path.join(self.path, "*.tmp-*")) + glob.glob(os.path.join(self.path, "*", "*.tmp-*")):
            try:
                os.remove(stale)
            except OSError:
                pass

    def trial_path(self, trial_id: str) -> str:
        return os.path.join(self.path, "trials", f"{trial_id}.pt")

    def checkpoint_path(self, trial_id: str) -> str:
        return os.path.join(self.path, "checkpoints", f"{trial_id}.pt")

    def finished(self) -> list[str]:
        return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(self.path, "trials", "*.pt")))

    def has(self, trial_id: str) -> bool:
        return os.path.isfile(self.trial_path(trial_id))

    def load(self, trial_id: str) -> dict:
        return load_checkpoint(self.trial_path(trial_id))

    def save(self, result: dict) -> None:
        atomic_save(result, self.trial_path(result["trial_id"]))
        for stale in (self.checkpoint_path(result["trial_id"]), self.failure_path(result["trial_id"])):
            if os.path.isfile(stale):
                os.remove(stale)

    def failure_path(self, trial_id: str) -> str:
        return os.path.join(self.path, "failed", f"{trial_id}.json")

    def record_failure(self, task: dict, failure: TrialFailure) -> dict:
        """Write failed/<trial_id>.json atomically: the trial, its hyperparameters and seeds, the error
        and traceback of its last attempt, and how many attempts it had. Returns the record."""
        record = {"trial_id": task["trial_id"], "hparams": dict(task.get("hparams", {})),
                  "init_seed": task.get("init_seed"), "data_seed": task.get("data_seed"),
                  **failure.to_dict(), "failed_at": time.time()}
        path = self.failure_path(task["trial_id"])
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return record

    def failures(self) -> dict[str, dict]:
        """{trial_id: record} of the trials recorded as failed (and not finished since)."""
        out = {}
        for path in sorted(glob.glob(os.path.join(self.path, "failed", "*.json"))):
            with open(path) as f:
                record = json.load(f)
            out[record["trial_id"]] = record
        return out


def make_task(trial_id: str, spec: ModelSpec, config: TrainConfig, hparams: dict, init_seed: int, data_seed: int,
              *, checkpoint_path: str | None = None, progress: bool = False) -> dict:
    """A trial description: plain data only (it travels to worker processes)."""
    return {"trial_id": trial_id, "model": spec.to_dict(), "config": config.to_dict(),
            "hparams": {k: float(v) for k, v in hparams.items()}, "init_seed": int(init_seed),
            "data_seed": int(data_seed), "checkpoint_path": checkpoint_path, "progress": bool(progress)}


def build_member(spec: ModelSpec, hparams: dict, init_seed: int | None = None):
    """The plain network of one trial (dropout rate from hparams), initialised from init_seed."""
    kwargs = {"dropout": float(hparams["dropout"])} if "dropout" in hparams else {}
    if init_seed is None:
        return spec.build("plain", 1, **kwargs)
    with seeded(init_seed):
        return spec.build("plain", 1, **kwargs)


def run_member_trial(task: dict, shared: dict) -> dict:
    """Train one plain network as task describes on shared["train"]; return its weights and its
    validation log-probabilities (shared["val"]). Deterministic in the task (init and data seeds,
    dropout from a seed derived from both), whatever process runs it."""
    spec = ModelSpec.from_dict(task["model"])
    config = TrainConfig.from_dict(task["config"])
    hparams = task["hparams"]
    (x, y), (xv, _) = shared["train"], shared["val"]
    model = build_member(spec, hparams, task["init_seed"])
    with seeded(task["init_seed"] * 1_000_003 + task["data_seed"]):
        info = train_network(model, x, y, config, hparams, data_seed=task["data_seed"],
                             checkpoint_path=task.get("checkpoint_path"), progress=task.get("progress", False),
                             desc=task["trial_id"])
    seconds = info["train_seconds"]
    val_lp = member_log_probs(model, xv, 1, config.eval_batch_size, device=config.device)[0]
    return {"trial_id": task["trial_id"], "hparams": dict(hparams), "init_seed": task["init_seed"],
            "data_seed": task["data_seed"], "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "val_log_probs": val_lp, "train_seconds": seconds, "num_parameters": count_parameters(model),
            "resumed_from_epoch": info["resumed_from_epoch"], "pid": os.getpid(), "finished_at": time.time()}


def check_trial_file(result, path: str, task: dict, shared: dict) -> dict:
    """A trial read back from its file, checked against what the run expects of it: a dict for this
    trial with a state_dict and val_log_probs, a floating (N_val, num_classes) tensor. Anything else is
    a ValueError naming the file (a corrupt file, or one copied from another run), rather than an error
    deep inside the selection that stacks the trials."""
    def refuse(problem):
        raise ValueError(f"{path}: not a usable trial file ({problem}); it is corrupt or from another run: "
                         "delete it to train the trial again")

    if not isinstance(result, dict):
        refuse(f"holds a {type(result).__name__}, expected a dict")
    missing = [k for k in ("trial_id", "hparams", "state_dict", "val_log_probs") if k not in result]
    if missing:
        refuse(f"missing {missing}")
    if result["trial_id"] != task["trial_id"]:
        refuse(f"trial_id {result['trial_id']!r}, expected {task['trial_id']!r}")
    if not isinstance(result["state_dict"], dict):
        refuse(f"state_dict is a {type(result['state_dict']).__name__}")
    lp = result["val_log_probs"]
    rows = int(shared["val"][0].shape[0])
    classes = int(task["model"]["num_classes"]) if isinstance(task.get("model"), dict) and \
        "num_classes" in task["model"] else None
    if not isinstance(lp, torch.Tensor) or not lp.is_floating_point():
        refuse(f"val_log_probs is {type(lp).__name__}{'' if not isinstance(lp, torch.Tensor) else f' {lp.dtype}'}, "
               "expected a floating tensor")
    if lp.dim() != 2 or lp.shape[0] != rows or (classes is not None and lp.shape[1] != classes):
        refuse(f"val_log_probs has shape {tuple(lp.shape)}, expected ({rows}, "
               f"{classes if classes is not None else 'num_classes'}): one row of log-probabilities per "
               "validation example")
    return result


def run_trials(tasks: list[dict], shared: dict, executor, run_dir: RunDirectory | None, *, progress: bool,
               desc: str) -> tuple[dict[str, dict], list[str], list[str], dict[str, dict]]:
    """Run the tasks not yet finished in run_dir on executor, saving each as it finishes.

    A trial that fails on all its attempts (the executor's max_retries) is recorded in
    run_dir/failed/<trial_id>.json, reported with a RuntimeWarning and left out of the results.
    Epoch checkpoints go into run_dir only when the executor's trials share this filesystem.

    Returns ({trial_id: result} of the finished trials, ids trained by this call, ids loaded from
    run_dir, {trial_id: failure record} of the trials that failed in this call)."""
    from hyperkern.ensembles._common import progress_bar

    results, loaded = {}, []
    todo = []
    for task in tasks:
        if run_dir is not None and run_dir.has(task["trial_id"]):
            results[task["trial_id"]] = check_trial_file(run_dir.load(task["trial_id"]),
                                                         run_dir.trial_path(task["trial_id"]), task, shared)
            loaded.append(task["trial_id"])
        else:
            todo.append(task)
    shares_filesystem = getattr(executor, "shares_filesystem", lambda: True)
    if run_dir is not None and todo and shares_filesystem():
        todo = [dict(task, checkpoint_path=run_dir.checkpoint_path(task["trial_id"])) for task in todo]
    trained, failed = [], {}
    bar = progress_bar(total=len(tasks), initial=len(loaded), enabled=progress, desc=desc)
    try:
        for task, outcome in executor.run(run_member_trial, todo, shared):
            if isinstance(outcome, TrialFailure):
                failed[task["trial_id"]] = (run_dir.record_failure(task, outcome) if run_dir is not None else
                                            {"trial_id": task["trial_id"], "hparams": dict(task["hparams"]),
                                             "init_seed": task["init_seed"], "data_seed": task["data_seed"],
                                             **outcome.to_dict()})
            else:
                if run_dir is not None:
                    run_dir.save(outcome)
                results[task["trial_id"]] = outcome
                trained.append(task["trial_id"])
            bar.update(1)
    finally:
        bar.close()
    if failed:
        lines = "; ".join(f"{tid} ({rec['error']}, {rec['attempts']} attempts)" for tid, rec in sorted(failed.items()))
        where = f" (records in {os.path.join(run_dir.path, 'failed')})" if run_dir is not None else ""
        warnings.warn(f"{desc}: {len(failed)} of {len(tasks)} trials failed and are left out{where}: {lines}",
                      RuntimeWarning, stacklevel=2)
    return results, trained, loaded, failed


def require_some(results: dict, failed: dict, desc: str) -> None:
    """Raise TrialsFailedError (with the first failure's traceback) when no trial finished."""
    if results or not failed:
        return
    first = failed[sorted(failed)[0]]
    raise TrialsFailedError(f"{desc}: every trial failed ({len(failed)}); the first, {first['trial_id']}, after "
                            f"{first['attempts']} attempts: {first['error']}\n{first.get('traceback', '')}", failed)
