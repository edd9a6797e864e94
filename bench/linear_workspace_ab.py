"""A/B of the CPU linear kernels' scratch workspace (HYPERKERN_CPU_WORKSPACE=1 vs 0), switched per call
inside one process so both sides see the same machine state: forward+backward (the gradient of every
input) of batch_ensemble_linear and hyper_batch_ensemble_linear, backend "cpp", against the floor (one
F.linear over the E*B rows; 2*out outputs for the hyper op). Median of interleaved rounds, thread CPU
time, one thread.

    python bench/linear_workspace_ab.py [--shapes 512 1024] [--rounds 21]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import hyperkern.ops as ops


def run(width: int, rounds: int, E: int = 4, B: int = 256) -> dict:
    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    x, w, delta, w_floor, w_floor2 = leaf(E * B, width), leaf(width, width), leaf(width, width), \
        leaf(width, width), leaf(2 * width, width)
    r, s, u, v, b, db = leaf(E, width), leaf(E, width), leaf(E, width), leaf(E, width), leaf(E, width), leaf(E, width)
    e1, e2 = leaf(E * B, width), leaf(E * B, width)
    g, g2 = torch.randn(E * B, width), torch.randn(E * B, 2 * width)
    hyper_inputs = [x, w, delta, r, s, u, v, e1, b, db, e2]

    def batch():
        torch.autograd.grad(ops.batch_ensemble_linear(x, w, r, s, b, backend="cpp"), [x, w, r, s, b], g)

    def hyper():
        torch.autograd.grad(ops.hyper_batch_ensemble_linear(*hyper_inputs, backend="cpp"), hyper_inputs, g)

    def with_workspace(fn, on):
        def call():
            os.environ["HYPERKERN_CPU_WORKSPACE"] = "1" if on else "0"
            fn()
        return call

    candidates = {"floor": lambda: torch.autograd.grad(F.linear(x, w_floor), [x, w_floor], g),
                  "floor2": lambda: torch.autograd.grad(F.linear(x, w_floor2), [x, w_floor2], g2),
                  "batch ws": with_workspace(batch, True), "batch no-ws": with_workspace(batch, False),
                  "hyper ws": with_workspace(hyper, True), "hyper no-ws": with_workspace(hyper, False)}
    times = {k: [] for k in candidates}
    for fn in candidates.values():
        fn()
        fn()
    for _ in range(rounds):
        for k, fn in candidates.items():
            start = time.thread_time()
            fn()
            fn()
            times[k].append((time.thread_time() - start) / 2)
    os.environ.pop("HYPERKERN_CPU_WORKSPACE", None)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=int, nargs="+", default=[512, 1024], help="in = out widths (E=4, B=256)")
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| in=out | floor ms | batch, workspace | batch, no workspace | floor (2*out) ms | hyper, workspace | "
          "hyper, no workspace |\n|---|---:|---:|---:|---:|---:|---:|")
    for width in args.shapes:
        m = run(width, args.rounds)
        print(f"| {width} | {m['floor']:.2f} | {m['batch ws'] / m['floor']:.3f}x | {m['batch no-ws'] / m['floor']:.3f}x "
              f"| {m['floor2']:.2f} | {m['hyper ws'] / m['floor2']:.3f}x | {m['hyper no-ws'] / m['floor2']:.3f}x |",
              flush=True)


if __name__ == "__main__":
    main()
