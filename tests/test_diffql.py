"""dydiff_diffql.py's diffusion policy and evaluation (what the three scripts share is tested in test_scripts.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dydiff_diffql import (
    Args,
    DiffusionPolicy,
    NoiseMLP,
    defaults_for,
    pick_by_q,
    select_actions,
    vp_beta_schedule,
)


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
    for env_id, eta, gn in (
        ("halfcheetah-medium", 1.0, 9.0),
        ("hopper-medium", 1.0, 9.0),
        ("walker2d-medium", 1.0, 1.0),
        ("hopper-medium-replay", 1.0, 4.0),
        ("halfcheetah-medium-expert", 1.0, 7.0),
        ("walker2d-medium-expert", 1.0, 5.0),
        ("mujoco/hopper/expert-v0", 1.0, 9.0),
        ("maze2d-large", 1.0, 5.0),
    ):
        args = defaults_for(Args(env_id=env_id), env_id)
        assert (args.eta, args.grad_norm) == (eta, gn), env_id
    assert defaults_for(Args(eta=0.3, grad_norm=2.0), "hopper-medium").eta == 0.3
