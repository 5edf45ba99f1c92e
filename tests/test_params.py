"""Shared parameter conventions (qsmkit.params): one spelling, deprecated aliases, ``device``
accepted by every stage, ``p.lam``; errors of the pure functions are QsmkitErrors and ValueErrors."""

from __future__ import annotations

import numpy as np
import pytest

from qsmkit import Stage
from qsmkit.errors import ConfigError, GeometryError, InputDataError, ParameterError, QsmkitError
from qsmkit.params import CPU_DEVICE, DEVICE, ITERATIONS, lam, max_iter, tol, use_noise_weight
from qsmkit.plugins import load_registry


class _Solver(Stage):
    kind, name = "inversion", "toy"
    params = (max_iter(50, aliases=ITERATIONS), tol(1e-3), lam(0.5, aliases=("regularization",)),
              use_noise_weight(True, aliases=("use_noise_weights",)), DEVICE)


def _deprecations(err: str) -> list[str]:
    return [line for line in err.splitlines() if "deprecated" in line]


def test_old_spelling_is_accepted_with_one_stderr_line_and_gives_the_same_params(capsys):
    new = _Solver.validate_params({"max_iter": 7, "lambda": 0.1, "use_noise_weight": False}, "stages.3")
    assert _deprecations(capsys.readouterr().err) == []
    old = _Solver.validate_params({"iterations": 7, "regularization": 0.1, "use_noise_weights": False}, "stages.3")
    lines = _deprecations(capsys.readouterr().err)
    assert dict(old) == dict(new)
    assert len(lines) == 3  # one line per old spelling
    assert any("stages.3.params.iterations" in s and "'max_iter'" in s for s in lines)
    assert any("regularization" in s and "'lambda'" in s for s in lines)
    assert any("use_noise_weights" in s and "'use_noise_weight'" in s for s in lines)


def test_old_and_new_spelling_together_is_an_error():
    with pytest.raises(ParameterError, match="iterations.*max_iter"):
        _Solver.validate_params({"iterations": 3, "max_iter": 4}, "stages.0")


def test_old_spelling_is_still_range_checked_under_its_new_name():
    with pytest.raises(ParameterError, match=r"max_iter = 0 is out of range"):
        _Solver.validate_params({"iterations": 0}, "stages.0")


def test_lambda_is_readable_as_lam():
    p = _Solver.validate_params({"lambda": 2.5}, "s")
    assert p.lam == p["lambda"] == 2.5
    with pytest.raises(AttributeError):
        p.no_such_parameter  # noqa: B018


def test_builtin_stages_use_the_shared_spellings(capsys):
    reg = load_registry()
    old = {"iterations", "use_noise_weights", "regularization"}
    for (kind, name), cls in reg.items():
        declared = {p.name for p in cls.params}
        assert not declared & old, f"{kind}/{name} declares {declared & old}"
    # the renamed parameters of the built-ins still accept their old names
    cos = reg.get("inversion", "cosmos").validate_params({"regularization": 0.01, "use_noise_weights": False}, "s")
    assert cos.lam == 0.01 and cos.use_noise_weight is False
    un = reg.get("unwrap", "laplacian").validate_params({"iterations": 12}, "s")
    assert un.max_iter == 12
    assert len(_deprecations(capsys.readouterr().err)) == 3


def test_every_stage_accepts_device():
    reg = load_registry()
    assert len(reg.items()) > 10
    for (kind, name), cls in reg.items():
        decl = cls.param_map()["device"]
        assert decl.choices == ("auto", "cpu", "cuda"), (kind, name)
        for value in ("auto", "cpu", "cuda"):
            assert cls.validate_params({"device": value}, f"{kind}/{name}").device == value
        assert cls.validate_params({}, f"{kind}/{name}").device == "auto"
        with pytest.raises(ParameterError):
            cls.validate_params({"device": "gpu"}, f"{kind}/{name}")
    # numpy-only stages say so; torch stages use the torch device parameter
    assert reg.get("inversion", "tkd").param_map()["device"] is CPU_DEVICE
    assert reg.get("inversion", "medi").param_map()["device"] is DEVICE


def test_a_stage_without_params_accepts_device():
    class Bare(Stage):
        kind, name = "reference", "bare"

    assert Bare.validate_params({"device": "cpu"}, "s").device == "cpu"
    assert Bare.param_map()["device"] is CPU_DEVICE


def test_resolve_device_is_the_one_way():
    torch = pytest.importorskip("torch")
    from qsmkit.device import DEVICE_PARAM, resolve_device

    assert DEVICE_PARAM is DEVICE
    assert resolve_device("cpu") == torch.device("cpu")
    dev = torch.device("cpu")
    assert resolve_device(dev) is dev
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def test_input_data_errors_are_value_errors():
    assert issubclass(InputDataError, ValueError) and issubclass(InputDataError, QsmkitError)
    assert issubclass(GeometryError, ValueError)
    with pytest.raises(ValueError):
        raise InputDataError("x")


def test_pure_functions_raise_qsmkit_errors_that_are_value_errors():
    from qsmkit_echofit import weighted_fit
    from qsmkit_mask import otsu_threshold, threshold_mask
    from qsmkit_reference import reference_to_region

    chi = np.zeros((4, 4, 4), np.float32)
    mask = np.ones((4, 4, 4), bool)
    calls = [
        lambda: reference_to_region(chi, mask, np.zeros_like(mask)),
        lambda: weighted_fit(np.zeros((4, 4, 4, 3)), None, [0.004, 0.008], 3.0),
        lambda: weighted_fit(np.zeros((4, 4, 4, 1)), None, [0.004], 3.0, weighting="uniform"),
        lambda: weighted_fit(np.zeros((4, 4, 4, 2)), None, [0.004, 0.008], 3.0),
        lambda: otsu_threshold(np.array([np.nan])),
        lambda: threshold_mask(np.zeros((4, 4)), (1, 1, 1)),
    ]
    for call in calls:
        with pytest.raises(InputDataError) as info:
            call()
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    with pytest.raises(ParameterError, match="mean or median"):
        reference_to_region(chi, mask, statistic="mode")
    with pytest.raises(ParameterError, match="magnitude_squared or uniform"):
        weighted_fit(np.zeros((4, 4, 4, 2)), None, [0.004, 0.008], 3.0, weighting="cubic")
