"""How the batch-ensemble convolution should be computed on a GPU, measured before any strategy goes
into the CUDA extension.

    python -m bench.conv_strategies --device cuda                 # ResNet-20 and WRN-28-10 layer shapes
    python -m bench.conv_strategies --device cpu --tiny           # smoke test (numbers meaningless)

Why: on an H200 (bench/RESULTS.md, first GPU run) the cpp CUDA path, one cuDNN convolution per member
with that member's folded weight W * s_k r_k^T, made a WRN-28-10 training step 1.37x the plain network,
about the time of the Python loop over four networks. Its gradients of s need each member's own
weight gradient (ds_k = sum W * G_k), which is why it is per member; the question is what the
alternatives cost on the GPU. Candidates, each forward and forward+backward (gradients of x, W, r, s,
b), against the floor (one plain convolution over all E*B images):

  cpp             hyperkern.ops.batch_ensemble_conv2d(backend="cpp"): per-member cuDNN, folded weights
  member-loop     the same arithmetic in PyTorch: F.conv2d per member with the folded weight, torch.cat
  member-streams  member-loop with each member on its own CUDA stream, so the E small convolutions
                  can overlap on the GPU (autograd runs each backward op on its forward's stream)
  composition     x * r -> one convolution over the E*B images -> * s + b (hyperkern's torch backend):
                  big cuDNN calls, but autograd keeps the scaled input and the conv output for backward

Every candidate's output and gradients are checked against the float64 composition first. Timing:
bench.common.time_interleaved (CUDA events on the GPU), median of the rounds.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import hyperkern
from bench.common import describe_environment, format_markdown_table, time_interleaved

# (label, channels, spatial size): ResNet-20 stages 1 and 3, WRN-28-10 stages 1 and 3
SHAPES = {"16x32": ("ResNet-20 stage 1", 16, 32), "64x8": ("ResNet-20 stage 3", 64, 8),
          "160x32": ("WRN-28-10 stage 1", 160, 32), "640x8": ("WRN-28-10 stage 3", 640, 8)}
TINY = {"4x6": ("tiny", 4, 6)}
STRATEGIES = ("cpp", "member-loop", "member-streams", "composition")


def _inputs(C: int, H: int, E: int, B: int, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(E * B, C, H, H, generator=g, dtype=torch.float64)
    w = torch.randn(C, C, 3, 3, generator=g, dtype=torch.float64) * (2 / (9 * C)) ** 0.5
    r = 1 + 0.5 * torch.randn(E, C, generator=g, dtype=torch.float64)
    s = 1 + 0.5 * torch.randn(E, C, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(E, C, generator=g, dtype=torch.float64)
    grad = torch.randn(E * B, C, H, H, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, w, r, s, b)], grad.to(device=device, dtype=dtype)


def _folded(w, r, s, k):
    return w * (s[k][:, None, None, None] * r[k][None, :, None, None])


def strategies(E: int, B: int, device: torch.device) -> dict:
    """{name: fn(x, w, r, s, b) -> y} for the strategies that run on device."""
    def cpp(x, w, r, s, b):
        return hyperkern.ops.batch_ensemble_conv2d(x, w, r, s, b, 1, 1, backend="cpp")

    def member_loop(x, w, r, s, b):
        return torch.cat([F.conv2d(x[k * B:(k + 1) * B], _folded(w, r, s, k), b[k], 1, 1) for k in range(E)])

    def composition(x, w, r, s, b):
        return hyperkern.ops.batch_ensemble_conv2d(x, w, r, s, b, 1, 1, backend="torch")

    out = {"cpp": cpp, "member-loop": member_loop, "composition": composition}
    if device.type == "cuda":
        streams = [torch.cuda.Stream(device) for _ in range(E)]

        def member_streams(x, w, r, s, b):
            main = torch.cuda.current_stream(device)
            outs = []
            for k, stream in enumerate(streams):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    outs.append(F.conv2d(x[k * B:(k + 1) * B], _folded(w, r, s, k), b[k], 1, 1))
            for stream, y in zip(streams, outs):
                main.wait_stream(stream)
                y.record_stream(main)  # allocated on a side stream, read by the main stream's cat
            return torch.cat(outs)

        out["member-streams"] = member_streams
    return {name: out[name] for name in STRATEGIES if name in out}


def check(fns: dict, C: int, H: int, E: int, B: int, dtype, device) -> None:
    """Every strategy's output and gradients against the float64 composition on the CPU."""
    args64, grad64 = _inputs(C, H, E, B, torch.float64, "cpu")
    leaves64 = [a.requires_grad_() for a in args64]
    ref_y = hyperkern.ops.batch_ensemble_conv2d(*leaves64, 1, 1, backend="torch")
    ref_g = torch.autograd.grad(ref_y, leaves64, grad64)
    tol = {torch.float64: 1e-10, torch.float32: 3e-2, torch.bfloat16: 1e-1, torch.float16: 5e-2}[dtype]
    for name, fn in fns.items():
        args, grad = _inputs(C, H, E, B, dtype, device)
        leaves = [a.requires_grad_() for a in args]
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, grad)
        for what, got, want in zip(("y", "dx", "dW", "dr", "ds", "db"), (y, *grads), (ref_y, *ref_g)):
            want = want.detach()
            err = (got.detach().double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-12)
            if not err <= tol:  # also catches NaN
                raise AssertionError(f"{name}: {what} differs from the float64 composition by {err:.3g} (max-relative)")


def run(shapes, E: int, B: int, dtype, device, repeats: int, warmup: int, log=print) -> list[dict]:
    device = torch.device(device)
    rows = []
    for key in shapes:
        label, C, H = {**SHAPES, **TINY}[key]
        fns = strategies(E, B, device)
        check(fns, C, H, E, B, dtype, device)
        args, grad = _inputs(C, H, E, B, dtype, device)
        leaves = [a.requires_grad_() for a in args]
        floor_x, floor_w = (args[0].detach().requires_grad_(), args[1].detach().requires_grad_())
        cands = {"floor": (lambda: F.conv2d(floor_x, floor_w, None, 1, 1), [floor_x, floor_w])}
        cands.update({name: (lambda fn=fn: fn(*leaves), leaves) for name, fn in fns.items()})
        for mode in ("forward", "forward+backward"):
            steps = {name: _step(call, used, grad, mode) for name, (call, used) in cands.items()}
            times = time_interleaved(steps, device, repeats=repeats, warmup=warmup)
            floor = times["floor"]["ms"]
            for name, t in times.items():
                rows.append({"shape": f"{label}: {C}->{C} {H}x{H}", "mode": mode, "strategy": name, "ms": t["ms"],
                             "x_floor": t["ms"] / floor})
            log(f"[conv strategies] {label} {mode}: floor {floor:.3f} ms | " + " | ".join(
                f"{n} {t['ms']:.3f} ms ({t['ms'] / floor:.2f}x)" for n, t in times.items() if n != "floor"))
    return rows


def _step(call, leaves, grad, mode):
    """One timed call: the forward under no_grad, or forward + the gradients of every leaf."""
    if mode == "forward":
        def step():
            with torch.no_grad():
                call()
    else:
        def step():
            torch.autograd.grad(call(), leaves, grad)
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES) + list(TINY))
    p.add_argument("--tiny", action="store_true", help="one tiny shape (smoke test; numbers meaningless)")
    p.add_argument("--ensemble-size", "-E", type=int, default=4)
    p.add_argument("--batch", "-B", type=int, default=None, help="images per member (default 32; 2 with --tiny)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20; 2 with --tiny)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    for name in ("ensemble_size", "batch", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    shapes = args.shapes or (list(TINY) if args.tiny else list(SHAPES))
    B = args.batch or (2 if args.tiny else 32)
    dtype = getattr(torch, args.dtype)
    print(describe_environment(args.device, dtype))
    rows = run(shapes, args.ensemble_size, B, dtype, args.device, repeats=args.repeats or (2 if args.tiny else 20),
               warmup=1 if args.tiny else 3)
    print(format_markdown_table(["shape", "mode", "strategy", "median ms", "x floor"],
                                [[r["shape"], r["mode"], r["strategy"], f"{r['ms']:.3f}", f"{r['x_floor']:.3f}"]
                                 for r in rows], ["l", "l", "l", "r", "r"]))


if __name__ == "__main__":
    main()
