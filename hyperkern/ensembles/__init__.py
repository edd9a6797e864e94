"""Ensemble trainers (deep, batch, hyper-deep, hyper-batch), greedy ensemble selection, the
executors that run independent trials (local, process pool, Ray) and data-parallel training of batch
and hyper-batch ensembles (hyperkern.ensembles.distributed, under torchrun).

Every trainer has one API: fit(train, val) -> self, predict_proba(x) -> (N, C) averaged
probabilities, member_proba(x) -> (E, N, C), evaluate(test) -> dict of metrics, save(path) and the
classmethod load(path) (torch.load with weights_only=True).

Rows are member-major everywhere: a batch of E*B rows where rows k*B .. (k+1)*B-1 belong to
ensemble member k.
"""
from hyperkern.ensembles._common import ModelSpec, TrainConfig, register_model
from hyperkern.ensembles.batch import BatchEnsembleTrainer
from hyperkern.ensembles.deep import DeepEnsemble, default_hparams, default_search_space
from hyperkern.ensembles.distributed import DistributedContext
from hyperkern.ensembles.executors import (Executor, LocalExecutor, ProcessExecutor, RayExecutor, TrialFailure,
                                           TrialsFailedError, get_executor, register_executor)
from hyperkern.ensembles.hyper_batch import HyperBatchEnsembleTrainer
from hyperkern.ensembles.hyper_deep import HyperDeepEnsemble
from hyperkern.ensembles.search import RunDirectory
from hyperkern.ensembles.selection import greedy_selection

__all__ = [
    "greedy_selection", "DeepEnsemble", "BatchEnsembleTrainer", "HyperDeepEnsemble", "HyperBatchEnsembleTrainer",
    "TrainConfig", "ModelSpec", "register_model", "default_hparams", "default_search_space", "RunDirectory",
    "Executor", "LocalExecutor", "ProcessExecutor", "RayExecutor", "TrialFailure", "TrialsFailedError",
    "get_executor", "register_executor", "DistributedContext",
]
