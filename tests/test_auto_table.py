"""backend="auto" on CUDA follows a measured table (hyperkern/_auto_table.py): the built-in H200 entries,
nearest-size lookup, the per-size chooser, a user's table file, and the bench rows that write one."""
import json

import pytest
import torch

from hyperkern import _auto_table, _backends


def _e(op, size, mode="fwd+bwd", dtype="float32", device="GPU X", **ms):
    return {"device": device, "op": op, "dtype": dtype, "mode": mode, "size": list(size), "ms": ms}


def test_builtin_entries_are_valid_and_pick_cpp_on_the_h200():
    entries = _auto_table.check_entries(_auto_table.BUILTIN, "built-in")
    assert {e["device"] for e in entries} == {"NVIDIA H200"}
    assert {e["op"] for e in entries} == {"batch_ensemble_linear", "hyper_batch_ensemble_linear",
                                           "batch_ensemble_conv2d"}
    # GPU run 2: Triton is slower everywhere, so it is never chosen when cpp runs ...
    assert {_auto_table.winner(e, lambda n: True) for e in entries} == {"cpp"}
    # ... and it is the choice where cpp cannot run (an extension built without CUDA)
    assert {_auto_table.winner(e, lambda n: n != "cpp") for e in entries} == {"triton"}
    assert {_auto_table.winner(e, lambda n: False) for e in entries} == {None}


def test_nearest_uses_log_distance_then_falls_back_on_dtype_and_mode():
    small = _e("op", (16, 64, 64), cpp=1.0)
    large = _e("op", (8192, 4096, 4096), cpp=1.0)
    bf16 = _e("op", (16, 64, 64), dtype="bfloat16", cpp=1.0)
    fwd = _e("op", (8192, 4096, 4096), mode="fwd", cpp=1.0)
    entries = [small, large, bf16, fwd]
    assert _auto_table.nearest(entries, (32, 128, 128), "float32", "fwd+bwd") is small
    assert _auto_table.nearest(entries, (4096, 1024, 2048), "float32", "fwd+bwd") is large
    assert _auto_table.nearest(entries, (4096, 1024, 2048), "bfloat16", "fwd+bwd") is bf16  # its dtype first
    assert _auto_table.nearest(entries, (16, 64, 64), "float32", "fwd") is fwd  # its mode first
    assert _auto_table.nearest(entries, (16, 64, 64), "float16", "fwd+bwd") is small  # no float16: any dtype
    assert _auto_table.nearest([small], (1, 2, 3, 4, 5), "float32", "fwd+bwd") is None  # conv size vs linear
    assert _auto_table.nearest([], (16, 64, 64), "float32", "fwd") is None


def test_call_size():
    x, w = torch.empty(8, 3, 16), torch.empty(32, 16)
    assert _auto_table.call_size("linear", x, w) == (24, 16, 32)
    x, w = torch.empty(8, 4, 6, 5), torch.empty(12, 4, 3, 3)
    assert _auto_table.call_size("conv", x, w) == (8, 4, 12, 6, 5)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device named "GPU X" on which cpp and triton both run (no GPU is touched)."""
    monkeypatch.setattr(_backends, "_device_name", lambda device: "GPU X")
    monkeypatch.setitem(_backends._STATUS, ("cuda", "op"), {"torch": None, "cpp": None, "triton": None})
    impls = {n: (lambda *a, n=n: n) for n in ("cpp", "triton", "torch")}
    return impls.__getitem__


def test_measured_choice_keeps_the_default_where_it_wins(fake_gpu, monkeypatch):
    monkeypatch.setattr(_backends, "_AUTO_TABLE", [_e("op", (16, 64, 64), cpp=1.0, triton=2.0),
                                                   _e("op", (16, 64, 64), device="GPU Y", cpp=2.0, triton=1.0)])
    assert _backends._measured_choice("linear", "op", torch.device("cuda"), "cpp", fake_gpu) is None
    monkeypatch.setattr(_backends, "_AUTO_TABLE", [])  # nothing measured on this GPU model
    assert _backends._measured_choice("linear", "op", torch.device("cuda"), "cpp", fake_gpu) is None


def test_measured_choice_one_winner_everywhere(fake_gpu, monkeypatch):
    monkeypatch.setattr(_backends, "_AUTO_TABLE", [_e("op", (16, 64, 64), cpp=2.0, triton=1.0, torch=0.5)])
    fn = _backends._measured_choice("linear", "op", torch.device("cuda"), "cpp", fake_gpu)
    assert fn() == "triton"  # torch's time is a reference, never a choice of "auto"


def test_measured_choice_per_size_and_mode(fake_gpu, monkeypatch):
    monkeypatch.setattr(_backends, "_AUTO_TABLE", [
        _e("op", (16, 64, 64), cpp=2.0, triton=1.0),           # small, training: triton
        _e("op", (8192, 4096, 4096), cpp=1.0, triton=2.0),     # large, training: cpp
        _e("op", (16, 64, 64), mode="fwd", cpp=1.0, triton=2.0),  # small, inference: cpp
    ])
    fn = _backends._measured_choice("linear", "op", torch.device("cuda"), "cpp", fake_gpu)
    assert fn.winners == ["cpp", "triton"]
    w = torch.empty(64, 64, requires_grad=True)
    assert fn(torch.empty(16, 64), w) == "triton"
    assert fn(torch.empty(8192, 4096), torch.empty(4096, 4096, requires_grad=True)) == "cpp"
    with torch.no_grad():
        assert fn(torch.empty(16, 64), w) == "cpp"  # not recorded: the forward's entry
    assert fn(torch.empty(16, 64), torch.empty(64, 64)) == "cpp"  # nothing requires grad: forward
    assert fn(torch.empty(16, 64), w) == "triton"  # cached per (size, dtype, recorded)


def test_user_table_file_overrides_and_extends(tmp_path, monkeypatch):
    replaced = dict(_auto_table.BUILTIN[0], ms={"cpp": 9.0, "triton": 1.0})
    added = _e("batch_ensemble_linear", (64, 8, 8), cpp=1.0, triton=0.5)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"measured": "test", "entries": [replaced, added]}))
    monkeypatch.setenv(_auto_table.TABLE_ENV, str(path))
    entries = _auto_table.load()
    assert len(entries) == len(_auto_table.BUILTIN) + 1
    assert replaced in entries and added in entries and _auto_table.BUILTIN[0] not in entries


@pytest.mark.parametrize("content, match", [
    ("not json", "cannot read"),
    ('{"entries": 3}', "expected a JSON list"),
    ('[{"op": "x"}]', "entry 0 must be an object with keys"),
    ('[{"device": "d", "op": "o", "dtype": "float32", "mode": "fwd", "size": [0, 2], "ms": {"cpp": 1}}]', "size"),
    ('[{"device": "d", "op": "o", "dtype": "float32", "mode": "fwd", "size": [1], "ms": {"cpp": -1}}]', "'ms'"),
    ('[{"device": "d", "op": "o", "dtype": "float32", "mode": "bwd", "size": [1], "ms": {"cpp": 1}}]', "'mode'"),
])
def test_bad_table_file_names_the_problem(tmp_path, content, match):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        _auto_table.load(str(path))
    with pytest.raises(ValueError, match="HYPERKERN_AUTO_TABLE"):
        _auto_table.load(str(tmp_path / "missing.json"))


def test_bench_rows_become_entries():
    from bench.__main__ import auto_table_entries

    rows = [
        {"op": "batch_ensemble_linear", "shape": [4, 256, 512, 512], "mode": "fwd+bwd", "variant": v, "ms": ms,
         "dtype": "float32"} for v, ms in (("floor", 0.3), ("cpp", 0.36), ("triton", 1.09), ("cpp-kernel", 0.33))
    ] + [
        {"op": "batch_ensemble_conv2d", "shape": "ResNet-20 stage 1: 16->16 32x32", "size": [128, 16, 16, 32, 32],
         "format": fmt, "mode": "forward", "variant": "cpp", "ms": 0.13, "dtype": "float32"}
        for fmt in ("NCHW", "channels-last")
    ]
    entries = auto_table_entries(rows, "GPU X")
    assert entries == [
        _e("batch_ensemble_linear", (1024, 512, 512), cpp=0.36, triton=1.09),
        _e("batch_ensemble_conv2d", (128, 16, 16, 32, 32), mode="fwd", cpp=0.13),
    ]
