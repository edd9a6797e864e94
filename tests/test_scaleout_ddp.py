"""Data-parallel (DDP, gloo) training of batch and hyper-batch ensembles against single-process training.

Two processes are spawned once for the module (torch.multiprocessing, gloo on CPU); they run every
distributed job and write what they ended with; the tests compare that with single-process runs here.

Why the comparisons are exact up to float rounding: the MLP has no BatchNorm (shard-local batch
statistics would differ from the global batch's) and no dropout (masks are drawn per rank); for the
hyper-batch comparison the lambda draws are made deterministic (u = 1/2 in both runs), because each
rank samples lambda with its own seed. What is left, sharding of the global batch before tiling, the
rank weights b_r * W / B (the global batch below does not split evenly), DDP's gradient average and
the all_reduce of the hyper step's xi gradients, must reproduce the single-process update.
"""
import importlib
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as torch_mp

from hyperkern.data import load_digits
from hyperkern.ensembles import BatchEnsembleTrainer, HyperBatchEnsembleTrainer, ModelSpec, TrainConfig
from hyperkern.ensembles._common import load_checkpoint

SPEC = ModelSpec("mlp", 10, (1, 8, 8), {"backend": "torch", "hidden_features": (16,)})
BATCH_HPARAMS = {"l2_hidden1": 0.7, "l2_dense_kernel": 1.3, "l2_dense_bias": 0.4, "dropout": 0.0,
                 "label_smoothing": 0.05}
# 90 examples, global batch 25: batches of 25, 25, 25, 15; two ranks get 13 + 12 and 8 + 7 examples
CONFIG = TrainConfig(epochs=2, batch_size=25, lr=0.1, val_every=2, hparam_lr=0.05)
N_TRAIN, N_VAL = 90, 40
WORLD = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    d = load_digits(seed=0)
    return d.train.subset(slice(0, N_TRAIN)), d.val.subset(slice(0, N_VAL))


def _deterministic_lambda():
    """Patch the hyper-batch MLP so lambda draws are u = 1/2 (no sampling noise) and rows get no
    dropout: the remaining computation is deterministic, with or without data parallelism."""
    from hyperkern.nn.hparams import EnsembleLogUniform

    base_module = importlib.import_module("hyperkern.models._base")  # where EnsembleModel._drop looks it up

    def midpoint_rsample(self, batch_size, generator=None):
        E, m = self.log_low.shape
        lam = torch.exp(0.5 * (self.log_low + self.log_high))  # u = 1/2, differentiable in both
        return lam[:, None, :].expand(E, batch_size, m).reshape(E * batch_size, m)

    EnsembleLogUniform.rsample = midpoint_rsample
    base_module.rowwise_dropout = lambda h, rate, training=True: h
    base_module.relu_rowwise_dropout = lambda h, rate, training=True: torch.relu(h)


class _Stop(Exception):
    pass


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import hyperkern.ensembles.distributed as distributed_module
    from hyperkern.ensembles.distributed import DistributedContext
    from hyperkern.nn.hparams import EnsembleLogUniform

    ctx = DistributedContext.from_env(backend="gloo")
    train, val = _data()
    writes = []
    real_save = distributed_module.atomic_save
    distributed_module.atomic_save = lambda obj, path: (writes.append(path), real_save(obj, path))[1]
    result = {}

    # C. hyper-batch, real per-rank lambda sampling: straight vs interrupted after epoch 1 and resumed
    first_draws = []
    real_sample = EnsembleLogUniform.sample

    def recording_sample(self, batch_size, generator=None):
        lam = real_sample(self, batch_size, generator)
        if not first_draws:
            first_draws.append(lam.clone())
        return lam

    EnsembleLogUniform.sample = recording_sample
    straight = HyperBatchEnsembleTrainer(SPEC, 2, config=CONFIG, seed=4, run_dir=os.path.join(out, "hb-straight"),
                                         progress=False).fit(train, val, distributed=ctx)
    EnsembleLogUniform.sample = real_sample

    def stop(epoch):
        raise _Stop

    try:
        HyperBatchEnsembleTrainer(SPEC, 2, config=CONFIG, seed=4, run_dir=os.path.join(out, "hb-resume"),
                                  progress=False).fit(train, val, on_epoch_end=stop, distributed=ctx)
    except _Stop:
        pass
    resumed = HyperBatchEnsembleTrainer(SPEC, 2, config=CONFIG, seed=4, run_dir=os.path.join(out, "hb-resume"),
                                        progress=False).fit(train, val, distributed=ctx)
    result["hb_straight"] = {"network": straight.network.state_dict(),
                             "distributions": straight.distributions.state_dict()}
    result["hb_resumed"] = {"network": resumed.network.state_dict(),
                            "distributions": resumed.distributions.state_dict(),
                            "resumed_from_epoch": resumed.fit_info["resumed_from_epoch"]}
    result["first_lambda_draw"] = first_draws[0]

    # A. batch ensemble (no BN, no dropout)
    batch = BatchEnsembleTrainer(SPEC, 3, hparams=BATCH_HPARAMS, config=CONFIG, seed=3,
                                 run_dir=os.path.join(out, "batch"), progress=False).fit(train, distributed=ctx)
    result["batch"] = batch.network.state_dict()

    # B. hyper-batch with deterministic lambda and no dropout
    _deterministic_lambda()
    hyper = HyperBatchEnsembleTrainer(SPEC, 2, config=CONFIG, seed=4, progress=False).fit(train, val, distributed=ctx)
    result["hyper"] = {"network": hyper.network.state_dict(), "distributions": hyper.distributions.state_dict()}
    result["checkpoint_writes"] = writes
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    ctx.destroy()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    torch_mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return out, [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def _assert_states_close(a, b, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m: f"{key}: {m}", **tol)


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_batch_ensemble_ddp_matches_single_process(ddp_run):
    _, ranks = ddp_run
    train, _ = _data()
    single = BatchEnsembleTrainer(SPEC, 3, hparams=BATCH_HPARAMS, config=CONFIG, seed=3, progress=False).fit(train)
    _assert_states_equal(ranks[0]["batch"], ranks[1]["batch"])  # DDP keeps the replicas identical
    _assert_states_close(ranks[0]["batch"], single.network.state_dict(), rtol=1e-4, atol=2e-6)
    start = BatchEnsembleTrainer(SPEC, 3, hparams=BATCH_HPARAMS, config=CONFIG, seed=3, progress=False)
    start.model_spec = SPEC
    initial = start._build().state_dict()
    moved = max(float((initial[k] - single.network.state_dict()[k]).abs().max()) for k in initial)
    assert moved > 1e-2  # the comparison is not between untrained networks


def test_hyper_batch_ddp_matches_single_process_with_deterministic_lambda(ddp_run, monkeypatch):
    _, ranks = ddp_run
    from hyperkern.nn.hparams import EnsembleLogUniform

    base_module = importlib.import_module("hyperkern.models._base")
    monkeypatch.setattr(EnsembleLogUniform, "rsample", EnsembleLogUniform.rsample)
    monkeypatch.setattr(base_module, "rowwise_dropout", base_module.rowwise_dropout)
    monkeypatch.setattr(base_module, "relu_rowwise_dropout", base_module.relu_rowwise_dropout)
    _deterministic_lambda()  # undone by monkeypatch after the test
    train, val = _data()
    single = HyperBatchEnsembleTrainer(SPEC, 2, config=CONFIG, seed=4, progress=False).fit(train, val)
    for part in ("network", "distributions"):
        _assert_states_equal(ranks[0]["hyper"][part], ranks[1]["hyper"][part])
    _assert_states_close(ranks[0]["hyper"]["network"], single.network.state_dict(), rtol=1e-4, atol=2e-6)
    _assert_states_close(ranks[0]["hyper"]["distributions"], single.distributions.state_dict(), rtol=1e-5,
                         atol=1e-6)
    initial = single._new_distributions(single.network.hparam_space).state_dict()
    assert float((initial["log_low"] - single.distributions.log_low.detach()).abs().max()) > 1e-2  # the hyper steps moved xi


def test_hyper_batch_ddp_ranks_sample_differently_stay_in_sync_and_resume(ddp_run):
    out, ranks = ddp_run
    # lambda is sampled per rank with distinct seeds ...
    assert not torch.equal(ranks[0]["first_lambda_draw"][:5], ranks[1]["first_lambda_draw"][:5])
    # ... yet weights and xi are identical on every rank (gradients averaged, xi's by all_reduce)
    for part in ("network", "distributions"):
        _assert_states_equal(ranks[0]["hb_straight"][part], ranks[1]["hb_straight"][part])
    # interrupted after epoch 1 and resumed: bit-identical to the straight run, on every rank (each
    # rank restored its own RNG state from rank 0's checkpoint)
    for r in range(WORLD):
        assert ranks[r]["hb_resumed"]["resumed_from_epoch"] == 1
        for part in ("network", "distributions"):
            _assert_states_equal(ranks[r]["hb_resumed"][part], ranks[r]["hb_straight"][part])


def test_only_rank_0_writes_checkpoints(ddp_run):
    out, ranks = ddp_run
    assert ranks[1]["checkpoint_writes"] == []
    assert len(ranks[0]["checkpoint_writes"]) == 2 + 1 + 1 + 2  # hb-straight, hb-resume (1 + 1), batch
    ckpt = load_checkpoint(os.path.join(out, "batch", "checkpoint.pt"))
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == WORLD and len(ckpt["rng_per_rank"]) == WORLD
    assert not [f for f in os.listdir(os.path.join(out, "batch")) if ".tmp-" in f]


def test_torchrun_cli_trains_a_batch_ensemble_on_two_ranks(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "-m", "hyperkern", "train", "--method", "batch",
                           "--distributed", "--epochs", "1", "--batch-size", "64", "--ensemble-size", "2",
                           "--threads", "1", "--no-progress", "--output-dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("hyperkern train batch:") == 1  # rank 0 prints, rank 1 is silent
    assert "2 data-parallel ranks (gloo)" in proc.stdout
    trainer = BatchEnsembleTrainer.load(str(out / "batch.pt"))
    d = load_digits(seed=0)
    assert trainer.evaluate(d.test)["accuracy"] > 0.3  # one epoch: ~0.47, as one process gets (chance: 0.1)
    run = load_checkpoint(str(out / "run" / "checkpoint.pt"))
    assert run["world_size"] == 2


def test_cli_refuses_distributed_without_torchrun_or_for_independent_trials(monkeypatch):
    from hyperkern.cli import main

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="launch with torchrun"):
        main(["train", "--method", "batch", "--distributed", "--epochs", "1", "--no-progress"])
    with pytest.raises(SystemExit, match="is for --method batch and hyper_batch"):
        main(["train", "--method", "deep", "--distributed", "--epochs", "1", "--no-progress"])
