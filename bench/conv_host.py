"""Host cost of the rank-1 conv ops and layers at a tiny shape, where the time is the host code's.

E=4 members x B=2 images, conv 4 -> 4 channels, 6x6, 3x3, padding 1; forward + y.backward(g) with every
input requiring grad, one thread, process CPU time (time.process_time), median of interleaved rounds
(bench/common.py), as the ratio to F.conv2d / nn.Conv2d over the same E*B rows (issue 15: batch ops and
layers <= 1.5x, hyper-batch <= 2.5x).

    PYTHONPATH=. python bench/conv_host.py [--rounds 41] [--inner 20] [--shape E B C H]

The CPU conv scheme can be forced with HYPERKERN_CPU_CONV=member|one_conv (csrc/cpu/rank1_conv.cpp).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import hyperkern
from hyperkern.nn import BatchEnsembleConv2d, HyperBatchEnsembleConv2d

from bench.common import time_interleaved

TARGETS = {"batch": 1.5, "hyper": 2.5}


def _leaf(t):
    return t.detach().clone().requires_grad_()


def candidates(E=4, B=2, C=4, H=6, seed=0):
    """name -> (fn, floor name, kind): forward + backward closures at the tiny shape."""
    torch.manual_seed(seed)
    N = E * B
    x = torch.randn(N, C, H, H)
    g = torch.randn(N, C, H, H)
    w, b = torch.randn(C, C, 3, 3) * 0.2, torch.randn(C)
    r, s, bias = 1 + 0.5 * torch.randn(E, C), 1 + 0.5 * torch.randn(E, C), torch.randn(E, C)
    d, u, v = torch.randn(C, C, 3, 3) * 0.1, 1 + 0.5 * torch.randn(E, C), 1 + 0.5 * torch.randn(E, C)
    e1, db, e2 = torch.randn(N, C), torch.randn(E, C), torch.randn(N, C)
    plain = [_leaf(t) for t in (x, w, b)]
    be = [_leaf(t) for t in (x, w, r, s, bias)]
    hy = [_leaf(t) for t in (x, w, d, r, s, u, v, e1, bias, db, e2)]
    conv = torch.nn.Conv2d(C, C, 3, padding=1)
    be_layer = BatchEnsembleConv2d(C, C, 3, padding=1, ensemble_size=E, backend="cpp")
    hy_layer = HyperBatchEnsembleConv2d(C, C, 3, padding=1, ensemble_size=E, num_hparams=2, backend="cpp")
    xl = _leaf(x)
    hp = torch.rand(N, 2)
    ops = hyperkern.ops
    out = {
        "F.conv2d": (lambda: F.conv2d(plain[0], plain[1], plain[2], 1, 1).backward(g), None, None),
        "nn.Conv2d": (lambda: conv(xl).backward(g), None, None),
        "batch op cpp": (lambda: ops.batch_ensemble_conv2d(*be, 1, 1, backend="cpp").backward(g), "F.conv2d", "batch"),
        "batch op torch": (lambda: ops.batch_ensemble_conv2d(*be, 1, 1, backend="torch").backward(g), "F.conv2d",
                           "batch"),
        "hyper op cpp": (lambda: ops.hyper_batch_ensemble_conv2d(*hy, 1, 1, backend="cpp").backward(g), "F.conv2d",
                         "hyper"),
        "hyper op torch": (lambda: ops.hyper_batch_ensemble_conv2d(*hy, 1, 1, backend="torch").backward(g),
                           "F.conv2d", "hyper"),
        "BatchEnsembleConv2d": (lambda: be_layer(xl).backward(g), "nn.Conv2d", "batch"),
        "HyperBatchEnsembleConv2d": (lambda: hy_layer(xl, hp).backward(g), "nn.Conv2d", "hyper"),
    }
    return out


def run(rounds=41, inner=20, E=4, B=2, C=4, H=6, log=print):
    torch.set_num_threads(1)
    cands = candidates(E, B, C, H)
    times = time_interleaved({k: v[0] for k, v in cands.items()}, "cpu", repeats=rounds, warmup=5, inner=inner,
                             clock="cpu")
    rows = []
    for name, (_, floor, kind) in cands.items():
        ms = times[name]["ms"]
        ratio = ms / times[floor]["ms"] if floor else None
        rows.append({"name": name, "ms": ms, "floor": floor, "ratio": ratio, "kind": kind})
        cell = "" if ratio is None else f"  {ratio:.2f}x {floor}"
        if kind is not None and name.endswith(("cpp", "Conv2d")):
            cell += f"  ({'PASS' if ratio <= TARGETS[kind] else 'MISS'} <= {TARGETS[kind]}x)"
        log(f"{name:26s} {ms:7.3f} ms{cell}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=4, default=[4, 2, 4, 6], metavar=("E", "B", "C", "H"))
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, 1 thread, process CPU time, E={a.shape[0]} B={a.shape[1]} "
          f"C={a.shape[2]} {a.shape[3]}x{a.shape[3]} 3x3 pad 1; HYPERKERN_CPU_CONV="
          f"{os.environ.get('HYPERKERN_CPU_CONV', 'auto')}")
    run(a.rounds, a.inner, *a.shape)


if __name__ == "__main__":
    main()
