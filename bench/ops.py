"""Op microbenchmark: the rank-1 ensemble linear ops on every available backend against baselines.

    python bench/ops.py                                   # CPU: E=4, B=256, in=out=512 and 1024, fp32
    python bench/ops.py --shapes 4,256,512,512 --dtype bfloat16 --repeats 30
    python bench/ops.py --device cuda                     # adds the triton backend when available

For each op, shape and mode ("fwd": forward under no_grad; "fwd+bwd": forward, then
torch.autograd.grad for every input) it times:
  floor        one plain F.linear over the same E*B rows (with 2*out outputs for the hyper op): the
               GEMM work every variant has to do, and the number the fused backends are held to
  torch        hyperkern.ops.* with backend="torch" (the plain composition)
  torch.compile  torch.compile of that composition
  tabm         a TabM-style layer: (x * r) broadcast over a (E, B, in) view, GEMM, * s, + b
  torch_unc    a torch-uncertainty-style layer (bench/peers.py): per-row r, s, b materialised with
               repeat_interleave, then x * R, GEMM, * S, + B (batch op only)
  cpp          hyperkern.ops.* with backend="cpp" (the compiled extension), input validation included
  cpp-kernel   the same C++ op called through hyperkern.ops._cpp_linear, without the public API's
               Python validation (shows what the validation itself costs)
  triton       hyperkern.ops.* with backend="triton" (CUDA tensors only)
  embedding + e1 op  (hyper_batch_ensemble_linear_hp only) the hyper layer's path before that op: the
               (E*B, 2*out) embedding materialised by F.linear, then the e1 / e2 op (cpp)
  cpp tied     (hyper_batch_ensemble_linear_hp only) the cpp op called as HyperBatchEnsembleLinear calls
               it by default: u IS r and v IS s (tie_fast_weights=True, the reference's
               fast_weights_eq_contraint); the other variants take separate u, v
  cpp tied, weight step  the same with hparams not requiring grad, as in the trainer's weight step
               (d(hparams) is needed only in the hyperparameter step)
The ops: batch_ensemble_linear, hyper_batch_ensemble_linear (e1 / e2 given) and
hyper_batch_ensemble_linear_hp (per-row hyperparameters, m = 5, and the embedding weight given: what the
HyperBatchEnsembleLinear layer calls).
and prints the median time in ms and its ratio to the floor (plus the fastest sample and its ratio
to the fastest floor sample: on a shared machine the minimum shows the unloaded speed; and the paired
ratio, the median over rounds of the variant's time / the floor's time in the same round, which load
drifting between rounds does not move). Rows are member-major (rows
k*B .. (k+1)*B-1 belong to member k). Variants are interleaved round by round so load changes on
a shared machine hit them alike. Importable: run_linear(...) returns the rows, format_table prints them.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python bench/ops.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hyperkern  # noqa: E402
from hyperkern import ops  # noqa: E402

from bench import peers  # noqa: E402

DEFAULT_SHAPES = ((4, 256, 512, 512), (4, 256, 1024, 1024))


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(fns: dict, device: torch.device, repeats: int, inner: int, warmup: int = 3,
                  clock=time.perf_counter, samples_out: dict | None = None) -> dict:
    """(median, min) ms per call of every fn; rounds interleave the variants. samples_out (a dict) receives
    every variant's per-round ms."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = clock()
            for _ in range(inner):
                fn()
            _sync(device)
            samples[name].append((clock() - t0) / inner * 1e3)
    if samples_out is not None:
        samples_out.update(samples)
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def _linear_inputs(op: str, E: int, B: int, fin: int, fout: int, dtype, device, requires_grad: bool):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_(requires_grad)

    x, w = t(E * B, fin), t(fout, fin, scale=fin ** -0.5)
    r, s, b = t(E, fin), t(E, fout), t(E, fout)
    if op == "batch_ensemble_linear":
        return (x, w, r, s, b)
    d, u, v = t(fout, fin, scale=fin ** -0.5), t(E, fin), t(E, fout)
    db = t(E, fout)
    if op == "hyper_batch_ensemble_linear_hp":  # m = 5 hyperparameters per row (the MLP's)
        hp = torch.rand(E * B, NUM_HPARAMS, dtype=dtype, device=device).requires_grad_(requires_grad)
        return (x, w, d, r, s, u, v, hp, t(2 * fout, NUM_HPARAMS), b, db)
    e1, e2 = t(E * B, fout), t(E * B, fout)
    return (x, w, d, r, s, u, v, e1, b, db, e2)


NUM_HPARAMS = 5
LINEAR_OPS = ("batch_ensemble_linear", "hyper_batch_ensemble_linear", "hyper_batch_ensemble_linear_hp")


def _tied_inputs(op, E, B, fin, fout, dtype, device, requires_grad, weight_step=False):
    """The hp op's inputs with u IS r and v IS s (the hyper layers' default); weight_step: hparams
    without grad."""
    args = list(_linear_inputs(op, E, B, fin, fout, dtype, device, requires_grad))
    args[5], args[6] = args[3], args[4]
    if weight_step:
        args[7] = args[7].detach()
    return tuple(args)


# Variants whose inputs differ from _linear_inputs'.
_VARIANT_INPUTS = {"cpp tied": _tied_inputs, "cpp tied, weight step": functools.partial(_tied_inputs, weight_step=True)}


def _embedding_then_e1_op(x, w, d, r, s, u, v, hp, emb, b, db):
    """The hyper layer's path before the fused op: e = hp @ emb^T materialised, then the e1 / e2 op (cpp)."""
    e = F.linear(hp, emb)
    fout = w.shape[0]
    return ops.hyper_batch_ensemble_linear(x, w, d, r, s, u, v, e[:, :fout], b, db, e[:, fout:], backend="cpp")


def _floor_inputs(op: str, E: int, B: int, fin: int, fout: int, dtype, device, requires_grad: bool):
    width = fout if op == "batch_ensemble_linear" else 2 * fout
    x = torch.randn(E * B, fin, dtype=dtype, device=device).requires_grad_(requires_grad)
    w = (torch.randn(width, fin, dtype=dtype, device=device) * fin ** -0.5).requires_grad_(requires_grad)
    b = torch.randn(width, dtype=dtype, device=device).requires_grad_(requires_grad)
    return (x, w, b)


def _tabm_batch_ensemble(x, w, r, s, b):
    E = r.shape[0]
    x3 = x.view(E, -1, x.shape[-1])
    return ((x3 * r[:, None]) @ w.T * s[:, None] + b[:, None]).view(x.shape[0], -1)


def _tabm_hyper(x, w, d, r, s, u, v, e1, b, db, e2):
    E = r.shape[0]
    x3 = x.view(E, -1, x.shape[-1])
    e13, e23 = e1.view(E, -1, e1.shape[-1]), e2.view(E, -1, e2.shape[-1])
    y = ((x3 * r[:, None]) @ w.T) * s[:, None] + ((x3 * u[:, None]) @ d.T) * (v[:, None] * e13) \
        + b[:, None] + db[:, None] * e23
    return y.view(x.shape[0], -1)


def _variants(op: str, device: torch.device, compile_: bool) -> dict:
    public = getattr(ops, op)
    out = {"floor": F.linear, "torch": functools.partial(public, backend="torch")}
    if compile_:
        out["torch.compile"] = torch.compile(functools.partial(public, backend="torch"), dynamic=False)
    if op != "hyper_batch_ensemble_linear_hp":
        out["tabm"] = _tabm_batch_ensemble if op == "batch_ensemble_linear" else _tabm_hyper
    if op == "batch_ensemble_linear":  # torch-uncertainty style (bench/peers.py); it has no hyper layer
        out["torch_unc"] = peers.torch_uncertainty_batch_ensemble_linear
    status = _backend_status(device.type, op)
    if status.get("cpp") is None:
        from hyperkern.ops import _cpp_linear

        out["cpp"] = functools.partial(public, backend="cpp")
        out["cpp-kernel"] = getattr(_cpp_linear, op)
        if op == "hyper_batch_ensemble_linear_hp":
            out["embedding + e1 op"] = _embedding_then_e1_op
            out["cpp tied"] = out["cpp tied, weight step"] = out["cpp"]
    if device.type == "cuda" and status.get("triton") is None:
        out["triton"] = functools.partial(public, backend="triton")
    return out


def _backend_status(device_type: str, op: str) -> dict:
    try:  # per-op availability (hyperkern.backend_status(device_type, op))
        return hyperkern.backend_status(device_type, op)
    except TypeError:  # an install whose backend_status takes only the device type
        return hyperkern.backend_status(device_type)


def run_linear(shapes=DEFAULT_SHAPES, dtype=torch.float32, device="cpu", repeats: int = 15, inner: int = 3,
               compile_: bool = True, ops_to_run=LINEAR_OPS,
               only=None, cpu_time: bool = False) -> list:
    """Time both linear ops; returns rows (op, shape, mode, variant, median ms and its ratio to the
    floor, min ms and its ratio to the floor's min). `only`: variant names to time besides the floor.
    cpu_time: time with the calling thread's CPU time (time.thread_time) instead of wall time; only
    meaningful with one intra-op thread, and then insensitive to other processes taking the CPU."""
    if cpu_time and torch.get_num_threads() != 1:
        raise ValueError("cpu_time=True measures the calling thread only; set torch.set_num_threads(1)")
    clock = time.thread_time if cpu_time else time.perf_counter
    device = torch.device(device)
    rows = []
    for op in ops_to_run:
        variants = _variants(op, device, compile_ and (only is None or "torch.compile" in only))
        if only is not None:
            variants = {name: fn for name, fn in variants.items() if name == "floor" or name in only}
        for (E, B, fin, fout) in shapes:
            for mode in ("fwd", "fwd+bwd"):
                grad = mode == "fwd+bwd"
                fns = {}
                for name, fn in variants.items():
                    make = _floor_inputs if name == "floor" else _VARIANT_INPUTS.get(name, _linear_inputs)
                    args = make(op, E, B, fin, fout, dtype, device, grad)
                    if grad:  # every distinct input that requires grad (tied inputs appear twice)
                        leaves = list({id(a): a for a in args if a is not None and a.requires_grad}.values())
                        g = torch.randn(E * B, (2 * fout if (name == "floor" and op != "batch_ensemble_linear")
                                                else fout), dtype=dtype, device=device)

                        def step(fn=fn, args=args, leaves=leaves, g=g):
                            torch.autograd.grad(fn(*args), leaves, g)
                    else:
                        def step(fn=fn, args=args):
                            with torch.no_grad():
                                fn(*args)
                    fns[name] = step
                samples = {}
                times = time_variants(fns, device, repeats, inner, clock=clock, samples_out=samples)
                floor, floor_min = times["floor"]
                for name, (ms, ms_min) in times.items():
                    # the median over rounds of this variant's time / the floor's in the same round: load
                    # that drifts between rounds (a shared machine) cancels in each round's ratio
                    paired = statistics.median(a / b for a, b in zip(samples[name], samples["floor"]))
                    rows.append({"op": op, "shape": (E, B, fin, fout), "mode": mode, "variant": name, "ms": ms,
                                 "ratio": ms / floor, "min_ms": ms_min, "min_ratio": ms_min / floor_min,
                                 "paired_ratio": paired})
                # as soon as it is measured: a run stopped by a time limit keeps what it measured
                print(f"[ops] {op} {(E, B, fin, fout)} {mode}: floor {floor:.3f} ms | " + " | ".join(
                    f"{name} {ms:.3f} ms ({ms / floor:.2f}x)" for name, (ms, _) in times.items() if name != "floor"),
                      flush=True)
    return rows


def describe_machine(device: torch.device, dtype) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                where = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return (f"device: {device.type} ({where}), torch {torch.__version__}, threads: {torch.get_num_threads()}, "
            f"dtype: {str(dtype).replace('torch.', '')}")


def format_table(rows: list) -> str:
    lines = ["| op | E, B, in, out | mode | variant | median ms | x floor | min ms | min x floor | paired x floor |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        E, B, fin, fout = row["shape"]
        lines.append(f"| {row['op']} | {E}, {B}, {fin}, {fout} | {row['mode']} | {row['variant']} | "
                     f"{row['ms']:.3f} | {row['ratio']:.3f} | {row['min_ms']:.3f} | {row['min_ratio']:.3f} | "
                     f"{row['paired_ratio']:.3f} |")
    return "\n".join(lines)


def _parse_shape(text: str):
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"a shape is E,B,in,out (four ints), got {text!r}")
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=_parse_shape, nargs="+", default=list(DEFAULT_SHAPES),
                        help="E,B,in,out per shape (default: 4,256,512,512 4,256,1024,1024)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds; the median is reported")
    parser.add_argument("--inner", type=int, default=3, help="calls per timed sample")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--cpu-time", action="store_true",
                        help="with --threads 1: time the thread's CPU time, not wall time (robust on a busy machine)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="time only these variants (the floor is always timed), e.g. --variants cpp cpp-kernel")
    parser.add_argument("--ops", nargs="+", default=list(LINEAR_OPS), choices=list(LINEAR_OPS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(describe_machine(device, dtype) + (", clock: thread CPU time" if args.cpu_time else ", clock: wall"))
    print("shapes (E, B, in, out): " + ", ".join(str(s) for s in args.shapes)
          + "; floor = F.linear over the E*B rows (2*out outputs for the hyper op)")
    rows = run_linear(args.shapes, dtype, device, args.repeats, args.inner, not args.no_compile, args.ops,
                      args.variants, args.cpu_time)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
