"""Total field inversion solved by ADMM with closed-form updates (``inversion/tfi``, ``solver: admm``).

The same total-field model as :mod:`qsmkit_tfi.tfi` (Liu et al., MRM 78 (2017) 303): one
susceptibility map of brain and background fitted to the TOTAL field, the air around the head
fixed at ``chi_air``, an edge-weighted (magnitude) L1 gradient prior. Here it is solved to
convergence by ADMM with variable splitting, as TV-ADMM (Bilgic et al., MRM 72 (2014) 1444) and
FANSI (Milovic et al., MRM 80 (2018) 814) solve the local-field problem, instead of by
preconditioned Gauss-Newton / CG, whose result depends on where it stops. Problem (ppm;
``f`` total field, ``f_air = -chi_air D 1_support``, ``w`` data weight, ``c`` field offset)::

    min_chi  1/2 || w (D chi + f_air + c - f) ||^2  +  (1 / Lam) sum_k || k_b G_k d_k chi ||_1

with ``Lam = 2 lambda s_p`` as in the Gauss-Newton solver (the same ``lambda`` means the same
weight), ``G_k`` the binary edge mask of the magnitude (:func:`~qsmkit_tfi.tfi.edge_mask`),
``d_k`` forward differences in 1/mm and ``k_b`` = 1 in the brain mask and ``background_tv``
elsewhere (default 1: one prior over the whole support, as the paper).
The data term is the quadratic one (the exponent form of the Gauss-Newton solver guards against
phase wraps; a total field in ppm has none).

Splits ``y = D chi`` (penalty ``rho_data``) and ``z = d chi`` (penalty ``rho``): the chi-update is
one k-space division on the (periodic) work grid, ``(rho_data D^2 + rho |E|^2) X = rho_data D
F(y - v) + rho F(d^T (z - u))`` (:func:`~qsmkit.operators.laplacian_kernel` is ``|E|^2``), the
y-update is pointwise (``w^2``-weighted), the z-update a soft threshold at ``k_b G_k / (Lam rho)``.
Two FFT pairs per iteration, whatever the conditioning: no preconditioner is needed.

The field offset ``c`` (B0 offset, unwrapping constant; ``offset``): a number (ppm) when it is
known (a simulated total field: 0); ``"search"`` (default, :func:`_search_offset`): the offset
whose map has the least total variation inside the brain, found on a grid around the joint fit;
or ``"fit"``: re-estimated after every chi-update as the ``w^2``-weighted mean of ``f - f_air -
D chi``. The joint fit is poorly determined: a near-constant field in the head can be made by
background sources as well, and the TV prior prefers the free constant, so it ends 0.06-0.14 ppm
below the truth on the simulator's heads and the map is then much worse; the brain-TV criterion
picks the offset where chi is best to within one search step on every head measured.

Measured (true total field, chi NRMSE over the brain mask, both demeaned there; the simulator's
head with ``oversample=1``; defaults, 300 iterations, 2 cores; ``benchmarks/bench_inversion.py``
rows ``tfi_admm`` (offset 0), ``tfi_admm_search`` (default) and ``tfi_admm_fit``; Gauss-Newton TFI
and PDF + MEDI as measured in :mod:`qsmkit_tfi.tfi`)::

    phantom                offset searched        offset 0           offset fit   Gauss-Newton     PDF + MEDI
    64^3 at 2.5 mm          9.3 % (13 s, -0.047)  10.5 % (3.2 s)     39.3 %       17.0 % (78 s)    47.0 %
    90x108x90 at 2 mm       9.1 % (+0.017)         9.6 % (8.3 s)     34.7 %       35.2 % (40 s)
    112x128x96 at 1.5 mm    7.2 % (76 s, -0.067)   8.0 % (16 s)      106 %        23.4 % (105 s)   46.3 %
    180x216x180 at 1 mm     9.7 % (426 s, +0.012)  8.9 % (78 s,      57.2 %       41.6 % (767 s)   34.8 %
                                                   1.7 GB peak)

MEDI from the TRUE local field gives 8.5 / 9.6 / 15.5 % on the 2.5 / 1.5 / 1 mm heads. The
searched offset is not 0: the simulator's field and this model differ by a near-constant (their
FFT grids and paddings differ), which the search finds and a "known" 0 does not. On the
two-compartment phantom of ``tests/plugins/test_tfi.py`` (40^3 at 3 mm, its field offset 0.05 ppm
on its own grid): searched 1.4 %, given 0.05 ppm 49 %, Gauss-Newton 30 %, PDF + MEDI 41 %.
``rho_data`` 0.3 converged 3-10x slower.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from qsmkit.errors import InputDataError
from qsmkit.operators import Dipole, Gradient, laplacian_kernel, padded_box

from .tfi import AIR_PADDING, CHI_AIR, TfiResult, _checked_inputs, edge_mask, phase_scale

#: ADMM penalty of the data split (dimensionless; data weights have mean 1 in the brain).
#: 0.3 (TV-ADMM's) converges 3-10x slower here: the background has to build up 9 ppm sources
RHO_DATA = 0.03
#: the gradient split's penalty is this multiple of the TV weight (Bilgic 2014, QSM.jl)
RHO_SCALE = 100.0
#: TV weight outside the brain mask relative to inside: 1 = the paper's one prior over the support
#: (offset 0, 300 iterations: 10.5 / 9.6 / 8.0 % NRMSE on the 2.5 / 2 / 1.5 mm heads, against
#: 14.6 / 17.8 / 8.7 % with 2 and 6.4 / 6.3 / 13.0 % with 0.5)
BACKGROUND_TV = 1.0


def tfi_admm(total_field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float],
             support: np.ndarray | None = None, magnitude: np.ndarray | None = None,
             noise_weight: np.ndarray | None = None, *, lam: float = 1000.0, edge_percentage: float = 0.9,
             background_tv: float = BACKGROUND_TV, offset: float | str = "search",
             field_strength: float | None = None, echo_times: Sequence[float] | None = None,
             max_iter: int = 300, search_iter: int = 150, tol: float = 0.0, rho_data: float = RHO_DATA, margin_mm: float = 10.0,
             chi_air: float = CHI_AIR, device=None, log: Callable[[str], None] | None = None,
             callback: Callable[[int, np.ndarray], None] | None = None) -> TfiResult:
    """Total field inversion by ADMM: chi of brain and background from the total field.

    Parameters
    ----------
    total_field, mask, voxel_size, b0_dir, support, magnitude, noise_weight
        As :func:`qsmkit_tfi.tfi.tfi`: total field (ppm), brain mask, voxel size (mm), B0
        direction, optional support (head) mask, magnitude (edge mask; default support), noise
        weight (1/ppm; else the magnitude).
    lam : float
        Data weight ``lambda`` (MEDI toolbox scale, as the Gauss-Newton solver).
    edge_percentage : float
        Edge mask size (:func:`~qsmkit_tfi.tfi.edge_mask`); 0 = plain TV.
    background_tv : float
        TV weight outside the brain mask relative to inside it.
    offset : float, "search" or "fit"
        Field offset of the total field in ppm when known; ``"search"`` (default): the offset whose
        map has the least TV in the brain (:func:`_search_offset`); ``"fit"``: the joint fit (biased).
    field_strength, echo_times : optional
        B0 (T) and echo times (s): the phase scale ``s_p`` in ``Lam`` (3 T, 5 ms when not given).
    max_iter : int
        ADMM iterations of the final solve.
    search_iter : int
        ADMM iterations of the joint fit and of each candidate offset of ``offset: "search"``.
    tol : float
        Stop early when ``||chi_k - chi_{k-1}|| / ||chi_k|| < tol`` (checked every 10 iterations;
        0 = run ``max_iter``).
    rho_data : float
        ADMM penalty of the data split.
    margin_mm : float
        Air around the support's bounding box in the work grid (mm).
    chi_air : float
        Susceptibility (ppm) of the air around the head relative to tissue (0: no air term).
    device : torch.device or str, optional
        Torch device (default CPU).
    log : callable, optional
        Receives progress lines.
    callback : callable, optional
        ``callback(iteration, chi)`` every 10 iterations with the current chi on the input grid
        (ppm, not yet masked or referenced).

    Returns
    -------
    TfiResult
        ``chi`` (float32, ppm, zero outside the support, brain mean 0); ``n_iter``, ``converged``,
        ``update`` (relative chi change every 10 iterations) and ``offsets`` (ppm).
    """
    import torch

    say = log or (lambda msg: None)
    named = isinstance(offset, str)
    if named and offset not in ("fit", "search"):
        raise InputDataError(f"tfi: offset must be a number (ppm), 'fit' or 'search', got {offset!r}")
    if lam <= 0 or rho_data <= 0 or background_tv <= 0:
        raise InputDataError(f"tfi: lambda, rho_data and background_tv must be > 0, got {lam}, {rho_data}, "
                             f"{background_tv}")
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    vs = tuple(float(v) for v in voxel_size)
    f, brain, sup, derived, mag, w, data = _checked_inputs(total_field, mask, support, magnitude, noise_weight,
                                                           vs, edge_percentage)
    pb = padded_box(sup, [int(np.ceil(margin_mm / v)) for v in vs])
    sup_w, brain_w, data_w = pb.embed(sup, bool), pb.embed(brain, bool), pb.embed(data, bool)
    ft = pb.embed(np.where(data, f, np.float32(0)))
    if chi_air != 0:   # the air around the head, fixed; its field is taken out of the data
        f_air = Dipole(pb.shape, vs, b0_dir, padding=AIR_PADDING).apply(sup_w.astype(np.float32))
        ft -= np.where(data_w, np.float32(-chi_air) * f_air, np.float32(0))
        del f_air
    s_p, s_note = phase_scale(field_strength, echo_times)
    inv_lam = 1.0 / (2.0 * float(lam) * s_p)
    rho = RHO_SCALE * inv_lam
    gm = edge_mask(pb.embed(mag) if mag is not None else sup_w, sup_w, vs,
                   edge_percentage if mag is not None else 0.0).astype(np.float32)
    gm *= np.where(brain_w, np.float32(1.0), np.float32(background_tv))[None]
    gm *= np.float32(inv_lam / rho)
    say(f"work grid {pb.shape} (support {int(sup.sum())} voxels{', from the magnitude' if derived else ''}, "
        f"data {int(data.sum())}, brain {int(brain.sum())}); ADMM, background TV x{background_tv:g}, "
        f"offset {offset if named else f'{float(offset):g} ppm'}; phase scale {s_note}")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)  # noqa: E731
    res = TfiResult(chi=np.zeros(f.shape, np.float32), support=sup, phase_scale=s_p, work_shape=pb.shape)
    args = (t(ft), t(pb.embed(w) ** 2), t(gm), pb.shape, vs, b0_dir, dev)
    solve = lambda c, n, r, cb=None: _admm(*args, r, rho=rho, rho_data=rho_data, offset=c, max_iter=n,  # noqa: E731
                                           tol=float(tol), say=say, callback=cb)
    if offset == "search":
        offset, res.offset_search = _search_offset(solve, t(brain_w), pb.shape, vs, int(search_iter), say)
    x = solve(None if offset == "fit" else float(offset), int(max_iter), res,
              None if callback is None else (lambda it, xx: callback(it, pb.uncrop(xx.cpu().numpy()))))
    chi_w = x.cpu().numpy()
    res.chi_unmasked = pb.uncrop(chi_w)
    chi_w -= np.float32(chi_w[brain_w].mean())
    res.chi = pb.uncrop(np.where(sup_w, chi_w, np.float32(0)))
    res.seconds = time.perf_counter() - t0
    return res


#: offsets tried by ``offset: search``, relative to the jointly fitted one (ppm): the joint fit ends
#: 0.06-0.14 ppm below the truth on the simulator's heads (the TV prior prefers the free constant)
SEARCH_STEPS = (-0.08, -0.04, 0.0, 0.04, 0.08, 0.12, 0.16)


def _search_offset(solve, brain, shape, vs, n_iter, say) -> tuple[float, list]:
    """``offset: search``: the field offset whose map has the least total variation in the brain.

    A joint fit (``n_iter`` iterations) gives ``c_fit``; maps for ``c_fit + SEARCH_STEPS`` (each
    ``n_iter`` iterations from zero) are scored by ``sum_brain |d chi|_1``; a parabola through the
    best grid point and its neighbours refines it. Measured: the minimum of this score is where
    chi NRMSE is lowest on the simulator's 2.5 / 2 / 1.5 mm heads, to within one 0.02-0.04 ppm step.
    Returns ``(offset, [(offset, score), ...])``.
    """
    import torch

    grad = Gradient(shape, None if all(v == 1.0 for v in vs) else vs)
    res = TfiResult(chi=np.zeros(0, np.float32), support=np.zeros(0, bool))
    solve(None, n_iter, res)
    c_fit = res.offsets[-1]
    scored = []
    for step in SEARCH_STEPS:
        x = solve(c_fit + step, n_iter, TfiResult(chi=np.zeros(0, np.float32), support=np.zeros(0, bool)))
        score = float(torch.sum(grad.apply(x).abs_().sum(0) * brain, dtype=torch.float64))
        scored.append((c_fit + step, score))
        say(f"offset search: {c_fit + step:.4g} ppm, brain TV {score:.6g}")
    i = int(np.argmin([sc for _, sc in scored]))
    best = scored[i][0]
    if 0 < i < len(scored) - 1:   # vertex of the parabola through the best point and its neighbours
        (c0, s0), (c1, s1), (c2, s2) = scored[i - 1:i + 2]
        den = s0 - 2 * s1 + s2
        if den > 0:
            best = c1 + 0.5 * (c1 - c0) * (s0 - s2) / den
    say(f"offset search: jointly fitted {c_fit:.4g} ppm, chosen {best:.4g} ppm")
    return float(best), scored


def _admm(ft, w2, thr, shape, vs, b0_dir, dev, res: TfiResult, *, rho, rho_data, offset, max_iter, tol, say,
          callback):
    """The ADMM iterations on the work grid (torch); returns chi. ``thr`` the soft thresholds (3, ...)."""
    import torch

    dims = (-3, -2, -1)
    dip = Dipole(shape, vs, b0_dir, padding=1.0, device=dev)      # periodic on the work grid
    d = dip.kernel
    grad = Gradient(shape, None if all(v == 1.0 for v in vs) else vs)
    denom = rho_data * d * d + rho * torch.from_numpy(laplacian_kernel(shape, vs)).to(dev)
    denom[0, 0, 0] = 1.0                 # D(0) = E(0) = 0: the mean of chi is free; keep it at 0
    a_grad = rho / denom
    a_data = rho_data * d / denom
    del denom
    wdiv = 1.0 / (w2 + rho_data)
    sw2 = float(torch.sum(w2, dtype=torch.float64))
    wmean = lambda a: float(torch.sum(w2 * a, dtype=torch.float64)) / sw2  # noqa: E731
    c = wmean(ft) if offset is None else offset      # start: the data's own mean (offset-equivariant)
    x = torch.zeros(shape, device=dev)
    y = torch.where(w2 > 0, ft - c, 0.0)             # y ~ D chi, started at the data (0 where none)
    v = torch.zeros_like(x)
    u = torch.zeros((3,) + tuple(shape), device=dev)
    z = torch.zeros_like(u)
    tmp = torch.empty_like(u)
    neg_thr = -thr
    x_prev = None
    for k in range(1, max_iter + 1):
        # chi-update: one k-space division
        spec = torch.fft.rfftn(grad.adjoint(torch.sub(z, u, out=tmp)), dim=dims).mul_(a_grad)
        spec.addcmul_(torch.fft.rfftn(y.sub_(v), dim=dims), a_data)
        x = torch.fft.irfftn(spec, s=shape, dim=dims)
        dx = torch.fft.irfftn(spec.mul_(d), s=shape, dim=dims)       # D chi
        del spec
        if offset is None:
            c = wmean(ft - dx)
        # y-update (pointwise, weighted) and its dual: y = (w^2 (f - c) + rho_d (D chi + v)) / (w^2 + rho_d)
        dx += v
        y = torch.addcmul(dx * rho_data, w2, ft - c).mul_(wdiv)
        v = dx.sub_(y)
        # z-update (soft threshold per gradient component) and its dual
        u += grad.apply(x, out=tmp)
        torch.clamp(u, neg_thr, thr, out=tmp)
        torch.sub(u, tmp, out=z)
        u, tmp = tmp, u
        if k % 10 == 0 or k == max_iter:
            upd = 0.0 if x_prev is None else float(torch.linalg.vector_norm(x - x_prev)
                                                    / torch.clamp(torch.linalg.vector_norm(x), min=1e-30))
            x_prev = x.clone()
            res.update.append(upd)
            res.offsets.append(c)
            res.n_iter = k
            say(f"ADMM {k}/{max_iter}: offset {c:.4g} ppm, relative chi change over 10 iterations {upd:.3g}")
            if callback is not None:
                callback(k, x)
            if tol > 0 and 0 < upd < tol:
                res.converged = True
                break
    return x
