import pytest

from qsmkit.errors import MissingArtifactError, ParameterError
from qsmkit.stage import Param, Stage, StageContext


def test_context_membership_and_missing_artifact_message():
    ctx = StageContext({"mask": 1}, stage_label="inversion/x")
    assert "mask" in ctx and "magnitude" not in ctx and ctx.get("magnitude") is None
    with pytest.raises(MissingArtifactError, match="needs 'local_field'.*add a 'background' stage"):
        ctx["local_field"]


class S(Stage):
    kind, name = "inversion", "s"
    params = (Param("lam", float, 1.0, range=(0, 10)), Param("n", int, 3, range=(1, None)),
              Param("on", bool, True), Param("mode", str, "a", choices=("a", "b")),
              Param("radii", list, [2.0], range=(0.5, 20)), Param("opt", float, None))


def test_param_validation():
    p = S.validate_params({"lam": 2, "n": 4.0, "radii": 3, "opt": None}, "stages.0")
    assert p.lam == 2.0 and p.n == 4 and p.radii == [3.0] and p.opt is None and p.mode == "a"
    for bad, msg in [({"lam": 11}, "out of range"), ({"n": 2.5}, "expected an integer"), ({"on": 1}, "true or false"),
                     ({"mode": "c"}, "choose one of a, b"), ({"radii": [1, 30]}, r"radii\[1\] = 30.0 is out of range"),
                     ({"lam": None}, "must not be empty"), ({"lam": True}, "expected a number")]:
        with pytest.raises(ParameterError, match=msg):
            S.validate_params(bad, "stages.0")
