"""Atomic file output: write to a temporary name in the same folder, then ``os.replace``."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    On error the temporary file is removed and ``path`` is untouched, so a reader never sees a
    half-written file. The temporary name keeps the suffixes (``.nii.gz``) writers key on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    try:  # mkstemp makes 0600 files; outputs get the mode an ordinary write would (0666 less the umask)
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def check_folder_for(out: str | os.PathLike, names: set[str], marker: str, overwrite: bool = False) -> None:
    """Refuse to write ``names`` into ``out`` when that would replace or mix with files of another origin.

    ``out`` may be new, empty, or hold an earlier output of the same writer (recognised by its
    ``marker`` file, e.g. ``phantom.json``, and holding only ``names``). Anything else needs
    ``overwrite`` (then same-named files are replaced and others kept).
    """
    from ..errors import OutputError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; give a folder")
    if overwrite or not out.is_dir():
        return
    present = {p.name for p in out.iterdir()}
    if present and (marker not in present or present - names):
        shown = sorted(present)
        raise OutputError(f"{out} already holds files ({', '.join(shown[:4])}{' ...' if len(shown) > 4 else ''}); "
                          f"choose an empty or new folder, or pass --overwrite to replace same-named files")


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no pure getter before Python 3.13)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
