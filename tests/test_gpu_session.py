"""experiments/gpu_session.py, the one command of a GPU session: its dry run (every phase at tiny sizes on the CPU, no
install) writes the full report with wandb unimportable, and its time boxes stop a slow phase without costing the
next one. experiments/make_gpu_wheels.sh needs PyPI, so only its syntax is checked here."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_session.py"
spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
gpu_session = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_session)

# Installed with PYTHONPATH: `import wandb` fails as on a GPU node whose wheel folder leaves wandb out.
NO_WANDB = """
import sys

class _NoWandb:
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test's sitecustomize)", name=name)
        return None

sys.meta_path.insert(0, _NoWandb())
"""


def without_wandb(folder):
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(NO_WANDB)
    path = os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_the_dry_run_reports_every_phase_and_runs_without_wandb(tmp_path):
    env = without_wandb(tmp_path / "no-wandb")
    check = subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "hidden by the test" in check.stderr
    out_dir = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out_dir), "--work", str(tmp_path / "work")]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    report = (out_dir / "report.md").read_text()
    for section in gpu_session.SECTIONS:
        assert f"\n{section}\n" in report, section
    r = json.loads((out_dir / "report.json").read_text())
    assert list(r["phases"]) == gpu_session.PHASES and all(p["status"] == "ok" for p in r["phases"].values())
    assert r["meta"]["dry_run"] is True and r["environment"]["wandb"] is False
    assert "wandb importable: False" in report
    # the selection ran; without wandb the tests skip what they check of W&B, none is deselected
    assert "--deselect" not in r["tests"]["command"] and "wandb is not installed" in report
    assert r["tests"]["counts"].get("passed", 0) >= 1 and not r["tests"]["failed"]
    # the benchmark's figures, each with the command that made them
    figures = r["benchmark"]["figures"]
    assert {"forward", "sampler", "rollout", "update", "projection", "denoisers"} <= set(figures)
    assert f"`{r['benchmark']['command']}`" in report and "#### Sampler" in report
    assert r["compiled"]["figures"]["sampler"]
    # the short run measured what the benchmark projects, and the killed run resumed to the same numbers
    assert r["dataset"]["steps"] == 10_000
    assert r["pretrain"]["dm_step_s"] > 0 and {"dm_s", "dynamics_s", "reward_s"} <= set(r["pretrain"]["timings_s"])
    run = r["run"]
    assert [int(k) for k in run["rollout_time_s"]] == [0, 500, 1000] and len(run["evaluations"]) == 2
    assert run["rollout_s_median"] > 0 and run["update_s"] > 0
    assert "| rollout step (s) |" in report and "A 1M-step DyDiff-TD3+BC run at these rates" in report
    res = r["resume"]
    assert res["resumed_at_step"] == 750 and res["total_steps"] == 1500
    assert res["same_evaluations"] is True and res["final_actor_vs_uninterrupted"] == "identical"
    for f in (
        "benchmark.json",
        "benchmark.md",
        "pip-list.txt",
        "nvidia-smi.txt",
        "run-e2e/metrics.jsonl",
        "logs/tests-pytest.log",
    ):
        assert (out_dir / f).exists(), f
        assert f"`{f}`" in report


def test_a_phase_past_its_box_is_stopped_and_the_next_keeps_its_own(tmp_path):
    s = gpu_session.Session(
        gpu_session.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    )
    s.boxes = {p: 0.0 for p in s.planned}
    s.boxes["benchmark"] = 12.0
    s.deadline = time.monotonic() + gpu_session.REPORT_S + 6.0 + 12.0  # tests: 6 s, then benchmark: 12 s
    sleeper = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(60)']); time.sleep(60)",
    ]  # a child too: the whole group must go

    def slow(until):
        return gpu_session.problem_of(s.run("tests", "sleep", sleeper, s.left(until)), "sleeping")

    t0 = time.monotonic()
    s.phase("tests", slow)
    assert time.monotonic() - t0 < 12 and s.phases["tests"]["status"].startswith("timed out")
    assert 9 < s.phase_timeout("benchmark") <= 12  # the slow phase did not eat the next one's box
    s.phase(
        "benchmark",
        lambda until: gpu_session.problem_of(s.run("benchmark", "quick", [sys.executable, "-c", "1"], s.left(until)), "quick"),
    )
    assert s.phases["benchmark"]["status"] == "ok"
    assert "timed out" in (tmp_path / "out" / "report.md").read_text()


def test_pytest_outcomes_are_read_from_serial_and_parallel_output():
    serial = "tests/test_a.py::test_x PASSED  [ 50%]\ntests/test_a.py::test_y[p1] SKIPPED (needs CUDA)  [100%]\n"
    parallel = "[gw1] [ 33%] FAILED tests/test_b.py::test_z[dydiff_cql.py] \n[gw0] [ 66%] ERROR tests/test_b.py::test_w \n"
    assert gpu_session.pytest_outcomes(serial + parallel) == {
        "tests/test_a.py::test_x": "PASSED",
        "tests/test_a.py::test_y[p1]": "SKIPPED",
        "tests/test_b.py::test_z[dydiff_cql.py]": "FAILED",
        "tests/test_b.py::test_w": "ERROR",
    }


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_the_wheel_script_parses():
    out = subprocess.run(["bash", "-n", str(ROOT / "experiments" / "make_gpu_wheels.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_gpu_commands_have_the_papers_sizes_and_the_acceptance_selection(tmp_path):
    """What the dry run cannot run: the commands of a GPU session, built from a GPU node's environment."""
    args = gpu_session.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), "--python", sys.executable])
    s = gpu_session.Session(args)
    assert not args.install and args.budget == 570 and args.dataset_steps == 200_000
    assert sum(s.boxes.values()) <= args.budget - gpu_session.REPORT_S
    s.results["environment"] = dict(cpus=16, xdist=True, wandb=False, cuda_available=True)
    calls = {}

    def fake_run(phase, name, cmd, timeout, env=None, split=False):
        calls[phase] = [str(c) for c in cmd]
        return dict(command=s.display(cmd), rc=0, timed_out=False, seconds=1.0, output="", stderr="")

    s.run = fake_run
    s.background["dataset"] = dict(record=dict(rc=0, timed_out=False, seconds=1.0, output=""))
    s.phases["pretrain"]["status"] = "ok"
    until = time.monotonic() + 60
    for fn in (gpu_session.tests, gpu_session.benchmark, gpu_session.compiled, gpu_session.pretrain, gpu_session.e2e_run):
        fn(s, until)
    t = calls["tests"]
    assert t[t.index("--device") + 1] == "cuda" and t[t.index("-k") + 1] == "cuda or resume" and t[t.index("-n") + 1] == "8"
    assert "--deselect" not in t  # without wandb the tests skip what needs it themselves
    assert calls["benchmark"][2:4] == ["--size", "full"] and "--no-cuda" not in calls["benchmark"]
    assert "denoisers" in calls["benchmark"] and "projection" in calls["benchmark"]
    assert calls["compiled"][calls["compiled"].index("--variants") + 1] == "bf16 compiled"
    assert "--no-compile" not in calls["compiled"]
    for phase in ("pretrain", "run"):  # the paper's networks and rollout: none of the tiny or CPU flags
        assert not {"--no-cuda", "--preset", "--dm-dim", "--rollout-batch-size", "--rollout-length"} & set(calls[phase])
        assert calls[phase][calls[phase].index("--dataset-steps") + 1] == "200000"
    assert calls["pretrain"][calls["pretrain"].index("--dm-steps") + 1] == "500"
