"""How many threads torch and the BLAS libraries use: the one place that decides it.

The decision, made per stage by the engine (:func:`stage_threads`, applied with :func:`limited`):

1. the cores this process may use, :func:`available_cores`: the CPU affinity mask
   (``os.sched_getaffinity``, e.g. ``taskset`` or a SLURM allocation) and the cgroup CPU quota
   (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, e.g. ``docker --cpus``);
2. an explicit count (``qsmkit run --threads N``, the pipeline key ``threads: N`` or the
   ``QSMKIT_THREADS`` environment variable) is used as given, capped by the available cores;
3. otherwise ``OMP_NUM_THREADS`` caps the count (a cohort worker or a batch system sets it) and,
   below the cap, the count follows the cores *other* processes leave free
   (:func:`free_cores`: the machine's busy time from ``/proc/stat`` minus this process's own,
   over the time since the previous decision; niced processes count a tenth when this one is not
   niced, as the scheduler gives them about that share of a contended core);
4. a stage whose small dense kernels do not scale declares :attr:`qsmkit.stage.Stage.threads`
   (e.g. ``threads = 1``) or overrides :meth:`qsmkit.stage.Stage.thread_limit`; the count never
   exceeds it.

Why the free cores and not simply all cores: torch's OpenMP workers meet at a barrier after
every parallel operation, so a worker that shares its core with another CPU-bound process
holds up every operation for a scheduler time slice, and idle workers spin on the cores others
need: two threads slowed ESPIRiT 1.5 s -> 9.9 s beside one CPU-bound process (issue 20), while one
thread on the free core runs at its single-thread speed. For the same reason
:func:`prepare_environment` (called by the ``qsmkit`` entry point before torch is imported) bounds
how long idle OpenMP workers spin before they sleep (:data:`WAIT_POLICY_ENV`), unless the user set
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``. Measured with ``benchmarks/bench_threads.py`` on 2
cores (wall s, quiet / beside one CPU-bound process): libgomp's default spin (300 000 rounds)
costs ESPIRiT 2.30 / 5.02 and CG-SENSE 2.19 / 4.16 when two threads share a core with another
process; sleeping at once (``OMP_WAIT_POLICY=PASSIVE``, the previous default) wastes nothing under
load but makes every wake-up a futex call, 3.92 / 3.42 and 2.21 / 2.82; a short spin of 30 000
rounds catches the next parallel region of a quiet stage and gives up before it costs a loaded
one: 2.24 / 3.38 and 1.73 / 2.89 (one thread: 2.32 / 3.21 and 2.96 / 3.21).

Nothing here imports torch: :func:`limited` only touches torch when it is already imported.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping

from .errors import ConfigError

__all__ = ["available_cores", "affinity_cores", "cgroup_cpu_limit", "requested_threads", "free_cores",
           "decide_threads", "stage_threads", "limited", "current_threads", "check_threads", "prepare_environment", "set_run_threads",
           "WAIT_POLICY_ENV", "WAIT_POLICY_VARS", "MIN_WINDOW_S"]

#: environment set before torch is imported (:func:`prepare_environment`): idle OpenMP workers
#: spin 30 000 rounds (tens of microseconds), then sleep, leaving the core to other processes
WAIT_POLICY_ENV: dict[str, str] = {"GOMP_SPINCOUNT": "30000"}

#: the variables by which a user chooses the wait policy (then :func:`prepare_environment` sets none)
WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

#: shortest window (s) over which :func:`free_cores` measures the other processes' load
MIN_WINDOW_S = 0.05

#: the explicit count of this run (``--threads`` / ``threads:``), set by :func:`set_run_threads`
_run_threads: int | None = None

_lock = threading.Lock()
_last_sample: tuple | None = None  # (monotonic s, busy jiffies, total jiffies, own jiffies, niced jiffies)
#: weight of niced processes' CPU time as load when this process is not niced (the scheduler gives a
#: nice-10 process about a tenth of a core that a nice-0 thread wants)
NICED_WEIGHT = 0.1
_last_free: float | None = None


# --------------------------------------------------------------------------- cores available to the process
def affinity_cores() -> int:
    """Number of CPUs in this process's affinity mask (``os.cpu_count()`` where unsupported)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """``{controller: path}`` from ``/proc/self/cgroup`` (``""`` is the cgroup v2 unified entry)."""
    out: dict[str, str] = {}
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in (controllers.split(",") if controllers else [""]):
            out[c] = path
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota_v2(text: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line ``"<quota|max> <period>"``; None: no limit."""
    if not text:
        return None
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1]) if len(parts) > 1 else 100000.0
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(quota: str | None, period: str | None) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None: no limit (-1)."""
    try:
        q, p = float(quota), float(period)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None


def _walk_up(root: Path, rel: str) -> Iterator[Path]:
    """``root/rel``, then its parents up to ``root`` (a quota on an enclosing cgroup also applies)."""
    parts = [p for p in rel.strip("/").split("/") if p]
    for n in range(len(parts), -1, -1):
        yield root.joinpath(*parts[:n])


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup, in CPUs (e.g. ``1.5`` for ``docker --cpus 1.5``).

    Reads cgroup v2 ``cpu.max`` or cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` for the
    cgroup named in ``proc_cgroup`` and every enclosing one (the smallest quota wins); also tries
    the files directly under ``root`` (inside a container the cgroup is mounted at the root).
    Returns ``None`` when no quota is set or the files cannot be read.
    """
    root, proc_cgroup = Path(root), Path(proc_cgroup)
    paths = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    if "" in paths:  # cgroup v2 (unified)
        for d in _walk_up(root, paths[""]):
            q = _quota_v2(_read(d / "cpu.max"))
            if q is not None:
                limits.append(q)
    v1 = paths.get("cpu", paths.get("cpuacct"))
    for base in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
        for d in (_walk_up(base, v1) if v1 is not None else iter([base])):
            q = _quota_v1(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us"))
            if q is not None:
                limits.append(q)
    for d in (root,):  # a container's own cgroup mounted at the root
        q = _quota_v2(_read(d / "cpu.max"))
        if q is None:
            q = _quota_v1(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us"))
        if q is not None:
            limits.append(q)
    return min(limits) if limits else None


def available_cores(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """Cores this process may use: the affinity mask, capped by the cgroup quota (rounded up, at least 1)."""
    n = affinity_cores()
    q = cgroup_cpu_limit(root, proc_cgroup)
    if q is not None:
        n = min(n, max(1, math.ceil(q - 1e-9)))
    return max(1, n)


# --------------------------------------------------------------------------- what the user asked for
def _positive_int(value: object, where: str) -> int | None:
    if value is None or value == "" or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r}; give a number of threads (1, 2, ...) or auto")
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(f"{where} = {value!r}; give a number of threads (1, 2, ...) or auto") from None
    if n < 1:
        raise ConfigError(f"{where} = {value!r}; give a number of threads of at least 1, or auto")
    return n


def check_threads(value: object, where: str = "threads") -> int | None:
    """``value`` (an int, a numeric string, ``auto`` or None) as a thread count, None for ``auto``;
    a one-line :class:`~qsmkit.errors.ConfigError` otherwise."""
    return _positive_int(value, where)


def requested_threads(explicit: int | str | None = None, env: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """``(fixed, cap)``: an explicit count (``explicit``, else this run's :func:`set_run_threads`, else
    ``QSMKIT_THREADS``), and the ``OMP_NUM_THREADS`` cap; each None when not given."""
    env = os.environ if env is None else env
    fixed = _positive_int(explicit, "--threads")
    if fixed is None:
        fixed = _run_threads
    if fixed is None:
        fixed = _positive_int(env.get("QSMKIT_THREADS"), "QSMKIT_THREADS")
    cap = None
    omp = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp:
        try:
            cap = max(1, int(omp))
        except ValueError:
            cap = None  # OpenMP ignores a malformed value too
    return fixed, cap


def set_run_threads(n: int | str | None) -> int | None:
    """Set (or with None clear) the explicit thread count of this process's runs (``--threads``,
    pipeline ``threads:``); returns the previous one."""
    global _run_threads
    prev = _run_threads
    _run_threads = _positive_int(n, "threads")
    return prev


# --------------------------------------------------------------------------- the load of other processes
def _proc_stat(path: str = "/proc/stat") -> tuple[int, int, int, int] | None:
    """``(busy jiffies, total jiffies, host cpus, niced jiffies)`` summed over the machine, or None."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].startswith("cpu "):
        return None
    vals = [int(v) for v in lines[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already inside user/nice
    cpus = sum(1 for ln in lines[1:] if ln.startswith("cpu") and ln[3:4].isdigit())
    return total - idle, total, max(cpus, 1), vals[1]


def _own_jiffies() -> int:
    """CPU time of this process (all threads), in clock ticks."""
    t = os.times()
    return int(round((t.user + t.system) * os.sysconf("SC_CLK_TCK")))


def free_cores(min_window_s: float = MIN_WINDOW_S) -> float | None:
    """Cores of the machine that other processes left idle since the previous call (at least
    ``min_window_s`` ago; the first call waits that long), or None where ``/proc/stat`` is not
    readable. This process's own CPU time is not counted as load."""
    global _last_sample, _last_free
    with _lock:
        now = _proc_stat()
        if now is None:
            return None
        t_now, own = time.monotonic(), _own_jiffies()
        if _last_sample is None:
            _last_sample = (t_now, now[0], now[1], own, now[3])
            time.sleep(min_window_s)
            now, t_now, own = _proc_stat() or now, time.monotonic(), _own_jiffies()
        t0, busy0, total0, own0, nice0 = _last_sample
        if t_now - t0 < min_window_s and _last_free is not None:
            return _last_free  # too short a window to say more than the previous one did
        d_total = now[1] - total0
        if d_total <= 0:
            return _last_free
        others = max(0.0, float((now[0] - busy0) - (own - own0)))
        try:
            niced_self = os.getpriority(os.PRIO_PROCESS, 0) > 0
        except (AttributeError, OSError):
            niced_self = True
        if not niced_self:  # niced processes barely delay a nice-0 thread
            d_nice = max(0, now[3] - nice0)
            others = max(0.0, others - (1.0 - NICED_WEIGHT) * d_nice)
        free = now[2] * (1.0 - others / d_total)
        _last_sample, _last_free = (t_now, now[0], now[1], own, now[3]), max(free, 0.0)
        return _last_free


def decide_threads(explicit: int | str | None = None, limit: int | None = None, adaptive: bool = True,
                   env: Mapping[str, str] | None = None) -> int:
    """The thread count for the next piece of work (see the module docstring for the rules).

    Parameters
    ----------
    explicit : int, str or None
        ``--threads`` / ``threads:`` value (``auto`` or None: decide).
    limit : int or None
        The stage's own ceiling (:attr:`qsmkit.stage.Stage.threads`).
    adaptive : bool
        Follow the cores other processes leave free (only without an explicit count).
    """
    n = available_cores()
    fixed, cap = requested_threads(explicit, env)
    if fixed is not None:
        n = min(n, fixed)
    else:
        if cap is not None:
            n = min(n, cap)
        if adaptive and n > 1:
            free = free_cores()
            if free is not None:
                n = max(1, min(n, int(math.floor(free + 0.5))))
    if limit is not None:
        n = min(n, max(1, int(limit)))
    return max(1, n)


def stage_threads(stage, ctx=None, p=None, explicit: int | str | None = None) -> int:
    """Threads for running ``stage`` (a :class:`~qsmkit.stage.Stage` instance or class): the rules of
    :func:`decide_threads` with the stage's :meth:`~qsmkit.stage.Stage.thread_limit`. A stage on a
    GPU still gets the CPU count (its host-side work uses it)."""
    limit = None
    fn = getattr(stage, "thread_limit", None)
    if callable(fn):
        try:
            limit = fn(ctx, p)
        except TypeError:  # a class with an instance method: fall back to the attribute
            limit = getattr(stage, "threads", None)
    else:
        limit = getattr(stage, "threads", None)
    return decide_threads(explicit, limit)


# --------------------------------------------------------------------------- applying a count
def _set_torch(n: int) -> int | None:
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "get_num_threads"):
        return None
    prev = int(torch.get_num_threads())
    if prev != n:
        torch.set_num_threads(int(n))
    return prev


_active: list[int] = []  # the counts of the :func:`limited` blocks being run, innermost last
_controller: list = []  # [(number of loaded modules, ThreadpoolController)]


def _blas_controller():
    """A cached ``threadpoolctl.ThreadpoolController`` (rebuilt when modules were imported since, as
    they may have loaded another BLAS), or None without threadpoolctl."""
    n_mod = len(sys.modules)
    if _controller and _controller[0][0] == n_mod:
        return _controller[0][1]
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    ctl = ThreadpoolController()
    _controller[:] = [(len(sys.modules), ctl)]
    return ctl


@contextlib.contextmanager
def limited(n: int | None) -> Iterator[int | None]:
    """Run the block with ``n`` threads in torch (when imported) and the BLAS libraries numpy and
    scipy use (through ``threadpoolctl`` when installed); restores the previous counts after.
    ``n = None`` changes nothing. Yields ``n``."""
    if n is None:
        yield None
        return
    n = max(1, int(n))
    prev = _set_torch(n)
    ctl = _blas_controller()
    blas = ctl.limit(limits=n, user_api="blas") if ctl is not None else contextlib.nullcontext()
    _active.append(n)
    try:
        with blas:
            yield n
    finally:
        _active.pop()
        if prev is not None:
            _set_torch(prev)


def current_threads() -> int | None:
    """The count of the innermost :func:`limited` block, or None outside one: for libraries with their
    own pools (e.g. SimpleITK's ``SetGlobalDefaultNumberOfThreads``), which a stage sets from it."""
    return _active[-1] if _active else None


def prepare_environment(env: dict | None = None) -> dict:
    """Before torch is imported (the ``qsmkit`` entry point calls this): bound the spinning of idle
    OpenMP workers (:data:`WAIT_POLICY_ENV`) unless the user set one of :data:`WAIT_POLICY_VARS`
    (a wait policy or a spin count is then theirs). Returns what was set."""
    env = os.environ if env is None else env
    if any(k in env for k in WAIT_POLICY_VARS):  # the user chose a wait policy or a spin count
        return {}
    env.update(WAIT_POLICY_ENV)
    return dict(WAIT_POLICY_ENV)
