"""Benchmark of the rank-1 ensemble conv2d ops against the floor.

The floor is a plain conv2d over the same E*B images (for the hyper op: one plain conv2d with 2*O output
channels, the same multiply-adds as its two branches). Rows: the "cpp" backend ("triton" too on CUDA), the
"torch" backend (the eager composition), torch.compile of that composition, the peers' layers (tabm,
torch_unc: bench/peers.py, batch op only), the per-member loop with folded weights ("member loop"; on CUDA
also "member streams", one stream per member; bench/peers.py), forward (no grad) and forward+backward (every
input requiring grad), NCHW and channels-last, at ResNet-20 / WRN-28-10 layer shapes (3x3, padding 1).

    python bench/ops_conv.py                      # all shapes, both formats, fp32, torch.get_num_threads()
    python bench/ops_conv.py --threads 2 --no-compile --shapes 16x32 64x8
    python bench/ops_conv.py --hyper              # also the hyper-batch op (hd saved vs recomputed)
    python bench/ops_conv.py --device cuda --no-compile --batch 32   # the GPU A/B of the conv strategies

Times are the best of `rounds` interleaved rounds (each round runs every variant once after warm-up),
which is robust to other processes sharing the CPU. Importable: run(...) returns the rows, table(rows)
formats them as markdown.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

import hyperkern
from hyperkern.ops.conv import _torch_batch_ensemble_conv2d, _torch_hyper_batch_ensemble_conv2d

try:
    from bench import peers
except ImportError:  # run as a script: python bench/ops_conv.py puts bench/ itself on sys.path
    import peers

# (label, channels, spatial size): ResNet-20 stage 1 and 3, WRN-28-10 stage 1 (E=4, B=16).
SHAPES = {"16x32": ("ResNet-20 stage 1", 16, 32), "32x16": ("ResNet-20 stage 2", 32, 16),
          "64x8": ("ResNet-20 stage 3", 64, 8),
          "160x32": ("WRN-28-10 stage 1", 160, 32)}
_LABELS = ("shape", "size", "format", "op", "mode", "floor")  # a row's keys that are not variants' times
GEO = ((1, 1), (1, 1), (1, 1), 1)  # stride, padding, dilation, groups


def _best_of(fns: dict, rounds: int, warmup: int = 2, clock=time.perf_counter, sync=lambda: None) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            best[name] = min(best[name], clock() - start)
    return {name: t * 1e3 for name, t in best.items()}


def _case(C, H, E, B, channels_last, dtype, hyper, device="cpu"):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(E * B, C, H, H, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(C, C, 3, 3, dtype=dtype) * (2 / (9 * C)) ** 0.5
    r, s, b = 1 + 0.5 * torch.randn(E, C, dtype=dtype), 1 + 0.5 * torch.randn(E, C, dtype=dtype), \
        torch.randn(E, C, dtype=dtype)
    args = [x, w, r, s, b]
    if hyper:
        d = torch.randn_like(w) * 0.1
        u, v = 1 + 0.5 * torch.randn(E, C, dtype=dtype), 1 + 0.5 * torch.randn(E, C, dtype=dtype)
        e1, db, e2 = torch.randn(E * B, C, dtype=dtype), torch.randn(E, C, dtype=dtype), torch.randn(E * B, C, dtype=dtype)
        args = [x, w, d, r, s, u, v, e1, b, db, e2]
    grad = torch.randn(E * B, C, H, H, dtype=dtype).contiguous(memory_format=fmt)
    return [a.to(device) for a in args], grad.to(device)  # .to keeps the memory format


def _variants(args, grad, hyper: bool, compile_eager: bool):
    """name -> (forward fn, forward+backward fn)."""
    x, w = args[0], args[1]
    floor_w = torch.cat([w, args[2]]) if hyper else w
    leaves = [t.detach().clone().requires_grad_() for t in args]
    floor_leaves = [x.detach().clone().requires_grad_(), floor_w.detach().clone().requires_grad_()]
    floor_grad = torch.cat([grad, grad], 1).contiguous(memory_format=torch._prims_common.suggest_memory_format(grad)) \
        if hyper else grad
    op = hyperkern.ops.hyper_batch_ensemble_conv2d if hyper else hyperkern.ops.batch_ensemble_conv2d
    eager = _torch_hyper_batch_ensemble_conv2d if hyper else _torch_batch_ensemble_conv2d

    def pair(call, inputs, g):
        def fwd():
            with torch.no_grad():
                call(*inputs)

        def fwd_bwd():
            call(*inputs).backward(g)
        return fwd, fwd_bwd

    out = {"floor": pair(lambda a, b: F.conv2d(a, b, None, 1, 1), floor_leaves, floor_grad),
           "cpp": pair(lambda *a: op(*a, *GEO, backend="cpp"), leaves, grad)}
    if hyper:  # hd recomputed in the backward instead of saved by the forward
        geo = [list(GEO[0]), list(GEO[1]), list(GEO[2]), GEO[3]]
        out["cpp (recompute hd)"] = pair(
            lambda *a: torch.ops.hyperkern.hyper_batch_ensemble_conv2d(*a, *geo, False)[0], leaves, grad)
    if x.is_cuda and "triton" in hyperkern.available_backends("cuda"):
        out["triton"] = pair(lambda *a: op(*a, *GEO, backend="triton"), leaves, grad)
    out["torch"] = pair(lambda *a: op(*a, *GEO, backend="torch"), leaves, grad)
    if not hyper:  # the peers' layers (bench/peers.py): TabM-style broadcast, torch-uncertainty-style repeat
        out["tabm"] = pair(lambda *a: peers.tabm_batch_ensemble_conv2d(*a, *GEO), leaves, grad)
        out["torch_unc"] = pair(lambda *a: peers.torch_uncertainty_batch_ensemble_conv2d(*a, *GEO), leaves, grad)
        # the cpp backend's per-member arithmetic in PyTorch, and on CUDA with the members on their own
        # streams: what overlapping the E small convolutions would gain (docs/benchmark-history.md, first GPU run)
        out["member loop"] = pair(lambda *a: peers.member_loop_batch_ensemble_conv2d(*a, *GEO), leaves, grad)
        if x.is_cuda:
            streams = [torch.cuda.Stream(x.device) for _ in range(args[2].shape[0])]
            out["member streams"] = pair(
                lambda *a: peers.member_loop_batch_ensemble_conv2d(*a, *GEO, streams=streams), leaves, grad)
    if compile_eager:
        torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no stale graphs
        compiled = torch.compile(eager, dynamic=False)
        out["torch.compile"] = pair(lambda *a: compiled(*a, *GEO), leaves, grad)
    return out


def run(shapes=("16x32", "32x16", "64x8", "160x32"), channels_last=(False, True), E=4, B=16, dtype=torch.float32,
        rounds=None, compile_eager=True, hyper=False, threads=None, clock="wall", device="cpu"):
    """Returns rows: dict(shape, format, op, mode, floor=ms, and ms per variant).

    clock="cpu" times with the process's CPU time instead of wall time: with one thread it measures the
    work itself even while other processes share the cores (with several threads it also counts
    OpenMP spin-waiting, so use wall time there)."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    for key in shapes:
        label, C, H = SHAPES[key]
        for cl in channels_last:
            for is_hyper in ((False, True) if hyper else (False,)):
                torch.manual_seed(0)
                args, grad = _case(C, H, E, B, cl, dtype, is_hyper, device)
                variants = _variants(args, grad, is_hyper, compile_eager)
                n = rounds or (5 if C * H * H > 100_000 else 20)
                for mode, idx in (("forward", 0), ("forward+backward", 1)):
                    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
                    times = _best_of({name: fns[idx] for name, fns in variants.items()}, n, clock=timer, sync=sync)
                    rows.append(dict(shape=f"{label}: {C}->{C} {H}x{H}", size=[E * B, C, C, H, H],
                                     format="channels-last" if cl else "NCHW",
                                     op="hyper_batch_ensemble_conv2d" if is_hyper else "batch_ensemble_conv2d",
                                     mode=mode, **times))
                    print(_row_line(rows[-1]), flush=True)
    return rows


def _row_line(row):
    floor = row["floor"]
    cells = [f"{name} {ms:.2f} ms ({ms / floor:.2f}x)" for name, ms in row.items()
             if name not in _LABELS]
    return f"{row['op']} | {row['shape']} | {row['format']} | {row['mode']} | floor {floor:.2f} ms | " + " | ".join(cells)


def table(rows) -> str:
    """Markdown table; every variant as 'ms (ratio to the floor)'."""
    names = [n for n in rows[0] if n not in _LABELS]
    for row in rows:
        names += [n for n in row if n not in names and n not in _LABELS]
    head = "| op | shape | format | mode | floor ms | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (5 + len(names))]
    for row in rows:
        cells = [f"{row[n]:.2f} ({row[n] / row['floor']:.2f}x)" if n in row else "" for n in names]
        lines.append(f"| {row['op']} | {row['shape']} | {row['format']} | {row['mode']} | {row['floor']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--formats", nargs="+", default=["nchw", "channels-last"], choices=["nchw", "channels-last"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--ensemble-size", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="images per member")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the eager composition")
    p.add_argument("--hyper", action="store_true", help="also benchmark hyper_batch_ensemble_conv2d")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: process CPU time (meaningful with --threads 1 on a shared machine)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    if a.clock == "cpu" and a.device == "cuda":
        p.error("--clock cpu times CPU work: use it with --device cpu")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    where = (torch.cuda.get_device_name() if a.device == "cuda"
             else f"CPU {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    print(f"device: {where}, torch {torch.__version__}, dtype {a.dtype}, E={a.ensemble_size}, B={a.batch} per "
          f"member, 3x3 conv, padding 1; {a.clock} clock; backends: {hyperkern.available_backends(a.device)}")
    rows = run(a.shapes, tuple(f == "channels-last" for f in a.formats), a.ensemble_size, a.batch, dtype, a.rounds,
               not a.no_compile, a.hyper, clock=a.clock, device=a.device)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
