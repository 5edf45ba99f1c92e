"""Multi-echo multi-coil 3D Cartesian GRE k-space: the ``qsmkit-gre`` HDF5 layout (reader and writer).

Layout (version 1; documented for users in ``docs/gre_kspace.md``):

========================  ==========================================  ====================================
name                      type / shape                                meaning
========================  ==========================================  ====================================
attr ``format``           str ``"qsmkit-gre"``                        identifies the layout (required)
attr ``version``          int ``1``                                   layout version (required)
attr ``field_strength``   float, T                                    B0 (required)
``kspace``                complex64 ``(echo, coil, kx, ky, kz)``      centred k-space (required)
``echo_times``            float64 ``(echo,)``, s                      strictly increasing (required)
``affine``                float64 ``(4, 4)``, mm                      voxel -> world of the image grid
attr ``voxel_size``       3 floats, mm                                instead of ``affine`` (centred grid)
``b0_direction``          float64 ``(3,)``                            B0 in world coordinates (default z)
``sampling_mask``         bool/uint8 ``(ky, kz)``                     1 = acquired (optional)
``noise``                 complex64 ``(coil, samples)``               noise-only samples (optional)
========================  ==========================================  ====================================

``kx`` is the readout (fully sampled); ``ky``, ``kz`` the phase encodings. The image of coil
``c`` at echo ``e`` is ``ifftnc(kspace[e, c], axes=(0, 1, 2))`` (centred orthonormal inverse
FFT, DC at ``N // 2``, :mod:`qsmkit.fft`), on the voxel grid ``(x, y, z)`` that ``affine`` maps
to world coordinates. Unsampled samples are 0. ``noise`` (e.g. a noise prescan) gives the coil
noise covariance used to prewhiten the data.

The reader is lazy: :class:`GreKSpace` (the ``kspace`` artifact of ``kspace_read/gre``) reads
one echo at a time. Every dataset's claimed shape is checked against the file and the memory
(:mod:`.h5limits`) before it is read; layout errors are one-line
:class:`~qsmkit.errors.InputDataError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qsmkit.errors import GeometryError, InputDataError, UnitsError

from .fastmri import H5Reader
from .h5limits import check_dataset, check_image_axes, check_memory

__all__ = ["GRE_FORMAT", "GRE_VERSION", "GreFile", "GreKSpace", "read_gre", "write_gre", "noise_whitener"]

GRE_FORMAT = "qsmkit-gre"
GRE_VERSION = 1


def _centred_affine(shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    vs = np.asarray(voxel_size, np.float64)
    A = np.diag(np.r_[vs, 1.0])
    A[:3, 3] = -vs * (np.asarray(shape[:3], np.float64) - 1) / 2.0
    return A


def noise_whitener(noise: np.ndarray) -> np.ndarray:
    """Prewhitening matrix ``W = L^-1`` (``Psi = L L^H``, the coil noise covariance) from noise samples.

    Parameters
    ----------
    noise : ndarray, complex, (coil, samples)
        Noise-only samples.

    Returns
    -------
    ndarray, complex64, (coil, coil)
        ``W`` with ``W Psi W^H = I``; apply as ``einsum("dc,c...->d...", W, k)``.
    """
    n = np.asarray(noise, np.complex128)
    psi = n @ n.conj().T / max(n.shape[1], 1)
    try:
        L = np.linalg.cholesky(psi)
    except np.linalg.LinAlgError:
        raise InputDataError("the noise samples give a singular coil noise covariance (a dead or duplicated coil?); "
                             "remove 'noise' from the file or set prewhiten: false") from None
    return np.linalg.inv(L).astype(np.complex64)


@dataclass
class GreKSpace:
    """Multi-echo multi-coil 3D k-space (the ``kspace`` artifact of ``kspace_read/gre``), read lazily.

    Attributes
    ----------
    shape : (echo, coil, kx, ky, kz)
    echo_times : ndarray, float64, s
    field_strength : float, T
    affine : ndarray (4, 4), voxel -> world, mm
    b0_world : ndarray (3,), unit B0 direction in world coordinates
    source : Path or None
        File the data come from (read one echo at a time); ``None`` with ``data`` in memory.
    data : ndarray or None
        In-memory k-space ``(echo, coil, kx, ky, kz)`` complex64 (instead of ``source``).
    sampling_mask : ndarray bool (ky, kz) or None
        Acquired phase encodings (applied on every read); ``None``: fully sampled.
    whitener : ndarray (coil, coil) or None
        Noise prewhitening matrix applied on every read (:func:`noise_whitener`).
    """

    shape: tuple
    echo_times: np.ndarray
    field_strength: float
    affine: np.ndarray
    b0_world: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    source: Path | None = None
    data: np.ndarray | None = None
    sampling_mask: np.ndarray | None = None
    whitener: np.ndarray | None = None

    @property
    def n_echoes(self) -> int:
        return int(self.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.shape[1])

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Image grid ``(x, y, z)``."""
        return tuple(int(s) for s in self.shape[2:])

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        from qsmkit.physics import voxel_sizes

        return tuple(float(v) for v in voxel_sizes(self.affine))

    @property
    def b0_direction(self) -> np.ndarray:
        """Unit B0 direction in the voxel frame (DESIGN §3)."""
        from qsmkit.physics import b0_direction_from_affine

        return b0_direction_from_affine(self.affine, self.b0_world)

    def with_mask(self, mask: np.ndarray | None) -> "GreKSpace":
        """A copy whose reads are multiplied by the ``(ky, kz)`` mask (combined with any earlier mask)."""
        if mask is not None:
            mask = np.asarray(mask, bool)
            if mask.shape != tuple(self.shape[3:]):
                raise GeometryError(f"sampling mask of shape {mask.shape} does not match the (ky, kz) = "
                                    f"{tuple(self.shape[3:])} phase encodings of the k-space")
            if self.sampling_mask is not None:
                mask = mask & self.sampling_mask
        return replace(self, sampling_mask=mask)

    def echo(self, e: int) -> np.ndarray:
        """k-space of echo ``e``: ``(coil, kx, ky, kz)`` complex64, masked and prewhitened."""
        if self.data is not None:
            k = np.array(self.data[int(e)], dtype=np.complex64)
        else:
            with GreFile(self.source) as f:
                k = f.read_echo(int(e))
        if self.whitener is not None:
            C = k.shape[0]
            k = (self.whitener @ k.reshape(C, -1)).reshape(k.shape).astype(np.complex64)
        if self.sampling_mask is not None:
            k *= self.sampling_mask[None, None]
        return k

    def __repr__(self) -> str:
        return (f"GreKSpace(shape={tuple(self.shape)}, echo_times={np.round(self.echo_times, 5).tolist()}, "
                f"B0={self.field_strength:g} T, voxel_size={tuple(round(v, 3) for v in self.voxel_size)}, "
                f"mask={'none' if self.sampling_mask is None else f'{self.sampling_mask.mean():.2f}'})")


class GreFile(H5Reader):
    """A ``qsmkit-gre`` file opened for lazy reading of single echoes (see the module docstring)."""

    what = "GRE k-space file"

    def _attr(self, name: str):
        v = self._f.attrs.get(name)
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        return v

    def _dataset(self, name: str, required: bool = False):
        import h5py

        f, fn = self._f, self.path.name
        if name not in f:
            if required:
                have = ", ".join(sorted(f.keys())) or "nothing"
                raise InputDataError(f"{fn} has no '{name}' dataset (it holds {have}); see docs/gre_kspace.md "
                                     f"for the qsmkit-gre layout")
            return None
        if not isinstance(f[name], h5py.Dataset):
            raise InputDataError(f"{fn}: '{name}' is a group, not a dataset; see docs/gre_kspace.md")
        check_dataset(f[name], self.path, name)
        return f[name]

    def _validate(self) -> None:
        fn = self.path.name
        fmt = self._attr("format")
        if fmt != GRE_FORMAT:
            hint = (" (a fastMRI or skm-tea file? use method: fastmri / skmtea)" if "kspace" in self._f else "")
            raise InputDataError(f"{fn} is not a qsmkit-gre file: attribute 'format' is {fmt!r}, expected "
                                 f"'{GRE_FORMAT}'{hint}; see docs/gre_kspace.md")
        ver = self._attr("version")
        if ver is None or int(ver) != GRE_VERSION:
            raise InputDataError(f"{fn}: qsmkit-gre version {ver!r} is not supported (this reader reads version "
                                 f"{GRE_VERSION})")
        ks = self._dataset("kspace", required=True)
        if ks.dtype.kind != "c":
            raise InputDataError(f"{fn}: kspace has dtype {ks.dtype}; it must be complex (complex64)")
        if ks.ndim != 5:
            raise InputDataError(f"{fn}: kspace has shape {ks.shape}; the qsmkit-gre layout is (echo, coil, kx, ky, kz)"
                                 f" (a single echo or coil keeps its axis of length 1)")
        E, C, X, Y, Z = (int(s) for s in ks.shape)
        check_image_axes(self.path, "kspace", ks.shape, "(echo, coil, kx, ky, kz)", min(X, Y), Z)
        te_ds = self._dataset("echo_times")
        if te_ds is None:
            raise InputDataError(f"{fn} has no 'echo_times' dataset; add the {E} echo times in seconds "
                                 f"(float64, shape ({E},))")
        te = np.atleast_1d(np.asarray(te_ds[()], np.float64))
        if te.ndim != 1 or te.size != E:
            raise InputDataError(f"{fn}: echo_times has {te.size} values but kspace has {E} echoes; give one echo "
                                 f"time per echo")
        if not np.all(np.isfinite(te)) or np.any(te <= 0):
            raise UnitsError(f"{fn}: echo_times must be positive seconds, got {te.tolist()}")
        if np.max(te) > 1.0:
            raise UnitsError(f"{fn}: echo_times {te.tolist()} look like milliseconds; store them in seconds")
        if te.size > 1 and np.any(np.diff(te) <= 0):
            raise InputDataError(f"{fn}: echo_times must increase strictly, got {te.tolist()}")
        b0 = self._attr("field_strength")
        try:
            b0 = float(b0)
        except (TypeError, ValueError):
            raise InputDataError(f"{fn} has no numeric 'field_strength' attribute; add it in tesla (e.g. 3.0)") from None
        if not 0.05 <= b0 <= 21.1:
            raise UnitsError(f"{fn}: field_strength = {b0:g} T is outside 0.05-21.1 T; store it in tesla")
        self.shape = (E, C, X, Y, Z)
        self.echo_times, self.field_strength = te, b0
        self.affine = self._read_affine()
        self.b0_world = self._read_b0()
        self.sampling_mask = self._read_mask()
        self.noise = self._read_noise()

    def _read_affine(self) -> np.ndarray:
        fn = self.path.name
        ds = self._dataset("affine")
        if ds is not None:
            A = np.asarray(ds[()], np.float64)
            if A.shape != (4, 4) or not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:3, :3])) < 1e-9:
                raise InputDataError(f"{fn}: affine must be a finite, invertible 4x4 voxel-to-world matrix (mm), "
                                     f"got shape {A.shape}")
            return A
        vs = self._attr("voxel_size")
        if vs is None:
            raise InputDataError(f"{fn} has neither an 'affine' dataset nor a 'voxel_size' attribute; add one "
                                 f"(mm) so that the outputs have their geometry")
        vs = np.atleast_1d(np.asarray(vs, np.float64))
        if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
            raise InputDataError(f"{fn}: voxel_size must be 3 positive values in mm, got {vs.tolist()}")
        return _centred_affine(self.shape[2:], vs)

    def _read_b0(self) -> np.ndarray:
        ds = self._dataset("b0_direction")
        if ds is None:
            return np.array([0.0, 0.0, 1.0])
        b = np.asarray(ds[()], np.float64).ravel()
        if b.shape != (3,) or not np.all(np.isfinite(b)) or np.linalg.norm(b) == 0:
            raise InputDataError(f"{self.path.name}: b0_direction must be a non-zero 3-vector (world), got {b.tolist()}")
        return b / np.linalg.norm(b)

    def _read_mask(self) -> np.ndarray | None:
        ds = self._dataset("sampling_mask")
        if ds is None:
            return None
        m = np.asarray(ds[()])
        if m.shape != tuple(self.shape[3:]):
            raise GeometryError(f"{self.path.name}: sampling_mask has shape {m.shape}; expected (ky, kz) = "
                                f"{tuple(self.shape[3:])} to match kspace {self.shape}")
        m = m != 0
        if not m.any():
            raise InputDataError(f"{self.path.name}: sampling_mask samples nothing; fix or remove it")
        return m

    def _read_noise(self) -> np.ndarray | None:
        ds = self._dataset("noise")
        if ds is None:
            return None
        if ds.ndim != 2 or ds.dtype.kind != "c":
            raise InputDataError(f"{self.path.name}: noise has shape {ds.shape} {ds.dtype}; expected complex "
                                 f"(coil, samples)")
        if int(ds.shape[0]) != self.shape[1]:
            raise InputDataError(f"{self.path.name}: noise has {ds.shape[0]} coils but kspace has {self.shape[1]}; "
                                 f"the noise samples must come from the same coils, in the same order")
        return np.asarray(ds[()], np.complex64)

    def read_echo(self, e: int) -> np.ndarray:
        """``(coil, kx, ky, kz)`` complex64 of echo ``e``."""
        E, C, X, Y, Z = self.shape
        check_memory(C * X * Y * Z * 8 * 2, self.path, f"one echo of kspace {self.shape}", 1)
        try:
            return np.asarray(self._f["kspace"][int(e)], dtype=np.complex64)
        except (OSError, RuntimeError) as exc:
            raise InputDataError(f"{self.path.name}: cannot read kspace echo {e} ({str(exc).splitlines()[0][:80]}); "
                                 f"the file is corrupt") from None


def read_gre(path: str | Path, prewhiten: bool = True, apply_mask: bool = True) -> GreKSpace:
    """Open a ``qsmkit-gre`` file as a lazy :class:`GreKSpace` (header checked, no k-space read yet).

    Parameters
    ----------
    path : str or Path
        The ``.h5`` file.
    prewhiten : bool
        Prewhiten the coils with the file's ``noise`` samples (when it has them).
    apply_mask : bool
        Apply the file's ``sampling_mask`` on every read (when it has one).
    """
    with GreFile(path) as f:
        whit = noise_whitener(f.noise) if (prewhiten and f.noise is not None) else None
        return GreKSpace(shape=f.shape, echo_times=f.echo_times, field_strength=f.field_strength, affine=f.affine,
                         b0_world=f.b0_world, source=Path(path),
                         sampling_mask=f.sampling_mask if apply_mask else None, whitener=whit)


def write_gre(path: str | Path, kspace: np.ndarray, echo_times: Sequence[float], field_strength: float,
              affine: np.ndarray, b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
              sampling_mask: np.ndarray | None = None, noise: np.ndarray | None = None,
              attrs: dict[str, Any] | None = None) -> Path:
    """Write a ``qsmkit-gre`` file atomically (see the module docstring for the layout).

    Parameters
    ----------
    kspace : ndarray, complex, (echo, coil, kx, ky, kz)
    echo_times : floats, s
    field_strength : float, T
    affine : (4, 4) voxel -> world, mm
    b0_direction : 3 floats, world frame
    sampling_mask : (ky, kz) bool or None
    noise : (coil, samples) complex or None
    attrs : extra file attributes (e.g. ``generated_by``)
    """
    import h5py

    from qsmkit.io.atomic import atomic_path

    k = np.asarray(kspace)
    if k.ndim != 5:
        raise InputDataError(f"write_gre: kspace must be (echo, coil, kx, ky, kz), got shape {k.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = GRE_FORMAT
            f.attrs["version"] = GRE_VERSION
            f.attrs["field_strength"] = float(field_strength)
            for key, val in (attrs or {}).items():
                f.attrs[key] = val
            f.create_dataset("kspace", data=k.astype(np.complex64), chunks=(1, 1) + k.shape[2:])
            f.create_dataset("echo_times", data=np.asarray(echo_times, np.float64))
            f.create_dataset("affine", data=np.asarray(affine, np.float64))
            f.create_dataset("b0_direction", data=np.asarray(b0_direction, np.float64))
            if sampling_mask is not None:
                f.create_dataset("sampling_mask", data=np.asarray(sampling_mask, np.uint8))
            if noise is not None:
                f.create_dataset("noise", data=np.asarray(noise, np.complex64))
    return path
