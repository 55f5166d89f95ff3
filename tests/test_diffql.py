"""dydiff_diffql.py: subprocess runs in base, M = 0 and DyDiff modes, resume, bad inputs; its diffusion policy."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from script_runs import TINY, kill_after_first_checkpoint, metrics, models_for_other_data, run_script  # noqa: E402
from dydiff_diffql import (DiffusionPolicy, NoiseMLP, defaults_for, Args, pick_by_q,  # noqa: E402
                           select_actions, vp_beta_schedule)



def run(*args, **kwargs):
    return run_script("dydiff_diffql.py", *args, **kwargs)


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
    losses = next(r for r in m if "losses/bc_loss" in r)
    assert all(np.isfinite(losses[f"losses/{k}"]) for k in ("bc_loss", "ql_loss", "actor_loss", "critic_loss"))
    assert (run_dir / "synthetic_trajectories.png").stat().st_size > 1000
    assert (run_dir / "final_policy.pt").exists()


def test_base_and_single_step_modes(dydiff_run, dirs):
    models, runs = dirs
    run(*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "base", "--no-dydiff",
        "--total-steps", "60", "--eval-freq", "60")
    base = next(runs.glob("*base__*"))
    assert not any("dydiff/kept_fraction" in r for r in metrics(base))
    assert json.loads((base / "result.json").read_text())["dydiff"] is False
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
            "--total-steps", "600", "--eval-freq", "100"]
    run_dir = kill_after_first_checkpoint("dydiff_diffql.py", args, runs, "killed")
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert 0 < ckpt["step"] < 600, "the run was killed before it finished"
    buf = ckpt["synthetic"]
    assert buf["size"] > 0 and buf["obs"].shape == (buf["size"], 6) and torch.isfinite(buf["obs"]).all()
    out = run("--resume", str(run_dir), "--total-steps", "1")  # the saved arguments win over the command line
    assert f"resuming {run_dir} at step {ckpt['step']:,}" in out.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["total_steps"] == 600 and len(result["evaluations"]) == 6
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert final["step"] == 600 and final["synthetic"]["size"] >= buf["size"]
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


# ----------------------------------------------------------------------------- the diffusion policy
class Huge(torch.nn.Module):
    """A noise network with enormous outputs of either sign."""

    def forward(self, x, t, obs):
        return 1e8 * torch.sin(1e3 * obs[:, :1] + x.sum(-1, keepdim=True) + t[:, None]).expand_as(x)


@pytest.mark.parametrize("max_action", [1.0, 0.4])
def test_samples_stay_inside_the_action_bounds_for_any_network(max_action):
    g = torch.Generator().manual_seed(0)
    obs = 100 * torch.randn(512, 4, generator=g)
    for model in (Huge(), NoiseMLP(4, 2)):
        a = DiffusionPolicy(model, 2, max_action).sample(obs, g)
        assert a.shape == (512, 2) and torch.isfinite(a).all() and a.abs().max() <= max_action


def test_vp_schedule():
    betas = vp_beta_schedule(5)
    ac = DiffusionPolicy(NoiseMLP(3, 2), 2, 1.0).alphas_cumprod
    assert betas.shape == ac.shape == (5,)
    assert ((betas > 0) & (betas < 1)).all() and ((ac > 0) & (ac < 1)).all()
    assert (ac[1:] < ac[:-1]).all()
    assert ac[-1] < 0.01  # the last step is almost pure noise
    np.testing.assert_allclose(ac.numpy(), np.cumprod(1 - betas.numpy()), rtol=1e-6)


def test_bc_loss_of_a_network_predicting_the_true_noise_is_zero():
    policy = DiffusionPolicy(None, 2, 1.0)
    actions = torch.rand(256, 2) * 2 - 1

    def oracle(x_t, t, obs):  # knows a_0, so recovers the noise from a_t exactly
        return (x_t - policy.sqrt_alphas_cumprod[t, None] * actions) / policy.sqrt_one_minus_alphas_cumprod[t, None]

    policy.model = oracle
    assert policy.bc_loss(torch.randn(256, 3), actions).item() < 1e-8
    policy.model = lambda x_t, t, obs: torch.zeros_like(x_t)  # predicting 0: the loss is E[eps^2] = 1
    assert abs(policy.bc_loss(torch.randn(256, 3), actions).item() - 1.0) < 0.2


def test_sampling_is_reproducible_with_a_fixed_seed():
    torch.manual_seed(0)
    policy = DiffusionPolicy(NoiseMLP(3, 2), 2, 1.0)
    obs = torch.randn(64, 3)
    a1 = policy.sample(obs, torch.Generator().manual_seed(7))
    a2 = policy.sample(obs, torch.Generator().manual_seed(7))
    a3 = policy.sample(obs, torch.Generator().manual_seed(8))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


def test_evaluation_picks_the_argmax_of_a_peaked_q():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        q = torch.randn(50, generator=g)
        best = int(torch.randint(50, (1,), generator=g))
        q[best] = 1e4
        assert int(pick_by_q(q, g)) == best
    counts = torch.bincount(torch.stack([pick_by_q(torch.zeros(4), g) for _ in range(400)]), minlength=4)
    assert (counts > 50).all()  # a flat Q draws uniformly


def test_batched_evaluation_picks_each_state_its_best_own_candidate():
    torch.manual_seed(0)
    actor = DiffusionPolicy(NoiseMLP(3, 2), 2, 1.0)
    obs = torch.randn(4, 3)
    obs[:, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0])
    K = 8

    class PeakedCritic:
        """Q = 1e4 * a_0 * sign(s_0): the state's largest a_0 when s_0 > 0, its smallest otherwise."""

        def q_min(self, o, a):
            assert torch.equal(o.view(4, K, 3), obs[:, None].expand(4, K, 3))  # each state's K copies together
            return 1e4 * a[:, 0] * o[:, 0].sign()

    chosen = select_actions(actor, PeakedCritic(), obs, K, torch.Generator().manual_seed(3))
    # The candidates: the reverse process draws first, so the same seed gives them again.
    candidates = actor.sample(obs.repeat_interleave(K, dim=0), torch.Generator().manual_seed(3)).view(4, K, 2)
    score = candidates[..., 0] * obs[:, :1].sign()
    assert chosen.shape == (4, 2)
    for i in range(4):  # one of the state's own candidates, with the best score (several may tie at the bound)
        own = (candidates[i] == chosen[i]).all(-1)
        assert own.any() and score[i][own].max() == score[i].max()
    assert len(chosen.unique(dim=0)) == 4


def test_per_dataset_defaults():
    for env_id, eta, gn in (("halfcheetah-medium", 1.0, 9.0), ("hopper-medium", 1.0, 9.0), ("walker2d-medium", 1.0, 1.0),
                            ("hopper-medium-replay", 1.0, 4.0), ("halfcheetah-medium-expert", 1.0, 7.0),
                            ("walker2d-medium-expert", 1.0, 5.0), ("mujoco/hopper/expert-v0", 1.0, 9.0),
                            ("maze2d-large", 1.0, 5.0)):
        args = defaults_for(Args(env_id=env_id), env_id)
        assert (args.eta, args.grad_norm) == (eta, gn), env_id
    assert defaults_for(Args(eta=0.3, grad_norm=2.0), "hopper-medium").eta == 0.3
