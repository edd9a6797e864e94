import json
import os
import subprocess
import sys

import pytest
import torch

from hyperkern.cli import main
from hyperkern.ensembles import BatchEnsembleTrainer, DeepEnsemble

TINY = ["--epochs", "1", "-E", "2", "--no-progress", "--backend", "torch"]


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


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
