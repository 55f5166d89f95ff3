"""What the three training scripts share, tested for each: runs in DyDiff, base and M = 0 modes, kill and
resume to the uninterrupted numbers, bad inputs, the DyDiff filter, batch mix and alive mask, and that the
inline DyDiff code is the same text in all three.

The resumed run loads its checkpoint with a torch.load that moves tensors unless asked for the CPU (as
loading onto a GPU does), so random states restored from anywhere but the CPU fail the comparison.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from script_runs import (
    HAVE_WANDB,
    SCRIPTS,
    TRACK,
    kill_after_first_checkpoint,
    metrics,
    models_for_other_data,
    moved_tensors_env,
    run_script,
    tiny,
)

from common.buffer import SyntheticBuffer
from common.checkpoints import load_checkpoint

LOSSES = {
    "dydiff_td3bc.py": ("qf1_loss", "qf2_loss", "actor_loss", "qf1_values"),
    "dydiff_cql.py": ("qf1_loss", "qf2_loss", "cql_qf1_gap", "cql_loss", "alpha", "alpha_prime", "policy_loss", "log_pi"),
    "dydiff_diffql.py": ("bc_loss", "ql_loss", "actor_loss", "critic_loss"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_dydiff_run_logs_its_rollouts_and_result(script, tiny_models, tmp_path):
    run_script(
        script, *tiny(script, tiny_models, tmp_path, "--exp-name", "dydiff", "--total-steps", "120", "--eval-freq", "60")
    )
    run_dir = next(tmp_path.glob("*dydiff__*"))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["total_steps"] == 120 and len(result["evaluations"]) == 2 and result["num_iterations"] == 1
    assert result["final_normalized_score"] == pytest.approx(np.mean(result["evaluations"]))
    assert result["wall_time_s"] > 0
    if script == "dydiff_cql.py":
        assert result["cql_lagrange"] is True  # maze2d default
    m = metrics(run_dir)
    rollouts = [r for r in m if "dydiff/kept_fraction" in r]
    assert [r["step"] for r in rollouts] == [0, 50, 100]
    # eta = 0.6 of B_r = 32 kept: floor(19.2) = 19 trajectories of up to L-1 = 15 transitions each
    assert all(r["dydiff/kept_fraction"] == 19 / 32 for r in rollouts)
    assert [r["dydiff/synthetic_buffer_size"] for r in rollouts] == [19 * 15, 2 * 19 * 15, 3 * 19 * 15]
    assert 0.0 <= rollouts[0]["dydiff/wall_crossing_share"] <= 1.0
    # maze2d-umaze is D4RL's fixed-goal task: the run says so, and logs the D4RL maze2d-v1 score beside ours
    assert result["form"] == "fixed-goal" and result["obs_dim"] == 4
    assert json.loads((run_dir / "task.json").read_text())["form"] == "fixed-goal"
    assert len(result["d4rl_evaluations"]) == 2
    evals = [r for r in m if "eval/normalized_score" in r]
    assert all(math.isfinite(r["eval/d4rl_normalized_score"]) for r in evals)
    # the synthetic data checked: shares in [0, 1], all 19 kept trajectories replayed (at most --check-trajectories 64)
    for key in ("goal_share_reward_model", "goal_share_generated", "goal_share_real", "wall_crossing_share_kept"):
        assert all(0.0 <= r["dydiff/" + key] <= 1.0 for r in rollouts), key
    assert all(r["dydiff/goal_share_generated_checked"] == r["dydiff/goal_share_generated"] for r in rollouts)
    assert all(r["dydiff/return_kept_predicted"] == pytest.approx(r["dydiff/return_kept"], rel=1e-5) for r in rollouts)
    assert all(0.0 <= r["dydiff/return_kept_real"] <= 15 for r in rollouts)  # sparse: at most 1 per transition
    losses = next(r for r in m if "losses/" + LOSSES[script][0] in r)
    for key in LOSSES[script]:
        assert math.isfinite(losses["losses/" + key]), key
    assert any("eval/normalized_score" in r for r in m) and losses["charts/SPS"] > 0
    pictures = sorted(run_dir.glob("synthetic_trajectories_*.png"))  # one per evaluation step, kept
    assert [p.name for p in pictures] == ["synthetic_trajectories_0000000.png"]  # rollouts at 0, 50, 100; evaluations every 60
    assert all(p.stat().st_size > 1000 for p in pictures)
    assert (run_dir / "final_policy.pt").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_base_and_ensemble_only_modes(script, tiny_models, tmp_path):
    base_flags = ["--no-cql-lagrange"] if script == "dydiff_cql.py" else []
    run_script(
        script,
        *tiny(
            script,
            tiny_models,
            tmp_path,
            "--exp-name",
            "base",
            "--no-dydiff",
            *base_flags,
            "--total-steps",
            "60",
            "--eval-freq",
            "60",
        ),
    )
    base = next(tmp_path.glob("*base__*"))
    assert not any("dydiff/kept_fraction" in r for r in metrics(base))
    if script == "dydiff_cql.py":  # the fixed CQL weight: no Lagrange multiplier
        assert any("losses/cql_loss" in r for r in metrics(base)) and not any("losses/alpha_prime" in r for r in metrics(base))
        assert json.loads((base / "result.json").read_text())["cql_lagrange"] is False
    assert json.loads((base / "result.json").read_text())["dydiff"] is False
    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    out = run_script(
        script,
        *tiny(
            script,
            tiny_models,
            tmp_path,
            "--exp-name",
            "m0",
            "--num-iterations",
            "0",
            "--total-steps",
            "60",
            "--eval-freq",
            "60",
            *TRACK,
        ),
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)},
    )
    if HAVE_WANDB:
        assert list(wandb_dir.glob("wandb/offline-run-*")), "--track logs to W&B (offline here)"
    assert "no pretrained models" not in out.stdout  # found by dataset
    m0 = next(tmp_path.glob("*m0__*"))
    assert json.loads((m0 / "result.json").read_text())["num_iterations"] == 0
    assert any("dydiff/rollout_time" in r for r in metrics(m0))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_killed_run_resumes_to_the_uninterrupted_numbers(script, tiny_models, tmp_path):
    runs = tmp_path / "runs"
    args = tiny(script, tiny_models, runs, "--total-steps", "400", "--eval-freq", "100")
    run_script(script, *args, "--exp-name", "whole")
    whole = next(runs.glob("*whole__*"))
    cut = kill_after_first_checkpoint(script, [*args, "--exp-name", "cut"], runs, "cut")
    ckpt = load_checkpoint(cut / "checkpoint.pt")
    assert 0 < ckpt["step"] < 400, "the run was killed before it finished"
    assert {"python", "numpy", "torch", "cuda", "generators"} <= set(ckpt["rng"])
    buf = ckpt["synthetic"]
    assert buf["size"] > 0 and buf["obs"].shape == (buf["size"], 4) and torch.isfinite(buf["obs"]).all()  # fixed-goal
    # only --total-steps may change on resume, and only beyond the checkpoint
    out = run_script(script, "--resume", str(cut), "--seed", "5", check=False)
    assert out.returncode != 0 and "only --total-steps may change (drop --seed)" in out.stderr
    out = run_script(script, "--resume", str(cut), "--total-steps", str(ckpt["step"]), check=False)
    assert out.returncode != 0 and f"is at step {ckpt['step']:,} already" in out.stderr and "Traceback" not in out.stderr
    out = run_script(script, "--resume", str(cut), env=moved_tensors_env(tmp_path / "hook"))
    assert f"resuming {cut} at step {ckpt['step']:,}" in out.stdout
    # exact in the logs too: the same metric rows as the uninterrupted run, none twice
    timing = ("charts/SPS", "dydiff/rollout_time", "dydiff/check_time")
    rows_a, rows_b = ([{k: v for k, v in r.items() if k not in timing} for r in metrics(r)] for r in (whole, cut))
    assert rows_b == rows_a
    a, b = (json.loads((r / "result.json").read_text()) for r in (whole, cut))
    assert b["evaluations"] == a["evaluations"] and len(a["evaluations"]) == 4 and b["total_steps"] == 400
    assert b["models"] == a["models"] and set(a["models"]) == {"dm", "dynamics", "reward"}  # kept across the resume
    assert 0 < ckpt["wall_time_s"] < b["wall_time_s"], "the training time of the first sitting is counted"
    pa, pb = (torch.load(r / "final_policy.pt", weights_only=False) for r in (whole, cut))
    for key in ("actor", "critic_target"):
        if key in pa:
            for name, tensor in pa[key].items():
                assert torch.equal(tensor, pb[key][name]), f"{key}.{name} differs after resuming"
    fa, fb = (load_checkpoint(r / "checkpoint.pt") for r in (whole, cut))
    assert fa["step"] == fb["step"] == 400
    assert torch.equal(fa["synthetic"]["obs"], fb["synthetic"]["obs"])
    assert torch.equal(fa["rng"]["torch"], fb["rng"]["torch"])
    # a finished run trains on when resumed with more steps
    out = run_script(script, "--resume", str(whole), "--total-steps", "500")
    longer = json.loads((whole / "result.json").read_text())
    assert longer["total_steps"] == 500 and longer["evaluations"][:4] == a["evaluations"] and len(longer["evaluations"]) == 5
    assert json.loads((whole / "args.json").read_text())["total_steps"] == 500


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_inputs_end_in_one_clear_message(script, tiny_models, tmp_path):
    def fails_with(*args, messages):
        out = run_script(script, *args, check=False)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        for message in messages:
            assert message in out.stderr, out.stderr[-2000:]

    fails_with("--env-id", "maze2d-huge", "--runs-dir", str(tmp_path), messages=["unknown --env-id 'maze2d-huge'"])
    fails_with(*tiny(script, tiny_models, tmp_path, "--real-ratio", "1.5"), messages=["--real-ratio must be in [0, 1]"])
    fails_with(
        *tiny(script, tiny_models, tmp_path, "--sampler-steps", "1", "--sampler-churn", "-1"),
        messages=["--sampler-steps must be >= 2", "--sampler-churn must be >= 0"],
    )
    fails_with(
        *tiny(script, tiny_models, tmp_path, "--rollout-length", "12"), messages=["trained with L=16, not --rollout-length 12"]
    )
    # Models made for another dataset (a different seed of the generated maze) are refused.
    other = models_for_other_data(tiny_models, tmp_path / "other-models")
    fails_with(*tiny(script, other, tmp_path), messages=["was trained on dataset local/pointmaze/umaze-other-v2"])
    fails_with("--resume", str(tmp_path), messages=["no checkpoint.pt there"])
    fails_with(
        *tiny(script, tiny_models, tmp_path, "--pretrain.dm-lr", "inf", "--gamma", "nan"),
        messages=["--gamma must be a finite number, got nan", "--pretrain.dm-lr must be a finite number, got inf"],
    )


# ----------------------------------------------------------------------------- the DyDiff pieces, in each script
def script_module(script):
    return importlib.import_module(script[: -len(".py")])


def between(text, start, end):
    return text[text.index(start) : text.index(end)]


def test_the_inline_dydiff_code_is_the_same_text_in_the_three_scripts():
    texts = [(ROOT / s).read_text() for s in SCRIPTS]
    for start, end in (
        ("# ---- DyDiff: the trajectory filter", "# ---- end of the DyDiff pieces ----"),
        ("        # ---- DyDiff rollout step", "        # ---- end of the DyDiff rollout step ----"),
    ):
        blocks = [between(t, start, end) for t in texts]
        assert len(blocks[0].splitlines()) > 20
        for script, block in zip(SCRIPTS[1:], blocks[1:]):
            assert block == blocks[0], f"{script}'s block from {start.strip()!r} differs from {SCRIPTS[0]}'s"


@pytest.mark.parametrize("script", SCRIPTS)
def test_hardmax_keeps_exactly_the_top_floor_eta_b(script):
    filter_trajectories = script_module(script).filter_trajectories
    scores = torch.randperm(100).float()
    keep = filter_trajectories(scores, 0.6, "hardmax", 0.05)
    assert len(keep) == 60
    assert sorted(scores[keep].tolist()) == list(range(40, 100))
    assert len(filter_trajectories(torch.randn(7), 0.6, "hardmax", 0.05)) == 4  # floor(4.2)


@pytest.mark.parametrize("script", SCRIPTS)
def test_softmax_filter_limits(script):
    filter_trajectories = script_module(script).filter_trajectories
    g = torch.Generator().manual_seed(0)
    # distinct scores a fixed step apart (z-score gap ~0.017, 170 x T = 1e-4), so that a tiny temperature is hardmax
    # whatever the Gumbel draws; random normal scores can be too close at the 30 % boundary
    scores = torch.randperm(200, generator=torch.Generator().manual_seed(1)).float()
    top = set(filter_trajectories(scores, 0.3, "hardmax", 0.05).tolist())
    for _ in range(5):  # a tiny temperature is hardmax
        assert set(filter_trajectories(scores, 0.3, "softmax", 1e-4, g).tolist()) == top
    counts = torch.zeros(200)
    for _ in range(400):  # a huge temperature is near uniform: every trajectory kept ~30% of the time
        counts[filter_trajectories(scores, 0.3, "softmax", 1e6, g)] += 1
    freq = counts / 400
    assert abs(freq.mean().item() - 0.3) < 1e-6
    assert freq.min() > 0.15 and freq.max() < 0.45
    assert np.corrcoef(freq.numpy(), scores.numpy())[0, 1] < 0.3
    # keeps distinct trajectories (without replacement)
    keep = filter_trajectories(scores, 0.5, "softmax", 0.05, g)
    assert len(keep) == len(set(keep.tolist())) == 100


@pytest.mark.parametrize("script", SCRIPTS)
def test_batch_mix_follows_the_real_ratio_and_draws_only_stored_rows(script):
    mixed_batch = script_module(script).mixed_batch
    g = torch.Generator().manual_seed(0)
    real = {
        k: torch.zeros(1000, *s)
        for k, s in (("obs", (3,)), ("actions", (2,)), ("rewards", ()), ("next_obs", (3,)), ("dones", ()))
    }
    syn = SyntheticBuffer(500, 3, 2, "cpu")
    batch, n_syn = mixed_batch(real, syn, 256, 0.6, g)
    assert n_syn == 0 and batch["obs"].shape == (256, 3)  # empty D_syn: all real
    v = torch.arange(1.0, 4.0)  # three rows, rewards 1, 2, 3; the other 497 slots stay zero
    syn.add(v[:, None].expand(3, 3), v[:, None].expand(3, 2), v, v[:, None].expand(3, 3), torch.zeros(3))
    for ratio, expected_syn in ((0.6, 102), (1.0, 0), (0.0, 256)):
        batch, n_syn = mixed_batch(real, syn, 256, ratio, g)
        assert n_syn == expected_syn and batch["obs"].shape == (256, 3)
        assert set(batch["rewards"][256 - n_syn :].tolist()) <= {1.0, 2.0, 3.0}  # never an empty slot
        assert (batch["rewards"][: 256 - n_syn] == 0).all()
    drawn = torch.cat([mixed_batch(real, syn, 100, 0.0, g)[0]["rewards"] for _ in range(20)])
    assert set(drawn.tolist()) == {1.0, 2.0, 3.0}


@pytest.mark.parametrize("script", SCRIPTS)
def test_synthetic_trajectories_stop_at_their_first_terminal(script):
    alive_mask = script_module(script).alive_mask
    dones = torch.tensor([[0, 0, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0.0]])
    np.testing.assert_array_equal(alive_mask(dones).numpy(), [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
