"""torch.library.opcheck over every op in the hyperkern:: namespace, the internal ones (backward
ops, train ops, the Triton ops) included, with inputs that require grad.

The ops are enumerated from the dispatcher, not listed here: a new op is checked as soon as it is
registered. Each op's arguments are built from its schema by argument name (the shapes of docs/design.md's
contract); an argument name this file does not know fails the test, so a new op cannot slip through.
"""
import pytest
import torch

import hyperkern  # noqa: F401  (registers the ops hyperkern.ops can run here)
from hyperkern._backends import backend_status
from hyperkern.ops import reference as ref
from hyperkern.ops.penalty import penalty_stats

_CPU = backend_status("cpu")
if _CPU["cpp"] is None:  # the fake kernels of the C++ ops
    from hyperkern.ops import _cpp_conv, _cpp_linear, _cpp_penalty  # noqa: F401
if _CPU["triton"] is None:  # the Triton custom ops (TRITON_INTERPRET=1 on the CPU)
    from hyperkern.ops import _triton_conv, _triton_linear  # noqa: F401

E, B, IN, OUT = 2, 2, 2, 4
M = 3  # hyperparameters per row (the *_hp ops)
HW = (3, 3)
GEOMETRY = {"stride": [2, 1], "padding": [1, 0], "dilation": [1, 1], "groups": 2}


def hyperkern_ops() -> list[str]:
    """Every op name registered under hyperkern:: (C++ TORCH_LIBRARY and Python fragments alike)."""
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("hyperkern::"))


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _args_by_name(conv: bool, channels_last: bool) -> dict:
    """Values for every argument name the hyperkern schemas use (float64 tensors)."""
    if conv:
        x = _rand(E * B, IN, *HW)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = _rand(OUT, IN // GEOMETRY["groups"], 3, 3)
    else:
        x, w = _rand(E * B, IN), _rand(OUT, IN)
    t = {"x": x, "weight": w, "delta": torch.randn_like(w), "r": _rand(E, IN), "s": _rand(E, OUT),
         "u": _rand(E, IN), "v": _rand(E, OUT), "e1": _rand(E * B, OUT), "bias": _rand(E, OUT),
         "delta_bias": _rand(E, OUT), "e2": _rand(E * B, OUT),
         # the *_hp ops embed the hyperparameters themselves: [e1 | e2] = hparams @ embedding^T (delta_bias
         # is given, so the embedding has 2*OUT rows)
         "hparams": torch.rand(E * B, M, dtype=torch.float64), "embedding": _rand(2 * OUT, M)}
    geometry = (GEOMETRY["stride"], GEOMETRY["padding"], GEOMETRY["dilation"], GEOMETRY["groups"]) if conv else ()
    hyper_args = [t[k] for k in ("x", "weight", "delta", "r", "s", "u", "v", "e1", "bias", "delta_bias", "e2")]
    y = (ref.hyper_batch_ensemble_conv2d_reference if conv else ref.hyper_batch_ensemble_linear_reference)(
        *hyper_args, *geometry)
    grad = torch.randn_like(y)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    # the kept activations, as the forward ops compute them
    ones = torch.ones(E, OUT, dtype=torch.float64)
    if conv:
        delta_product = ref.batch_ensemble_conv2d_reference(x, t["delta"], t["u"], ones, None, *geometry)
        hd = delta_product * t["v"].repeat_interleave(B, 0)[:, :, None, None]
    else:
        delta_product = ref.batch_ensemble_linear_reference(x, t["delta"], t["u"], ones)
        hd = delta_product
    t.update(grad=grad, grad_out=grad, grad_y=grad, delta_out=delta_product, delta_product=delta_product, hd=hd,
             pre=None, h=None, hr=None)
    t.update(GEOMETRY)
    # hyper_l2_penalty: two layers, a linear one with a bias and a conv one without, own strength columns
    wc = _rand(3, IN, 2, 2)
    t.update(weights=[_rand(OUT, IN), wc], deltas=[_rand(OUT, IN), torch.randn_like(wc)],
             embeddings=[_rand(2 * OUT, M), _rand(3, M)], biases=[_rand(E, OUT), None],
             delta_biases=[_rand(E, OUT), None], kernel_cols=[0, 1], bias_cols=[1, 0],
             grad_penalty=torch.tensor(0.5, dtype=torch.float64))
    stats = penalty_stats(torch.rand(E * B, 2, dtype=torch.float64) * 3, torch.rand(E * B, M, dtype=torch.float64), E)
    t.update(stats=stats.overall, member_stats=stats.member)
    return t


def _build(op, conv: bool, channels_last: bool):
    """Positional arguments for op from its schema: tensors by name (requiring grad where floating),
    every bool True (all gradients asked for, every activation kept), conv geometry."""
    values = _args_by_name(conv, channels_last)
    args = []
    for a in op._schema.arguments:
        type_name = str(a.type)
        if type_name == "bool":
            args.append(True)
            continue
        if type_name == "List[bool]":
            args.append([True] * a.N)
            continue
        if a.name not in values:
            raise AssertionError(f"hyperkern::{op._schema.name}: argument {a.name!r} ({type_name}) has no sample value "
                                 "in tests/test_ops_opcheck.py; add one")
        value = values[a.name]
        if isinstance(value, torch.Tensor):
            value = value.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        elif isinstance(value, list):  # Tensor[] / Tensor?[] (the penalty's per-layer lists)
            value = [v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v for v in value]
        args.append(value)
    return args


def _device_ready(name: str) -> str | None:
    return _CPU["triton"] if "triton" in name else _CPU["cpp"]


# every op; the conv ops with contiguous and channels-last activations
CASES = [(name, channels_last) for name in hyperkern_ops()
         for channels_last in ((False, True) if "conv2d" in name else (False,))]


@pytest.mark.parametrize("name,channels_last", CASES,
                         ids=[f"{n}-{'channels_last' if cl else 'contiguous'}" for n, cl in CASES])
def test_opcheck_every_hyperkern_op(name, channels_last):
    reason = _device_ready(name)
    if reason is not None:
        pytest.skip(reason)
    conv = "conv2d" in name
    packet = getattr(torch.ops.hyperkern, name)
    for overload in packet.overloads():
        op = getattr(packet, overload)
        args = _build(op, conv, channels_last)
        assert any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        torch.library.opcheck(op, tuple(args))


def test_the_namespace_is_enumerated():
    """The enumeration finds the public ops and their internal ones (backward, train, Triton)."""
    names = set(hyperkern_ops())
    if _CPU["cpp"] is None:
        assert {"batch_ensemble_linear", "batch_ensemble_linear_backward", "batch_ensemble_conv2d_train",
                "hyper_batch_ensemble_conv2d_backward", "hyper_batch_ensemble_linear_hp",
                "hyper_batch_ensemble_linear_hp_backward", "hyper_batch_ensemble_conv2d_hp",
                "hyper_batch_ensemble_conv2d_hp_train", "hyper_batch_ensemble_conv2d_hp_backward"} <= names
    if _CPU["triton"] is None:
        assert {"batch_ensemble_linear_triton", "hyper_batch_ensemble_conv2d_triton_backward",
                "hyper_batch_ensemble_linear_hp_triton", "hyper_batch_ensemble_linear_hp_triton_backward"} <= names
