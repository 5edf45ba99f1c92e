"""Pipeline files: bounded, strict YAML loading and ``--set`` overrides.

A pipeline is read with a ``yaml.SafeLoader`` subclass that refuses what ``safe_load`` would
accept silently: duplicate keys in a mapping (the last one would win), documents larger than
:data:`MAX_BYTES`, and alias trees ("billion laughs") that expand to more than
:data:`MAX_NODES` nodes. Every problem is a one-line :class:`~qsmkit.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from ..errors import ConfigError

#: largest pipeline file read (bytes); pipelines are a few hundred bytes to a few kB
MAX_BYTES = 1 << 20
#: largest number of YAML nodes a document may expand to once aliases are followed
MAX_NODES = 100_000

TOP_KEYS = ("name", "description", "inputs", "stages", "output_dir", "device", "qc", "threads")
STAGE_KEYS = ("stage", "method", "params")


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate mapping keys."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                                  f"{seen[key] + 1}); YAML would silently keep the last one, remove one of them")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Number of nodes ``node`` expands to with aliases followed (stops counting past ``limit``)."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in memo:
            return memo[key]
        if key in active:  # a recursive alias: infinite expansion
            return limit + 1
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children: Iterable[yaml.Node] = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = ()
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(key)
        memo[key] = total
        return total

    return size(node)


def parse_yaml(text: str, where: str) -> Any:
    """Parse one YAML document strictly (see the module docstring); ``where`` names it in errors."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_BYTES // 1024} kB; a pipeline file is a short YAML mapping")
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            n = _expanded_size(node, MAX_NODES)
            if n > MAX_NODES:
                raise ConfigError(f"{where}: its aliases expand to more than {MAX_NODES} YAML nodes (an alias bomb?); "
                                  f"write the pipeline without nested aliases")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") if not str(exc).startswith(where) else exc from None
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise ConfigError(f"{where}: {tag.strip()}; pipelines are read with yaml.safe_load, which allows plain "
                          f"YAML only (remove the tag)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply; a pipeline is a flat mapping of a few levels") from None


def load_yaml(path: str | Path, what: str = "pipeline",
              shape: str = "a YAML mapping with 'inputs', 'stages' and 'output_dir'") -> dict:
    """Read a pipeline file (plain YAML only: python tags, duplicate keys and alias bombs are refused).

    ``what`` names the kind of file in errors (``"training config"`` for ``qsmkit train``) and
    ``shape`` says what its top level must be.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder; give a YAML {what} file")
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    if p.stat().st_size > MAX_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_BYTES // 1024} kB; a {what} file is a short YAML mapping")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file; give a YAML {what}") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror}); check its permissions") from None
    data = parse_yaml(text, str(p))
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a {what} must be {shape}")
    return data


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    word, choices = str(word), [str(c) for c in choices]
    inside = sorted((c for c in choices if len(c) > 2 and (c in word or word in c)), key=lambda c: -len(c))
    close = inside[:1] or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(mapping: Mapping, allowed: Sequence[str], where: str) -> None:
    """Refuse keys of ``mapping`` outside ``allowed``, suggesting the closest valid one."""
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{where}: unknown key {k!r}{did_you_mean(k, allowed)}; valid keys: {', '.join(allowed)}")


def apply_overrides(spec: dict, overrides: Sequence[str]) -> tuple[dict, set[str]]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML); returns (spec, overridden keys)."""
    spec = copy.deepcopy(spec)
    touched: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. stages.4.params.lambda=500")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw, f"--set {key}") if raw.strip() else ""
        except ConfigError as exc:
            if "not valid YAML" not in str(exc):
                raise
            value = raw
        parts = [k for k in key.strip().split(".") if k]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node: Any = spec
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ConfigError(f"--set {key}: '{here}' is not an index of a list of {len(node)} items")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:depth])}' is a value, not a mapping or list")
        touched.add(".".join(parts))
    return spec, touched
