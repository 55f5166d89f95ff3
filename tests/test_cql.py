"""dydiff_cql.py's own pieces (what the three scripts share is tested in test_scripts.py)."""

import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dydiff_cql import (
    Args,
    Scalar,
    TanhGaussianPolicy,
    alpha_prime_value,
    cql_penalty,
    defaults_for,
    flag_pair,
    lagrange_loss,
)


# ----------------------------------------------------------------------------- CQL pieces
def test_per_dataset_defaults_and_the_lagrange_flag_pair():
    assert defaults_for(Args(), "maze2d-umaze").cql_lagrange is True
    assert defaults_for(Args(), "hopper-medium").cql_lagrange is False
    assert defaults_for(Args(cql_lagrange=False), "maze2d-large").cql_lagrange is False
    assert flag_pair(["--no-cql-lagrange", "--seed", "2"]) == ["--cql-lagrange", "False", "--seed", "2"]
    assert flag_pair(["--cql-lagrange"]) == ["--cql-lagrange", "True"]
    assert flag_pair(["--cql-lagrange", "None", "--cql-lagrange", "--x"]) == [
        "--cql-lagrange",
        "None",
        "--cql-lagrange",
        "True",
        "--x",
    ]


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
    np.testing.assert_allclose(
        sharp.numpy(),
        np.maximum(-rand_log_density, np.maximum((-logp_curr).amax(1).numpy(), (-logp_next).amax(1).numpy())),
        atol=1e-2,
    )


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
