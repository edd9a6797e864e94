"""Ensemble trainers (deep, batch, hyper-deep, hyper-batch), greedy ensemble selection and the
executors that run independent trials.

Rows are member-major everywhere: a batch of E*B rows where rows k*B .. (k+1)*B-1 belong to
ensemble member k.
"""
from hyperkern.ensembles.executors import (Executor, LocalExecutor, ProcessExecutor, get_executor,
                                           register_executor)
from hyperkern.ensembles.selection import greedy_selection

__all__ = ["greedy_selection", "Executor", "LocalExecutor", "ProcessExecutor", "get_executor", "register_executor"]
