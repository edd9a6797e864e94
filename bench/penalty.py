"""What the hyper layers' L2 penalty adds to a training step's layer work.

    python -m bench.penalty                      # E = 4 x 256 rows, 512 -> 512, 2 threads, wall clock
    python -m bench.penalty --threads 1 --clock cpu

HyperBatchEnsembleLinear forward + backward, with and without its penalty (l2_penalty(lam, hparams):
the mean over rows of lam_i ||W + Delta e1_i||^2 plus the bias term) in the loss, against nn.Linear of
the same size. Interleaved rounds, best round. Target (issue 15): the penalty adds at most 0.25x to
the layer's forward + backward.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

from bench.common import format_target, time_interleaved

TARGET = 0.25


def run(E: int = 4, B: int = 256, width: int = 512, num_hparams: int = 5, repeats: int = 15,
        clock: str = "wall") -> dict:
    from hyperkern.nn import HyperBatchEnsembleLinear

    torch.manual_seed(0)
    N = E * B
    layer = HyperBatchEnsembleLinear(width, width, ensemble_size=E, num_hparams=num_hparams)
    plain = nn.Linear(width, width)
    x = torch.randn(N, width, requires_grad=True)
    hp, lam, g = torch.rand(N, num_hparams), torch.rand(N) * 10, torch.randn(N, width)

    def layer_only():
        layer(x, hp, check_range=False).backward(g)

    one = torch.ones(())

    def with_penalty():  # one backward through both, the same upstream gradient g for y
        y = layer(x, hp, check_range=False)
        torch.autograd.backward((y, layer.l2_penalty(lam, hp)), (g, one))

    fns = {"nn.Linear": lambda: plain(x).backward(g), "layer": layer_only, "layer + penalty": with_penalty}
    times = {k: v["min_ms"] for k, v in time_interleaved(fns, "cpu", repeats=repeats, warmup=2, clock=clock).items()}
    return {"ms": times, "penalty_share": times["layer + penalty"] / times["layer"] - 1.0,
            "layer_x_linear": times["layer"] / times["nn.Linear"],
            "with_penalty_x_linear": times["layer + penalty"] / times["nn.Linear"]}


def check_targets(result: dict) -> list[dict]:
    return [{"target": f"L2 penalty adds <= {TARGET}x to HyperBatchEnsembleLinear fwd+bwd",
             "value": f"+{result['penalty_share']:.3f}x", "ok": result["penalty_share"] <= TARGET}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.penalty", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    result = run(repeats=args.repeats, clock=args.clock)
    print("| candidate | ms (best round) | x nn.Linear |\n|---|---:|---:|")
    for name, ms in result["ms"].items():
        print(f"| {name} | {ms:.2f} | {ms / result['ms']['nn.Linear']:.2f} |")
    for t in check_targets(result):
        print(format_target(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
