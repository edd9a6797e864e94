"""hyperkern benchmark suite: one command, op-level and model-level, CPU or CUDA.

    python -m bench                                   # both suites on the CPU, full repeats
    python -m bench --suite models --quick --threads 2
    python -m bench --device cuda --json gpu-results/bench.json
    python -m bench --quick --tiny --json /tmp/b.json # the smoke test: tiny shapes, numbers meaningless

Run from the repository root. Prints the environment (date, device and its name, dtype, threads,
torch, hyperkern backends, load) and the shapes, then a markdown table per suite and the issue's
targets with PASS / MISS; --json writes everything (environment, arguments, every row, targets).

Suites:
  ops     bench/ops.py (rank-1 linear ops) and bench/ops_conv.py (rank-1 conv2d ops) when present:
          every backend against the plain composition, torch.compile of it, the peer layers and the
          floor (plain F.linear / conv2d over the same E*B rows); forward and forward+backward.
  models  bench/models.py: ResNet-20 and a WRN-28-k training step and inference, plain / batch /
          peers / hyper_batch / deep ensemble (loop and vmap), images/s and peak memory.
  host    bench/host.py: every op and layer at a tiny shape (forward + backward) against the plain
          torch call: the host cost (Python, checks, dispatch, autograd, allocations).
Timing: interleaved rounds, median (bench/common.py). The model suite always runs float32; --dtype
sets the op suite's dtype.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time

import torch

from bench.common import describe_environment, format_target

_OP_MODULES = ("bench.ops", "bench.ops_conv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\nRun from")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="docs/benchmarks.md explains every column and holds the latest tables.")
    p.add_argument("--suite", choices=["ops", "models", "host", "all"], default="all",
                   help="which suites to run: ops (the rank-1 ops against the floor), models (training step and "
                        "inference of whole networks), host (ops and layers at a tiny shape: host cost, one thread "
                        "on the CPU) or all (default: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="device to benchmark on; cuda adds the triton rows, WRN-28-10 and bfloat16 ops (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                   help="op-suite dtype (default float32; the CUDA op suite runs float32 and bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and shapes, no torch.compile baselines")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test of the harness; numbers meaningless)")
    p.add_argument("--ensemble-size", "-E", type=int, default=None, help="members (default 4; 2 with --tiny)")
    p.add_argument("--per-member", "-B", type=int, default=None,
                   help="model suite: images per member (default 32; 2 with --tiny)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per candidate: the table reports their median (conv ops: their best) "
                        "(default: each suite's own, fewer with --quick)")
    p.add_argument("--no-memory", action="store_true", help="model suite: skip the peak-memory measurement")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="CPU timing clock: wall (perf_counter) or cpu (process_time: with --threads 1 it ignores "
                        "time other processes take from this one, for a loaded machine)")
    p.add_argument("--json", metavar="PATH", default=None, help="write environment, rows and targets as JSON")
    p.add_argument("--auto-table", metavar="PATH", default=None,
                   help="ops suite: write the measured cpp / triton / torch times as a table for backend=\"auto\" "
                        "(hyperkern/_auto_table.py; use it with HYPERKERN_AUTO_TABLE=PATH)")
    return p


def _parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    for name in ("threads", "ensemble_size", "per_member", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        p.error("--clock cpu measures one thread's work: use it with --device cpu --threads 1")
    if args.ensemble_size is None:
        args.ensemble_size = 2 if args.tiny else 4
    if args.per_member is None:
        args.per_member = 2 if args.tiny else 32
    return args


# ---------------------------------------------------------------------------------------------------------------
# op suite
# ---------------------------------------------------------------------------------------------------------------
def _op_dtypes(args) -> list[torch.dtype]:
    if args.dtype:
        return [getattr(torch, args.dtype)]
    if args.device == "cuda" and not args.tiny:
        return [torch.float32, torch.bfloat16]
    return [torch.float32]


def linear_shapes(args, dtype) -> list[tuple[int, int, int, int]]:
    """(E, B, in, out) shapes of the linear op rows."""
    E = args.ensemble_size
    if args.tiny:
        return [(E, 8, 16, 16)]
    if args.device == "cuda":
        # large GEMM (compute-bound: the >= 90% of torch.mm target) and a thin, memory-bound one
        # (the >= 2x the eager composition target)
        large = (E, 2048, 4096, 4096) if dtype != torch.float32 else (E, 1024, 4096, 4096)
        return [large, (E, 8192, 128, 128)]
    return [(E, 256, 512, 512)] if args.quick else [(E, 256, 512, 512), (E, 256, 1024, 1024)]


def _run_conv(mod, args, dtype, device, log) -> list[dict]:
    """bench/ops_conv.py's run(): ResNet-20 / WRN layer shapes, NCHW and channels-last, batch and hyper op."""
    params = inspect.signature(mod.run).parameters
    kw = {"dtype": dtype, "E": args.ensemble_size, "compile_eager": not (args.quick or args.tiny)}
    if "device" in params:
        kw["device"] = device
    elif device.type != "cpu":
        log(f"[ops] bench/ops_conv.py has no device argument (CPU only): conv rows skipped on {device.type}")
        return []
    if "hyper" in params:
        kw["hyper"] = True
    if "clock" in params and device.type == "cpu":
        kw["clock"] = args.clock
    if args.tiny:
        kw.update(shapes=(min(mod.SHAPES, key=lambda k: mod.SHAPES[k][1] * mod.SHAPES[k][2] ** 2),),
                  channels_last=(False,), B=2, rounds=args.repeats or 2)
    elif args.quick:
        kw.update(shapes=tuple(k for k in mod.SHAPES if mod.SHAPES[k][1] <= 64), channels_last=(False,),
                  rounds=args.repeats or 5)
    elif args.repeats:
        kw["rounds"] = args.repeats
    kw = {k: v for k, v in kw.items() if k in params}
    log(f"[ops] conv, {str(dtype).replace('torch.', '')}, {', '.join(f'{k}={v}' for k, v in kw.items())}")
    return mod.run(**kw)


def run_op_suite(args, log=print, on_progress=None) -> dict:
    """Run every op benchmark module present in this tree; returns {"rows", "modules", "missing"}.
    on_progress(the same dict so far) runs after each module and dtype, so that a run stopped part way
    (a time-boxed GPU call) still leaves the rows it measured."""
    device = torch.device(args.device)
    rows, used, missing = [], [], []
    for modname in _OP_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            missing.append(modname)
            continue
        used.append(modname)
        for dtype in _op_dtypes(args):
            dname = str(dtype).replace("torch.", "")
            if modname == "bench.ops":
                shapes = linear_shapes(args, dtype)
                log(f"[ops] linear, {dname}, shapes (E, B, in, out): {shapes}")
                kw = {"repeats": args.repeats or (3 if args.quick or args.tiny else 15),
                      "inner": 1 if args.tiny else 3, "compile_": not (args.quick or args.tiny)}
                if args.clock == "cpu" and "cpu_time" in inspect.signature(mod.run_linear).parameters:
                    kw["cpu_time"] = True
                new = mod.run_linear(shapes, dtype, device, **kw)
            else:
                new = _run_conv(mod, args, dtype, device, log)
            for r in _normalise_op_rows(new):
                r.setdefault("dtype", dname)
                r["suite"] = "ops"
                r["source"] = modname
                rows.append(r)
            if on_progress is not None:
                on_progress({"rows": rows, "modules": used, "missing": missing})
    if missing:
        log(f"[ops] not in this tree (skipped): {', '.join(missing)}")
    return {"rows": rows, "modules": used, "missing": missing}


def auto_table_entries(rows: list[dict], device: str) -> list[dict]:
    """The op rows as entries of hyperkern/_auto_table.py: per (op, dtype, mode, size) the ms of the
    backends cpp, triton and torch (as the rows report them: linear the median, conv the best of rounds). Linear sizes (E*B, in, out); conv sizes (images, in, out, H, W)
    of the NCHW rows (the table has no memory format)."""
    from hyperkern._auto_table import check_entries

    grouped: dict[tuple, dict] = {}
    for r in rows:
        if r["variant"] not in ("cpp", "triton", "torch") or r.get("format", "NCHW") != "NCHW":
            continue
        if "size" in r:
            size = list(r["size"])
        elif isinstance(r["shape"], list) and len(r["shape"]) == 4:
            E, B, fin, fout = r["shape"]
            size = [E * B, fin, fout]
        else:
            continue
        mode = {"forward": "fwd", "forward+backward": "fwd+bwd"}.get(r["mode"], r["mode"])
        key = (r["op"], r["dtype"], mode, tuple(size))
        entry = grouped.setdefault(key, {"device": device, "op": r["op"], "dtype": r["dtype"], "mode": mode,
                                         "size": size, "ms": {}})
        entry["ms"][r["variant"]] = round(float(r["ms"]), 5)
    return check_entries(list(grouped.values()), "measured rows")


def write_auto_table(path: str, rows: list[dict], env: dict, argv) -> list[dict]:
    """Writes auto_table_entries of the op rows to path as JSON and prints where each backend wins."""
    from hyperkern._auto_table import FUSED, winner

    entries = auto_table_entries(rows, env["device_name"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"measured": f"{env['date']}, torch {env['torch']}: python -m bench "
                               + " ".join(sys.argv[1:] if argv is None else argv),
                   "entries": entries}, f, indent=1)
    print(f"\nbackend=\"auto\" table ({len(entries)} entries) written to {path}; use HYPERKERN_AUTO_TABLE={path}")
    for e in entries:
        best = winner(e, lambda n: n in FUSED)
        print(f"- {e['op']} {e['dtype']} {e['mode']} size {e['size']}: " + ", ".join(
            f"{n} {ms:.3f} ms" for n, ms in sorted(e["ms"].items())) + f" -> {best}")
    return entries


_ROW_KEYS = ("shape", "format", "op", "mode", "dtype", "variant", "ms", "ratio")


def _normalise_op_rows(rows) -> list[dict]:
    """One dict per (op, shape, mode, variant) with ms and ratio to the floor. Accepts rows in that
    form (bench/ops.py) and rows holding one column per variant plus "floor" (bench/ops_conv.py)."""
    out = []
    for row in rows:
        row = dict(row)
        if isinstance(row.get("shape"), tuple):
            row["shape"] = list(row["shape"])
        if "variant" in row:
            out.append(row)
            continue
        floor = row["floor"]
        common = {k: v for k, v in row.items() if not isinstance(v, (int, float)) or k in _ROW_KEYS}
        out.append({**common, "variant": "floor", "ms": floor, "ratio": 1.0})
        for name, ms in row.items():
            if name in common or name == "floor" or not isinstance(ms, (int, float)):
                continue
            out.append({**common, "variant": name, "ms": ms, "ratio": ms / floor})
    return out


def _shape_text(r: dict) -> str:
    shape = r["shape"]
    text = shape if isinstance(shape, str) else ", ".join(str(v) for v in shape)
    return f"{text} ({r['format']})" if r.get("format") else text


def format_op_table(rows: list[dict]) -> str:
    from bench.common import format_markdown_table

    header = ["op", "shape", "dtype", "mode", "variant", "ms", "x floor"]
    body = [[r["op"], _shape_text(r), r["dtype"], r["mode"], r["variant"], f"{r['ms']:.3f}",
             f"{r['ratio']:.3f}"] for r in rows]
    return format_markdown_table(header, body, ["l", "l", "l", "l", "l", "r", "r"])


def check_op_targets(rows: list[dict], device: str) -> list[dict]:
    """GPU op targets: fused linear forward >= 90% of the floor's (torch.mm) throughput at the large
    bf16 shape and >= 2x the eager composition at the memory-bound one; fused conv <= 1.15x cuDNN."""
    if device != "cuda":
        return []
    out = []
    fused = ("triton", "cpp")

    def pick(op, shape, dtype, mode, variant):
        want = (op, list(shape), dtype, mode, variant)
        for r in rows:
            if (r["op"], list(r["shape"]), r["dtype"], r["mode"], r["variant"]) == want:
                return r
        return None

    keys = {(r["op"], tuple(r["shape"]), r["dtype"]) for r in rows if r.get("source") == "bench.ops"}
    for op, shape, dtype in sorted(keys):
        if op != "batch_ensemble_linear" or dtype != "bfloat16":
            continue
        floor, eager = pick(op, shape, dtype, "fwd", "floor"), pick(op, shape, dtype, "fwd", "torch")
        best = min((r for r in (pick(op, shape, dtype, "fwd", v) for v in fused) if r), key=lambda r: r["ms"],
                   default=None)
        if not (floor and eager and best):
            continue
        memory_bound = shape[2] * shape[3] <= 256 * 256
        if memory_bound:
            out.append({"target": f"linear fwd {shape} bf16: fused >= 2x eager composition",
                        "value": f"{eager['ms'] / best['ms']:.2f}x ({best['variant']})",
                        "ok": eager["ms"] / best["ms"] >= 2.0})
        else:
            out.append({"target": f"linear fwd {shape} bf16: fused >= 90% of torch.mm throughput",
                        "value": f"{floor['ms'] / best['ms'] * 100:.0f}% ({best['variant']})",
                        "ok": floor["ms"] / best["ms"] >= 0.9})
    # conv: the BatchEnsemble op against one cuDNN conv2d over the same E*B images, worst case over the
    # shapes and memory formats, per backend, mode and dtype
    worst: dict = {}
    for r in rows:
        if r.get("source") == "bench.ops_conv" and r["op"] == "batch_ensemble_conv2d" and r["variant"] in fused:
            key = (r["variant"], r["mode"], r["dtype"])
            if key not in worst or r["ratio"] > worst[key]["ratio"]:
                worst[key] = r
    for (variant, mode, dtype), r in sorted(worst.items()):
        out.append({"target": f"batch_ensemble_conv2d {mode} {dtype}, {variant}: <= 1.15x cuDNN (worst shape)",
                    "value": f"{r['ratio']:.3f}x at {_shape_text(r)}", "ok": r["ratio"] <= 1.15})
    return out


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    op_dtypes = _op_dtypes(args)
    env = describe_environment(args.device, torch.float32)
    env["dtype"] = {"ops": [str(d).replace("torch.", "") for d in op_dtypes], "models": "float32"}
    print(f"# hyperkern benchmarks ({env['date']})")
    print(f"device: {env['device']} ({env['device_name']}), threads: {env['threads']} of {env['cpu_count']} CPUs, "
          f"dtype: ops {', '.join(env['dtype']['ops'])} / models float32, torch {env['torch']}, "
          f"hyperkern backends: {env['hyperkern_backends']}"
          + (f", load average (1 min): {env['load_average_1min']}" if "load_average_1min" in env else ""))
    print(f"E = {args.ensemble_size} members, member-major rows; --quick={args.quick} --tiny={args.tiny}; "
          f"clock: {'cuda events' if args.device == 'cuda' else args.clock}")
    sys.stdout.flush()
    result = {"environment": env, "args": vars(args), "suites": {}, "targets": []}
    t0 = time.perf_counter()

    if args.suite in ("ops", "all"):
        def progress(partial):  # the JSON so far, marked partial, rewritten after each module and dtype
            if args.json:
                _write_json(args.json, {**result, "suites": {**result["suites"], "ops": partial}, "partial": True,
                                        "targets": result["targets"] + check_op_targets(partial["rows"], args.device)})

        ops_result = run_op_suite(args, on_progress=progress)
        result["suites"]["ops"] = ops_result
        print("\n## Op level\n")
        print("floor = one plain F.linear / conv2d over the same E*B rows (2*out outputs for the hyper ops); "
              "ms: linear rows (bench/ops.py) the median of interleaved rounds, conv rows (bench/ops_conv.py) "
              "the best of interleaved rounds")
        print(format_op_table(ops_result["rows"]) if ops_result["rows"] else "(no op benchmark module in this tree)")
        result["targets"] += check_op_targets(ops_result["rows"], args.device)
        if args.auto_table:
            write_auto_table(args.auto_table, ops_result["rows"], env, argv)

    if args.suite in ("models", "all"):
        from bench.models import check_model_targets, format_models_table, model_configs, run_models

        configs = model_configs(args.device, quick=args.quick, tiny=args.tiny)
        print("\n## Model level\n")
        for c in configs:
            print(f"{c['name']}: zoo.{c['arch']}({', '.join(f'{k}={v}' for k, v in c['kwargs'].items())}), input "
                  f"{args.ensemble_size * args.per_member}x3x{c['image']}x{c['image']} "
                  f"(E={args.ensemble_size} x B={args.per_member})")
        sys.stdout.flush()
        rows = run_models(args.device, E=args.ensemble_size, B=args.per_member, configs=configs, quick=args.quick,
                          tiny=args.tiny, repeats=args.repeats, memory=not args.no_memory, clock=args.clock)
        result["suites"]["models"] = {"rows": rows, "configs": configs}
        print()
        print(format_models_table(rows))
        print("\nx plain: median step time / the plain network's at E*B rows; member-images/s = E*B / time; "
              "peak MiB: bytes allocated above the level before the call (bench/common.py)")
        if not args.tiny:
            result["targets"] += check_model_targets(rows, args.device)
        from bench.models import print_operator_counts
        op_targets = print_operator_counts(args.device, tiny=args.tiny)
        if not args.tiny:
            result["targets"] += op_targets
        from bench import saved

        saved_rows = saved.mlp_rows(args.ensemble_size, 16 if args.tiny else 256)
        result["suites"]["saved"] = {"rows": saved_rows}
        print("\nActivations kept for the backward (bench/saved.py; train mode, input included):\n")
        print(saved.format_rows(saved_rows))
        if not args.tiny:
            result["targets"] += saved.check_targets(saved_rows)
        from bench import penalty

        pen = penalty.run(E=args.ensemble_size, **({"B": 4, "width": 16, "repeats": 1} if args.tiny else {}),
                          clock=args.clock)
        result["suites"]["penalty"] = pen
        print(f"\nHyperBatchEnsembleLinear fwd+bwd (bench/penalty.py): {pen['layer_x_linear']:.2f}x nn.Linear, "
              f"{pen['with_penalty_x_linear']:.2f}x with its L2 penalty (+{pen['penalty_share']:.3f}x)")
        if not args.tiny:
            result["targets"] += penalty.check_targets(pen)

    if args.suite in ("host", "all"):
        from bench import host

        threads = torch.get_num_threads()
        if args.device == "cpu":
            torch.set_num_threads(1)  # the host cost is one thread's work; the CPU clock is repeatable there
        rows = host.run(args.device, repeats=args.repeats or (3 if args.quick or args.tiny else 31),
                        inner=20 if args.tiny else 50)
        torch.set_num_threads(threads)
        result["suites"]["host"] = {"rows": rows}
        print(f"\n## Host cost\n\nforward + backward at E={host.E} x B={host.B}, {host.FEATURES} -> {host.FEATURES} "
              f"features / {host.CHANNELS} -> {host.CHANNELS} channels {host.SIZE}x{host.SIZE} {host.KERNEL}x{host.KERNEL}; "
              + ("1 thread, CPU time (bench/host.py)" if args.device == "cpu" else "wall clock (bench/host.py)"))
        print(host.format_table(rows))
        if not args.tiny:
            result["targets"] += host.check_targets(rows)

    if result["targets"]:
        print("\n## Targets\n")
        for t in result["targets"]:
            print(format_target(t))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        _write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0


def _write_json(path: str, result: dict):
    """result as JSON at path, replaced whole (written to a temporary file first): a run killed while
    writing leaves the previous version."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
