"""Kill -9 then --resume continues each training script to the numbers of an uninterrupted run, on any device.

The resumed run loads its checkpoint with a torch.load that moves tensors unless asked for the CPU (as
loading onto a GPU does), so random states restored from anywhere but the CPU fail the comparison.
"""

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.checkpoints import load_checkpoint  # noqa: E402
from script_runs import PRETRAIN, TINY, kill_after_first_checkpoint, moved_tensors_env, run_script  # noqa: E402

SCRIPTS = ["dydiff_td3bc.py", "dydiff_cql.py", "dydiff_diffql.py"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    run_script("pretrain_models.py", "--env-id", "maze2d-umaze", "--dataset-steps", "10000", "--rollout-length", "16",
               "--models-dir", str(folder), *shlex.split(PRETRAIN))
    return folder


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_killed_run_resumes_to_the_uninterrupted_numbers(script, models, tmp_path):
    runs = tmp_path / "runs"
    args = [*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--total-steps", "400", "--eval-freq", "100"]
    run_script(script, *args, "--exp-name", "whole")
    whole = next(runs.glob("*whole__*"))
    cut = kill_after_first_checkpoint(script, [*args, "--exp-name", "cut"], runs, "cut")
    ckpt = load_checkpoint(cut / "checkpoint.pt")
    assert 0 < ckpt["step"] < 400, "the run was killed before it finished"
    assert {"python", "numpy", "torch", "cuda", "generators"} <= set(ckpt["rng"])
    out = run_script(script, "--resume", str(cut), env=moved_tensors_env(tmp_path / "hook"))
    assert f"resuming {cut} at step {ckpt['step']:,}" in out.stdout
    a, b = (json.loads((r / "result.json").read_text()) for r in (whole, cut))
    assert b["evaluations"] == a["evaluations"] and len(a["evaluations"]) == 4
    assert 0 < ckpt["wall_time_s"] < b["wall_time_s"], "the training time of the first sitting is counted"
    pa, pb = (torch.load(r / "final_policy.pt", weights_only=False) for r in (whole, cut))
    for key in ("actor", "ema_actor"):
        if key in pa:
            for name, tensor in pa[key].items():
                assert torch.equal(tensor, pb[key][name]), f"{key}.{name} differs after resuming"
    fa, fb = (load_checkpoint(r / "checkpoint.pt") for r in (whole, cut))
    assert torch.equal(fa["synthetic"]["obs"], fb["synthetic"]["obs"])
    assert torch.equal(fa["rng"]["torch"], fb["rng"]["torch"])
