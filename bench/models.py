"""Model-level benchmarks: one training step and one inference pass of the zoo's ResNet-20 and Wide
ResNet 28-k, every ensemble flavour, on the same number of member-images.

    python -m bench --suite models [--device cpu|cuda] [--quick] [--json PATH]
    python -m bench.models --help            # this suite alone, with more knobs

E members, B images per member, rows member-major (rows k*B .. (k+1)*B-1 belong to member k).
Every candidate processes E*B member-images per step:

  plain               the plain network on E*B distinct images (the floor every ensemble is held to)
  batch               hyperkern BatchEnsemble (variant="batch", backend="auto"): one minibatch of B
                      images tiled E times (hyperkern.nn.tile), shared BatchNorm over the E*B rows
  batch[torch]        the same with backend="torch" (only when "auto" resolves to another backend)
  batch[triton]       the same with backend="triton" (CUDA only, when "auto" resolves to another backend)
  batch/tabm          the batch model's parameters computed TabM style (bench/peers.py: broadcast views)
  batch/torch_unc     ... torch-uncertainty style (bench/peers.py: factors repeat_interleave'd per row)
  hyper_batch         hyperkern hyper-batch ensemble: per-row lambdas sampled from the members'
                      log-uniform distributions, forward(tile(x), normalize(lam)),
                      loss = CE + model.l2_penalty(lam) / n_train
  deep/loop           a deep ensemble of E plain networks (E times the parameters), a Python loop
                      over members with B images each, one backward, one optimizer step
  deep/vmap           the same E networks through torch.func.stack_module_state + vmap(functional_call)

A training step is forward + cross-entropy (mean over the E*B rows) + backward + SGD(momentum 0.9,
nesterov; weight decay 5e-4 for all but hyper_batch, whose L2 is its penalty; fused=True on CPU and CUDA
alike: one aten::_fused_sgd_ for all parameters, where torch's default is a per-parameter loop on the CPU
and foreach kernels on CUDA) + zero_grad(set_to_none)
(so every step starts without gradients and its peak memory counts the gradients it allocates).
Inference is model.eval() under torch.inference_mode (hyper_batch at each member's distribution mean).
Reported: median ms, member-images/s (E*B / time), the ratio to plain, the peak memory of one call
above what exists before it (bench/common.py: activations, gradients, temporaries), and the bytes
of parameters + buffers.

BatchNorm under vmap: stack_module_state stacks the buffers too, so every member's running_mean /
running_var is a batched tensor and F.batch_norm's in-place running-stat update is legal inside
vmap (each member updates its own slice, as the loop does). torch.func.replace_all_batch_norm_modules_
is only needed when the buffers are NOT batched, and it stops running-stat tracking altogether,
which would make the vmap ensemble a different model from the loop; so it is not used here.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import hyperkern.models as zoo
from hyperkern._backends import available_backends, resolve_backend
from hyperkern.nn import EnsembleLogUniform, tile

from bench.common import (MIB, describe_environment, format_markdown_table, format_target, params_bytes,
                          peak_memory_bytes, time_interleaved)
from bench.peers import swap_batch_ensemble_layers

__all__ = ["model_configs", "build_candidates", "run_models", "format_models_table", "check_model_targets",
           "count_step_ops", "operator_counts", "format_operator_counts", "check_operator_targets", "ALL_VARIANTS"]

ALL_VARIANTS = ("plain", "batch", "batch[torch]", "batch[triton]", "batch/tabm", "batch/torch_unc", "hyper_batch",
                "deep/loop", "deep/vmap")
N_TRAIN = 50_000  # CIFAR-10's training set: the hyper_batch penalty is divided by it (docs/method.md section 3)


def model_configs(device: str, *, quick: bool = False, tiny: bool = False) -> list[dict]:
    """The networks each suite runs: name, zoo factory, constructor kwargs, image size.

    CPU: ResNet-20 and a reduced-width WRN-28-2 (WRN-28-10 is 36.5M parameters, minutes per CPU step).
    CUDA: ResNet-20 and the full WRN-28-10. quick: ResNet-20 and a WRN-16-2 (CPU) / WRN-28-10 (CUDA).
    tiny: a depth-8 width-4 ResNet and a WRN-10-1 on 8x8 images (the smoke test; numbers meaningless).
    """
    if tiny:
        return [{"name": "resnet8-w4", "arch": "resnet20", "kwargs": {"depth": 8, "width": 4}, "image": 8},
                {"name": "wrn10-1", "arch": "wrn28_10", "kwargs": {"depth": 10, "width": 1}, "image": 8}]
    resnet = {"name": "resnet20", "arch": "resnet20", "kwargs": {}, "image": 32}
    if device == "cuda":
        return [resnet, {"name": "wrn28-10", "arch": "wrn28_10", "kwargs": {}, "image": 32}]
    if quick:
        return [resnet, {"name": "wrn16-2", "arch": "wrn28_10", "kwargs": {"depth": 16, "width": 2}, "image": 32}]
    return [resnet, {"name": "wrn28-2", "arch": "wrn28_10", "kwargs": {"width": 2}, "image": 32}]


@dataclass
class Candidate:
    name: str
    train_step: Callable[[], object]
    infer: Callable[[], object]
    state_bytes: int  # parameters + buffers (+ the hyper_batch lambda distributions)
    backend: str = "-"
    notes: str = ""
    modules: list = field(default_factory=list)  # put in train() / eval() mode before each phase
    keep: list = field(default_factory=list)  # other objects the closures use (optimizers, ...)

    def set_mode(self, mode: str):
        for m in self.modules:
            m.train(mode == "train")


def _sgd(params, weight_decay):
    # fused: the same single optimizer op on the CPU and on CUDA (torch's default differs: a per-parameter
    # loop on the CPU, foreach on CUDA), so the step's operator counts compare across devices
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=weight_decay, fused=True)


def _make(arch, kwargs, variant, E, device, dtype, backend="auto"):
    factory = getattr(zoo, arch)
    extra = {} if variant == "plain" else {"backend": backend}
    return factory(num_classes=10, in_channels=3, variant=variant, ensemble_size=E, device=device, dtype=dtype,
                   **kwargs, **extra)


def _module_state_bytes(*modules):
    return params_bytes([t for m in modules for t in list(m.parameters()) + list(m.buffers())])


def _conv_backend(model, device) -> str:
    """The backend the model's rank-1 convolutions resolve to on device (what "auto" picks there)."""
    for m in model.modules():
        if hasattr(m, "backend") and hasattr(m, "kernel_size"):
            op = "hyper_batch_ensemble_conv2d" if hasattr(m, "delta") else "batch_ensemble_conv2d"
            return resolve_backend(m.backend, torch.device(device), op)
    return "-"


def _rank1_candidate(name, model, x_one, y_one, E, device, backend_label, notes=""):
    """batch-variant model (or a peer-swapped copy): B images tiled E times."""
    opt = _sgd(model.parameters(), 5e-4)
    y_rows = tile(y_one, E)

    def train_step():
        loss = F.cross_entropy(model(tile(x_one, E)), y_rows)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        with torch.inference_mode():
            return model(tile(x_one, E))

    return Candidate(name, train_step, infer, _module_state_bytes(model), backend_label, notes, [model], [opt])


def build_candidates(arch: str, kwargs: dict, *, E: int, B: int, image: int, device, dtype,
                     variants=ALL_VARIANTS, seed: int = 0) -> dict[str, Candidate]:
    """The benchmark candidates for one network (see the module docstring); keys in ALL_VARIANTS order."""
    device = torch.device(device)
    torch.manual_seed(seed)
    x_rows = torch.randn(E * B, 3, image, image, device=device, dtype=dtype)  # E*B distinct images
    y_rows = torch.randint(0, 10, (E * B,), device=device)
    x_one, y_one = x_rows[:B].contiguous(), y_rows[:B].contiguous()  # one minibatch, tiled by the rank-1 models
    out: dict[str, Candidate] = {}

    if "plain" in variants:
        model = _make(arch, kwargs, "plain", E, device, dtype)
        opt = _sgd(model.parameters(), 5e-4)

        def train_step(model=model, opt=opt):
            F.cross_entropy(model(x_rows), y_rows).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer(model=model):
            with torch.inference_mode():
                return model(x_rows)

        out["plain"] = Candidate("plain", train_step, infer, _module_state_bytes(model), "-",
                                 f"{E * B} distinct images", [model], [opt])

    if "batch" in variants:
        model = _make(arch, kwargs, "batch", E, device, dtype)
        be = _conv_backend(model, device)
        out["batch"] = _rank1_candidate("batch", model, x_one, y_one, E, device, be, "auto backend")
    # the other backends, where "auto" picks another one (Triton on the GPU only: on the CPU it is the interpreter)
    for forced in ("torch", "triton") if device.type == "cuda" else ("torch",):
        label = f"batch[{forced}]"
        if label in variants and forced in available_backends(device.type):
            probe = _make(arch, kwargs, "batch", E, "meta", dtype)
            if _conv_backend(probe, device) != forced:
                model = _make(arch, kwargs, "batch", E, device, dtype, backend=forced)
                out[label] = _rank1_candidate(label, model, x_one, y_one, E, device, forced)
    for style, label in (("tabm", "batch/tabm"), ("torch_uncertainty", "batch/torch_unc")):
        if label in variants:
            model = swap_batch_ensemble_layers(_make(arch, kwargs, "batch", E, device, dtype), style)
            out[label] = _rank1_candidate(label, model, x_one, y_one, E, device, "peer", f"bench/peers.py {style}")

    if "hyper_batch" in variants:
        model = _make(arch, kwargs, "hyper_batch", E, device, dtype)
        space = model.hparam_space
        dist = EnsembleLogUniform(space, E, dtype=dtype, device=device)
        opt = _sgd(model.parameters(), 0.0)
        y_tiled = tile(y_one, E)
        test_lam = dist.mean(B).detach()
        test_z = space.normalize(test_lam)

        def train_step(model=model, opt=opt, dist=dist, space=space):
            lam = dist.sample(B)  # (E*B, m) original scale, member-major
            logits = model(tile(x_one, E), space.normalize(lam))
            loss = F.cross_entropy(logits, y_tiled) + model.l2_penalty(lam) / N_TRAIN
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer(model=model):
            with torch.inference_mode():
                return model(tile(x_one, E), test_z)

        out["hyper_batch"] = Candidate("hyper_batch", train_step, infer, _module_state_bytes(model, dist),
                                       _conv_backend(model, device), "per-row lambdas + L2 penalty",
                                       [model], [opt, dist])

    if "deep/loop" in variants or "deep/vmap" in variants:
        members = [_make(arch, kwargs, "plain", E, device, dtype) for _ in range(E)]
        x_members = x_rows.view(E, B, *x_rows.shape[1:])
        if "deep/loop" in variants:
            opt = _sgd([p for m in members for p in m.parameters()], 5e-4)

            def train_step(members=members, opt=opt):
                loss = sum(F.cross_entropy(m(x_members[k]), y_rows[k * B:(k + 1) * B])
                           for k, m in enumerate(members)) / E
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def infer(members=members):
                with torch.inference_mode():
                    return torch.cat([m(x_members[k]) for k, m in enumerate(members)])

            out["deep/loop"] = Candidate("deep/loop", train_step, infer, _module_state_bytes(*members), "-",
                                         f"{E} models x {B} images, Python loop", members, [opt])
        if "deep/vmap" in variants:
            from torch.func import functional_call, stack_module_state, vmap

            vm_members = [copy.deepcopy(m) for m in members]
            params, buffers = stack_module_state(vm_members)  # leaves with requires_grad; buffers batched
            base = copy.deepcopy(vm_members[0]).to("meta")
            del vm_members
            opt = _sgd(list(params.values()), 5e-4)

            def call(p, b, x):
                return functional_call(base, (p, b), (x,))

            batched = vmap(call)

            def train_step(params=params, buffers=buffers, opt=opt, batched=batched):
                F.cross_entropy(batched(params, buffers, x_members).flatten(0, 1), y_rows).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def infer(params=params, buffers=buffers, batched=batched):
                with torch.inference_mode():
                    return batched(params, buffers, x_members).flatten(0, 1)

            out["deep/vmap"] = Candidate("deep/vmap", train_step, infer,
                                         params_bytes(list(params.values()) + list(buffers.values())), "-",
                                         "stack_module_state + vmap(functional_call)", [base], [params, buffers, opt])
    return out


def graphed(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """fn captured into one CUDA graph (after `warmup` calls on a side stream, which also creates the
    optimizer state and runs cuDNN's / Triton's autotuning outside the capture); returns its replay.
    Raises RuntimeError when fn cannot be captured (e.g. it reads a device value on the host)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_models(device="cpu", dtype=torch.float32, *, E: int = 4, B: int = 32, configs=None, quick: bool = False,
               tiny: bool = False, repeats: int | None = None, warmup: int | None = None,
               variants=ALL_VARIANTS, memory: bool = True, clock: str = "wall", cuda_graphs: bool = False,
               log=print) -> list[dict]:
    """Time (and measure the memory of) every candidate of every config; returns result rows.

    cuda_graphs: time each step as the replay of one CUDA graph (CUDA only; no memory column), which
    takes the host's Python and launch costs out of small networks' steps: what is left is GPU time.
    Rows get mode "train (graph)" / "infer (graph)"; a candidate that cannot be captured is left out
    with its reason logged.
    """
    device = torch.device(device)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
    if configs is None:
        configs = model_configs(device.type, quick=quick, tiny=tiny)
    repeats = repeats if repeats is not None else (3 if quick or tiny else 10)
    warmup = warmup if warmup is not None else (1 if quick or tiny else 3)
    rows = []
    for cfg in configs:
        cands = build_candidates(cfg["arch"], cfg["kwargs"], E=E, B=B, image=cfg["image"], device=device,
                                 dtype=dtype, variants=variants)
        shape = f"E={E}, B={B}, {E * B}x3x{cfg['image']}x{cfg['image']}"
        log(f"[models] {cfg['name']} ({shape}): timing {', '.join(cands)}")
        for mode in ("train", "infer"):
            for c in cands.values():
                c.set_mode(mode)
            fns = {n: (c.train_step if mode == "train" else c.infer) for n, c in cands.items()}
            if cuda_graphs:
                fns = _capture_all(fns, device, log, f"{cfg['name']} {mode}")
            times = time_interleaved(fns, device, repeats=repeats, warmup=warmup, clock=clock)
            plain_ms = times["plain"]["ms"] if "plain" in times else None
            # one line per phase as soon as it is timed: a run stopped by a time limit keeps what it measured
            log(f"[models] {cfg['name']} {mode}: " + ", ".join(
                f"{n} {t['ms']:.2f} ms" + (f" ({t['ms'] / plain_ms:.3f}x)" if plain_ms else "")
                for n, t in times.items()))
            for name, t in times.items():
                c = cands[name]
                peak = None
                if memory and not cuda_graphs:
                    peak = peak_memory_bytes(c.train_step if mode == "train" else c.infer, device)
                rows.append({
                    "suite": "models", "model": cfg["name"], "arch": cfg["arch"], "kwargs": cfg["kwargs"],
                    "mode": f"{mode} (graph)" if cuda_graphs else mode, "variant": name, "backend": c.backend,
                    "E": E, "B": B, "rows": E * B,
                    "input": [E * B, 3, cfg["image"], cfg["image"]], "ms": t["ms"], "iqr_ms": t["iqr_ms"],
                    "min_ms": t["min_ms"], "samples": t["samples"],
                    "clock": clock if device.type == "cpu" else "cuda events",
                    "images_per_s": E * B / (t["ms"] / 1e3),
                    "x_plain": (t["ms"] / plain_ms) if plain_ms else None,
                    "peak_mib": None if peak is None else peak / MIB,
                    "state_mib": c.state_bytes / MIB, "notes": c.notes,
                })
        del cands
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _capture_all(fns: dict, device, log, what: str) -> dict:
    out = {}
    for name, fn in fns.items():
        try:
            out[name] = graphed(fn, device)
        except RuntimeError as exc:  # e.g. a host read of a device value inside the step
            log(f"[models] {what}: {name} cannot be captured in a CUDA graph, left out: {str(exc).splitlines()[0]}")
    return out


def format_models_table(rows: list[dict]) -> str:
    header = ["model", "mode", "variant", "backend", "median ms", "member-images/s", "x plain", "peak MiB",
              "params+buffers MiB"]
    body = []
    for r in rows:
        if r.get("suite") != "models":
            continue
        body.append([r["model"], r["mode"], r["variant"], r["backend"], f"{r['ms']:.2f}", f"{r['images_per_s']:.0f}",
                     "-" if r["x_plain"] is None else f"{r['x_plain']:.3f}",
                     "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}", f"{r['state_mib']:.2f}"])
    return format_markdown_table(header, body, ["l", "l", "l", "l", "r", "r", "r", "r", "r"])


# Issue 15's training-step targets, x plain at the same E*B rows: (model name, variant) -> bound. WRN-28-10 runs
# on CUDA only (the CPU suite has a reduced width). "train (graph)" rows (--cuda-graphs) are judged too and
# named so: the issue allows CUDA graphs if the table says which.
STEP_TARGETS = {("resnet20", "batch"): 1.15, ("resnet20", "hyper_batch"): 2.0,
                ("wrn28-10", "batch"): 1.10, ("wrn28-10", "hyper_batch"): 2.0}


def check_model_targets(rows: list[dict], device: str) -> list[dict]:
    """The model-level targets of the training step: [{target, value, ok}], for every train mode present
    (eager; CUDA-graph replays when timed)."""
    def ms(model, mode, variant):
        for r in rows:
            if r.get("suite") == "models" and r["model"] == model and r["mode"] == mode and r["variant"] == variant:
                return r["ms"]
        return None

    out = []
    modes = sorted({r["mode"] for r in rows if r.get("suite") == "models" and r["mode"].startswith("train")})
    for mode in modes:
        for (model, variant), bound in STEP_TARGETS.items():
            plain, other = ms(model, mode, "plain"), ms(model, mode, variant)
            if plain and other:
                out.append({"target": f"{model} {mode}: {variant} <= {bound}x plain", "value": f"{other / plain:.3f}x",
                            "ok": other / plain <= bound})
        batch, loop = ms("resnet20", mode, "batch"), ms("resnet20", mode, "deep/loop")
        if batch and loop:
            if device == "cuda":
                out.append({"target": f"resnet20 {mode}: batch >= 1.5x faster than deep/loop",
                            "value": f"{loop / batch:.2f}x faster", "ok": loop / batch >= 1.5})
            else:
                out.append({"target": f"resnet20 {mode}: batch no slower than deep/loop",
                            "value": f"{batch / loop:.3f}x", "ok": batch <= loop})
    return out


# ---- operators dispatched by one training step -------------------------------------------------------------

OP_COUNT_VARIANTS = ("plain", "batch", "hyper_batch")
OP_COUNT_TARGETS = {"batch": 1.15, "hyper_batch": 2.0}  # x plain's operator count (issue 15)
_ALLOCATIONS = ("aten::empty", "aten::empty_strided", "aten::empty_like")


def _is_op(name: str) -> bool:
    return name.startswith(("aten::", "hyperkern::"))


def count_step_ops(candidate: Candidate, warmup: int = 2) -> dict:
    """Operators (aten:: and hyperkern::) one training step dispatches, from a torch.profiler trace on the
    device the candidate was built for (CPU activity: the host side, which is the same code on CUDA):
    total (all nesting levels), top (called from Python, not from inside another operator), allocations
    (aten::empty / empty_strided / empty_like operators at any level), allocator_calls (the profiler's
    memory events with positive bytes: every allocation, on any device, whether an operator asked for it or
    a kernel allocated without a dispatcher call, as ATen's structured kernels and hyperkern's conv kernels
    do, so moving an allocation out of the dispatcher shows as such here) and convolutions
    (aten::convolution, forward, any level) and convolution_backward. After `warmup` steps (optimizer
    state exists)."""
    from torch.profiler import ProfilerActivity, profile

    candidate.set_mode("train")
    for _ in range(warmup):
        candidate.train_step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        candidate.train_step()
    ops = [e for e in prof.events() if _is_op(e.name)]
    allocator_calls = sum(1 for e in prof.profiler.kineto_results.events()
                          if e.name() == "[memory]" and e.nbytes() > 0)

    def top(e):
        p = e.cpu_parent
        while p is not None:
            if _is_op(p.name):
                return False
            p = p.cpu_parent
        return True

    return {"total": len(ops), "top": sum(top(e) for e in ops),
            "allocations": sum(e.name in _ALLOCATIONS for e in ops), "allocator_calls": allocator_calls,
            "convolutions": sum(e.name == "aten::convolution" for e in ops),
            "convolution_backward": sum(e.name == "aten::convolution_backward" for e in ops)}


def operator_counts(arch="resnet20", kwargs=None, *, E: int = 4, B: int = 2, image: int = 32, device="cpu",
                    variants=OP_COUNT_VARIANTS, cpu_scheme: str | None = "one_conv") -> dict[str, dict]:
    """count_step_ops for each variant of one network (default: ResNet-20 at E=4, B=2), with "x_plain"
    (total / plain's total) on every variant when plain is among them.

    cpu_scheme: the CPU conv kernels' scheme while counting (HYPERKERN_CPU_CONV; None: their own rule).
    Default "one_conv": the host code the CUDA conv ops run (csrc/one_conv.h), built for the CPU."""
    cands = build_candidates(arch, kwargs or {}, E=E, B=B, image=image, device=device, dtype=torch.float32,
                             variants=tuple(variants))
    old = os.environ.get("HYPERKERN_CPU_CONV")
    if cpu_scheme is not None:
        os.environ["HYPERKERN_CPU_CONV"] = cpu_scheme
    try:
        out = {name: count_step_ops(c) for name, c in cands.items()}
    finally:
        if old is None:
            os.environ.pop("HYPERKERN_CPU_CONV", None)
        else:
            os.environ["HYPERKERN_CPU_CONV"] = old
    if "plain" in out:
        for counts in out.values():
            counts["x_plain"] = counts["total"] / out["plain"]["total"]
    return out


def format_operator_counts(counts: dict[str, dict]) -> str:
    header = ["variant", "ops (all levels)", "x plain", "top-level ops", "allocations (empty ops)",
              "allocator calls", "convolutions", "conv backward"]
    body = [[name, str(c["total"]), "-" if c.get("x_plain") is None else f"{c['x_plain']:.2f}", str(c["top"]),
             str(c["allocations"]), str(c["allocator_calls"]), str(c["convolutions"]),
             str(c["convolution_backward"])]
            for name, c in counts.items()]
    return format_markdown_table(header, body, ["l", "r", "r", "r", "r", "r", "r", "r"])


def check_operator_targets(counts: dict[str, dict], label: str = "resnet20") -> list[dict]:
    """The issue's operator-count targets: batch <= 1.15x and hyper_batch <= 2x plain's (all nesting levels)."""
    out = []
    for name, limit in OP_COUNT_TARGETS.items():
        if name in counts and counts[name].get("x_plain") is not None:
            ratio = counts[name]["x_plain"]
            out.append({"target": f"{label} train step ATen operators: {name} <= {limit}x plain",
                        "value": f"{ratio:.3f}x ({counts[name]['total']} vs {counts['plain']['total']})",
                        "ok": ratio <= limit})
    return out


def print_operator_counts(device="cpu", *, tiny: bool = False, E: int = 4, B: int = 2, log=print) -> list[dict]:
    """Counts the operators of ResNet-20's train step (tiny: the smoke config's ResNet) and prints the table
    and the targets; returns the targets."""
    cfg = model_configs(str(torch.device(device).type), tiny=tiny)[0]
    counts = operator_counts(cfg["arch"], cfg["kwargs"], E=E, B=B, image=cfg["image"], device=device)
    log(f"\nATen operators dispatched by one {cfg['name']} training step (E={E}, B={B}, torch.profiler, "
        f"host side; fused SGD; the conv ops' one-convolution host code, as on CUDA):\n")
    log(format_operator_counts(counts))
    targets = check_operator_targets(counts, cfg["name"])
    for t in targets:
        log(format_target(t))
    return targets


def main(argv=None):
    parser = argparse.ArgumentParser(description="hyperkern model-level benchmarks (see python -m bench)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ensemble-size", "-E", type=int, default=4)
    parser.add_argument("--per-member", "-B", type=int, default=32, help="images per member")
    parser.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), choices=list(ALL_VARIANTS))
    parser.add_argument("--models", nargs="+", default=None, help="config names to keep (e.g. resnet20)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time each step as one CUDA graph replay (GPU time without the host's launch costs)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the rows and targets as JSON")
    args = parser.parse_args(argv)
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = describe_environment(args.device, torch.float32)
    print(env)
    configs = model_configs(args.device, quick=args.quick, tiny=args.tiny)
    if args.models:
        configs = [c for c in configs if c["name"] in args.models]
    variants = tuple(v for v in ALL_VARIANTS if v in args.variants or v == "plain")
    rows = run_models(args.device, E=args.ensemble_size, B=args.per_member, configs=configs, quick=args.quick,
                      tiny=args.tiny, repeats=args.repeats, variants=variants, memory=not args.no_memory,
                      clock=args.clock, cuda_graphs=args.cuda_graphs)
    print(format_models_table(rows))
    targets = [] if args.tiny else check_model_targets(rows, args.device)
    for t in targets:
        print(format_target(t))
    if not args.cuda_graphs:
        operator_targets = print_operator_counts(args.device, tiny=args.tiny)
        targets += [] if args.tiny else operator_targets
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows, "targets": targets}, f, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
