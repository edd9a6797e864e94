"""Pictures of the shift evaluation (need matplotlib: the plot extra).

shift_plot: NLL and ECE against severity for every method, as in Ovadia et al. (2019)'s shift figures:
at each severity one box per method over the corruptions (the whiskers span their range), the clean
test split at severity 0, and a line through the means.

reliability_counts: one column per method, a reliability diagram (accuracy per confidence bin with the
gap to the diagonal) over the number of test images in each bin, printed on the bar; the clean test
split in the top rows, every corruption at the highest severity pooled in the bottom rows.
"""
from __future__ import annotations

import numpy as np

from hyperkern import metrics

__all__ = ["shift_plot", "reliability_counts"]

_COLORS = {"single": "tab:gray", "deep": "tab:blue", "batch": "tab:orange", "hyper_deep": "tab:green",
           "hyper_batch": "tab:red"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('the shift plots need matplotlib: pip install "hyperkern[plot]"') from exc
    return plt


def shift_plot(result: dict, path: str, title: str | None = None) -> str:
    """NLL and ECE against severity (0 = clean) per method from shift_evaluation's result; writes a PNG."""
    plt = _pyplot()
    methods = result["methods"]
    severities = [str(s) for s in result["severities"]]
    positions = np.arange(len(severities) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    k = len(methods)
    width = 0.8 / max(k, 1)
    for ax, key, name in zip(axes, ("nll", "ece"), ("NLL", "ECE")):
        for i, (method, m) in enumerate(methods.items()):
            color = _COLORS.get(method, f"C{i}")
            offset = (i - (k - 1) / 2) * width
            data = [[m["clean"][key]]]
            data += [[c[s][key] for c in m["per_corruption"].values() if s in c] or [np.nan] for s in severities]
            ax.boxplot(data, positions=positions + offset, widths=width * 0.85, patch_artist=True, showfliers=True,
                       whis=(0, 100), boxprops={"facecolor": color, "alpha": 0.45, "edgecolor": color},
                       medianprops={"color": color}, whiskerprops={"color": color}, capprops={"color": color},
                       flierprops={"markeredgecolor": color, "markersize": 3})
            means = [np.nanmean(d) for d in data]
            ax.plot(positions + offset, means, "-o", color=color, markersize=3, linewidth=1.2, label=m["label"])
        ax.set_xticks(positions)
        ax.set_xticklabels(["clean", *severities])
        ax.set_xlabel("corruption severity")
        ax.set_ylabel(f"{name} (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    n = len(result["corruptions"])
    fig.suptitle(title or f"Under shift: {n} corruptions, {result['images']} test images; boxes over corruptions, "
                          "lines through the means", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def _panel(ax_rel, ax_cnt, probs, labels, num_bins, title, color):
    edges, counts, conf, acc = metrics.calibration_bins(probs, labels, num_bins)
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = counts > 0
    ax_rel.bar(centers[filled], acc[filled], width=width, edgecolor="black", linewidth=0.5, color=color,
               alpha=0.8, label="accuracy")
    ax_rel.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=width, edgecolor="tab:red",
               fill=False, hatch="///", linewidth=0.6, label="gap to confidence")
    ax_rel.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax_rel.set_xlim(0, 1)
    ax_rel.set_ylim(0, 1)
    ax_rel.tick_params(labelbottom=False, labelsize=6)
    if title:
        ax_rel.set_title(title, fontsize=9)
    ax_rel.text(0.97, 0.03, f"ECE {metrics.ece(probs, labels, num_bins):.4f}\n{len(labels)} images", ha="right",
                va="bottom", fontsize=7, transform=ax_rel.transAxes,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    ax_cnt.bar(centers[filled], counts[filled], width=width, color="0.6", edgecolor="black", linewidth=0.5)
    ax_cnt.set_yscale("log")
    ax_cnt.set_xlim(0, 1)
    ax_cnt.set_ylim(0.8, max(counts.max(), 1) * 300)
    for c, n in zip(centers[filled], counts[filled]):
        ax_cnt.text(c, n * 1.3, f"{int(n)}", ha="center", va="bottom", fontsize=5, rotation=90)
    ax_cnt.set_xlabel("confidence", fontsize=8)
    ax_cnt.tick_params(labelsize=6)


def reliability_counts(plot_data: dict, labels_of: dict, path: str, num_bins: int = 15) -> str:
    """Reliability diagrams with the count in each bin, clean (top) and pooled highest severity (bottom)."""
    plt = _pyplot()
    names = [n for n in labels_of if n in plot_data["clean"]]
    rows = [("clean", plot_data["clean"], plot_data["labels"], "clean test")]
    if plot_data.get("shifted"):
        rows.append(("shifted", plot_data["shifted"], plot_data["shifted_labels"],
                     f"severity {plot_data['top_severity']}, all corruptions pooled"))
    fig = plt.figure(figsize=(2.6 * len(names), 3.6 * len(rows)))
    grid = fig.add_gridspec(2 * len(rows), len(names), height_ratios=[3, 1] * len(rows), hspace=0.35, wspace=0.3)
    for r, (_, probs_of, labels, what) in enumerate(rows):
        for c, name in enumerate(names):
            ax_rel = fig.add_subplot(grid[2 * r, c])
            ax_cnt = fig.add_subplot(grid[2 * r + 1, c], sharex=ax_rel)
            _panel(ax_rel, ax_cnt, probs_of[name], labels, num_bins, labels_of[name] if r == 0 else None,
                   _COLORS.get(name, "tab:blue"))
            if c == 0:
                ax_rel.set_ylabel(f"{what}\naccuracy", fontsize=8)
                ax_cnt.set_ylabel("images", fontsize=8)
                if r == 0:
                    ax_rel.legend(fontsize=6, loc="upper left")
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
