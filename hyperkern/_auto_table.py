"""The measured table behind backend="auto" on CUDA: per GPU model, op, dtype and problem size, the times of
the fused backends. "auto" takes, among the backends this install can run, the fastest at the measured
size nearest the call's, so Triton serves only where it was measured to win.

Sizes: linear ops (rows, in_features, out_features); conv ops (images, in_channels, out_channels, H, W).
Nearest: the smallest sum of |log(size ratio)| over the size's entries, among the entries of the call's
dtype (any dtype when none was measured) and mode ("fwd+bwd" when autograd records the call, else
"fwd"). A GPU model, op or dtype without entries keeps the fixed preference of hyperkern._backends.

The built-in entries are GPU run 2 (docs/benchmark-history.md): NVIDIA H200, torch 2.11.0+cu130, Triton
3.6.0, fp32, E = 4, CUDA-event medians in ms, from

    python3 -m bench.ops --device cuda --no-compile
    python3 bench/ops_conv.py --device cuda --no-compile --batch 32 --formats nchw --shapes 16x32 160x32

Triton is slower at every one of them (its Python launches), so today "auto" never picks it. A new
measurement replaces or extends them without a code change: `python -m bench --device cuda --suite ops
--auto-table PATH` writes the measured entries as JSON, and HYPERKERN_AUTO_TABLE=PATH (read at import)
adds them to the built-in ones; an entry of the file replaces a built-in one with the same device, op,
dtype, mode and size.
"""
from __future__ import annotations

import json
import math
import os

TABLE_ENV = "HYPERKERN_AUTO_TABLE"
FUSED = ("cpp", "triton")  # the backends the table arbitrates; "torch" is timed for reference only

_H200 = "NVIDIA H200"
_LIN, _CONV = (1024, 512, 512), (128, 16, 16, 32, 32)


def _entry(device, op, dtype, mode, size, **ms):
    return {"device": device, "op": op, "dtype": dtype, "mode": mode, "size": list(size), "ms": ms}


BUILTIN = [
    _entry(_H200, "batch_ensemble_linear", "float32", "fwd", _LIN, cpp=0.063, triton=0.157, torch=0.096),
    _entry(_H200, "batch_ensemble_linear", "float32", "fwd+bwd", _LIN, cpp=0.363, triton=1.089, torch=0.510),
    _entry(_H200, "batch_ensemble_linear", "float32", "fwd", (1024, 1024, 1024), cpp=0.094, triton=0.204,
           torch=0.122),
    _entry(_H200, "batch_ensemble_linear", "float32", "fwd+bwd", (1024, 1024, 1024), cpp=0.441, triton=1.060,
           torch=0.599),
    _entry(_H200, "hyper_batch_ensemble_linear", "float32", "fwd", _LIN, cpp=0.374, triton=0.554, torch=0.527),
    _entry(_H200, "hyper_batch_ensemble_linear", "float32", "fwd+bwd", _LIN, cpp=0.866, triton=1.624, torch=1.328),
    _entry(_H200, "hyper_batch_ensemble_linear", "float32", "fwd", (1024, 1024, 1024), cpp=0.315, triton=0.475,
           torch=0.406),
    _entry(_H200, "hyper_batch_ensemble_linear", "float32", "fwd+bwd", (1024, 1024, 1024), cpp=0.866, triton=1.669,
           torch=1.342),
    _entry(_H200, "batch_ensemble_conv2d", "float32", "fwd", _CONV, cpp=0.13, triton=0.29, torch=0.16),
    _entry(_H200, "batch_ensemble_conv2d", "float32", "fwd+bwd", _CONV, cpp=0.61, triton=1.32, torch=0.78),
    _entry(_H200, "batch_ensemble_conv2d", "float32", "fwd", (128, 160, 160, 32, 32), cpp=0.47, triton=0.97,
           torch=0.57),
    _entry(_H200, "batch_ensemble_conv2d", "float32", "fwd+bwd", (128, 160, 160, 32, 32), cpp=2.41, triton=5.21,
           torch=2.71),
]

_KEYS = ("device", "op", "dtype", "mode", "size", "ms")


def check_entries(entries, source: str) -> list[dict]:
    """The entries of a table file, each validated (a clear error naming the file and the entry)."""
    if isinstance(entries, dict):
        entries = entries.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a JSON list of entries (or {{'entries': [...]}}), got "
                         f"{type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or any(k not in e for k in _KEYS):
            raise ValueError(f"{source}: entry {i} must be an object with keys {list(_KEYS)}, got {e!r}")
        size, ms = e["size"], e["ms"]
        if (not isinstance(size, list) or not size
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ValueError(f"{source}: entry {i} 'size' must be a list of positive ints, got {size!r}")
        if (not isinstance(ms, dict) or not ms
                or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in ms.values())):
            raise ValueError(f"{source}: entry {i} 'ms' must map backend names to positive times, got {ms!r}")
        if e["mode"] not in ("fwd", "fwd+bwd"):
            raise ValueError(f"{source}: entry {i} 'mode' must be 'fwd' or 'fwd+bwd', got {e['mode']!r}")
    return entries


def _identity(e) -> tuple:
    return (e["device"], e["op"], e["dtype"], e["mode"], tuple(e["size"]))


def load(path: str | None = None) -> list[dict]:
    """The built-in entries, with those of the JSON file at `path` (default: $HYPERKERN_AUTO_TABLE) on top."""
    path = os.environ.get(TABLE_ENV) if path is None else path
    merged = {_identity(e): e for e in BUILTIN}
    if path:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{TABLE_ENV}={path!r}: cannot read the auto-backend table ({exc})") from exc
        merged.update({_identity(e): e for e in check_entries(data, path)})
    return list(merged.values())


def winner(entry: dict, runnable) -> str | None:
    """The fastest of the fused backends measured in `entry` that `runnable(name)` allows, or None."""
    timed = [(t, name) for name, t in entry["ms"].items() if name in FUSED and runnable(name)]
    return min(timed)[1] if timed else None


def _distance(a, b) -> float:
    if len(a) != len(b):
        return math.inf
    return sum(abs(math.log(x / y)) for x, y in zip(a, b))


def nearest(entries: list[dict], size, dtype: str, mode: str) -> dict | None:
    """The entry nearest `size` among those of `dtype` (all dtypes when none) and `mode` (all modes when none)."""
    for pool in ([e for e in entries if e["dtype"] == dtype and e["mode"] == mode],
                 [e for e in entries if e["mode"] == mode], entries):
        candidates = [(_distance(e["size"], size), i) for i, e in enumerate(pool)]
        candidates = [c for c in candidates if c[0] < math.inf]
        if candidates:
            return pool[min(candidates)[1]]
    return None


def call_size(family: str, x, weight) -> tuple[int, ...]:
    """A call's size in the table's terms, from its input and (shared) weight."""
    if family == "conv":
        return (x.shape[0], x.shape[1], weight.shape[0], x.shape[2], x.shape[3])
    return (x.numel() // max(x.shape[-1], 1), x.shape[-1], weight.shape[0])
