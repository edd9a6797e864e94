"""Smoke test of the benchmark suite (python -m bench): the --quick --tiny path runs end to end and
writes valid JSON; the peer layers it compares against compute the BatchEnsemble layer; the memory
helper sees a known allocation. Nothing here asserts a timing."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hyperkern.nn import BatchEnsembleConv2d, BatchEnsembleLinear
from hyperkern.ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `bench` is a top-level folder of the repository, not an installed package

from bench import common, ops_conv, peers  # noqa: E402


def test_quick_tiny_run_writes_valid_json(tmp_path):
    out = tmp_path / "nested" / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--tiny", "--threads", "1", "--suite", "all",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())

    envd = data["environment"]
    for key in ("date", "device", "device_name", "dtype", "threads", "torch", "hyperkern_backends"):
        assert key in envd, key
    assert envd["device"] == "cpu" and envd["threads"] == 1
    assert "threads: 1 of" in proc.stdout and envd["device_name"] in proc.stdout

    rows = data["suites"]["models"]["rows"]
    E, B = data["args"]["ensemble_size"], data["args"]["per_member"]
    models = {r["model"] for r in rows}
    assert len(models) == 2
    for model in models:
        for mode in ("train", "infer"):
            got = {r["variant"] for r in rows if r["model"] == model and r["mode"] == mode}
            assert {"plain", "batch", "batch/tabm", "batch/torch_unc", "hyper_batch", "deep/loop",
                    "deep/vmap"} <= got, (model, mode, got)
    for r in rows:
        assert r["rows"] == E * B and r["input"][0] == E * B
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert r["images_per_s"] == pytest.approx(E * B / (r["ms"] / 1e3))
        assert r["peak_mib"] is not None and r["peak_mib"] >= 0
    # the deep ensemble holds E networks' parameters, the batch ensemble about one
    by = {(r["model"], r["variant"]): r["state_mib"] for r in rows if r["mode"] == "train"}
    for model in models:
        assert by[(model, "deep/loop")] == pytest.approx(E * by[(model, "plain")], rel=1e-6)
        assert by[(model, "plain")] <= by[(model, "batch")] < 1.5 * by[(model, "plain")]

    ops = data["suites"]["ops"]
    assert ops["missing"] == [] and set(ops["modules"]) == {"bench.ops", "bench.ops_conv"}
    for r in ops["rows"]:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["suite"] == "ops"
        assert {"op", "shape", "dtype", "mode", "variant", "ratio"} <= set(r)
    variants = {(r["op"], r["variant"]) for r in ops["rows"]}
    for op in ("batch_ensemble_linear", "batch_ensemble_conv2d"):
        for v in ("floor", "torch", "tabm", "torch_unc"):
            assert (op, v) in variants, (op, v)
    for op in ("hyper_batch_ensemble_linear", "hyper_batch_ensemble_conv2d"):
        assert (op, "floor") in variants and (op, "torch") in variants
    for r in ops["rows"]:
        if r["variant"] == "floor":
            assert r["ratio"] == 1.0
    assert "| model | mode | variant |" in proc.stdout

    host = {r["name"]: r for r in data["suites"]["host"]["rows"]}
    for name in ("batch_ensemble_linear [auto]", "hyper_batch_ensemble_conv2d [auto]", "BatchEnsembleLinear [auto]",
                 "HyperBatchEnsembleConv2d [auto]", "F.linear", "nn.Conv2d"):
        assert math.isfinite(host[name]["us"]) and host[name]["us"] > 0, name
    assert host["F.conv2d"]["ratio"] == 1.0
    assert host["BatchEnsembleConv2d [auto]"]["ratio"] == pytest.approx(
        host["BatchEnsembleConv2d [auto]"]["us"] / host["nn.Conv2d"]["us"])
    assert "## Host cost" in proc.stdout
    pen = data["suites"]["penalty"]
    assert set(pen["ms"]) == {"nn.Linear", "layer", "layer + penalty"} and all(v > 0 for v in pen["ms"].values())
    saved = {r["variant"]: r for r in data["suites"]["saved"]["rows"]}
    assert saved["batch"]["x_batch"] == 1.0 and saved["hyper_batch"]["saved_mib"] > saved["batch"]["saved_mib"] > 0


def test_saved_bytes_counts_each_storage_once_and_no_parameters():
    from bench.saved import saved_bytes
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    # Linear saves x (its input) and its weight (a parameter: not counted); relu saves its output
    model = torch.nn.Sequential(lin, torch.nn.ReLU())
    assert saved_bytes(model, x) == 4 * 8 * 4 + 4 * 8 * 4


def test_host_targets_judge_only_the_auto_backend():
    from bench import host
    rows = [{"name": "a", "family": "batch", "floor": "F.linear", "backend": "auto", "ratio": 1.4},
            {"name": "b", "family": "hyper", "floor": "F.linear", "backend": "auto", "ratio": 2.6},
            {"name": "c", "family": "batch", "floor": "F.linear", "backend": "torch", "ratio": 9.0},
            {"name": "F.linear", "family": "floor", "floor": None, "backend": None, "ratio": 1.0}]
    assert [(t["ok"], t["value"]) for t in host.check_targets(rows)] == [(True, "1.40x"), (False, "2.60x")]


def _fast(E, n):
    return (torch.rand(E, n, dtype=torch.float64) + 0.5).requires_grad_(False)


@pytest.mark.parametrize("fn", [peers.tabm_batch_ensemble_linear, peers.torch_uncertainty_batch_ensemble_linear])
def test_peer_linear_matches_reference(fn):
    E, B, fin, fout = 3, 5, 7, 4
    x = torch.randn(E * B, fin, dtype=torch.float64)
    w = torch.randn(fout, fin, dtype=torch.float64)
    r, s, b = _fast(E, fin), _fast(E, fout), torch.randn(E, fout, dtype=torch.float64)
    want = reference.batch_ensemble_linear_reference(x, w, r, s, b)
    torch.testing.assert_close(fn(x, w, r, s, b), want)
    torch.testing.assert_close(fn(x, w, r, s, None), reference.batch_ensemble_linear_reference(x, w, r, s, None))


@pytest.mark.parametrize("fn", [peers.tabm_batch_ensemble_conv2d, peers.torch_uncertainty_batch_ensemble_conv2d,
                                peers.member_loop_batch_ensemble_conv2d])
def test_peer_conv_matches_reference(fn):
    E, B, cin, cout = 2, 3, 4, 6
    x = torch.randn(E * B, cin, 7, 6, dtype=torch.float64)
    w = torch.randn(cout, cin, 3, 3, dtype=torch.float64)
    r, s, b = _fast(E, cin), _fast(E, cout), torch.randn(E, cout, dtype=torch.float64)
    want = reference.batch_ensemble_conv2d_reference(x, w, r, s, b, stride=2, padding=1)
    torch.testing.assert_close(fn(x, w, r, s, b, (2, 2), (1, 1)), want)


@pytest.mark.parametrize("style", ["tabm", "torch_uncertainty"])
def test_swapped_model_computes_the_same_function(style):
    import hyperkern.models as zoo

    torch.manual_seed(0)
    model = zoo.resnet20(variant="batch", ensemble_size=2, depth=8, width=4, dtype=torch.float64).eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    want = model(x)
    swapped = peers.swap_batch_ensemble_layers(model, style)
    assert any(isinstance(m, peers.PEER_STYLES[style]) for m in swapped.modules())
    assert not any(isinstance(m, (BatchEnsembleConv2d, BatchEnsembleLinear)) and not isinstance(p, peers._PeerLayer)
                   for p in swapped.modules() for m in p.children())
    torch.testing.assert_close(swapped(x), want)
    with pytest.raises(ValueError, match="style"):
        peers.swap_batch_ensemble_layers(model, "nope")
    with pytest.raises(ValueError, match="variant='batch'"):
        peers.swap_batch_ensemble_layers(zoo.resnet20(variant="plain", depth=8, width=4), style)


@pytest.mark.parametrize("style", ["tabm", "torch_uncertainty"])
def test_peer_layer_resolves_same_padding_as_the_layer(style):
    """padding="same" at stride 2 on an even size pads (0, 1): the peer layer must pad as the layer does."""
    torch.manual_seed(0)
    layer = BatchEnsembleConv2d(3, 4, 3, stride=2, padding="same", ensemble_size=2, dtype=torch.float64)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(peers.PEER_STYLES[style](layer)(x), layer(x))


def test_peak_memory_sees_a_known_allocation():
    n = 1 << 18  # 1 MiB of float32

    def alloc_two_free_one():
        a = torch.ones(n)
        b = torch.ones(2 * n)  # 3 MiB live here
        del a
        c = torch.ones(n)  # back to 3 MiB
        return float(b[0] + c[0])

    peak = common.peak_memory_bytes(alloc_two_free_one, "cpu")
    assert 3 * 4 * n <= peak < 3 * 4 * n + (1 << 16)
    assert common.peak_memory_bytes(lambda: None, "cpu") == 0


def test_time_interleaved_reports_every_candidate_and_checks_arguments():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    out = common.time_interleaved({"a": make("a"), "b": make("b")}, "cpu", repeats=3, warmup=2, inner=2)
    assert set(out) == {"a", "b"} and calls == {"a": 2 + 3 * 2, "b": 2 + 3 * 2}
    assert all(v["samples"] == 3 and v["ms"] >= 0 and v["min_ms"] <= v["ms"] for v in out.values())
    cpu = common.time_interleaved({"a": make("a")}, "cpu", repeats=2, warmup=0, clock="cpu")
    assert cpu["a"]["samples"] == 2 and calls["a"] == 2 + 3 * 2 + 2
    with pytest.raises(ValueError, match="repeats"):
        common.time_interleaved({"a": make("a")}, "cpu", repeats=0)
    with pytest.raises(ValueError, match="clock"):
        common.time_interleaved({"a": make("a")}, "cpu", clock="sundial")


def test_member_loop_strategy_matches_reference_grouped_and_is_timed_by_the_conv_bench():
    E, B, C = 2, 3, 4
    x = torch.randn(E * B, C, 6, 6, dtype=torch.float64)
    w = torch.randn(C, C // 2, 3, 3, dtype=torch.float64)
    r, s, b = _fast(E, C), _fast(E, C), torch.randn(E, C, dtype=torch.float64)
    want = reference.batch_ensemble_conv2d_reference(x, w, r, s, b, padding=1, groups=2)
    got = peers.member_loop_batch_ensemble_conv2d(x, w, r, s, b, 1, 1, 1, 2)
    torch.testing.assert_close(got, want)
    swapped = peers.member_loop_batch_ensemble_conv2d(x, w, s, r, b, 1, 1, 1, 2)  # r and s exchanged: a mix-up
    assert not torch.allclose(swapped, want)
    rows = ops_conv.run(shapes=("16x32",), channels_last=(False,), E=2, B=1, rounds=1, compile_eager=False)
    assert len(rows) == 2 and all(row["member loop"] > 0 and row["floor"] > 0 for row in rows)
    assert "member streams" not in rows[0]  # CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_member_streams_strategy_matches_reference_on_gpu():
    E, B, C = 4, 3, 8
    x = torch.randn(E * B, C, 6, 6, dtype=torch.float64)
    w = torch.randn(C, C, 3, 3, dtype=torch.float64)
    r, s, b = _fast(E, C), _fast(E, C), torch.randn(E, C, dtype=torch.float64)
    want = reference.batch_ensemble_conv2d_reference(x, w, r, s, b, padding=1)
    streams = [torch.cuda.Stream() for _ in range(E)]
    got = peers.member_loop_batch_ensemble_conv2d(*(t.cuda() for t in (x, w, r, s, b)), 1, 1, streams=streams)
    torch.testing.assert_close(got.cpu(), want)


def test_cuda_graph_timing_needs_a_gpu():
    from bench import models
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        models.run_models("cpu", tiny=True, variants=("plain",), cuda_graphs=True)
    proc = subprocess.run([sys.executable, "-m", "bench.models", "--tiny", "--cuda-graphs"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cuda-graphs needs --device cuda" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_train_step_updates_like_the_eager_step():
    """The replay of a captured batch-ensemble training step (forward, backward, SGD step) moves the
    parameters exactly as the same step run eagerly."""
    from bench import models
    cands = [models.build_candidates("resnet20", {"depth": 8, "width": 4}, E=2, B=2, image=8, device="cuda",
                                     dtype=torch.float32, variants=("batch",))["batch"] for _ in range(2)]
    eager, captured = cands
    captured.modules[0].load_state_dict(eager.modules[0].state_dict())
    for c in cands:
        c.set_mode("train")
    replay = models.graphed(captured.train_step, torch.device("cuda"), warmup=3)
    for _ in range(3):  # the same three warm-up steps as the capture's
        eager.train_step()
    for _ in range(2):
        eager.train_step()
        replay()
    torch.cuda.synchronize()
    for (name, a), b in zip(eager.modules[0].state_dict().items(), captured.modules[0].state_dict().values()):
        # cuDNN's weight-gradient reductions may differ in order between calls: fp32 round-off only
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_model_step_targets_cover_both_networks_and_graph_replays():
    from bench.models import check_model_targets
    rows = [{"suite": "models", "model": m, "mode": mode, "variant": v, "ms": ms} for m, mode, v, ms in [
        ("resnet20", "train", "plain", 10.0), ("resnet20", "train", "batch", 11.6), ("resnet20", "train", "hyper_batch", 19.0),
        ("resnet20", "train", "deep/loop", 30.0), ("wrn28-10", "train (graph)", "plain", 100.0),
        ("wrn28-10", "train (graph)", "batch", 109.0), ("wrn28-10", "train (graph)", "hyper_batch", 201.0),
        ("resnet20", "infer", "plain", 1.0), ("resnet20", "infer", "batch", 5.0)]]
    got = {t["target"]: (t["ok"], t["value"]) for t in check_model_targets(rows, "cuda")}
    assert got == {"resnet20 train: batch <= 1.15x plain": (False, "1.160x"),
                   "resnet20 train: hyper_batch <= 2.0x plain": (True, "1.900x"),
                   "resnet20 train: batch >= 1.5x faster than deep/loop": (True, "2.59x faster"),
                   "wrn28-10 train (graph): batch <= 1.1x plain": (True, "1.090x"),
                   "wrn28-10 train (graph): hyper_batch <= 2.0x plain": (False, "2.010x")}


def test_operator_counts_of_a_train_step():
    """bench.models.operator_counts: plain, batch and hyper_batch train steps each dispatch operators, and the
    rank-1 networks run ONE convolution per conv layer forward (over all E*B rows), as plain does, not E."""
    from bench import models

    counts = models.operator_counts("resnet20", {"depth": 8, "width": 4}, E=3, B=2, image=8)
    assert set(counts) == {"plain", "batch", "hyper_batch"}
    plain = counts["plain"]
    assert plain["total"] > plain["top"] > 0 and plain["allocations"] > 0 and plain["x_plain"] == 1.0
    # real allocations (the profiler's memory events), whether an operator or a kernel made them
    assert all(c["allocator_calls"] > 0 for c in counts.values())
    table = models.format_operator_counts(counts).splitlines()
    assert "allocator calls" in table[0]
    batch_row = next(line for line in table if line.startswith("| batch |"))
    assert f"| {counts['batch']['allocator_calls']} |" in batch_row
    n_conv = plain["convolutions"]
    assert n_conv == plain["convolution_backward"] > 0  # ResNet-8: 7 convolutions + 2 shortcuts... all 3x3/1x1
    for name in ("batch", "hyper_batch"):
        c = counts[name]
        assert c["total"] > c["top"] > 0 and c["x_plain"] == pytest.approx(c["total"] / plain["total"])
    # the tiny shape runs the one-convolution scheme on the CPU: one convolution per layer (the hyper layer:
    # two, its W and delta branches), not one per member
    assert counts["batch"]["convolutions"] == n_conv
    assert counts["hyper_batch"]["convolutions"] == 2 * n_conv
    targets = models.check_operator_targets(counts)
    assert [t["target"].split(": ")[1] for t in targets] == ["batch <= 1.15x plain", "hyper_batch <= 2.0x plain"]


def test_linear_step_runs_every_variant_and_accumulates_gradients():
    import hyperkern
    from bench import linear_step

    if hyperkern.backend_status("cpu")["cpp"] is not None:
        pytest.skip("the cpp extension is not built")
    for variant in linear_step.VARIANTS:
        step = linear_step.make_step(variant, E=2, B=3, fin=4, fout=5)
        leaves = [t for t in step.inputs if t.requires_grad]
        step()
        first = [t.grad.clone() for t in leaves]
        step()  # the same inputs and output gradient: every gradient doubles
        for t, g in zip(leaves, first):
            torch.testing.assert_close(t.grad, 2 * g)
        assert any(g.abs().sum() > 0 for g in first)
    with pytest.raises(ValueError, match="variant must be one of"):
        linear_step.make_step("nope")


def test_op_suite_stopped_in_its_conv_rows_leaves_the_linear_rows_in_the_json(tmp_path):
    """A time-boxed GPU call kills the op suite where its limit falls (bench/gpu_suite.sh, GPU run 4:
    in the conv rows). The JSON must already hold every finished module's rows, marked partial, and the
    final write must drop the mark."""
    out = tmp_path / "ops.json"
    code = ("import sys, bench.ops_conv as c\n"
            "def stop(**kw):\n"
            "    raise SystemExit(3)  # as if killed at the conv rows\n"
            "c.run = stop\n"
            "from bench.__main__ import main\n"
            f"main(['--quick', '--tiny', '--threads', '1', '--suite', 'ops', '--json', {str(out)!r}])\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["partial"] is True
    rows = data["suites"]["ops"]["rows"]
    assert rows and {r["source"] for r in rows} == {"bench.ops"}
    assert {"floor", "cpp"} <= {r["variant"] for r in rows}
    assert not (tmp_path / "ops.json.tmp").exists()

    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--tiny", "--threads", "1", "--suite", "ops",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert "partial" not in data
    assert {r["source"] for r in data["suites"]["ops"]["rows"]} == {"bench.ops", "bench.ops_conv"}
