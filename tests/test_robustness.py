"""Robustness evaluation: corruptions, their cache, the CIFAR-C / SVHN / .npy readers, OOD splits, the
shift and OOD evaluation on tiny inputs, and `hyperkern compare --shift` / `hyperkern evaluate`."""
import json
import math
import os

import numpy as np
import pytest
import torch

from hyperkern.data import ArrayDataset, DataFileError
from hyperkern.robustness import corruptions as C
from hyperkern.robustness import evaluate as ev
from hyperkern.robustness.ood import build_ood_splits, parse_ood

needs_library = pytest.mark.skipif(C.library_version() is None,
                                   reason='the corruption library (pip install "hyperkern[robustness]")')


class LinearMembers:
    """A stand-in trainer: E fixed random linear classifiers on the flattened image."""

    def __init__(self, input_shape, members=2, classes=10, seed=0, weights=None):
        g = torch.Generator().manual_seed(seed)
        d = int(np.prod(input_shape))
        self.w = torch.randn(members, d, classes, generator=g) * 0.5
        self.member_weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)

    def member_log_proba(self, x):
        return torch.log_softmax(torch.einsum("nd,edc->enc", x.flatten(1).float(), self.w), -1)


def _digits_test(n):
    from hyperkern.data import load_digits

    return load_digits(seed=0).test.subset(slice(0, n))


# ---------------------------------------------------------------------------------------------
# argument checks

def test_severities_and_corruption_names_are_checked():
    assert C.check_severities(["5", 1, 3, 3]) == (1, 3, 5)
    for bad in ([0], [6], ["x"], [True], [2.5], []):
        with pytest.raises(ValueError, match="1..5|at least one"):
            C.check_severities(bad)
    assert C.check_corruptions(["noise", "pixelate"]) == ("gaussian_noise", "shot_noise", "impulse_noise", "pixelate")
    assert len(C.CORRUPTIONS) == 15 and C.check_corruptions(C.CORRUPTION_GROUPS) == C.CORRUPTIONS
    with pytest.raises(ValueError, match="unknown corruption 'speckle'"):
        C.check_corruptions(["speckle"])
    assert parse_ood("noise, scrambled,x.npy") == ["noise", "scrambled", "x.npy"]
    for bad in ("imagenet", "none,noise", ""):
        with pytest.raises(ValueError):
            parse_ood(bad)


def test_pixel_codec_round_trips_every_normalisation():
    for dataset, channels in (("digits", 1), ("cifar10", 3), ("cifar100", 3)):
        codec = C.pixel_codec(dataset, channels)
        pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 5, channels), dtype=np.uint8)
        x = codec.from_pixels(pixels)
        assert x.shape == (3, channels, 4, 5) and x.dtype == torch.float32
        assert np.array_equal(codec.to_pixels(x), pixels)
    digits = _digits_test(4)
    codec = C.pixel_codec("digits", 1)
    assert float((codec.from_pixels(codec.to_pixels(digits.x)) - digits.x).abs().max()) <= 0.5 / 255 + 1e-7


# ---------------------------------------------------------------------------------------------
# the corruption library at the three image sizes

@needs_library
@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (1, 28, 28, 1), (1, 32, 32, 3)], ids=["8x8grey", "28x28grey",
                                                                                       "32x32colour"])
def test_every_corruption_runs_at_each_size_seeded(shape):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    for name in C.CORRUPTIONS:
        for severity in (1, 5):
            out = C.corrupt_images(pixels, name, severity, seed=3)
            assert out.shape == pixels.shape and out.dtype == np.uint8, name
            assert np.array_equal(out, C.corrupt_images(pixels, name, severity, seed=3)), f"{name} not reproducible"
    # a different seed gives different noise; a subset gets the same images as the whole split
    assert not np.array_equal(C.corrupt_images(pixels, "gaussian_noise", 3, seed=3),
                              C.corrupt_images(pixels, "gaussian_noise", 3, seed=4))
    last = C.corrupt_images(pixels[-1:], "shot_noise", 2, seed=3, indices=[shape[0] - 1])
    assert np.array_equal(last, C.corrupt_images(pixels, "shot_noise", 2, seed=3)[-1:])
    # the caller's numpy global state is left as it was
    np.random.seed(11)
    before = np.random.random()
    np.random.seed(11)
    C.corrupt_images(pixels, "fog", 1)
    assert np.random.random() == before


@needs_library
def test_corrupt_images_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt_images(np.zeros((1, 8, 8, 1), np.float32), "fog", 1)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        C.corrupt_images(np.zeros((1, 8, 8, 2), np.uint8), "fog", 1)
    with pytest.raises(ValueError, match="1..5"):
        C.corrupt_images(np.zeros((1, 8, 8, 1), np.uint8), "fog", 6)


def test_partial_corruption_at_small_sizes_is_named():
    assert "glass_blur severity 5 at 8x8" in C.size_notes("glass_blur", 5, 8, 8)
    assert C.size_notes("glass_blur", 4, 8, 8) is None and C.size_notes("glass_blur", 5, 32, 32) is None
    assert C.size_notes("fog", 5, 8, 8) is None


def test_corruption_cache_round_trip_and_bad_files(tmp_path):
    pixels = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    cache = C.CorruptionCache(tmp_path, "lib 1", "digits", 0, pixels, [0, 1])
    assert cache.get("fog", 1) is None
    cache.put("fog", 1, pixels + 1)
    again = C.CorruptionCache(tmp_path, "lib 1", "digits", 0, pixels, [0, 1])
    assert again.path == cache.path and np.array_equal(again.get("fog", 1), pixels + 1)
    assert C.CorruptionCache(tmp_path, "lib 1", "digits", 1, pixels, [0, 1]).path != cache.path  # seed in the key
    assert C.CorruptionCache(tmp_path, "lib 2", "digits", 0, pixels, [0, 1]).path != cache.path  # library version
    np.save(os.path.join(cache.path, "fog-2.npy"), np.zeros((3, 4, 4, 1), np.uint8))
    np.save(os.path.join(cache.path, "fog-3.npy"), np.array([object()], dtype=object), allow_pickle=True)
    assert again.get("fog", 2) is None and again.get("fog", 3) is None
    assert any("fog-2.npy" in n for n in again.notes) and any("fog-3.npy" in n for n in again.notes)


# ---------------------------------------------------------------------------------------------
# CIFAR-C, SVHN and .npy readers

def _fake_cifar_c(root, labels, corruption="gaussian_noise", n=3):
    d = root / "CIFAR-10-C"
    d.mkdir()
    np.save(d / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    arr = np.stack([np.full((32, 32, 3), 10 * s + i, np.uint8) for s in range(5) for i in range(n)])
    np.save(d / f"{corruption}.npy", arr)
    return d


def test_cifar_c_files_are_read_and_checked(tmp_path):
    from hyperkern.data.corrupted import find_corrupted_dir, read_corrupted, read_corrupted_labels

    labels = np.array([3, 1, 4])
    d = _fake_cifar_c(tmp_path, labels)
    assert find_corrupted_dir(tmp_path, "cifar10") == str(d) and find_corrupted_dir(tmp_path, "digits") is None
    read_corrupted_labels(str(d), labels)
    sev2 = read_corrupted(str(d), "gaussian_noise", 2, 3, (3, 32, 32))
    assert sev2.shape == (3, 32, 32, 3) and sev2[:, 0, 0, 0].tolist() == [10, 11, 12]
    with pytest.raises(DataFileError, match="labels.npy: labels differ"):
        read_corrupted_labels(str(d), np.array([3, 1, 5]))
    with pytest.raises(ValueError, match="severity"):
        read_corrupted(str(d), "gaussian_noise", 6, 3, (3, 32, 32))
    # wrong shape, wrong dtype, a pickled object array, a missing file: each names the file
    np.save(d / "fog.npy", np.zeros((15, 32, 32), np.uint8))
    with pytest.raises(DataFileError, match=r"fog\.npy: array of shape \(15, 32, 32\)"):
        read_corrupted(str(d), "fog", 1, 3, (3, 32, 32))
    np.save(d / "snow.npy", np.zeros((15, 32, 32, 3), np.float32))
    with pytest.raises(DataFileError, match=r"snow\.npy: .*float32.*expected a uint8 array"):
        read_corrupted(str(d), "snow", 1, 3, (3, 32, 32))
    np.save(d / "frost.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataFileError, match=r"frost\.npy: not a readable \.npy"):
        read_corrupted(str(d), "frost", 1, 3, (3, 32, 32))
    with pytest.raises(DataFileError, match=r"contrast\.npy: file not found"):
        read_corrupted(str(d), "contrast", 1, 3, (3, 32, 32))
    np.save(d / "labels.npy", np.zeros((15, 2), np.uint8))
    with pytest.raises(DataFileError, match="labels.npy: array of shape"):
        read_corrupted_labels(str(d), labels)


def test_shift_evaluation_reads_real_corrupted_files(tmp_path):
    """With CIFAR-10-C under --data-dir the files are read (no corruption library needed); a corruption
    whose file is missing is named."""
    labels = np.array([3, 1, 4])
    _fake_cifar_c(tmp_path, labels)
    codec = C.pixel_codec("cifar10", 3)
    test = ArrayDataset(codec.from_pixels(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)),
                        torch.from_numpy(labels))
    methods = {"deep": [LinearMembers((3, 32, 32), classes=5)]}
    messages = []
    result, _ = ev.shift_evaluation(methods, test, dataset="cifar10", input_shape=(3, 32, 32),
                                    corruptions=["gaussian_noise"], severities=[1, 5], data_dir=tmp_path,
                                    progress=False, log=messages.append)
    assert result["source"].startswith("CIFAR-10-C files in")
    got = result["methods"]["deep"]["per_corruption"]["gaussian_noise"]["5"]
    x5 = codec.from_pixels(np.stack([np.full((32, 32, 3), 40 + i, np.uint8) for i in range(3)]))
    expected = ev.classification_metrics(ev.predictions(methods["deep"][0], x5)[0], test.y)
    assert got == pytest.approx(expected)
    if C.library_version() is not None:
        result, _ = ev.shift_evaluation(methods, test, dataset="cifar10", input_shape=(3, 32, 32),
                                        corruptions=["gaussian_noise", "pixelate"], severities=[1], data_dir=tmp_path,
                                        progress=False, log=messages.append)
        assert any("pixelate.npy not found" in n for n in result["notes"])


def test_svhn_and_npy_readers(tmp_path):
    from hyperkern.data.corrupted import read_image_array, read_svhn_test

    scipy_io = pytest.importorskip("scipy.io")
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3]])})
    images, labels = read_svhn_test(tmp_path)
    assert images.shape == (4, 32, 32, 3) and labels.tolist() == [0, 1, 2, 3]
    assert np.array_equal(images[1], x[..., 1])
    bad = tmp_path / "bad"
    bad.mkdir()
    scipy_io.savemat(bad / "test_32x32.mat", {"X": x.astype(np.float64), "y": np.array([[1]] * 4)})
    with pytest.raises(DataFileError, match="test_32x32.mat: X is"):
        read_svhn_test(bad)
    with pytest.raises(DataFileError, match="SVHN test set not found"):
        read_svhn_test(tmp_path / "nowhere")
    np.save(tmp_path / "grey.npy", np.zeros((2, 8, 8), np.uint8))
    assert read_image_array(tmp_path / "grey.npy").shape == (2, 8, 8, 1)
    np.save(tmp_path / "float.npy", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(DataFileError, match="float.npy: array of shape"):
        read_image_array(tmp_path / "float.npy")


# ---------------------------------------------------------------------------------------------
# OOD splits and metrics

def test_ood_splits_and_their_errors(tmp_path):
    test = _digits_test(12)
    messages = []
    splits, notes = build_ood_splits("auto", dataset="digits", test_x=test.x, input_shape=(1, 8, 8),
                                     log=messages.append)
    assert [s.name for s in splits] == ["noise", "scrambled"] and notes == []
    for s in splits:
        assert s.x.shape == test.x.shape and 0 <= float(s.x.min()) and float(s.x.max()) <= 1
    # scrambled keeps each image's pixel values
    assert torch.equal(splits[1].x.flatten(1).sort(1).values,
                       C.pixel_codec("digits", 1).from_pixels(C.pixel_codec("digits", 1).to_pixels(test.x))
                       .flatten(1).sort(1).values)
    again, _ = build_ood_splits("noise", dataset="digits", test_x=test.x, input_shape=(1, 8, 8))
    assert torch.equal(again[0].x, splits[0].x)  # seeded
    # an OOD split of another image size or channel count: refused before any file is read
    with pytest.raises(ValueError, match=r"OOD split 'mnist' has images of shape \(1, 28, 28\).*take \(1, 8, 8\)"):
        build_ood_splits("mnist", dataset="digits", test_x=test.x, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"'cifar10' has images of shape \(3, 32, 32\)"):
        build_ood_splits("cifar10", dataset="digits", test_x=test.x, input_shape=(1, 8, 8))
    np.save(tmp_path / "big.npy", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"'big.npy' has images of shape \(1, 28, 28\)"):
        build_ood_splits(str(tmp_path / "big.npy"), dataset="digits", test_x=test.x, input_shape=(1, 8, 8))
    np.save(tmp_path / "rgb.npy", np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="3 channels|shape \\(3, 8, 8\\)"):
        build_ood_splits(str(tmp_path / "rgb.npy"), dataset="digits", test_x=test.x, input_shape=(1, 8, 8))
    np.save(tmp_path / "ok.npy", np.zeros((5, 8, 8), np.uint8))
    ok, _ = build_ood_splits(str(tmp_path / "ok.npy"), dataset="digits", test_x=test.x, input_shape=(1, 8, 8))
    assert ok[0].x.shape == (5, 1, 8, 8)
    # auto on Fashion-MNIST without MNIST's files: said, not silently dropped
    fm = torch.zeros(4, 1, 28, 28)
    splits, notes = build_ood_splits("auto", dataset="fashion_mnist", test_x=fm, input_shape=(1, 28, 28),
                                     data_dir=tmp_path, log=messages.append)
    assert [s.name for s in splits] == ["noise", "scrambled"] and "OOD split mnist (auto) not used" in notes[0]
    assert messages and "mnist" in messages[-1]
    with pytest.raises(DataFileError, match="not found"):
        build_ood_splits("mnist", dataset="fashion_mnist", test_x=fm, input_shape=(1, 28, 28), data_dir=tmp_path)


def test_ood_evaluation_per_method():
    test = _digits_test(30)
    splits, _ = build_ood_splits("noise,scrambled", dataset="digits", test_x=test.x, input_shape=(1, 8, 8))
    single = [LinearMembers((1, 8, 8), members=1, seed=s) for s in (0, 1)]
    ensemble = LinearMembers((1, 8, 8), members=3, seed=5, weights=[2.0, 1.0, 0.0])
    out = ev.ood_evaluation({"single": single, "deep": [ensemble]}, test.x, splits)
    assert set(out["methods"]) == {"single", "deep"} and set(out["splits"]) == {"noise", "scrambled"}
    assert out["methods"]["single"]["noise"]["mutual_information"] is None
    # the single row is the mean over its networks, each scored by its entropy
    from hyperkern import metrics

    per = [metrics.ood_detection(metrics.predictive_entropy(t.member_log_proba(test.x)[0].double().exp()),
                                 metrics.predictive_entropy(t.member_log_proba(splits[0].x)[0].double().exp()))
           for t in single]
    assert out["methods"]["single"]["noise"]["entropy"]["auroc"] == pytest.approx(np.mean([p["auroc"] for p in per]))
    # the ensemble's mutual information uses its member weights
    p_in = ensemble.member_log_proba(test.x).double().exp()
    p_out = ensemble.member_log_proba(splits[0].x).double().exp()
    w = torch.tensor([2.0, 1.0, 0.0])
    expected = metrics.ood_detection(metrics.mutual_information(p_in, w), metrics.mutual_information(p_out, w))
    assert out["methods"]["deep"]["noise"]["mutual_information"] == pytest.approx(expected)
    table = ev.format_ood_table(out)
    assert "AUROC MI" in table and "single model" in table and "scrambled" in table


# ---------------------------------------------------------------------------------------------
# the shift evaluation

@needs_library
def test_shift_evaluation_tables_means_and_skips(tmp_path):
    test = _digits_test(20)
    methods = {"single": [LinearMembers((1, 8, 8), 1, seed=s) for s in (0, 1)],
               "deep": [LinearMembers((1, 8, 8), 3, seed=2)]}
    result, plot_data = ev.shift_evaluation(methods, test, dataset="digits", input_shape=(1, 8, 8),
                                            corruptions=["gaussian_noise", "pixelate", "glass_blur"], severities=[1, 5],
                                            cache_dir=tmp_path / "cache", progress=False, log=lambda m: None)
    m = result["methods"]["deep"]
    assert set(m["per_corruption"]) == {"gaussian_noise", "pixelate", "glass_blur"}
    for s in ("1", "5"):
        rows = [m["per_corruption"][c][s] for c in m["per_corruption"]]
        for k in ev.METRICS:
            assert m["per_severity"][s][k] == pytest.approx(np.mean([r[k] for r in rows]))
    every = [r for c in m["per_corruption"].values() for r in c.values()]
    assert m["mean"]["nll"] == pytest.approx(np.mean([r["nll"] for r in every])) and m["mean"]["sets"] == 6
    assert m["clean"] == pytest.approx(ev.classification_metrics(ev.predictions(methods["deep"][0], test.x)[0], test.y),
                                       abs=2e-3)  # clean images pass through uint8 pixels
    assert any("glass_blur severity 5 at 8x8" in n for n in result["notes"])
    assert plot_data["shifted"]["deep"].shape == (3 * 20, 10) and plot_data["shifted_labels"].shape == (60,)
    text = ev.format_shift_tables(result)
    for word in ("c-NLL", "c-ACC", "c-ECE", "c-Brier", "sev 5", "single model", "deep ensemble"):
        assert word in text
    # the second run reads the cache: same numbers
    again, _ = ev.shift_evaluation(methods, test, dataset="digits", input_shape=(1, 8, 8),
                                   corruptions=["gaussian_noise", "pixelate", "glass_blur"], severities=[1, 5],
                                   cache_dir=tmp_path / "cache", progress=False, log=lambda m: None)
    assert again["methods"] == result["methods"]
    # a corruption that changes no image (contrast of black images) is skipped and said
    black = ArrayDataset(torch.zeros(4, 1, 8, 8), torch.arange(4))
    said = []
    skip, _ = ev.shift_evaluation(methods, black, dataset="digits", input_shape=(1, 8, 8),
                                  corruptions=["contrast", "gaussian_noise"], severities=[1], progress=False,
                                  log=said.append)
    assert [k["corruption"] for k in skip["skipped"]] == ["contrast"]
    assert "contrast" not in skip["methods"]["deep"]["per_corruption"]
    assert any("skipped: contrast severity 1 leaves every one of the 4 images unchanged" in s for s in said)
    # a subset of test images
    sub, _ = ev.shift_evaluation(methods, test, dataset="digits", input_shape=(1, 8, 8), corruptions=["fog"],
                                 severities=[2], max_images=7, progress=False, log=lambda m: None)
    assert sub["images"] == 7 and sub["test_images"] == 20


# ---------------------------------------------------------------------------------------------
# the command line

TINY = ["--epochs", "1", "-E", "2", "--budget", "2", "--no-progress", "--backend", "torch"]


def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys, keep_threads):
    from hyperkern.cli import main

    for args, message in ((["--severities", "0,3"], "severities must be integers in 1..5"),
                          (["--severities", "6"], "1..5"),
                          (["--corruptions", "rain"], "unknown corruption 'rain'"),
                          (["--ood", "imagenet"], "unknown OOD split 'imagenet'")):
        with pytest.raises(SystemExit) as exc:
            main(["compare", "--shift", "--output-dir", str(tmp_path / "x")] + TINY + args)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert main(["evaluate", "--shift", "--output-dir", str(tmp_path / "empty")]) == 2
    assert "models/manifest.json not found" in capsys.readouterr().err


def test_shift_without_the_library_fails_before_training(tmp_path, capsys, monkeypatch, keep_threads):
    from hyperkern.cli import main

    monkeypatch.setattr(C, "library_version", lambda: None)
    assert main(["compare", "--shift", "--output-dir", str(tmp_path / "x")] + TINY) == 2
    assert 'pip install "hyperkern[robustness]"' in capsys.readouterr().err
    assert not (tmp_path / "x" / "runs").exists()


@needs_library
def test_compare_shift_then_evaluate_reuses_the_saved_models(tmp_path, capsys, keep_threads):
    pytest.importorskip("matplotlib")
    from hyperkern.cli import main

    out = tmp_path / "cmp"
    shift = ["--shift", "--corruptions", "pixelate,gaussian_noise", "--severities", "1,5"]
    # an OOD split of another image size is refused before any training
    assert main(["compare", "--output-dir", str(out)] + TINY + shift + ["--ood", "mnist"]) == 2
    assert "OOD split 'mnist' has images of shape (1, 28, 28)" in capsys.readouterr().err
    assert not (out / "runs").exists()  # refused before any training
    assert main(["compare", "--output-dir", str(out)] + TINY + shift) == 0
    text = capsys.readouterr().out
    assert "c-NLL" in text and "AUROC H" in text
    result = json.load(open(out / "results.json"))
    assert set(result["shift"]["methods"]) == {"single", "deep", "batch", "hyper_deep", "hyper_batch"}
    assert result["shift"]["corruptions"] == ["gaussian_noise", "pixelate"] and result["shift"]["severities"] == [1, 5]
    assert set(result["ood"]["splits"]) == {"noise", "scrambled"}
    assert result["ood"]["methods"]["deep"]["noise"]["mutual_information"] is not None
    for name in ("shift.png", "reliability_shift.png", "reliability.png"):
        assert open(out / name, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    manifest = json.load(open(out / "models" / "manifest.json"))
    assert manifest["files"]["single"] == {"members_of": "deep.pt"} and manifest["dataset"] == "digits"
    runs_before = sorted(os.listdir(out / "runs"))
    # evaluate: same models (the clean metrics equal compare's), other corruptions, no training
    assert main(["evaluate", "--output-dir", str(out), "--shift", "--corruptions", "fog", "--severities", "3",
                 "--ood", "noise", "--no-progress"]) == 0
    text = capsys.readouterr().out
    again = json.load(open(out / "results.json"))
    assert again["methods"] == result["methods"]  # compare's own results kept
    assert again["shift"]["corruptions"] == ["fog"] and list(again["ood"]["splits"]) == ["noise"]
    for name in ("deep", "batch", "hyper_deep", "hyper_batch"):
        assert again["shift"]["methods"][name]["clean"] == pytest.approx(result["shift"]["methods"][name]["clean"])
        assert math.isclose(again["shift"]["methods"][name]["clean"]["accuracy"], result["methods"][name]["accuracy"],
                            abs_tol=0.01)
    assert sorted(os.listdir(out / "runs")) == runs_before
    assert "deep ensemble" in text and "hyper-batch ensemble" in text
