"""Which op backends this install can run, and the choice behind backend="auto".

Backends:
  "torch"  - the plain PyTorch composition (always available; the reference users know).
  "cpp"    - the compiled extension hyperkern._C (CPU kernels; CUDA kernels when built with CUDA).
  "triton" - Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

BACKENDS = ("auto", "torch", "cpp", "triton")

try:  # importing the extension runs its TORCH_LIBRARY registrations
    from hyperkern import _C  # noqa: F401

    _CPP_ERROR: str | None = None
except ImportError as exc:  # not built (pure-Python install) or built against another torch
    _CPP_ERROR = f"the compiled extension hyperkern._C could not be imported ({exc})"

try:
    import triton  # noqa: F401

    _TRITON_ERROR: str | None = None
except ImportError as exc:
    _TRITON_ERROR = f"triton is not installed ({exc})"


def triton_interpreting() -> bool:
    """Whether triton runs in its interpreter. Read once, at import: triton decides it when the
    kernels are defined (hyperkern.ops imports them), so a later change of the variable changes
    nothing."""
    return _TRITON_INTERPRET


_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


OPS = ("batch_ensemble_linear", "hyper_batch_ensemble_linear", "hyper_batch_ensemble_linear_hp", "batch_ensemble_conv2d",
       "hyper_batch_ensemble_conv2d", "hyper_batch_ensemble_conv2d_hp")
# Ops with "torch" and "cpp" backends only (no Triton kernel): the hyper layers' L2 penalty of a whole
# model (hyperkern.ops.penalty). Not in OPS: available_backends() lists what runs every layer op.
TORCH_CPP_OPS = ("hyper_l2_penalty",)


def _registered_kernels() -> frozenset[tuple[str, str]]:
    """(op, dispatch key) pairs the loaded extension implements; read once at import, so that backend
    resolution inside torch.compile is a plain constant lookup."""
    if _CPP_ERROR is not None:
        return frozenset()
    found = set()
    for op in OPS + TORCH_CPP_OPS:
        for key in ("CPU", "CUDA"):
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"hyperkern::{op}", key):
                    found.add((op, key))
            except RuntimeError:  # the op is not defined by this build of the extension
                pass
    return frozenset(found)


_CPP_KERNELS = _registered_kernels()


def _cpp_reason(device_type: str, op: str = "batch_ensemble_linear") -> str | None:
    """None when the extension has a kernel for hyperkern::<op> on device_type, else why not."""
    if _CPP_ERROR is not None:
        return _CPP_ERROR
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return f"the compiled extension has no kernels for device type {device_type!r}"
    if (op, key) not in _CPP_KERNELS:
        if device_type == "cuda":
            return (f"hyperkern._C has no CUDA kernel for {op} (rebuild with a CUDA torch, nvcc and "
                    "FORCE_CUDA=1)")
        return f"hyperkern._C has no CPU kernel for {op} (rebuild the extension from this source tree)"
    return None


def _triton_reason(device_type: str) -> str | None:
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device_type == "cpu":
        if triton_interpreting():
            return None
        return "triton runs on CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before importing hyperkern)"
    return f"triton has no support for device type {device_type!r}"


def backend_status(device_type: str | None = None, op: str = "batch_ensemble_linear") -> dict[str, str | None]:
    """Map backend name -> None when `op` can run on device_type with it, else the reason it cannot.

    device_type defaults to "cuda" when a GPU is visible, else "cpu".
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cached = _STATUS.get((device_type, op))
    if cached is not None:
        return dict(cached)
    triton = (f"hyperkern has no Triton kernel for {op} (it runs with the cpp or torch backend)"
              if op in TORCH_CPP_OPS else _triton_reason(device_type))
    return {"torch": None, "cpp": _cpp_reason(device_type, op), "triton": triton}


# Every op's status on CPU and CUDA, computed once: resolve_backend runs on every op call (and inside
# torch.compile traces), and none of its inputs change after import.
_STATUS: dict[tuple[str, str], dict[str, str | None]] = {}
_STATUS.update({(dev, op): backend_status(dev, op) for dev in ("cpu", "cuda") for op in OPS + TORCH_CPP_OPS})


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends this install can run every hyperkern op with on device_type (default: cuda when
    visible, else cpu)."""
    statuses = [backend_status(device_type, op) for op in OPS]
    return [name for name in ("torch", "cpp", "triton") if all(st[name] is None for st in statuses)]


# On CUDA tensors, "auto" takes the first available of these, unless the measured table
# (hyperkern._auto_table; implementation() below) names another backend for this GPU model and size.
# Measured on an H200 (docs/benchmark-history.md, GPU run 2): the cpp ops beat the Triton ones at every
# op-suite shape, linear (4 x 256 rows, 512 and 1024 features, fwd+bwd: cpp 1.11-1.58x cuBLAS, Triton
# 3.3-3.8x; Triton's Python launches dominate at these sizes) and conv (WRN-28-10 stage 1, fwd+bwd: cpp
# 1.17x cuDNN, Triton 2.53x).
CUDA_PREFERENCE = ("cpp", "triton")


def resolve_backend(backend: str, device: torch.device, op: str,
                    prefer_on_cuda: tuple[str, ...] = CUDA_PREFERENCE) -> str:
    """Turn a user's backend argument for hyperkern op `op` into a concrete, runnable backend or
    raise ValueError."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    status = _STATUS.get((device.type, op)) or backend_status(device.type, op)
    if backend == "auto":
        order = prefer_on_cuda if device.type == "cuda" else ("cpp",)
        for name in order:
            if status[name] is None:
                return name
        return "torch"
    reason = status[backend]
    if reason is not None:
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {reason}; "
                         f"available: {[n for n, r in status.items() if r is None]}")
    return backend


def is_compiling() -> bool:
    """Whether torch.compile is tracing the caller (False on a torch without torch.compiler)."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


_IMPLS: dict[tuple, object] = {}


def implementation(family: str, op: str, backend: str, device: torch.device, torch_impl):
    """The function that runs hyperkern op `op` (of family "linear" | "conv") for a user's backend argument
    on device: torch_impl for the "torch" backend, else the fused backend module's function of that name.
    backend="auto" on CUDA follows the measured table (hyperkern._auto_table): one backend when it wins at
    every measured size of this GPU model (or nothing was measured), else a function that picks per call
    size. Resolved once per (op, backend, device) and then read from a dict: the ops run on every layer
    call, and resolving each time cost about a microsecond of a small layer's host time. Unavailable
    backends raise ValueError (resolve_backend) every time, and nothing is cached while torch.compile
    traces (it traces the resolution itself)."""
    key = (op, backend, device.type, device.index)
    try:
        fn = _IMPLS.get(key)
    except TypeError:  # an unhashable backend argument: resolve_backend below names it
        fn = None
    if fn is None:
        name = resolve_backend(backend, device, op)

        def impl(n):
            return torch_impl if n == "torch" else getattr(backend_module(family, n), op)

        fn = impl(name)
        if backend == "auto" and device.type == "cuda":
            fn = _measured_choice(family, op, device, name, impl) or fn
        if not is_compiling():
            _IMPLS[key] = fn
    return fn


def kernel_checked(family: str, op: str, backend: str, x, torch_impl):
    """The implementation of `op` for this call when its kernel checks the arguments itself, else None.

    The cpp backend's ops check every shape, dtype and device that the Python validation checks
    (csrc/rank1_linear.h, csrc/rank1_conv.h), and refuse what it refuses with an error. So a call can run
    the op first and validate only when the op raises (to replace the kernel's error with the readable
    one): on a small layer the Python checks cost as much as the kernel (docs/benchmark-history.md). Functions that may
    be called this way carry `checks_arguments = True`. None for everything else, which validates first:
    the other backends, tensor subclasses (fake and functional tensors), meta tensors, torch.compile,
    and the per-size choice of backend="auto" on CUDA. Kept per (op, backend, CUDA device) in a dict of
    its own, read without making a torch.device (which showed in a tiny layer's time)."""
    if (type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter) or is_compiling():
        return None
    if x.is_cpu:
        key = (op, backend)
    elif x.is_cuda:
        key = (op, backend, x.get_device())
    else:
        return None
    try:
        fn = _KERNEL_CHECKED.get(key, _MISSING)
    except TypeError:  # an unhashable backend argument: the validated path names it
        return None
    if fn is _MISSING:
        fn = implementation(family, op, backend, x.device, torch_impl)
        fn = fn if getattr(fn, "checks_arguments", False) else None
        _KERNEL_CHECKED[key] = fn
    return fn


_MISSING = object()
_KERNEL_CHECKED: dict[tuple, object] = {}

# What a kernel-checked call raises for arguments its kernel refuses: the op's TORCH_CHECKs and schema
# (RuntimeError, TypeError), or the Python around it meeting a non-tensor (AttributeError, IndexError).
KERNEL_REFUSALS = (RuntimeError, TypeError, AttributeError, IndexError)


def kernel_first(family: str, op: str, backend: str, x, torch_impl, args: tuple, call=None):
    """Run `op` on args without the Python checks when its kernel checks them (kernel_checked):
    call(run, *args), or run(*args) without call. None when the call must be validated first instead, or
    when the kernel refused the arguments; the caller then validates, which names what is wrong, and runs
    the op again (which raises the kernel's own error if the validation found nothing)."""
    run = kernel_checked(family, op, backend, x, torch_impl)
    if run is None:
        return None
    try:
        return run(*args) if call is None else call(run, *args)
    except KERNEL_REFUSALS:
        return None


_AUTO_TABLE: list[dict] | None = None
_DEVICE_NAMES: dict[int, str] = {}


def auto_table() -> list[dict]:
    """The entries behind backend="auto" on CUDA (hyperkern._auto_table.load(), read once)."""
    global _AUTO_TABLE
    if _AUTO_TABLE is None:
        from hyperkern import _auto_table

        _AUTO_TABLE = _auto_table.load()
    return _AUTO_TABLE


def _device_name(device: torch.device) -> str:
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


def _measured_choice(family: str, op: str, device: torch.device, default: str, impl):
    """None when the table keeps `default` for op on this GPU model; else the implementation to run: one
    backend's when it wins at every measured size, or a per-call chooser."""
    from hyperkern import _auto_table

    status = _STATUS.get((device.type, op)) or backend_status(device.type, op)
    entries = [e for e in auto_table() if e["op"] == op and e["device"] == _device_name(device)]
    runnable = (lambda n: status[n] is None)
    winners = {_auto_table.winner(e, runnable) for e in entries} - {None}
    if not winners or winners == {default}:
        return None
    if len(winners) == 1:
        return impl(winners.pop())
    chosen: dict[tuple, object] = {}

    def per_size(*args):
        x, weight = args[0], args[1]
        recorded = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        size = _auto_table.call_size(family, x, weight)
        key = (size, x.dtype, recorded)
        fn = chosen.get(key)
        if fn is None:
            entry = _auto_table.nearest(entries, size, str(x.dtype).removeprefix("torch."),
                                        "fwd+bwd" if recorded else "fwd")
            fn = chosen[key] = impl(_auto_table.winner(entry, runnable) or default)
        return fn(*args)

    per_size.winners = sorted(winners)
    return per_size


def backend_module(family: str, backend: str):
    """The module hyperkern.ops._<backend>_<family> ("linear" | "conv") implementing a fused backend.

    Already-imported modules come from sys.modules, which torch.compile traces without a graph break
    (importlib.import_module breaks the graph); hyperkern.ops imports the available ones eagerly.
    """
    path = f"hyperkern.ops._{backend}_{family}"
    module = sys.modules.get(path)
    return module if module is not None else importlib.import_module(path)
