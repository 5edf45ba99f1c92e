"""Hostile or degenerate k-space HDF5 files: one-line error, exit status 2, nothing written, no allocation.

The files are tiny but claim absurd shapes (chunked datasets never written, ``maxshape`` resizes,
empty axes); the readers must refuse them from the shapes alone, before reading (a regression
would try to allocate terabytes and fail with MemoryError, or be killed).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from helpers import run_cli  # noqa: E402

HUGE = (100_000, 16, 640, 368)  # complex64: 3 TB


def _ks(shape=(3, 4, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def _pipeline(folder, data, reader="fastmri", stages=None, slices=None):
    extra = f", slices: '{slices}'" if slices else ""
    stages = stages or ["{stage: recon, method: zero_filled}"]
    lines = "".join(f"  - {s}\n" for s in [f"{{stage: kspace_read, method: {reader}}}", *stages])
    p = folder / "p.yaml"
    p.write_text(f"inputs: {{kspace: {data.name}, format: {reader}{extra}}}\nstages:\n{lines}output_dir: out\n")
    return p


@contextlib.contextmanager
def _memory_cap(extra=2 << 30):
    """Cap this process's address space at its current size + ``extra`` while the CLI runs.

    A regression that allocates what a hostile file claims then fails fast with MemoryError
    (and the test fails on the message) instead of swapping the machine.
    """
    try:
        import resource

        with open("/proc/self/statm") as fh:
            vm = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        yield
        return
    cap = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _refused(capsys, folder, pipeline, *needles):
    with _memory_cap():
        code, out, err = run_cli(["run", pipeline], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2, (code, err)
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err and "internal error" not in err
    for needle in needles:
        assert needle in errors[0], errors[0]
    out_dir = folder / "out"
    assert not out_dir.exists() or not any(out_dir.iterdir())
    return errors[0]


# ------------------------------------------------------------------------------------------ fastMRI
def _fm(path, **datasets):
    with h5py.File(path, "w") as f:
        if "kspace" not in datasets:
            f["kspace"] = _ks()
        for name, make in datasets.items():
            make(f, name)
    return path


def _unwritten(shape, dtype=np.complex64, **kw):
    return lambda f, name: f.create_dataset(name, shape=shape, dtype=dtype, **kw)


def _resized(f, name):
    d = f.create_dataset(name, data=_ks((1, 2, 16, 16)), maxshape=(None, 2, 16, 16), chunks=(1, 2, 16, 16))
    d.resize((10 ** 6, 2, 16, 16))


def _data(a):
    return lambda f, name: f.create_dataset(name, data=a)


FASTMRI_CASES = {
    "chunked_never_written": ({"kspace": _unwritten(HUGE, chunks=(1, 1, 640, 368))}, ["'kspace'", str(HUGE), "file is only"]),
    "gzip_never_written": ({"kspace": _unwritten(HUGE, chunks=(1, 1, 640, 368), compression="gzip")},
                           ["'kspace'", str(HUGE), "compression"]),
    "contiguous_never_written": ({"kspace": _unwritten((1000, 16, 640, 368))}, ["'kspace'", "(1000, 16, 640, 368)"]),
    "maxshape_resized": ({"kspace": _resized}, ["'kspace'", "(1000000, 2, 16, 16)"]),
    "no_slices": ({"kspace": _unwritten((0, 4, 16, 16))}, ["'kspace'", "(0, 4, 16, 16)", "empty axis"]),
    "no_coils": ({"kspace": _data(np.zeros((3, 0, 16, 16), np.complex64))}, ["(3, 0, 16, 16)", "empty axis"]),
    "one_sample_per_slice": ({"kspace": _data(_ks((3, 4, 1, 1)))}, ["(3, 4, 1, 1)", "1 x 1 samples", "at least 8"]),
    "too_few_columns": ({"kspace": _data(_ks((3, 4, 32, 4)))}, ["(3, 4, 32, 4)", "32 x 4 samples"]),
    "single_coil_too_small": ({"kspace": _data(_ks((3, 16, 2)))}, ["(3, 16, 2)", "(slices, H, W)"]),
    "two_axes": ({"kspace": _data(_ks((16, 16)))}, ["kspace has shape (16, 16)", "(slices, coils, H, W)"]),
    "mask_absurd": ({"mask": _unwritten((10 ** 10,), dtype=bool, chunks=(1 << 20,))}, ["'mask'", "(10000000000,)"]),
    "target_absurd": ({"reconstruction_rss": _unwritten((3, 10 ** 5, 10 ** 5), dtype=np.float32, chunks=(1, 64, 64))},
                      ["'reconstruction_rss'", "(3, 100000, 100000)"]),
    "target_is_a_group": ({"reconstruction_rss": lambda f, name: f.create_group(name)},
                          ["'reconstruction_rss' is a group"]),
    "mask_is_a_group": ({"mask": lambda f, name: f.create_group(name)}, ["'mask' is a group"]),
    "header_absurd": ({"ismrmrd_header": _unwritten((10 ** 9,), dtype=np.uint8, chunks=(1 << 16,))},
                      ["'ismrmrd_header'", "(1000000000,)"]),
}


@pytest.mark.parametrize("case", sorted(FASTMRI_CASES))
def test_hostile_fastmri_file(tmp_path, capsys, case):
    datasets, needles = FASTMRI_CASES[case]
    f = _fm(tmp_path / "bad.h5", **datasets)
    assert f.stat().st_size < 1 << 20  # the files are small; only their claims are large
    _refused(capsys, tmp_path, _pipeline(tmp_path, f), "bad.h5", *needles)


# ------------------------------------------------------------------------------------------ skm-tea
def _skm(path, kspace=None, maps=True, target=None, masks=None):
    x, y, z, e, c = 4, 16, 16, 1, 2
    with h5py.File(path, "w") as f:
        (kspace or _data(_ks((x, y, z, e, c))))(f, "kspace")
        if maps:
            f["maps"] = _ks((x, y, z, c, 1))
        if target is not None:
            target(f, "target")
        if masks is not None:
            g = f.create_group("masks")
            masks(g, "poisson_6.0x")
    return path


SKMTEA_CASES = {
    "kspace_never_written": (dict(kspace=_unwritten((10 ** 4, 512, 512, 2, 16), chunks=(1, 64, 64, 1, 16)), maps=False),
                             ["'kspace'", "(10000, 512, 512, 2, 16)"]),
    "kspace_degenerate": (dict(kspace=_data(_ks((4, 2, 2, 1, 2))), maps=False), ["(4, 2, 2, 1, 2)", "2 x 2 samples"]),
    "kspace_empty_echo": (dict(kspace=_unwritten((4, 16, 16, 0, 2)), maps=False), ["(4, 16, 16, 0, 2)", "empty axis"]),
    "target_is_a_group": (dict(target=lambda f, name: f.create_group(name)), ["'target' is a group"]),
    "maps_is_a_group": (dict(maps=False, kspace=lambda f, name: (f.create_dataset(name, data=_ks((4, 16, 16, 1, 2))),
                                                                 f.create_group("maps"))), ["'maps' is a group"]),
    "masks_is_a_dataset": (dict(masks=None, target=lambda f, name: f.create_dataset("masks", data=np.ones(3))),
                           ["'masks' is a dataset"]),
    "target_absurd": (dict(target=_unwritten((4, 16, 16, 1, 10 ** 7), chunks=(1, 16, 16, 1, 1024))),
                      ["'target'", "(4, 16, 16, 1, 10000000)"]),
}


@pytest.mark.parametrize("case", sorted(SKMTEA_CASES))
def test_hostile_skmtea_file(tmp_path, capsys, case):
    kw, needles = SKMTEA_CASES[case]
    f = _skm(tmp_path / "bad.h5", **kw)
    _refused(capsys, tmp_path, _pipeline(tmp_path, f, "skmtea"), "bad.h5", *needles)


def test_skmtea_maps_claiming_absurd_shape(tmp_path, capsys):
    f = tmp_path / "bad.h5"
    with h5py.File(f, "w") as h:
        h["kspace"] = _ks((4, 16, 16, 1, 2))
        h.create_dataset("maps", shape=(4, 16, 16, 2, 10 ** 7), dtype=np.complex64, chunks=(1, 16, 16, 2, 1024))
    _refused(capsys, tmp_path, _pipeline(tmp_path, f, "skmtea"), "bad.h5", "'maps'", "(4, 16, 16, 2, 10000000)")


def test_skmtea_stored_mask_claiming_absurd_shape(tmp_path, capsys):
    f = _skm(tmp_path / "bad.h5", masks=_unwritten((10 ** 5, 10 ** 5), dtype=bool, chunks=(256, 256)))
    p = _pipeline(tmp_path, f, "skmtea", ["{stage: undersample, method: from_file, params: {acceleration: 6}}",
                                          "{stage: recon, method: zero_filled}"])
    _refused(capsys, tmp_path, p, "bad.h5", "'masks/poisson_6.0x'", "(100000, 100000)")


def test_maps_file_claiming_absurd_shape_or_other_grid(tmp_path, capsys):
    data = _skm(tmp_path / "data.h5", maps=False)
    maps = tmp_path / "maps.h5"
    with h5py.File(maps, "w") as h:
        h.create_dataset("maps", shape=(4, 16, 16, 2, 10 ** 7), dtype=np.complex64, chunks=(1, 16, 16, 2, 1024))
        h["small"] = _ks((2, 16, 16, 2, 1))  # 2 readout slices, the data has 4
    for dataset, needles in (("maps", ["maps.h5", "'maps'", "(4, 16, 16, 2, 10000000)"]),
                             ("small", ["maps.h5", "small of shape (2, 16, 16, 2, 1) does not match"])):
        p = _pipeline(tmp_path, data, "skmtea", [
            f"{{stage: coil_maps, method: from_file, params: {{path: {maps}, dataset: {dataset}}}}}",
            "{stage: recon, method: sense}"])
        _refused(capsys, tmp_path, p, *needles)


# ------------------------------------------------------------------------------- memory and slices
def test_read_larger_than_available_memory_suggests_slices(tmp_path, capsys, monkeypatch):
    import qsmkit.io.nifti as nifti

    f = _fm(tmp_path / "big.h5")
    monkeypatch.setattr(nifti, "available_memory", lambda: 20_000)  # bytes; 3 slices need 24 KiB
    msg = _refused(capsys, tmp_path, _pipeline(tmp_path, f), "big.h5", "reading 3 slice(s) of kspace (3, 4, 16, 16)",
                   "inputs.slices")
    assert "available" in msg
    code, out, err = run_cli(["run", _pipeline(tmp_path, f, slices="0:1")], capsys)  # one slice fits
    assert code == 0, err


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                 RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't "
                                              "allocate memory: you tried to allocate 7290000000 bytes")])
def test_out_of_memory_in_recon_names_the_shape_and_slices(tmp_path, capsys, monkeypatch, exc):
    import qsmkit_kspace

    def boom(self, y, maps, mask, p, ctx):
        raise exc

    monkeypatch.setattr(qsmkit_kspace.ZeroFilled, "reconstruct", boom)
    f = _fm(tmp_path / "k.h5")
    msg = _refused(capsys, tmp_path, _pipeline(tmp_path, f), "recon/zero_filled", "out of memory",
                   "(3 x 4 x 16 x 16) of k.h5", "inputs.slices", "batch_slices")
    assert "crop the volume" not in msg


def test_out_of_memory_in_undersampling_and_reading(tmp_path, capsys, monkeypatch):
    from qsmkit_kspace import stages_undersample
    from qsmkit_kspace.fastmri import FastMRIFile

    def boom(*args, **kwargs):
        raise MemoryError()

    f = _fm(tmp_path / "k.h5")
    monkeypatch.setattr(stages_undersample, "_apply_mask", boom)
    p = _pipeline(tmp_path, f, stages=["{stage: undersample, method: equispaced}", "{stage: recon, method: zero_filled}"])
    _refused(capsys, tmp_path, p, "undersample/equispaced: out of memory", "(3 x 4 x 16 x 16) of k.h5", "inputs.slices")
    monkeypatch.setattr(FastMRIFile, "read_kspace", boom)
    _refused(capsys, tmp_path, p, "kspace_read/fastmri: out of memory", "(3 x 4 x 16 x 16) of k.h5", "inputs.slices")


def test_other_runtime_errors_are_not_called_out_of_memory():
    from qsmkit.kspace import is_out_of_memory

    assert is_out_of_memory(MemoryError()) and is_out_of_memory(RuntimeError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("MKL FFT error")) and not is_out_of_memory(ValueError("out of memory"))


def test_slice_ranges_are_not_expanded_before_selection():
    from qsmkit_kspace.kdata import parse_slices

    assert parse_slices("0:1000000000000", 3) == [0, 1, 2]
    assert parse_slices("-2:", 10 ** 12) == [10 ** 12 - 2, 10 ** 12 - 1]  # a range, never a list of 1e12
