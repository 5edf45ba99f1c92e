"""ESPIRiT coil sensitivity estimation (Uecker et al., MRM 71:990, 2014) in torch.

Per slice:

1. The calibration region (a fully sampled centre box, ``calib`` samples, shrunk to what the
   sampling mask really acquired) gives a block-Hankel calibration matrix of all
   ``kernel x kernel`` patches of all coils.
2. Its right singular vectors with ``sigma_i / sigma_0 > sqrt(threshold)`` span the signal
   subspace (BART's ``ecalib -t`` convention, default 0.001); the projector onto it is a set of
   k-space convolution kernels ``h[c, c', d]`` with lags ``|d| < kernel``.
3. In image space the projection is a pointwise ``C x C`` Hermitian matrix
   ``G(x) = sum_d h[d] exp(2 pi i d.x / N)`` (evaluated exactly on the full grid with
   two small DFT matrices, the band-limited interpolation BART does with ``sinc_zeropad``).
   The coil sensitivities are its eigenvectors with eigenvalue ~1.
4. Power iteration (started from the low-resolution calibration image, so few iterations are
   needed) gives the dominant eigenvector and eigenvalue per voxel; a second map (``maps=2``)
   comes from the deflated matrix. ``G`` is built and iterated in chunks of image rows; after
   3 iterations, voxels whose eigenvalue estimate is below half the crop level (they will be
   cropped: ``||G v|| <= lambda_max``) are left out of the remaining iterations, which stop
   when the eigenvalues of the kept voxels change by less than ``tol``. Maps are phase-referenced to the first principal component
   of the calibration data (as BART's ``rotphase``) and set to zero where the eigenvalue is at
   or below ``crop`` (hard, BART default 0.8) or weighted by BART's soft S-curve.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from qsmkit.device import resolve_device
from qsmkit.errors import InputDataError, ParameterError
from qsmkit.threads import limited

from .masks import fully_sampled_center

__all__ = ["espirit_maps", "espirit_slice", "calibration_region"]

#: power iterations used per map by the last :func:`espirit_slice` call (diagnostics)
last_iterations: list[int] = []


def calibration_region(shape: Sequence[int], calib: Sequence[int], mask: np.ndarray | None,
                       kernel: int, kspace: np.ndarray | None = None) -> tuple[int, int]:
    """Calibration box size: ``calib`` shrunk to the fully sampled centre of the mask (or data)."""
    H, W = int(shape[0]), int(shape[1])
    ch, cw = min(int(calib[0]), H), min(int(calib[1]), W)
    if mask is None and kspace is not None:
        mask = np.abs(kspace).reshape(-1, H, W).sum(0) > 0
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim == 3:
            m = m.all(axis=0)
        fh, fw = fully_sampled_center(m, (H, W), max_size=(ch, cw))
        ch, cw = min(ch, fh), min(cw, fw)
    if ch < kernel + 1 or cw < kernel + 1:
        raise InputDataError(
            f"ESPIRiT needs a fully sampled k-space centre of at least {kernel + 1}x{kernel + 1} samples for a "
            f"{kernel}x{kernel} kernel, but only {ch}x{cw} is sampled; sample a larger centre (center_fractions / "
            f"calib) or use a smaller kernel")
    return ch, cw


def _power(G, v, lam, prev, prev_eigs, iterations: int, tol: float, crop: float):
    """Power iteration ``v <- G v / ||G v||`` (deflated by earlier maps); stops when the eigenvalues of
    the voxels above ``crop`` change by less than ``tol``. Returns ``(v, lam, iterations run)``."""
    import torch

    it = 0
    for it in range(1, iterations + 1):
        w = torch.einsum("ncd,nd->nc", G, v)
        for pv, pl in zip(prev, prev_eigs):
            w = w - pl.reshape(-1, 1) * pv * (pv.conj() * v).sum(-1, keepdim=True)
        lam_new = _norm(w)
        v = w / lam_new.clamp_min(1e-30).unsqueeze(-1)
        kept = lam_new > crop
        change = float((lam_new - lam).abs()[kept].max()) if bool(kept.any()) else 0.0
        lam = lam_new
        if change < tol:
            break
    return v, lam, it


def _norm(v):
    """Euclidean norm over the last axis of a complex tensor (real arithmetic; fast on CPU)."""
    import torch

    return torch.view_as_real(v).square().sum(dim=(-1, -2)).sqrt()


def _scurve(x):
    import torch

    return torch.where(x <= -1, torch.zeros_like(x),
                       torch.where(x >= 1, torch.ones_like(x), 0.5 * (1.0 + 2.0 * x / (1.0 + x * x))))


def espirit_slice(ksp, calib: tuple[int, int], kernel: int = 6, threshold: float = 0.001, crop: float = 0.8,
                  n_maps: int = 1, iterations: int = 30, tol: float = 1e-4, softcrop: bool = False):
    """ESPIRiT maps of one slice.

    Parameters
    ----------
    ksp : torch.Tensor, complex64, (C, H, W)
        Multi-coil k-space, DC at ``(H // 2, W // 2)``.
    calib : (int, int)
        Calibration box size (fully sampled).
    kernel : int
        Kernel width in samples.
    threshold : float
        Signal-subspace threshold: keep singular vectors with ``sigma_i / sigma_0 > sqrt(threshold)``.
    crop : float
        Eigenvalue threshold: maps are zero where the eigenvalue ``<= crop``.
    n_maps : int
        1 or 2 sets of maps.
    iterations : int
        Maximum power iterations per map.
    tol : float
        Stop when no eigenvalue changed by more than ``tol`` in an iteration.
    softcrop : bool
        BART's soft S-curve weighting instead of the hard crop.

    Returns
    -------
    (maps, eigenvalues) : torch.Tensor ``(n_maps, C, H, W)`` complex64, ``(n_maps, H, W)`` float32
    """
    C, H, W = ksp.shape
    ch, cw = calib
    h0, w0 = H // 2 - ch // 2, W // 2 - cw // 2
    cal = ksp[:, h0:h0 + ch, w0:w0 + cw]
    hh_t, lags = _calibration_kernels(cal, int(kernel), threshold)
    E1, E2 = _lag_phases(H, lags), _lag_phases(W, lags)
    v0_all, ref = _start_vectors(ksp, cal, h0, w0)
    vecs, eigs = _eigenvectors(E1, E2, hh_t, v0_all, n_maps, iterations, tol, crop, softcrop)
    return _referenced_maps(vecs, eigs, ref, crop, softcrop, (C, H, W))


def _calibration_kernels(cal, k: int, threshold: float):
    """The signal-subspace projector of the calibration data ``cal`` (C, ch, cw) as k-space kernels:
    ``(hh_t, lags)`` with ``hh_t[d1, d2]`` the ``C x C`` kernel (flattened) at lags ``(d1, d2)``, ascending
    from ``-(k - 1)`` to ``k - 1``."""
    import torch

    C = cal.shape[0]
    # block-Hankel calibration matrix: rows = patches, columns = (coil, ky, kx) of a patch
    patches = cal.unfold(1, k, 1).unfold(2, k, 1)  # (C, nh, nw, k, k)
    A = patches.permute(1, 2, 0, 3, 4).reshape(-1, C * k * k)
    with limited(1):  # small dense LAPACK: threads only add overhead
        _, s, vh = torch.linalg.svd(A, full_matrices=False)
    if float(s[0]) <= 0:
        raise InputDataError("ESPIRiT: the calibration region holds no signal (all zero); check the k-space centre")
    n_keep = int((s / s[0] > float(np.sqrt(threshold))).sum())
    Wk = vh[:n_keep].reshape(n_keep, C, k, k)
    # kernels h[c, c', d] = 1/k^2 sum_kern sum_p W[c, p] conj(W[c', p - d]) via FFT correlation
    L = 2 * k
    Fk = torch.fft.fft2(Wk, s=(L, L))
    Hh = torch.einsum("kcxy,kdxy->cdxy", Fk, Fk.conj())
    h = torch.fft.ifft2(Hh) / (k * k)  # lag d at index d mod L
    lags = torch.arange(-(k - 1), k, device=cal.device)
    hh = h[:, :, lags % L][:, :, :, lags % L]  # (C, C, D, D), lags ascending
    return hh.permute(2, 3, 0, 1).reshape(hh.shape[2], hh.shape[3], C * C), lags  # (D, D, C*C)


def _lag_phases(n: int, lags):
    """``exp(2 pi i x d / n)`` for the centred grid positions ``x`` of an axis of ``n`` and the ``lags``
    ``d``: ``(n, D)`` complex64 (the exact band-limited evaluation of the kernels on the grid)."""
    import torch

    x = torch.arange(n, device=lags.device, dtype=torch.float64) - n // 2
    return torch.exp(2j * np.pi * torch.outer(x, lags.to(torch.float64)) / n).to(torch.complex64)


def _start_vectors(ksp, cal, h0: int, w0: int):
    """``(v0, ref)``: the low-resolution coil images of the calibration data ``(H * W, C)`` (where the
    power iteration starts) and the first principal component of the calibration data (phase reference),
    its phase fixed so that its largest entry is real and positive: a singular vector's phase is
    arbitrary and differs between LAPACK and cuSOLVER, so without this the maps would differ by a
    per-slice phase between CPU and CUDA."""
    import torch

    from .transforms import ifft2c

    C, H, W = ksp.shape
    ch, cw = cal.shape[1:]
    low = torch.zeros((C, H, W), dtype=torch.complex64, device=ksp.device)
    low[:, h0:h0 + ch, w0:w0 + cw] = cal
    v0_all = ifft2c(low).reshape(C, -1).T.contiguous()  # (N, C)
    with limited(1):
        u, _, _ = torch.linalg.svd(cal.reshape(C, -1), full_matrices=False)
    ref = u[:, 0]
    top = ref[torch.argmax(ref.abs())]
    return v0_all, ref * (top.conj() / top.abs().clamp_min(1e-30))


def _eigenvectors(E1, E2, hh_t, v0_all, n_maps: int, iterations: int, tol: float, crop: float, softcrop: bool):
    """Dominant eigenvectors and eigenvalues of the pointwise matrices ``G(x)`` by power iteration, in
    chunks of image rows: ``(vectors, eigenvalues)``, one ``(H * W, C)`` and ``(H * W,)`` per map."""
    import torch

    H, W, C = E1.shape[0], E2.shape[0], v0_all.shape[1]
    # voxels whose eigenvalue is clearly below the crop after a few iterations are cropped anyway
    # (||G v|| <= lambda_max): the remaining iterations only run on the others
    screen = 0.5 * crop if not softcrop else 0.5 * max(2 * crop - 1, 0.0) ** 2
    prev_all = [torch.empty_like(v0_all) for _ in range(int(n_maps))]
    eigs_all = [torch.empty(H * W, device=v0_all.device) for _ in range(int(n_maps))]
    # rows of the image in chunks of about 64 MB of matrices (cache and memory friendly)
    rows = max(1, int(64e6 // (W * C * C * 8)))
    iters_used = [0] * int(n_maps)
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        T = torch.einsum("ad,dfp->afp", E1[r0:r1], hh_t)  # (hc, D, C*C): sum over the first lag
        G = torch.matmul(E2, T).reshape(-1, C, C)  # (hc * W, C, C), pointwise matrices of the chunk
        del T
        sl = slice(r0 * W, r1 * W)
        prev, eigs = [], []
        for m in range(int(n_maps)):
            v0 = v0_all[sl]
            v = v0.clone() if m == 0 else torch.randn_like(v0)
            for pv in prev:  # orthogonalise the start against the previous maps
                v = v - pv * (pv.conj() * v).sum(-1, keepdim=True)
            v = v / _norm(v).clamp_min(1e-30).unsqueeze(-1)
            lam = torch.zeros(v.shape[0], device=v.device)
            n_screen = min(3, max(int(iterations), 1))
            v, lam, n1 = _power(G, v, lam, prev, eigs, n_screen, -1.0, crop)
            idx = torch.nonzero(lam > screen).squeeze(-1)
            n2 = 0
            if idx.numel() and int(iterations) > n_screen:
                va, la, n2 = _power(G[idx], v[idx], lam[idx], [pv[idx] for pv in prev], [pl[idx] for pl in eigs],
                                    int(iterations) - n_screen, tol, crop)
                v[idx], lam[idx] = va, la
            iters_used[m] = max(iters_used[m], n1 + n2)
            prev.append(v)
            eigs.append(lam)
            prev_all[m][sl] = v
            eigs_all[m][sl] = lam
        del G
    last_iterations[:] = iters_used
    return prev_all, eigs_all


def _referenced_maps(vecs, eigs, ref, crop: float, softcrop: bool, shape):
    """Maps phase-referenced to ``ref`` and cropped (or soft-weighted) by their eigenvalues:
    ``(n_maps, C, H, W)`` complex64 and ``(n_maps, H, W)`` float32."""
    import torch

    C, H, W = shape
    out_maps, out_eigs = [], []
    for v, lam in zip(vecs, eigs):
        r = (ref.conj() * v).sum(-1, keepdim=True)
        v = v * (r.conj() / r.abs().clamp_min(1e-30))
        if softcrop:
            wgt = _scurve((lam.sqrt() - crop) / (1.0 - crop)) if crop < 1 else (lam > crop).float()
        else:
            wgt = (lam > crop).float()
        v = v * wgt.unsqueeze(-1)
        out_maps.append(v.T.reshape(C, H, W))
        out_eigs.append(lam.reshape(H, W).float())
    return torch.stack(out_maps).to(torch.complex64), torch.stack(out_eigs)


def espirit_maps(kspace: np.ndarray, mask: np.ndarray | None = None, calib: Sequence[int] = (24, 24),
                 kernel: int = 6, threshold: float = 0.001, crop: float = 0.8, n_maps: int = 1,
                 iterations: int = 30, tol: float = 1e-4, softcrop: bool = False, device="cpu",
                 log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ESPIRiT maps of every slice of multi-coil k-space.

    Parameters
    ----------
    kspace : ndarray, complex, (S, C, H, W)
        Multi-coil k-space (unsampled points zero), DC at ``(H // 2, W // 2)``.
    mask : ndarray or None
        Sampling mask broadcastable to ``(H, W)``; the calibration box is shrunk to its fully
        sampled centre (default: derived from the non-zero samples of the data).
    calib : (int, int)
        Requested calibration box (BART default 24 x 24).
    kernel, threshold, crop, n_maps, iterations, tol, softcrop
        See :func:`espirit_slice` (BART defaults: 6, 0.001, 0.8, 1 map).
    device : torch.device or str
        Device to compute on (anything :func:`qsmkit.device.resolve_device` accepts; default CPU).

    Returns
    -------
    (maps, eigenvalues)
        ``(S, n_maps, C, H, W)`` complex64 (unit norm over coils inside the crop) and
        ``(S, n_maps, H, W)`` float32.
    """
    import torch

    if kspace.ndim != 4:
        raise InputDataError(f"ESPIRiT needs multi-coil k-space (slices, coils, H, W), got shape {kspace.shape}")
    S, C, H, W = kspace.shape
    if n_maps not in (1, 2):
        raise ParameterError(f"maps = {n_maps}; ESPIRiT here computes 1 or 2 sets of maps")
    if n_maps > C:
        raise ParameterError(f"maps = {n_maps} but the data has only {C} coil(s)")
    dev = resolve_device(device)
    cal = calibration_region((H, W), calib, mask, kernel, kspace=kspace[0] if mask is None else None)
    if log and tuple(cal) != (min(calib[0], H), min(calib[1], W)):
        log(f"ESPIRiT calibration region shrunk to the fully sampled {cal[0]}x{cal[1]} centre")
    maps = np.empty((S, n_maps, C, H, W), dtype=np.complex64)
    eigs = np.empty((S, n_maps, H, W), dtype=np.float32)
    for s in range(S):
        ks = torch.from_numpy(np.ascontiguousarray(kspace[s])).to(torch.complex64).to(dev)
        mp, ev = espirit_slice(ks, cal, kernel, threshold, crop, n_maps, iterations, tol, softcrop)
        maps[s] = mp.cpu().numpy()
        eigs[s] = ev.cpu().numpy()
    return maps, eigs
