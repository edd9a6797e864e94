"""Trainers: the batch-ensemble step against a hand-written member loop, the hyper-batch bilevel loop's
modes and objectives, deep ensembles, save/load, mid-training resume, executors."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from hyperkern import metrics
from hyperkern.data import load_digits
from hyperkern.ensembles import (BatchEnsembleTrainer, DeepEnsemble, HyperBatchEnsembleTrainer, ModelSpec,
                                 ProcessExecutor, TrainConfig, register_model)
from hyperkern.ensembles._common import seeded
from hyperkern.models.mlp import MLP

SPEC = ModelSpec("mlp", 10, (1, 8, 8), {"backend": "torch", "hidden_features": (16,)})
L2 = {"l2_hidden1": 0.7, "l2_dense_kernel": 1.3, "l2_dense_bias": 0.4}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    d = load_digits(seed=0)
    return d.train.subset(slice(0, 160)), d.val.subset(slice(0, 60)), d.test.subset(slice(0, 80))


def _member_logits(model, x, k):
    """Member k of an MLP batch ensemble, written out from its parameters (no tiling involved)."""
    h = x.flatten(1)
    for layer in list(model.hidden) + [model.dense]:
        h = F.linear(h * layer.r[k], layer.weight) * layer.s[k] + layer.bias[k]
        if layer is not model.dense:
            h = F.relu(h)
    return h


def test_batch_step_is_mean_of_member_losses_with_halved_fast_gradients(digits):
    train, _, _ = digits
    x, y = train.x[:40], train.y[:40]
    E, lr, momentum, smoothing = 3, 0.1, 0.9, 0.1
    config = TrainConfig(epochs=1, batch_size=40, lr=lr, momentum=momentum, lr_schedule="constant")
    hparams = {**L2, "dropout": 0.0, "label_smoothing": smoothing}
    trainer = BatchEnsembleTrainer(SPEC, E, hparams=hparams, config=config, seed=5, progress=False).fit((x, y))

    with seeded(5):
        model = SPEC.build("batch", E, dropout=0.0)
    loss = sum(F.cross_entropy(_member_logits(model, x, k), y, label_smoothing=smoothing) for k in range(E)) / E
    penalty = 0.0
    for layer, group in [(model.hidden[0], "l2_hidden1"), (model.dense, "l2_dense_kernel")]:
        bias_group = "l2_dense_bias" if layer is model.dense else group
        # slow weight and per-member biases (mean over members); never the fast weights r, s
        penalty = penalty + L2[group] * layer.weight.square().sum() + L2[bias_group] * layer.bias.square().sum() / E
    loss = loss + penalty / x.shape[0]
    loss.backward()
    trained = dict(trainer.network.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad * (0.5 if name.split(".")[-1] in ("r", "s") else 1.0)
        expected = p.detach() - lr * (1 + momentum) * grad  # first Nesterov step: buffer = grad
        torch.testing.assert_close(trained[name].detach(), expected, rtol=1e-5, atol=1e-6, msg=name)
    # prediction: member k of member_log_proba is member k of the network, whatever the tiling
    lp = trainer.member_log_proba(x[:9])
    for k in range(E):
        torch.testing.assert_close(lp[k], torch.log_softmax(_member_logits(trainer.network, x[:9], k), -1),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trainer.predict_proba(x[:9]), lp.exp().mean(0), rtol=1e-5, atol=1e-6)


def test_deep_ensemble_api_and_save_load(digits, tmp_path):
    train, val, test = digits
    config = TrainConfig(epochs=2, batch_size=32)
    deep = DeepEnsemble(SPEC, 3, hparams={"dropout": 0.1}, config=config, seed=3, progress=False).fit(train, val)
    probs = deep.member_proba(test.x)
    assert probs.shape == (3, 80, 10)
    assert not torch.allclose(probs[0], probs[1])  # different seeds, different members
    torch.testing.assert_close(deep.predict_proba(test.x), probs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deep.predict_proba(test.x).sum(1), torch.ones(80), rtol=0, atol=1e-5)
    result = deep.evaluate(test)
    assert result["nll"] == pytest.approx(metrics.ensemble_nll(deep.member_log_proba(test.x), test.y), rel=1e-9)
    assert result["accuracy"] == pytest.approx(metrics.accuracy(probs.mean(0), test.y))
    assert result["num_parameters"] == 3 * (64 * 16 + 16 + 16 * 10 + 10)
    assert deep.hparams["dropout"] == 0.1 and deep.hparams["l2_hidden1"] == 1.0  # defaults fill the rest
    path = tmp_path / "deep.pt"
    deep.save(path)
    again = DeepEnsemble.load(path)
    assert torch.equal(again.predict_proba(test.x), deep.predict_proba(test.x))
    with pytest.raises(ValueError, match="not a saved BatchEnsembleTrainer"):
        BatchEnsembleTrainer.load(path)


def test_untrained_and_bad_input(digits):
    train, val, test = digits
    with pytest.raises(RuntimeError, match="not fitted"):
        DeepEnsemble(SPEC, 2).predict_proba(test.x)
    with pytest.raises(ValueError, match="ensemble_size must be a positive int"):
        BatchEnsembleTrainer(SPEC, 0)
    with pytest.raises(TypeError, match="train must be an ArrayDataset or an"):
        DeepEnsemble(SPEC, 2, progress=False).fit(train.x, val)
    with pytest.raises(ValueError, match="val is required"):
        HyperBatchEnsembleTrainer(SPEC, 2, progress=False).fit(train, None)
    trainer = BatchEnsembleTrainer(SPEC, 2, config=TrainConfig(epochs=1), progress=False).fit(train)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 8, 8\)"):
        trainer.predict_proba(test.x[:, :, :4])
    with pytest.raises(ValueError, match="TrainConfig.epochs must be a positive int"):
        TrainConfig(epochs=0)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"kind": "hyperkern.DeepEnsemble", "members": [_RunsCode(str(marker))]}, path)
    for cls in (DeepEnsemble, BatchEnsembleTrainer, HyperBatchEnsembleTrainer):
        with pytest.raises(ValueError, match=f"{path}: not a loadable hyperkern checkpoint"):
            cls.load(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # the payload is live: plain unpickling would run it
        torch.load(f, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# hyper-batch ensembles

class _SpyMLP(MLP):
    """The MLP recording, for every forward: training mode, rows, and the hparams it was given."""

    calls: list = []

    def forward(self, x, hparams=None):
        _SpyMLP.calls.append({"training": self.training, "rows": x.shape[0],
                              "hparams": None if hparams is None else hparams.detach().clone(),
                              "hparams_grad": hparams is not None and hparams.requires_grad})
        return super().forward(x, hparams)


def _spy_builder(num_classes, in_features, variant, ensemble_size, **kwargs):
    return _SpyMLP(num_classes, in_features, variant=variant, ensemble_size=ensemble_size, **kwargs)


register_model("spy_mlp", _spy_builder)
SPY = ModelSpec("spy_mlp", 10, (1, 8, 8), {"backend": "torch", "hidden_features": (16,)})


def test_registered_keyword_only_builder_gets_the_image_keywords():
    """A builder taking only **kwargs receives in_channels and input_size (register_model's contract),
    so wrapping a zoo model in one works."""
    from hyperkern.models import mlp

    seen = {}

    def wrapper(**kwargs):
        seen.update(kwargs)
        return mlp(**kwargs)

    register_model("kwargs_mlp", wrapper)
    model = ModelSpec("kwargs_mlp", 10, (1, 8, 8), {"hidden_features": (16,)}).build("batch", 3)
    assert seen["in_channels"] == 1 and seen["input_size"] == (8, 8)
    assert model.in_features == 64 and model.ensemble_size == 3
    assert model(torch.randn(6, 1, 8, 8)).shape == (6, 10)


def test_hyper_batch_alternates_training_and_validation_steps(digits):
    train, val, test = digits
    E, bs, vb = 2, 32, 7
    config = TrainConfig(epochs=1, batch_size=bs, val_every=2)
    _SpyMLP.calls.clear()
    trainer = HyperBatchEnsembleTrainer(SPY, E, config=config, seed=1, val_batch_size=vb, progress=False)
    trainer.fit(train, val)
    steps = len(train) // bs
    weight_calls = [c for c in _SpyMLP.calls if c["rows"] == E * bs]
    val_calls = [c for c in _SpyMLP.calls if c["rows"] == E * vb]
    assert len(weight_calls) == steps and len(val_calls) == steps // 2  # every 2nd step
    # weight steps: train mode, lambdas sampled without gradient (xi frozen)
    assert all(c["training"] and not c["hparams_grad"] for c in weight_calls)
    # distribution steps: eval mode (batch norm frozen, dropout off), reparameterised lambdas
    assert all(not c["training"] and c["hparams_grad"] for c in val_calls)
    # each member's rows carry samples from its own distribution: within [a_k, b_k]
    dist = trainer.distributions
    z = val_calls[-1]["hparams"].view(E, vb, -1)
    assert z.min() >= 0 and z.max() <= 1
    # prediction: every row of member k at the mean of member k's distributions
    _SpyMLP.calls.clear()
    trainer.predict_proba(test.x[:5])
    space = trainer.network.hparam_space
    expected = space.normalize(dist.mean()).repeat_interleave(5, dim=0)
    torch.testing.assert_close(_SpyMLP.calls[-1]["hparams"], expected.detach())
    assert not _SpyMLP.calls[-1]["training"]


def test_hyper_batch_distributions_move_only_in_validation_steps(digits):
    train, val, _ = digits
    frozen = HyperBatchEnsembleTrainer(SPEC, 2, config=TrainConfig(epochs=1, val_every=10_000), seed=2,
                                       progress=False).fit(train, val)
    fresh = frozen._new_distributions(frozen.network.hparam_space)
    assert torch.equal(frozen.distributions.log_low, fresh.log_low)
    assert torch.equal(frozen.distributions.log_high, fresh.log_high)

    tuned = HyperBatchEnsembleTrainer(SPEC, 2, config=TrainConfig(epochs=2, val_every=1, hparam_lr=0.05), seed=2,
                                      progress=False).fit(train, val)
    d = tuned.distributions
    assert not torch.allclose(d.log_low, fresh.log_low)
    lo, hi = tuned.network.hparam_space.log_bounds(dtype=d.log_low.dtype)
    assert bool((d.log_low >= lo - 1e-6).all() and (d.log_high <= hi + 1e-6).all() and (d.log_low < d.log_high).all())
    assert len(tuned.hparam_history) == 2 and tuned.member_hparams() == tuned.hparam_history[-1]


def test_hyper_batch_validation_objective_lowers_validation_nll(digits):
    """The distribution step descends NLL(averaged prediction) - tau * entropy: with the network fixed
    (lr = 0 for the weights), repeated steps on the validation split must not increase it."""
    train, val, _ = digits
    base = HyperBatchEnsembleTrainer(SPEC, 2, config=TrainConfig(epochs=3), seed=4, progress=False).fit(train, val)
    net, space = base.network, base.network.hparam_space
    torch.manual_seed(0)
    with torch.no_grad():  # make the network respond strongly to lambda so the objective has a slope
        for layer in list(net.hidden) + [net.dense]:
            layer.embedding.weight.normal_(0, 0.5)

    def objective(dist):
        with torch.no_grad():
            z = space.normalize(dist.mean(len(val))).float()
            lp = torch.log_softmax(net.eval()(val.x.repeat(2, 1, 1, 1), z), -1).view(2, len(val), -1)
            return metrics.ensemble_nll(lp, val.y)

    trainer = HyperBatchEnsembleTrainer(SPEC, 2, config=TrainConfig(epochs=4, lr=1e-12, val_every=1, hparam_lr=0.05,
                                                                    lr_schedule="constant", momentum=0.0),
                                        seed=4, val_batch_size=len(val), progress=False)
    trainer._build = lambda: net  # continue from the fixed network
    before = objective(trainer._new_distributions(space))
    trainer.fit(train, val)
    assert objective(trainer.distributions) < before - 1e-3


def test_hyper_batch_init_hparams_recentres(digits):
    trainer = HyperBatchEnsembleTrainer(SPEC, 3, init_hparams={"l2_hidden1": 0.5, "dropout": 0.02}, seed=0)
    space = SPEC.build("hyper_batch", 3).hparam_space
    dist = trainer._new_distributions(space)
    centre = (dist.log_low + dist.log_high) / 2
    j, jd, jo = space.index("l2_hidden1"), space.index("dropout"), space.index("l2_dense_kernel")
    torch.testing.assert_close(centre[:, j].mean(), torch.tensor(0.5).log(), atol=0.05, rtol=0)
    torch.testing.assert_close(centre[:, jd].mean(), torch.tensor(0.02).log(), atol=0.05, rtol=0)
    default_centre = space.log_uniform_mean().log()[jo].float()
    torch.testing.assert_close(centre[:, jo].mean(), default_centre, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="not hyperparameters of this model"):
        HyperBatchEnsembleTrainer(SPEC, 3, init_hparams={"momentum": 0.9})._new_distributions(space)


def test_hyper_batch_save_load(digits, tmp_path):
    train, val, test = digits
    trainer = HyperBatchEnsembleTrainer(SPEC, 2, config=TrainConfig(epochs=1), seed=0, progress=False,
                                        init_hparams={"dropout": 0.05}).fit(train, val)
    trainer.save(tmp_path / "hb.pt")
    again = HyperBatchEnsembleTrainer.load(tmp_path / "hb.pt")
    assert torch.equal(again.predict_proba(test.x), trainer.predict_proba(test.x))
    assert again.member_hparams() == trainer.member_hparams()
    result = again.evaluate(test)
    assert set(result) >= {"accuracy", "nll", "ece", "brier", "disagreement", "average_kl", "num_parameters"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a torch without CUDA")
def test_a_model_saved_on_cuda_loads_on_a_cpu_only_torch(digits, tmp_path):
    """The saved config says device 'cuda': load used to call .to('cuda') and fail on a CPU-only torch."""
    train, val, test = digits
    trainers = {"batch": BatchEnsembleTrainer(SPEC, 2, hparams=L2, config=TrainConfig(epochs=1), progress=False),
                "hyper": HyperBatchEnsembleTrainer(SPEC, 2, config=TrainConfig(epochs=1), progress=False),
                "deep": DeepEnsemble(SPEC, 2, hparams=L2, config=TrainConfig(epochs=1), progress=False)}
    for name, trainer in trainers.items():
        trainer.fit(train, val)
        path = tmp_path / f"{name}.pt"
        trainer.save(path)
        state = torch.load(path, weights_only=True)
        state["config"]["device"] = "cuda"
        torch.save(state, path)
        with pytest.warns(UserWarning, match="loading on the CPU"):
            again = type(trainer).load(path)
        assert again.config.device == "cpu"
        assert torch.allclose(again.predict_proba(test.x), trainer.predict_proba(test.x))
        assert type(trainer).load(path, device="cpu").config.device == "cpu"


# ---------------------------------------------------------------------------------------------
# resume mid-training: a run stopped after an epoch and restarted equals an uninterrupted one

class _Stop(Exception):
    pass


def _stop_after_first_epoch(epoch):
    if epoch == 0:
        raise _Stop


@pytest.mark.parametrize("cls", [BatchEnsembleTrainer, HyperBatchEnsembleTrainer])
def test_resume_mid_training_is_exact(digits, tmp_path, cls):
    train, val, test = digits
    config = TrainConfig(epochs=3, batch_size=32, val_every=2)
    kwargs = dict(config=config, seed=7, progress=False)
    if cls is BatchEnsembleTrainer:
        kwargs["hparams"] = {"dropout": 0.2}  # dropout draws from torch's RNG: its state must be restored
    straight = cls(SPEC, 2, **kwargs).fit(train, val)
    run_dir = tmp_path / "run"
    with pytest.raises(_Stop):
        cls(SPEC, 2, run_dir=str(run_dir), **kwargs).fit(train, val, on_epoch_end=_stop_after_first_epoch)
    assert (run_dir / "checkpoint.pt").is_file()
    torch.manual_seed(12345)  # a different global RNG state in the new process must not matter
    resumed = cls(SPEC, 2, run_dir=str(run_dir), **kwargs).fit(train, val)
    assert resumed.fit_info["resumed_from_epoch"] == 1 and resumed.fit_info["epochs_run"] == 2
    for (name, a), (_, b) in zip(straight.network.state_dict().items(), resumed.network.state_dict().items()):
        assert torch.equal(a, b), name
    if cls is HyperBatchEnsembleTrainer:
        assert torch.equal(straight.distributions.log_low, resumed.distributions.log_low)
        assert straight.hparam_history == resumed.hparam_history
    assert torch.equal(straight.predict_proba(test.x), resumed.predict_proba(test.x))
    # another run pointed at the same directory is refused rather than resumed from a foreign checkpoint
    other = dict(kwargs, seed=8)
    with pytest.raises(ValueError, match="holds a different run .*seed"):
        cls(SPEC, 2, run_dir=str(run_dir), **other).fit(train, val)


def test_process_executor_gives_the_same_members(digits):
    train, val, test = digits
    config = TrainConfig(epochs=1, batch_size=32)
    local = DeepEnsemble(SPEC, 2, config=config, seed=11, progress=False).fit(train, val)
    pooled = DeepEnsemble(SPEC, 2, config=config, seed=11, progress=False,
                          executor=ProcessExecutor(max_workers=2, threads_per_worker=1)).fit(train, val)
    for a, b in zip(local.members, pooled.members):
        assert a["trial_id"] == b["trial_id"]
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_epoch_checkpoints_carry_the_cuda_generators_when_cuda_is_in_use(digits, tmp_path, monkeypatch):
    """On a GPU, dropout and lambda draws use the CUDA generators: the checkpoint stores every device's
    state and a resume restores it. (Simulated here: torch.cuda reports one initialised device.)"""
    from hyperkern.ensembles import _loop

    saved_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [saved_state.clone()])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    assert torch.equal(_loop._rng_states()["cuda_rng"][0], saved_state)
    train, val, _ = digits
    kwargs = dict(config=TrainConfig(epochs=2, batch_size=32), seed=3, progress=False, hparams={"dropout": 0.2})
    run_dir = tmp_path / "run"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    forked = []
    monkeypatch.setattr(torch.random, "fork_rng",
                        lambda devices=(), **kw: forked.append(list(devices)) or contextlib.nullcontext())
    with pytest.raises(_Stop):
        BatchEnsembleTrainer(SPEC, 2, run_dir=str(run_dir), **kwargs).fit(train, val,
                                                                          on_epoch_end=_stop_after_first_epoch)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert torch.equal(ckpt["cuda_rng"][0], saved_state)
    BatchEnsembleTrainer(SPEC, 2, run_dir=str(run_dir), **kwargs).fit(train, val)
    assert len(restored) == 1 and restored[0][1] == 0 and torch.equal(restored[0][0], saved_state)
    assert forked and all(devices == [0] for devices in forked)  # seeded() forks the current CUDA device's RNG too
