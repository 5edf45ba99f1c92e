"""A catalogue of bad inputs and process faults (issue 16): NIfTI, YAML, k-space HDF5, output folders.

Every case asserts: one ``error:`` line (the last line on stderr, no traceback), exit status 2,
nothing written to the output folder, and every input file byte-for-byte untouched. The cases
that would allocate gigabytes if a check regressed (memory bombs) run in a subprocess under an
address-space limit (``resource.setrlimit``), so a regression fails instead of swapping.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from helpers import oblique_affine, run_cli, write_nifti

SHAPE = (12, 12, 10)
AFFINE = oblique_affine((1.0, 1.0, 1.5), 10.0)
TE = "[0.004, 0.008, 0.012]"
GOOD = f"magnitude: mag.nii.gz, phase: phase.nii.gz, echo_times: {TE}, field_strength: 3.0"
FIELD = "local_field: lf.nii.gz, mask: mask.nii.gz"
TKD = "  - {stage: inversion, method: tkd}\n"
CHAIN = ("  - {stage: mask, method: threshold}\n  - {stage: unwrap, method: laplacian}\n"
         "  - {stage: echo_combine, method: weighted_fit}\n")
KSPACE = "  - {stage: kspace_read, method: fastmri}\n  - {stage: recon, method: zero_filled}\n"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "out" not in p.relative_to(folder).parts}


@pytest.fixture(scope="module")
def kspace_file(tmp_path_factory):
    from qsmkit_kspace.simulate import simulate_kspace_files

    d = tmp_path_factory.mktemp("kspace")
    return simulate_kspace_files(d, matrix=(32, 40), n_slices=2, n_coils=4, skmtea_shape=(4, 32, 24),
                                 accelerations=(4.0,), noise=0.001, seed=1)["fastmri"]


@pytest.fixture
def folder(tmp_path, kspace_file):
    rng = np.random.default_rng(0)
    write_nifti(tmp_path / "mag.nii.gz", rng.uniform(1, 2, SHAPE + (3,)).astype(np.float32), AFFINE)
    write_nifti(tmp_path / "phase.nii.gz", rng.uniform(-3.1, 3.1, SHAPE + (3,)).astype(np.float32), AFFINE)
    write_nifti(tmp_path / "lf.nii.gz", rng.normal(0, 0.01, SHAPE).astype(np.float32), AFFINE)
    write_nifti(tmp_path / "mask.nii.gz", np.ones(SHAPE, np.uint8), AFFINE)
    (tmp_path / "k.h5").write_bytes(Path(kspace_file).read_bytes())
    return tmp_path


def pipeline(folder: Path, inputs: str = FIELD, stages: str = TKD, extra: str = "", out: str = "out") -> Path:
    p = folder / "p.yaml"
    p.write_text(f"name: t\ninputs: {{{inputs}}}\nstages:\n{stages}{extra}output_dir: {out}\n")
    return p


# --------------------------------------------------------------------------- file makers
def _nii(folder, name, data, affine=AFFINE, **codes):
    write_nifti(folder / name, data, affine, **codes)


def _sform_only(folder, name, sform):
    """A file whose sform (code 1) is ``sform`` and whose qform is unset (nibabel cannot write such a qform)."""
    img = nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4))
    hdr = img.header
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    for i, row in enumerate(("srow_x", "srow_y", "srow_z")):
        hdr[row] = sform[i]
    nib.save(nib.Nifti1Image(img.dataobj, None, hdr), str(folder / name))


def _claims(folder, name, shape, gz=True):
    """A tiny file whose header claims ``shape`` of float32 (the data are missing)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.eye(4), 1)
    raw = hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64
    path = folder / name
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _truncate(folder, name, keep):
    p = folder / name
    data = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(data[:keep]))


def _sidecar(folder, obj, name="phase.json"):
    (folder / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _per_echo(folder, n=3, shape=SHAPE, bad=None):
    rng = np.random.default_rng(1)
    for e in range(n):
        for part in ("mag", "phase"):
            s = bad if (bad is not None and e == n - 1) else shape
            _nii(folder, f"e{e}_{part}.nii.gz", rng.uniform(0.5, 1.0, s).astype(np.float32))
    return lambda part, k=n: "[" + ", ".join(f"e{e}_{part}.nii.gz" for e in range(k)) + "]"


def _h5(folder, name, **datasets):
    import h5py

    with h5py.File(folder / name, "w") as f:
        for key, value in datasets.items():
            if isinstance(value, tuple):  # (shape, dtype): a chunked dataset with no data written
                f.create_dataset(key, shape=value[0], dtype=value[1], chunks=True)
            else:
                f.create_dataset(key, data=value)


# --------------------------------------------------------------------------- the catalogue
Case = tuple[str, Callable[[Path], list], str]


def P(inputs=FIELD, stages=TKD, extra="", out="out", args=()):
    """A case body that writes a pipeline and returns the CLI arguments to run it."""
    return lambda f: ["run", pipeline(f, inputs, stages, extra, out), *args]


def with_(prepare, body):
    def run(f):
        prepare(f)
        return body(f)
    return run


rng = np.random.default_rng(2)
NIFTI: list[Case] = [
    ("missing-file", P(f"magnitude: nope.nii.gz, phase: phase.nii.gz, echo_times: {TE}, field_strength: 3",
                       CHAIN), "inputs.magnitude: file not found"),
    ("garbage-gz", with_(lambda f: (f / "lf.nii.gz").write_bytes(b"\x1f\x8b garbage"), P()),
     "is not a readable NIfTI file"),
    ("empty-nii", with_(lambda f: (f / "x.nii").write_bytes(b""), P("local_field: x.nii, mask: mask.nii.gz")),
     "is not a readable NIfTI file"),
    ("text-as-nii", with_(lambda f: (f / "x.nii").write_text("hello " * 100), P("local_field: x.nii, mask: mask.nii.gz")),
     "is not a readable NIfTI file"),
    ("truncated-gz", with_(lambda f: _truncate(f, "lf.nii.gz", 600), P()), "the file holds less data"),
    ("truncated-nii", with_(lambda f: (f / "x.nii").write_bytes(gzip.decompress((f / "lf.nii.gz").read_bytes())[:700]),
                            P("local_field: x.nii, mask: mask.nii.gz")), "the file holds less data"),
    ("2d-image", with_(lambda f: _nii(f, "lf.nii.gz", np.zeros((12, 12), np.float32)), P()), "expected 3D"),
    ("5d-image", with_(lambda f: _nii(f, "lf.nii.gz", np.zeros(SHAPE + (2, 2), np.float32)), P()), "expected 3D"),
    ("complex-data", with_(lambda f: _nii(f, "lf.nii.gz", np.zeros(SHAPE, np.complex64)), P()), "holds complex data"),
    ("nan-voxel", with_(lambda f: _nii(f, "lf.nii.gz", np.where(np.arange(1440).reshape(SHAPE) == 7, np.nan, 0)
                                     .astype(np.float32)), P()), "contains 1 NaN/inf voxels"),
    ("inf-voxel", with_(lambda f: _nii(f, "lf.nii.gz", np.where(np.arange(1440).reshape(SHAPE) == 7, np.inf, 0)
                                     .astype(np.float32)), P()), "contains 1 NaN/inf voxels"),
    ("grid-mismatch", with_(lambda f: _nii(f, "mask.nii.gz", np.ones((12, 12, 9), np.uint8)), P()),
     "must be on the same voxel grid"),
    ("affine-mismatch", with_(lambda f: _nii(f, "mask.nii.gz", np.ones(SHAPE, np.uint8), oblique_affine((1, 1, 1.5), 12.0)),
                              P()), "have different affines"),
    ("zero-affine", with_(lambda f: _sform_only(f, "lf.nii.gz", np.zeros((4, 4))), P()), "singular or non-finite affine"),
    ("singular-affine", with_(lambda f: _sform_only(f, "lf.nii.gz", np.diag([1.0, 0.0, 1.0, 1.0])), P()),
     "singular or non-finite affine"),
    ("qform-sform-35deg", with_(lambda f: (lambda img: (img.set_qform(oblique_affine((1, 1, 1.5), 45.0), 1),
                                                        nib.save(img, str(f / "lf.nii.gz"))))(nib.load(str(f / "lf.nii.gz"))),
                                P()), "sform and qform rotated 35.0 deg apart"),
    ("echo-count-mismatch", with_(lambda f: _nii(f, "mag.nii.gz", np.ones(SHAPE, np.float32)), P(GOOD, CHAIN)),
     "magnitude has 1 echo(es) but phase has 3"),
    ("phase-not-radians", with_(lambda f: _nii(f, "phase.nii.gz", rng.integers(0, 4096, SHAPE + (3,)).astype(np.float32)),
                                P(GOOD, CHAIN)), "not radians"),
    ("scaled-constant-phase", with_(lambda f: _nii(f, "phase.nii.gz", np.ones(SHAPE + (3,), np.float32)),
                                    P(GOOD + ", phase_units: scaled", CHAIN)), "all values are equal"),
    ("empty-mask", with_(lambda f: _nii(f, "mask.nii.gz", np.zeros(SHAPE, np.uint8)), P()), "the mask is empty"),
    ("4d-mask", with_(lambda f: _nii(f, "mask.nii.gz", np.ones(SHAPE + (2,), np.uint8)), P()), "a mask must be 3D"),
    ("mgz-extension", with_(lambda f: (f / "lf.mgz").write_bytes(b"x"), P("local_field: lf.mgz, mask: mask.nii.gz")),
     "unsupported file type (.mgz)"),
    ("number-as-path", P(f"magnitude: 42, phase: phase.nii.gz, echo_times: {TE}, field_strength: 3", CHAIN),
     "inputs.magnitude must be a path to a NIfTI file"),
    ("folder-as-path", with_(lambda f: (f / "dicoms").mkdir(), P("local_field: dicoms, mask: mask.nii.gz")),
     "is a folder; give the file itself"),
    ("per-echo-4d-file", P(f"magnitude: [mag.nii.gz], phase: [phase.nii.gz], field_strength: 3", CHAIN),
     "per-echo files must be 3D"),
    ("per-echo-lengths", lambda f: P(f"magnitude: {_per_echo(f)('mag', 2)}, phase: {_per_echo(f)('phase')}, "
                                     f"echo_times: {TE}, field_strength: 3", CHAIN)(f),
     "magnitude has 2 echo(es) but phase has 3"),
    ("per-echo-grids", lambda f: P(f"magnitude: {_per_echo(f, bad=(12, 12, 9))('mag')}, phase: "
                                   f"{_per_echo(f, bad=(12, 12, 9))('phase')}, echo_times: {TE}, field_strength: 3",
                                   CHAIN)(f), "is not on the grid of"),
    ("per-echo-not-strings", P(f"magnitude: [1, 2], phase: phase.nii.gz, echo_times: {TE}, field_strength: 3", CHAIN),
     "must be one NIfTI file or a list of per-echo NIfTI files"),
    ("sidecar-invalid-json", with_(lambda f: _sidecar(f, "{not json"), P(GOOD, CHAIN)), "JSON sidecar is not valid JSON"),
    ("sidecar-not-object", with_(lambda f: _sidecar(f, "[1, 2]"), P(GOOD, CHAIN)), "must be an object"),
    ("sidecar-te-disagrees", with_(lambda f: _sidecar(f, {"EchoTime": [0.005, 0.01, 0.015]}), P(GOOD, CHAIN)),
     "disagree with EchoTime"),
    ("sidecar-b0-disagrees", with_(lambda f: _sidecar(f, {"MagneticFieldStrength": 7}), P(GOOD, CHAIN)),
     "disagrees with MagneticFieldStrength 7 T"),
    ("sidecar-te-count", with_(lambda f: _sidecar(f, {"EchoTime": 0.005, "MagneticFieldStrength": 3}),
                               P("magnitude: mag.nii.gz, phase: phase.nii.gz", CHAIN)), "has 1 values but the phase has 3"),
    ("per-echo-sidecar-missing-te", lambda f: (_per_echo(f), _sidecar(f, {"EchoTime": 0.004}, "e0_phase.json"),
                                               _sidecar(f, {"RepetitionTime": 0.03}, "e1_phase.json"),
                                               _sidecar(f, {"EchoTime": 0.012}, "e2_phase.json"),
                                               P(f"magnitude: {_per_echo(f)('mag')}, phase: {_per_echo(f)('phase')}, "
                                                 f"field_strength: 3", CHAIN)(f))[-1], "no single EchoTime"),
    ("no-echo-times", P("magnitude: mag.nii.gz, phase: phase.nii.gz, field_strength: 3", CHAIN), "no echo_times"),
    ("no-field-strength", P(f"magnitude: mag.nii.gz, phase: phase.nii.gz, echo_times: {TE}", CHAIN), "no field_strength"),
    ("echo-times-ms", P(GOOD.replace(TE, "[4, 8, 12]"), CHAIN), "look like milliseconds"),
    ("echo-times-count", P(GOOD.replace(TE, "[0.004, 0.008]"), CHAIN), "has 2 values but the phase has 3"),
    ("echo-times-order", P(GOOD.replace(TE, "[0.004, 0.012, 0.008]"), CHAIN), "must increase strictly"),
    ("field-strength-range", P(GOOD.replace("3.0", "300"), CHAIN), "is outside 0.05-21.1 T"),
    ("field-strength-text", P(GOOD.replace("3.0", "three"), CHAIN), "must be a number in tesla"),
    ("b0-zero", P(FIELD + ", b0_direction: [0, 0, 0]"), "must be a non-zero 3-vector"),
    ("phase-units-bad", P(GOOD + ", phase_units: grad", CHAIN), "choose one of rad, deg, scaled"),
    ("invert-phase-text", P(GOOD + ", invert_phase: maybe", CHAIN), "inputs.invert_phase must be true or false"),
]

YAML: list[Case] = [
    ("yaml-syntax", with_(lambda f: (f / "p.yaml").write_text("inputs: [unclosed\n"), lambda f: ["run", f / "p.yaml"]),
     "not valid YAML at line"),
    ("yaml-python-tag", with_(lambda f: (f / "p.yaml").write_text("inputs: !!python/object/apply:os.system ['true']\n"),
                              lambda f: ["run", f / "p.yaml"]), "allows plain YAML only"),
    ("yaml-top-level-list", with_(lambda f: (f / "p.yaml").write_text("- a\n- b\n"), lambda f: ["run", f / "p.yaml"]),
     "a pipeline must be a YAML mapping"),
    ("yaml-duplicate-key", P(FIELD, "  - {stage: inversion, method: tkd, params: {threshold: 0.1, threshold: 0.2}}\n"),
     "duplicate key 'threshold'"),
    ("yaml-duplicate-input", P(FIELD + ", mask: mask.nii.gz"), "duplicate key 'mask'"),
    ("yaml-alias-bomb", with_(lambda f: (f / "p.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nname: *e\n"), lambda f: ["run", f / "p.yaml"]),
     "an alias bomb"),
    ("yaml-too-large", with_(lambda f: (f / "p.yaml").write_text("name: x\n" + "#" * (1 << 20) + "\n"),
                             lambda f: ["run", f / "p.yaml"]), "larger than 1024 kB"),
    ("yaml-too-deep", with_(lambda f: (f / "p.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n"),
                            lambda f: ["run", f / "p.yaml"]), "nested too deeply"),
    ("yaml-binary", with_(lambda f: (f / "p.yaml").write_bytes(b"\xff\xfe\x00\x01" * 10), lambda f: ["run", f / "p.yaml"]),
     "not a text file"),
    ("pipeline-missing", lambda f: ["run", f / "nope.yaml"], "pipeline file not found"),
    ("pipeline-is-folder", lambda f: ["run", f], "is a folder; give a YAML pipeline file"),
    ("unknown-top-key", P(extra="outputs: here\n"), "unknown key 'outputs' (did you mean 'output_dir'?)"),
    ("unknown-input-key", P(FIELD + ", brainmask: mask.nii.gz"), "unknown key 'brainmask' (did you mean 'mask'?)"),
    ("misspelled-invert", P(GOOD + ", invert_phse: true", CHAIN), "unknown key 'invert_phse' (did you mean 'invert_phase'?)"),
    ("unknown-stage-key", P(FIELD, "  - {stage: inversion, method: tkd, param: {}}\n"), "unknown key 'param'"),
    ("unknown-stage-kind", P(FIELD, "  - {stage: inverse, method: tkd}\n"), "unknown stage kind 'inverse'"),
    ("unknown-method", P(FIELD, "  - {stage: inversion, method: tkdd}\n"), "unknown inversion method 'tkdd'"),
    ("unknown-param", P(FIELD, "  - {stage: inversion, method: tkd, params: {treshold: 0.1}}\n"), "unknown parameter"),
    ("param-out-of-range", P(FIELD, "  - {stage: inversion, method: tkd, params: {threshold: 5}}\n"), "is out of range"),
    ("param-wrong-type", P(FIELD, "  - {stage: inversion, method: tkd, params: {threshold: high}}\n"), "expected a number"),
    ("stages-empty", P(FIELD, ""), "'stages' must be a non-empty list"),
    ("stage-not-mapping", P(FIELD, "  - tkd\n"), "must be a mapping like"),
    ("inputs-missing", with_(lambda f: (f / "p.yaml").write_text("stages:\n" + TKD + "output_dir: out\n"),
                             lambda f: ["run", f / "p.yaml"]), "'inputs' must be a mapping"),
    ("no-output-dir", with_(lambda f: (f / "p.yaml").write_text(f"inputs: {{{FIELD}}}\nstages:\n{TKD}"),
                            lambda f: ["run", f / "p.yaml"]), "no output_dir"),
    ("output-dir-not-path", P(out="[1, 2]"), "output_dir must be a folder path"),
    ("set-bad-index", P(args=("--set", "stages.7.params.threshold=0.2")), "is not an index of a list of 1 items"),
    ("set-no-equals", P(args=("--set", "stages")), "expected dotted.key=value"),
    ("set-unknown-input", P(args=("--set", "inputs.echotimes=[0.01]")), "unknown key 'echotimes'"),
    ("simulate-unknown-option", P("simulate: {snrr: 10}", CHAIN), "unknown option 'snrr' (did you mean 'snr'?)"),
    ("simulate-with-files", P("simulate: {}, mask: mask.nii.gz", CHAIN), "cannot be combined with input files"),
    ("simulate-not-mapping", P("simulate: yes", CHAIN), "inputs.simulate must be a mapping"),
    ("one-orientation", P("orientations: [{magnitude: mag.nii.gz, phase: phase.nii.gz}]", CHAIN),
     "at least two"),
    ("orientation-keys-differ", P(f"orientations: [{{magnitude: mag.nii.gz, phase: phase.nii.gz}}, "
                                  f"{{magnitude: mag.nii.gz, phase: phase.nii.gz, mask: mask.nii.gz}}], "
                                  f"echo_times: {TE}, field_strength: 3", CHAIN), "must give the same keys"),
    ("missing-artifact", P("mask: mask.nii.gz"), "needs 'local_field', which no input or earlier stage provides"),
    ("unknown-click-option", lambda f: ["run", pipeline(f), "--frobnicate"], "No such option '--frobnicate'"),
]

KSPACE_CASES: list[Case] = [
    ("kspace-garbage", with_(lambda f: (f / "k.h5").write_bytes(b"not hdf5 at all" * 10), P("kspace: k.h5", KSPACE)),
     "cannot read"),
    ("kspace-no-dataset", with_(lambda f: _h5(f, "k.h5", other=np.zeros(3)), P("kspace: k.h5", KSPACE)), "has no 'kspace' dataset"),
    ("kspace-wrong-ndim", with_(lambda f: _h5(f, "k.h5", kspace=np.zeros((4, 8), np.complex64)), P("kspace: k.h5", KSPACE)),
     "kspace"),
    ("kspace-real-data", with_(lambda f: _h5(f, "k.h5", kspace=np.zeros((2, 2, 8, 8), np.float32)), P("kspace: k.h5", KSPACE)),
     "kspace"),
    ("kspace-degenerate", with_(lambda f: _h5(f, "k.h5", kspace=np.zeros((3, 4, 1, 1), np.complex64)),
                                P("kspace: k.h5", KSPACE)), "kspace"),
    ("kspace-not-a-path", P("kspace: 42", KSPACE), "inputs.kspace must be a path to an HDF5 file"),
    ("kspace-nifti-extension", P("kspace: lf.nii.gz", KSPACE), "unsupported file type (.nii.gz); give a .h5"),
    ("mask-hdf5-extension", P("local_field: lf.nii.gz, mask: k.h5"), "unsupported file type (.h5); give a .nii"),
    ("kspace-format-mismatch", P("kspace: k.h5, format: skmtea", KSPACE), "inputs.format is 'skmtea'"),
    ("kspace-bad-slices", P("kspace: k.h5, slices: '9:20'", KSPACE), "selects no slice"),
]


def _hold_lock(f: Path):
    import fcntl

    (f / "out").mkdir()
    fd = os.open(f / "out", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held.append(fd)


_held: list[int] = []

PROCESS: list[Case] = [
    ("output-is-file", with_(lambda f: (f / "out").write_text("x"), P()), "is a file; give a folder"),
    ("output-below-file", with_(lambda f: (f / "afile").write_text("x"), P(out="afile/sub")), "which is a file"),
    ("output-unwritable", P(out="/proc/qsmkit-catalogue"), "output_dir /proc/qsmkit-catalogue"),
    ("output-overwrites-input", with_(lambda f: _nii(f, "chi.nii.gz", np.zeros(SHAPE, np.float32)),
                                      P(FIELD + ", noise_weight: chi.nii.gz", out=".")), "would overwrite the input file"),
    ("output-foreign-files", with_(lambda f: ((f / "out").mkdir(), (f / "out" / "chi.nii.gz").write_bytes(b"mine")), P()),
     "holds files qsmkit did not write"),
    ("output-locked", with_(_hold_lock, P()), "in use by another qsmkit run"),
    ("output-option-is-file", with_(lambda f: (f / "ofile").write_text("x"), P(args=("-o", "ofile"))), "is a file"),
]

CASES = NIFTI + YAML + KSPACE_CASES + PROCESS


def test_catalogue_is_large_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, make, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(folder, capsys, monkeypatch, name, make, needle):
    monkeypatch.chdir(folder)
    args = make(folder)
    before = _digest(folder)
    out_before = sorted(p.name for p in (folder / "out").iterdir()) if (folder / "out").is_dir() else None
    try:
        code = run_cli(args)
    finally:
        while _held:
            os.close(_held.pop())
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2, (code, err)
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err and "internal error" not in err
    assert needle in errors[0], errors[0]
    out = folder / "out"
    after = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    assert after == out_before, after
    assert _digest(folder) == before


# --------------------------------------------------------------------------- memory bombs
BOMB_LIMIT = 3 << 30  # address space for the subprocess: far below what the claimed files would need

_RUNNER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from qsmkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_limited(args, cwd):
    code = _RUNNER.format(limit=BOMB_LIMIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QSMKIT_BLOCK_PLUGINS": "dip,medi,cosmos,register"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


BOMBS = [  # (name, make the file, inputs, stages, needle)
    ("gz-80-bytes-claims-4GB", lambda f: _claims(f, "lf.nii.gz", (1024, 1024, 1024)), FIELD, TKD,
     "the file holds less data"),
    ("gz-claims-1150-cubed", lambda f: _claims(f, "lf.nii.gz", (1150, 1150, 1150)), FIELD, TKD,
     "the file holds less data"),
    ("nii-claims-4GB", lambda f: _claims(f, "x.nii", (1024, 1024, 1024), gz=False),
     "local_field: x.nii, mask: mask.nii.gz", TKD, "the file holds less data"),
    ("h5-claims-absurd-kspace", lambda f: _h5(f, "k.h5", kspace=((4096, 64, 2048, 2048), np.complex64)),
     "kspace: k.h5", KSPACE, "dataset 'kspace' claims shape (4096, 64, 2048, 2048)"),
]


@pytest.mark.parametrize("name, make, inputs, stages, needle", BOMBS, ids=[b[0] for b in BOMBS])
def test_memory_bomb_refused_under_a_memory_limit(folder, name, make, inputs, stages, needle):
    make(folder)
    p = pipeline(folder, inputs, stages)
    before = _digest(folder)
    proc = _run_limited(["run", p], folder)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert not (folder / "out").exists() and _digest(folder) == before


@pytest.mark.parametrize("name, make, needle", KSPACE_CASES, ids=[c[0] for c in KSPACE_CASES])
def test_kspace_case_fails_at_validation_too(folder, capsys, monkeypatch, name, make, needle):
    """``qsmkit validate`` opens the k-space file's structure, so it agrees with ``qsmkit run``."""
    monkeypatch.chdir(folder)
    args = make(folder)
    code = run_cli(["validate", *args[1:]])
    err = capsys.readouterr().err
    assert code == 2 and needle in err.strip().splitlines()[-1], err
