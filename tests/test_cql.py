"""dydiff_cql.py: subprocess runs in base, M = 0 and DyDiff modes, resume, bad inputs; CQL's own pieces."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from script_runs import TINY, kill_after_first_checkpoint, metrics, models_for_other_data, run_script  # noqa: E402
from dydiff_cql import (Args, Scalar, TanhGaussianPolicy, alpha_prime_value, cql_penalty, defaults_for,  # noqa: E402
                        flag_pair, lagrange_loss)

TINY = [*TINY[:-1], "--batch-size", "32", "--cql-n-actions", "2", TINY[-1]]


def run(*args, **kwargs):
    return run_script("dydiff_cql.py", *args, **kwargs)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def dydiff_run(dirs):
    models, runs = dirs
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "dydiff",
              "--total-steps", "120", "--eval-freq", "60")
    return next(runs.glob("*dydiff__*")), out


def test_dydiff_mode_pretrains_first_then_trains_and_logs(dydiff_run, dirs):
    run_dir, out = dydiff_run
    assert "no pretrained models" in out.stdout and "pretrain_models.py --env-id maze2d-umaze" in out.stdout
    assert (dirs[0] / "maze2d-umaze" / "dm.pt").exists()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["total_steps"] == 120 and len(result["evaluations"]) == 2 and result["num_iterations"] == 1
    assert result["cql_lagrange"] is True  # maze2d default
    assert result["final_normalized_score"] == pytest.approx(np.mean(result["evaluations"]))
    m = metrics(run_dir)
    rollouts = [r for r in m if "dydiff/kept_fraction" in r]
    assert [r["step"] for r in rollouts] == [0, 50, 100]
    # eta = 0.6 of B_r = 32 kept: floor(19.2) = 19 trajectories of up to L-1 = 15 transitions each
    assert all(r["dydiff/kept_fraction"] == 19 / 32 for r in rollouts)
    assert rollouts[0]["dydiff/synthetic_buffer_size"] == 19 * 15
    assert rollouts[-1]["dydiff/synthetic_buffer_size"] == 3 * 19 * 15
    assert 0.0 <= rollouts[0]["dydiff/wall_crossing_share"] <= 1.0
    assert any("eval/normalized_score" in r for r in m) and any("charts/SPS" in r for r in m)
    losses = next(r for r in m if "losses/qf1_loss" in r)
    for key in ("losses/qf2_loss", "losses/cql_qf1_gap", "losses/cql_loss", "losses/alpha", "losses/alpha_prime",
                "losses/policy_loss", "losses/log_pi"):
        assert math.isfinite(losses[key]), key
    assert (run_dir / "synthetic_trajectories.png").stat().st_size > 1000
    assert (run_dir / "final_policy.pt").exists()


def test_base_and_single_step_modes(dydiff_run, dirs):
    models, runs = dirs
    run(*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "base", "--no-dydiff",
        "--no-cql-lagrange", "--total-steps", "60", "--eval-freq", "60")
    base = next(runs.glob("*base__*"))
    m = metrics(base)
    assert not any("dydiff/kept_fraction" in r for r in m)
    assert any("losses/cql_loss" in r for r in m) and not any("losses/alpha_prime" in r for r in m)
    result = json.loads((base / "result.json").read_text())
    assert result["dydiff"] is False and result["cql_lagrange"] is False
    wandb_dir = runs / "wandb-files"
    wandb_dir.mkdir()
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "m0", "--num-iterations", "0",
              "--total-steps", "60", "--eval-freq", "60", "--track", env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)})
    assert list(wandb_dir.glob("wandb/offline-run-*")), "--track logs to W&B (offline here)"
    assert "no pretrained models" not in out.stdout  # found by dataset
    m0 = next(runs.glob("*m0__*"))
    assert json.loads((m0 / "result.json").read_text())["num_iterations"] == 0
    assert any("dydiff/rollout_time" in r for r in metrics(m0))


def test_kill_and_resume_reaches_the_same_final_step(dydiff_run, dirs):
    models, runs = dirs
    args = [*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "killed",
            "--total-steps", "1000", "--eval-freq", "100"]
    run_dir = kill_after_first_checkpoint("dydiff_cql.py", args, runs, "killed")
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert 0 < ckpt["step"] < 1000, "the run was killed before it finished"
    buf = ckpt["synthetic"]
    assert buf["size"] > 0 and buf["obs"].shape == (buf["size"], 6) and torch.isfinite(buf["obs"]).all()
    out = run("--resume", str(run_dir), "--total-steps", "1")  # the saved arguments win over the command line
    assert f"resuming {run_dir} at step {ckpt['step']:,}" in out.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["total_steps"] == 1000 and len(result["evaluations"]) == 10
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert final["step"] == 1000 and final["synthetic"]["size"] >= buf["size"]
    np.testing.assert_array_equal(final["evaluations"][: len(ckpt["evaluations"])], ckpt["evaluations"])


def test_bad_inputs_end_in_one_clear_message(dydiff_run, dirs, tmp_path):
    models, runs = dirs
    out = run("--env-id", "maze2d-huge", "--runs-dir", str(tmp_path), check=False)
    assert out.returncode != 0 and "unknown --env-id 'maze2d-huge'" in out.stderr and "Traceback" not in out.stderr
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(tmp_path), "--real-ratio", "1.5", check=False)
    assert out.returncode != 0 and "--real-ratio must be in [0, 1]" in out.stderr and "Traceback" not in out.stderr
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(tmp_path), "--sampler-steps", "1", "--sampler-churn", "-1",
              check=False)
    assert out.returncode != 0 and "--sampler-steps must be >= 2" in out.stderr and "--sampler-churn must be >= 0" in out.stderr
    # Models made for another dataset (a different seed of the generated maze) are refused.
    other = models_for_other_data(models, tmp_path / "other-models")
    out = run(*TINY, "--models-dir", str(other), "--runs-dir", str(tmp_path), check=False)
    assert out.returncode != 0 and "was trained on dataset local/pointmaze/umaze-other-v2" in out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- CQL pieces
def test_per_dataset_defaults_and_the_lagrange_flag_pair():
    assert defaults_for(Args(), "maze2d-umaze").cql_lagrange is True
    assert defaults_for(Args(), "hopper-medium").cql_lagrange is False
    assert defaults_for(Args(cql_lagrange=False), "maze2d-large").cql_lagrange is False
    assert flag_pair(["--no-cql-lagrange", "--seed", "2"]) == ["--cql-lagrange", "False", "--seed", "2"]
    assert flag_pair(["--cql-lagrange"]) == ["--cql-lagrange", "True"]
    assert flag_pair(["--cql-lagrange", "None", "--cql-lagrange", "--x"]) == [
        "--cql-lagrange", "None", "--cql-lagrange", "True", "--x"]


def test_tanh_gaussian_policy_is_bounded_and_its_log_prob_is_exact():
    torch.manual_seed(0)
    pol = TanhGaussianPolicy(5, 3, max_action=2.0).double()
    obs = torch.randn(512, 5, dtype=torch.float64)
    a, logp = pol(obs)
    big, _ = pol(obs * 1e3)  # saturated: still inside the box
    assert a.abs().max() <= 2.0 and big.abs().max() <= 2.0 and a.shape == (512, 3) and logp.shape == (512,)
    mean, log_std = pol._params(obs)
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(), AffineTransform(0.0, 2.0)])
    torch.testing.assert_close(logp, dist.log_prob(a).sum(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pol.log_prob(obs, a), logp, atol=1e-6, rtol=1e-6)
    det, _ = pol(obs, deterministic=True)
    torch.testing.assert_close(det, 2.0 * torch.tanh(mean))
    # log std is clamped to [-20, 2]
    with torch.no_grad():
        pol.net[-1].bias.fill_(1e3)
    assert pol._params(obs)[1].max().item() == 2.0


def test_cql_penalty_with_q_constant_in_the_action_is_the_log_sum_of_importance_weights():
    g = torch.Generator().manual_seed(0)
    B, N, A, c = 4, 10, 2, 3.0
    q = torch.full((B, N), c)
    logp_curr, logp_next = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    rand_log_density = A * math.log(0.5)
    pen = cql_penalty(torch.full((B,), c), q, q, logp_curr, q, logp_next, rand_log_density)
    # logsumexp(c - log density) - c = log sum_j 1 / density_j  (uniform density 0.25 -> weight 4 per sample)
    expected = np.log(N * 4.0 + np.exp(-logp_curr.numpy()).sum(1) + np.exp(-logp_next.numpy()).sum(1))
    np.testing.assert_allclose(pen.numpy(), expected, rtol=1e-5)
    assert (pen > 0).all()
    # Q preferring the sampled (non-dataset) actions raises the penalty; preferring the dataset action lowers it.
    higher = cql_penalty(torch.full((B,), c), q + 1.0, q + 1.0, logp_curr, q + 1.0, logp_next, rand_log_density)
    np.testing.assert_allclose(higher.numpy(), expected + 1.0, rtol=1e-5)
    lower = cql_penalty(torch.full((B,), c + 1.0), q, q, logp_curr, q, logp_next, rand_log_density)
    assert (lower < pen).all()
    # the temperature: T * logsumexp(x / T) tends to the max as T -> 0
    sharp = cql_penalty(torch.full((B,), c), q, q, logp_curr, q, logp_next, rand_log_density, temperature=1e-3)
    np.testing.assert_allclose(sharp.numpy(), np.maximum(-rand_log_density, np.maximum(
        (-logp_curr).amax(1).numpy(), (-logp_next).amax(1).numpy())), atol=1e-2)


def test_lagrange_multiplier_rises_above_the_target_gap_and_falls_below():
    for gap, rises in ((8.0, True), (2.0, False)):
        log_alpha_prime = Scalar(1.0)
        opt = torch.optim.Adam(log_alpha_prime.parameters(), lr=3e-4)
        before = alpha_prime_value(log_alpha_prime).item()
        loss = lagrange_loss(log_alpha_prime, torch.tensor(gap), torch.tensor(gap), 10.0, 5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = alpha_prime_value(log_alpha_prime).item()
        assert (after > before) if rises else (after < before)
    assert alpha_prime_value(Scalar(20.0)).item() == 1e6  # clamped
