"""The operator base class :class:`Linop`, its algebra, :class:`Identity` and :class:`Diagonal`.

Backend helpers: the operators work on numpy arrays and torch tensors alike (torch is imported
only when a tensor arrives). See :mod:`qsmkit.operators`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InputDataError

# =========================================================================== backend helpers
def is_torch(x: Any) -> bool:
    """True for a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".")[0] == "torch"


def _vdot(a, b, batch_dims: int = 0):
    """Real part of ``<a, b> = sum conj(a) b``: a float, or per batch (leading ``batch_dims`` axes).

    numpy: float32 data accumulate in BLAS (batched: float64); torch: in the tensor dtype.
    """
    if is_torch(a):
        if batch_dims == 0:
            if a.is_complex():
                return float(a.conj().mul(b).real.sum())
            return float(a.reshape(-1).dot(b.reshape(-1)))
        prod = (a.conj() * b).real if a.is_complex() else a * b
        return prod.reshape(tuple(a.shape[:batch_dims]) + (-1,)).sum(-1)
    if batch_dims == 0:
        return float(np.vdot(a.ravel(), b.ravel()).real)
    lead = a.shape[:batch_dims]
    a2, b2 = a.reshape(lead + (-1,)), b.reshape(lead + (-1,))
    if np.iscomplexobj(a2) or np.iscomplexobj(b2):
        return (np.conj(a2) * b2).real.sum(-1, dtype=np.float64)
    return np.einsum("...i,...i->...", a2, b2, dtype=np.float64)


def _as_like(a, like):
    """``a`` (numpy array or tensor) in the backend, device and (real/complex) dtype family of ``like``."""
    if is_torch(like):
        import torch

        if not is_torch(a):
            a = torch.from_numpy(np.ascontiguousarray(a))
        if a.device != like.device:
            a = a.to(like.device)
        return a
    if is_torch(a):
        return a.detach().cpu().numpy()
    return a


def _zeros_like(x):
    if is_torch(x):
        import torch

        return torch.zeros_like(x)
    return np.zeros_like(x)


def _copy(x):
    return x.clone() if is_torch(x) else x.copy()


# =========================================================================== base class
class Linop:
    """A linear operator ``A`` from arrays of ``ishape`` to arrays of ``oshape``.

    Subclasses implement :meth:`apply` and :meth:`adjoint` (and may override :meth:`normal`
    with a cheaper ``A^H A``). Inputs may be numpy arrays or torch tensors; outputs use the
    backend (and device) of the input.

    Parameters
    ----------
    ishape, oshape : tuple of int
        Shapes of the input and output arrays (``None`` entries mean "any size").
    dtype : numpy dtype
        The working dtype (``float32`` or ``complex64`` by default).
    """

    #: registry of subclasses, in definition order (for the adjoint tests)
    _classes: list = []

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        Linop._classes.append(cls)

    def __init__(self, ishape: Sequence[int], oshape: Sequence[int], dtype=np.float32):
        self.ishape = tuple(ishape)
        self.oshape = tuple(oshape)
        self.dtype = np.dtype(dtype)

    # ---------------------------------------------------------------- the operator
    def apply(self, x):
        """``A x``."""
        raise NotImplementedError

    def adjoint(self, y):
        """``A^H y``."""
        raise NotImplementedError

    def normal(self, x):
        """``A^H A x`` (default: ``adjoint(apply(x))``; subclasses may override with a fast path)."""
        return self.adjoint(self.apply(x))

    def __call__(self, x):
        return self.apply(x)

    # ---------------------------------------------------------------- derived operators
    @property
    def H(self) -> "Linop":
        """The adjoint operator ``A^H``."""
        return Adjoint(self)

    @property
    def N(self) -> "Linop":
        """The normal operator ``A^H A`` (self-adjoint; uses :meth:`normal`)."""
        return Normal(self)

    def __matmul__(self, other):
        if isinstance(other, Linop):
            return Compose(self, other)
        return self.apply(other)

    def __mul__(self, other):
        if isinstance(other, Linop):
            return self @ other
        if np.isscalar(other):
            return Scaled(self, other)
        return self.apply(other)

    def __rmul__(self, other):
        if np.isscalar(other):
            return Scaled(self, other)
        return NotImplemented

    def __add__(self, other: "Linop") -> "Linop":
        return Sum(self, other)

    def __sub__(self, other: "Linop") -> "Linop":
        return Sum(self, Scaled(other, -1.0))

    def __neg__(self) -> "Linop":
        return Scaled(self, -1.0)

    # ---------------------------------------------------------------- testing support
    @classmethod
    def example(cls) -> "Linop | None":
        """A small instance for the generic adjoint / linearity tests (``None``: not testable alone)."""
        return None

    @classmethod
    def examples(cls) -> list:
        """Small instances for the generic tests (default: ``[example()]``; override for variants)."""
        ex = cls.example()
        return [] if ex is None else [ex]

    def random_input(self, rng: np.random.Generator):
        """A random array of :attr:`ishape` and :attr:`dtype` (numpy), for tests."""
        return _random(self.ishape, self.dtype, rng)

    def random_output(self, rng: np.random.Generator):
        """A random array of :attr:`oshape` and :attr:`dtype` (numpy), for tests."""
        return _random(self.oshape, self.dtype, rng)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ishape} -> {self.oshape} {self.dtype}>"


def _random(shape, dtype, rng):
    x = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


def all_operator_classes() -> list:
    """Every :class:`Linop` subclass defined so far (import plugin modules first to include theirs)."""
    return list(Linop._classes)


# =========================================================================== algebra
class Identity(Linop):
    """``I x = x`` on arrays of ``shape``."""

    def __init__(self, shape: Sequence[int], dtype=np.float32):
        super().__init__(shape, shape, dtype)

    def apply(self, x):
        return x

    def adjoint(self, y):
        return y

    def normal(self, x):
        return x

    @classmethod
    def example(cls):
        return cls((3, 4))


class Adjoint(Linop):
    """``A^H`` as an operator (its adjoint is ``A`` again)."""

    def __init__(self, op: Linop):
        super().__init__(op.oshape, op.ishape, op.dtype)
        self.op = op

    def apply(self, x):
        return self.op.adjoint(x)

    def adjoint(self, y):
        return self.op.apply(y)

    @property
    def H(self) -> Linop:
        return self.op

    @classmethod
    def example(cls):
        from .gradient import Gradient

        return cls(Gradient.example())


class Normal(Linop):
    """``A^H A`` as a (self-adjoint) operator; applies ``A.normal``."""

    def __init__(self, op: Linop):
        super().__init__(op.ishape, op.ishape, op.dtype)
        self.op = op

    def apply(self, x):
        return self.op.normal(x)

    def adjoint(self, y):
        return self.op.normal(y)

    @classmethod
    def example(cls):
        from .gradient import Gradient

        return cls(Gradient.example())


class Compose(Linop):
    """``A B`` (apply ``B`` first). ``A^H A`` of the product uses ``A.normal``: ``B^H (A^H A) B``."""

    def __init__(self, a: Linop, b: Linop):
        super().__init__(b.ishape, a.oshape, np.promote_types(a.dtype, b.dtype))
        self.a, self.b = a, b

    def apply(self, x):
        return self.a.apply(self.b.apply(x))

    def adjoint(self, y):
        return self.b.adjoint(self.a.adjoint(y))

    def normal(self, x):
        return self.b.adjoint(self.a.normal(self.b.apply(x)))

    @classmethod
    def example(cls):
        from .gradient import Gradient

        g = Gradient.example()
        return cls(Diagonal(np.linspace(0.5, 2.0, int(np.prod(g.oshape)), dtype=np.float32).reshape(g.oshape)), g)


class Sum(Linop):
    """``A + B + ...`` (operators of equal shapes)."""

    def __init__(self, *ops: Linop):
        flat = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, Sum) else [op])
        if any(o.ishape != flat[0].ishape or o.oshape != flat[0].oshape for o in flat):
            raise InputDataError("Sum: all operators must map the same input shape to the same output shape")
        super().__init__(flat[0].ishape, flat[0].oshape, np.result_type(*[o.dtype for o in flat]))
        self.ops = tuple(flat)

    def apply(self, x):
        out = self.ops[0].apply(x)
        out = _copy(out) if out is x else out
        for op in self.ops[1:]:
            out = out + op.apply(x)
        return out

    def adjoint(self, y):
        out = self.ops[0].adjoint(y)
        out = _copy(out) if out is y else out
        for op in self.ops[1:]:
            out = out + op.adjoint(y)
        return out

    @classmethod
    def example(cls):
        from .fourier import Dipole

        s = (5, 6, 4)
        return cls(Identity(s), 0.5 * Dipole(s, (1.0, 1.0, 2.0), (0.0, 0.3, 1.0), padding=1.0))


class Scaled(Linop):
    """``c A`` for a (real or complex) scalar ``c``."""

    def __init__(self, op: Linop, scale):
        dt = np.result_type(op.dtype, np.complex64) if np.iscomplexobj(scale) else op.dtype
        super().__init__(op.ishape, op.oshape, dt)
        self.op, self.scale = op, scale

    def apply(self, x):
        return self.op.apply(x) * self.scale

    def adjoint(self, y):
        return self.op.adjoint(y) * np.conj(self.scale)

    def normal(self, x):
        return self.op.normal(x) * float(abs(self.scale) ** 2)

    @classmethod
    def example(cls):
        from .gradient import Gradient

        return cls(Gradient.example(), -2.5)


class Diagonal(Linop):
    """Pointwise weights (masks, noise weights): ``(W x)_i = w_i x_i``; ``W^H y = conj(w) y``.

    Parameters
    ----------
    weights : ndarray or torch.Tensor
        The diagonal, broadcastable against the input (bool masks become 0/1 of ``dtype``).
    ishape : tuple of int, optional
        Input shape (default ``weights.shape``); the output shape is the same.
    """

    def __init__(self, weights, ishape: Sequence[int] | None = None):
        if not is_torch(weights):
            weights = np.asarray(weights)
            if weights.dtype == bool:
                weights = weights.astype(np.float32)
            dt = np.complex64 if np.iscomplexobj(weights) else np.float32
        else:
            dt = np.complex64 if weights.is_complex() else np.float32
        shape = tuple(weights.shape) if ishape is None else tuple(ishape)
        super().__init__(shape, shape, dt)
        self.weights = weights
        self._cache: dict = {}

    def _w(self, x, conj: bool = False, square: bool = False):
        key = (is_torch(x), str(getattr(x, "device", "")), conj, square)
        w = self._cache.get(key)
        if w is None:
            w = _as_like(self.weights, x)
            if square:
                w = (w.conj() * w).real if (is_torch(w) and w.is_complex()) or np.iscomplexobj(w) else w * w
            elif conj and ((is_torch(w) and w.is_complex()) or np.iscomplexobj(w)):
                w = w.conj()
            self._cache[key] = w
        return w

    def apply(self, x, out=None):
        w = self._w(x)
        if out is None:
            return x * w
        if is_torch(x):
            import torch

            return torch.mul(x, w, out=out)
        return np.multiply(x, w, out=out)

    def adjoint(self, y, out=None):
        w = self._w(y, conj=True)
        if out is None:
            return y * w
        if is_torch(y):
            import torch

            return torch.mul(y, w, out=out)
        return np.multiply(y, w, out=out)

    def normal(self, x):
        return x * self._w(x, square=True)

    @classmethod
    def example(cls):
        return cls(np.random.default_rng(7).random((4, 5, 3)).astype(np.float32))
