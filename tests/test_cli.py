import json
import os
import subprocess
import sys

import pytest
import torch

from hyperkern.cli import main
from hyperkern.ensembles import BatchEnsembleTrainer, DeepEnsemble

TINY = ["--epochs", "1", "-E", "2", "--no-progress", "--backend", "torch"]


pytestmark = pytest.mark.usefixtures("keep_threads")


def test_compare_prints_table_writes_json_and_diagram_and_resumes(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the reliability diagram needs the [plot] extra")
    out = tmp_path / "cmp"
    assert main(["compare", "--budget", "3", "--output-dir", str(out)] + TINY) == 0
    text = capsys.readouterr().out
    for label in ("single model", "deep ensemble", "batch ensemble", "hyper-deep ensemble", "hyper-batch ensemble"):
        assert label in text
    for column in ("accuracy", "NLL", "ECE", "Brier", "parameters", "train time"):
        assert column in text
    result = json.load(open(out / "results.json"))
    assert result["dataset"] == "digits" and result["ensemble_size"] == 2 and result["budget"] == 3
    assert set(result["methods"]) == {"single", "deep", "batch", "hyper_deep", "hyper_batch"}
    for name, row in result["methods"].items():
        assert 0 < row["accuracy"] <= 1 and row["nll"] > 0 and 0 <= row["ece"] <= 1 and row["num_parameters"] > 0
    # parameter counts: the MLP 64-200-200-10 has 55,210; a deep ensemble of 2 twice that
    assert result["methods"]["single"]["num_parameters"] == 55_210
    assert result["methods"]["deep"]["num_parameters"] == 2 * 55_210
    assert len(result["hyper_deep"]["search_trials"]) == 3 and len(result["hyper_batch"]["member_hparams"]) == 2
    assert open(out / "reliability.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # fast-weight inits: the reference's 0.5 for the batch ensemble, 0.25 for hyper-batch on digits
    assert result["fast_init_std"] == {"batch": 0.5, "hyper_batch": 0.25}
    # the same command again resumes: every trial loaded from the run directory, same numbers
    assert main(["compare", "--budget", "3", "--output-dir", str(out)] + TINY) == 0
    again = json.load(open(out / "results.json"))
    assert again["hyper_deep"]["trained_trial_ids"] == []
    assert sorted(again["hyper_deep"]["loaded_trial_ids"]) == sorted(result["hyper_deep"]["trained_trial_ids"])
    for name in result["methods"]:
        assert again["methods"][name]["nll"] == pytest.approx(result["methods"][name]["nll"], rel=1e-6)


def test_train_one_method_saves_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "batch"
    assert main(["train", "--method", "batch", "--output-dir", str(out), "--hparams", '{"dropout": 0.1}'] + TINY) == 0
    result = json.load(open(out / "results.json"))
    trainer = BatchEnsembleTrainer.load(out / "batch.pt")
    assert trainer.hparams["dropout"] == 0.1
    from hyperkern.data import load_digits

    test = load_digits(seed=0, val_fraction=0.2).test
    assert trainer.evaluate(test)["nll"] == pytest.approx(result["metrics"]["nll"], rel=1e-6)
    assert "batch ensemble" in capsys.readouterr().out
    out = tmp_path / "single"
    assert main(["train", "--method", "single", "--output-dir", str(out)] + TINY) == 0
    assert len(DeepEnsemble.load(out / "single.pt").members) == 1


@pytest.mark.parametrize("method", ["batch", "hyper_batch"])
def test_fast_init_std_reaches_the_rank1_layers(tmp_path, method):
    """--fast-init-std sets every fast weight's init N(1, std^2): with 0 the members start equal
    (up to the one training epoch), with 2 their spread is far beyond the defaults' 0.25-0.75."""
    from hyperkern.ensembles import HyperBatchEnsembleTrainer

    cls = BatchEnsembleTrainer if method == "batch" else HyperBatchEnsembleTrainer
    spreads = {}
    for std in ("0", "2"):
        out = tmp_path / f"{method}-{std}"
        assert main(["train", "--method", method, "--output-dir", str(out), "--fast-init-std", std,
                     "--epochs", "1", "-E", "4", "--no-progress", "--backend", "torch", "--lr", "1e-6"]) == 0
        net = cls.load(out / f"{method}.pt").network
        layers = [m for m in net.modules() if hasattr(m, "init_std")]
        assert layers and all(m.init_std == float(std) for m in layers)
        spreads[std] = torch.cat([m.r.detach().flatten() for m in layers]).std().item()
    assert spreads["0"] < 1e-3 and 1.8 < spreads["2"] < 2.2
    with pytest.raises(SystemExit):
        main(["train", "--method", method, "--fast-init-std", "-1", "--output-dir", str(tmp_path)] + TINY)


def test_fast_init_std_defaults_follow_the_model():
    """0.25 for hyper-batch MLPs, the references' defaults otherwise; an explicit value wins."""
    from hyperkern.cli import _rank1_spec, build_parser
    from hyperkern.ensembles import ModelSpec

    def std(argv, model, method):
        args = build_parser().parse_args(["compare", "--model", model] + argv)
        net = _rank1_spec(args, ModelSpec(model, 10, (1, 32, 32), {}), method).build(method, 2)
        return {m.init_std for m in net.modules() if hasattr(m, "init_std")}

    assert std([], "mlp", "hyper_batch") == {0.25} and std([], "mlp", "batch") == {0.5}
    assert std([], "lenet5", "hyper_batch") == {0.75} and std([], "lenet5", "batch") == {0.5}
    assert std(["--fast-init-std", "0.3"], "lenet5", "hyper_batch") == {0.3}
    assert std(["--fast-init-std", "0.3"], "mlp", "batch") == {0.3}


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["train", "--method", "deep", "--data", "mnist"] + TINY) == 2
    assert "data_dir is required" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["compare", "--data", "cifar10", "--data-dir", str(missing)] + TINY) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--hparams is not valid JSON"):
        main(["train", "--method", "deep", "--hparams", "{dropout", "--output-dir", str(tmp_path)] + TINY)
    with pytest.raises(SystemExit):
        main(["train", "--method", "nonsense"])
    with pytest.raises(SystemExit):
        main(["compare", "--ensemble-size", "0"])


def test_compare_refuses_to_run_on_every_torchrun_rank(tmp_path, monkeypatch):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit, match="compare runs in one process"):
        main(["compare", "--output-dir", str(out)] + TINY)
    assert not out.exists()  # refused before anything was written


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "hyperkern", "compare", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0
    for option in ("--model", "--data", "--data-dir", "--budget", "--ensemble-size", "--seed", "--output-dir",
                   "--epochs"):
        assert option in proc.stdout


LEARN = ["--epochs", "8", "-E", "2", "--no-progress", "--backend", "torch", "--budget", "3"]


@pytest.mark.parametrize("method", ["single", "deep", "batch", "hyper_deep", "hyper_batch"])
def test_train_defaults_learn_on_digits(tmp_path, capsys, method):
    """Every method's `train` defaults give a working model on digits (chance is 0.10): the
    hyper-batch ensemble used to start at the L2 ranges' log-uniform means (about 72 per group over
    1,079 images) and end at accuracy 0.09, NLL 2.31, without a word."""
    out = tmp_path / method
    assert main(["train", "--method", method, "--output-dir", str(out)] + LEARN) == 0
    result = json.load(open(out / "results.json"))
    assert result["metrics"]["accuracy"] > 0.8 and result["metrics"]["nll"] < 1.0
    assert result["warnings"] == [] and "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize("method", ["batch", "hyper_batch"])
def test_a_model_at_chance_is_reported_loudly(tmp_path, capsys, method):
    strong = json.dumps({"l2_hidden1": 1e5, "l2_hidden2": 1e5, "l2_dense_kernel": 1e5, "l2_dense_bias": 1e5})
    out = tmp_path / method
    assert main(["train", "--method", method, "--output-dir", str(out), "--hparams", strong] + LEARN) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "chance is 2.303" in err and "--hparams" in err
    assert json.load(open(out / "results.json"))["warnings"]


def test_recipes_reach_the_batch_type_arms(tmp_path):
    """reference: both batch-type arms start at the ranges' log-uniform means without label smoothing,
    fast weights 0.5 / 0.75, distributions initialised in the linear scale, Adam 1e-3, the warm-up and
    step schedule, 5% validation; tuned: both start at the search's best setting WITH its label
    smoothing. Either way the two arms share the start and the label smoothing."""
    from hyperkern.ensembles.recipes import get_recipe
    from hyperkern.models import mlp

    space = mlp(num_classes=10, in_features=(1, 8, 8), variant="hyper_batch", ensemble_size=2).hparam_space
    means = space.to_dict(space.log_uniform_mean())
    for recipe in ("reference", "tuned"):
        out = tmp_path / recipe
        assert main(["compare", "--budget", "3", "--output-dir", str(out), "--recipe", recipe] + TINY) == 0
        r = json.load(open(out / "results.json"))
        start = r["batch_type_start"]
        batch_hp = dict(start["batch_hparams"])
        smoothing = batch_hp.pop("label_smoothing")
        assert batch_hp == pytest.approx(start["hyper_batch_init"]) and smoothing == start["label_smoothing"]
        assert r["recipe"]["name"] == recipe and r["train_config"]["lr_schedule"] == get_recipe(recipe).lr_schedule
        if recipe == "reference":
            assert start["hyper_batch_init"] == pytest.approx(means) and smoothing == 0.0
            assert r["fast_init_std"] == {"batch": 0.5, "hyper_batch": 0.75}
            assert r["hyper_batch_hparam_lr"] == 1e-3
            assert r["splits"]["val"] == round(0.05 * 1797) or abs(r["splits"]["val"] - 0.05 * 1797) < 2
            # linear-scale init: c +- 0.2 around ~72 is about 0.006 wide in log space (log-scale: 0.4);
            # dropout's mean 0.13 is under 0.2, so its lower bound starts at the range's end
            l2 = [j for j, n in enumerate(space.names) if n.startswith("l2_")]
            assert max(w[j] for w in r["hyper_batch"]["interval_log_widths"] for j in l2) < 0.05
        else:
            tuned = dict(r["tuned_hparams"])
            assert smoothing == pytest.approx(tuned.pop("label_smoothing"))
            assert start["hyper_batch_init"] == pytest.approx(tuned)
            assert r["fast_init_std"] == {"batch": 0.5, "hyper_batch": 0.25}


def test_reference_schedule_shape():
    from hyperkern.ensembles import TrainConfig

    c = TrainConfig(lr=0.1, lr_schedule="reference")
    total = 1000  # warm-up 4 steps, then x0.2 at steps 400, 800, 900
    assert c.lr_at(0, total) == pytest.approx(0.025) and c.lr_at(3, total) == pytest.approx(0.1)
    assert c.lr_at(399, total) == pytest.approx(0.1) and c.lr_at(400, total) == pytest.approx(0.02)
    assert c.lr_at(799, total) == pytest.approx(0.02) and c.lr_at(800, total) == pytest.approx(0.004)
    assert c.lr_at(900, total) == pytest.approx(0.0008) and c.lr_at(999, total) == pytest.approx(0.0008)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="step")
