"""Hyper-deep ensembles: Algorithm 1's structure, and the resumable search (a real SIGKILL mid-search)."""
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hyperkern.ensembles import HyperDeepEnsemble, ModelSpec, RunDirectory, TrainConfig, greedy_selection
from hyperkern.ensembles.search import build_member

SPEC = ModelSpec("mlp", 10, (1, 8, 8), {"backend": "torch", "hidden_features": (16,)})


pytestmark = pytest.mark.usefixtures("one_thread")



def test_fixed_init_seed_gives_identical_initial_weights():
    a = build_member(SPEC, {"dropout": 0.3, "l2_hidden1": 1.0}, init_seed=4)
    b = build_member(SPEC, {"dropout": 0.01, "l2_hidden1": 50.0}, init_seed=4)
    c = build_member(SPEC, {"dropout": 0.3}, init_seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.hidden[0].weight, c.hidden[0].weight)
    assert a.dropout == 0.3 and b.dropout == 0.01


def test_hyper_deep_follows_algorithm_1(digits, tmp_path):
    train, val, test = digits
    K = 3
    h = HyperDeepEnsemble(SPEC, K, budget=5, config=TrainConfig(epochs=2, batch_size=32), seed=9,
                          run_dir=str(tmp_path / "run"), progress=False).fit(train, val)
    run = RunDirectory(str(tmp_path / "run"), json.load(open(tmp_path / "run" / "run.json")))
    search = [run.load(f"search-{i:03d}") for i in range(5)]
    # random search: five different log-uniform settings, one fixed init seed
    assert len({json.dumps(t["hparams"], sort_keys=True) for t in search}) == 5
    assert {t["init_seed"] for t in search} == {9}
    assert set(search[0]["hparams"]) == {"l2_hidden1", "l2_dense_kernel", "l2_dense_bias", "dropout",
                                         "label_smoothing"}
    space = h.space
    for t in search:
        for name, value in t["hparams"].items():
            assert space[name].low <= value <= space[name].high
    # first greedy selection (with replacement) on validation NLL
    first = greedy_selection(torch.stack([t["val_log_probs"] for t in search]), val.y, K)
    assert h.first_selection == [f"search-{i:03d}" for i in first]
    # stratification: each distinct selected setting trained from K inits (the search model is init 0)
    distinct = list(dict.fromkeys(first))
    for i in distinct:
        group = h.stratified_members(f"search-{i:03d}")
        assert [g["init_seed"] for g in group] == [9 + j for j in range(K)]
        assert all(g["hparams"] == search[i]["hparams"] for g in group)
    # second selection from the union; repeats become weights
    pool = [g for i in distinct for g in h.stratified_members(f"search-{i:03d}")]
    final = greedy_selection(torch.stack([g["val_log_probs"] for g in pool]), val.y, K)
    assert h.final_selection == [pool[i]["trial_id"] for i in final]
    assert float(h.member_weights.sum()) == len(final)
    assert [m["trial_id"] for m in h.members] == list(dict.fromkeys(h.final_selection))
    # the prediction is the weighted mean of the chosen members
    probs = h.member_proba(test.x)
    w = h.member_weights.float() / h.member_weights.sum()
    torch.testing.assert_close(h.predict_proba(test.x), (w[:, None, None] * probs).sum(0), rtol=1e-5, atol=1e-6)
    assert len(h.trained_trial_ids) == 5 + len(distinct) * (K - 1) and h.loaded_trial_ids == []
    # save / load
    h.save(tmp_path / "hd.pt")
    again = HyperDeepEnsemble.load(tmp_path / "hd.pt")
    assert torch.equal(again.predict_proba(test.x), h.predict_proba(test.x))
    assert again.final_selection == h.final_selection
    # the same call again loads every trial and trains none
    h2 = HyperDeepEnsemble(SPEC, K, budget=5, config=TrainConfig(epochs=2, batch_size=32), seed=9,
                           run_dir=str(tmp_path / "run"), progress=False).fit(train, val)
    assert h2.trained_trial_ids == [] and sorted(h2.loaded_trial_ids) == sorted(h.trained_trial_ids)
    assert torch.equal(h2.predict_proba(test.x), h.predict_proba(test.x))
    # a different run in the same directory is refused
    with pytest.raises(ValueError, match="holds a different run .*budget"):
        HyperDeepEnsemble(SPEC, K, budget=6, config=TrainConfig(epochs=2, batch_size=32), seed=9,
                          run_dir=str(tmp_path / "run"), progress=False).fit(train, val)


SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    import hyperkern.ensembles._loop as loop
    from hyperkern.data import load_digits
    from hyperkern.ensembles import HyperDeepEnsemble, ModelSpec, TrainConfig

    run_dir, out, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
    if slow:  # stretch every epoch so the parent can kill the search in the middle of a trial
        real_save = loop.atomic_save
        def slow_save(obj, path):
            real_save(obj, path)
            time.sleep(0.15)
        loop.atomic_save = slow_save
    d = load_digits(seed=0)
    train, val, test = d.train.subset(slice(0, 200)), d.val.subset(slice(0, 80)), d.test.subset(slice(0, 80))
    spec = ModelSpec("mlp", 10, (1, 8, 8), {"backend": "torch", "hidden_features": (16,)})
    h = HyperDeepEnsemble(spec, 2, budget=5, config=TrainConfig(epochs=3, batch_size=32), seed=0,
                          run_dir=run_dir, progress=False).fit(train, val)
    json.dump({"trained": h.trained_trial_ids, "loaded": h.loaded_trial_ids, "first": h.first_selection,
               "final": h.final_selection, "weights": h.member_weights.tolist(),
               "probs": h.predict_proba(test.x).tolist()}, open(out, "w"))
""")


def _trial_files(run_dir):
    return {os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(run_dir, "trials", "*.pt"))}


def test_killed_search_resumes_without_losing_or_repeating_trials(tmp_path):
    script = tmp_path / "search.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    killed_dir, clean_dir = str(tmp_path / "killed"), str(tmp_path / "clean")

    proc = subprocess.Popen([sys.executable, str(script), killed_dir, str(tmp_path / "never.json"), "slow"], env=env)
    deadline = time.time() + 120
    in_progress = []
    while time.time() < deadline:
        done = _trial_files(killed_dir) if os.path.isdir(killed_dir) else {}
        in_progress = glob.glob(os.path.join(killed_dir, "checkpoints", "*.pt"))
        if len(done) >= 2 and in_progress:
            break
        assert proc.poll() is None, "the search finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no cleanup, no atexit: the process just stops
    assert proc.wait() == -signal.SIGKILL
    before = _trial_files(killed_dir)
    interrupted = os.path.basename(in_progress[0])[:-3]
    assert 2 <= len(before) < 5 and f"{interrupted}.pt" not in before
    assert not (tmp_path / "never.json").exists()

    # resume the killed search, and run an uninterrupted one in a fresh directory (side by side)
    runs = [subprocess.Popen([sys.executable, str(script), run_dir, str(tmp_path / out), "fast"], env=env)
            for run_dir, out in ((killed_dir, "resumed.json"), (clean_dir, "clean.json"))]
    assert [r.wait(timeout=300) for r in runs] == [0, 0]
    resumed = json.load(open(tmp_path / "resumed.json"))
    clean = json.load(open(tmp_path / "clean.json"))

    finished_before = sorted(name[:-3] for name in before)
    # no trial lost, none repeated: the resumed run loaded exactly the finished ones and trained the rest
    assert sorted(resumed["loaded"]) == finished_before
    assert not set(resumed["loaded"]) & set(resumed["trained"])
    assert sorted(resumed["loaded"] + resumed["trained"]) == sorted(clean["trained"])
    assert clean["loaded"] == []
    after = _trial_files(killed_dir)
    assert all(after[name] == data for name, data in before.items())  # finished trials never rewritten
    # the trial killed mid-training resumed from its epoch checkpoint
    run = RunDirectory(killed_dir, json.load(open(os.path.join(killed_dir, "run.json"))))
    assert run.load(interrupted)["resumed_from_epoch"] >= 1
    assert glob.glob(os.path.join(killed_dir, "checkpoints", "*")) == []
    assert glob.glob(os.path.join(killed_dir, "*", "*.tmp-*")) == []
    # and the final ensemble equals the uninterrupted run's, bit for bit
    assert resumed["first"] == clean["first"] and resumed["final"] == clean["final"]
    assert resumed["weights"] == clean["weights"]
    assert resumed["probs"] == clean["probs"]


def test_malformed_trial_file_is_named(digits, tmp_path):
    """A finished trial whose val_log_probs lost its shape (a corrupt file, or one from another run) is
    refused with the file named, not with torch.stack's 'expects each tensor to be equal size'."""
    train, val, _ = digits
    run = str(tmp_path / "run")
    config = TrainConfig(epochs=1, batch_size=64)
    HyperDeepEnsemble(SPEC, 2, budget=2, config=config, seed=3, run_dir=run, stratify=False,
                      progress=False).fit(train, val)
    path = os.path.join(run, "trials", "search-001.pt")
    trial = torch.load(path, weights_only=True)
    for bad in (trial["val_log_probs"][:-1], trial["val_log_probs"][:, :7], trial["val_log_probs"].long(), None):
        torch.save(dict(trial, val_log_probs=bad), path)
        with pytest.raises(ValueError, match=f"{path}: not a usable trial file .*val_log_probs"):
            HyperDeepEnsemble(SPEC, 2, budget=2, config=config, seed=3, run_dir=run, stratify=False,
                              progress=False).fit(train, val)
    torch.save(trial, path)  # intact again: the run resumes, loading both trials
    h = HyperDeepEnsemble(SPEC, 2, budget=2, config=config, seed=3, run_dir=run, stratify=False,
                          progress=False).fit(train, val)
    assert h.trained_trial_ids == [] and len(h.loaded_trial_ids) == 2
