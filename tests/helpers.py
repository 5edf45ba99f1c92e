"""Small helpers shared by the core tests (importable because setup.cfg sets pythonpath = tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmkit.cli import main as cli_main


def oblique_affine(voxel_size=(0.6, 0.6, 2.0), tilt_deg=20.0, axis="x", offset=(-40.0, 12.0, 7.5)) -> np.ndarray:
    """A 4x4 affine with anisotropic voxels rotated by ``tilt_deg`` about a world axis."""
    t = np.deg2rad(tilt_deg)
    c, s = np.cos(t), np.sin(t)
    rot = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
           "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    a = np.eye(4)
    a[:3, :3] = np.asarray(rot) @ np.diag(voxel_size)
    a[:3, 3] = offset
    return a


def write_nifti(path, data, affine=None, sform_code=1, qform_code=1) -> Path:
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_sform(affine, sform_code)
    img.header.set_qform(affine, qform_code)
    nib.save(img, str(path))
    return Path(path)


def sphere_field(shape, voxel_size, radius_mm, chi, b0_dir):
    """Analytic field (ppm) of a uniformly magnetised sphere (Lorentz-corrected: 0 inside)."""
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    grids = np.meshgrid(*[(np.arange(n) - n // 2) * v for n, v in zip(shape, voxel_size)], indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grids))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = sum(g * bi for g, bi in zip(grids, b)) / r
        field = chi * radius_mm ** 3 / (3 * r ** 3) * (3 * cos ** 2 - 1)
    field[r <= radius_mm] = 0.0
    return field.astype(np.float32), r


def run_cli(args, capsys=None):
    """Run the CLI in-process; returns (exit code, stdout, stderr) when ``capsys`` is given."""
    code = cli_main([str(a) for a in args])
    if capsys is None:
        return code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli_subprocess(args, env_extra=None, cwd=None):
    """Run ``python -m qsmkit.cli`` in a subprocess (for entry-point discovery through PYTHONPATH)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "qsmkit.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def run_stage(cls, art, params=None):
    """Run a Stage class on a dict of artifacts; return the artifacts updated with its outputs."""
    from qsmkit.stage import StageContext

    p = cls.validate_params(params or {}, where="stages.0")
    ctx = StageContext(dict(art), stage_label=f"{cls.kind}/{cls.name}", log=lambda m: None)
    out = cls().run(ctx, p)
    return {**art, **out, **({"metrics": ctx.metrics} if getattr(ctx, "metrics", None) else {})}
