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
weight), ``G_k`` the binary edge mask of the magnitude (:func:`qsmkit.operators.gradient_mask`),
``d_k`` forward differences in 1/mm and ``k_b`` = 1 in the brain mask and ``background_tv``
elsewhere (default 0.05: the background must stay free, see :data:`BACKGROUND_TV`).
The data term is the quadratic one (the exponent form of the Gauss-Newton solver guards against
phase wraps; a total field in ppm has none).

Splits ``y = D chi`` (penalty ``rho_data``) and ``z = d chi`` (penalty ``rho``): the chi-update is
one k-space division on the (periodic) work grid, ``(rho_data D^2 + rho |E|^2) X = rho_data D
F(y - v) + rho F(d^T (z - u))`` (:func:`~qsmkit.operators.laplacian_kernel` is ``|E|^2``), the
y-update is pointwise (``w^2``-weighted), the z-update a soft threshold at ``k_b G_k / (Lam rho)``.
Two FFT pairs per iteration, whatever the conditioning: no preconditioner is needed.

Coarse to fine (``coarse_mm``, default 2 mm): inputs finer than half of it (1 mm data) are
block-averaged to about 2 mm (:func:`_coarsen`), solved there from zero (8x fewer voxels), and
every ADMM variable is interpolated to the input grid (:func:`_prolong`) to start ``refine_iter``
(150) iterations there. At 1 mm: 14.6 % in 59 s, against 15.2 % in 78 s for 300 iterations on the
1 mm grid alone.

The field offset ``c`` (B0 offset, unwrapping constant; ``offset``): ``"fit"`` (default):
re-estimated after every chi-update as the ``w^2``-weighted mean of ``f - f_air - D chi``; a
number (ppm) when it is known; or ``"search"`` (:func:`_search_offset`): the offset whose map has
the least total variation inside the brain, on a grid around the joint fit (2.5-5x slower).
With ``background_tv`` 1 the joint fit was biased (0.06-0.14 ppm low: the TV prior on the
background preferred the free constant) and the offset had to be searched; with the default 0.05
the map hardly depends on it (default phantom: 26.9 % fitted, 29.3 % at 0, 26.6 % searched; the
two-compartment phantom's 0.05 ppm is fitted as 0.051).

Measured (true total field, chi NRMSE over the brain mask, both demeaned there; the simulator's
head at its default oversampling 2; 2 cores; ``benchmarks/bench_inversion.py`` rows
``tfi_admm`` (default), ``tfi_admm_zero`` (offset 0), ``tfi_admm_search``, ``tfi`` (Gauss-Newton),
``pdf_medi``, ``medi_hf`` (MEDI from the harmonic-free local field: the limit of every background
method that removes harmonic fields) and ``medi`` (from the TRUE local field))::

    phantom                 ADMM (default)   offset 0   searched         Gauss-Newton    PDF+MEDI  harmonic-free  true local
    90x108x90 at 2 mm       37.3 % (9 s)     37.6 %                      55.8 % (46 s)   54.2 %    48.4 %         14.4 %
    112x128x96 at 1.5 mm    26.9 % (17 s)    29.3 %     26.6 % (86 s)    47.2 % (48 s)   66.7 %    54.5 %         15.4 %
    180x216x180 at 1 mm     14.6 % (59 s,    14.7 %     14.6 % (144 s)                   45.6 %    68.5 %         15.1 %
                            1.8 GB peak)

At 2.5 mm (64^3) TFI is worse than the two-step methods (75 % against PDF + MEDI 51 %): 80 % of
its squared error is in the brain mask's outer voxel layer, where the simulator's truth is the
brain's share of a voxel that also holds bone, scalp or sinus, and TFI, which models the whole
voxel, returns the mixture. The coarser the voxels, the larger that layer. With ``oversample=1``
(the head sampled on the inversion's own grid, an inverse crime) the maps look 2-5x better (7-10 %
with ``background_tv`` 1 and the offset searched): measure on oversampled heads. On the
two-compartment phantom of ``tests/plugins/test_tfi.py`` (40^3 at 3 mm): 2.4 % (fitted), 2.8 %
(searched), Gauss-Newton 30 %, PDF + MEDI 41 %. ``rho_data`` 0.3 converged 3-10x slower.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from qsmkit.errors import InputDataError
from qsmkit.operators import Dipole, Gradient, PaddedBox, block_mean, gradient_mask, laplacian_kernel, padded_box
from qsmkit.physics import phase_scale

from .tfi import AIR_PADDING, CHI_AIR, TfiResult, _checked_inputs

#: ADMM penalty of the data split (dimensionless; data weights have mean 1 in the brain).
#: 0.3 (TV-ADMM's) converges 3-10x slower here: the background has to build up 9 ppm sources
RHO_DATA = 0.03
#: the gradient split's penalty is this multiple of the TV weight (Bilgic 2014, QSM.jl)
RHO_SCALE = 100.0
#: TV weight outside the brain mask relative to inside. Low: the background (bone, sinus and scalp
#: partial volumes of 10 ppm contrasts) must be free to take what a sampled dipole model of a head
#: with sub-voxel boundaries needs. Default phantom (1.5 mm, oversample 2), fitted offset, 300
#: iterations: 61.4 % chi NRMSE with 1, 35.5 % with 0.3, 27.2 % with 0.1, 26.9 % with 0.05, 26.7 %
#: with 0.03 (with 1 the result also depends on the offset, which then has to be searched)
BACKGROUND_TV = 0.05
#: voxel size (mm) of the coarse level (a first solve, and the offset search) for inputs of half of it or finer
COARSE_MM = 2.0


def tfi_admm(total_field: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], b0_dir: Sequence[float],
             support: np.ndarray | None = None, magnitude: np.ndarray | None = None,
             noise_weight: np.ndarray | None = None, *, lam: float = 1000.0, edge_percentage: float = 0.9,
             background_tv: float = BACKGROUND_TV, offset: float | str = "fit",
             field_strength: float | None = None, echo_times: Sequence[float] | None = None,
             max_iter: int = 300, coarse_mm: float = COARSE_MM, refine_iter: int = 150, search_iter: int = 150,
             tol: float = 0.0, rho_data: float = RHO_DATA, margin_mm: float = 10.0,
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
        Edge mask size (:func:`qsmkit.operators.gradient_mask`); 0 = plain TV.
    background_tv : float
        TV weight outside the brain mask relative to inside it.
    offset : float, "fit" or "search"
        Field offset of the total field in ppm when known; ``"fit"`` (default): fitted jointly;
        ``"search"``: the offset whose map has the least TV in the brain (:func:`_search_offset`).
    field_strength, echo_times : optional
        B0 (T) and echo times (s): the phase scale ``s_p`` in ``Lam`` (3 T, 5 ms when not given).
    max_iter : int
        ADMM iterations of a solve from zero: on the coarse level when there is one, else on the
        input grid.
    coarse_mm : float
        Voxel size (mm) of the coarse level. Where the input voxels are at most half of it, the
        inputs are block-averaged by ``floor(coarse_mm / voxel)`` per axis (:func:`_coarsen`), the
        model is solved there (``max_iter``; the offset searched there too), and the solve on the
        input grid starts from that solution (:func:`_prolong`, ``refine_iter``). 0: one level.
    refine_iter : int
        ADMM iterations on the input grid after the coarse level.
    search_iter : int
        ADMM iterations of the joint fit and of each candidate offset of ``offset: "search"`` (on
        the coarse level when there is one).
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
        ``callback(iteration, chi)`` every 10 iterations on the input grid with its current chi
        (ppm, not yet masked or referenced).

    Returns
    -------
    TfiResult
        ``chi`` (float32, ppm, zero outside the support, brain mean 0); ``n_iter`` (on the input
        grid), ``converged``, ``update`` (relative chi change every 10 iterations), ``offsets``
        (ppm) and ``offset_search``.
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
    s_p, s_note = phase_scale(field_strength, echo_times)
    inv_lam = 1.0 / (2.0 * float(lam) * s_p)
    rho = RHO_SCALE * inv_lam
    build = lambda arrays, h: _Level.build(*arrays, h, b0_dir, edge_percentage=edge_percentage,  # noqa: E731
                                           background_tv=background_tv, chi_air=chi_air, margin_mm=margin_mm,
                                           thr_scale=inv_lam / rho, dev=dev)
    fine = build((f, brain, sup, mag, w, data), vs)
    factor = tuple(max(1, int(np.floor(coarse_mm / v + 1e-6))) if coarse_mm > 0 else 1 for v in vs)
    say(f"work grid {fine.pb.shape} (support {int(sup.sum())} voxels{', from the magnitude' if derived else ''}, "
        f"data {int(data.sum())}, brain {int(brain.sum())}); ADMM, background TV x{background_tv:g}, "
        f"offset {offset if named else f'{float(offset):g} ppm'}; phase scale {s_note}")
    res = TfiResult(chi=np.zeros(f.shape, np.float32), support=sup, phase_scale=s_p, work_shape=fine.pb.shape)
    solver = lambda lev: (lambda c, n, r, cb=None, start=None: _admm(  # noqa: E731
        lev, b0_dir, r, rho=rho, rho_data=rho_data, offset=c, max_iter=n, tol=float(tol), say=say, callback=cb,
        start=start))
    start = None
    if max(factor) > 1:
        coarse = build(_coarsen(f, brain, sup, mag, w, data, factor), tuple(v * k for v, k in zip(vs, factor)))
        say(f"coarse level: inputs averaged over {'x'.join(map(str, factor))} voxels, work grid {coarse.pb.shape}")
        if offset == "search":
            offset, res.offset_search = _search_offset(solver(coarse), coarse, int(search_iter), say)
        state = solver(coarse)(None if offset == "fit" else float(offset), int(max_iter),
                               TfiResult(chi=np.zeros(0, np.float32), support=np.zeros(0, bool)))
        start, n_fine = _prolong(state, coarse, fine, factor), int(refine_iter)
        del state, coarse
    else:
        n_fine = int(max_iter)
        if offset == "search":
            offset, res.offset_search = _search_offset(solver(fine), fine, int(search_iter), say)
    x = solver(fine)(None if offset == "fit" else float(offset), n_fine, res,
                     None if callback is None else (lambda it, xx: callback(it, fine.pb.uncrop(xx.cpu().numpy()))),
                     start).x
    chi_w = x.cpu().numpy()
    res.chi_unmasked = fine.pb.uncrop(chi_w)
    chi_w -= np.float32(chi_w[fine.brain_w].mean())
    res.chi = fine.pb.uncrop(np.where(fine.sup_w, chi_w, np.float32(0)))
    res.seconds = time.perf_counter() - t0
    return res


@dataclass
class _Level:
    """One grid of the solve: its work box and the tensors the iterations read."""

    pb: PaddedBox
    vs: tuple
    ft: object        # total field minus the air's, 0 where there are no data (ppm)
    w2: object        # squared data weights
    thr: object       # soft thresholds of the gradient split (3, ...)
    brain: object     # brain mask (float 0/1)
    brain_w: np.ndarray
    sup_w: np.ndarray

    @classmethod
    def build(cls, f, brain, sup, mag, w, data, vs, b0_dir, *, edge_percentage, background_tv, chi_air, margin_mm,
              thr_scale, dev) -> "_Level":
        import torch

        pb = padded_box(sup, [int(np.ceil(margin_mm / v)) for v in vs])
        sup_w, brain_w, data_w = pb.embed(sup, bool), pb.embed(brain, bool), pb.embed(data, bool)
        ft = pb.embed(np.where(data, f, np.float32(0)))
        if chi_air != 0:   # the air around the head, fixed; its field is taken out of the data
            f_air = Dipole(pb.shape, vs, b0_dir, padding=AIR_PADDING).apply(sup_w.astype(np.float32))
            ft -= np.where(data_w, np.float32(-chi_air) * f_air, np.float32(0))
            del f_air
        gm = gradient_mask(pb.embed(mag) if mag is not None else sup_w, sup_w, vs,
                           edge_percentage if mag is not None else 0.0).astype(np.float32)
        gm *= np.where(brain_w, np.float32(1.0), np.float32(background_tv))[None]
        gm *= np.float32(thr_scale)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)  # noqa: E731
        return cls(pb, tuple(vs), t(ft), t(pb.embed(w) ** 2), t(gm), t(brain_w), brain_w, sup_w)


def _coarsen(f, brain, sup, mag, w, data, factor):
    """The inputs block-averaged over ``factor`` voxels per axis (the coarse level of :func:`tfi_admm`).

    Blocks of :func:`~qsmkit.operators.block_mean` (partial blocks at the grid's end dropped). The
    field is the ``w^2``-weighted mean over the block's data voxels, ``w^2`` the block mean
    (the data term keeps its weight per unit volume, as the TV term does: gradients are in 1/mm);
    masks are the voxels at least half covered (the support also every brain voxel).
    """
    w2 = np.where(data, w * w, np.float32(0))
    w2_c = block_mean(w2, factor)
    wf_c = block_mean(w2 * np.where(data, f, np.float32(0)), factor)
    f_c = np.where(w2_c > 0, wf_c / np.where(w2_c > 0, w2_c, 1.0), 0.0)
    brain_c = block_mean(brain, factor) >= 0.5
    if not brain_c.any():
        raise InputDataError("tfi: the brain mask vanishes on the coarse level; set coarse_mm: 0")
    sup_c = (block_mean(sup, factor) >= 0.5) | brain_c
    data_c = sup_c & (block_mean(data, factor) >= 0.5) & (w2_c > 0)
    w_c = np.sqrt(np.where(data_c, w2_c, 0.0))
    w_c /= w_c[brain_c].mean()
    mag_c = None if mag is None else block_mean(mag, factor)
    return f_c.astype(np.float32), brain_c, sup_c, mag_c, w_c.astype(np.float32), data_c


def _prolong(state: "_State", coarse: _Level, fine: _Level, factor) -> "_State":
    """An ADMM state of the coarse level on the fine level's work grid (trilinear, edge values beyond).

    Every variable is in units that do not depend on the grid (chi and fields in ppm, gradients
    in 1/mm), so values carry over unchanged; block ``i`` of the coarse grid is centred on input
    voxel ``k i + (k - 1) / 2``.
    """
    import torch

    def axis_weights(a):
        n = fine.pb.shape[a]
        o_f = fine.pb.box[a].start - fine.pb.inner[a].start      # work index -> input index
        o_c = coarse.pb.box[a].start - coarse.pb.inner[a].start
        q = (np.arange(n) + o_f - (factor[a] - 1) / 2) / factor[a] - o_c   # coarse work coordinate
        q = np.clip(q, 0, coarse.pb.shape[a] - 1)
        i0 = np.minimum(np.floor(q).astype(np.int64), coarse.pb.shape[a] - 2)
        wt = q - i0
        dev = state.x.device
        shape = [1, 1, 1]
        shape[a] = n
        return (torch.from_numpy(i0).to(dev), torch.from_numpy(i0 + 1).to(dev),
                torch.from_numpy(wt.astype(np.float32)).reshape(shape).to(dev))

    weights = [axis_weights(a) for a in range(3)]

    def up(vol):
        for a, (i0, i1, wt) in enumerate(weights):
            vol = torch.lerp(vol.index_select(a, i0), vol.index_select(a, i1), wt)
        return vol

    stack = lambda t: torch.stack([up(c) for c in t])  # noqa: E731
    return _State(up(state.x), up(state.y), up(state.v), stack(state.u), stack(state.z), state.c)


#: offsets tried by ``offset: search``, relative to the jointly fitted one (ppm): with ``background_tv``
#: 1 the joint fit ended 0.06-0.14 ppm below the truth on the simulator's heads
SEARCH_STEPS = (-0.08, -0.04, 0.0, 0.04, 0.08, 0.12, 0.16)


def _search_offset(solve, lev: _Level, n_iter, say) -> tuple[float, list]:
    """``offset: search``: the field offset whose map has the least total variation in the brain.

    A joint fit (``n_iter`` iterations) gives ``c_fit``; maps for ``c_fit + SEARCH_STEPS`` (each
    ``n_iter`` iterations from zero) are scored by ``sum_brain |d chi|_1``; a parabola through the
    best grid point and its neighbours refines it. Measured with ``background_tv`` 1 (heads sampled
    on the inversion's grid): the minimum of this score is where chi NRMSE is lowest, to within one
    0.02-0.04 ppm step; with the default 0.05 the map hardly depends on the offset.
    Returns ``(offset, [(offset, score), ...])``.
    """
    import torch

    grad = Gradient(lev.pb.shape, None if all(v == 1.0 for v in lev.vs) else lev.vs)
    scratch = lambda: TfiResult(chi=np.zeros(0, np.float32), support=np.zeros(0, bool))  # noqa: E731
    c_fit = solve(None, n_iter, scratch()).c
    scored = []
    for step in SEARCH_STEPS:
        x = solve(c_fit + step, n_iter, scratch()).x
        score = float(torch.sum(grad.apply(x).abs_().sum(0) * lev.brain, dtype=torch.float64))
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


@dataclass
class _State:
    """ADMM variables: chi, ``y ~ D chi`` and its scaled dual ``v``, ``z ~ d chi`` and its dual ``u``; offset."""

    x: object
    y: object
    v: object
    u: object
    z: object
    c: float


def _admm(lev: _Level, b0_dir, res: TfiResult, *, rho, rho_data, offset, max_iter, tol, say, callback,
          start: _State | None = None) -> _State:
    """The ADMM iterations on ``lev``'s work grid (torch), from zero or from ``start``; the last state."""
    import torch

    dims = (-3, -2, -1)
    shape, vs, ft, w2, thr = lev.pb.shape, lev.vs, lev.ft, lev.w2, lev.thr
    dev = ft.device
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
    if start is None:
        c = wmean(ft) if offset is None else offset      # start: the data's own mean (offset-equivariant)
        x = torch.zeros(shape, device=dev)
        y = torch.where(w2 > 0, ft - c, 0.0)             # y ~ D chi, started at the data (0 where none)
        v = torch.zeros_like(x)
        u = torch.zeros((3,) + tuple(shape), device=dev)
        z = torch.zeros_like(u)
    else:
        c = start.c if offset is None else offset
        x, y, v, u, z = start.x, start.y, start.v, start.u, start.z
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
    return _State(x, y, v, u, z, c)
