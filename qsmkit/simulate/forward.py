"""The forward model of the numerical head phantom: fine grid, fields, complex signal and noise.

Each step is a function :func:`~qsmkit.simulate.simulate_phantom` calls in order (see
:mod:`qsmkit.simulate` for the physics): :func:`_tissue_tables` (per-label chi, M0, R2*),
:func:`_fine_grid` (labels and phase offset on the ``oversample`` times finer grid),
:func:`_fields` (dipole fields by the core :class:`~qsmkit.operators.Dipole`, block-averaged
truth), :func:`_signal` (multi-echo complex signal, block-averaged), :func:`_output_labels`
(labels and brain mask at the output voxel centres) and :func:`_add_noise`.
"""

from __future__ import annotations

import numpy as np

from .. import fft as _fft
from ..errors import ParameterError
from ..operators import Dipole, block_mean
from ..physics import GAMMA_BAR
from .acquisition import _Acquisition
from .head import _MASK_BIT, CHI_AIR, HAEMATOMA_TISSUE, LABELS, TISSUES, _Head


def _field_from_chi(chi_fine: np.ndarray, dipole: Dipole) -> np.ndarray:
    """Field (ppm, float32) of ``chi_fine`` (ppm) by the core dipole convolution (zero-padded, half spectrum)."""
    return dipole.apply(chi_fine)


def _tissue_tables(chi_overrides, field_strength, haemorrhage: bool = False):
    """``(tissues, chi_lut, m0_lut, r2_lut, in_brain)``: per-tissue values with the overrides, and
    look-up tables over the internal label code (label | ``_MASK_BIT`` inside the brain mask).

    With ``haemorrhage`` the ``haemorrhage`` tissue takes :data:`~.head.HAEMATOMA_TISSUE` (before
    ``chi_overrides``, which still win)."""
    tissues = dict(TISSUES)
    if haemorrhage:
        tissues["haemorrhage"] = HAEMATOMA_TISSUE
    for name, val in (chi_overrides or {}).items():
        if name not in tissues:
            raise ParameterError(f"simulate: unknown tissue {name!r} in chi_overrides; known: {', '.join(tissues)}")
        tissues[name] = (float(val),) + tissues[name][1:]
    chi_lut = np.zeros(256, np.float32)
    m0_lut = np.zeros(256, np.float32)
    r2_lut = np.zeros(256, np.float32)
    for k, name in LABELS.items():
        c, m0, t2 = tissues[name]
        for code in (k, k | int(_MASK_BIT)):
            chi_lut[code], m0_lut[code] = c, m0
            r2_lut[code] = 1.0 / (t2 * 1e-3) * (float(field_strength) / 3.0)
    in_brain = np.zeros(256, bool)
    in_brain[int(_MASK_BIT):] = True
    return tissues, chi_lut, m0_lut, r2_lut, in_brain


class _Sampler:
    """Labels (and phi0) of the head at voxel-index coordinates of the acquisition grid."""

    def __init__(self, head: _Head, acq: _Acquisition):
        A, S, R = acq.A, acq.S, acq.R
        self.head = head
        # world -> head frame (u units): u = diag(1/S) R^T (A[:3,:3] i + A[:3,3] - c)
        self.M = np.diag(1.0 / S) @ R.T @ A[:3, :3]
        self.t0 = np.diag(1.0 / S) @ R.T @ (A[:3, 3] - acq.center)

    def __call__(self, idx0: np.ndarray, idx1: np.ndarray, idx2: np.ndarray, want_phi0: bool):
        """Labels (and phi0) at voxel-index coordinates given per axis (outer grid)."""
        M, t0 = self.M, self.t0
        g0, g1, g2 = np.meshgrid(idx0.astype(np.float32), idx1.astype(np.float32), idx2.astype(np.float32),
                                 indexing="ij", copy=False)
        pts = [None, None, None]
        for r in range(3):
            pts[r] = (np.float32(M[r, 0]) * g0 + np.float32(M[r, 1]) * g1 + np.float32(M[r, 2]) * g2
                      + np.float32(t0[r])).ravel()
        lab = self.head.labels(*pts).reshape(g0.shape)
        phi = self.head.phi0(*pts).reshape(g0.shape) if want_phi0 else None
        return lab, phi


def _fine_grid(sample: _Sampler, shape, os_: int, chunk_voxels: int):
    """Labels and phi0 on the ``os_`` times finer grid, in slabs: ``(labels_f, phi0_f, step)``."""
    fshape = tuple(s * os_ for s in shape)
    fine_idx = [((np.arange(n) + 0.5) / os_ - 0.5) for n in fshape]   # in output voxel indices
    labels_f = np.empty(fshape, np.uint8)
    phi0_f = np.empty(fshape, np.float32)
    per_slice = fshape[1] * fshape[2]
    step = max(os_, (max(1, chunk_voxels // per_slice) // os_) * os_)
    for a in range(0, fshape[0], step):
        b = min(a + step, fshape[0])
        labels_f[a:b], phi0_f[a:b] = sample(fine_idx[0][a:b], fine_idx[1], fine_idx[2], True)
    return labels_f, phi0_f, step


def _fields(labels_f, phi0_f, chi_lut, in_brain, vs, os_: int, b_vox, padding):
    """Fine-grid fields and their block means: ``(chi_truth, local_out, total_f, total_out,
    phi0_out, pshape)`` (``total_f`` stays on the fine grid for the signal)."""
    fshape = labels_f.shape
    pshape = _fft.padded_shape(fshape, padding)
    vs_f = vs / os_
    dipole = Dipole(fshape, vs_f, b_vox, fft_shape=pshape)
    chi_f = chi_lut[labels_f]
    chi_f *= in_brain[labels_f]
    local_f = _field_from_chi(chi_f, dipole)
    chi_truth = block_mean(chi_f, os_)
    del chi_f
    # background sources: the head relative to the surrounding air (chi - CHI_AIR) minus the
    # referenced chi inside the mask, which is the local part: total = D * (chi - CHI_AIR) over
    # the head. Inside the mask that leaves -CHI_AIR, a uniform block whose field is harmonic
    # inside the mask (its sources sit on the mask surface).
    chi_bg = chi_lut[labels_f] - np.float32(CHI_AIR)
    chi_bg[in_brain[labels_f]] = -np.float32(CHI_AIR)
    total_f = _field_from_chi(chi_bg, dipole)
    del chi_bg, dipole
    total_f += local_f
    local_out = block_mean(local_f, os_)
    del local_f
    total_out = block_mean(total_f, os_)
    phi0_out = block_mean(phi0_f, os_)
    return chi_truth, local_out, total_f, total_out, phi0_out, pshape


def _cis(ph: np.ndarray) -> np.ndarray:
    """``exp(i ph)`` as complex64."""
    z = np.empty(ph.shape, np.complex64)
    np.cos(ph, out=z.real)
    np.sin(ph, out=z.imag)
    return z


def _signal(labels_f, total_f, phi0_f, m0_lut, r2_lut, te, field_strength, shape, os_: int, step: int):
    """Block-averaged complex multi-echo signal ``(x, y, z, echo)`` (complex64), slab by slab.

    S_e = M0 exp(-R2* TE_e) exp(i (phi0 + omega f TE_e)), block-averaged as a complex signal.
    With equally spaced echoes exp(i omega f TE_e) is built by the recurrence z_e = z_{e-1} dz.
    """
    fshape = labels_f.shape
    omega = 2.0 * np.pi * GAMMA_BAR * float(field_strength) * 1e-6          # rad/s per ppm
    ne = te.size
    sig = np.empty(shape + (ne,), np.complex64)
    amp_luts = [(m0_lut * np.exp(-r2_lut * t)).astype(np.float32) for t in te]
    dte = np.diff(te)
    uniform = ne > 1 and bool(np.allclose(dte, dte[0], rtol=1e-9, atol=1e-12))
    for a in range(0, fshape[0], step):
        b = min(a + step, fshape[0])
        lab, fld, p0 = labels_f[a:b], total_f[a:b], phi0_f[a:b]
        if uniform:
            z = _cis(fld * np.float32(omega * te[0]) + p0)
            dz = _cis(fld * np.float32(omega * dte[0]))
        for e, t in enumerate(te):
            if uniform:
                if e:
                    z *= dz
            else:
                z = _cis(fld * np.float32(omega * t) + p0)
            sig[a // os_:b // os_, :, :, e] = block_mean(amp_luts[e][lab] * z, os_)
    return sig


def bipolar_phase(shape, bipolar: float) -> np.ndarray:
    """Phase (rad, float32, shape ``(N0, 1, 1)``) that a bipolar readout adds to the even echoes.

    ``delta(i) = bipolar * (1 + xi_i)`` with ``xi_i = (i - (N0 - 1) / 2) / N0`` the readout
    position (first voxel axis, ``i`` its index) as a fraction of the FOV, in [-0.5, 0.5): a
    constant ``bipolar`` plus a linear ramp of ``bipolar`` rad across the readout FOV (gradient
    delays shift the echo in k-space, which is a linear phase along readout in the image).
    """
    n0 = int(shape[0])
    xi = (np.arange(n0, dtype=np.float64) - (n0 - 1) / 2.0) / n0
    return (float(bipolar) * (1.0 + xi)).astype(np.float32).reshape(n0, 1, 1)


def _apply_bipolar(sig: np.ndarray, delta: np.ndarray) -> None:
    """Multiply the even echoes (2nd, 4th, ...: 0-based index 1, 3, ...) by ``exp(i delta)`` in place."""
    rot = _cis(np.broadcast_to(delta, sig.shape[:3]).astype(np.float32))
    for e in range(1, sig.shape[-1], 2):
        sig[..., e] *= rot


def _output_labels(sample: _Sampler, shape, chunk_voxels: int, in_brain):
    """Analytic labels (without the mask bit) and the brain mask at the output voxel centres."""
    labels_out = np.empty(shape, np.uint8)
    step_o = max(1, chunk_voxels // (shape[1] * shape[2]))
    out_idx = [np.arange(n, dtype=np.float64) for n in shape]
    for a in range(0, shape[0], step_o):
        b = min(a + step_o, shape[0])
        labels_out[a:b], _ = sample(out_idx[0][a:b], out_idx[1], out_idx[2], False)
    mask = in_brain[labels_out]
    labels_out &= np.uint8(0x7F)
    return labels_out, mask


def _add_noise(sig, mask, snr_val, seed: int):
    """Add complex Gaussian noise (in place) and split: ``(magnitude, phase in [-pi, pi), sigma)``."""
    sigma = 0.0
    if snr_val is not None:
        mean1 = float(np.abs(sig[..., 0])[mask].mean()) if mask.any() else float(np.abs(sig[..., 0]).mean())
        sigma = mean1 / snr_val
        rng = np.random.default_rng(seed)
        for e in range(sig.shape[-1]):
            n = rng.standard_normal((2,) + sig.shape[:-1], dtype=np.float32)
            sig[..., e].real += sigma * n[0]
            sig[..., e].imag += sigma * n[1]
    mag = np.abs(sig).astype(np.float32)
    phase = np.angle(sig).astype(np.float32)
    phase[phase >= np.float32(np.pi)] -= np.float32(2 * np.pi)
    return mag, phase, sigma
