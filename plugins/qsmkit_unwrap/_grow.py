"""Compiled region growing of :mod:`qsmkit_unwrap.romeo`: a bucket queue over binned edge weights.

Why numba: quality-guided growth is an inherently sequential loop (every step takes the best
edge on the current frontier, unwraps one voxel and pushes up to five new edges), about ``3 N``
queue operations for ``N`` voxels. In Python that is minutes per 1 mm head (7 M voxels); NumPy
cannot vectorise it because each step depends on the previous one. Compiled (``numba.njit``,
``cache=True`` so the compile cost of a few seconds is paid once per installation, not per run)
it takes about half a second per million voxels.

The priority queue is a *bucket queue* (Dial's algorithm): edge weights are integer bins 1..255
(1 = best, 0 = not an edge), one LIFO linked list per bin, and a pointer to the lowest non-empty
bin. An edge enters the queue at most once (when the first of its two voxels is reached), so the
list links fit in one preallocated array indexed by edge, and the whole growth is ``O(N)``.
(Chunked per-bin stacks, for sequential memory access, were measured 10 % slower: the time goes
into the voxel and neighbour look-ups, not the queue.)

Edges are numbered ``3 * voxel + axis`` (C order, ``axis`` 0..2): edge ``3 v + a`` joins voxel
``v`` and its forward neighbour ``v + stride[a]``; bins of edges that leave the grid must be 0.
"""

from __future__ import annotations

import math

import numba
import numpy as np

NBINS = 256


@numba.njit(cache=True)
def grow_unwrap(phase, bins, order, ref, use_ref, shape, visited, nxt, extrapolate, koff, use_koff):
    """Unwrap ``phase`` (flat, float32, C order of ``shape``) in place by quality-guided growth.

    Parameters
    ----------
    phase : float32[N]
        Wrapped phase (rad), overwritten with the unwrapped phase on the visited voxels.
    bins : uint8[3 N]
        Edge bins, ``3 * voxel + axis``: 1 best ... 255 worst, 0 no edge.
    order : int64[M]
        Seed candidates, best first (e.g. the voxels in the mask by decreasing quality). Each
        time the queue runs empty, the first unvisited candidate seeds a new region; the
        growth only ever reaches voxels joined to a seed by valid edges.
    ref : float32[N]
        With ``use_ref``: a seed voxel takes the value ``phase + 2 pi k`` nearest to ``ref``
        (a shared reference, e.g. another echo scaled in time); otherwise the seed keeps its
        wrapped value.
    use_ref : bool
    shape : int64[3]
    visited : uint8[N]
        Zero on entry; on return 1 at every reached voxel, 0 elsewhere.
    nxt : int32[3 N] (int64 for more than 2**31 edges)
        Work array (the links of the bucket lists, one per edge), contents ignored.
    extrapolate : float32
        0: a new voxel is unwrapped relative to the voxel it is reached from. > 0 (rad, at most
        pi): relative to that voxel plus the step from the voxel behind it along the same axis,
        clipped to +-``extrapolate`` (ROMEO's ``wrap_addition``): steep but steady gradients of
        up to ``pi + extrapolate`` per voxel are then followed.

    Returns
    -------
    int
        Number of regions (seeds used).
    """
    s0, s1 = shape[1] * shape[2], shape[2]
    head = np.full(NBINS, -1, np.int64)  # first edge of each bin's list
    two_pi = np.float32(2.0 * np.pi)
    inv_two_pi = np.float32(1.0 / (2.0 * np.pi))
    queued = 0  # edges in the queue
    cur = NBINS  # lowest non-empty bin
    pos = 0
    region = 0
    n_order = order.shape[0]
    new = -1
    while True:
        if new >= 0:
            # queue the valid edges from the newly visited voxel to its unvisited neighbours
            for a in range(3):
                st = s0 if a == 0 else (s1 if a == 1 else 1)
                e = 3 * new + a  # forward neighbour (bins of edges leaving the grid are 0)
                b = bins[e]
                if b > 0 and visited[new + st] == 0:
                    nxt[e] = head[b]
                    head[b] = e
                    queued += 1
                    if b < cur:
                        cur = b
                nb = new - st  # backward neighbour: its forward edge along a
                if nb >= 0:
                    e = 3 * nb + a
                    b = bins[e]
                    if b > 0 and visited[nb] == 0:
                        nxt[e] = head[b]
                        head[b] = e
                        queued += 1
                        if b < cur:
                            cur = b
            new = -1
        if queued == 0:
            # queue empty: seed a new region at the best unvisited candidate
            while pos < n_order and visited[order[pos]] != 0:
                pos += 1
            if pos == n_order:
                break
            new = order[pos]
            region += 1
            visited[new] = 1
            if use_ref:
                phase[new] -= two_pi * np.float32(math.floor((phase[new] - ref[new]) * inv_two_pi + np.float32(0.5)))
            cur = NBINS
            continue
        # pop the best edge
        while head[cur] < 0:
            cur += 1
        e = head[cur]
        head[cur] = nxt[e]
        queued -= 1
        v = e // 3
        a = e - 3 * v
        w = v + (s0 if a == 0 else (s1 if a == 1 else 1))
        if visited[v] != 0:
            if visited[w] != 0:
                continue
            old, nw = v, w
        else:
            old, nw = w, v
        target = phase[old]
        if use_koff and koff[e] != 0:
            if old == v:
                target += two_pi * np.float32(koff[e])
            else:
                target -= two_pi * np.float32(koff[e])
        if extrapolate > 0:
            # ROMEO's linear extrapolation: follow the step from the voxel behind ``old``
            step = nw - old
            c = (old // s0) if a == 0 else ((old // s1) % shape[1] if a == 1 else old % shape[2])
            if (step > 0 and c >= 1) or (step < 0 and c <= shape[a] - 2):
                behind = old - step
                # only along an existing edge (behind and old are then in the same region)
                if visited[behind] != 0 and bins[3 * (behind if step > 0 else old) + a] > 0:
                    d = phase[old] - phase[behind]
                    if d > extrapolate:
                        d = extrapolate
                    elif d < -extrapolate:
                        d = -extrapolate
                    target += d
        phase[nw] -= two_pi * np.float32(math.floor((phase[nw] - target) * inv_two_pi + np.float32(0.5)))
        visited[nw] = 1
        new = nw
    return region


@numba.njit(cache=True)
def edge_wraps(phase, mag, use_mag, ratios, order, t, s, bins, shape, min_cost, kt, kd, c0, cb):
    """Multi-echo estimate of each edge's true template-echo step beyond +-pi (see
    :func:`qsmkit_unwrap.romeo.multi_echo_edge_wraps`).

    Parameters
    ----------
    phase : float32[E, N]
        Wrapped phase of every echo (rad), flat C order of ``shape``.
    mag : float32[E, N] (or [1, 1] without ``use_mag``)
        Magnitude of every echo: the echo weights of an edge are ``min(m_i, m_j)^2``.
    use_mag : bool
    ratios : float64[E]
        ``TE_e / TE_t``.
    order : int64[E]
        The echoes in the order they are added (template first, then by distance in time).
    t : int
        The template echo.
    s : int
        A second echo (the one next to the template): ``kd`` is for the step of ``phi_s - phi_t``.
    bins : uint8[3 N]
        The growth's edge bins: only edges with a bin > 0 are estimated.
    shape : int64[3]
    min_cost : float
        rad^2: edges whose ``k = 0`` fit costs less are not tried with other candidates.
    kt : int8[3 N]
        Out: the best number of extra 2 pi on the template step ``W(phi_t(j) - phi_t(i))``,
        in {-1, 0, 1} (0 for edges that are not estimated): candidates are tried by increasing
        ``|step|`` and one replaces the best so far only at less than half its cost.
    kd : int8[3 N]
        Out: with ``kt``'s candidate, the extra 2 pi on the wrapped step of ``W(phi_s - phi_t)``.
    c0, cb : float32[3 N]
        Out: the weighted mean squared residual (rad^2) of the line through the origin fitted to
        the edge's steps of all echoes, with 0 extra wraps (``c0``) and with ``kt`` (``cb``).
    """
    s0, s1 = shape[1] * shape[2], shape[2]
    n = shape[0] * s0
    n_e = phase.shape[0]
    two_pi = 2.0 * np.pi
    ys = np.empty(n_e, np.float64)
    ws = np.empty(n_e, np.float64)
    for v in range(n):
        for a in range(3):
            e = 3 * v + a
            if bins[e] == 0:
                continue
            w = v + (s0 if a == 0 else (s1 if a == 1 else 1))
            d_t = phase[t, w] - phase[t, v]
            d_t -= two_pi * math.floor(d_t / two_pi + 0.5)
            wsum = 0.0
            for q in range(n_e):
                if use_mag:
                    mm = min(mag[q, v], mag[q, w])
                    ws[q] = mm * mm
                else:
                    ws[q] = 1.0
                wsum += ws[q]
            if wsum <= 0:
                continue
            best_c = 1e30
            best_k = 0
            best_d = 0
            k1 = -1 if d_t > 0 else 1  # the candidates by increasing |step|: 0, k1, -k1
            for ik in range(3):
                k = 0 if ik == 0 else (k1 if ik == 1 else -k1)
                delta = d_t + two_pi * k
                # sequential temporal unwrapping of the edge's steps through the origin
                sww = ws[t]
                swy = ws[t] * delta
                ys[t] = delta
                slope = delta
                for i in range(1, n_e):
                    q = order[i]
                    pred = slope * ratios[q]
                    dq = phase[q, w] - phase[q, v]
                    dq += two_pi * math.floor((pred - dq) / two_pi + 0.5)
                    ys[q] = dq
                    sww += ws[q] * ratios[q] * ratios[q]
                    swy += ws[q] * ratios[q] * dq
                    if sww > 0:
                        slope = swy / sww
                c = 0.0
                for q in range(n_e):
                    r = ys[q] - slope * ratios[q]
                    c += ws[q] * r * r
                c /= wsum
                if k == 0:
                    c0[e] = c
                    if c < min_cost:  # a good fit: nothing to resolve
                        best_c = c
                        dd = (phase[s, w] - phase[t, w]) - (phase[s, v] - phase[t, v])
                        dd -= two_pi * math.floor(dd / two_pi + 0.5)
                        best_d = int(math.floor((ys[s] - ys[t] - dd) / two_pi + 0.5))
                        break
                # a larger step must fit clearly better (k and k + 2 are told apart by no echo
                # when TE_e / TE_t are multiples of 1/2: the smaller step wins the tie)
                if c < 0.5 * best_c:
                    best_c = c
                    best_k = k
                    dd = (phase[s, w] - phase[t, w]) - (phase[s, v] - phase[t, v])
                    dd -= two_pi * math.floor(dd / two_pi + 0.5)       # step of the wrapped difference
                    best_d = int(math.floor((ys[s] - ys[t] - dd) / two_pi + 0.5))
            kt[e] = best_k
            kd[e] = best_d
            cb[e] = best_c
    return 0
