"""Trial executors for searches: Ray tasks give the same search and selection as the local executor;
a trial that raises is retried and then recorded as failed (local, process pool, Ray), and a search
proceeds without it.

One local Ray session (num_cpus=2) serves the whole module; the Ray tests skip when ray is missing.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from hyperkern.ensembles import (HyperDeepEnsemble, LocalExecutor, ModelSpec, ProcessExecutor, RayExecutor,
                                 TrainConfig, TrialFailure, TrialsFailedError, default_search_space,
                                 greedy_selection, register_model)
from hyperkern.ensembles.search import RunDirectory

SPEC = ModelSpec("mlp", 10, (1, 8, 8), {"backend": "torch", "hidden_features": (16,)})
CONFIG = TrainConfig(epochs=2, batch_size=32)
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install \"hyperkern[distributed]\")")


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def ray_executor():
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    executor = RayExecutor(num_cpus=2, max_retries=1, init_kwargs={"log_to_driver": False})
    yield executor
    executor.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ---- the Ray search ---------------------------------------------------------------------------

@needs_ray
def test_ray_search_selects_the_same_ensemble_as_the_local_executor(ray_executor, digits, tmp_path):
    train, val, test = digits
    local = HyperDeepEnsemble(SPEC, 2, budget=4, config=CONFIG, seed=3, progress=False).fit(train, val)
    remote = HyperDeepEnsemble(SPEC, 2, budget=4, config=CONFIG, seed=3, run_dir=str(tmp_path / "run"),
                               executor=ray_executor, progress=False).fit(train, val)
    assert ray_executor.shares_filesystem()  # a Ray on this machine: trials may write epoch checkpoints
    assert remote.first_selection == local.first_selection
    assert remote.final_selection == local.final_selection
    assert torch.equal(remote.member_weights, local.member_weights)
    assert remote.search_trials == local.search_trials  # every trial's hparams and validation NLL
    torch.testing.assert_close(remote.predict_proba(test.x), local.predict_proba(test.x), rtol=0, atol=1e-6)
    assert remote.failed_trials == [] and sorted(remote.trained_trial_ids) == sorted(local.trained_trial_ids)
    # persisted as in the local search: one file per trial, written by the driver; they ran in Ray workers
    run = RunDirectory(str(tmp_path / "run"), json.load(open(tmp_path / "run" / "run.json")))
    assert run.finished() == sorted(remote.trained_trial_ids)
    assert all(run.load(t)["pid"] != os.getpid() for t in run.finished())
    assert os.listdir(tmp_path / "run" / "checkpoints") == [] and os.listdir(tmp_path / "run" / "failed") == []
    # resuming with Ray loads every trial and trains none
    again = HyperDeepEnsemble(SPEC, 2, budget=4, config=CONFIG, seed=3, run_dir=str(tmp_path / "run"),
                              executor=ray_executor, progress=False).fit(train, val)
    assert again.trained_trial_ids == [] and again.final_selection == local.final_selection


# ---- retries and failures, on each executor -------------------------------------------------

def _flaky_trial(task, shared):
    """'flaky' raises on its first attempt, 'broken' always, 'dies' kills its process on its first
    attempt; each attempt leaves a line in shared['dir']/<name>.attempts."""
    name = task["trial_id"]
    path = os.path.join(shared["dir"], f"{name}.attempts")
    with open(path, "a") as f:
        f.write("x\n")
    with open(path) as f:
        attempt = len(f.readlines())
    if name == "broken" or (name == "flaky" and attempt == 1):
        raise ValueError(f"{name} failed on attempt {attempt}")
    if name == "dies" and attempt == 1:
        os._exit(3)
    return {"trial_id": name, "value": task["value"] * 2, "attempt": attempt}


def _attempts(tmp_path, name):
    path = tmp_path / f"{name}.attempts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _executor(kind, request):
    if kind == "local":
        return LocalExecutor(max_retries=2)
    if kind == "process":
        # one worker: a dying worker then breaks no other trial's attempt (with more, each trial in
        # flight when the pool breaks counts an attempt), so every count below is exact
        return ProcessExecutor(max_workers=1, threads_per_worker=1, max_retries=2)
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install \"hyperkern[distributed]\")")
    executor = request.getfixturevalue("ray_executor")
    executor.max_retries = 2
    request.addfinalizer(lambda: setattr(executor, "max_retries", 1))
    return executor


@pytest.mark.parametrize("kind", ["local", "process", "ray"])
def test_a_trial_that_raises_is_retried_then_reported_as_failed(kind, request, tmp_path):
    executor = _executor(kind, request)
    names = ["ok", "flaky", "broken"] + (["dies"] if kind == "process" else [])
    tasks = [{"trial_id": n, "value": i} for i, n in enumerate(names)]
    outcomes = {task["trial_id"]: outcome for task, outcome in executor.run(_flaky_trial, tasks, {"dir": str(tmp_path)})}
    assert sorted(outcomes) == sorted(names)  # nothing dropped
    assert outcomes["ok"]["value"] == 0 and outcomes["flaky"]["value"] == 2
    assert outcomes["flaky"]["attempt"] == _attempts(tmp_path, "flaky") == 2  # retried after its failure
    failure = outcomes["broken"]
    assert isinstance(failure, TrialFailure)
    assert failure.attempts == 3 and "ValueError: broken failed on attempt" in failure.error
    assert "broken failed on attempt" in failure.traceback
    assert _attempts(tmp_path, "broken") == 3 and _attempts(tmp_path, "ok") == 1
    if kind == "process":  # a worker that died broke the pool: it was restarted and the trial ran again
        assert outcomes["dies"]["value"] == 6 and _attempts(tmp_path, "dies") == 2


# ---- a search with failing trials -------------------------------------------------------------

FRAGILE_LIMIT = {"dropout": 1.0}
BUILDS_WITH_DROPOUT: list[float] = []


def _fragile_mlp(num_classes, in_features, *, variant="plain", ensemble_size=1, dropout=0.0, **kwargs):
    """The zoo MLP, except that building it with dropout above FRAGILE_LIMIT raises (a trial that
    fails deterministically, on every attempt)."""
    from hyperkern.models import mlp

    if "dropout" in kwargs or dropout:
        BUILDS_WITH_DROPOUT.append(float(dropout))
    if dropout > FRAGILE_LIMIT["dropout"]:
        raise FloatingPointError(f"dropout {dropout:.3f} diverged")
    return mlp(num_classes=num_classes, in_features=in_features, variant=variant, ensemble_size=ensemble_size,
               dropout=dropout, **kwargs)


register_model("fragile_mlp", _fragile_mlp)
FRAGILE = ModelSpec("fragile_mlp", 10, (1, 8, 8), {"backend": "torch", "hidden_features": (16,)})


def test_search_records_failed_trials_and_selects_without_them(digits, tmp_path, monkeypatch):
    train, val, _ = digits
    budget, K = 5, 2
    settings = HyperDeepEnsemble(FRAGILE, K, budget=budget, seed=1).search_settings(default_search_space(FRAGILE))
    dropouts = sorted(s["dropout"] for s in settings)
    monkeypatch.setitem(FRAGILE_LIMIT, "dropout", (dropouts[2] + dropouts[3]) / 2)  # the two largest fail
    failing = sorted(f"search-{i:03d}" for i, s in enumerate(settings) if s["dropout"] > FRAGILE_LIMIT["dropout"])
    BUILDS_WITH_DROPOUT.clear()

    def fit():
        return HyperDeepEnsemble(FRAGILE, K, budget=budget, config=CONFIG, seed=1, run_dir=str(tmp_path / "run"),
                                 executor=LocalExecutor(max_retries=1), progress=False).fit(train, val)

    with pytest.warns(RuntimeWarning, match="2 of 5 trials failed and are left out"):
        h = fit()
    assert [f["trial_id"] for f in h.failed_trials] == failing
    assert all(f["attempts"] == 2 and f["error"].startswith("FloatingPointError: dropout") for f in h.failed_trials)
    assert len([d for d in BUILDS_WITH_DROPOUT if d > FRAGILE_LIMIT["dropout"]]) == 2 * 2  # two attempts each
    # recorded in the run directory, never silently dropped
    run = RunDirectory(str(tmp_path / "run"), json.load(open(tmp_path / "run" / "run.json")))
    records = run.failures()
    assert sorted(records) == failing
    assert all("FloatingPointError" in r["traceback"] and r["hparams"]["dropout"] > FRAGILE_LIMIT["dropout"]
               for r in records.values())
    # selection ran over the trials that finished
    finished = [f"search-{i:03d}" for i in range(budget) if f"search-{i:03d}" not in failing]
    assert [t["trial_id"] for t in h.search_trials] == finished
    pool = torch.stack([run.load(t)["val_log_probs"] for t in finished])
    assert h.first_selection == [finished[i] for i in greedy_selection(pool, val.y, K)]
    assert not set(h.final_selection) & set(failing)
    # the same command again retries only the failed trials (a failure may be transient)
    monkeypatch.setitem(FRAGILE_LIMIT, "dropout", 1.0)
    again = fit()
    assert again.failed_trials == [] and run.failures() == {} and set(failing) <= set(run.finished())
    assert set(failing) <= set(again.trained_trial_ids)  # (and any stratification their selection needs)
    assert set(finished) <= set(again.loaded_trial_ids) and not set(again.trained_trial_ids) & set(h.trained_trial_ids)


def test_a_search_where_every_trial_fails_raises(digits, tmp_path, monkeypatch):
    train, val, _ = digits
    monkeypatch.setitem(FRAGILE_LIMIT, "dropout", 0.0)
    with pytest.warns(RuntimeWarning, match="3 of 3 trials failed"):
        with pytest.raises(TrialsFailedError, match="every trial failed .*FloatingPointError: dropout") as info:
            HyperDeepEnsemble(FRAGILE, 2, budget=3, config=CONFIG, seed=1, run_dir=str(tmp_path / "run"),
                              executor=LocalExecutor(max_retries=0), progress=False).fit(train, val)
    assert sorted(info.value.failures) == ["search-000", "search-001", "search-002"]
    assert len(os.listdir(tmp_path / "run" / "failed")) == 3


def test_executor_arguments_are_checked():
    with pytest.raises(ValueError, match="max_retries must be a non-negative int"):
        LocalExecutor(max_retries=-1)
    with pytest.raises(ValueError, match="num_cpus must be a positive int"):
        RayExecutor(num_cpus=0)
    # ray stays an optional, lazy import: the package and a RayExecutor's construction never import it
    code = ("import sys, hyperkern.ensembles as e; e.RayExecutor(num_cpus=2); e.get_executor('ray'); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
