"""The robustness part of the command line: `hyperkern compare --shift` and `hyperkern evaluate`.

compare saves its trained methods under OUTPUT_DIR/models (models/manifest.json says which file holds
which method and how to reload the data), so `hyperkern evaluate --shift --output-dir OUTPUT_DIR` adds
the shift and OOD evaluation to a finished compare without retraining anything. hyperkern.cli keeps
only small hooks into this module.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

__all__ = ["add_shift_arguments", "add_evaluate_parser", "save_compare_models", "load_saved_models", "run_shift",
           "run_evaluate", "MODELS_DIR"]

MODELS_DIR = "models"
_METHOD_ORDER = ("single", "deep", "batch", "hyper_deep", "hyper_batch")


def _severities(text):
    from hyperkern.robustness.corruptions import check_severities

    try:
        return check_severities(str(text).split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _corruptions(text):
    from hyperkern.robustness.corruptions import CORRUPTIONS, check_corruptions

    if str(text).strip().lower() == "all":
        return CORRUPTIONS
    try:
        return check_corruptions(str(text).split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ood(text):
    from hyperkern.robustness.ood import parse_ood

    try:
        return parse_ood(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_shift_arguments(p: argparse.ArgumentParser) -> None:
    """--shift and its options (compare and evaluate)."""
    g = p.add_argument_group('distribution shift and OOD (pip install "hyperkern[robustness]"; docs/robustness.md)')
    g.add_argument("--shift", action="store_true",
                   help="also evaluate every method on the test split under the 15 common corruptions at "
                        "severities 1-5 (NLL, accuracy, ECE, Brier per corruption and severity, and their means), "
                        "and on out-of-distribution splits (AUROC, AUPR, FPR95 of the predictive entropy and the "
                        "ensembles' mutual information); writes shift.png and reliability_shift.png")
    g.add_argument("--corruptions", type=_corruptions, default="all",
                   help="comma-separated corruptions or groups (noise, blur, weather, digital) (default: all 15)")
    g.add_argument("--severities", type=_severities, default="1,2,3,4,5",
                   help="comma-separated severities in 1..5 (default: 1,2,3,4,5)")
    g.add_argument("--ood", type=_ood, default="auto",
                   help="comma-separated OOD splits: noise, scrambled, mnist, fashion_mnist, cifar10, cifar100, "
                        "svhn, a .npy file of uint8 images, or none; auto: noise and scrambled plus the dataset's "
                        "natural pair when its files are found (default: auto)")
    g.add_argument("--ood-data-dir", default=None,
                   help="directory holding the OOD datasets in torchvision's layout (default: --data-dir)")
    g.add_argument("--shift-images", type=_positive, default=None,
                   help="corrupt a seeded random subset of this many test images (default: the whole test split)")


def add_evaluate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="evaluate the models a `hyperkern compare` saved (no retraining), "
                                        "with --shift under distribution shift and OOD",
                       description="Loads the methods `hyperkern compare` saved under OUTPUT_DIR/models (or the "
                                   "model `hyperkern train` saved in OUTPUT_DIR), prints their test metrics and, "
                                   "with --shift, evaluates them under corruptions and on OOD splits, adding "
                                   "'shift' and 'ood' to OUTPUT_DIR/results.json and the plots beside it.")
    p.add_argument("--output-dir", required=True, help="the --output-dir of a finished compare (or train) run")
    p.add_argument("--data-dir", default=None, help="where the dataset is (default: the one compare used)")
    p.add_argument("--device", default=None, help="torch device to evaluate on (default: the one trained on)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch CPU threads (default: 1 for digits, torch's default otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_shift_arguments(p)
    return p


# ---------------------------------------------------------------------------------------------
# saved models

def _fingerprint(split) -> str:
    h = hashlib.sha256()
    h.update(split.x.detach().cpu().contiguous().float().numpy().tobytes())
    h.update(split.y.detach().cpu().contiguous().long().numpy().tobytes())
    return h.hexdigest()


def _atomic_json(obj, path):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_compare_models(args, data, singles, trainers: dict) -> str:
    """Write compare's fitted methods to OUTPUT_DIR/models/<method>.pt and models/manifest.json. The
    single-model row's networks are the deep ensemble's members (one setting, E seeds): they are read
    back from deep.pt, or from singles.pt when the deep ensemble is missing (failed members)."""
    from hyperkern.ensembles import DeepEnsemble
    from hyperkern.ensembles.recipes import get_recipe

    directory = os.path.join(args.output_dir, MODELS_DIR)
    os.makedirs(directory, exist_ok=True)
    files = {}
    for name in ("deep", "batch", "hyper_deep", "hyper_batch"):
        trainer = trainers.get(name)
        if trainer is not None:
            trainer.save(os.path.join(directory, f"{name}.pt"))
            files[name] = f"{name}.pt"
    if "deep" in files:
        files["single"] = {"members_of": "deep.pt"}
    else:
        group = DeepEnsemble.from_trials(singles[0].model_spec, [s.members[0] for s in singles], singles[0].config)
        group.save(os.path.join(directory, "singles.pt"))
        files["single"] = {"members_of": "singles.pt"}
    recipe = get_recipe(args.recipe)
    val_fraction = args.val_fraction if args.val_fraction is not None else recipe.resolved_val_fraction(args.data)
    manifest = {"kind": "hyperkern.compare.models", "version": 1, "dataset": data.name, "data": args.data,
                "data_dir": os.path.abspath(args.data_dir) if args.data_dir else None, "seed": args.seed,
                "val_fraction": val_fraction, "model": args.model, "ensemble_size": args.ensemble_size,
                "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                "test_fingerprint": _fingerprint(data.test), "files": files}
    path = os.path.join(directory, "manifest.json")
    _atomic_json(manifest, path)
    return path


_CLASSES = {"single": "DeepEnsemble", "deep": "DeepEnsemble", "batch": "BatchEnsembleTrainer",
            "hyper_deep": "HyperDeepEnsemble", "hyper_batch": "HyperBatchEnsembleTrainer"}


def _load(name: str, path: str, device=None):
    from hyperkern import ensembles

    return getattr(ensembles, _CLASSES[name]).load(path, device=device)


def load_saved_models(output_dir: str, device=None):
    """(manifest, {method: [trainer, ...]}) from OUTPUT_DIR/models (compare) or OUTPUT_DIR/results.json
    with its model file (train). FileNotFoundError says what is missing and how to make it."""
    from hyperkern.ensembles import DeepEnsemble

    manifest_path = os.path.join(output_dir, MODELS_DIR, "manifest.json")
    results_path = os.path.join(output_dir, "results.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or manifest.get("kind") != "hyperkern.compare.models":
            raise ValueError(f"{manifest_path}: not a hyperkern compare model manifest")
        methods = {}
        for name in _METHOD_ORDER:
            entry = manifest["files"].get(name)
            if entry is None:
                continue
            if isinstance(entry, dict):  # the single model: each member of a saved deep ensemble alone
                group = DeepEnsemble.load(os.path.join(output_dir, MODELS_DIR, entry["members_of"]), device=device)
                methods[name] = [DeepEnsemble.from_trials(group.model_spec, [m], group.config) for m in group.members]
            else:
                methods[name] = [_load(name, os.path.join(output_dir, MODELS_DIR, entry), device)]
        return manifest, methods
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if results.get("command") == "train" and results.get("model_file"):
            model_file = results["model_file"]
            if not os.path.isfile(model_file):
                model_file = os.path.join(output_dir, os.path.basename(model_file))
            method = results["method"]
            manifest = {"dataset": results["dataset"], "data": results["dataset"], "data_dir": None,
                        "seed": results["seed"], "val_fraction": 0.1, "test_fingerprint": None}
            return manifest, {method: [_load(method, model_file, device)]}
    raise FileNotFoundError(
        f"{manifest_path} not found: `hyperkern evaluate` reads the models `hyperkern compare` saves under "
        f"OUTPUT_DIR/{MODELS_DIR} (or the model of a `hyperkern train` run). For a compare output written before "
        "compare saved its models, run the same compare command again: it resumes from OUTPUT_DIR/runs without "
        "retraining and saves them")


# ---------------------------------------------------------------------------------------------
# the evaluation

def run_shift(args, data, methods: dict, output_dir: str, payload: dict, model_input_shape=None) -> list[str]:
    """Corruptions and OOD for methods ({name: [trainer, ...]}) on data's test split: prints the tables,
    adds payload["shift"] and payload["ood"], writes shift.png and reliability_shift.png into output_dir
    (a note when matplotlib is missing). Returns the files written."""
    from hyperkern.robustness import evaluate as ev
    from hyperkern.robustness.ood import build_ood_splits

    input_shape = tuple(model_input_shape or data.input_shape)
    if tuple(data.test.x.shape[1:]) != input_shape:
        raise ValueError(f"the test split has images {tuple(data.test.x.shape[1:])}; the models take {input_shape}")
    progress = not getattr(args, "no_progress", False)
    data_dir = getattr(args, "data_dir", None)
    start = time.perf_counter()
    # OOD splits first: a bad split fails before minutes of corruptions
    splits, ood_notes = build_ood_splits(args.ood, dataset=data.name, test_x=data.test.x, input_shape=input_shape,
                                         data_dir=data_dir, ood_data_dir=getattr(args, "ood_data_dir", None),
                                         seed=args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    n = len(data.test) if args.shift_images is None else min(args.shift_images, len(data.test))
    print(f"\nhyperkern: shift: {len(args.corruptions)} corruptions x severities "
          f"{','.join(map(str, args.severities))} of {n} test images; OOD splits: "
          f"{', '.join(s.name for s in splits) or 'none'}", flush=True)
    try:
        shift, plot_data = ev.shift_evaluation(methods, data.test, dataset=data.name, input_shape=input_shape,
                                               corruptions=args.corruptions, severities=args.severities,
                                               seed=args.seed, cache_dir=os.path.join(output_dir, "runs", "shift"),
                                               data_dir=data_dir, max_images=args.shift_images, progress=progress,
                                               log=lambda m: print(m, file=sys.stderr, flush=True))
    except ImportError as exc:  # the corruption library is missing: a message, not a traceback
        raise ValueError(str(exc)) from exc
    ood = ev.ood_evaluation(methods, data.test.x, splits)
    ood["notes"] = ood_notes
    shift["seconds"]["with_ood"] = time.perf_counter() - start
    shift_table, ood_table = ev.format_shift_tables(shift), ev.format_ood_table(ood)
    shift["table"], ood["table"] = shift_table, ood_table
    print()
    print(shift_table)
    print()
    print(ood_table)
    payload["shift"], payload["ood"] = shift, ood
    written = []
    try:
        from hyperkern.robustness import plots

        os.makedirs(output_dir, exist_ok=True)
        written.append(plots.shift_plot(shift, os.path.join(output_dir, "shift.png"),
                                        title=f"{data.name}: NLL and ECE under {len(shift['corruptions'])} corruptions "
                                              f"({shift['images']} test images); boxes over corruptions, lines "
                                              "through the means"))
        names = {m: ev.label(m) for m in methods}
        if len(methods.get("single", ())) > 1:  # the diagram shows one network, as compare's reliability.png
            names["single"] = "single model (first seed)"
        written.append(plots.reliability_counts(plot_data, names, os.path.join(output_dir, "reliability_shift.png")))
    except ImportError as exc:
        print(f"hyperkern: no shift plots: {exc}", file=sys.stderr)
    print(f"\nhyperkern: shift and OOD evaluation took {shift['seconds']['with_ood']:.1f} s "
          f"(corrupting {shift['seconds']['corrupt']:.1f} s); wrote {', '.join(written) or 'no plots'}", flush=True)
    return written


def _clean_table(methods, test) -> str:
    from hyperkern.robustness import evaluate as ev

    lines = []
    for name, trainers in methods.items():
        rows = [ev.classification_metrics(ev.predictions(t, test.x)[0], test.y) for t in trainers]
        m = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        lines.append([ev.label(name), *(f"{m[k]:.4f}" for k in ("accuracy", "nll", "ece", "brier"))])
    return "\n".join(ev._table(["method", "accuracy", "NLL", "ECE", "Brier"], lines))


def run_evaluate(args) -> dict:
    """`hyperkern evaluate`: reload the saved methods and their test split, print the test metrics and,
    with --shift, run the shift and OOD evaluation and add it to OUTPUT_DIR/results.json."""
    import torch

    from hyperkern.data import load_dataset

    manifest, methods = load_saved_models(args.output_dir, args.device)
    data_dir = args.data_dir if args.data_dir is not None else manifest.get("data_dir")
    args.data_dir = data_dir
    data = load_dataset(manifest["data"], data_dir=data_dir, seed=manifest["seed"],
                        val_fraction=manifest["val_fraction"])
    if manifest.get("test_fingerprint") and _fingerprint(data.test) != manifest["test_fingerprint"]:
        raise ValueError(f"the {data.name} test split read from {data_dir or 'the package'} differs from the one the "
                         f"models in {args.output_dir} were evaluated on (other files or another seed)")
    args.seed = int(manifest["seed"])
    threads = args.threads or (1 if data.name == "digits" else None)
    if threads:
        torch.set_num_threads(threads)
    first = next(iter(methods.values()))[0]
    input_shape = tuple(first.model_spec.input_shape)
    print(f"hyperkern evaluate: {data.describe()}; models from {args.output_dir}: {', '.join(methods)}", flush=True)
    print()
    print(_clean_table(methods, data.test))
    payload = {}
    if not args.shift:
        return payload
    results_path = os.path.join(args.output_dir, "results.json")
    if os.path.isfile(results_path):
        with open(results_path) as f:
            payload = json.load(f)
    else:
        payload = {"command": "evaluate", "dataset": data.name, "seed": args.seed}
    run_shift(args, data, methods, args.output_dir, payload, input_shape)
    _atomic_json(payload, results_path)
    print(f"wrote {results_path}")
    return payload


def check_shift_ready(args, data) -> None:
    """Before any training: --shift can run (the corruption library is installed, or the dataset's
    published corrupted files are under --data-dir) and the OOD splits named can match the models'
    image shape. A ValueError (a DataFileError for a bad .npy file) says what is wrong."""
    from hyperkern.data.corrupted import find_corrupted_dir
    from hyperkern.robustness.corruptions import LIBRARY, library_version

    if find_corrupted_dir(getattr(args, "data_dir", None), data.name) is None and library_version() is None:
        raise ValueError(f"--shift needs the {LIBRARY} library for the corruptions, which is not installed; install "
                         'it with: pip install "hyperkern[robustness]"')
    from hyperkern.robustness.ood import check_ood_shapes

    check_ood_shapes(args.ood, data.input_shape)
