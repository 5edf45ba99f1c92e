"""Benchmark helper: which devices to time, and GPU-aware timing (synchronised wall, CPU seconds, GPU peak).

A benchmark that times a torch stage prints a GPU row beside its CPU row when torch sees CUDA
(issue 20). :func:`devices` gives the device list (``cpu``, plus ``cuda`` when available, or what
the user asked for); :func:`timed` runs a function on one device with ``torch.cuda.synchronize()``
before and after, so the wall time covers the GPU work, and reports the CPU seconds (user + system
of all threads) and the peak GPU memory (``torch.cuda.max_memory_allocated``, MiB).

CUDA availability is checked through NVML (``PYTORCH_NVML_BASED_CUDA_CHECK=1``), which does not
initialise the CUDA driver in this process: the benchmarks fork a child per case
(``_measure.measure``) and a forked child cannot use CUDA once its parent has initialised it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU, without initialising CUDA in this process (fork-safe)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def devices(requested: Sequence[str] | str | None = None) -> list[str]:
    """The devices to time: ``requested`` (``"auto"``/``None``: cpu plus cuda when available,
    ``"both"``: cpu and cuda, or a list / one name), without cuda where torch sees no GPU."""
    if requested is None or requested == "auto":
        return ["cpu"] + (["cuda"] if cuda_available() else [])
    if requested == "both":
        requested = ["cpu", "cuda"]
    if isinstance(requested, str):
        requested = [requested]
    out = [d for d in requested if d != "cuda" or cuda_available()]
    skipped = [d for d in requested if d not in out]
    if skipped:
        print(f"note: torch sees no CUDA GPU; skipping device {', '.join(skipped)}", flush=True)
    return out


def synchronize(device: str) -> None:
    """``torch.cuda.synchronize()`` when ``device`` is a CUDA device (nothing on the CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, dict]:
    """Run ``fn()`` for ``device``: its result and ``{"wall s", "cpu s", "gpu peak MiB"}``.

    On CUDA the peak-memory counter is reset first and the device is synchronised before both
    clock readings; ``gpu peak MiB`` is absent on the CPU.
    """
    cuda = str(device).startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    info = {"wall s": time.perf_counter() - w0, "cpu s": time.process_time() - c0}
    if cuda:
        info["gpu peak MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out, info


def gpu_peak_mib(device: str) -> dict:
    """``{"gpu peak MiB": ...}`` of this process so far on a CUDA ``device`` (``{}`` on the CPU):
    for a forked child that ran one case, its whole peak."""
    if not str(device).startswith("cuda"):
        return {}
    import torch

    torch.cuda.synchronize()
    return {"gpu peak MiB": torch.cuda.max_memory_allocated() / 2 ** 20}


def loadavg() -> str:
    """The 1-minute load average (as text), printed with every table: the machine may be shared."""
    return f"{os.getloadavg()[0]:.1f}"
