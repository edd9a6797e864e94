"""The training loop every trainer runs: epochs of shuffled minibatches, a learning-rate schedule,
progress bars, and checkpoints at the end of each epoch (model, optimizers, data-order generator,
torch's RNG state) from which the same call resumes with bit-identical results. Progress is a tqdm
bar on a terminal and one plain line per epoch when stdout or stderr is not one (a log, CI).

Also: the standard step of plain and batch-ensemble networks, and batched member-major inference.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hyperkern.ensembles._common import (TrainConfig, atomic_save, batches, load_checkpoint, output_is_terminal,
                                         progress_bar)
from hyperkern.nn.functional import tile

__all__ = ["run_epochs", "train_network", "member_log_probs", "l2_strengths"]


def run_epochs(*, n_train: int, config: TrainConfig, data_seed: int,
               step_fn: Callable[[torch.Tensor, int, int, float], float],
               get_state: Callable[[], dict], set_state: Callable[[dict], None],
               checkpoint_path: str | None = None, on_epoch_end: Callable[[int], None] | None = None,
               before_checkpoint: Callable[[int], None] | None = None, progress: bool = False,
               desc: str = "train", checkpoint_io=None) -> dict:
    """Run config.epochs epochs of step_fn(batch_index, step, total_steps, lr) -> loss.

    Batches come from a permutation per epoch drawn with a generator seeded by data_seed. When
    checkpoint_path is given, a checkpoint is written atomically after every epoch (get_state()
    plus the generator and torch RNG states) and, if one exists when called, training resumes from
    it (set_state(payload)). before_checkpoint(epoch) runs at the end of each epoch before its
    checkpoint (bookkeeping that belongs in it); on_epoch_end(epoch) runs after the checkpoint.
    Returns {"epochs_run": epochs run by this call, "resumed_from_epoch": e or 0, "last_loss": float,
    "train_seconds": training time of all epochs, those before a resume included}.
    checkpoint_io: optional object with read_checkpoint(path) -> dict or None and
    write_checkpoint(obj, path), replacing the local file reads and writes (data-parallel training:
    rank 0 writes, every rank gets the same state; hyperkern.ensembles.distributed).
    """
    import time

    started = time.perf_counter()
    earlier_seconds = 0.0
    generator = torch.Generator().manual_seed(int(data_seed))
    steps_per_epoch = len(batches(n_train, config.batch_size, None))
    total = steps_per_epoch * config.epochs
    start_epoch = 0
    ckpt = None
    if checkpoint_path is not None:
        if checkpoint_io is not None:
            ckpt = checkpoint_io.read_checkpoint(checkpoint_path)
        elif os.path.isfile(checkpoint_path):
            ckpt = load_checkpoint(checkpoint_path)
    if ckpt is not None:
        if ckpt.get("kind") != "epoch-checkpoint" or ckpt.get("steps_per_epoch") != steps_per_epoch:
            raise ValueError(f"{checkpoint_path}: checkpoint does not match this run (expected an epoch checkpoint "
                             f"with {steps_per_epoch} steps per epoch); delete it to start over")
        set_state(ckpt["payload"])
        generator.set_state(ckpt["generator"])
        _set_rng_states(ckpt)
        start_epoch = int(ckpt["epoch"])
        earlier_seconds = float(ckpt.get("train_seconds", 0.0))
    last_loss = float("nan")
    # progress: a tqdm bar of steps on a terminal; otherwise one plain line per epoch (logs, CI)
    epoch_lines = progress and not output_is_terminal()
    bar = progress_bar(total=total, initial=start_epoch * steps_per_epoch, enabled=progress and not epoch_lines,
                       desc=desc)
    try:
        for epoch in range(start_epoch, config.epochs):
            running, count = 0.0, 0
            for i, index in enumerate(batches(n_train, config.batch_size, generator)):
                step = epoch * steps_per_epoch + i
                loss = step_fn(index, step, total, config.lr_at(step, total))
                running += loss
                count += 1
                bar.update(1)
            last_loss = running / max(count, 1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{last_loss:.4f}")
            if epoch_lines:
                print(f"{desc}: epoch {epoch + 1}/{config.epochs}, loss {last_loss:.4f}, "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
            if before_checkpoint is not None:
                before_checkpoint(epoch)
            if checkpoint_path is not None:
                write = atomic_save if checkpoint_io is None else checkpoint_io.write_checkpoint
                write({"kind": "epoch-checkpoint", "epoch": epoch + 1, "steps_per_epoch": steps_per_epoch,
                       "generator": generator.get_state(), **_rng_states(),
                       "train_seconds": earlier_seconds + time.perf_counter() - started,
                       "payload": get_state()}, checkpoint_path)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    finally:
        bar.close()
    return {"epochs_run": config.epochs - start_epoch, "resumed_from_epoch": start_epoch, "last_loss": last_loss,
            "train_seconds": earlier_seconds + time.perf_counter() - started}


def _rng_states() -> dict:
    """torch's global RNG states for an epoch checkpoint: the CPU generator, and every CUDA device's
    when CUDA is in use (dropout and lambda sampling on a GPU draw from the device generators)."""
    states = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(ckpt: dict):
    torch.set_rng_state(ckpt["torch_rng"])
    cuda_states = ckpt.get("cuda_rng")
    if cuda_states and torch.cuda.is_available():
        for device, state in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def l2_strengths(model: nn.Module, hparams: dict) -> dict:
    """The model's L2 group strengths picked from hparams (every group must be there)."""
    names = list(getattr(model, "l2_group_names", ()))
    missing = [n for n in names if n not in hparams]
    if missing:
        raise ValueError(f"hparams lacks the L2 strengths {missing} of this model's layer groups {names}")
    return {n: float(hparams[n]) for n in names}


def _set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, fast_params, multiplier: float,
                      weight: float = 1.0):
    """One weight update: zero_grad, backward of loss * weight (a data-parallel rank's share), the fast
    weights' gradients scaled by multiplier (the reference's 0.5), optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    (loss * weight if weight != 1.0 else loss).backward()
    if multiplier != 1.0:
        for p in fast_params:
            if p.grad is not None:
                p.grad.mul_(multiplier)
    optimizer.step()


def train_network(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, hparams: dict, *,
                  data_seed: int, n_train: int | None = None, checkpoint_path: str | None = None,
                  on_epoch_end=None, progress: bool = False, desc: str = "train", distributed=None) -> dict:
    """Train a plain (E = 1) or batch-ensemble network in place.

    Each step tiles the minibatch for the model's E members (member-major, x.repeat), tiles the labels
    the same way, and minimises the mean of the members' cross-entropies (label smoothing
    hparams["label_smoothing"], default 0) plus model.l2_penalty(l2) / n_train with the L2 strengths
    of hparams. SGD with Nesterov momentum; fast weights (batch ensembles) get no L2 (l2_penalty
    excludes them) and their gradients are multiplied by config.fast_weight_lr_multiplier.

    distributed: optional hyperkern.ensembles.distributed.DistributedContext (DDP): each rank takes
    its shard of every global minibatch before tiling, its loss is weighted so that DDP's gradient
    average is the global batch's gradient, and checkpoints go through the context (rank 0 writes).
    """
    device = torch.device(config.device)
    model.to(device)
    x, y = x.to(device), y.to(device)
    n_train = int(n_train or x.shape[0])
    members = int(getattr(model, "ensemble_size", 1)) if getattr(model, "variant", "plain") != "plain" else 1
    l2 = l2_strengths(model, hparams)
    smoothing = float(hparams.get("label_smoothing", 0.0))
    fast = list(model.fast_parameters()) if hasattr(model, "fast_parameters") else []
    forward = model
    if distributed is not None:
        distributed.check_batches(x.shape[0], config.batch_size, "training minibatch")
        forward = distributed.wrap(model)  # before the optimizer (SyncBatchNorm conversion)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0)
    multiplier = float(config.fast_weight_lr_multiplier)

    def step_fn(index, step, total, lr):
        model.train()
        _set_lr(optimizer, lr)
        weight = 1.0
        if distributed is not None:
            index, weight = distributed.shard(index)  # this rank's examples, before member-major tiling
        xb, yb = x[index], y[index]
        if members > 1:
            xb, yb = tile(xb, members), tile(yb, members)
        logits = forward(xb)
        # mean over all E*B rows = mean over members of each member's mean cross-entropy
        loss = F.cross_entropy(logits, yb, label_smoothing=smoothing)
        if l2:
            loss = loss + model.l2_penalty(l2) / n_train
        backward_and_step(loss, optimizer, fast, multiplier, weight)
        return float(loss.detach())

    def get_state():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def set_state(state):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    return run_epochs(n_train=x.shape[0], config=config, data_seed=data_seed, step_fn=step_fn, get_state=get_state,
                      set_state=set_state, checkpoint_path=checkpoint_path, on_epoch_end=on_epoch_end,
                      progress=progress, desc=desc, checkpoint_io=distributed)


@torch.no_grad()
def member_log_probs(model: nn.Module, x: torch.Tensor, ensemble_size: int, batch_size: int,
                     hparams_for_rows: Callable[[int], torch.Tensor] | None = None,
                     device: str = "cpu") -> torch.Tensor:
    """(E, N, C) float32 log-probabilities of a member-major model on x, in eval mode.

    Each chunk of at most batch_size rows is tiled E times (member-major); hparams_for_rows(B), when
    given, returns the (E*B, m) normalised hyperparameters to pass as forward(x, hparams).
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(device)
            b = xb.shape[0]
            if ensemble_size > 1:
                xb = tile(xb, ensemble_size)
            logits = model(xb) if hparams_for_rows is None else model(xb, hparams_for_rows(b).to(device))
            out.append(torch.log_softmax(logits.float(), dim=-1).reshape(ensemble_size, b, -1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
