"""Progress bars for long stage loops (MEDI Gauss-Newton, DIP, COSMOS CG, training), with tqdm.

A bar is shown only when it helps a person watching: stderr is a terminal. Anywhere else (a log
file, a SLURM job, pytest's captured output, a Dask worker whose stderr is a pipe) the helpers
return the plain iterable or a callback that does nothing, so output stays line-oriented.
``QSMKIT_PROGRESS=0`` turns bars off on a terminal too (e.g. for parallel local workers whose
bars would interleave); ``QSMKIT_PROGRESS=1`` forces them on (to a non-terminal stderr).

tqdm is imported only when a bar is actually shown, so importing this module is free.

Usage in a stage's array function::

    from qsmkit.progress import progress

    for it in progress(range(1, max_iter + 1), "MEDI Gauss-Newton"):
        ...                     # a ``break`` closes the bar

or, for a solver that reports through a ``callback(k, ...)``::

    with progress_callback(max_iter, "COSMOS CG") as tick:
        x, info = cg(A, b, callback=tick)
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterable, Iterator, TypeVar

__all__ = ["enabled", "progress", "progress_callback"]

T = TypeVar("T")
ENV = "QSMKIT_PROGRESS"


def enabled(stream: Any = None) -> bool:
    """Whether bars are shown: ``QSMKIT_PROGRESS`` if set (0/1), else whether stderr is a terminal."""
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar on a terminal (see :func:`enabled`), else ``iterable`` itself.

    Parameters
    ----------
    iterable : iterable
        The loop's iterable (e.g. ``range(1, max_iter + 1)``).
    desc : str
        Short label shown left of the bar (the method and the loop, e.g. ``"DIP"``).
    total : int, optional
        Number of iterations when ``len(iterable)`` is not defined.
    unit : str
        Unit shown in the rate (``it/s``).
    """
    if not enabled():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)


class _Tick:
    """``tick(k, *ignored)``: move a bar to iteration ``k`` (for solver callbacks)."""

    def __init__(self, bar):
        self._bar = bar

    def __call__(self, k: int, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            k = min(int(k), int(self._bar.total or k))
            if k > self._bar.n:
                self._bar.update(k - self._bar.n)


@contextlib.contextmanager
def progress_callback(total: int, desc: str, unit: str = "it") -> Iterator[_Tick]:
    """A callback ``tick(k, ...)`` that moves a bar of ``total`` steps to ``k`` (no-op off a terminal).

    The bar closes when the block ends, also when the solver stops early or raises.
    """
    bar = None
    if enabled():
        from tqdm import tqdm

        bar = tqdm(total=int(total), desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        yield _Tick(bar)
    finally:
        if bar is not None:
            bar.close()
