"""tests/benchmark.py runs end to end at a tiny size and reports every figure it promises (speed is not judged here)."""

import json
import subprocess
import sys
from pathlib import Path

from script_runs import DEVICE_FLAG

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_reports_every_section(tmp_path):
    out_file = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "benchmark.py"),
        "--size",
        "small",
        DEVICE_FLAG,
        "--no-compile",
        "--bf16",
        "on",
        "--dm-dim",
        "8",
        "--dm-dim-mults",
        "1",
        "2",
        "--rollout-batch-size",
        "16",
        "--rollout-length",
        "12",
        "--sampler-steps",
        "3",
        "--repeats",
        "1",
        "--dm-train-steps",
        "10",
        "--json-out",
        str(out_file),
        "--eval-episodes",
        "3",
        "--sections",
        "forward",
        "sampler",
        "rollout",
        "update",
        "projection",
        "evaluation",
        "ensemble",
        "simulator",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out_file.read_text())
    assert set(r["forward"]) == {"flops_per_window", "fp32 eager", "bf16 eager"}
    assert r["forward"]["flops_per_window"] > 0 and r["forward"]["fp32 eager"]["tflops"] > 0
    for variant in ("fp32 eager", "bf16 eager"):
        s = r["sampler"][variant]
        assert s["ratio_to_forward"] > 0 and s["seconds"] > 0
    phases = r["rollout"]["phases_s"]
    assert list(phases) == [
        "start states",
        "ensemble rollout",
        "DM sampling",
        "relabelling",
        "rewards",
        "filter",
        "buffer insert",
    ]
    assert all(v > 0 for v in phases.values())
    assert set(r["update"]) == {"eager/real only", "eager/mixed with D_syn"}
    p = r["projection"]
    assert (
        p["dydiff_s"] > 0 and p["base_s"] > 0 and p["parts_s"]["rollout steps"] > 0
    )  # timing noise can order them either way at this size
    assert "| DyDiff-TD3BC run, pretraining included |" in out.stdout
    # The before/after pairs compute the same thing: only their times may differ.
    assert r["evaluation"]["same_returns"] is True and r["evaluation"]["vectorized_s"] > 0
    assert all(r["ensemble"][k]["same_output"] is True for k in ("sampled", "deterministic"))
    assert all(v > 0 for v in r["simulator"].values())
