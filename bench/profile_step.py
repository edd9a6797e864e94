"""Where a training step's time goes: torch.profiler over bench/models.py's candidates.

    python -m bench.profile_step --device cuda --model wrn28-10 --variants plain batch "batch[torch]"
    python -m bench.profile_step --model resnet20 --variants plain batch --top 15     # CPU

For each variant: one warm-up step, then `--steps` profiled training steps; prints the `--top` kernels by
device time (CUDA) and the `--top` host-side operators by self CPU time, each with the step's total, so two
variants' tables show which kernels make the difference (e.g. per-member convolutions at B images against
one over E*B) and, for small networks whose step is bound by the host, where the host time goes.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.models import ALL_VARIANTS, build_candidates, model_configs


def profile_variant(candidate, device: torch.device, steps: int, top: int) -> str:
    candidate.set_mode("train")
    candidate.train_step()  # warm-up (autotuning, cuDNN algorithm search, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            candidate.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    tables = []
    if device.type == "cuda":  # kernels and copies only: operators repeat their kernels' device time
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        tables.append(_table(kernels, "self_device_time_total", steps, top, "kernel"))
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    tables.append(_table(host, "self_cpu_time_total", steps, top, "host operator (self CPU time)"))
    return "\n\n".join(tables)


def _table(events, attr: str, steps: int, top: int, label: str) -> str:
    rows = sorted(events, key=lambda e: getattr(e, attr, 0.0), reverse=True)
    total = sum(getattr(e, attr, 0.0) for e in rows) / steps / 1e3
    lines = [f"| ms/step | % | calls/step | {label} |", "|---:|---:|---:|---|"]
    for e in rows[:top]:
        ms = getattr(e, attr, 0.0) / steps / 1e3
        lines.append(f"| {ms:.3f} | {100 * ms / max(total, 1e-12):.1f} | {e.count / steps:g} | {e.key[:110]} |")
    lines.append(f"| {total:.3f} | 100 | {sum(e.count for e in rows) / steps:g} | total per step |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="resnet20", help="a config name of bench/models.py (resnet20, wrn28-10, ...)")
    p.add_argument("--variants", nargs="+", default=["plain", "batch"], choices=list(ALL_VARIANTS))
    p.add_argument("--ensemble-size", "-E", type=int, default=4)
    p.add_argument("--per-member", "-B", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        p.error(f"--steps and --top must be >= 1, got {args.steps} and {args.top}")
    device = torch.device(args.device)
    configs = {c["name"]: c for c in model_configs(device.type) + model_configs(device.type, quick=True)
               + model_configs(device.type, tiny=True)}
    if args.model not in configs:
        p.error(f"--model must be one of {sorted(configs)}, got {args.model!r}")
    cfg = configs[args.model]
    cands = build_candidates(cfg["arch"], cfg["kwargs"], E=args.ensemble_size, B=args.per_member,
                             image=cfg["image"], device=device, dtype=torch.float32, variants=tuple(args.variants))
    for name in args.variants:
        if name not in cands:
            print(f"## {args.model} {name}: not available on {device.type}\n")
            continue
        print(f"## {args.model} train step, {name} (backend {cands[name].backend}), "
              f"E={args.ensemble_size} B={args.per_member}\n")
        print(profile_variant(cands[name], device, args.steps, args.top), flush=True)
        print()


if __name__ == "__main__":
    main()
