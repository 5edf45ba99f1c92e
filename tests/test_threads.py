"""The core thread decision (qsmkit.threads): affinity, cgroup quotas, OMP_NUM_THREADS, --threads,
stage ceilings and how the engine applies them."""

from __future__ import annotations

import os

import pytest

from qsmkit import threads as th
from qsmkit.errors import ConfigError
from qsmkit.stage import Stage


def _cgroup(tmp_path, proc_lines: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_lines)
    root = tmp_path / "cg"
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root, proc


def test_cgroup_v2_quota_and_unlimited(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/job/step\n", {"job/step/cpu.max": "150000 100000\n"})
    assert th.cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    root, proc = _cgroup(tmp_path / "b", "0::/job\n", {"job/cpu.max": "max 100000\n"})
    assert th.cgroup_cpu_limit(root, proc) is None


def test_cgroup_v2_enclosing_quota_applies(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/a/b\n", {"a/b/cpu.max": "max 100000", "a/cpu.max": "100000 100000"})
    assert th.cgroup_cpu_limit(root, proc) == pytest.approx(1.0)


def test_cgroup_v1_quota(tmp_path):
    root, proc = _cgroup(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n",
                         {"cpu/docker/abc/cpu.cfs_quota_us": "50000", "cpu/docker/abc/cpu.cfs_period_us": "100000"})
    assert th.cgroup_cpu_limit(root, proc) == pytest.approx(0.5)
    root, proc = _cgroup(tmp_path / "b", "3:cpu,cpuacct:/\n",
                         {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert th.cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_files(tmp_path):
    assert th.cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None


def test_available_cores_combines_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(th, "affinity_cores", lambda: 8)
    root, proc = _cgroup(tmp_path, "0::/j\n", {"j/cpu.max": "250000 100000"})
    assert th.available_cores(root, proc) == 3  # 2.5 CPUs of quota: 3 threads, not 8
    root, proc = _cgroup(tmp_path / "b", "0::/j\n", {"j/cpu.max": "20000 100000"})
    assert th.available_cores(root, proc) == 1  # a fraction of a core is still one thread
    root, proc = _cgroup(tmp_path / "c", "0::/j\n", {"j/cpu.max": "max 100000"})
    assert th.available_cores(root, proc) == 8


def test_affinity_is_read():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity here")
    assert th.affinity_cores() == len(os.sched_getaffinity(0))


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(th, "available_cores", lambda *a, **k: 4)
    monkeypatch.setattr(th, "free_cores", lambda *a, **k: 4.0)
    monkeypatch.delenv("QSMKIT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    prev = th.set_run_threads(None)
    yield monkeypatch
    th.set_run_threads(prev)


def test_omp_num_threads_caps(four_cores):
    assert th.decide_threads() == 4
    four_cores.setenv("OMP_NUM_THREADS", "2")
    assert th.decide_threads() == 2
    four_cores.setenv("OMP_NUM_THREADS", "3,1")  # nested form: the first level counts
    assert th.decide_threads() == 3
    four_cores.setenv("OMP_NUM_THREADS", "junk")  # ignored, as OpenMP ignores it
    assert th.decide_threads() == 4


def test_explicit_threads_win_but_stay_within_the_cores(four_cores):
    four_cores.setenv("OMP_NUM_THREADS", "1")
    assert th.decide_threads(explicit=3) == 3  # --threads is explicit: it overrides the OMP cap
    assert th.decide_threads(explicit=16) == 4  # never more than the cores available
    assert th.decide_threads(explicit="auto") == 1
    four_cores.setenv("QSMKIT_THREADS", "2")
    assert th.decide_threads() == 2
    th.set_run_threads(3)
    assert th.decide_threads() == 3  # the run's threads (pipeline key / --threads) before the env


def test_free_cores_follow_the_load(four_cores):
    four_cores.setattr(th, "free_cores", lambda *a, **k: 1.2)
    assert th.decide_threads() == 1  # another process holds most cores: one thread
    four_cores.setattr(th, "free_cores", lambda *a, **k: 2.6)
    assert th.decide_threads() == 3
    assert th.decide_threads(explicit=4) == 4  # explicit counts do not adapt
    four_cores.setattr(th, "free_cores", lambda *a, **k: None)  # no /proc/stat: all available cores
    assert th.decide_threads() == 4


@pytest.mark.parametrize("bad", [0, -2, "two", True, 1.5])
def test_bad_thread_counts_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="threads"):
        th.check_threads(bad, "pipeline: threads")


class OneThread(Stage):
    kind, name = "inversion", "one"
    threads = 1


class SizeRule(Stage):
    kind, name = "inversion", "size"

    def thread_limit(self, ctx, p):
        return 2 if ctx and ctx.get("big") else 1


def test_stage_ceiling(four_cores):
    assert th.stage_threads(OneThread()) == 1
    assert th.stage_threads(Stage()) == 4
    assert th.stage_threads(SizeRule(), {"big": True}) == 2
    assert th.stage_threads(SizeRule(), {}) == 1


def test_limited_sets_and_restores_torch():
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    with th.limited(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    with th.limited(None):
        assert torch.get_num_threads() == n


def test_limited_limits_blas():
    pytest.importorskip("threadpoolctl")
    import numpy  # noqa: F401  (loads its BLAS)
    from threadpoolctl import threadpool_info

    with th.limited(1):
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")


def test_free_cores_reads_proc_stat():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    f = th.free_cores(min_window_s=0.02)
    assert f is not None and 0.0 <= f <= os.cpu_count() + 1e-6


def test_prepare_environment_keeps_user_values():
    # a user's wait policy or spin count is a choice of both: neither variable is added to it
    for user in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(user)
        assert th.prepare_environment(env) == {} and env == user
    env = {}
    done = th.prepare_environment(env)
    assert done == th.WAIT_POLICY_ENV and env == th.WAIT_POLICY_ENV


def test_engine_applies_the_stage_ceiling_and_records_it(four_cores, tmp_path):
    torch = pytest.importorskip("torch")
    from qsmkit.pipeline import fanout
    from qsmkit.pipeline.plan import Step

    seen = []

    class Probe(Stage):
        kind, name = "reference", "probe"
        writes = ("x",)
        threads = 1

        def run(self, ctx, p):
            seen.append(torch.get_num_threads())
            return {"x": 1}

    n = torch.get_num_threads()
    step = Step(0, "reference", "probe", Probe, Probe.validate_params({}, "stages.0"))
    fanout.run_step(step, {}, lambda m: None, {})
    assert seen == [1] and fanout.last_threads == [1] and torch.get_num_threads() == n


def test_pipeline_key_and_cli_option(tmp_path, capsys):
    import json

    import numpy as np

    from helpers import run_cli, sphere_field, write_nifti

    field, _ = sphere_field((24, 24, 24), (1, 1, 1), 4.0, 0.2, (0, 0, 1))
    write_nifti(tmp_path / "lf.nii.gz", field)
    write_nifti(tmp_path / "mask.nii.gz", np.ones((24, 24, 24), np.uint8))
    pipe = tmp_path / "p.yaml"
    body = ("qc: false\ninputs: {local_field: lf.nii.gz, mask: mask.nii.gz}\n"
            "stages:\n  - {stage: inversion, method: tkd}\noutput_dir: out\n")
    pipe.write_text(body)
    code, _, err = run_cli(["run", pipe, "--threads", "1"], capsys)
    assert code == 0, err
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["threads"] == 1 and prov["stages"][0]["threads"] == 1
    code, _, err = run_cli(["run", pipe, "--threads", "0"], capsys)
    assert code == 2 and "--threads" in err
    pipe.write_text(body + "threads: 0\n")
    code, _, err = run_cli(["validate", pipe], capsys)
    assert code == 2 and "threads" in err and "at least 1" in err
    pipe.write_text(body + "threads: auto\n")
    code, _, err = run_cli(["run", pipe, "--overwrite"], capsys)
    assert code == 0, err
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["threads"] == "auto" and prov["stages"][0]["threads"] >= 1
