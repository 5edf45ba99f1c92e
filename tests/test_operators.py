"""Core operators and solvers (qsmkit.operators).

One parametrised test checks the adjoint identity <A x, y> = <x, A^H y> and linearity on every
operator class that the core and the built-in plugins define: the subclasses of
``qsmkit.operators.Linop`` collected after importing the plugin modules, each providing small
example instances (``Linop.examples``). A new operator is covered by giving it an ``example``.
"""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest

from qsmkit import operators as ops
from qsmkit.errors import GeometryError, InputDataError
from qsmkit.physics import dipole_convolve, dipole_kernel

# ---------------------------------------------------------------- discovery of the operators
PLUGIN_MODULES = ["qsmkit_tkd.tkd", "qsmkit_medi.medi", "qsmkit_cosmos.cosmos", "qsmkit_dip.fit",
                  "qsmkit_kspace.sense", "qsmkit_unwrap.laplacian", "qsmkit_vsharp.vsharp",
                  "qsmkit_tfi.tfi", "qsmkit_bgremove.pdf", "qsmkit_bgremove.laplace"]


def _import_plugins() -> None:
    """Import every module of the built-in plugin packages (those whose imports work here)."""
    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # e.g. torch missing: that plugin's operators are not testable here
            pass
    for pkg_name in sorted({n.split(".")[0] for n in PLUGIN_MODULES}):
        try:
            pkg = importlib.import_module(pkg_name)
        except ImportError:
            continue
        for info in pkgutil.iter_modules(pkg.__path__):
            try:
                importlib.import_module(f"{pkg_name}.{info.name}")
            except ImportError:
                pass


_import_plugins()


def _cases():
    out = []
    for cls in ops.all_operator_classes():
        try:
            examples = cls.examples()
        except ImportError:
            examples = []
        for i, op in enumerate(examples):
            out.append(pytest.param(op, id=f"{cls.__module__.split('.')[0]}.{cls.__name__}[{i}]"))
    return out


CASES = _cases()


def test_discovery_covers_the_required_operators():
    names = {type(p.values[0]).__name__ for p in CASES}
    required = {"Dipole", "SMV", "Gradient", "Diagonal", "FourierMultiplier", "Compose", "Sum", "Scaled"}
    try:
        import torch  # noqa: F401
        required |= {"SenseOp", "MediSystem", "DipoleOperator"}
    except ImportError:  # pragma: no cover
        pass
    required |= {"CosmosOperator", "MaskedLaplacian"}
    assert required <= names, f"missing example operators: {required - names}"
    # every Linop subclass either gives an example or is abstract by design
    without = {c.__name__ for c in ops.all_operator_classes() if not c.examples()}
    assert without <= {"Linop"}, f"operator classes without an example: {without}"


def _inner(a, b) -> complex:
    return complex(np.vdot(np.asarray(a, np.complex128).ravel(), np.asarray(b, np.complex128).ravel()))


def _np(a):
    return a.detach().cpu().numpy() if ops.is_torch(a) else np.asarray(a)


@pytest.mark.parametrize("op", CASES)
def test_adjoint_identity_and_linearity(op):
    rng = np.random.default_rng(0)
    x, x2, y = op.random_input(rng), op.random_input(rng), op.random_output(rng)
    ax = _np(op.apply(x))
    assert ax.shape == tuple(op.oshape)
    aty = _np(op.adjoint(y))
    assert aty.shape == tuple(op.ishape)
    lhs, rhs = _inner(ax, y), _inner(x, aty)
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), 1e-12) + 1e-6 * np.linalg.norm(ax) * np.linalg.norm(y)
    # linearity: A(a x + b x2) = a A x + b A x2
    a, b = 0.7, -1.3
    comb = _np(op.apply((a * x + b * x2).astype(x.dtype)))
    ref = a * ax + b * _np(op.apply(x2))
    np.testing.assert_allclose(comb, ref, atol=1e-5 * max(float(np.abs(ref).max()), 1e-12))
    # the normal operator (fast path or default) is A^H A
    nx = _np(op.normal(x))
    np.testing.assert_allclose(nx, _np(op.adjoint(op.apply(x))), atol=1e-4 * max(float(np.abs(nx).max()), 1e-12))


@pytest.mark.parametrize("op", [p for p in CASES if type(p.values[0]).__module__.startswith("qsmkit.operators")])
def test_torch_matches_numpy(op):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x, y = op.random_input(rng), op.random_output(rng)
    np.testing.assert_allclose(op.apply(torch.from_numpy(x)).numpy(), _np(op.apply(x)), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(op.adjoint(torch.from_numpy(y)).numpy(), _np(op.adjoint(y)), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the dipole operator
@pytest.mark.parametrize("rfft", [True, False])
def test_dipole_is_the_physics_convolution(rfft):
    rng = np.random.default_rng(2)
    shape, vs, b = (10, 12, 8), (0.9, 1.0, 1.4), (0.3, -0.2, 0.93)
    chi = rng.standard_normal(shape).astype(np.float32)
    op = ops.Dipole(shape, vs, b, padding=1.5, rfft=rfft)
    got = op.apply(chi)
    ref = dipole_convolve(chi, vs, b, padding=1.5)
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(np.abs(ref).max()))
    # the same operator by hand: dense FFTs of the padded grid
    ps = op.fft_shape
    pad = np.zeros(ps, np.float64)
    sl = tuple(slice((p - s) // 2, (p - s) // 2 + s) for s, p in zip(shape, ps))
    pad[sl] = chi
    full = np.fft.ifftn(dipole_kernel(ps, vs, b) * np.fft.fftn(pad)).real[sl]
    np.testing.assert_allclose(got, full, atol=1e-5 * float(np.abs(full).max()))
    # composition: (SMV complement) @ Dipole on one grid is one multiplier with the product kernel
    smv = ops.SMV(shape, vs, 2.0)
    d1 = ops.Dipole(shape, vs, b, padding=1.0)
    prod = smv.complement() @ d1
    assert isinstance(prod, ops.FourierMultiplier)
    np.testing.assert_allclose(prod.apply(chi), d1.apply(chi) - smv.apply(d1.apply(chi)), atol=1e-5)


def test_algebra_and_shapes():
    g = ops.Gradient((4, 5, 6), (1.0, 1.0, 2.0))
    assert g.H.H is g and g.oshape == (3, 4, 5, 6)
    x = np.random.default_rng(3).standard_normal((4, 5, 6)).astype(np.float32)
    np.testing.assert_allclose((g.H @ g)(x), g.normal(x), atol=1e-6)
    np.testing.assert_allclose((2.0 * g.N - g.N)(x), g.normal(x), atol=1e-5)
    np.testing.assert_allclose((g * x)[0, :-1], (x[1:] - x[:-1]), atol=1e-6)
    with pytest.raises(InputDataError):
        ops.Identity((3,)) + ops.Identity((4,))
    with pytest.raises(InputDataError):
        ops.Dipole((4, 4, 4), (1, 1, 1), (0, 0, 1)).apply(np.zeros((4, 4, 5), np.float32))


def test_normal_diagonal_matches_dense():
    rng = np.random.default_rng(4)
    shape = (5, 4, 6)
    d = ops.Dipole(shape, (1.0, 1.0, 1.0), (0.1, 0.2, 1.0), padding=1.0)
    w = rng.random(shape).astype(np.float32)
    n = int(np.prod(shape))
    dense = np.stack([d.apply(e.reshape(shape)).ravel() for e in np.eye(n, dtype=np.float32)], 1)
    ref = np.einsum("ij,i,ij->j", dense, w.ravel(), dense)
    np.testing.assert_allclose(d.normal_diagonal(w).ravel(), ref, atol=1e-5)


def test_bounding_box():
    m = np.zeros((8, 9, 10), bool)
    m[2:4, 3, 5:9] = True
    assert ops.bounding_box(m) == (slice(2, 4), slice(3, 4), slice(5, 9))
    assert ops.bounding_box(m, 3) == (slice(0, 7), slice(0, 7), slice(2, 10))
    with pytest.raises(InputDataError):
        ops.bounding_box(np.zeros((3, 3, 3)))


# ---------------------------------------------------------------- solvers
def _spd(n, rng, cond=50.0):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


class _Dense(ops.Linop):
    """A dense matrix as an operator (tests only)."""

    def __init__(self, a):
        super().__init__((a.shape[1],), (a.shape[0],), a.dtype)
        self.a = a

    def apply(self, x):
        return self.a @ x

    def adjoint(self, y):
        return self.a.conj().T @ y

    @classmethod
    def example(cls):
        return cls(np.random.default_rng(8).standard_normal((5, 4)))


def test_cg_against_dense_solve():
    rng = np.random.default_rng(5)
    a = _spd(40, rng)
    b = rng.standard_normal(40)
    x, info = ops.cg(_Dense(a), b, tol=1e-10, max_iter=200)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-7, atol=1e-9)
    assert info.converged and info.residuals[-1] <= 1e-10 and info.residuals[0] == pytest.approx(1.0)
    assert len(info.residuals) == info.iterations + 1
    # the one stopping rule: ||r|| / ||b|| <= tol
    x1, info1 = ops.cg(_Dense(a), b, tol=1e-2, max_iter=200)
    assert np.linalg.norm(b - a @ x1) / np.linalg.norm(b) <= 1e-2 < info1.residuals[-2]
    # a Jacobi preconditioner on a badly scaled system needs fewer iterations, same solution
    s = np.geomspace(1.0, 100.0, 40)
    a2 = a * s[:, None] * s[None, :]
    xp, infop = ops.cg(_Dense(a2), b, M=ops.Diagonal(1.0 / np.diag(a2)), tol=1e-10, max_iter=400)
    _, infon = ops.cg(_Dense(a2), b, tol=1e-10, max_iter=400)
    np.testing.assert_allclose(xp, np.linalg.solve(a2, b), rtol=1e-6, atol=1e-9)
    assert infop.iterations < infon.iterations
    # warm start: x0 is not modified, the result is the same
    x0 = rng.standard_normal(40)
    keep = x0.copy()
    xw, _ = ops.cg(_Dense(a), b, x0, tol=1e-10, max_iter=200)
    np.testing.assert_array_equal(x0, keep)
    np.testing.assert_allclose(xw, np.linalg.solve(a, b), rtol=1e-7, atol=1e-9)


def test_cg_batched_and_torch():
    rng = np.random.default_rng(6)
    mats = [_spd(12, rng, c) for c in (5.0, 500.0)]
    b = rng.standard_normal((2, 12))

    def apply(x):
        return np.stack([m @ xi for m, xi in zip(mats, x)])

    x, info = ops.cg(apply, b, tol=1e-9, max_iter=100, batch_dims=1)
    for k in range(2):
        np.testing.assert_allclose(x[k], np.linalg.solve(mats[k], b[k]), rtol=1e-6, atol=1e-8)
    assert info.converged.all() and info.residuals[-1].shape == (2,)
    torch = pytest.importorskip("torch")
    tm = [torch.from_numpy(m) for m in mats]
    xt, infot = ops.cg(lambda x: torch.stack([m @ xi for m, xi in zip(tm, x)]), torch.from_numpy(b),
                       tol=1e-9, max_iter=100, batch_dims=1)
    np.testing.assert_allclose(xt.numpy(), x, rtol=1e-6, atol=1e-8)
    # complex Hermitian system
    h = _spd(10, rng) + 1j * 0.0
    u = np.linalg.qr(rng.standard_normal((10, 10)) + 1j * rng.standard_normal((10, 10)))[0]
    h = u @ np.diag(np.geomspace(1, 20, 10)) @ u.conj().T
    bc = rng.standard_normal(10) + 1j * rng.standard_normal(10)
    xc, _ = ops.cg(_Dense(h), bc, tol=1e-10, max_iter=100)
    np.testing.assert_allclose(xc, np.linalg.solve(h, bc), rtol=1e-7, atol=1e-9)


def test_minres_against_dense_solve_and_scipy():
    """MINRES on a symmetric INDEFINITE system: the exact solution, scipy's iterates, one A per step."""
    from scipy.sparse.linalg import minres as sp_minres

    rng = np.random.default_rng(9)
    q = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    a = q @ np.diag(np.concatenate([-np.geomspace(1, 30, 15), np.geomspace(0.5, 20, 25)])) @ q.T
    b = rng.standard_normal(40)
    keep = b.copy()
    calls = []
    x, info = ops.minres(lambda v: calls.append(1) or a @ v, b, tol=1e-10, max_iter=200)
    np.testing.assert_array_equal(b, keep)  # b is not modified
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-6, atol=1e-8)
    assert info.converged and len(calls) == info.iterations == len(info.residuals) - 1
    # iterate k is scipy's iterate k (the minimum-residual point of the same Krylov space)
    for k in (3, 10):
        xk, ik = ops.minres(_Dense(a), b, tol=0, max_iter=k)
        np.testing.assert_allclose(xk, sp_minres(a, b, maxiter=k, rtol=1e-15)[0], rtol=1e-8, atol=1e-10)
        assert ik.residuals[-1] == pytest.approx(np.linalg.norm(b - a @ xk) / np.linalg.norm(b), rel=1e-6)
    # CG breaks down on it (non-positive curvature); MINRES residuals never increase
    assert ops.cg(_Dense(a), b, tol=1e-10, max_iter=200)[1].breakdown
    assert np.all(np.diff(info.residuals) <= 1e-12)
    # an SPD preconditioner (scaled system): fewer iterations, same solution, scipy's iterates
    s = np.geomspace(1.0, 100.0, 40)
    a2 = a * s[:, None] * s[None, :]
    m = ops.Diagonal(1.0 / s ** 2)
    xp, ip = ops.minres(_Dense(a2), b, M=m, tol=1e-10, max_iter=400)
    _, inp = ops.minres(_Dense(a2), b, tol=1e-10, max_iter=400)
    np.testing.assert_allclose(xp, np.linalg.solve(a2, b), rtol=1e-5, atol=1e-8)
    assert ip.iterations < inp.iterations
    x5, _ = ops.minres(_Dense(a2), b, M=m, tol=0, max_iter=5)
    np.testing.assert_allclose(x5, sp_minres(a2, b, M=np.diag(1.0 / s ** 2), maxiter=5, rtol=1e-15)[0],
                               rtol=1e-7, atol=1e-10)
    # torch backend, and b = 0
    torch = pytest.importorskip("torch")
    xt, _ = ops.minres(lambda v: torch.from_numpy(a) @ v, torch.from_numpy(b), tol=0, max_iter=10)
    np.testing.assert_allclose(xt.numpy(), ops.minres(_Dense(a), b, tol=0, max_iter=10)[0], rtol=1e-8, atol=1e-10)
    x0, i0 = ops.minres(_Dense(a), np.zeros(40))
    assert not x0.any() and i0.iterations == 0 and i0.converged


def test_power_iteration_against_eigvalsh():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((30, 20))
    lam, info = ops.power_iteration(_Dense(a), max_iter=500, tol=1e-10)
    assert lam == pytest.approx(float(np.linalg.eigvalsh(a.T @ a).max()), rel=1e-6)
    assert info["iterations"] <= 500
    s = _spd(15, rng, 30.0)
    lam2, _ = ops.power_iteration(_Dense(s), normal=False, max_iter=1000, tol=1e-12)
    assert lam2 == pytest.approx(float(np.linalg.eigvalsh(s).max()), rel=1e-6)
    # the Lipschitz constant of the periodic dipole convolution is max |D|^2 = (2/3)^2 at most
    d = ops.Dipole((8, 8, 8), (1, 1, 1), (0, 0, 1), padding=1.0)
    lam3, _ = ops.power_iteration(d, max_iter=300, tol=1e-8)
    assert lam3 <= float((d.kernel ** 2).max()) * (1 + 1e-5) and lam3 > 0.9 * float((d.kernel ** 2).max())


def test_gauss_newton_helpers():
    """line_warm_start: the exact minimiser along a direction; backtrack: halves until the cost drops."""
    from qsmkit.operators import backtrack, line_warm_start

    A = ops.Diagonal(np.array([1.0, 4.0]))
    b = np.array([2.0, 4.0])
    x0, r0 = line_warm_start(A, b, np.array([1.0, 1.0]))
    assert np.allclose(x0, [1.2, 1.2]) and np.allclose(r0, b - A.apply(x0))   # (b.d)/(d.Ad) = 6/5
    assert line_warm_start(A, b, None) == (None, None)
    assert line_warm_start(ops.Diagonal(np.array([-1.0, -1.0])), b, np.ones(2)) == (None, None)
    f = lambda s: ((s - 0.3) ** 2,)  # noqa: E731
    assert backtrack(f, 0.1) == (0.5, f(0.5))            # 1 gives 0.49 > 0.1, 0.5 gives 0.04
    assert backtrack(f, 0.01) == (0.25, f(0.25))
    assert backtrack(f, -1.0) == (0.0, None)


# ---------------------------------------------------------------- proximal splitting
@pytest.mark.parametrize("method", ["fista", "pogm", "condat_vu"])
@pytest.mark.parametrize("batched", [False, True])
def test_proximal_solvers_solve_a_diagonal_lasso(method, batched):
    """min 1/2 ||D x - b||^2 + lam ||x||_1 with diagonal D: the closed-form soft threshold; costs decrease."""
    rng = np.random.default_rng(11)
    shape = (3, 40) if batched else (40,)
    d = rng.uniform(0.5, 1.0, shape)
    b = rng.standard_normal(shape)
    lam = 0.3
    xs = np.sign(b / d) * np.maximum(np.abs(d * b) - lam, 0) / d ** 2
    A = ops.Diagonal(d)
    nb = 1 if batched else 0

    def prox(z, c):
        c = np.asarray(c).reshape((-1,) + (1,) * (z.ndim - 1)) if np.ndim(c) else c
        return np.sign(z) * np.maximum(np.abs(z) - c * lam, 0)

    def g(x):
        return lam * (np.abs(x).reshape(x.shape[0], -1).sum(-1) if batched else np.abs(x).sum())

    x0 = np.zeros(shape)
    if method == "condat_vu":
        x, info = ops.condat_vu(A, b, ops.Identity(shape), prox, g, x0, tau=1.0 / (0.5 + 0.5), sigma=0.5,
                                max_iter=2000, batch_dims=nb)
    else:
        x, info = ops.proximal_gradient(A, b, prox, g, x0, 1.0, 300, method, batch_dims=nb)
    assert float(np.abs(x - xs).max()) < 1e-5
    c = info.cost_array
    best = 0.5 * np.sum(((d * xs - b) ** 2).reshape(c.shape[1:] + (-1,)), -1) + g(xs)
    np.testing.assert_allclose(c[-1], best, rtol=1e-8)
    assert c.shape[0] == info.iterations and (c[-1] <= c[0]).all()


def test_laplacian_kernel_is_spectrum_of_periodic_differences():
    fs, vs = (6, 5, 8), (1.0, 0.8, 1.5)
    x = np.random.default_rng(0).standard_normal(fs)
    lap = sum((2 * x - np.roll(x, 1, a) - np.roll(x, -1, a)) / h ** 2 for a, h in enumerate(vs))
    via_k = np.fft.irfftn(np.fft.rfftn(x) * ops.laplacian_kernel(fs, vs), s=fs, axes=(0, 1, 2))
    assert np.allclose(lap, via_k, atol=1e-5)


def test_block_mean_per_axis_factors_drop_partial_blocks():
    from qsmkit.operators import block_mean

    x = np.arange(5 * 4 * 3, dtype=np.float64).reshape(5, 4, 3)
    b = block_mean(x, (2, 2, 1))
    assert b.shape == (2, 2, 3) and b.dtype == np.float32       # the 5th slice (a partial block) dropped
    np.testing.assert_allclose(b, x[:4].reshape(2, 2, 2, 2, 3).mean(axis=(1, 3)), rtol=1e-6)
    c = block_mean(np.ones((4, 4, 4), bool), 2)
    assert c.shape == (2, 2, 2) and np.all(c == 1.0)
    assert block_mean(np.ones((2, 2, 2), np.complex128), 2).dtype == np.complex64


def test_gradient_mask_toolbox_convention():
    """MEDI's and TFI's edge mask: the Cornell toolbox's ``gradient_mask`` convention."""
    rng = np.random.default_rng(1)
    n = 24
    mask = np.zeros((n, n, n), bool)
    mask[3:-3, 3:-3, 3:-3] = True
    mag = (1.0 + 0.05 * rng.normal(size=mask.shape)).astype(np.float32)
    mag[n // 2:] += 2.0                                  # a strong edge across x
    for pct in (0.3, 0.9, 1.5):
        mg = ops.gradient_mask(mag, mask, (1.0, 1.0, 1.0), pct)
        assert mg.shape == (3, n, n, n) and mg.dtype == bool
        n_edges = int((~mg).sum())
        assert abs(n_edges - round(pct * mask.sum())) <= 1   # edges = pct x number of mask voxels
        # every edge component has a larger magnitude gradient than every regularised one
        g = np.abs(ops.Gradient(mask.shape, (1, 1, 1)).apply(np.where(mask, mag, np.float32(0)).astype(np.float32)))
        assert g[~mg].min() >= g[mg].max()
    # the strong step is an edge; without edges (0) everything is regularised
    assert not ops.gradient_mask(mag, mask, (1, 1, 1), 0.9)[0, n // 2 - 1, n // 2, n // 2]
    assert ops.gradient_mask(mag, mask, (1, 1, 1), 0.0).all()
    # 4D magnitude is combined by root sum of squares
    mg4 = ops.gradient_mask(np.stack([mag, mag], -1), mask, (1, 1, 1), 0.9)
    np.testing.assert_array_equal(mg4, ops.gradient_mask(mag * np.sqrt(2), mask, (1, 1, 1), 0.9))
    # a binary support (TFI without magnitude): only its boundary is an edge
    box = np.zeros((n, n, n), bool)
    box[4:-4, 4:-4, 4:-4] = True
    mb = ops.gradient_mask(box.astype(np.float32), box, (1, 1, 1), 0.9)
    inner = np.zeros_like(box)
    inner[6:-6, 6:-6, 6:-6] = True
    assert mb[:, inner].all() and not mb.all()
    with pytest.raises(GeometryError, match="differs from mask grid"):
        ops.gradient_mask(mag[:-1], mask, (1, 1, 1), 0.9)
