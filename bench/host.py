"""Host cost of the ops and layers: forward + backward at a tiny shape, against the plain torch call.

    python -m bench --suite host                     # part of `python -m bench`; CPU, 1 thread, CPU time
    python -m bench.host --backends auto torch       # this table alone
    python -m bench.host --device cuda               # the same on a GPU (wall clock with synchronisation)

At E=4 members x B=2 rows, 16 -> 16 features (linear) and 4 -> 4 channels, 6x6, 3x3, padding 1 (conv)
there is next to no arithmetic: what a call costs is Python, argument checks, the dispatcher, autograd
bookkeeping and allocations, i.e. the host cost that bounds small networks' steps on a GPU (ResNet-20's
step is host-bound on an H200: docs/benchmark-history.md). It is the same host code on the CPU and on
CUDA except for the kernels themselves, so it is measured here on the CPU at one thread with the CPU
clock (time.process_time, repeatable on a shared machine).

Timing: interleaved rounds of `inner` calls each; a candidate's time is its best round (interference
from other processes only ever adds time to calls this small, so the best round is the repeatable
number; the median is in the JSON). Each candidate runs forward, then backward of a fixed upstream gradient with every input and parameter
requiring grad (AccumulateGrad included, as in training). Ratios are against:
  - ops:    F.linear(x, W, b) / F.conv2d(x, W, b) on the same E*B rows (tensors that require grad);
  - layers: nn.Linear / nn.Conv2d of the same size, called the same way.
The hyper layers get their hyperparameters with check_range=False (the zoo models check them once at
their input, not per layer); the range check's own cost is its own row.
Targets (issue 15): batch-ensemble op / layer <= 1.5x, hyper-batch op / layer <= 2.5x.
The CPU conv ops pick their scheme by size (the one-convolution scheme here); HYPERKERN_CPU_CONV=member
or =one_conv forces one, to compare them at this shape.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import describe_environment, format_markdown_table, format_target, time_interleaved

E, B = 4, 2
FEATURES = 16
CHANNELS, SIZE, KERNEL = 4, 6, 3
NUM_HPARAMS = 3
TARGETS = {"batch": 1.5, "hyper": 2.5}


def _leaf(*shape, device, positive=False):
    t = torch.rand(*shape, device=device) + 0.5 if positive else torch.randn(*shape, device=device)
    return t.requires_grad_()


def _fwd_bwd(fn, grad):
    def step():
        fn().backward(grad)
    return step


def candidates(device, backends=("auto",)) -> list[dict]:
    """[{name, kind ("op" | "layer"), family ("batch" | "hyper" | "check"), floor, fn}]: each fn does one
    forward + backward; floor names the plain call it is compared with."""
    import hyperkern.ops as ops
    from hyperkern.nn import (BatchEnsembleConv2d, BatchEnsembleLinear, HyperBatchEnsembleConv2d,
                              HyperBatchEnsembleLinear)
    from hyperkern.nn.layers import check_hparams

    N, Fe, C = E * B, FEATURES, CHANNELS
    leaf = lambda *shape, **kw: _leaf(*shape, device=device, **kw)  # noqa: E731
    x, w, b = leaf(N, Fe), leaf(Fe, Fe), leaf(Fe)
    r, s, bias, d, db = leaf(E, Fe), leaf(E, Fe), leaf(E, Fe), leaf(Fe, Fe), leaf(E, Fe)
    e1, e2 = leaf(N, Fe), leaf(N, Fe)
    g = torch.randn(N, Fe, device=device)
    xc, wc, bc = leaf(N, C, SIZE, SIZE), leaf(C, C, KERNEL, KERNEL), leaf(C)
    rc, sc, biasc, dc, dbc = leaf(E, C), leaf(E, C), leaf(E, C), leaf(C, C, KERNEL, KERNEL), leaf(E, C)
    e1c, e2c = leaf(N, C), leaf(N, C)
    hpc, embc = leaf(N, NUM_HPARAMS), leaf(2 * C, NUM_HPARAMS)  # the conv hp op's hparams and embedding weight
    gc = torch.randn(N, C, SIZE, SIZE, device=device)
    hp = torch.rand(N, NUM_HPARAMS, device=device)
    lin, conv = nn.Linear(Fe, Fe, device=device), nn.Conv2d(C, C, KERNEL, padding=1, device=device)

    out = [
        {"name": "F.linear", "kind": "op", "family": "floor", "floor": None, "fn": _fwd_bwd(lambda: F.linear(x, w, b), g)},
        {"name": "F.conv2d", "kind": "op", "family": "floor", "floor": None,
         "fn": _fwd_bwd(lambda: F.conv2d(xc, wc, bc, 1, 1), gc)},
        {"name": "nn.Linear", "kind": "layer", "family": "floor", "floor": None, "fn": _fwd_bwd(lambda: lin(x), g)},
        {"name": "nn.Conv2d", "kind": "layer", "family": "floor", "floor": None, "fn": _fwd_bwd(lambda: conv(xc), gc)},
        {"name": "check_hparams (range check)", "kind": "check", "family": "check", "floor": "F.linear",
         "fn": lambda: check_hparams(hp, N, NUM_HPARAMS)},
    ]
    for be in backends:
        first = len(out)
        out += [
            {"name": f"batch_ensemble_linear [{be}]", "kind": "op", "family": "batch", "floor": "F.linear",
             "fn": _fwd_bwd(lambda be=be: ops.batch_ensemble_linear(x, w, r, s, bias, backend=be), g)},
            {"name": f"hyper_batch_ensemble_linear [{be}]", "kind": "op", "family": "hyper", "floor": "F.linear",
             "fn": _fwd_bwd(lambda be=be: ops.hyper_batch_ensemble_linear(x, w, d, r, s, r, s, e1, bias, db, e2,
                                                                          backend=be), g)},
            {"name": f"batch_ensemble_conv2d [{be}]", "kind": "op", "family": "batch", "floor": "F.conv2d",
             "fn": _fwd_bwd(lambda be=be: ops.batch_ensemble_conv2d(xc, wc, rc, sc, biasc, 1, 1, backend=be), gc)},
            {"name": f"hyper_batch_ensemble_conv2d [{be}]", "kind": "op", "family": "hyper", "floor": "F.conv2d",
             "fn": _fwd_bwd(lambda be=be: ops.hyper_batch_ensemble_conv2d(xc, wc, dc, rc, sc, rc, sc, e1c, biasc,
                                                                          dbc, e2c, 1, 1, backend=be), gc)},
            {"name": f"hyper_batch_ensemble_conv2d_hp [{be}]", "kind": "op", "family": "hyper", "floor": "F.conv2d",
             "fn": _fwd_bwd(lambda be=be: ops.hyper_batch_ensemble_conv2d_hp(xc, wc, dc, rc, sc, rc, sc, hpc, embc,
                                                                             biasc, dbc, 1, 1, backend=be), gc)},
        ]
        bel = BatchEnsembleLinear(Fe, Fe, ensemble_size=E, backend=be, device=device)
        hbel = HyperBatchEnsembleLinear(Fe, Fe, ensemble_size=E, num_hparams=NUM_HPARAMS, backend=be, device=device)
        bec = BatchEnsembleConv2d(C, C, KERNEL, padding=1, ensemble_size=E, backend=be, device=device)
        hbec = HyperBatchEnsembleConv2d(C, C, KERNEL, padding=1, ensemble_size=E, num_hparams=NUM_HPARAMS,
                                        backend=be, device=device)
        out += [
            {"name": f"BatchEnsembleLinear [{be}]", "kind": "layer", "family": "batch", "floor": "nn.Linear",
             "fn": _fwd_bwd(lambda m=bel: m(x), g)},
            {"name": f"HyperBatchEnsembleLinear [{be}]", "kind": "layer", "family": "hyper", "floor": "nn.Linear",
             "fn": _fwd_bwd(lambda m=hbel: m(x, hp, check_range=False), g)},
            {"name": f"BatchEnsembleConv2d [{be}]", "kind": "layer", "family": "batch", "floor": "nn.Conv2d",
             "fn": _fwd_bwd(lambda m=bec: m(xc), gc)},
            {"name": f"HyperBatchEnsembleConv2d [{be}]", "kind": "layer", "family": "hyper", "floor": "nn.Conv2d",
             "fn": _fwd_bwd(lambda m=hbec: m(xc, hp, check_range=False), gc)},
        ]
        for c in out[first:]:
            c["backend"] = be
    return out


def run(device="cpu", backends=("auto",), repeats: int = 31, inner: int = 50, clock: str = "cpu") -> list[dict]:
    """Time every candidate in interleaved rounds; rows with the best round's us per call (and the median's)
    and the ratio of best rounds to their floor's."""
    device = torch.device(device)
    cands = candidates(device, backends)
    times = time_interleaved({c["name"]: c["fn"] for c in cands}, device, repeats=repeats, warmup=max(inner // 4, 1),
                             inner=inner, clock=clock if device.type == "cpu" else "wall")
    rows = []
    for c in cands:  # the best round: interference only ever adds time to a call this small
        us = times[c["name"]]["min_ms"] * 1e3
        floor_us = times[c["floor"]]["min_ms"] * 1e3 if c["floor"] else us
        rows.append({"name": c["name"], "kind": c["kind"], "family": c["family"], "floor": c["floor"],
                     "backend": c.get("backend"),
                     "us": us, "median_us": times[c["name"]]["ms"] * 1e3, "ratio": us / floor_us})
    return rows


def format_table(rows: list[dict]) -> str:
    body = [[r["name"], r["kind"], f"{r['us']:.1f}", r["floor"] or "-",
             f"{r['ratio']:.2f}x" if r["floor"] else "-",
             f"<= {TARGETS[r['family']]}x" if r["family"] in TARGETS and r["backend"] == "auto" else "-"]
            for r in rows]
    return format_markdown_table(["candidate", "kind", "us / fwd+bwd (best round)", "against", "ratio", "target"], body,
                                 ["l", "l", "r", "l", "r", "r"])


def check_targets(rows: list[dict]) -> list[dict]:
    """The targets hold for what users get, backend="auto"; other backends' rows are for comparison."""
    return [{"target": f"host cost {r['name']}: <= {TARGETS[r['family']]}x {r['floor']} (fwd+bwd, tiny shape)",
             "value": f"{r['ratio']:.2f}x", "ok": r["ratio"] <= TARGETS[r["family"]]}
            for r in rows if r["family"] in TARGETS and r["backend"] == "auto"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "torch", "cpp", "triton"])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repeats", type=int, default=31, help="interleaved rounds (the best one reported)")
    p.add_argument("--inner", type=int, default=50, help="calls per timed sample")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.inner < 1 or args.threads < 1:
        p.error("--repeats, --inner and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    env = describe_environment(args.device, torch.float32)
    print(f"# host cost ({env['date']}), {env['device_name']}, {args.threads} thread(s), torch {env['torch']}, "
          f"E={E} B={B}; clock: {'cpu (process_time)' if args.device == 'cpu' else 'wall'}")
    rows = run(args.device, tuple(args.backends), args.repeats, args.inner)
    print(format_table(rows))
    for t in check_targets(rows):
        print(format_target(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
