"""Executors that run a sweep's jobs: a local process pool, or Slurm through submitit.

Both run the same idempotent job functions of :mod:`dni.jobs`; neither keeps state of its
own. Whatever a job finished is in the store, so a lost driver, a killed pool or a
preempted Slurm task loses nothing: rerunning the sweep submits only what is missing.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dni.errors import DniError
from dni.jobs import TrainOutcome, eval_job, set_threads, train_stack_job
from dni.stacking import stack_groups


def _worker_init(threads: int) -> None:
    """Pool worker set-up: its thread count, and death with its driver.

    On Linux the worker asks the kernel for SIGTERM when its parent dies, so a driver
    killed by SIGTERM or SIGKILL does not leave workers running on (their finished work is
    in the store either way; an unfinished job is simply redone by the next run).
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the driver died while this worker was starting
    set_threads(threads)


def default_jobs(device: str) -> tuple[int, int]:
    """(worker processes, threads per worker) for this machine.

    On CPU: one single-threaded worker per core. Noise generation and the small per-step
    matrix products scale poorly across threads, and on the 2-core reference machine two
    single-threaded workers evaluate ~1.5x faster than one two-threaded process
    (``dni bench --workers``). On CUDA: one worker per visible GPU.
    """
    if device.startswith("cuda") and torch.cuda.is_available():
        return max(torch.cuda.device_count(), 1), 1
    return max(len(os.sched_getaffinity(0)), 1), 1


class JobFailures(DniError):
    """Some jobs of a sweep failed; the others finished and are in the store."""


@dataclass
class LocalExecutor:
    """A process pool on this machine (``jobs`` workers x ``threads`` threads each).

    ``stack``: models trained together per training job (see :func:`dni.stacking.stack_groups`;
    None: on GPUs a sweep seed's sigma_train members in one stack per GPU, on a CPU one
    model per job).
    """

    jobs: int = 1
    threads: int = 1
    device: str = "cpu"
    data_dir: str | None = None
    stack: int | None = None

    def describe(self) -> str:
        return f"local: {self.jobs} worker(s) x {self.threads} thread(s) on {self.device}"

    def _device(self, k: int) -> str:
        if self.device == "cuda" and torch.cuda.device_count() > 1:
            return f"cuda:{k % torch.cuda.device_count()}"  # one job per GPU
        return self.device

    def run(self, store, sweep, plan, on_trained: Callable[[TrainOutcome], None], on_evaluated: Callable[[int], None]) -> None:
        root = str(store.root)
        to_train = {s.model_id for s in plan.train}
        waiting: dict[str, list[float]] = defaultdict(list)
        ready: list[tuple[str, float]] = []
        for mid, sigma in plan.evaluate:
            (waiting[mid].append(sigma) if mid in to_train else ready.append((mid, sigma)))
        failures: list[str] = []
        counter = iter(range(1 << 30))
        gpus = torch.cuda.device_count() if self.device == "cuda" else 1  # the GPUs _device() spreads jobs over
        groups = stack_groups(plan.train, self.device, self.stack, min(gpus, self.jobs))

        if self.jobs == 1:  # in-process: no start-up cost, easy to debug
            set_threads(self.threads)
            for group in groups:
                try:
                    for mid in _report(train_stack_job(root, group, self.data_dir, self.device), on_trained, failures):
                        ready.extend((mid, s) for s in waiting.pop(mid, []))
                except DniError as exc:
                    failures.append(f"train {_names(group)}: {exc}")
            for mid, sigma in ready:
                on_evaluated(eval_job(root, mid, sweep.eval, sigma, self.data_dir, self.device))
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads
            with ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_worker_init, initargs=(self.threads,)) as pool:
                pending: dict[Future, tuple[str, Any]] = {}

                def submit_eval(mid: str, sigma: float) -> None:
                    fut = pool.submit(eval_job, root, mid, sweep.eval, sigma, self.data_dir, self._device(next(counter)))
                    pending[fut] = ("eval", (mid, sigma))

                try:
                    for group in groups:
                        fut = pool.submit(train_stack_job, root, group, self.data_dir, self._device(next(counter)))
                        pending[fut] = ("train", group)
                    for mid, sigma in ready:
                        submit_eval(mid, sigma)
                    while pending:
                        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            kind, what = pending.pop(fut)
                            try:
                                result = fut.result()
                            except DniError as exc:
                                name = _names(what) if kind == "train" else f"{what[0]} at sigma_val={what[1]}"
                                failures.append(f"{kind} {name}: {exc}")
                                continue
                            if kind == "train":
                                for mid in _report(result, on_trained, failures):
                                    for sigma in waiting.pop(mid, []):
                                        submit_eval(mid, sigma)
                            else:
                                on_evaluated(result)
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        if failures:
            raise JobFailures(f"{len(failures)} job(s) failed (the others are in the store): " + "; ".join(failures))


def _names(group) -> str:
    return ", ".join(spec.model_id for spec in group)


def _report(outcomes: list[TrainOutcome], on_trained: Callable[[TrainOutcome], None], failures: list[str]) -> list[str]:
    """Pass a training job's outcomes on, a failed member's to ``failures``; return the
    models whose evaluation may start."""
    done = []
    for outcome in outcomes:
        if outcome.error is not None:
            failures.append(f"train {outcome.model_id}: {outcome.error}")
        else:
            on_trained(outcome)
            done.append(outcome.model_id)
    return done


@dataclass
class SlurmExecutor:
    """Slurm through submitit: one job-array task per job, requeued on preemption or timeout.

    Training runs as one array, then evaluation as another. Logs go to
    ``<store>/slurm/<sweep_id>/``. The store must be on a file system shared by the nodes.
    """

    partition: str | None = None
    time_min: int = 120
    gpus: int = 0
    cpus: int = 1
    mem_gb: float = 4.0
    parallelism: int = 64
    max_requeues: int = 3
    extra: dict[str, Any] = field(default_factory=dict)  # any other submitit slurm_* parameter
    data_dir: str | None = None
    poll_s: float = 2.0
    stack: int | None = None  # models per training task (None: a GPU task trains a sweep's members together)

    @property
    def device(self) -> str:
        """Where the training tasks run."""
        return "cuda" if self.gpus else "cpu"

    def describe(self) -> str:
        return f"slurm: partition {self.partition or '(default)'}, {self.cpus} CPU(s), {self.gpus} GPU(s), {self.time_min} min"

    def _executor(self, folder: Path):
        try:
            import submitit
        except ImportError:  # pragma: no cover - submitit is a dependency
            raise DniError("the slurm executor needs submitit (pip install submitit)") from None
        logging.getLogger("submitit").addFilter(_QuietSacct())
        ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", slurm_max_num_timeout=self.max_requeues)
        params = {
            "timeout_min": self.time_min,
            "cpus_per_task": self.cpus,
            "mem_gb": self.mem_gb,
            "slurm_array_parallelism": self.parallelism,
            "name": "dni",
        }
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.partition:
            params["slurm_partition"] = self.partition
        params.update(self.extra)
        try:
            ex.update_parameters(**params)
        except (NameError, ValueError, TypeError) as exc:
            raise DniError(f"invalid Slurm parameters: {str(exc).splitlines()[0]}") from None
        return ex

    def run(self, store, sweep, plan, on_trained, on_evaluated) -> None:
        ex = self._executor(store.root / "slurm" / sweep.sweep_id)
        device = self.device
        failures: list[str] = []
        root = str(store.root.resolve())
        if plan.train:
            groups = stack_groups(plan.train, device, self.stack)  # on GPUs: a sweep seed's members in one task
            n = len(groups)
            task = RequeueableTask(train_stack_job)
            jobs = ex.map_array(task, [root] * n, groups, [self.data_dir] * n, [device] * n)
            failures += self._wait(jobs, [_names(g) for g in groups], lambda outcomes: _report(outcomes, on_trained, failures))
        points = _points(store, sweep) if plan.evaluate else []
        if points:
            task = RequeueableTask(eval_job)
            n = len(points)
            jobs = ex.map_array(task, [root] * n, [m for m, _ in points], [sweep.eval] * n, [s for _, s in points],
                                [self.data_dir] * n, [device] * n, [self.cpus] * n)
            failures += self._wait(jobs, [f"{m} at sigma_val={s}" for m, s in points], on_evaluated)
        if failures:
            raise JobFailures(f"{len(failures)} Slurm job(s) failed (the others are in the store): " + "; ".join(failures))

    def _wait(self, jobs, names, callback) -> list[str]:
        import time

        failures, pending = [], dict(zip(jobs, names))
        while pending:
            for job in [j for j in pending if j.done()]:
                name = pending.pop(job)
                try:
                    callback(job.result())
                except Exception as exc:  # noqa: BLE001 - submitit wraps job failures in several types
                    failures.append(f"{name} (job {job.job_id}): {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}")
            if pending:
                time.sleep(self.poll_s)
        return failures


def _points(store, sweep) -> list[tuple[str, float]]:
    """Evaluation points still missing after the training phase (models that exist only)."""
    from dni.sweep import plan

    return [(m, s) for m, s in plan(store, sweep).evaluate if store.has_model(m)]


class _QuietSacct(logging.Filter):
    """Clusters without accounting (no slurmdbd) make every status poll warn; submitit then
    falls back to squeue, which is all dni needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "sacct" not in record.getMessage()


class RequeueableTask:
    """A job function that submitit requeues (same arguments) on preemption or timeout.

    Requeueing is safe because every job is idempotent and writes atomically.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def checkpoint(self, *args: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(RequeueableTask(self.fn), *args)
