"""qsmkit: quantitative susceptibility mapping and k-space reconstruction from a YAML pipeline.

Public API for plugins: :class:`Stage`, :class:`Param`, :class:`Volume`, :data:`hookimpl`.
Importing qsmkit does not import torch, SimpleITK or h5py.
"""

from .errors import QsmkitError
from .hookspecs import hookimpl
from .stage import Param, Params, Stage, StageContext
from .volume import Volume

try:
    from importlib.metadata import version as _version

    __version__ = _version("qsmkit")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Param", "Params", "QsmkitError", "Stage", "StageContext", "Volume", "hookimpl", "__version__"]
