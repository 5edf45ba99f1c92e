"""The stage interface: ``Stage`` base class, typed ``Param`` declarations, ``StageContext``.

A stage implementation is a small class with a ``kind`` (the processing step, e.g.
``"inversion"``), a ``name`` (the method, e.g. ``"tkd"``), the artifacts it ``reads`` and
``writes``, and typed ``params``. Its :meth:`Stage.run` receives the named artifacts and the
validated parameters and returns new artifacts; the engine loads inputs, writes outputs, records
provenance and times each stage.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

from .errors import MissingArtifactError, ParameterError, UndeclaredArtifactError

#: the stage kinds the core knows, in processing order; plugins may add more
STAGE_KINDS: tuple[str, ...] = (
    "mask", "unwrap", "echo_combine", "background", "inversion", "reference", "register",
    "kspace_read", "undersample", "coil_maps", "recon",
)

#: which stage kind usually produces an artifact (for error messages)
PRODUCED_BY: dict[str, str] = {
    "mask": "mask", "unwrapped_phase": "unwrap", "total_field": "echo_combine",
    "noise_weight": "echo_combine", "local_field": "background", "chi": "inversion",
    "transforms": "register", "kspace": "kspace_read", "sampling_mask": "undersample",
    "maps": "coil_maps", "image": "recon", "quality": "unwrap", "reliable_mask": "mask",
    "phase_offset": "phase_offset",
}

#: the artifact through which a ``scope = "joint"`` stage sees every acquisition of a
#: multi-acquisition run (``inputs.orientations``): a list of per-acquisition artifact dicts,
#: the reference first
ACQUISITIONS = "orientations"

_TYPE_NAMES = {float: "float", int: "int", bool: "bool", str: "str", list: "list"}


@dataclass(frozen=True)
class Param:
    """A declared stage parameter.

    Parameters
    ----------
    name : str
        Name used in YAML (``params: {name: value}``).
    type : type
        ``float``, ``int``, ``bool``, ``str`` or ``list`` (then ``item_type`` gives the element type).
    default : Any
        Default value; ``None`` makes the parameter optional (``None`` is then accepted).
    unit : str
        Unit shown to users (``"ppm"``, ``"mm"``, ``"s"``, ``""``).
    range : (low, high) or None
        Inclusive bounds for numbers (each element for lists); ``None`` ends are open.
    choices : tuple or None
        Allowed values for strings.
    doc : str
        One-line description.
    item_type : type
        Element type for ``list`` parameters.
    aliases : tuple of str
        Old (deprecated) spellings of ``name`` that are still accepted: the value is used as if
        given under ``name`` and one ``deprecated`` line is printed on stderr.
    """

    name: str
    type: type
    default: Any
    unit: str = ""
    range: tuple | None = None
    choices: tuple | None = None
    doc: str = ""
    item_type: type = float
    aliases: tuple = ()

    @property
    def type_name(self) -> str:
        t = _TYPE_NAMES.get(self.type, getattr(self.type, "__name__", str(self.type)))
        if self.type is list:
            t = f"list[{_TYPE_NAMES.get(self.item_type, self.item_type.__name__)}]"
        return t

    def describe(self) -> str:
        """One line for ``qsmkit plugins``: name, type, default, unit, range, doc."""
        bits = [f"{self.name} ({self.type_name}) = {self.default!r}"]
        if self.unit:
            bits.append(f"[{self.unit}]")
        if self.range is not None:
            bits.append(f"range {list(self.range)}")
        if self.choices is not None:
            bits.append("one of " + "|".join(map(str, self.choices)))
        if self.doc:
            bits.append(f"- {self.doc}")
        if self.aliases:
            bits.append(f"(formerly {', '.join(self.aliases)})")
        return " ".join(bits)

    def _scalar(self, value: Any, typ: type, where: str) -> Any:
        if typ is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParameterError(f"{where}: expected a number, got {value!r}")
            value = float(value)
        elif typ is int:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                raise ParameterError(f"{where}: expected an integer, got {value!r}")
            value = int(value)
        elif typ is bool:
            if not isinstance(value, bool):
                raise ParameterError(f"{where}: expected true or false, got {value!r}")
        elif typ is str:
            if not isinstance(value, str):
                raise ParameterError(f"{where}: expected a string, got {value!r}")
        if self.range is not None and typ in (float, int):
            lo, hi = self.range
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ParameterError(
                    f"{where} = {value!r} is out of range [{lo}, {hi}]{' ' + self.unit if self.unit else ''}; "
                    f"choose a value inside it")
        if self.choices is not None and value not in self.choices:
            raise ParameterError(f"{where} = {value!r} is not allowed; choose one of {', '.join(map(str, self.choices))}")
        return value

    def validate(self, value: Any, where: str) -> Any:
        """Return ``value`` converted to the declared type, or raise :class:`ParameterError`."""
        if value is None:
            if self.default is None:
                return None
            raise ParameterError(f"{where} must not be empty; its default is {self.default!r}")
        if self.type is list:
            if not isinstance(value, (list, tuple)):
                value = [value]
            if not value:
                raise ParameterError(f"{where}: expected a non-empty list")
            return [self._scalar(v, self.item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return self._scalar(value, self.type, where)


#: attribute spellings for parameter names that are Python keywords (``p.lam`` is ``p["lambda"]``)
ATTRIBUTE_NAMES: dict[str, str] = {"lam": "lambda"}


def apply_aliases(given: dict[str, Any], decl: Mapping[str, Param], where: str) -> dict[str, Any]:
    """Rename deprecated parameter spellings in ``given`` to their current names (see
    :attr:`Param.aliases`), printing one ``deprecated`` line on stderr for each."""
    alias = {a: p.name for p in decl.values() for a in p.aliases}
    for old in [k for k in given if k not in decl and k in alias]:
        new = alias[old]
        if new in given:
            raise ParameterError(f"{where}: both '{old}' (its old spelling) and '{new}' are given; keep only '{new}'")
        print(f"qsmkit: deprecated: {where}.params.{old} is now spelled '{new}'; rename it "
              f"(the old spelling will stop working)", file=sys.stderr, flush=True)
        given[new] = given.pop(old)
    return given


class Params(Mapping):
    """Validated parameter values, readable as attributes (``p.threshold``, ``p.lam`` for the
    keyword ``lambda``) or items (``p["lambda"]``)."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name not in values and name in ATTRIBUTE_NAMES:
            name = ATTRIBUTE_NAMES[name]
        try:
            return values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Params({self._values!r})"


class StageContext(Mapping):
    """The named artifacts a stage sees, plus a ``log`` function for progress lines.

    ``ctx["mask"]`` raises :class:`MissingArtifactError` naming the stage kind that produces the
    missing artifact. Artifacts are :class:`qsmkit.volume.Volume` objects or plain values
    (``echo_times`` as a float array in s, ``field_strength`` in T, paths, dicts).
    """

    def __init__(self, artifacts: Mapping[str, Any], stage_label: str = "",
                 log: Callable[[str], None] | None = None, options: Mapping[str, Any] | None = None,
                 declared: Sequence[str] | None = None):
        self._art = artifacts
        self.stage_label = stage_label
        self._log = log
        #: run-wide options (e.g. ``device``) from the pipeline
        self.options = dict(options or {})
        #: artifact names the stage declared (reads + optional reads); None: no restriction
        self._declared = None if declared is None else frozenset(declared)
        #: metrics the stage reported with :meth:`report_metrics` (merged into ``metrics.json``)
        self.metrics: dict[str, Any] = {}

    def _check_declared(self, key: str) -> None:
        if self._declared is not None and key not in self._declared:
            raise UndeclaredArtifactError(
                f"stage {self.stage_label} reads '{key}', which it does not declare; add '{key}' to the stage "
                f"class's reads or optional_reads (declared: {', '.join(sorted(self._declared)) or 'none'})")

    def report_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Add entries (e.g. ``{"dip": {"iterations": 412}}``) to the run's ``metrics.json``."""
        self.metrics.update(metrics)

    def __getitem__(self, key: str) -> Any:
        self._check_declared(key)
        try:
            return self._art[key]
        except KeyError:
            src = PRODUCED_BY.get(key)
            hint = (f"add a '{src}' stage before it or give '{key}' under inputs"
                    if src else f"give '{key}' under inputs")
            raise MissingArtifactError(f"stage {self.stage_label} needs '{key}', which is not available; {hint}") from None

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self._check_declared(key)
        return key in self._art

    def get(self, key: str, default: Any = None) -> Any:
        self._check_declared(key)
        return self._art.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(k for k in self._art if self._declared is None or k in self._declared)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def optional_mask(self, shape: Sequence[int]) -> Any:
        """The ``mask`` artifact as a boolean array checked against the grid ``shape``, or ``None``
        when there is none (for stages that read a mask optionally); one-line errors for another
        grid or an empty mask."""
        import numpy as np

        from .errors import GeometryError, StageError

        if "mask" not in self:
            return None
        mask = np.asarray(self["mask"].data) > 0
        if mask.ndim == 4 and mask.shape[3] == 1:
            mask = mask[..., 0]
        if mask.shape != tuple(shape):
            raise GeometryError(f"mask grid {mask.shape} differs from the phase grid {tuple(shape)}; "
                                f"resample the mask onto the phase grid")
        if not mask.any():
            raise StageError(f"{self.stage_label}: the mask is empty; check the mask stage or the mask file")
        return mask

    def echo_times(self, n_echoes: int) -> Any:
        """``echo_times`` (float64 array, s) checked against ``n_echoes`` echoes (one-line errors)."""
        import numpy as np

        from .errors import InputDataError, UnitsError

        te = np.atleast_1d(np.asarray(self["echo_times"], dtype=np.float64))
        if te.size != n_echoes:
            raise InputDataError(f"{te.size} echo times were given for {n_echoes} echoes; give one echo time "
                                 f"per echo")
        if not np.all(np.isfinite(te)) or np.any(te <= 0):
            raise UnitsError(f"echo times must be positive seconds, got {te.tolist()}")
        if np.any(te > 1.0):
            raise UnitsError(f"echo times {te.tolist()} look like milliseconds; give them in seconds")
        return te

    def field_strength(self) -> float:
        """``field_strength`` (T), checked to be a positive number."""
        import math

        from .errors import UnitsError

        b0 = float(self["field_strength"])
        if not math.isfinite(b0) or b0 <= 0:
            raise UnitsError(f"field_strength must be a positive number of tesla, got {b0}")
        return b0

    def log(self, message: str) -> None:
        """Print a progress line for this stage (indented, to stderr)."""
        if self._log is not None:
            self._log(message)
        else:
            print(f"    {message}", file=sys.stderr, flush=True)


class Stage:
    """Base class of stage implementations (see module docstring and DESIGN.md §2).

    Subclasses set the class attributes and implement :meth:`run`.
    """

    #: processing step, one of :data:`STAGE_KINDS` or a plugin-defined kind
    kind: ClassVar[str] = ""
    #: method name used in YAML (``method: tkd``)
    name: ClassVar[str] = ""
    #: artifacts that must be available
    reads: ClassVar[Sequence[str]] = ()
    #: artifacts used when available
    optional_reads: ClassVar[Sequence[str]] = ()
    #: artifacts returned by :meth:`run`
    writes: ClassVar[Sequence[str]] = ()
    #: artifacts returned when the data allow (e.g. a reference image stored in the file)
    optional_writes: ClassVar[Sequence[str]] = ()
    #: declared parameters
    params: ClassVar[Sequence[Param]] = ()
    #: one-line description for ``qsmkit plugins``
    description: ClassVar[str] = ""
    #: in a run over several acquisitions: ``"each"`` runs once per acquisition (until the first
    #: joint stage), ``"joint"`` runs once and reads all of them as :data:`ACQUISITIONS`
    scope: ClassVar[str] = "each"
    #: the most CPU threads this stage's kernels use well (``1`` for small dense kernels that do not
    #: scale); ``None``: as many as :mod:`qsmkit.threads` decides for the run
    threads: ClassVar[int | None] = None

    def thread_limit(self, ctx: "StageContext | None", p: "Params | None") -> int | None:
        """The thread ceiling for this run of the stage (default :attr:`threads`); a stage whose
        scaling depends on the problem size overrides it. The engine applies it through
        :func:`qsmkit.threads.stage_threads`."""
        return self.threads

    @classmethod
    def param_map(cls) -> dict[str, Param]:
        """Declared parameters by name; every stage also accepts the shared ``device`` parameter
        (DESIGN §5), as :data:`qsmkit.params.CPU_DEVICE` when it does not declare its own."""
        decl = {p.name: p for p in cls.params}
        if "device" not in decl:
            from .params import CPU_DEVICE

            decl["device"] = CPU_DEVICE
        return decl

    @classmethod
    def validate_params(cls, given: Mapping[str, Any] | None, where: str) -> Params:
        """Validate user parameters against :attr:`params`; unknown names are an error."""
        decl = cls.param_map()
        given = apply_aliases(dict(given or {}), decl, where)
        unknown = sorted(set(given) - set(decl))
        if unknown:
            valid = ", ".join(decl) or "(none)"
            raise ParameterError(
                f"{where}: unknown parameter {', '.join(repr(u) for u in unknown)} for "
                f"{cls.kind} method '{cls.name}'; valid parameters: {valid}")
        values = {}
        for name, p in decl.items():
            values[name] = p.validate(given[name], f"{where}.params.{name}") if name in given else p.default
        return Params(values)

    @classmethod
    def check_inputs(cls, inputs: Mapping[str, Any], p: Params) -> None:
        """Validation-time check of the prepared ``inputs`` this stage will read (optional).

        Called by ``qsmkit validate`` and before a run, for every stage that will run: open a file's
        header (never its data) and raise a :class:`~qsmkit.errors.QsmkitError` for what :meth:`run`
        would refuse, so that validation and run agree. File inputs are :class:`pathlib.Path`.
        """

    def run(self, ctx: StageContext, p: Params) -> dict[str, Any]:  # pragma: no cover - interface
        """Compute this stage's artifacts from ``ctx`` and parameters ``p``; return ``{name: value}``."""
        raise NotImplementedError
