"""Tests of susceptibility referencing (qsmkit_reference)."""

import numpy as np
import pytest

from qsmkit.errors import GeometryError, StageError
from qsmkit.plugins import load_registry
from qsmkit.stage import StageContext
from qsmkit.volume import Volume
from qsmkit_reference import ReferenceMean, ReferenceNone, reference_to_region


def _case():
    rng = np.random.default_rng(0)
    chi = rng.normal(0.05, 0.02, (10, 12, 8)).astype(np.float32)
    mask = np.zeros(chi.shape, bool)
    mask[2:8, 3:10, 1:7] = True
    chi[~mask] = 7.0  # junk outside the mask must not enter the reference value
    chi[4, 5, 3] = 3.0  # one outlier inside (e.g. a vein)
    return chi, mask


def test_mean_and_median_referencing():
    chi, mask = _case()
    out, ref = reference_to_region(chi, mask)
    assert ref == pytest.approx(float(chi[mask].astype(np.float64).mean()), rel=1e-6)
    assert abs(float(out[mask].astype(np.float64).mean())) < 1e-6
    assert np.all(out[~mask] == 0) and out.dtype == np.float32
    np.testing.assert_allclose(out[mask], chi[mask] - ref, atol=1e-6)
    out_med, ref_med = reference_to_region(chi, mask, statistic="median")
    assert ref_med == pytest.approx(float(np.median(chi[mask])))
    assert abs(ref_med - 0.05) < abs(ref - 0.05)  # the median ignores the outlier
    # an explicit region (e.g. a CSF ROI) sets the zero
    region = np.zeros_like(mask)
    region[3:5, 4:6, 2:4] = True
    out_r, ref_r = reference_to_region(chi, mask, region)
    assert abs(float(out_r[region].astype(np.float64).mean())) < 1e-6
    with pytest.raises(ValueError):
        reference_to_region(chi, mask, np.zeros_like(mask))


def _ctx(chi, mask):
    return StageContext({"chi": Volume.from_array(chi, units="ppm"), "mask": Volume.from_array(mask)},
                        stage_label="reference/mean", log=lambda s: None)


def test_stages():
    chi, mask = _case()
    out = ReferenceMean().run(_ctx(chi, mask), ReferenceMean.validate_params({}, "s"))["chi"]
    assert out.units == "ppm" and abs(float(out.data[mask].astype(np.float64).mean())) < 1e-6
    out = ReferenceMean().run(_ctx(chi, mask), ReferenceMean.validate_params({"statistic": "median"}, "s"))["chi"]
    assert float(np.median(out.data[mask])) == pytest.approx(0.0, abs=1e-7)
    same = ReferenceNone().run(_ctx(chi, mask), ReferenceNone.validate_params({}, "s"))["chi"]
    np.testing.assert_array_equal(same.data, chi)
    with pytest.raises(StageError, match="empty"):
        ReferenceMean().run(_ctx(chi, np.zeros_like(mask)), ReferenceMean.validate_params({}, "s"))
    with pytest.raises(GeometryError):
        ReferenceMean().run(_ctx(chi, mask[:-1]), ReferenceMean.validate_params({}, "s"))
    reg = load_registry()
    assert reg.get("reference", "mean") is ReferenceMean and reg.get("reference", "none") is ReferenceNone


def test_referencing_the_phantom_truth(phantom_small):
    """Phantom chi (ppm relative to CSF) referenced to the mask mean, and back to a CSF region."""
    chi = phantom_small.truth["chi"].data
    mask = phantom_small.truth["mask"].data
    labels = phantom_small.truth["labels"].data
    out, ref = reference_to_region(chi, mask)
    assert abs(ref) > 1e-3  # the brain's mean chi is not that of CSF
    np.testing.assert_allclose(out[mask], chi[mask] - ref, atol=1e-6)
    csf = mask & (labels == 1)
    back, ref_csf = reference_to_region(out, mask, csf)
    assert abs(float(back[csf].astype(np.float64).mean())) < 1e-6
    # both referencings differ by one constant only
    d = (back - chi)[mask]
    assert np.ptp(d) < 1e-5
