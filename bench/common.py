"""Timing and memory helpers shared by the benchmark suites (python -m bench).

Timing (time_interleaved): every candidate is warmed up, then timed in ROUNDS that visit the
candidates in turn (A B C A B C ...), so a load change on a shared machine hits all of them alike;
each sample is `inner` back-to-back calls, and the reported number is the median sample divided by
`inner`. On CUDA a sample is bracketed by torch.cuda.Event records on the current stream and read
after synchronising (GPU time of the queued work, launch gaps included); on CPU by
time.perf_counter around the calls (clock="wall"), or by time.process_time (clock="cpu": the CPU
time of this process, all its threads). With ONE thread the CPU clock measures the work itself
even while other processes share the cores (time spent descheduled is not counted), which makes
ratios on a loaded machine repeatable; with several threads it also counts OpenMP spin-waiting,
so use the wall clock there.

Peak memory (peak_memory_bytes): the largest number of bytes that were live ABOVE the level at the
start of one call, i.e. what the call itself allocates at its worst moment (activations kept for
backward, gradients when they are set to None between steps, temporaries, workspaces); parameters
and optimizer state that exist before the call are not counted (params_bytes reports those).
  - CUDA: torch.cuda.reset_peak_memory_stats, then max_memory_allocated() - memory_allocated()
    before the call (the caching allocator's count of bytes handed to tensors, not cudaMalloc'd
    reserve).
  - CPU: torch.profiler with profile_memory=True records every allocation and free of the CPU
    allocator (c10) with its size; the running sum of those events in time order is the live-byte
    curve and its maximum is the peak. This counts tensor storage (including oneDNN/MKLDNN tensor
    allocations that go through c10), not malloc'd scratch inside BLAS/oneDNN kernels and not the
    process RSS (glibc keeps freed pages, so an RSS delta would be neither repeatable nor
    comparable between variants). tracemalloc would see none of it (it tracks Python objects only).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

__all__ = ["CLOCKS", "sync", "time_interleaved", "peak_memory_bytes", "describe_environment", "device_name", "cpu_name",
           "params_bytes", "format_markdown_table", "MIB"]

MIB = float(1 << 20)


def sync(device: torch.device) -> None:
    """Wait for queued work on device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


def time_interleaved(fns: dict[str, Callable[[], object]], device, *, repeats: int = 10, warmup: int = 3,
                     inner: int = 1, clock: str = "wall") -> dict[str, dict]:
    """Median milliseconds per call of each fn in fns, measured in interleaved rounds.

    clock: "wall" (time.perf_counter) or "cpu" (time.process_time); CPU devices only, CUDA always
    uses CUDA events.

    Returns {name: {"ms": median ms per call, "min_ms": fastest sample, "iqr_ms": interquartile range
    of the samples, "samples": number of samples}}.
    """
    device = torch.device(device)
    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"repeats and inner must be >= 1 and warmup >= 0, got {repeats}, {inner}, {warmup}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    timer = time.process_time if clock == "cpu" else time.perf_counter
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / inner)
            else:
                t0 = timer()
                for _ in range(inner):
                    fn()
                samples[name].append((timer() - t0) * 1e3 / inner)
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        out[name] = {"ms": statistics.median(values), "min_ms": min(values), "iqr_ms": q[2] - q[0],
                     "samples": len(values)}
    return out


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 (the profiler backend prints a line per start / stop from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr_fd():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr_fd():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() in (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device) -> int:
    """Peak bytes live above the starting level during one call of fn (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return _cpu_peak_bytes(fn)


def params_bytes(tensors) -> int:
    """Bytes of the given tensors (parameters, buffers), each storage counted once."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def device_name(device) -> str:
    """GPU name, or the CPU model (cpu_name)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device, dtype: torch.dtype) -> dict:
    """What a result depends on: device and its name, dtype, threads, versions, backends, date."""
    import hyperkern

    device = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "device_name": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hyperkern_backends": hyperkern.available_backends(device.type),
    }
    try:
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def format_markdown_table(header: list[str], rows: list[list], align: list[str] | None = None) -> str:
    """A GitHub markdown table; align entries are 'l' or 'r' (default: left)."""
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_target(t: dict) -> str:
    """One target line as every suite prints it: '- PASS  <target>: <value>' (or MISS)."""
    return f"- {'PASS' if t['ok'] else 'MISS'}  {t['target']}: {t['value']}"
