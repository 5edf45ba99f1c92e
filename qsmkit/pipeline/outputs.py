"""The output folder: checked at validation, locked during a run, replaced as a set at the end.

Rules (the user's data are never lost or mixed):

* A folder that holds files qsmkit did not write in an earlier run of the same pipeline is
  refused, unless ``--overwrite`` is given: then this run's files replace same-named ones, files
  qsmkit did not write are left alone and listed in ``provenance.json`` as ``other_files``, and
  another pipeline's earlier outputs are replaced as a set. Input files are never replaced or
  removed, with or without ``--overwrite``.
* A rerun of the same pipeline replaces the previous run's outputs as a set: after it, the folder
  holds exactly this run's outputs (plus, with ``--overwrite``, the other files), all listed in
  ``provenance.json``.
* A run holds an exclusive ``flock`` on the folder, so a second run into it is refused.
* Outputs are written into a hidden staging folder inside the output folder, then committed:
  a journal (:data:`JOURNAL`) names every file involved, the old completion marker
  (``provenance.json``) is removed first, old outputs are removed, new ones renamed in, and the new
  ``provenance.json`` is renamed in last; the journal is then removed. A folder is complete when
  it has ``provenance.json`` and no journal. SIGINT/SIGTERM are held back during the commit. A
  run killed at any point (even SIGKILL) leaves at most a staging folder and a journal, and the
  next run into the folder cleans both up and finishes the replacement.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import OutputError
from ..inputs import file_inputs

STAGING_PREFIX = ".qsmkit-staging-"
JOURNAL = ".qsmkit-commit.json"
PROVENANCE = "provenance.json"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: output folders whose commit completed in this process (an interruption after it lost nothing)
COMMITTED: list[Path] = []


@dataclass
class FolderState:
    """What an existing output folder holds, by origin."""

    previous: set[str] = field(default_factory=set)  # written by an earlier run of this pipeline
    other_runs: set[str] = field(default_factory=set)  # written by a run of another pipeline
    foreign: set[str] = field(default_factory=set)  # not written by qsmkit
    leftovers: set[str] = field(default_factory=set)  # staging folders, an unfinished commit's journal


def pipeline_identity(name: str, source: Path | None) -> dict:
    """How a run names its pipeline in the provenance and the journal (name and resolved file)."""
    return {"name": name, "file": str(source) if source is not None else None}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _qsmkit_record(path: Path) -> tuple[dict, set[str]] | None:
    """(pipeline identity, files) from a provenance file or journal that qsmkit wrote, else None."""
    data = _read_json(path)
    if data is None:
        return None
    if path.name == JOURNAL and isinstance(data.get("files"), list):
        return data.get("pipeline") or {}, {str(f) for f in data["files"]} | {PROVENANCE}
    if "qsmkit_version" in data and isinstance(data.get("outputs"), list):
        pipe = data.get("pipeline") or {}
        return {"name": pipe.get("name"), "file": pipe.get("file")}, {str(f) for f in data["outputs"]} | {PROVENANCE}
    return None


def folder_state(out: Path, identity: dict) -> FolderState:
    """Classify the entries of ``out`` (see :class:`FolderState`)."""
    state = FolderState()
    if not out.is_dir():
        return state
    entries = {p.name for p in out.iterdir()}
    ours: set[str] = set()
    others: set[str] = set()
    for marker in (PROVENANCE, JOURNAL):
        rec = _qsmkit_record(out / marker) if marker in entries else None
        if rec is not None:
            (ours if rec[0] == identity else others).update(rec[1])
    state.leftovers = {e for e in entries if e.startswith(STAGING_PREFIX) and (out / e).is_dir()}
    if JOURNAL in entries:
        state.leftovers.add(JOURNAL)
    rest = entries - state.leftovers
    state.previous = rest & ours
    state.other_runs = (rest & others) - ours
    state.foreign = rest - ours - others
    return state


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(out: Path) -> None:
    base = _first_existing(out)
    if not base.is_dir():
        raise OutputError(f"output_dir {out} is below {base}, which is a file; choose a folder path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"output_dir {out}: {base} is not writable; choose a folder you can write to")
    try:  # os.access says yes to root even on read-only file systems: try a nameless temporary file
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise OutputError(f"output_dir {out}: cannot write in {base} ({exc.strerror or exc}); choose a folder you "
                          f"can write to") from None


def _listing(names: Iterable[str], n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_output_dir(plan) -> FolderState:
    """Refuse an output folder that cannot be written or whose files would be lost or mixed."""
    out = plan.output_dir.resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file; give a folder")
    _check_writable(out)
    targets = {out / n for n in output_names(plan)}
    inputs = {name: path.resolve() for name, path in file_inputs(plan.inputs).items()}
    for name, rp in inputs.items():
        if rp in targets or rp == out:
            raise OutputError(f"output_dir {out} would overwrite the input file {rp} ({name}); choose another "
                              f"output_dir")
    if plan.source is not None and plan.source.resolve() in targets:
        raise OutputError(f"output_dir {out} would overwrite the pipeline file; choose another output_dir")
    state = folder_state(out, pipeline_identity(plan.name, plan.source))
    in_folder = {rp.name for rp in inputs.values() if rp.parent == out}
    if plan.source is not None and plan.source.resolve().parent == out:
        in_folder.add(plan.source.name)
    replaced = (state.previous | state.other_runs) & in_folder
    if replaced:
        raise OutputError(f"output_dir {out} holds {_listing(replaced)} from an earlier run, which this run reads as "
                          f"input; a rerun would replace it: choose another output_dir")
    if not plan.overwrite and (state.foreign or state.other_runs):
        kind = "files qsmkit did not write" if state.foreign else "the outputs of another pipeline's run"
        raise OutputError(f"output_dir {out} holds {kind} ({_listing(state.foreign | state.other_runs)}); choose an "
                          f"empty or new folder, or pass --overwrite to replace same-named files")
    return state


def output_names(plan) -> set[str]:
    """Every file name a run of ``plan`` may write."""
    names = {PROVENANCE, "metrics.json"}
    if getattr(plan, "qc", False):
        from ..qc import QC_FILES

        names |= set(QC_FILES)
    for s in plan.steps:
        if s.run:
            names |= {f"{w}{ext}" for w in (*s.cls.writes, *s.cls.optional_writes) for ext in (".nii.gz", ".json")}
    return names


class _HeldSignals:
    """Hold SIGINT/SIGTERM back for the duration of a block (delivered when it ends)."""

    def __enter__(self):
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        return self

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
        return False


class OutputFolder:
    """Exclusive use of a run's output folder: lock, clean-up of leftovers, staging and commit.

    Use as a context manager around the whole run; :meth:`stage_dir` gives a hidden folder to
    write into and :meth:`commit` replaces the folder's previous outputs with the staged files.
    """

    def __init__(self, plan):
        self.plan = plan
        self.out = plan.output_dir
        self.identity = pipeline_identity(plan.name, plan.source)
        self._fd: int | None = None
        self._created: list[Path] = []
        self._staging: Path | None = None
        #: True once the new outputs are complete in the folder
        self.committed = False

    def __enter__(self) -> "OutputFolder":
        missing = []
        p = self.out
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"output_dir {self.out} cannot be created ({exc.strerror}); choose a folder you can "
                              f"write to") from None
        self._created = missing
        self._fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"output_dir {self.out} is in use by another qsmkit run; wait for it to finish or "
                                  f"choose another output_dir") from None
            raise
        self.state = check_output_dir(self.plan)  # again, under the lock
        self._clean_leftovers()
        return self

    def _clean_leftovers(self) -> None:
        for name in sorted(self.state.leftovers):
            path = self.out / name
            if name == JOURNAL:
                continue  # finished by this run's commit, which replaces the files it lists
            shutil.rmtree(path, ignore_errors=True)

    def stage_dir(self) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out))
        return self._staging

    def commit(self, names: list[str]) -> list[Path]:
        """Replace the folder's previous outputs with the staged ``names`` (``provenance.json`` last)."""
        stage = self.stage_dir()
        old = (self.state.previous | self.state.other_runs) - {PROVENANCE}
        other = self.state.foreign - set(names)
        journal = {"pipeline": self.identity, "files": sorted(old | set(names))}
        with _HeldSignals():
            tmp = stage / JOURNAL
            tmp.write_text(json.dumps(journal))
            os.replace(tmp, self.out / JOURNAL)
            _fsync_dir(self.out)
            (self.out / PROVENANCE).unlink(missing_ok=True)
            for name in sorted(old - set(names)):
                _remove(self.out / name)
            body = [n for n in names if n != PROVENANCE]
            for name in body + [PROVENANCE]:
                os.replace(stage / name, self.out / name)
            _fsync_dir(self.out)
            (self.out / JOURNAL).unlink()
            self.committed = True
            COMMITTED.append(self.out)
            self.state.foreign = other
        return [self.out / n for n in names]

    def __exit__(self, *exc) -> bool:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
        if not self.committed:
            for p in self._created:  # folders this run made and left empty
                try:
                    p.rmdir()
                except OSError:
                    break
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
