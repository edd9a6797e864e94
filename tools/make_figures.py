"""The pictures in docs/, made by the project's own code:

    python tools/make_figures.py            # runs what it needs, then writes docs/*.png

- docs/bench-models.png: the model-level benchmark (`python -m bench --suite models`): time per
  training step and peak memory of every variant, hyperkern's batch and hyper-batch ensembles against
  the torch composition, the TabM-style and torch-uncertainty-style layers and the deep ensemble (a
  Python loop and vmap);
- docs/bench-ops.png: the op-level benchmark (`python -m bench --suite ops`): each variant's time as a
  multiple of the floor (one plain F.linear / conv2d over the same E*B rows);
- docs/reliability-digits.png: the reliability diagrams of the main job (`hyperkern compare`), copied
  from its output directory.

By default it runs the quick suites on the CPU with one thread and the process-CPU-time clock
(`python -m bench --suite models --quick --threads 1 --clock cpu --json ...`, then the same for the ops;
a few minutes each), and takes the reliability diagram from --compare-dir, running `hyperkern compare
--output-dir DIR` there first if DIR has none. Give --models-json / --ops-json to draw from earlier
`python -m bench --json` files instead. Every picture is labelled with the date, the machine, the
threads, the clock and the load average the benchmark recorded.

Needs matplotlib (the [plot] extra). Run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# variant -> (label, colour group); the order is the bars' order, top to bottom
MODEL_VARIANTS = [
    ("plain", "plain network, E*B images (the floor)", "floor"),
    ("batch", "batch ensemble, hyperkern (cpp)", "hyperkern"),
    ("hyper_batch", "hyper-batch ensemble, hyperkern (cpp)", "hyperkern"),
    ("batch[torch]", "batch ensemble, torch composition", "peer"),
    ("batch/tabm", "batch ensemble, TabM-style layers", "peer"),
    ("batch/torch_unc", "batch ensemble, torch-uncertainty-style layers", "peer"),
    ("deep/loop", "deep ensemble, Python loop over E networks", "deep"),
    ("deep/vmap", "deep ensemble, torch.func vmap", "deep"),
]
OP_VARIANTS = [  # variant -> (label, colour group)
    ("cpp", "hyperkern cpp", "hyperkern"),
    ("cpp-kernel", "hyperkern cpp, no validation", "hyperkern"),
    ("cpp (recompute hd)", "hyperkern cpp, delta branch recomputed", "hyperkern"),
    ("triton", "hyperkern triton", "hyperkern"),
    ("torch", "torch composition", "peer"),
    ("torch.compile", "torch.compile of the composition", "peer"),
    ("tabm", "TabM-style", "peer"),
    ("torch_unc", "torch-uncertainty-style", "peer"),
    ("member loop", "one conv per member (a loop)", "deep"),
]
COLOURS = {"floor": "#9e9e9e", "hyperkern": "#1f77b4", "peer": "#ff7f0e", "deep": "#2ca02c"}


def run_bench(suite: str, path: str, threads: int) -> None:
    cmd = [sys.executable, "-m", "bench", "--suite", suite, "--quick", "--threads", str(threads), "--json", path]
    if threads == 1:
        cmd[cmd.index("--json"):cmd.index("--json")] = ["--clock", "cpu"]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def environment_label(result: dict) -> str:
    """One line saying where and when the numbers were measured, and how loaded the machine was."""
    env, args = result["environment"], result["args"]
    clock = "CUDA events" if env["device"] == "cuda" else {"cpu": "process CPU time", "wall": "wall clock"}[
        args.get("clock", "wall")]
    text = (f"{env['date']}, {env['device_name']}, {env['threads']} thread(s) of {env['cpu_count']} CPUs, "
            f"{clock}, torch {env['torch']}")
    load = env.get("load_average_1min")
    if load is not None:
        shared = load > 0.5 * env["cpu_count"]
        text += (f"; load average {load:g}: " + ("machine shared with other jobs, timings noisy" if shared
                                                 else "quiet machine"))
    return text + (" (--quick)" if args.get("quick") else "")


def _setup_matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_models(result: dict, path: str, mode: str = "train") -> str:
    """Per model: time per step and peak memory of every variant, as horizontal bars."""
    plt = _setup_matplotlib()
    rows = [r for r in result["suites"]["models"]["rows"] if r["mode"] == mode]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 1.2 + 2.9 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        by = {r["variant"]: r for r in rows if r["model"] == model}
        present = [(v, label, group) for v, label, group in MODEL_VARIANTS if v in by]
        labels = [label for _, label, _ in present]
        colours = [COLOURS[group] for _, _, group in present]
        plain = by.get("plain", {}).get("ms")
        ms = [by[v]["ms"] for v, _, _ in present]
        ax = axes[i][0]
        ax.barh(range(len(ms)), ms, color=colours)
        for y, value in enumerate(ms):
            ratio = f"  {value:.0f} ms" + (f" ({value / plain:.2f}x)" if plain else "")
            ax.text(value, y, ratio, va="center", fontsize=8)
        ax.set_yticks(range(len(ms)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(ms) * 1.35)
        ax.set_xlabel(f"ms per {'training step' if mode == 'train' else 'inference pass'} (median)")
        first = next(iter(by.values()))
        ax.set_title(f"{model}: {first['rows']} member-images per step", fontsize=10, loc="left")
        ax = axes[i][1]
        peaks = [by[v]["peak_mib"] for v, _, _ in present]
        if all(p is None for p in peaks):
            ax.text(0.5, 0.5, "peak memory not measured (--no-memory)", ha="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        peaks = [p or 0.0 for p in peaks]
        ax.barh(range(len(peaks)), peaks, color=colours)
        for y, value in enumerate(peaks):
            ax.text(value, y, f"  {value:.0f}", va="center", fontsize=8)
        ax.set_yticks(range(len(peaks)), [""] * len(peaks))
        ax.invert_yaxis()
        ax.set_xlim(0, max(peaks) * 1.25)
        ax.set_xlabel("peak MiB allocated by one step")
    fig.suptitle(f"Model-level benchmark, {mode} step, float32 (python -m bench --suite models)\n"
                 f"{environment_label(result)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shape_text(r: dict) -> str:
    shape = r["shape"]
    text = shape if isinstance(shape, str) else "x".join(str(v) for v in shape)
    return f"{text} {r['format']}" if r.get("format") else text


def plot_ops(result: dict, path: str) -> str:
    """Per op: every variant's time as a multiple of the floor, per shape and mode (grouped bars)."""
    plt = _setup_matplotlib()
    rows = [r for r in result["suites"]["ops"]["rows"] if r["variant"] != "floor"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 1.0 + 2.6 * len(ops)), squeeze=False)
    known = [v for v, _, _ in OP_VARIANTS]
    for ax, op in zip((a[0] for a in axes), ops):
        mine = [r for r in rows if r["op"] == op]
        groups = list(dict.fromkeys((_shape_text(r), r["mode"], r["dtype"]) for r in mine))
        variants = [v for v in known if any(r["variant"] == v for r in mine)]
        variants += sorted({r["variant"] for r in mine} - set(variants))
        width = 0.8 / max(len(variants), 1)
        for j, variant in enumerate(variants):
            label, group = next(((lab, g) for v, lab, g in OP_VARIANTS if v == variant), (variant, "peer"))
            xs, ys = [], []
            for k, key in enumerate(groups):
                hit = [r for r in mine if (_shape_text(r), r["mode"], r["dtype"]) == key and r["variant"] == variant]
                if hit:
                    xs.append(k + (j - (len(variants) - 1) / 2) * width)
                    ys.append(hit[0]["ratio"])
            same = [v for v in variants if next((g for w, _, g in OP_VARIANTS if w == v), "peer") == group]
            shade = 1.0 - 0.45 * same.index(variant) / max(len(same) - 1, 1)  # lighter within a group
            ax.bar(xs, ys, width=width, label=label, color=COLOURS[group], alpha=shade, edgecolor="white")
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(groups)), [f"{s}\n{m}, {d}" for s, m, d in groups], fontsize=7)
        ax.set_ylabel("x floor")
        ax.set_title(op, fontsize=10, loc="left")
        ax.legend(fontsize=7, ncol=4, loc="upper left")
        top = max((r["ratio"] for r in mine), default=1.0)
        ax.set_ylim(0, max(2.0, top * 1.2))
    fig.suptitle("Op-level benchmark: time / the floor (one plain F.linear / conv2d over the same E*B rows; "
                 "dashed line = 1)\n" + environment_label(result), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability_from_compare(compare_dir: str, path: str, run: bool) -> str:
    """Copy compare_dir/reliability.png (drawn by `hyperkern compare` with
    hyperkern.metrics.reliability_diagram); run the main job there first when it has none."""
    source = os.path.join(compare_dir, "reliability.png")
    if not os.path.isfile(source):
        if not run:
            raise SystemExit(f"make_figures: {source} does not exist (run hyperkern compare --output-dir "
                             f"{compare_dir}, or leave out --no-run)")
        cmd = [sys.executable, "-m", "hyperkern", "compare", "--output-dir", compare_dir, "--no-progress"]
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    shutil.copyfile(source, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/make_figures.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where the PNGs go (default: docs/)")
    p.add_argument("--models-json", default=None,
                   help="a `python -m bench --suite models --json` file to draw from (default: run the quick suite)")
    p.add_argument("--ops-json", default=None,
                   help="a `python -m bench --suite ops --json` file to draw from (default: run the quick suite)")
    p.add_argument("--compare-dir", default=os.path.join(ROOT, "hyperkern-compare"),
                   help="output directory of a `hyperkern compare` run whose reliability.png to use (default: "
                        "./hyperkern-compare, the main job's)")
    p.add_argument("--threads", type=int, default=1, help="threads of the benchmark runs (default: 1, with the "
                   "process-CPU-time clock, which stays repeatable on a shared machine)")
    p.add_argument("--no-run", action="store_true", help="only draw from existing files; run nothing")
    p.add_argument("--only", choices=["models", "ops", "reliability"], action="append", default=None,
                   help="make only this picture (repeatable; default: all three)")
    args = p.parse_args(argv)
    only = set(args.only or ["models", "ops", "reliability"])
    os.makedirs(args.out, exist_ok=True)
    written = []
    for suite, given in (("models", args.models_json), ("ops", args.ops_json)):
        if suite not in only:
            continue
        path = given or os.path.join(args.out, f".bench-{suite}.json")
        if given is None:
            if args.no_run:
                raise SystemExit(f"make_figures: --no-run needs --{suite}-json")
            run_bench(suite, path, args.threads)
        with open(path) as f:
            result = json.load(f)
        plot = plot_models if suite == "models" else plot_ops
        written.append(plot(result, os.path.join(args.out, f"bench-{suite}.png")))
        if given is None:
            os.remove(path)
    if "reliability" in only:
        written.append(reliability_from_compare(args.compare_dir, os.path.join(args.out, "reliability-digits.png"),
                                                run=not args.no_run))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
