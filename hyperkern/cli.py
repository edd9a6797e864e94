"""hyperkern command line: `hyperkern compare` (the main job) and `hyperkern train`.

hyperkern compare
    Trains a single model, a deep ensemble, a batch ensemble, a hyper-deep ensemble and a hyper-batch
    ensemble on one dataset (default: the embedded UCI digits, an MLP, E = 4) and prints a table like
    the paper's (accuracy, NLL, ECE, Brier, parameters, training time); writes results.json and
    reliability.png into --output-dir. Protocol (docs/method.md section 4): the hyper-deep random search
    (--budget trials, fixed init seed) also tunes the baselines, as in the paper: the best trial on
    validation NLL gives the tuned setting; the deep ensemble is that setting trained from E seeds
    (the stratification of hyper-deep ensembles trains exactly these); the single model row is the
    mean of those E networks' metrics evaluated one at a time (the expected tuned single model, as
    the paper averages over seeds); the batch ensemble uses the tuned setting and the hyper-batch
    ensemble starts its per-member distributions there. Every network trains for the same --epochs
    with the same SGD schedule and per-member batch size (batch and hyper-batch ensembles tile each
    minibatch E times, so each member sees as many examples as a deep-ensemble member). Selection
    uses the validation split only; the test split is only evaluated. After the table come the
    paper's checks on test NLL, each with the paired standard error over test images of the NLL
    difference (results.json "checks"). Run directories under --output-dir/runs make the same
    command resume after an interruption. The trained methods are saved under --output-dir/models;
    --shift adds their evaluation under corruptions and on out-of-distribution splits, and
    `hyperkern evaluate --shift --output-dir DIR` runs it later on the saved models
    (docs/robustness.md).

hyperkern train --method {single,deep,batch,hyper_deep,hyper_batch}
    Trains one method (untuned defaults unless --hparams is given), prints its metrics and saves it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from hyperkern.ensembles.recipes import get_recipe

__all__ = ["main", "build_parser", "run_compare", "run_train"]

METHOD_LABELS = {
    "single": "single model",
    "deep": "deep ensemble",
    "batch": "batch ensemble",
    "hyper_deep": "hyper-deep ensemble",
    "hyper_batch": "hyper-batch ensemble",
}


def _checked(convert, ok, expected: str):
    """An argparse type: convert(text), refused with 'must be EXPECTED, got TEXT' when the text does
    not convert or ok(value) is false."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_float = _checked(float, lambda v: 0.0 <= v < float("inf"), "a finite number >= 0")
_open_fraction = _checked(float, lambda v: 0.0 < v < 1.0, "in (0, 1)")


def _doc_section(name: str) -> str:
    """The section of this module's docstring under the line that starts with `hyperkern NAME` (the
    subcommand's --help description; the title line names the commands too, mid-line)."""
    import textwrap

    lines = __doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"hyperkern {name}"))
    body = []
    for line in lines[start + 1:]:
        if line and not line[0].isspace():
            break
        body.append(line)
    return textwrap.dedent("\n".join(body)).strip("\n")


def _add_common(p: argparse.ArgumentParser):
    from hyperkern.data import DATASETS

    p.add_argument("--model", default="mlp", choices=["mlp", "lenet5", "resnet20", "wrn28_10"],
                   help="network architecture (default: mlp)")
    p.add_argument("--data", default="digits", choices=list(DATASETS),
                   help="dataset; 'digits' is embedded, the others are read from --data-dir (default: digits)")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset in torchvision's layout")
    p.add_argument("--ensemble-size", "-E", type=_positive_int, default=4, help="ensemble size E (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and of all training (default: 0)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs per network (default: 40 on digits, 20 otherwise)")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="examples per member and step; with --distributed the global count, split over the ranks "
                        "(batch-type ensembles tile each minibatch E times) (default: 64)")
    p.add_argument("--recipe", default="tuned", choices=["tuned", "reference"],
                   help="reference: every default of the reference scripts (uncertainty-baselines), scaled to "
                        "--epochs; tuned: the project's departures from it, each chosen on held-out data "
                        "(docs/method.md, Recipes). The flags below override single values (default: tuned)")
    p.add_argument("--lr", type=float, default=0.1, help="initial SGD learning rate, decayed by the recipe's "
                   "schedule: cosine (tuned) or the reference's warm-up and x0.2 steps (default: 0.1)")
    p.add_argument("--hparam-lr", type=float, default=None,
                   help="Adam learning rate of the hyper-batch distribution step (default: the recipe's; "
                        "reference 1e-3; tuned 3e-3 on digits, whose 40 short epochs give only 226 "
                        "distribution steps, 1e-3 otherwise)")
    p.add_argument("--fast-init-std", type=_non_negative_float, default=None,
                   help="standard deviation of the N(1, std^2) fast-weight init of batch and hyper-batch members "
                        "(default: the recipe's; the references' 0.5 for batch ensembles and 0.75 for hyper-batch "
                        "ensembles, except 0.25 for hyper-batch MLPs under tuned)")
    p.add_argument("--val-fraction", type=_open_fraction, default=None,
                   help="fraction held out for validation (default: the recipe's; reference 0.05, the reference's "
                        "train_proportion 0.95; tuned 0.2 on digits, whose 1,797 images leave a small validation "
                        "set for greedy selection, 0.1 otherwise)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton"],
                   help="op backend of the rank-1 layers (default: auto)")
    p.add_argument("--device", default="cpu", help="torch device to train on, e.g. cpu, cuda, cuda:1; refused at "
                   "start when this torch cannot use it (default: cpu)")
    p.add_argument("--executor", default="local", choices=["local", "process", "ray"],
                   help="where independent trials run: this process, a process pool or Ray tasks (default: local)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="process pool size (--executor process); CPUs of a Ray started here (--executor ray)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to run trials on (--executor ray), e.g. auto or ray://head:10001 (default: "
                        "$RAY_ADDRESS, else a Ray started on this machine)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: 1 for digits, whose tiny networks only lose time to "
                        "thread synchronisation; torch's default otherwise)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (default: tqdm bars on a terminal, one plain line per epoch and per "
                        "finished trial when the output is a file or a pipe)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperkern", description="Deep, batch, hyper-deep and hyper-batch "
                                     "ensembles (Wenzel et al., NeurIPS 2020).")
    from hyperkern import __version__

    parser.add_argument("--version", action="version", version=f"hyperkern {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    compare = sub.add_parser("compare", help="train all methods on one dataset and compare them (the main job)",
                             description=_doc_section("compare"),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(compare)
    compare.add_argument("--budget", type=_positive_int, default=32,
                         help="hyper-deep random-search trials kappa (default: 32)")
    compare.add_argument("--output-dir", default="hyperkern-compare", help="where results go (default: "
                         "./hyperkern-compare)")
    from hyperkern.robustness.cli import add_evaluate_parser, add_shift_arguments

    add_shift_arguments(compare)

    train = sub.add_parser("train", help="train one method and report its metrics", description=_doc_section("train"),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(train)
    train.add_argument("--method", required=True, choices=list(METHOD_LABELS), help="which method")
    train.add_argument("--budget", type=_positive_int, default=32, help="random-search trials (hyper_deep)")
    train.add_argument("--hparams", default=None,
                       help='JSON object of hyperparameters, e.g. \'{"dropout": 0.1, "l2_hidden1": 0.5}\' '
                            "(single / deep / batch; hyper_batch: initial centres)")
    train.add_argument("--output-dir", default="hyperkern-train", help="where the model and metrics go")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel training (batch / hyper_batch) under torchrun, e.g. torchrun "
                            "--nproc_per_node=2 -m hyperkern train --method batch --distributed; --batch-size stays "
                            "the examples per member and step, the global count that the ranks split (default: on "
                            "when torchrun starts more than one process)")
    add_evaluate_parser(sub)
    return parser


# ---------------------------------------------------------------------------------------------

def _setup(args):
    import torch

    from hyperkern.data import load_dataset
    from hyperkern.ensembles import ModelSpec, TrainConfig

    _check_device(args.device)
    recipe = get_recipe(args.recipe)
    val_fraction = args.val_fraction if args.val_fraction is not None else recipe.resolved_val_fraction(args.data)
    if not 0.0 < val_fraction < 1.0:
        raise SystemExit(f"hyperkern: --val-fraction must lie in (0, 1), got {val_fraction}")
    data = load_dataset(args.data, data_dir=args.data_dir, seed=args.seed, val_fraction=val_fraction)
    epochs = args.epochs or (40 if args.data == "digits" else 20)
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                         lr_schedule=recipe.lr_schedule)
    kwargs = {"backend": args.backend}
    if args.model == "lenet5" and data.input_shape[1] < 12:
        raise SystemExit(f"hyperkern: lenet5 needs images of at least 12x12; {args.data} has {data.input_shape}")
    spec = ModelSpec(args.model, data.num_classes, data.input_shape, kwargs)
    executor = "local"
    if args.executor == "process":
        from hyperkern.ensembles import ProcessExecutor

        executor = ProcessExecutor(max_workers=args.workers)
    elif args.executor == "ray":
        from hyperkern.ensembles import RayExecutor

        executor = RayExecutor(address=args.ray_address, num_cpus=args.workers)
    threads = args.threads or (1 if args.data == "digits" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    return data, spec, config, executor


def _check_device(text: str):
    """Refuse, before anything trains or is written, a --device this torch cannot use (a ValueError:
    main prints one line and exits 2). Without it every trial failed on the device and was retried."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
            raise ValueError(f"--device {text}: this torch ({torch.__version__}) {why}, so it cannot use CUDA; "
                             "use --device cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: this torch cannot use MPS; use --device cpu")


def _resume_note(runs: str, budget: int) -> str | None:
    """"resumed: N trials loaded, M to train" when the hyper-deep run directory already holds finished
    trials (N counts search and stratification trials; M the search trials still to train)."""
    trials = os.path.join(runs, "hyper_deep", "trials")
    names = [n[:-3] for n in os.listdir(trials) if n.endswith(".pt")] if os.path.isdir(trials) else []
    if not names:
        return None
    search = sum(1 for n in names if n.startswith("search-") and n[7:].isdigit() and int(n[7:]) < budget)
    return (f"resumed: {len(names)} trials loaded, {budget - search} to train (the search's; stratification "
            "trials still missing follow the selection)")


def _hyper_batch_config(args, config):
    """config with the hyper-batch distribution step's Adam learning rate: --hparam-lr, else the
    recipe's (tuned: 3e-3 on digits, where 40 epochs of 17 steps leave 226 distribution steps, in
    which 1e-3 moves an interval endpoint by at most about 0.23 in log space). Only the hyper-batch
    trainer gets it, so the other methods' run directories do not depend on it."""
    import dataclasses

    hparam_lr = args.hparam_lr if args.hparam_lr is not None else get_recipe(args.recipe).distribution_lr(args.data)
    return dataclasses.replace(config, hparam_lr=float(hparam_lr))


def _rank1_spec(args, spec, method: str):
    """spec for the batch or hyper-batch network: --fast-init-std if given, else the recipe's (tuned:
    0.25 for hyper-batch MLPs, where no normalisation layer absorbs the fast-weight scales; else the
    references' 0.5 batch, 0.75 hyper-batch)."""
    import dataclasses

    std = args.fast_init_std
    if std is None:
        std = get_recipe(args.recipe).fast_init_std(args.model, method)
    return dataclasses.replace(spec, kwargs={**spec.kwargs, "fast_init_std": float(std)})


def _batch_type_trainers(args, spec, config, setting: dict, run_dirs: dict, progress: bool, explicit=None):
    """The batch and hyper-batch trainers (unfitted) of the recipe, both starting from the same
    setting with the same label smoothing: the recipe's start (setting, i.e. the search's best or
    the defaults, under tuned; the ranges' log-uniform means under reference), or `explicit` (the
    user's --hparams) when given. run_dirs: {"batch": dir, "hyper_batch": dir}; a method missing
    from it is not built."""
    from hyperkern.ensembles import BatchEnsembleTrainer, HyperBatchEnsembleTrainer

    recipe = get_recipe(args.recipe)
    E = args.ensemble_size
    hb_spec = _rank1_spec(args, spec, "hyper_batch")
    space = hb_spec.build("hyper_batch", E).hparam_space
    if explicit:
        batch_hparams = dict(explicit)
        init = {k: v for k, v in explicit.items() if k in space}
        smoothing = float(explicit.get("label_smoothing", 0.0))
    else:
        batch_hparams, init, smoothing = recipe.batch_type_start(space, setting)
    out = {}
    if "batch" in run_dirs:
        out["batch"] = BatchEnsembleTrainer(_rank1_spec(args, spec, "batch"), E, hparams=batch_hparams,
                                            config=config, seed=args.seed, run_dir=run_dirs["batch"],
                                            progress=progress)
    if "hyper_batch" in run_dirs:
        out["hyper_batch"] = HyperBatchEnsembleTrainer(hb_spec, E, config=_hyper_batch_config(args, config),
                                                       seed=args.seed, init_hparams=init,
                                                       init_space=recipe.init_space, label_smoothing=smoothing,
                                                       run_dir=run_dirs["hyper_batch"], progress=progress)
    return out


def _diversity(trainer, split) -> dict:
    """How much the members differ on split: pairwise disagreement of their top classes, average
    KL between them, and the members' mean NLL alone against the ensemble's (the gain of averaging)."""
    from hyperkern import metrics

    member = trainer.member_proba(split.x).double()
    member_nll = [metrics.nll(p, split.y) for p in member]
    return {"disagreement": metrics.disagreement(member), "average_kl": metrics.average_kl(member),
            "member_nll_mean": sum(member_nll) / len(member_nll), "ensemble_nll": float(trainer.evaluate(split)["nll"])}


def _chance_warning(label: str, trainer, val, num_classes: int, args) -> str | None:
    """A warning when the trained method's validation NLL is near chance (>= 90% of log C): it
    learned nothing, most often because its hyperparameters over-regularise the network."""
    import math

    if val is None or len(val) == 0:
        return None
    nll = float(trainer.evaluate(val)["nll"])
    chance = math.log(num_classes)
    if nll < 0.9 * chance:
        return None
    cause = ("its starting hyperparameters over-regularise the network (L2 strengths are divided by the "
             "number of training images, so ranges and defaults made for large datasets can be far too "
             "strong on small ones)")
    fix = ("pass --hparams with smaller L2 strengths (e.g. '{\"l2_hidden1\": 1.0, ...}'), or use "
           "--recipe tuned, which starts the batch-type arms from the defaults (train) or the search's best "
           "setting (compare)") if args.recipe == "reference" else "pass --hparams with smaller L2 strengths"
    return (f"WARNING: the {label} ends at validation NLL {nll:.3f}, chance is {chance:.3f} ({num_classes} classes): "
            f"it did not learn. Likely cause: {cause}. Fix: {fix}.")


# The paper's checks on test NLL: (method, baseline, relation). "<" and "<=" read on the NLL means.
CHECKS = [("deep", "single", "<"), ("batch", "single", "<"), ("hyper_deep", "single", "<"),
          ("hyper_batch", "single", "<"), ("hyper_deep", "deep", "<="), ("hyper_batch", "batch", "<=")]


def _per_example_nll(trainer, x, y):
    """(N,) float64 -log p(y_i | x_i) of the trainer's (weighted) averaged prediction."""
    import math

    import torch

    lp = trainer.member_log_proba(x).double()
    picked = lp.gather(2, y.long()[None, :, None].expand(lp.shape[0], -1, 1)).squeeze(2)  # (E, N)
    w = trainer.member_weights
    if w is None:
        logw = torch.full((lp.shape[0],), -math.log(lp.shape[0]), dtype=torch.float64)
    else:
        w = torch.as_tensor(w, dtype=torch.float64)
        logw = (w / w.sum()).log()
    return -torch.logsumexp(picked + logw[:, None], dim=0)


def _paired_checks(per_example: dict) -> list[dict]:
    """Each check of CHECKS whose methods ran: mean NLL of both, the mean of the per-image difference
    (method - baseline) and its standard error std / sqrt(N) (paired over the same test images), and
    whether it holds; 'clear' when the difference is more than 2 standard errors from 0."""
    out = []
    for method, baseline, relation in CHECKS:
        if method not in per_example or baseline not in per_example:
            continue
        d = per_example[method] - per_example[baseline]
        n = d.numel()
        diff = float(d.mean())
        se = float(d.std(unbiased=True) / n ** 0.5) if n > 1 else float("nan")
        holds = diff < 0 if relation == "<" else diff <= 0
        out.append({"method": method, "baseline": baseline, "relation": relation,
                    "nll": float(per_example[method].mean()), "baseline_nll": float(per_example[baseline].mean()),
                    "difference": diff, "standard_error": se, "holds": bool(holds),
                    "clear": bool(abs(diff) > 2 * se)})
    return out


def _format_checks(checks: list[dict]) -> str:
    lines = []
    for c in checks:
        verdict = "holds" if c["holds"] else "does not hold"
        strength = "beyond 2 SE" if c["clear"] else "within 2 SE"
        lines.append(f"{METHOD_LABELS[c['method']]} NLL {c['relation']} {METHOD_LABELS[c['baseline']]}: {verdict} "
                     f"({c['nll']:.4f} vs {c['baseline_nll']:.4f}, difference {c['difference']:+.4f} "
                     f"+- {c['standard_error']:.4f}, {strength})")
    return "\n".join(lines)


def _format_table(rows: list[dict]) -> str:
    header = ["method", "accuracy", "NLL", "ECE", "Brier", "parameters", "train time"]
    lines = [[r["label"], f"{r['accuracy']:.4f}", f"{r['nll']:.4f}", f"{r['ece']:.4f}", f"{r['brier']:.4f}",
              f"{r['num_parameters']:,}", f"{r['train_seconds']:.1f} s"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("-+-".join("-" * w for w in widths))
    for line in lines:
        out.append(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def _result_row(name, trainer, test, seconds):
    metrics = trainer.evaluate(test)
    return {"method": name, "label": METHOD_LABELS[name], **metrics, "train_seconds": float(seconds)}


def _write_outputs(output_dir, payload, probs_by_label, labels, quiet_errors) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    written = []
    path = os.path.join(output_dir, "results.json")
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    written.append(path)
    try:
        from hyperkern.metrics import reliability_diagram

        written.append(reliability_diagram(probs_by_label, labels, os.path.join(output_dir, "reliability.png")))
    except ImportError as exc:
        quiet_errors.append(f"no reliability diagram: {exc}")
    return written


def run_compare(args) -> dict:
    from hyperkern.ensembles import DeepEnsemble, HyperDeepEnsemble
    from hyperkern.ensembles.distributed import launched_by_torchrun

    if launched_by_torchrun():  # every rank would train everything and write the same output directory
        raise SystemExit("hyperkern: compare runs in one process; under torchrun use `hyperkern train --method batch` "
                         "or `--method hyper_batch` (data-parallel), or `hyperkern compare --executor process|ray` "
                         "to spread the search")

    data, spec, config, executor = _setup(args)
    if getattr(args, "shift", False):  # fail before training when --shift cannot run
        from hyperkern.robustness.cli import check_shift_ready

        check_shift_ready(args, data)
    progress = not args.no_progress
    E = args.ensemble_size
    runs = os.path.join(args.output_dir, "runs")
    print(f"hyperkern compare: {data.describe()}; model {args.model}, E = {E}, budget {args.budget}, "
          f"{config.epochs} epochs, seed {args.seed}, recipe {args.recipe}", flush=True)
    note = _resume_note(runs, args.budget)
    if note:
        print(note, flush=True)

    start = time.perf_counter()
    hyper_deep = HyperDeepEnsemble(spec, E, budget=args.budget, config=config, seed=args.seed,
                                   run_dir=os.path.join(runs, "hyper_deep"), executor=executor,
                                   progress=progress).fit(data.train, data.val)
    best = min(hyper_deep.search_trials, key=lambda t: t["val_nll"])
    best_group = hyper_deep.stratified_members(best["trial_id"])
    singles = [DeepEnsemble.from_trials(spec, [r], config) for r in best_group]
    deep = DeepEnsemble.from_trials(spec, best_group, config) if len(best_group) == E else None
    hyper_deep_seconds = time.perf_counter() - start  # search + stratification (+ loading on resume)
    tuned = dict(best["hparams"])

    arms = _batch_type_trainers(args, spec, config, tuned, {m: os.path.join(runs, m) for m in ("batch", "hyper_batch")},
                                progress)
    batch = arms["batch"].fit(data.train, data.val)
    hyper_batch = arms["hyper_batch"].fit(data.train, data.val)
    hb_config = hyper_batch.config

    single_rows = [_result_row("single", m, data.test, m.train_seconds) for m in singles]
    rows = [{**{k: (sum(r[k] for r in single_rows) / len(single_rows) if isinstance(v, float) else v)
                for k, v in single_rows[0].items()}, "seeds": len(single_rows)}]
    if deep is not None:
        rows.append(_result_row("deep", deep, data.test, deep.train_seconds))
    rows.append(_result_row("batch", batch, data.test, batch.train_seconds))
    rows.append(_result_row("hyper_deep", hyper_deep, data.test, hyper_deep.train_seconds))
    rows.append(_result_row("hyper_batch", hyper_batch, data.test, hyper_batch.train_seconds))
    trainers = {"single": singles[0], "deep": deep, "batch": batch, "hyper_deep": hyper_deep, "hyper_batch": hyper_batch}
    from hyperkern.robustness.cli import save_compare_models

    save_compare_models(args, data, singles, trainers)  # for `hyperkern evaluate` (no retraining)

    per_example = {"single": sum(_per_example_nll(m, data.test.x, data.test.y) for m in singles) / len(singles)}
    for name in ("deep", "batch", "hyper_deep", "hyper_batch"):
        if trainers[name] is not None:
            per_example[name] = _per_example_nll(trainers[name], data.test.x, data.test.y)
    checks = _paired_checks(per_example)

    table = _format_table(rows)
    print()
    print(table)
    print()
    print("Checks on test NLL (difference = method - baseline, +- its paired standard error over the "
          f"{len(data.test)} test images):")
    print(_format_checks(checks))
    warnings = [w for w in (_chance_warning(METHOD_LABELS[name], trainers[name], data.val, data.num_classes, args)
                            for name in ("batch", "hyper_batch")) if w]
    for warning in warnings:
        print(f"\nhyperkern: {warning}", file=sys.stderr, flush=True)
    notes = []
    payload = {
        "command": "compare", "dataset": data.name, "splits": {"train": len(data.train), "val": len(data.val),
                                                                 "test": len(data.test)},
        "model": args.model, "ensemble_size": E, "budget": args.budget, "seed": args.seed,
        "train_config": config.to_dict(), "recipe": get_recipe(args.recipe).to_dict(),
        "hyper_batch_hparam_lr": hb_config.hparam_lr,
        "batch_type_start": {"batch_hparams": batch.hparams, "hyper_batch_init": hyper_batch.init_hparams,
                             "label_smoothing": hyper_batch.label_smoothing},
        "fast_init_std": {name: next(m.init_std for m in t.network.modules() if hasattr(m, "init_std"))
                          for name, t in (("batch", batch), ("hyper_batch", hyper_batch))},
        "methods": {r["method"]: {k: v for k, v in r.items() if k not in ("method",)} for r in rows},
        "tuned_hparams": tuned,
        "single_models": [{"trial_id": m.members[0]["trial_id"], **{k: v for k, v in r.items() if k != "label"}}
                          for m, r in zip(singles, single_rows)],
        "hyper_deep": {"search_trials": hyper_deep.search_trials, "first_selection": hyper_deep.first_selection,
                       "final_selection": hyper_deep.final_selection,
                       "trained_trial_ids": hyper_deep.trained_trial_ids,
                       "loaded_trial_ids": hyper_deep.loaded_trial_ids, "wall_seconds": hyper_deep_seconds},
        "diversity_on_val": {name: _diversity(t, data.val) for name, t in trainers.items()
                             if t is not None and name != "single"},
        "hyper_batch": {"member_hparams": hyper_batch.member_hparams(),
                        "hparam_history": hyper_batch.hparam_history,
                        "embedding_history": hyper_batch.embedding_history,
                        "interval_log_widths": (hyper_batch.distributions.log_high
                                                - hyper_batch.distributions.log_low).detach().double().tolist()},
        "checks": checks,
        "warnings": warnings,
        "table": table,
    }
    probs = {(r["label"] if r["method"] != "single" else "single model (first seed)"):
             trainers[r["method"]].predict_proba(data.test.x) for r in rows}
    if getattr(args, "shift", False):  # corruptions and OOD: payload["shift"], payload["ood"], two plots
        from hyperkern.robustness.cli import run_shift

        shifted = {"single": singles, **{n: [t] for n, t in trainers.items() if n != "single" and t is not None}}
        run_shift(args, data, shifted, args.output_dir, payload)
    written = _write_outputs(args.output_dir, payload, probs, data.test.y, notes)
    for note in notes:
        print(f"hyperkern: {note}", file=sys.stderr)
    print("\nwrote " + ", ".join(written))
    return payload


def run_train(args) -> dict:
    data, spec, config, executor = _setup(args)
    distributed = _distributed_context(args)
    quiet = distributed is not None and not distributed.is_main  # ranks > 0 train and stay silent
    try:
        return _train(args, data, spec, config, executor, distributed, quiet)
    finally:
        if distributed is not None:
            distributed.destroy()


def _distributed_context(args):
    """A DistributedContext for --distributed or a torchrun launch with several processes, else None."""
    from hyperkern.ensembles.distributed import DistributedContext, launched_by_torchrun

    if not (getattr(args, "distributed", False) or launched_by_torchrun()):
        return None
    if args.method not in ("batch", "hyper_batch"):
        raise SystemExit(f"hyperkern: data-parallel training (--distributed, torchrun) is for --method batch and "
                         f"hyper_batch; {args.method} trains independent networks: use --executor process or ray")
    if args.device.startswith("cuda:"):
        raise SystemExit("hyperkern: with --distributed use --device cuda (each rank uses cuda:LOCAL_RANK)")
    try:
        return DistributedContext.from_env()
    except RuntimeError as exc:
        raise SystemExit(f"hyperkern: --distributed: {exc}")


def _train(args, data, spec, config, executor, distributed, quiet) -> dict:
    from hyperkern.ensembles import DeepEnsemble, HyperDeepEnsemble
    from hyperkern.ensembles.deep import default_hparams

    progress = not args.no_progress and not quiet
    E = args.ensemble_size
    try:
        hparams = json.loads(args.hparams) if args.hparams else {}
    except json.JSONDecodeError as exc:
        raise SystemExit(f"hyperkern: --hparams is not valid JSON ({exc})")
    if not isinstance(hparams, dict) or not all(isinstance(v, (int, float)) for v in hparams.values()):
        raise SystemExit("hyperkern: --hparams must be a JSON object of numbers")
    run_dir = os.path.join(args.output_dir, "run")
    if not quiet:
        ranks = f", {distributed.world_size} data-parallel ranks ({distributed.backend})" if distributed else ""
        print(f"hyperkern train {args.method}: {data.describe()}; model {args.model}, E = {E}, {config.epochs} "
              f"epochs{ranks}", flush=True)
    if args.method in ("single", "deep"):
        trainer = DeepEnsemble(spec, 1 if args.method == "single" else E, hparams=hparams, config=config,
                               seed=args.seed, run_dir=run_dir, executor=executor, progress=progress)
    elif args.method == "hyper_deep":
        trainer = HyperDeepEnsemble(spec, E, budget=args.budget, config=config, seed=args.seed, run_dir=run_dir,
                                    executor=executor, progress=progress)
    else:  # batch, hyper_batch: the recipe's start from the untuned defaults, or --hparams
        trainer = _batch_type_trainers(args, spec, config, default_hparams(spec), {args.method: run_dir}, progress,
                                       explicit=hparams)[args.method]
        config = trainer.config
    trainer.fit(data.train, data.val, **({"distributed": distributed} if distributed is not None else {}))
    if quiet:
        return {"command": "train", "method": args.method, "rank": distributed.rank}
    seconds = trainer.train_seconds
    row = _result_row(args.method, trainer, data.test, seconds)
    table = _format_table([row])
    print()
    print(table)
    warnings = [w for w in [_chance_warning(METHOD_LABELS[args.method], trainer, data.val, data.num_classes, args)] if w]
    for warning in warnings:
        print(f"\nhyperkern: {warning}", file=sys.stderr, flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    model_path = os.path.join(args.output_dir, f"{args.method}.pt")
    trainer.save(model_path)
    payload = {"command": "train", "method": args.method, "dataset": data.name, "model": args.model,
               "ensemble_size": E, "seed": args.seed, "train_config": config.to_dict(), "hparams": hparams,
               "recipe": get_recipe(args.recipe).to_dict(), "metrics": row, "model_file": model_path,
               "table": table, "warnings": warnings}
    notes = []
    written = _write_outputs(args.output_dir, payload, {METHOD_LABELS[args.method]: trainer.predict_proba(data.test.x)},
                             data.test.y, notes)
    for note in notes:
        print(f"hyperkern: {note}", file=sys.stderr)
    print("\nwrote " + ", ".join([model_path] + written))
    return payload


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from hyperkern.data import DataFileError

    try:
        if args.command == "compare":
            run_compare(args)
        elif args.command == "evaluate":
            from hyperkern.robustness.cli import run_evaluate

            run_evaluate(args)
        else:
            run_train(args)
    except (DataFileError, FileNotFoundError) as exc:
        print(f"hyperkern: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"hyperkern: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
