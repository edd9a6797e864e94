"""Executors run independent training trials (search trials, ensemble members).

The interface is one method, run(fn, tasks, shared): call fn(task, shared) for every task and yield
(task, result) pairs as trials finish, in any order. The caller persists each result as it arrives
(that is what makes searches resumable), so an executor never needs to know about run directories.

- LocalExecutor: in this process, one trial after another (the default).
- ProcessExecutor: a pool of worker processes (spawned, not forked, so torch's thread pools are
  fresh); `shared` (e.g. the training data) is sent to each worker once, at start-up.
Another backend (e.g. Ray) implements the same run() and registers itself with register_executor.
"""
from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterable, Iterator

import multiprocessing as mp

__all__ = ["Executor", "LocalExecutor", "ProcessExecutor", "get_executor", "register_executor", "EXECUTORS"]


class Executor:
    """Runs fn(task, shared) for each task; yields (task, result) as each finishes."""

    name = "base"

    def run(self, fn: Callable[[Any, Any], Any], tasks: Iterable[Any], shared: Any = None) -> Iterator[tuple[Any, Any]]:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class LocalExecutor(Executor):
    """Runs the trials one after another in this process."""

    name = "local"

    def run(self, fn, tasks, shared=None):
        for task in tasks:
            yield task, fn(task, shared)


_WORKER_SHARED: Any = None


def _init_worker(shared, threads):
    global _WORKER_SHARED
    _WORKER_SHARED = shared
    if threads:
        import torch

        torch.set_num_threads(threads)


def _call_in_worker(fn, task):
    return fn(task, _WORKER_SHARED)


class ProcessExecutor(Executor):
    """Runs trials in a pool of max_workers spawned processes (default: the CPU count, at most 4).

    threads_per_worker: torch threads in each worker (default: CPU count // max_workers, at least 1).
    fn and the tasks must be picklable (module-level functions, plain data).
    """

    name = "process"

    def __init__(self, max_workers: int | None = None, threads_per_worker: int | None = None):
        cpus = os.cpu_count() or 1
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
        self.max_workers = max_workers or max(1, min(cpus, 4))
        self.threads_per_worker = threads_per_worker or max(1, cpus // self.max_workers)

    def run(self, fn, tasks, shared=None):
        tasks = list(tasks)
        if not tasks:
            return
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(self.max_workers, len(tasks)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(shared, self.threads_per_worker)) as pool:
            pending = {pool.submit(_call_in_worker, fn, task): task for task in tasks}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        task = pending.pop(future)
                        yield task, future.result()
            finally:
                for future in pending:
                    future.cancel()

    def __repr__(self):
        return f"ProcessExecutor(max_workers={self.max_workers}, threads_per_worker={self.threads_per_worker})"


EXECUTORS: dict[str, Callable[..., Executor]] = {"local": LocalExecutor, "process": ProcessExecutor}


def register_executor(name: str, factory: Callable[..., Executor]) -> None:
    """Make get_executor(name) return factory(**options) (used by optional backends such as Ray)."""
    EXECUTORS[name] = factory


def get_executor(executor: "str | Executor" = "local", **options) -> Executor:
    """An Executor instance from a name in EXECUTORS ("local", "process", ...) or an instance."""
    if isinstance(executor, Executor):
        return executor
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {sorted(EXECUTORS)} or an Executor instance, got {executor!r}")
    return EXECUTORS[executor](**options)
