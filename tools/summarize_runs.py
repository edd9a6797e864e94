"""Tables of several `hyperkern compare` runs (one results.json each, e.g. one per seed), as Markdown.

    python tools/summarize_runs.py runs/fmnist/mlp-tuned-s*/results.json

Prints: test NLL per seed and method with the mean; accuracy and ECE means; the paper's checks per
seed (difference +- its paired standard error over the test images) and on the mean (the mean
difference +- its standard error over the seeds, which carries the training noise); and the
diagnostics compare records (the ensembles' diversity on the validation split, the hyper-batch
embedding norms and interval widths at the end).
"""
from __future__ import annotations

import json
import math
import sys

METHODS = ["single", "deep", "batch", "hyper_deep", "hyper_batch"]
LABELS = {"single": "single", "deep": "deep", "batch": "batch", "hyper_deep": "hyper-deep", "hyper_batch": "hyper-batch"}


def _mean_se(values):
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(paths: list[str]) -> str:
    runs = [json.load(open(p)) for p in paths]
    runs.sort(key=lambda r: r["seed"])
    out = []
    head = runs[0]
    out.append(f"{head['dataset']}, {head['model']}, E = {head['ensemble_size']}, budget {head['budget']}, "
               f"{head['train_config']['epochs']} epochs, recipe {head.get('recipe', {}).get('name', 'tuned')}; "
               f"splits train {head['splits']['train']} / val {head['splits']['val']} / test {head['splits']['test']}")
    out.append("")
    out.append("| seed | " + " | ".join(LABELS[m] for m in METHODS) + " |")
    out.append("|---|" + "---:|" * len(METHODS))
    for r in runs:
        best = min(r["methods"][m]["nll"] for m in METHODS if m in r["methods"])
        cells = []
        for m in METHODS:
            v = r["methods"].get(m, {}).get("nll")
            cells.append("-" if v is None else (f"**{v:.4f}**" if v == best else f"{v:.4f}"))
        out.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    for metric in ("nll", "accuracy", "ece"):
        means = [sum(r["methods"][m][metric] for r in runs) / len(runs) for m in METHODS]
        out.append(f"| mean {metric} | " + " | ".join(f"{v:.4f}" for v in means) + " |")
    out.append("")
    out.append("| check (test NLL) | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean over seeds |")
    out.append("|---|" + "---|" * (len(runs) + 1))
    for i, c0 in enumerate(runs[0]["checks"]):
        cells, diffs = [], []
        for r in runs:
            c = r["checks"][i]
            diffs.append(c["difference"])
            cells.append(f"{'yes' if c['holds'] else 'no'}, {c['difference']:+.4f} ± {c['standard_error']:.4f}")
        mean, se = _mean_se(diffs)
        holds = mean < 0 if c0["relation"] == "<" else mean <= 0
        cells.append(f"{'yes' if holds else 'no'}, {mean:+.4f} ± {se:.4f}")
        out.append(f"| {LABELS[c0['method']]} {c0['relation']} {LABELS[c0['baseline']]} | " + " | ".join(cells) + " |")
    if all("diversity_on_val" in r for r in runs):
        out.append("")
        out.append("Diversity on the validation split (mean over seeds): disagreement / average KL / members' "
                   "NLL alone -> ensemble NLL")
        out.append("")
        for m in METHODS[1:]:
            rows = [r["diversity_on_val"][m] for r in runs if m in r["diversity_on_val"]]
            if not rows:
                continue
            avg = {k: sum(row[k] for row in rows) / len(rows) for k in rows[0]}
            out.append(f"- {LABELS[m]}: {avg['disagreement']:.4f} / {avg['average_kl']:.4f} / "
                       f"{avg['member_nll_mean']:.4f} -> {avg['ensemble_nll']:.4f}")
        hb = [r["hyper_batch"] for r in runs]
        if all(h.get("embedding_history") for h in hb):
            norms = [sum(h["embedding_history"][-1].values()) / len(h["embedding_history"][-1]) for h in hb]
            widths = [sum(sum(w) for w in h["interval_log_widths"]) / sum(len(w) for w in h["interval_log_widths"])
                      for h in hb]
            out.append(f"- hyper-batch at the end, per seed: mean embedding norm "
                       + ", ".join(f"{v:.3f}" for v in norms) + "; mean interval log width "
                       + ", ".join(f"{v:.2f}" for v in widths))
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(summarize(sys.argv[1:]))
