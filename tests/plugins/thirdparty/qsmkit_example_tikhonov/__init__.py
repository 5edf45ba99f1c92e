"""A third-party qsmkit plugin, packaged on its own: closed-form Tikhonov dipole inversion.

``chi = ifft(D F / (D^2 + alpha))``. It is found by qsmkit only through the ``qsmkit``
entry-point group of this distribution, exactly as any external package would be.
"""

import numpy as np

from qsmkit import Param, Stage, hookimpl
from qsmkit.operators import Dipole


def tikhonov(field, mask, voxel_size, b0_dir, alpha=0.01, padding=1.5):
    """Closed-form Tikhonov inversion of a local field (ppm) -> chi (ppm), on the core Dipole operator."""
    m = mask > 0
    dipole = Dipole(m.shape, voxel_size, b0_dir, padding=padding)
    d = dipole.kernel
    chi = dipole.filter(np.where(m, field, 0).astype(np.float32), d / (d * d + np.float32(alpha)))
    return np.where(m, chi, 0).astype(np.float32)


class Tikhonov(Stage):
    kind, name = "inversion", "example_tikhonov"
    reads, writes = ("local_field", "mask"), ("chi",)
    description = "example third-party plugin: closed-form Tikhonov inversion"
    params = (Param("alpha", float, 0.01, range=(0.0, 10.0), doc="Tikhonov weight"),)

    def run(self, ctx, p):
        f = ctx["local_field"]
        chi = tikhonov(f.data, ctx["mask"].data, f.voxel_size, f.b0_direction, p.alpha)
        return {"chi": f.like(chi, units="ppm")}


@hookimpl
def qsmkit_register_stages(registry):
    registry.add(Tikhonov)
