"""The rough edges a new user hits on the command lines (`hyperkern`, `python -m bench`): help texts,
usage errors, --version, a CUDA device torch cannot use, what a resumed compare says, and how progress
is printed when the output is not a terminal."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from hyperkern.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "-E", "2", "--no-progress", "--backend", "torch"]


pytestmark = pytest.mark.usefixtures("keep_threads")


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_compare_help_shows_the_compare_section_of_the_docstring(capsys):
    text = _help(["compare", "--help"], capsys)
    assert "` (the main job) and `" not in text  # the title line's fragment it used to print
    assert "Trains a single model, a deep ensemble, a batch ensemble" in text
    assert "hyperkern train --method" not in text  # the train section is not part of compare's help
    train = _help(["train", "--help"], capsys)
    assert "Trains one method" in train


def test_version(capsys):
    import hyperkern

    assert _help(["--version"], capsys).strip() == f"hyperkern {hyperkern.__version__}"


def test_version_matches_the_installed_metadata():
    from importlib.metadata import version

    import hyperkern

    assert version("hyperkern") == hyperkern.__version__


@pytest.mark.parametrize("argv, option", [(["compare", "--budget", "abc"], "--budget"),
                                          (["compare", "-E", "two"], "--ensemble-size"),
                                          (["train", "--method", "batch", "--fast-init-std", "x"], "--fast-init-std")])
def test_a_malformed_number_is_a_usage_error_naming_the_option_not_a_function(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "_positive_int" not in err and "_non_negative_float" not in err


@pytest.mark.parametrize("value", ["1.5", "0", "-0.1", "nan", "abc"])
def test_val_fraction_outside_0_1_is_a_usage_error_exit_2(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--val-fraction", value, "--output-dir", str(tmp_path / "out")] + TINY)
    assert exc.value.code == 2
    assert "--val-fraction" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_batch_size_help_says_per_member_and_global():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("compare", "train"):
        action = next(a for a in sub[name]._actions if a.dest == "batch_size")
        assert "per member" in action.help and "global" in action.help, action.help
    distributed = next(a for a in sub["train"]._actions if a.dest == "distributed")
    assert "per member" in distributed.help and "global" in distributed.help, distributed.help


@pytest.mark.parametrize("command", [["compare"], ["train", "--method", "batch"]])
def test_a_cuda_device_this_torch_cannot_use_is_refused_at_start(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main(command + ["--device", "cuda", "--output-dir", str(out)] + TINY) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err and "CUDA" in err, err
    assert not out.exists()


def test_an_unknown_device_is_refused_at_start(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--device", "gpu", "--output-dir", str(out)] + TINY) == 2
    assert "--device" in capsys.readouterr().err
    assert not out.exists()


def test_a_resumed_compare_says_what_it_loaded_and_what_it_trains(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--budget", "2", "--output-dir", str(out)] + TINY
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "resumed:" not in first
    trials = out / "runs" / "hyper_deep" / "trials"
    files = sorted(p.name for p in trials.glob("*.pt"))
    (trials / "search-001.pt").unlink()
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert f"resumed: {len(files) - 1} trials loaded, 1 to train" in again, again


# ---------------------------------------------------------------------------------------------------------------
# progress: bars on a terminal, one plain line per epoch otherwise


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def _train_tiny(progress: bool, monkeypatch, tty: bool) -> tuple[str, str]:
    from hyperkern.ensembles import DeepEnsemble, TrainConfig
    from hyperkern.data import load_digits

    out, err = _Stream(tty), _Stream(tty)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    d = load_digits(seed=0, val_fraction=0.2)
    DeepEnsemble("mlp", 1, config=TrainConfig(epochs=3, batch_size=256), progress=progress).fit(d.train, d.val)
    return out.getvalue(), err.getvalue()


def test_progress_off_a_terminal_is_one_plain_line_per_epoch(monkeypatch):
    out, err = _train_tiny(True, monkeypatch, tty=False)
    text = out + err
    assert "\r" not in text
    lines = [line for line in text.splitlines() if "epoch" in line]
    assert len(lines) == 3, text
    assert lines[0].split("epoch")[1].strip().startswith("1/3") and "loss" in lines[0]


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    out, err = _train_tiny(True, monkeypatch, tty=True)
    assert "\r" in err and "epoch" not in out.lower()


def test_no_progress_prints_nothing(monkeypatch):
    out, err = _train_tiny(False, monkeypatch, tty=False)
    assert out == "" and err == ""


# ---------------------------------------------------------------------------------------------------------------
# python -m bench


def test_bench_help_describes_every_option():
    sys.path.insert(0, ROOT)
    try:
        from bench.__main__ import build_parser as bench_parser
    finally:
        sys.path.remove(ROOT)
    parser = bench_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"


def test_bench_help_runs():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for words in ("which suites to run", "device to benchmark on", "timed rounds per candidate"):
        assert words in " ".join(proc.stdout.split()), proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# repository hygiene and packaging


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_generated_files_are_ignored_and_not_tracked():
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    for path in ("hyperkern-compare/results.json", "hyperkern-train/batch.pt", ".coverage"):
        assert _git("check-ignore", "-q", path).returncode == 0, path
    tracked = _git("ls-files").stdout.split()
    assert ".coverage" not in tracked


def test_triton_is_an_extra_not_a_hard_dependency():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert not any(dep.startswith("triton") for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(dep.startswith("triton") for dep in extras["triton"])
    assert any(dep.startswith("triton") for dep in extras["test"])  # CI runs the Triton tests in the interpreter
