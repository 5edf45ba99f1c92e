"""Shared pytest fixtures: simulated head phantoms with ground truth (session-scoped, cached).

``phantom_small``
    :func:`qsmkit.simulate.simulate_phantom` on a 64^3 grid at 1 mm (a small head filling ~84 %
    of the 64 mm FOV), the default echo times (4, 8, 12, 16, 20 ms), 3 T, B0 along z, SNR 100,
    oversample 2, seed 0. ``phantom.artifacts()`` gives the pipeline artifacts
    (magnitude, phase, echo_times, field_strength, truth); ``phantom.truth`` holds ``chi``,
    ``local_field``, ``total_field``, ``mask`` and ``labels`` Volumes.
``phantom_noiseless``
    The same head and grid with ``snr=None`` (no noise).

Both take about a second to build once per test session. Treat them as read-only (copy arrays
before modifying them): they are shared by every test in the session.
"""

from __future__ import annotations

import pytest

SMALL_PHANTOM_KW = dict(shape=(64, 64, 64), voxel_size=(1.0, 1.0, 1.0), seed=0)


@pytest.fixture(scope="session")
def phantom_small():
    """64^3, 1 mm, 5 echoes, 3 T, SNR 100, seed 0 (see the module docstring)."""
    from qsmkit.simulate import simulate_phantom

    return simulate_phantom(**SMALL_PHANTOM_KW)


@pytest.fixture(scope="session")
def phantom_noiseless():
    """As ``phantom_small`` but noise-free (``snr=None``)."""
    from qsmkit.simulate import simulate_phantom

    return simulate_phantom(snr=None, **SMALL_PHANTOM_KW)
