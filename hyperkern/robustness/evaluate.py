"""Metrics of trained methods under distribution shift and for out-of-distribution detection.

methods: {method name: [trainer, ...]}: every trainer of hyperkern.ensembles has member_log_proba(x)
(E, N, C) and member_weights. A method with several trainers (compare's single model: the E tuned
networks one at a time) reports the mean of their metrics, as compare's table does.

Shift (shift_evaluation): NLL, accuracy, ECE and Brier of the averaged prediction on the clean test
split and on each corruption at each severity, the mean over corruptions per severity, and the mean
over all corrupted sets (the reference's c-NLL / c-ACC / c-ECE). OOD (ood_evaluation): AUROC, AUPR and
FPR at 95% TPR of the predictive entropy, and for ensembles (E > 1) of the mutual information, with
the OOD split as the positive class.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from hyperkern import metrics
from hyperkern.robustness import corruptions as C

__all__ = ["METRICS", "predictions", "classification_metrics", "shift_evaluation", "ood_evaluation",
           "format_shift_tables", "format_ood_table"]

METRICS = ("nll", "accuracy", "ece", "brier")
_LABELS = {"single": "single model", "deep": "deep ensemble", "batch": "batch ensemble",
           "hyper_deep": "hyper-deep ensemble", "hyper_batch": "hyper-batch ensemble"}


def label(name: str) -> str:
    return _LABELS.get(name, name)


def _weights(trainer, e: int) -> torch.Tensor:
    w = getattr(trainer, "member_weights", None)
    if w is None:
        return torch.full((e,), 1.0 / e, dtype=torch.float64)
    w = torch.as_tensor(w, dtype=torch.float64)
    return w / w.sum()


@torch.no_grad()
def predictions(trainer, x: torch.Tensor):
    """(log of the weighted mean prediction (N, C), member probabilities (E, N, C), weights (E,)), float64."""
    lp = trainer.member_log_proba(x).double().cpu()
    w = _weights(trainer, lp.shape[0])
    log_mix = torch.logsumexp(lp + w.clamp_min(torch.finfo(torch.float64).tiny).log()[:, None, None], dim=0)
    return log_mix, lp.exp(), w


def classification_metrics(log_mix: torch.Tensor, y: torch.Tensor) -> dict:
    probs = log_mix.exp()
    picked = log_mix.gather(1, y.long()[:, None]).squeeze(1)
    return {"nll": float(-picked.mean()), "accuracy": metrics.accuracy(probs, y), "ece": metrics.ece(probs, y),
            "brier": metrics.brier(probs, y)}


def _mean(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _method_metrics(trainers, x, y, keep=None):
    """Mean metrics over the method's trainers; keep: a list receiving the first trainer's probabilities."""
    rows = []
    for i, trainer in enumerate(trainers):
        log_mix, _, _ = predictions(trainer, x)
        rows.append(classification_metrics(log_mix, y))
        if i == 0 and keep is not None:
            keep.append(log_mix.exp().float())
    return _mean(rows)


def shift_evaluation(methods: dict, test, *, dataset: str, input_shape, corruptions=C.CORRUPTIONS,
                     severities=C.SEVERITIES, seed: int = 0, cache_dir: str | None = None, data_dir=None,
                     max_images: int | None = None, progress: bool = True, log=print) -> tuple[dict, dict]:
    """Evaluate every method on the clean test split and on its corrupted copies.

    test: the test split (x (N, C, H, W), y (N,)). max_images: evaluate a seeded random subset of that
    many test images (default: all). Returns (result, plot_data): result goes into results.json
    ("shift"); plot_data holds the first trainer's probabilities of each method on the clean images
    and pooled over the corruptions at the highest severity, and the labels, for the plots."""
    from hyperkern.data.corrupted import find_corrupted_dir, read_corrupted, read_corrupted_labels
    from hyperkern.ensembles._common import progress_bar

    corruptions = C.check_corruptions(corruptions)
    severities = C.check_severities(severities)
    x, y = test.x, test.y
    n_all = int(y.shape[0])
    if max_images is not None and max_images < n_all:
        g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        indices = torch.randperm(n_all, generator=g)[:max_images].sort().values
    else:
        indices = torch.arange(n_all)
    x, y = x[indices], y[indices]
    channels, height, width = (int(v) for v in input_shape)
    codec = C.pixel_codec(dataset, channels)
    clean_pixels = codec.to_pixels(x)
    real_dir = find_corrupted_dir(data_dir, dataset)
    notes, skipped = [], []
    if real_dir is not None:
        read_corrupted_labels(real_dir, test.y.numpy())
        source = f"{os.path.basename(real_dir)} files in {real_dir}"
        log(f"hyperkern: shift: reading the corrupted test sets from {real_dir}")
    else:
        version = C.library_version()
        if version is None:
            C._import_library()  # raises the ImportError that says how to install it
        source = f"{C.LIBRARY} {version}"
    cache = C.CorruptionCache(cache_dir, source, dataset, seed, clean_pixels, indices.numpy())

    start = time.perf_counter()
    keep_clean: dict[str, list] = {name: [] for name in methods}
    clean = {name: _method_metrics(trainers, x, y, keep_clean[name]) for name, trainers in methods.items()}
    per = {name: {} for name in methods}
    pooled = {name: [] for name in methods}
    top = max(severities)
    corrupt_seconds = 0.0
    bar = progress_bar(corruptions, enabled=progress, desc="corruptions")
    for corruption in bar:
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(corruption=corruption)
        for severity in severities:
            t0 = time.perf_counter()
            pixels = None
            if real_dir is not None:
                if os.path.isfile(os.path.join(real_dir, f"{corruption}.npy")):
                    pixels = read_corrupted(real_dir, corruption, severity, n_all, input_shape)[indices.numpy()]
                elif severity == severities[0]:
                    notes.append(f"{real_dir}/{corruption}.npy not found: {corruption} computed with {C.LIBRARY} "
                                 "instead")
            if pixels is None:
                pixels = cache.get(corruption, severity)
                if pixels is None:
                    pixels = C.corrupt_images(clean_pixels, corruption, severity, seed=seed, indices=indices.numpy())
                    cache.put(corruption, severity, pixels)
                note = C.size_notes(corruption, severity, height, width)
                if note and note not in notes:
                    notes.append(note)
            corrupt_seconds += time.perf_counter() - t0
            if np.array_equal(pixels, clean_pixels):
                reason = (f"{corruption} severity {severity} leaves every one of the {len(y)} images unchanged at "
                          f"{height}x{width}")
                skipped.append({"corruption": corruption, "severity": severity, "reason": reason})
                log(f"hyperkern: shift: skipped: {reason}")
                continue
            xc = codec.from_pixels(pixels)
            for name, trainers in methods.items():
                keep = pooled[name] if severity == top else None
                per[name].setdefault(corruption, {})[str(severity)] = _method_metrics(trainers, xc, y, keep)
    for note in cache.notes:
        notes.append(note)
    for note in notes:
        log(f"hyperkern: shift: {note}")

    result_methods = {}
    for name in methods:
        by_severity = {}
        for s in severities:
            rows = [per[name][c][str(s)] for c in per[name] if str(s) in per[name][c]]
            if rows:
                by_severity[str(s)] = {**_mean(rows), "corruptions": len(rows)}
        every = [r for c in per[name].values() for r in c.values()]
        result_methods[name] = {"label": label(name), "clean": clean[name], "per_corruption": per[name],
                                "per_severity": by_severity,
                                "mean": {**_mean(every), "sets": len(every)} if every else None}
    result = {"source": source, "corruptions": list(corruptions), "severities": list(severities),
              "images": int(len(y)), "test_images": n_all, "seed": int(seed), "skipped": skipped, "notes": notes,
              "cache": cache.path, "seconds": {"corrupt": corrupt_seconds,
                                               "total": time.perf_counter() - start},
              "methods": result_methods}
    plot_data = {"labels": y, "clean": {n: v[0] for n, v in keep_clean.items() if v},
                 "shifted": {n: torch.cat(v) for n, v in pooled.items() if v}, "top_severity": top,
                 "shifted_labels": y.repeat(max((len(v) for v in pooled.values()), default=0))}
    return result, plot_data


def ood_evaluation(methods: dict, test_x: torch.Tensor, splits) -> dict:
    """AUROC / AUPR / FPR95 of each method on each OOD split against the clean test images, scored by
    the predictive entropy and, for ensembles, the mutual information (means over a method's trainers)."""
    out = {"splits": {s.name: {"description": s.description, "images": int(s.x.shape[0])} for s in splits},
           "in_distribution_images": int(test_x.shape[0]), "positive_class": "out-of-distribution",
           "methods": {}}
    if not splits:
        return out
    for name, trainers in methods.items():
        scores_in = []
        for trainer in trainers:
            log_mix, member, w = predictions(trainer, test_x)
            scores_in.append(_scores(log_mix, member, w))
        per_split = {}
        for split in splits:
            rows = {"entropy": [], "mutual_information": []}
            for trainer, s_in in zip(trainers, scores_in):
                s_out = _scores(*predictions(trainer, split.x))
                rows["entropy"].append(metrics.ood_detection(s_in["entropy"], s_out["entropy"]))
                if s_in["mutual_information"] is not None:
                    rows["mutual_information"].append(metrics.ood_detection(s_in["mutual_information"],
                                                                            s_out["mutual_information"]))
            per_split[split.name] = {"entropy": _mean(rows["entropy"]),
                                     "mutual_information": _mean(rows["mutual_information"])
                                     if rows["mutual_information"] else None}
        out["methods"][name] = per_split
    return out


def _scores(log_mix, member, w) -> dict:
    entropy = metrics.predictive_entropy(log_mix.exp())
    mi = metrics.mutual_information(member, w) if member.shape[0] > 1 else None
    return {"entropy": entropy, "mutual_information": mi}


# ---------------------------------------------------------------------------------------------
# tables

def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("-+-".join("-" * w for w in widths))
    for line in lines:
        out.append(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return out


def format_shift_tables(result: dict) -> str:
    """One table per metric: the clean test split, each severity's mean over corruptions, and the mean
    over every corrupted set (c-NLL, c-ACC, c-ECE, c-Brier)."""
    severities = [str(s) for s in result["severities"]]
    names = {"nll": ("NLL", "c-NLL"), "accuracy": ("accuracy", "c-ACC"), "ece": ("ECE", "c-ECE"),
             "brier": ("Brier", "c-Brier")}
    n_corr = len(result["corruptions"])
    blocks = [f"Under shift: {n_corr} corruption{'s' if n_corr != 1 else ''} x severities "
              f"{', '.join(severities)} of {result['images']} test images ({result['source']}); each severity "
              "column is the mean over corruptions"]
    for key, (title, mean_title) in names.items():
        header = [title, "clean", *[f"sev {s}" for s in severities], mean_title]
        lines = []
        for m in result["methods"].values():
            row = [m["label"], f"{m['clean'][key]:.4f}"]
            row += [f"{m['per_severity'][s][key]:.4f}" if s in m["per_severity"] else "-" for s in severities]
            row.append(f"{m['mean'][key]:.4f}" if m["mean"] else "-")
            lines.append(row)
        blocks.append("\n".join(_table(header, lines)))
    if result["skipped"]:
        blocks.append("skipped: " + "; ".join(s["reason"] for s in result["skipped"]))
    return "\n\n".join(blocks)


def format_ood_table(result: dict) -> str:
    if not result["splits"]:
        return "Out-of-distribution detection: no OOD split"
    header = ["method", "OOD split", "AUROC H", "AUPR H", "FPR95 H", "AUROC MI", "AUPR MI", "FPR95 MI"]
    lines = []
    for name, per_split in result["methods"].items():
        for split, row in per_split.items():
            ent, mi = row["entropy"], row["mutual_information"]
            lines.append([label(name), split, f"{ent['auroc']:.4f}", f"{ent['aupr']:.4f}", f"{ent['fpr95']:.4f}",
                          *([f"{mi['auroc']:.4f}", f"{mi['aupr']:.4f}", f"{mi['fpr95']:.4f}"] if mi else ["-"] * 3)])
    head = (f"Out-of-distribution detection against the {result['in_distribution_images']} clean test images (OOD "
            "is the positive class; H: predictive entropy, MI: mutual information of the members, ensembles only)")
    return head + "\n" + "\n".join(_table(header, lines))
