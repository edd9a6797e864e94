"""Data-parallel (DDP) training of batch and hyper-batch ensembles with torch.distributed.

Launch one process per device with torchrun (gloo on CPU, nccl on GPU):

    torchrun --nproc_per_node=2 -m hyperkern train --method batch --distributed ...

or, in a script started by torchrun:

    from hyperkern.ensembles import BatchEnsembleTrainer
    from hyperkern.ensembles.distributed import DistributedContext

    ctx = DistributedContext.from_env()          # init_process_group from torchrun's variables
    trainer = BatchEnsembleTrainer("mlp", 4, config=config).fit(train, val, distributed=ctx)
    if ctx.is_main:
        trainer.save("batch.pt")

How a step is split over W ranks (the same math as one process on the same global minibatch):

- Every rank holds the whole dataset and draws the same per-epoch permutation (data_seed), so every
  rank knows the global minibatch of B examples (config.batch_size is the GLOBAL batch). Rank r
  keeps a contiguous shard of b_r ~ B / W examples (torch.tensor_split), BEFORE member-major
  tiling: it tiles its own b_r examples E times, so on every rank rows k*b_r .. (k+1)*b_r - 1 are
  member k. (This replaces a DistributedSampler: same sharding, but each step's global batch is
  exactly the one single-process training would use.)
- Rank r's loss is multiplied by b_r * W / B and DDP averages the gradients over the W ranks, so the
  update is the gradient of the global batch's mean loss, also when W does not divide B.
- Randomness (dropout masks, the lambda samples of hyper-batch ensembles) comes from per-rank seeds
  (rank_seed): rank 0 uses the single-process seed, the others distinct ones.
- Hyper-batch ensembles: a hyper step's validation minibatch is drawn globally (the same generator on
  every rank) and sharded the same way; each rank weights its share of the validation loss the
  same way and the gradients w.r.t. xi = (log a, log b) are averaged with one explicit all_reduce
  (the network's forward there runs outside DDP: only xi gets gradients), so every rank takes the
  same Adam step and xi stays identical everywhere.
- BatchNorm: batch statistics are per rank (each rank normalises its shard with its own statistics;
  DDP broadcasts rank 0's running statistics with every forward), so BN networks do not train
  exactly as one process would. sync_batchnorm=True converts nn.BatchNorm layers (the shared-BN
  mode of the zoo's ResNet / WRN) to nn.SyncBatchNorm, whose statistics are over the global batch
  (CUDA only); per-member EnsembleBatchNorm2d layers stay per rank.
- Checkpoints: rank 0 writes them (atomically) after gathering every rank's RNG state; at resume rank
  0 reads the checkpoint and broadcasts it, so all ranks load the same state, with no shared
  filesystem needed, and each rank restores its own RNG state. run_dir/run.json is written and
  checked by rank 0.

Only the trainers' fit() is distributed; prediction and evaluation run on any one rank (every rank
ends with the same weights).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from hyperkern.ensembles._common import atomic_save, batches, load_checkpoint

__all__ = ["DistributedContext", "launched_by_torchrun", "RANK_SEED_STRIDE"]

RANK_SEED_STRIDE = 1_000_000_007  # rank r's seeds are seed + r * RANK_SEED_STRIDE

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or has its RANK / WORLD_SIZE / MASTER_*
    environment) with more than one process."""
    return all(v in os.environ for v in _TORCHRUN_VARIABLES) and int(os.environ.get("WORLD_SIZE", "1")) > 1


class DistributedContext:
    """The torch.distributed process group a trainer's fit() runs in (see the module docstring).

    Args:
        sync_batchnorm: convert nn.BatchNorm layers to nn.SyncBatchNorm (global batch statistics;
            needs CUDA). Default False: per-rank batch statistics.
        find_unused_parameters: passed to DistributedDataParallel (models with parameters some
            steps do not use).
        group: the process group (default: the world).

    The process group must be initialised already (DistributedContext.from_env() does that).
    """

    def __init__(self, *, sync_batchnorm: bool = False, find_unused_parameters: bool = False, group=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: use DistributedContext.from_env() in a "
                               "process started by torchrun, or call torch.distributed.init_process_group first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.sync_batchnorm = bool(sync_batchnorm)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.owns_process_group = False

    @classmethod
    def from_env(cls, backend: str | None = None, **kwargs) -> "DistributedContext":
        """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
        MASTER_ADDR, MASTER_PORT, LOCAL_RANK) unless it already is, and return a context.

        backend: "gloo" or "nccl" (default: nccl when CUDA is available, else gloo). With nccl, this
        process's current CUDA device becomes cuda:LOCAL_RANK (so TrainConfig(device="cuda") is the
        rank's own GPU)."""
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            missing = [v for v in _TORCHRUN_VARIABLES if v not in os.environ]
            if missing:
                raise RuntimeError(f"no torch.distributed environment ({', '.join(missing)} unset): launch with "
                                   "torchrun --nproc_per_node=N ..., or set RANK, WORLD_SIZE, MASTER_ADDR and "
                                   "MASTER_PORT")
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend not in ("gloo", "nccl"):
                raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
            owns = True
        ctx = cls(**kwargs)
        ctx.owns_process_group = owns
        return ctx

    def destroy(self) -> None:
        """Destroy the process group if from_env created it."""
        import torch.distributed as dist

        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes files and prints."""
        return self.rank == 0

    def __repr__(self):
        return (f"DistributedContext(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}, "
                f"sync_batchnorm={self.sync_batchnorm})")

    # ---- the step ----
    def rank_seed(self, seed: int) -> int:
        """The seed this rank uses where single-process training uses seed (rank 0: seed itself)."""
        return int(seed) + self.rank * RANK_SEED_STRIDE

    def shard(self, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous share of a global minibatch's example indices (B = len(index); rank r
        gets b_r of them, sizes differing by at most one) and its loss weight b_r * W / B."""
        part = torch.tensor_split(index, self.world_size)[self.rank]
        return part, part.numel() * self.world_size / index.numel()

    def check_batches(self, n: int, batch_size: int, what: str) -> None:
        """ValueError unless every minibatch of an epoch (n examples, batch_size per step) gives each
        rank at least one example."""
        smallest = min(len(b) for b in batches(n, batch_size, None))
        if smallest < self.world_size:
            raise ValueError(f"batch_size: the smallest {what} has {smallest} examples, fewer than the "
                             f"{self.world_size} ranks; use a global batch_size of at least "
                             f"{2 * self.world_size} (it is split across ranks)")

    def wrap(self, module: nn.Module) -> nn.Module:
        """module (converted to SyncBatchNorm if asked) in DistributedDataParallel; module itself keeps
        the parameters (state_dict keys without a 'module.' prefix)."""
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        if self.sync_batchnorm:
            if device.type != "cuda":
                raise ValueError("sync_batchnorm needs CUDA (nn.SyncBatchNorm); this model is on "
                                 f"{device}")
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise ValueError("sync_batchnorm: the model itself is a BatchNorm layer")
            nn.SyncBatchNorm.convert_sync_batchnorm(module, self.group)  # replaces the children in place
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, process_group=self.group,
                                       find_unused_parameters=self.find_unused_parameters)

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place (one all_reduce for all)."""
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(group=self.group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=self.group)

    def _broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                                   group=self.group)
        return box[0]

    def call_on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0, its result broadcast to every rank. If it raises ValueError,
        FileNotFoundError or RuntimeError, every rank raises the same type with the same message (the
        other ranks never wait for a rank that failed)."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except (ValueError, FileNotFoundError, RuntimeError) as exc:
                outcome = ("error", type(exc).__name__, str(exc))
        outcome = self._broadcast(outcome)
        if outcome[0] == "error":
            kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(outcome[1], RuntimeError)
            raise kind(outcome[2])
        return outcome[1]

    # ---- checkpoints (the checkpoint_io of hyperkern.ensembles._loop.run_epochs) ----
    def read_checkpoint(self, path: str) -> dict | None:
        """Rank 0 reads path (if it exists) and broadcasts it; each rank gets it with its own RNG states
        in "torch_rng" (and "cuda_rng" when the run used CUDA). None when there is no checkpoint."""
        ckpt = self.call_on_main(lambda: load_checkpoint(path) if os.path.isfile(path) else None)
        if ckpt is None:
            return None
        states = ckpt.get("rng_per_rank")
        if states is None and ckpt.get("torch_rng_per_rank") is not None:  # written before CUDA states were kept
            states = [{"torch_rng": state} for state in ckpt["torch_rng_per_rank"]]
        if states is None and self.world_size == 1:  # a single-process checkpoint, resumed by one rank
            return ckpt
        if states is None or len(states) != self.world_size:
            raise ValueError(f"{path}: checkpoint written by {len(states) if states is not None else 'a single'} "
                             f"process(es), this run has {self.world_size} ranks; resume with the same number of "
                             "ranks or delete it to start over")
        return {**{k: v for k, v in ckpt.items() if k != "cuda_rng"}, **states[self.rank]}

    def write_checkpoint(self, obj: dict, path: str) -> None:
        """Every rank calls this: the ranks' RNG states are gathered, rank 0 writes obj atomically, then
        all ranks wait until the file is in place."""
        import torch.distributed as dist

        states = [None] * self.world_size
        mine = {key: obj[key] for key in ("torch_rng", "cuda_rng") if key in obj}
        dist.all_gather_object(states, mine, group=self.group)
        if self.is_main:
            atomic_save({**obj, "rng_per_rank": states, "world_size": self.world_size}, path)
        self.barrier()
