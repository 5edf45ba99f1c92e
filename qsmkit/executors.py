"""Executors for cohorts: a local process pool (default) or Dask distributed, both memory-aware.

Both run :func:`qsmkit.pipeline.cohort.run_job` once per run, each run in a worker process of its
own, and hand every :class:`~qsmkit.pipeline.cohort.Outcome` back as it arrives. A run that
raises, or whose worker dies (killed for memory, a segfault), becomes a failed outcome; the
other runs go on.

Memory: :func:`run_peak_bytes` estimates a run's peak from its grid (voxels x echoes) and its
stages (:data:`STAGE_BYTES_PER_VOXEL`, or a stage class's own ``peak_bytes_per_voxel``), plus the
worker's own footprint (more when a stage runs on torch); ``benchmarks/bench_cohort.py`` prints
the estimate beside the measured peak of each worker. The local
pool starts a run only while the estimates of the runs in flight plus its own fit in the memory
that was available when the cohort started (:func:`qsmkit.io.nifti.available_memory`, less
:data:`HEADROOM`); a run that alone exceeds it runs by itself. A Dask ``LocalCluster`` gets no
more workers than runs of the largest estimate fit, and each worker a ``MEMORY`` resource that
the runs ask for; with an external scheduler, runs ask for ``MEMORY`` only when its workers
declare that resource (``dask worker --resources "MEMORY=30e9"``, see docs/cohorts.md).

Threads: each worker's torch/OpenMP/BLAS threads are its share of the cores
(``cores // workers``), so workers never oversubscribe the machine. GPU: runs with a stage on
``cuda`` ask Dask for a ``GPU`` resource (``--resources "GPU=1"`` on GPU workers; a
``LocalCluster`` declares one per worker when ``nvidia-smi`` lists a GPU).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Callable, Sequence

from .errors import ConfigError

#: peak working memory per voxel (bytes) of one stage, by stage kind (float32 volumes, complex64
#: FFTs on a padded grid); a Stage class may declare ``peak_bytes_per_voxel`` to override it
STAGE_BYTES_PER_VOXEL = {"mask": 24, "unwrap": 160, "echo_combine": 64, "background": 200, "inversion": 400,
                         "reference": 16, "register": 200, "field": 160}
#: methods known to need more than their kind's default (iterative solvers with many work arrays)
METHOD_BYTES_PER_VOXEL = {"tkd": 160, "medi": 900, "tv": 700, "dip": 1500, "tfi": 900, "cosmos": 600,
                          "lbv": 300, "pdf": 500}
#: bytes per voxel and echo held through a run (magnitude, phase, unwrapped phase, their copies)
ECHO_BYTES_PER_VOXEL = 24
#: a worker process with qsmkit, numpy and scipy imported (measured: ~150 MiB)
BASE_BYTES = 180 * 2**20
#: added when a stage runs on torch (its import and allocator; measured: ~250-300 MiB on CPU)
TORCH_BYTES = 320 * 2**20
#: share of the available memory kept free for the system and the parent process
HEADROOM = 0.15


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_count() -> int:
    """GPUs that ``nvidia-smi -L`` lists (0 without a driver), without importing torch."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def run_peak_bytes(plan) -> int:
    """Estimated peak memory (bytes) of one run of ``plan``: worker base + echoes + the largest stage."""
    from .io.nifti import read_header

    phase = plan.inputs.get("phase")
    files = phase if isinstance(phase, list) else [phase]
    voxels, echoes = 0, len(files)
    if files and files[0] is not None:
        shape = read_header(files[0], "phase")[0].shape
        voxels = int(shape[0] * shape[1] * shape[2])
        if len(files) == 1 and len(shape) == 4:
            echoes = int(shape[3])
    from .params import CPU_DEVICE

    stage, torch = 0, False
    for s in plan.steps:
        if s.run:
            dev = s.cls.param_map().get("device")
            torch = torch or (dev is not None and dev is not CPU_DEVICE)
            per = getattr(s.cls, "peak_bytes_per_voxel", None)
            per = per or METHOD_BYTES_PER_VOXEL.get(s.method) or STAGE_BYTES_PER_VOXEL.get(s.kind, 200)
            stage = max(stage, int(per))
    return int(BASE_BYTES + (TORCH_BYTES if torch else 0) + voxels * (ECHO_BYTES_PER_VOXEL * max(echoes, 1) + stage))


def memory_budget() -> int | None:
    from .io.nifti import available_memory

    avail = available_memory()
    return None if avail is None else int(avail * (1 - HEADROOM))


def fit_workers(requested: int, estimates: Sequence[int], budget: int | None) -> int:
    """How many runs of the largest estimate run side by side within ``budget`` (at least 1)."""
    if budget is None or not estimates:
        return max(1, requested)
    return max(1, min(requested, budget // max(max(estimates), 1)))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


class LocalExecutor:
    """Runs jobs in a pool of worker processes (``spawn``), starting a run only when it fits in memory."""

    def __init__(self, workers: int | None, log: Callable[[str], None]):
        self.workers = max(1, workers or min(cpu_count(), 4))
        self.log = log

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, jobs: list, done: Callable, fn: Callable | None = None) -> None:
        """Run every job (``fn``, default :func:`~qsmkit.pipeline.cohort.run_job`); ``done(outcome)`` for each."""
        import concurrent.futures as cf
        import multiprocessing as mp
        from concurrent.futures.process import BrokenProcessPool

        from .pipeline.cohort import Outcome, run_job

        budget = memory_budget()
        n = min(self.workers, len(jobs))
        fit = fit_workers(n, [j.estimate_bytes for j in jobs], budget)
        if budget is not None and fit < n:
            self.log(f"{fit} worker(s), not {n}: each run needs up to {_gib(max(j.estimate_bytes for j in jobs))} "
                     f"and {_gib(budget)} are free")
        threads = max(1, cpu_count() // n)
        for j in jobs:
            j.threads = threads
        pending = list(jobs)
        ctx = mp.get_context("spawn")
        env_backup = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        for v in env_backup:  # inherited by the workers before they import numpy
            os.environ[v] = str(threads)
        try:
            while pending:
                pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx)
                inflight: dict = {}
                try:
                    while pending or inflight:
                        used = sum(j.estimate_bytes for j in inflight.values())
                        while pending and len(inflight) < n and (
                                not inflight or budget is None or used + pending[0].estimate_bytes <= budget):
                            j = pending[0]
                            inflight[pool.submit(fn or run_job, j)] = j  # a broken pool raises here: j stays
                            pending.pop(0)
                            used += j.estimate_bytes
                        finished, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                        for fut in finished:
                            j = inflight.pop(fut)
                            try:
                                done(fut.result())
                            except BrokenProcessPool:
                                done(Outcome(j.key, "failed", error="its worker process died (killed, e.g. for "
                                                                   "memory, or crashed); see dmesg"))
                            except Exception as exc:  # noqa: BLE001
                                done(Outcome(j.key, "failed", error=f"internal error: {type(exc).__name__}: {exc}"))
                except BrokenProcessPool:
                    pass
                except BaseException:  # Ctrl-C or SIGTERM: stop the workers now (their folders stay clean)
                    for proc in list((getattr(pool, "_processes", None) or {}).values()):
                        proc.terminate()
                    inflight.clear()
                    pending.clear()
                    raise
                finally:
                    for fut, j in list(inflight.items()):  # a dead worker breaks the pool: fail its runs
                        done(Outcome(j.key, "failed", error="its worker process died (killed, e.g. for memory, or "
                                                           "crashed); see dmesg"))
                    inflight.clear()
                    pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for v, old in env_backup.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old


class DaskExecutor:
    """Runs jobs on Dask distributed: a ``LocalCluster`` on 127.0.0.1, or the scheduler at ``address``."""

    def __init__(self, workers: int | None, address: str | None, log: Callable[[str], None]):
        import importlib.util

        if importlib.util.find_spec("distributed") is None:
            raise ConfigError("--executor dask needs Dask distributed; pip install 'qsmkit[dask]'")
        self.workers = workers
        self.address = address
        self.log = log
        self.cluster = None
        self.client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        return False

    def _start(self, jobs: list) -> tuple[int | None, bool]:
        """Start or connect; returns (MEMORY per worker or None, whether GPU resources exist)."""
        from distributed import Client, LocalCluster

        if self.address:
            try:
                self.client = Client(self.address, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise ConfigError(f"--scheduler {self.address}: cannot connect ({exc}); start the scheduler first "
                                  f"(dask scheduler) or check the address") from None
            info = self.client.scheduler_info().get("workers", {})
            mems = [w.get("resources", {}).get("MEMORY") for w in info.values()]
            gpus = any(w.get("resources", {}).get("GPU") for w in info.values())
            mem = int(max(mems)) if mems and all(m for m in mems) else None
            self.log(f"dask: scheduler {self.address}, {len(info)} worker(s)")
            return mem, gpus
        budget = memory_budget()
        n = max(1, self.workers or min(cpu_count(), 4))
        n = min(n, len(jobs))
        fit = fit_workers(n, [j.estimate_bytes for j in jobs], budget)
        if fit < n:
            self.log(f"dask: {fit} worker(s), not {n}: each run needs up to "
                     f"{_gib(max(j.estimate_bytes for j in jobs))} and {_gib(budget)} are free")
        n = fit
        threads = max(1, cpu_count() // n)
        per_worker = int(budget // n) if budget else None
        ngpu = gpu_count()
        resources = {}
        if per_worker:
            resources["MEMORY"] = per_worker
        if ngpu:
            resources["GPU"] = 1
        # the nanny sets these to 1 by default (distributed.nanny.pre-spawn-environ); a worker gets its share
        env = {v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address=None, memory_limit=0, resources=resources or None,
                                    silence_logs=50, env=env)
        self.client = Client(self.cluster)
        for j in jobs:
            j.threads = threads
        self.log(f"dask: LocalCluster on 127.0.0.1, {n} worker(s) x {threads} thread(s)")
        return per_worker, bool(ngpu)

    def run(self, jobs: list, done: Callable) -> None:
        from distributed import as_completed

        from .pipeline.cohort import Outcome, run_job

        mem, gpus = self._start(jobs)
        futures = {}
        for j in jobs:
            res = {}
            if mem:
                res["MEMORY"] = min(j.estimate_bytes, mem)
            if j.needs_gpu and gpus:
                res["GPU"] = 1
            fut = self.client.submit(run_job, j, key=f"qsmkit-{j.key}-{os.getpid()}", resources=res or None,
                                     pure=False, retries=0)
            futures[fut] = j
        for fut in as_completed(list(futures)):
            j = futures[fut]
            try:
                done(fut.result())
            except Exception as exc:  # noqa: BLE001 - KilledWorker, a lost connection ...
                msg = " ".join(str(exc).split())[:300]
                done(Outcome(j.key, "failed", error=f"dask: {type(exc).__name__}: {msg}"))


def make_executor(kind: str, workers: int | None, scheduler: str | None, log: Callable[[str], None]):
    """The executor for ``--executor`` (``local`` or ``dask``)."""
    if kind == "local":
        if scheduler:
            raise ConfigError("--scheduler needs --executor dask")
        return LocalExecutor(workers, log)
    if kind == "dask":
        return DaskExecutor(workers, scheduler, log)
    raise ConfigError(f"--executor {kind!r}: choose local or dask")
