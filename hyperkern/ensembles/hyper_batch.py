"""Hyper-batch ensembles (this paper; docs/method.md sections 2 and 3): a batch ensemble whose layers are
conditioned on per-row hyperparameters, trained with the alternating bilevel loop:

- every step, on the training split: lam ~ logU(a_k, b_k) per row (one sample per row, member k's
  distribution for member k's rows, xi frozen); SGD with Nesterov momentum on every weight and the
  embeddings; loss = mean of the members' cross-entropies + model.l2_penalty(lam) / n_train;
- every config.val_every-th step (3), on a validation minibatch with the network in eval mode (batch
  norm statistics frozen, dropout off): Adam on xi = (log a, log b) only, loss = NLL of the
  averaged prediction (-log mean_k p_k, via logsumexp) - tau * mean entropy of the distributions,
  then clip log a, log b into the ranges with log a < log b;
- at test time member k uses the mean of its distribution, (b - a) / (log b - log a).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hyperkern.ensembles._common import seeded
from hyperkern.ensembles._loop import _set_lr, backward_and_step, member_log_probs, run_epochs
from hyperkern.ensembles.batch import _SingleNetworkTrainer
from hyperkern.nn.functional import tile
from hyperkern.nn.hparams import EnsembleLogUniform

__all__ = ["HyperBatchEnsembleTrainer"]


class HyperBatchEnsembleTrainer(_SingleNetworkTrainer):
    """Trains a hyper-batch ensemble: model variant "hyper_batch" with E members and per-member
    log-uniform distributions over the model's hyperparameters (model.hparam_space: the L2 strength
    of every layer group and, for the MLP and LeNet-5, the dropout rate).

    Args:
        model: a hyperkern.models name or a ModelSpec. ensemble_size: E.
        config: TrainConfig (val_every, hparam_lr, entropy_weight set the distribution step).
        seed: init, data order and sampling seed.
        val_batch_size: rows per validation step (default config.batch_size).
        init_delta: half-width of the initial log-uniform intervals (EnsembleLogUniform, 0.2).
        init_space: "log" (default: [log c - delta, log c + delta]) or "linear" (the reference:
            [max(c - delta, 1e-8), c + delta] in the original scale, c jittered per member by
            N(0, (0.1 delta)^2) in the same scale).
        label_smoothing: label smoothing of the weight step's cross-entropy (default 0, as the
            reference; a batch ensemble compared with this one should use the same value).
        init_hparams: optional {name: value}: centre the initial intervals of those hyperparameters at
            value instead of the log-uniform mean of the full range (the reference's init, which
            for the MLP's L2 range [1e-3, 1e3] is about 72: on 1,079 digits images that
            over-regularises the network to chance).
        clip_norm: optional gradient-norm clip of the distribution step (default None: as docs/method.md,
            only the interval endpoints are clipped into the ranges).
        run_dir: optional directory; run_dir/checkpoint.pt (model, both optimizers, the
            distributions, data order and RNG state) is written after every epoch and fit resumes
            from it.
        num_classes, progress: as DeepEnsemble.

    After fit: distributions (the EnsembleLogUniform), hparam_history (per epoch: the members' mean
    hyperparameters), embedding_history (per epoch: each hyper layer's embedding norm),
    member_hparams() (each member's test-time hyperparameters).
    """

    variant = "hyper_batch"

    def __init__(self, model="mlp", ensemble_size: int = 4, config=None, seed: int = 0,
                 val_batch_size: int | None = None, init_delta: float = 0.2, init_hparams: dict | None = None,
                 init_space: str = "log", label_smoothing: float = 0.0, clip_norm: float | None = None,
                 run_dir: str | None = None, num_classes: int | None = None, progress: bool = True):
        self._init_common(model, ensemble_size, config, seed, run_dir, progress, num_classes)
        if val_batch_size is not None and (not isinstance(val_batch_size, int) or val_batch_size < 1):
            raise ValueError(f"val_batch_size must be a positive int, got {val_batch_size!r}")
        self.val_batch_size = val_batch_size
        self.init_delta = float(init_delta)
        self.init_hparams = dict(init_hparams or {})
        if init_space not in ("log", "linear"):
            raise ValueError(f"init_space must be 'log' or 'linear', got {init_space!r}")
        self.init_space = init_space
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.clip_norm = clip_norm
        self.distributions = None
        self.hparam_history: list[list[dict]] = []
        self.embedding_history: list[dict] = []

    def _new_distributions(self, space, recentre: bool = True):
        g = torch.Generator().manual_seed(self.seed * 7919 + 1)
        centre = None
        if recentre and self.init_hparams:
            unknown = [k for k in self.init_hparams if k not in space]
            if unknown:
                raise ValueError(f"init_hparams names {unknown} are not hyperparameters of this model "
                                 f"({list(space.names)})")
            centre = space.log_uniform_mean()
            for name, value in self.init_hparams.items():
                centre[space.index(name)] = float(value)
        return EnsembleLogUniform(space, self.ensemble_size, init_delta=self.init_delta, init_space=self.init_space,
                                  centre=centre, generator=g)

    def fit(self, train, val, *, on_epoch_end=None, distributed=None):
        """Train on train with the distribution steps on val (required). distributed: a
        hyperkern.ensembles.distributed.DistributedContext for data-parallel training under torchrun
        (global training and validation minibatches sharded across ranks before tiling, lambda
        sampled per rank with distinct seeds, the hyper step's gradients w.r.t. xi averaged across
        ranks, rank 0 writes the checkpoints). Returns self."""
        if val is None:
            raise ValueError("val is required: hyper-batch ensembles tune their hyperparameter distributions on it")
        x, y, xv, yv = self._prepare(train, val)
        self._claim_run_dir(x, y, xv, yv, {"init_hparams": self.init_hparams, "init_delta": self.init_delta,
                                           "init_space": self.init_space, "label_smoothing": self.label_smoothing,
                                           "val_batch_size": self.val_batch_size, "clip_norm": self.clip_norm},
                            distributed)
        config = self.config
        device = torch.device(config.device)
        E = self.ensemble_size
        net = self._build().to(device)
        space = net.hparam_space
        dist = self._new_distributions(space).to(device)
        x, y, xv, yv = x.to(device), y.to(device), xv.to(device), yv.to(device)
        n_train = x.shape[0]
        fast = list(net.fast_parameters())
        multiplier = float(config.fast_weight_lr_multiplier)
        forward = net  # the weight step's forward (DDP-wrapped when data-parallel)
        if distributed is not None:
            distributed.check_batches(n_train, config.batch_size, "training minibatch")
            forward = distributed.wrap(net)
        opt_w = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0)
        opt_xi = torch.optim.Adam(dist.parameters(), lr=config.hparam_lr)
        val_generator = torch.Generator().manual_seed(self.seed * 104_729 + 3)
        vb = min(self.val_batch_size or config.batch_size, xv.shape[0])
        if distributed is not None and vb < distributed.world_size:
            raise ValueError(f"val_batch_size: a validation minibatch of {vb} rows cannot be split across "
                             f"{distributed.world_size} ranks")
        tau = float(config.entropy_weight)
        history: list[list[dict]] = []
        embedding_history: list[dict] = []
        log_e = math.log(E)

        def weight_step(index, step, total, lr):
            net.train()
            _set_lr(opt_w, lr)
            weight = 1.0
            if distributed is not None:
                index, weight = distributed.shard(index)  # this rank's examples, before tiling
            xb, yb = x[index], y[index]
            b = xb.shape[0]
            lam = dist.sample(b)  # (E*B, m) member-major, xi frozen
            logits = forward(tile(xb, E), space.normalize(lam))
            # the penalty is a mean over rows too: the rank weight makes both terms global-batch means
            loss = (F.cross_entropy(logits, tile(yb, E), label_smoothing=self.label_smoothing)
                    + net.l2_penalty(lam) / n_train)
            backward_and_step(loss, opt_w, fast, multiplier, weight)
            if (step + 1) % config.val_every == 0:
                distribution_step()
            return float(loss.detach())

        def distribution_step():
            net.eval()  # batch norm statistics frozen, dropout off
            index = torch.randperm(xv.shape[0], generator=val_generator)[:vb].to(device)
            weight = 1.0
            if distributed is not None:
                index, weight = distributed.shard(index)  # the same global draw on every rank, then split
            xb, yb = xv[index], yv[index]
            b = xb.shape[0]
            lam = dist.rsample(b)  # reparameterised: gradients reach log a, log b
            logits = net(tile(xb, E), space.normalize(lam))
            log_probs = torch.log_softmax(logits, dim=-1).reshape(E, b, -1)
            picked = log_probs.gather(2, yb[None, :, None].expand(E, b, 1)).squeeze(2)  # (E, B)
            ensemble_nll = -(torch.logsumexp(picked, dim=0) - log_e).mean()
            loss = ensemble_nll - tau * dist.entropy().mean()
            if weight != 1.0:
                loss = loss * weight
            grads = torch.autograd.grad(loss, [dist.log_low, dist.log_high])  # the network's grads untouched
            if distributed is not None:
                distributed.all_reduce_mean_(grads)  # the global validation batch's gradient on every rank
            opt_xi.zero_grad(set_to_none=True)
            dist.log_low.grad, dist.log_high.grad = grads
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_([dist.log_low, dist.log_high], self.clip_norm)
            opt_xi.step()
            dist.clip_()
            net.train()

        def record_history(epoch):
            history.append(self._member_means(dist, space))
            embedding_history.append(self._embedding_norms(net))

        def get_state():
            return {"model": net.state_dict(), "opt_w": opt_w.state_dict(), "opt_xi": opt_xi.state_dict(),
                    "distributions": dist.state_dict(), "val_generator": val_generator.get_state(),
                    "history": [[dict(m) for m in h] for h in history],
                    "embedding_history": [dict(h) for h in embedding_history]}

        def set_state(state):
            net.load_state_dict(state["model"])
            opt_w.load_state_dict(state["opt_w"])
            opt_xi.load_state_dict(state["opt_xi"])
            dist.load_state_dict(state["distributions"])
            val_generator.set_state(state["val_generator"])
            history[:] = state["history"]
            embedding_history[:] = state.get("embedding_history", [])

        seed = self.seed * 1_000_003 + 11
        with seeded(seed if distributed is None else distributed.rank_seed(seed)):
            self.fit_info = run_epochs(n_train=n_train, config=config, data_seed=self.seed, step_fn=weight_step,
                                       get_state=get_state, set_state=set_state,
                                       checkpoint_path=self.checkpoint_path, on_epoch_end=on_epoch_end,
                                       before_checkpoint=record_history,
                                       progress=self.progress and (distributed is None or distributed.is_main),
                                       desc="hyper-batch ensemble", checkpoint_io=distributed)
        self.train_seconds = self.fit_info["train_seconds"]
        self.network, self.distributions, self.hparam_history = net.eval(), dist, history
        self.embedding_history = embedding_history
        self.fitted = True
        return self

    @staticmethod
    def _embedding_norms(net) -> dict:
        """Frobenius norm of every hyper layer's embedding weight: how far the layers have moved
        from a plain batch ensemble (the embeddings start at N(0, 1e-4^2))."""
        with torch.no_grad():
            return {name: float(module.embedding.weight.norm()) for name, module in net.named_modules()
                    if hasattr(module, "embedding") and isinstance(module.embedding, torch.nn.Linear)}

    @staticmethod
    def _member_means(dist, space) -> list[dict]:
        with torch.no_grad():
            return [space.to_dict(row) for row in dist.mean().double()]

    def member_hparams(self) -> list[dict]:
        """Each member's test-time hyperparameters: the means of its distributions."""
        self._check_fitted()
        return self._member_means(self.distributions, self.network.hparam_space)

    def member_log_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(E, N, C) member log-probabilities, member k at the mean of its distributions."""
        self._check_fitted()
        x = self._check_x(x)
        space, dist = self.network.hparam_space, self.distributions
        with torch.no_grad():
            z_members = space.normalize(dist.mean())  # (E, m)

        def hparams_for_rows(b):
            return z_members.repeat_interleave(b, dim=0)  # member-major (E*B, m)

        return member_log_probs(self.network, x, self.ensemble_size, self.config.eval_batch_size,
                                hparams_for_rows=hparams_for_rows, device=self.config.device)

    def num_parameters(self) -> int:
        """Network parameters (the 2*E*m distribution parameters are not counted)."""
        return super().num_parameters()

    def _extra_state(self):
        return {"distributions": self.distributions.state_dict(), "hparam_history": self.hparam_history,
                "embedding_history": self.embedding_history,
                "init_delta": self.init_delta, "init_hparams": self.init_hparams, "init_space": self.init_space,
                "label_smoothing": self.label_smoothing}

    def _load_extra_state(self, extra):
        self.init_delta = float(extra.get("init_delta", 0.2))
        self.init_hparams = dict(extra.get("init_hparams", {}))
        self.init_space = extra.get("init_space", "log")
        self.label_smoothing = float(extra.get("label_smoothing", 0.0))
        self.hparam_history = list(extra.get("hparam_history", []))
        self.embedding_history = list(extra.get("embedding_history", []))
        self._pending_dist = extra["distributions"]

    @classmethod
    def load(cls, path: str, device=None):
        obj = super().load(path, device)
        obj.distributions = obj._new_distributions(obj.network.hparam_space, recentre=False)
        obj.distributions.load_state_dict(obj._pending_dist)
        del obj._pending_dist
        obj.val_batch_size, obj.clip_norm = None, None
        return obj
