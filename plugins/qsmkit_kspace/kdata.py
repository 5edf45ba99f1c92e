"""The ``kspace`` artifact (:class:`KSpaceData`, now in the public core module :mod:`qsmkit.kspace`) and
the slice selection of the readers.

``KSpaceData``, ``to_volume`` and ``from_volume`` are re-exported from :mod:`qsmkit.kspace` (where
the layout, shapes, dtypes and units are documented) so that older imports keep working.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qsmkit.kspace import KSpaceData, from_volume, to_volume

__all__ = ["KSpaceData", "to_volume", "from_volume", "parse_slices"]


def parse_slices(spec: Any, n_total: int, where: str = "slices") -> list[int]:
    """Slice selection from YAML: ``None`` (all), an int, a list of ints, or ``"a:b[:step]"``."""
    from qsmkit.errors import ConfigError

    if spec is None or spec == "all":
        return list(range(n_total))
    if isinstance(spec, (bool, float)):
        raise ConfigError(f"{where} = {spec!r}: give an index, a list of indices or 'start:stop'")
    if isinstance(spec, int):
        idx = [spec]
    elif isinstance(spec, str):
        try:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) == 1:
                idx = [parts[0]]
            elif 2 <= len(parts) <= 3:
                idx = list(range(n_total)[slice(*parts)])  # a range: no list of every slice first
            else:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{where} = {spec!r} is not understood; use e.g. 5, [3, 4, 5] or '10:20'") from None
    elif isinstance(spec, Sequence):
        idx = []
        for v in spec:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ConfigError(f"{where} = {spec!r}: every entry must be an integer slice index")
            idx.append(int(v))
    else:
        raise ConfigError(f"{where} = {spec!r} is not understood; use e.g. 5, [3, 4, 5] or '10:20'")
    out = []
    for i in idx:
        j = i + n_total if i < 0 else i
        if not 0 <= j < n_total:
            raise ConfigError(f"{where}: slice {i} is outside the file's {n_total} slices (0..{n_total - 1})")
        out.append(j)
    if not out:
        raise ConfigError(f"{where} = {spec!r} selects no slice of the file's {n_total}")
    return out
