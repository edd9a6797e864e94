"""Executors run independent training trials (search trials, ensemble members).

The interface is one method, run(fn, tasks, shared): call fn(task, shared) for every task and yield
(task, outcome) pairs as trials finish, in any order. outcome is fn's return value, or a TrialFailure
when fn raised on every one of its 1 + max_retries attempts. The caller persists each outcome as it
arrives (the trial file, or a failure record: that is what makes searches resumable), so an executor
never needs to know about run directories.

- LocalExecutor: in this process, one trial after another (the default).
- ProcessExecutor: a pool of worker processes (spawned, not forked, so torch's thread pools are
  fresh); `shared` (e.g. the training data) is sent to each worker once, at start-up.
- RayExecutor: Ray tasks, on an existing cluster (address=...) or on a Ray instance started on this
  machine; `shared` goes into Ray's object store once. ray is imported only when a trial runs
  (pip install "hyperkern[distributed]").
Another backend implements the same run() and registers itself with register_executor.

Retries: a trial that raises is run again, up to max_retries more times (default 1); with run
directories, a retry resumes from the trial's last epoch checkpoint. Exceptions that are not
Exception subclasses (KeyboardInterrupt, SystemExit) are never caught.
"""
from __future__ import annotations

import os
import traceback as traceback_module
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import multiprocessing as mp

__all__ = ["Executor", "LocalExecutor", "ProcessExecutor", "RayExecutor", "TrialFailure", "TrialsFailedError",
           "get_executor", "register_executor", "EXECUTORS"]


@dataclass
class TrialFailure:
    """The outcome of a trial that raised on each of its attempts.

    error: "ExceptionType: message" of the last attempt; traceback: its formatted traceback (for Ray,
    the remote traceback); attempts: how many times the trial ran (1 + the executor's max_retries).
    """

    error: str
    traceback: str
    attempts: int

    @classmethod
    def from_exception(cls, exc: BaseException, attempts: int) -> "TrialFailure":
        tb = "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))
        return cls(f"{type(exc).__name__}: {exc}", tb, int(attempts))

    def to_dict(self) -> dict:
        return asdict(self)


class TrialsFailedError(RuntimeError):
    """No trial of a stage succeeded: every one failed on all its attempts (see .failures)."""

    def __init__(self, message: str, failures: dict[str, dict] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


def _check_retries(max_retries) -> int:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be a non-negative int (retries after the first attempt), "
                         f"got {max_retries!r}")
    return max_retries


class Executor:
    """Runs fn(task, shared) for each task; yields (task, result or TrialFailure) as each finishes.

    max_retries: how many times a trial that raised is run again before it is given up as failed.
    """

    name = "base"

    def __init__(self, max_retries: int = 1):
        self.max_retries = _check_retries(max_retries)

    def run(self, fn: Callable[[Any, Any], Any], tasks: Iterable[Any], shared: Any = None) -> Iterator[tuple[Any, Any]]:
        raise NotImplementedError

    def shares_filesystem(self) -> bool:
        """Whether trials see this machine's files (then they write epoch checkpoints into the run
        directory and a resumed or retried trial continues from its last epoch)."""
        return True

    def __repr__(self):
        return f"{type(self).__name__}(max_retries={self.max_retries})"


class LocalExecutor(Executor):
    """Runs the trials one after another in this process."""

    name = "local"

    def run(self, fn, tasks, shared=None):
        for task in tasks:
            for attempt in range(1, self.max_retries + 2):
                try:
                    result = fn(task, shared)
                except Exception as exc:  # noqa: BLE001 - any trial error is recorded, never swallowed
                    if attempt > self.max_retries:
                        result = TrialFailure.from_exception(exc, attempt)
                    else:
                        continue
                break
            yield task, result


_WORKER_SHARED: Any = None


def _init_worker(shared, threads):
    global _WORKER_SHARED
    _WORKER_SHARED = shared
    if threads:
        import torch

        torch.set_num_threads(threads)


def _call_in_worker(fn, task):
    """One attempt in a pool worker: the result, or a TrialFailure(attempts=1) if fn raised (the
    exception itself may not pickle; its text and traceback always do)."""
    try:
        return fn(task, _WORKER_SHARED)
    except Exception as exc:  # noqa: BLE001
        return TrialFailure.from_exception(exc, 1)


class ProcessExecutor(Executor):
    """Runs trials in a pool of max_workers spawned processes (default: the CPU count, at most 4).

    threads_per_worker: torch threads in each worker (default: CPU count // max_workers, at least 1).
    fn and the tasks must be picklable (module-level functions, plain data). At most max_workers
    trials are in flight at a time; if a worker dies (killed, out of memory, a crash in native code),
    the pool is restarted and each trial that was in flight counts one failed attempt.
    """

    name = "process"

    def __init__(self, max_workers: int | None = None, threads_per_worker: int | None = None, max_retries: int = 1):
        super().__init__(max_retries)
        cpus = os.cpu_count() or 1
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
        self.max_workers = max_workers or max(1, min(cpus, 4))
        self.threads_per_worker = threads_per_worker or max(1, cpus // self.max_workers)

    def _pool(self, n):
        return ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(self._shared, self.threads_per_worker))

    def run(self, fn, tasks, shared=None):
        queue = [(task, 1) for task in tasks]  # (task, attempt number)
        if not queue:
            return
        self._shared = shared
        workers = min(self.max_workers, len(queue))
        pool = self._pool(workers)
        in_flight: dict = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < workers:
                    task, attempt = queue.pop(0)
                    in_flight[pool.submit(_call_in_worker, fn, task)] = (task, attempt)
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    task, attempt = in_flight.pop(future)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool as exc:
                        broken = True
                        outcome = TrialFailure.from_exception(exc, attempt)
                    if isinstance(outcome, TrialFailure):
                        if attempt <= self.max_retries:
                            queue.insert(0, (task, attempt + 1))
                            continue
                        outcome.attempts = attempt
                    yield task, outcome
                if broken:  # every other trial in flight died with the pool: one attempt each
                    for future, (task, attempt) in list(in_flight.items()):
                        in_flight.pop(future)
                        failure = TrialFailure("BrokenProcessPool: a worker of the pool died while this trial ran",
                                               "", attempt)
                        if attempt <= self.max_retries:
                            queue.insert(0, (task, attempt + 1))
                        else:
                            yield task, failure
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = self._pool(workers)
        finally:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self._shared = None

    def __repr__(self):
        return (f"ProcessExecutor(max_workers={self.max_workers}, threads_per_worker={self.threads_per_worker}, "
                f"max_retries={self.max_retries})")


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the 'ray' executor needs Ray: pip install \"hyperkern[distributed]\" "
                          "(or pip install \"ray[default]\")") from exc
    return ray


def _ray_trial(fn, task, shared, threads):
    """The body of one Ray task (module level, so workers import it by name)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return fn(task, shared)


class RayExecutor(Executor):
    """Runs each trial as a Ray task.

    Args:
        address: a running cluster ("auto", "ray://head:10001", "head:6379"); None connects to the
            cluster named by the RAY_ADDRESS environment variable or, without it, starts Ray on this
            machine. If Ray is already initialised in this process, that session is used as it is.
        num_cpus: CPUs of a Ray started on this machine (default: all); ignored with an address.
        cpus_per_trial: CPUs Ray reserves for each trial (also its torch thread count; default 1).
        gpus_per_trial: GPUs reserved for each trial (default 0; use with TrainConfig(device="cuda")).
        max_retries: Ray reruns a trial that raised, or whose worker or node died, this many times
            (Ray's own max_retries with retry_exceptions=True); then the trial is a TrialFailure.
        shared_filesystem: whether every Ray node sees this machine's run directory. None (default):
            True when the Ray cluster is this one machine. When False, trials write no epoch
            checkpoints (the driver still writes every finished trial's file), so a trial
            interrupted mid-way restarts from its first epoch.
        init_kwargs: more keyword arguments for ray.init (e.g. runtime_env={"py_modules": [...]}
            when the nodes have no hyperkern installed).

    The training data (`shared`) is put into Ray's object store once per run() call; each trial's
    weights and validation predictions come back to the driver, which writes the trial files.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_trial: float = 1,
                 gpus_per_trial: float = 0, max_retries: int = 1, shared_filesystem: bool | None = None,
                 init_kwargs: dict | None = None):
        super().__init__(max_retries)
        if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
            raise ValueError(f"num_cpus must be a positive int, got {num_cpus!r}")
        if not float(cpus_per_trial) > 0 or float(gpus_per_trial) < 0:
            raise ValueError(f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, got {cpus_per_trial!r}, "
                             f"{gpus_per_trial!r}")
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_trial = cpus_per_trial
        self.gpus_per_trial = gpus_per_trial
        self.shared_filesystem = shared_filesystem
        self.init_kwargs = dict(init_kwargs or {})
        self.started_ray = False

    def _ray(self):
        ray = _import_ray()
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, **self.init_kwargs}
            if self.address is not None:
                kwargs["address"] = self.address
            elif self.num_cpus is not None and not os.environ.get("RAY_ADDRESS"):
                kwargs["num_cpus"] = self.num_cpus
            ray.init(**kwargs)
            self.started_ray = True
        return ray

    def shares_filesystem(self) -> bool:
        if self.shared_filesystem is not None:
            return bool(self.shared_filesystem)
        ray = self._ray()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        here = ray.util.get_node_ip_address()
        return len(alive) == 1 and alive[0].get("NodeManagerAddress") == here

    def run(self, fn, tasks, shared=None):
        tasks = list(tasks)
        if not tasks:
            return
        ray = self._ray()
        remote = ray.remote(_ray_trial).options(num_cpus=self.cpus_per_trial, num_gpus=self.gpus_per_trial,
                                                max_retries=self.max_retries, retry_exceptions=True)
        shared_ref = ray.put(shared)
        threads = max(1, int(self.cpus_per_trial))
        pending = {remote.remote(fn, task, shared_ref, threads): task for task in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        # RayTaskError carries the remote traceback in its text
                        outcome = TrialFailure(_ray_error_text(exc), str(exc), self.max_retries + 1)
                    yield task, outcome
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort when the caller stops early
                    pass

    def shutdown(self) -> None:
        """Stop the Ray instance this executor started (a cluster it connected to keeps running)."""
        if self.started_ray:
            ray = _import_ray()
            ray.shutdown()
            self.started_ray = False

    def __repr__(self):
        return (f"RayExecutor(address={self.address!r}, num_cpus={self.num_cpus}, cpus_per_trial={self.cpus_per_trial}, "
                f"gpus_per_trial={self.gpus_per_trial}, max_retries={self.max_retries})")


def _ray_error_text(exc: BaseException) -> str:
    """ "ExceptionType: message" of the trial's own exception (RayTaskError.cause), else of Ray's error
    (a worker or node that died)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


EXECUTORS: dict[str, Callable[..., Executor]] = {"local": LocalExecutor, "process": ProcessExecutor,
                                                  "ray": RayExecutor}


def register_executor(name: str, factory: Callable[..., Executor]) -> None:
    """Make get_executor(name) return factory(**options)."""
    EXECUTORS[name] = factory


def get_executor(executor: "str | Executor" = "local", **options) -> Executor:
    """An Executor instance from a name in EXECUTORS ("local", "process", "ray", ...) or an instance."""
    if isinstance(executor, Executor):
        return executor
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {sorted(EXECUTORS)} or an Executor instance, got {executor!r}")
    return EXECUTORS[executor](**options)
