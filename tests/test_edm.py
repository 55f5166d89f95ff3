"""EDM denoiser, loss and sampler with hard replacement (common/edm.py): values, invariants, distributions."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from common import edm
from common.edm import (
    EMA,
    Conv1dBlock,
    EDMPrecond,
    MinMaxNormalizer,
    TemporalUnet,
    build_denoiser,
    condition_mask,
    edm_loss,
    edm_sampler,
)

SIGMA_DATA = 0.5


def tiny_unet(C, dim=8, dim_mults=(1, 2), seed=0):
    """A small random TemporalUnet (GroupNorm needs widths divisible by 8)."""
    torch.manual_seed(seed)
    return TemporalUnet(C, dim=dim, dim_mults=dim_mults)


class ConstNet(nn.Module):
    """F that returns a constant and records what it was called with; `width`: its output's width when its
    input is wider (extra condition or position channels), else the input's."""

    def __init__(self, value, width=None):
        super().__init__()
        self.value = value
        self.width = width
        self.calls = []

    def forward(self, x, noise):
        self.calls.append((x.clone(), noise.clone()))
        return torch.full_like(x[..., : self.width], self.value)


class HugeRandomNet(nn.Module):
    """F whose output ignores its input and is enormous: nothing it says may leak into the conditions."""

    def forward(self, x, noise):
        return 1e6 * torch.randn_like(x)


class Recorder:
    """Wraps a denoiser D(x, sigma) and keeps every (x, sigma) it was given."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.sigma_data = getattr(denoiser, "sigma_data", SIGMA_DATA)
        self.inputs = []

    def __call__(self, x, sigma):
        out = self.denoiser(x, sigma)
        self.inputs.append((x.clone(), torch.as_tensor(sigma).clone(), out.clone()))
        return out


# ---------------------------------------------------------------------------------------------------------
# condition mask
# ---------------------------------------------------------------------------------------------------------


def test_condition_mask_marks_s0_and_every_action():
    L, S, A = 7, 3, 2
    mask = condition_mask(L, S, A)
    assert mask.shape == (L, S + A) and mask.dtype == torch.bool
    for t in range(L):
        for c in range(S + A):
            expected = (c >= S) or (t == 0)
            assert bool(mask[t, c]) == expected, (t, c)
    assert int(mask.sum()) == S + L * A


# ---------------------------------------------------------------------------------------------------------
# preconditioning (Karras et al. 2022, Table 1)
# ---------------------------------------------------------------------------------------------------------

SIGMAS = [0.002, 0.05, 0.5, 1.0, 7.3, 80.0]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_precond_values_for_constant_networks(sigma):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    sd2 = SIGMA_DATA**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * SIGMA_DATA / math.sqrt(sigma**2 + sd2)
    c_in = 1.0 / math.sqrt(sigma**2 + sd2)

    zero, one = ConstNet(0.0), ConstNet(1.0)
    D0 = EDMPrecond(zero, sigma_data=SIGMA_DATA)(x, torch.full((3,), sigma, dtype=torch.float64))
    D1 = EDMPrecond(one, sigma_data=SIGMA_DATA)(x, sigma)  # a python float works too
    torch.testing.assert_close(D0, c_skip * x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(D1, c_skip * x + c_out, rtol=1e-12, atol=1e-12)

    # F sees c_in * x and c_noise = ln(sigma) / 4, one per sample.
    for net in (zero, one):
        ((x_in, noise),) = net.calls
        torch.testing.assert_close(x_in, c_in * x, rtol=1e-12, atol=1e-12)
        assert noise.shape == (3,)
        torch.testing.assert_close(noise, torch.full((3,), math.log(sigma) / 4, dtype=torch.float64))


def test_precond_per_sample_sigma():
    x = torch.randn(len(SIGMAS), 4, 3, dtype=torch.float64)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    net = ConstNet(1.0)
    D = EDMPrecond(net)(x, sigma)
    assert EDMPrecond(net).sigma_data == 0.5
    for b, s in enumerate(SIGMAS):
        expected = 0.25 / (s**2 + 0.25) * x[b] + s * 0.5 / math.sqrt(s**2 + 0.25)
        torch.testing.assert_close(D[b], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.calls[0][1], torch.log(sigma) / 4)


# ---------------------------------------------------------------------------------------------------------
# sampler: conditions are exact and clean, seeding
# ---------------------------------------------------------------------------------------------------------

L_, S_, A_ = 12, 3, 2


def _cond(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, L_, S_ + A_, generator=g) * 2 - 1


@pytest.mark.parametrize("make_net", [lambda: tiny_unet(S_ + A_), HugeRandomNet], ids=["tiny_unet", "huge_random"])
def test_sampler_keeps_conditions_bitwise_and_clean_in_every_input(make_net):
    mask = condition_mask(L_, S_, A_)
    cond = _cond()
    rec = Recorder(EDMPrecond(make_net()).eval())
    num_steps = 34
    out = edm_sampler(rec, cond, mask, num_steps=num_steps, generator=torch.Generator().manual_seed(1))

    assert out.shape == cond.shape
    assert torch.equal(out[:, mask], cond[:, mask])
    assert torch.isfinite(out).all()
    assert not torch.equal(out[:, ~mask], cond[:, ~mask])  # the states were actually generated
    # Heun: two evaluations per step except the last one.
    assert len(rec.inputs) == 2 * num_steps - 1
    for x, sigma, _ in rec.inputs:
        assert torch.equal(x[:, mask], cond[:, mask])
        assert sigma.shape == (cond.shape[0],)


@pytest.mark.parametrize("S_churn", [0.0, 60.0])
def test_sampler_noise_levels_follow_table_3(S_churn):
    """The denoiser is asked at t_hat_i = (1 + gamma_i) t_i, then at t_{i+1} (Heun), paper Table 3."""
    N, s_min, s_max, rho, S_tmin, S_tmax = 34, 0.002, 80.0, 7.0, 0.370, 52.212
    t = [(s_max ** (1 / rho) + i / (N - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(N)] + [0.0]
    expected = []
    for i in range(N):
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_tmin <= t[i] <= S_tmax else 0.0
        expected.append(t[i] + gamma * t[i])
        if i < N - 1:
            expected.append(t[i + 1])
    assert sum(1 for i in range(N) if S_tmin <= t[i] <= S_tmax) not in (0, N)  # the window matters here

    mask = condition_mask(L_, S_, A_)
    rec = Recorder(EDMPrecond(ConstNet(0.0)))
    edm_sampler(rec, _cond(), mask, num_steps=N, S_churn=S_churn, generator=torch.Generator().manual_seed(0))
    seen = [sigma[0].item() for _, sigma, _ in rec.inputs]
    assert all((sigma == sigma[0]).all() for _, sigma, _ in rec.inputs)
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


def test_sampler_reads_only_conditioned_entries_of_cond():
    mask = condition_mask(L_, S_, A_)
    cond = _cond()
    other = torch.where(mask, cond, torch.full_like(cond, 123.0))  # same conditions, junk elsewhere
    net = EDMPrecond(tiny_unet(S_ + A_)).eval()
    a = edm_sampler(net, cond, mask, num_steps=8, generator=torch.Generator().manual_seed(3))
    b = edm_sampler(net, other, mask, num_steps=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sampler_same_seed_same_samples_different_seed_different_samples():
    mask = condition_mask(L_, S_, A_)
    cond = _cond()
    net = EDMPrecond(tiny_unet(S_ + A_)).eval()
    run = lambda seed: edm_sampler(net, cond, mask, num_steps=10, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, ~mask], c[:, ~mask])
    assert torch.equal(c[:, mask], cond[:, mask])


def test_sampler_runs_without_grad():
    mask = condition_mask(L_, S_, A_)
    net = EDMPrecond(tiny_unet(S_ + A_))
    out = edm_sampler(net, _cond(), mask, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert not out.requires_grad


def test_sampler_under_bf16_autocast_keeps_a_float32_state_and_exact_conditions():
    """What the training scripts do on a GPU (here on CPU, which autocasts the same way)."""
    mask = condition_mask(L_, S_, A_)
    cond = _cond()
    net = EDMPrecond(tiny_unet(S_ + A_)).eval()
    fp32 = edm_sampler(net, cond, mask, num_steps=10, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.net(cond, torch.zeros(len(cond))).dtype == torch.bfloat16  # the network does run in bf16
        bf16 = edm_sampler(net, cond, mask, num_steps=10, generator=torch.Generator().manual_seed(4))
    assert bf16.dtype == torch.float32
    assert torch.equal(bf16[:, mask], cond[:, mask])
    diff = (bf16 - fp32)[:, ~mask].abs()
    assert 0 < diff.mean() < 0.05 * fp32[:, ~mask].abs().mean()  # ~1% seen


def test_compiled_denoiser_samples_like_the_eager_one():
    mask = condition_mask(L_, S_, A_)
    cond = _cond()
    net = EDMPrecond(tiny_unet(S_ + A_)).eval()
    eager = edm_sampler(net, cond, mask, num_steps=4, generator=torch.Generator().manual_seed(7))
    compiled = edm_sampler(torch.compile(net), cond, mask, num_steps=4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert torch.equal(compiled[:, mask], cond[:, mask])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_on_cuda_matches_cpu():
    mask = condition_mask(L_, S_, A_)
    cond = _cond()
    net = EDMPrecond(tiny_unet(S_ + A_)).eval()
    cpu = edm_sampler(net, cond, mask, num_steps=10, generator=torch.Generator().manual_seed(2))
    net.cuda()
    gpu = edm_sampler(net, cond.cuda(), mask.cuda(), num_steps=10, generator=torch.Generator().manual_seed(2))
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu[:, mask.cuda()].cpu(), cond[:, mask])
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# sampler: distribution with the ideal denoiser of a Gaussian
# ---------------------------------------------------------------------------------------------------------


def heun_gaussian_reference(
    s, mu, num_steps=34, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=60.0, S_min=0.370, S_max=52.212, S_noise=1.002
):
    """Exact mean and std of the sampler's output for x0 ~ N(mu, s^2) and the ideal denoiser.

    For that denoiser, D(x; t) - mu = r(t) (x - mu) with r(t) = s^2 / (s^2 + t^2), so every Heun step
    multiplies (x - mu) by a number and every churn adds independent noise: propagating the mean and
    variance of (x - mu) through the steps in float64 gives the sampler's output law exactly,
    discretization error included (it is a few percent in std for 34 steps, and more with churn).
    """
    s = torch.as_tensor(s, dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = t.tolist() + [0.0]
    r = lambda tt: s**2 / (s**2 + tt**2)
    mean = -torch.as_tensor(mu, dtype=torch.float64)  # x starts at N(0, t_0^2): (x - mu) has mean -mu
    var = torch.full_like(s, t[0] ** 2)
    for k in range(num_steps):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t[k] <= S_max else 0.0
        t_hat = t[k] * (1 + gamma)
        var = var + (t_hat**2 - t[k] ** 2) * S_noise**2
        slope_hat = (1 - r(t_hat)) / t_hat  # d = slope * (x - mu)
        euler = 1 + (t[k + 1] - t_hat) * slope_hat
        if k < num_steps - 1:
            slope_next = (1 - r(t[k + 1])) / t[k + 1]
            factor = 1 + (t[k + 1] - t_hat) * 0.5 * (slope_hat + euler * slope_next)
        else:
            factor = euler
        mean, var = factor * mean, factor**2 * var
    return torch.as_tensor(mu, dtype=torch.float64) + mean, var.sqrt()


N_WINDOWS = 4000
GL, GS, GA = 5, 3, 1  # 5 x 4 entries per window: 12 generated, 8 conditioned


def _gaussian_problem():
    C = GS + GA
    mu = torch.linspace(-0.5, 0.5, GL * C).reshape(GL, C)
    s = torch.linspace(0.1, 0.6, GL * C).reshape(GL, C).flip(1)
    return mu, s


@pytest.mark.parametrize("S_churn", [0.0, 60.0])
def test_sampler_reproduces_a_gaussian_with_its_ideal_denoiser(S_churn):
    mu, s = _gaussian_problem()
    mask = condition_mask(GL, GS, GA)
    ideal = lambda x, sigma: mu + s**2 / (s**2 + sigma.reshape(-1, 1, 1) ** 2) * (x - mu)
    cond = torch.rand(N_WINDOWS, GL, GS + GA, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = edm_sampler(ideal, cond, mask, S_churn=S_churn, generator=torch.Generator().manual_seed(1))

    assert torch.equal(out[:, mask], cond[:, mask])
    gen = ~mask
    mean, std = out.mean(0).double(), out.std(0).double()
    ref_mean, ref_std = heun_gaussian_reference(s, mu, S_churn=S_churn)
    n = N_WINDOWS
    # Against the exact law of the discretized sampler: sampling error only. The mean's standard error
    # is std/sqrt(n), the std's is about std/sqrt(2n); 5 standard errors per entry (12 entries) makes a
    # false alarm about 1e-5 likely, and the seeds are fixed anyway.
    assert ((mean - ref_mean).abs() < 5 * ref_std / math.sqrt(n))[gen].all()
    assert ((std / ref_std - 1).abs() < 5 / math.sqrt(2 * n))[gen].all()
    # Against the data law N(mu, s^2): the mean has no bias worth the name (it keeps a fraction ~s/80 of
    # the starting offset -mu), so 5 standard errors again; the std is off by the 34-step discretization
    # (reference: <= 3% without churn, <= 8% with the paper's churn) plus 5 standard errors (5.6%).
    assert ((mean - mu.double()).abs() < 5 * s / math.sqrt(n))[gen].all()
    bias = 0.03 if S_churn == 0 else 0.08
    assert ((ref_std / s - 1).abs() < bias)[gen].all()
    assert ((std / s - 1).abs() < bias + 5 / math.sqrt(2 * n))[gen].all()


def test_sampler_samples_the_conditional_law_given_clean_conditions():
    """Generated states depend on s_0 and the actions; the ideal conditional denoiser needs them clean."""
    mu, s = _gaussian_problem()
    mask = condition_mask(GL, GS, GA)
    beta = 0.7

    def conditional_mean(x):
        # E[state | s_0, actions] of a toy model: mu + beta * (first coordinate of s_0) + action of the row.
        return mu + beta * x[:, :1, :1] + x[:, :, GS : GS + 1]

    def ideal(x, sigma):
        m = conditional_mean(x)  # read from the (clean) conditioned entries of the input
        return m + s**2 / (s**2 + sigma.reshape(-1, 1, 1) ** 2) * (x - m)

    cond = torch.rand(N_WINDOWS, GL, GS + GA, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = edm_sampler(ideal, cond, mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out[:, mask], cond[:, mask])

    m = conditional_mean(cond).double()
    # The output mean is linear in the data mean (a fraction ~s/80 of the start offset survives), so the
    # reference for a data mean of 1, scaled by m, gives each window's exact mean; the std is as before.
    mean_per_unit, ref_std = heun_gaussian_reference(s, torch.ones_like(s))
    z = (out.double() - m * mean_per_unit) / ref_std
    n = N_WINDOWS
    gen = ~mask
    assert (z.mean(0).abs() < 5 / math.sqrt(n))[gen].all()
    assert ((z.std(0) - 1).abs() < 5 / math.sqrt(2 * n))[gen].all()


# ---------------------------------------------------------------------------------------------------------
# loss (paper Eq. 4)
# ---------------------------------------------------------------------------------------------------------


class GarbageAtConditions(nn.Module):
    """F of `net`, but NaN / huge values wherever the conditions are."""

    def __init__(self, net, mask, value):
        super().__init__()
        self.net, self.mask, self.value = net, mask, value

    def forward(self, x, noise):
        return torch.where(self.mask, torch.full_like(x, self.value), self.net(x, noise))


def _batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, L_, S_ + A_, generator=g) * 2 - 1


def test_loss_ignores_network_output_at_conditions():
    mask = condition_mask(L_, S_, A_)
    x0 = _batch()
    net = tiny_unet(S_ + A_)
    ref = edm_loss(EDMPrecond(net), x0, mask, generator=torch.Generator().manual_seed(4))
    for value in (1e6, float("nan"), -3.0):
        loss = edm_loss(
            EDMPrecond(GarbageAtConditions(net, mask, value)), x0, mask, generator=torch.Generator().manual_seed(4)
        )
        assert loss.item() == ref.item()
    assert torch.isfinite(ref) and ref > 0


def test_loss_ignores_noise_drawn_at_conditions(monkeypatch):
    """Run the loss twice with noise that differs only at the conditioned entries: same input, same loss."""
    mask = condition_mask(L_, S_, A_)
    x0 = _batch()
    g = torch.Generator().manual_seed(0)
    sigma_normal = torch.randn(x0.shape[0], 1, 1, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    other_noise = torch.where(mask, 50 * torch.randn(x0.shape, generator=g), noise)

    def run(noise_tensor):
        draws = iter([sigma_normal, noise_tensor])
        monkeypatch.setattr(edm, "_randn", lambda shape, like, generator=None: next(draws).reshape(shape))
        rec = Recorder(EDMPrecond(tiny_unet(S_ + A_)))
        return edm_loss(rec, x0, mask), rec.inputs[0][0]

    loss_a, input_a = run(noise)
    loss_b, input_b = run(other_noise)
    assert loss_a.item() == loss_b.item()
    assert torch.equal(input_a, input_b)
    assert torch.equal(input_a[:, mask], x0[:, mask])  # conditions enter clean
    # the generated entries were noised with sigma * noise
    sigma = (-1.2 + 1.2 * sigma_normal).exp()
    torch.testing.assert_close(input_a[:, ~mask], (x0 + sigma * noise)[:, ~mask])


def test_loss_value_matches_weighted_mse_on_generated_entries():
    mask = condition_mask(L_, S_, A_)
    x0 = _batch()
    rec = Recorder(EDMPrecond(tiny_unet(S_ + A_)))
    loss = edm_loss(rec, x0, mask, generator=torch.Generator().manual_seed(1))
    ((x_in, sigma, D),) = rec.inputs
    sigma = sigma.reshape(-1, 1, 1)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (lam * (D - x0) ** 2)[:, ~mask].mean()
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(loss) and loss > 0


def test_row_weight_weights_the_loss_per_row():
    """row_weight: the weighted mean over the generated entries; all ones gives the paper's loss exactly."""
    mask = condition_mask(L_, S_, A_)
    x0 = _batch()
    D = EDMPrecond(tiny_unet(S_ + A_))
    plain = edm_loss(D, x0, mask, generator=torch.Generator().manual_seed(1))
    ones = edm_loss(D, x0, mask, generator=torch.Generator().manual_seed(1), row_weight=torch.ones(L_))
    torch.testing.assert_close(ones, plain)
    w = torch.ones(L_)
    w[[1, L_ - 1]] = 10.0
    rec = Recorder(D)
    loss = edm_loss(rec, x0, mask, generator=torch.Generator().manual_seed(1), row_weight=w)
    ((_, sigma, out),) = rec.inputs
    sigma = sigma.reshape(-1, 1, 1)
    per_entry = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (out - x0) ** 2
    weights = w[None, :, None].expand_as(x0)
    expected = (per_entry * weights)[:, ~mask].sum() / weights[:, ~mask].sum()
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, plain)


def test_loss_sigma_is_lognormal_p_mean_p_std():
    mask = condition_mask(L_, S_, A_)
    B = 4000
    x0 = torch.zeros(B, L_, S_ + A_)
    rec = Recorder(EDMPrecond(ConstNet(0.0)))
    edm_loss(rec, x0, mask, P_mean=-1.2, P_std=1.2, generator=torch.Generator().manual_seed(2))
    log_sigma = rec.inputs[0][1].log().double()
    assert log_sigma.shape == (B,)
    # 5 standard errors: 1.2/sqrt(B) for the mean, about 1.2/sqrt(2B) for the std.
    assert abs(log_sigma.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(B)
    assert abs(log_sigma.std().item() - 1.2) < 5 * 1.2 / math.sqrt(2 * B)


class RowwiseNet(nn.Module):
    """F that mixes channels within a row only, so padding rows cannot reach real rows through it."""

    def __init__(self, C):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(C + 1, C)

    def forward(self, x, noise):
        noise = noise.reshape(-1, 1, 1).expand(x.shape[0], x.shape[1], 1)
        return self.lin(torch.cat([x, noise], dim=-1))


def test_loss_skips_padding_rows():
    mask = condition_mask(L_, S_, A_)
    x0 = _batch()
    valid = torch.ones(x0.shape[0], L_, dtype=torch.bool)
    valid[0, 5:] = False
    valid[3, 1:] = False
    junk = torch.where(valid[:, :, None], x0, torch.full_like(x0, float("nan")))
    D = EDMPrecond(RowwiseNet(S_ + A_))
    a = edm_loss(D, x0, mask, valid=valid, generator=torch.Generator().manual_seed(7))
    b = edm_loss(D, junk, mask, valid=valid, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(a) and a > 0
    assert a.item() == b.item()
    # without the mask the junk rows would count
    assert torch.isnan(edm_loss(D, junk, mask, generator=torch.Generator().manual_seed(7)))

    # and the value is the weighted MSE over generated entries of valid rows only
    rec = Recorder(D)
    loss = edm_loss(rec, x0, mask, valid=valid, generator=torch.Generator().manual_seed(7))
    _, sigma, out = rec.inputs[0]
    sigma = sigma.reshape(-1, 1, 1)
    counted = ~mask & valid[:, :, None]
    expected = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (out - x0) ** 2)[counted].mean()
    torch.testing.assert_close(loss, expected)


def test_loss_backpropagates_into_every_parameter():
    mask = condition_mask(L_, S_, A_)
    net = tiny_unet(S_ + A_)
    loss = edm_loss(EDMPrecond(net), _batch(), mask, generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


# ---------------------------------------------------------------------------------------------------------
# TemporalUnet
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [100, 32, 37, 1])
def test_unet_output_shape(L):
    C = 6
    net = tiny_unet(C, dim=8, dim_mults=(1, 2, 4))
    out = net(torch.randn(2, L, C), torch.randn(2))
    assert out.shape == (2, L, C)
    assert torch.isfinite(out).all()


def test_unet_uses_the_noise_input():
    net = tiny_unet(5)
    x = torch.randn(2, 16, 5)
    assert not torch.allclose(net(x, torch.zeros(2)), net(x, torch.ones(2)))


def test_unet_parameter_count_matches_the_architecture():
    """Count parameters from the spec (Diffuser's temporal U-Net) independently of the module."""
    C, dim, mults = 5, 16, (1, 2, 4)

    def conv_block(i, o):  # Conv1d k=5 + GroupNorm affine
        return i * o * 5 + o + 2 * o

    def res_block(i, o):
        return conv_block(i, o) + conv_block(o, o) + (dim * o + o) + ((i * o + o) if i != o else 0)

    dims = [C, *(dim * m for m in mults)]
    in_out = list(zip(dims[:-1], dims[1:]))
    total = dim * 4 * dim + 4 * dim + 4 * dim * dim + dim  # noise MLP
    for level, (i, o) in enumerate(in_out):
        total += res_block(i, o) + res_block(o, o)
        if level < len(in_out) - 1:
            total += o * o * 3 + o  # Downsample1d
    total += 2 * res_block(dims[-1], dims[-1])
    for i, o in reversed(in_out[1:]):
        total += res_block(2 * o, i) + res_block(i, i) + i * i * 4 + i  # Upsample1d
    total += conv_block(dim, dim) + dim * C + C

    net = TemporalUnet(C, dim=dim, dim_mults=mults)
    assert sum(p.numel() for p in net.parameters()) == total


def test_unet_parameter_count_grows_with_dim():
    count = lambda d: sum(p.numel() for p in TemporalUnet(4, dim=d, dim_mults=(1, 2)).parameters())
    assert count(8) < count(16) < count(32)


def test_unet_gradient_flows_to_input_and_parameters():
    net = tiny_unet(4)
    x = torch.randn(3, 20, 4, requires_grad=True)
    net(x, torch.randn(3)).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("full_res_skip", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("L", [100, 37, 1])
def test_unet_options_keep_the_output_shape(full_res_skip, padding_mode, L):
    net = TemporalUnet(6, dim=8, dim_mults=(1, 2, 4), in_channels=9, full_res_skip=full_res_skip, padding_mode=padding_mode)
    out = net(torch.randn(2, L, 9), torch.randn(2))
    assert out.shape == (2, L, 6) and torch.isfinite(out).all()


def test_full_res_skip_feeds_the_finest_features_to_the_output_block():
    """The only change is the output block's input: the finest level's `dim` channels beside the up path's."""
    C, dim = 5, 16
    count = lambda **kw: sum(p.numel() for p in TemporalUnet(C, dim=dim, dim_mults=(1, 2), **kw).parameters())
    assert count(full_res_skip=True) - count() == dim * dim * 5  # Conv1d(2 dim -> dim, k=5) instead of (dim -> dim)
    # The output block's input ends with the finest level's features, row for row.
    net = TemporalUnet(C, dim=dim, dim_mults=(1, 2), full_res_skip=True)
    seen = {}
    net.downs[0][1].register_forward_hook(lambda m, i, o: seen.setdefault("finest", o))
    net.final.register_forward_hook(lambda m, i, o: seen.setdefault("final_in", i[0]))
    net(torch.randn(2, 16, C), torch.randn(2))
    assert seen["final_in"].shape == (2, 2 * dim, 16)
    torch.testing.assert_close(seen["final_in"][:, dim:], seen["finest"])
    with pytest.raises(ValueError, match="padding_mode"):
        TemporalUnet(C, dim=dim, padding_mode="reflect")


def test_replicate_padding_invents_no_edges():
    """A signal constant in time stays constant through a replicate-padded conv block; zero padding bends its ends."""
    x = torch.randn(3, 4, 1).expand(3, 4, 20)  # [B, channels, L], the same at every time step
    for mode, flat in (("replicate", True), ("zeros", False)):
        torch.manual_seed(0)
        out = Conv1dBlock(4, 8, padding_mode=mode)(x)
        assert torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-5) == flat, mode


def test_cond_channels_give_the_network_the_clean_conditions_at_every_noise_level():
    """cond_channels: F sees s_0 on every row and each row's action, unscaled, beside c_in x."""
    S, A, L = 3, 2, 7

    net = ConstNet(0.0, width=S + A)
    D = EDMPrecond(net, sigma_data=SIGMA_DATA, cond_channels=(S, A))
    x = torch.randn(2, L, S + A, dtype=torch.float64)
    for sigma in (80.0, 1.0, 0.002):
        D(x, sigma)
        seen, _ = net.calls[-1]
        c_in = 1 / math.sqrt(sigma**2 + SIGMA_DATA**2)
        assert seen.shape == (2, L, 2 * (S + A))
        torch.testing.assert_close(seen[..., : S + A], c_in * x)
        torch.testing.assert_close(seen[..., S + A : S + A + S], x[:, :1, :S].expand(2, L, S))
        torch.testing.assert_close(seen[..., S + A + S :], x[..., S:])
    # The paper's network sees only c_in x.
    plain = ConstNet(0.0)
    EDMPrecond(plain, sigma_data=SIGMA_DATA)(x, 80.0)
    assert plain.calls[-1][0].shape == x.shape


def test_position_channels_say_how_far_each_row_is_from_the_window_ends():
    """position_channels: two more channels of F's input, 1/(1+t) and 1/(L-t), the same at every noise level."""
    S, A, L = 3, 2, 7

    net = ConstNet(0.0, width=S + A)
    x = torch.randn(2, L, S + A, dtype=torch.float64)
    t = torch.arange(L, dtype=torch.float64)
    for cond in (None, (S, A)):
        D = EDMPrecond(net, sigma_data=SIGMA_DATA, cond_channels=cond, position_channels=True)
        for sigma in (80.0, 0.002):
            D(x, sigma)
            seen, _ = net.calls[-1]
            assert seen.shape == (2, L, (2 if cond else 1) * (S + A) + 2)
            torch.testing.assert_close(seen[0, :, -2], 1 / (1 + t))  # 1 at s_0, 1/2 at s_1, ...
            torch.testing.assert_close(seen[1, :, -1], 1 / (L - t))  # ... and 1 at the last row
    # The channels reach a real U-Net: the same window gives another output with them.
    torch.manual_seed(0)
    with_pos = build_denoiser(S, A, dim=8, dim_mults=(1, 2), cond_channels=True, position_channels=True)
    assert with_pos.net.downs[0][0].block1[0].in_channels == 2 * (S + A) + 2
    assert with_pos(x.float(), torch.ones(2)).shape == x.shape


def test_relative_states_denoise_around_s0():
    """relative_states: an exact shift by s_0 of the state columns; where F says nothing, D says s_0."""
    S, A, L, sigma = 3, 2, 6, 2.0
    x = torch.randn(2, L, S + A, dtype=torch.float64)
    net = ConstNet(0.0)
    D = EDMPrecond(net, sigma_data=SIGMA_DATA, relative_states=S)(x, sigma)
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    s0 = x[:, :1, :S]
    torch.testing.assert_close(D[..., :S], s0 + c_skip * (x[..., :S] - s0))
    torch.testing.assert_close(D[..., S:], c_skip * x[..., S:])  # actions are not shifted
    seen, _ = net.calls[-1]
    assert torch.all(seen[:, 0, :S] == 0)  # F sees s_0 as the origin
    # Without cond_channels the denoiser is then blind to where the window is: shifting every state shifts D.
    torch.manual_seed(0)
    rel = EDMPrecond(tiny_unet(S + A).double(), sigma_data=SIGMA_DATA, relative_states=S)
    moved = x.clone()
    moved[..., :S] += 0.7
    torch.testing.assert_close(rel(moved, sigma)[..., :S], rel(x, sigma)[..., :S] + 0.7)


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(full_res_skip=True, padding_mode="replicate", cond_channels=True, relative_states=True, position_channels=True),
    ],
)
def test_build_denoiser_saves_and_loads_through_load_dm(tmp_path, options):
    """dm.pt records the network options; load_dm rebuilds the same network (old files: the paper's network)."""
    from common.checkpoints import atomic_save, load_dm

    S, A = 4, 2
    torch.manual_seed(0)
    d = build_denoiser(S, A, dim=8, dim_mults=(1, 2), **options)
    meta = dict(
        fingerprint="f",
        dataset_ids=["x"],
        state_dim=S,
        action_dim=A,
        horizon=16,
        dim=8,
        dim_mults=[1, 2],
        sigma_data=0.5,
        state_dict=d.state_dict(),
        normalizer=MinMaxNormalizer(torch.zeros(6), torch.ones(6)).state_dict(),
    )
    atomic_save(dict(meta, **options), tmp_path / "dm.pt")  # a file without the keys is one written before them
    loaded, _, _ = load_dm(tmp_path, "f")
    x = torch.randn(2, 16, S + A)
    torch.testing.assert_close(loaded(x, torch.ones(2)), d.eval()(x, torch.ones(2)))
    assert (loaded.cond_channels is not None) == bool(options) == loaded.net.full_res_skip == loaded.position_channels


# ---------------------------------------------------------------------------------------------------------
# MinMaxNormalizer, EMA
# ---------------------------------------------------------------------------------------------------------


def test_minmax_normalizer_range_and_round_trip():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 4)) * np.array([1.0, 10.0, 0.01, 3.0]) + np.array([0.0, -5.0, 2.0, 100.0])
    data[:, 3] = 7.5  # a constant dimension
    norm = MinMaxNormalizer.from_data(data)
    x = torch.as_tensor(data, dtype=torch.float32)
    z = norm.normalize(x)
    torch.testing.assert_close(z[:, :3].min(0).values, -torch.ones(3))
    torch.testing.assert_close(z[:, :3].max(0).values, torch.ones(3))
    assert torch.isfinite(z).all() and (z[:, 3] == 0).all()
    torch.testing.assert_close(norm.unnormalize(z), x, rtol=1e-5, atol=1e-4)
    # any leading shape, e.g. windows [B, L, C]
    w = x[:60].reshape(3, 20, 4)
    torch.testing.assert_close(norm.unnormalize(norm.normalize(w)), w, rtol=1e-5, atol=1e-4)


def test_minmax_normalizer_state_dict_holds_the_statistics():
    norm = MinMaxNormalizer(torch.tensor([-1.0, 0.0, 5.0]), torch.tensor([3.0, 2.0, 6.0]))
    state = norm.state_dict()
    assert set(state) == {"low", "high"}
    fresh = MinMaxNormalizer(torch.zeros(3), torch.ones(3))
    fresh.load_state_dict(state)
    x = torch.tensor([[1.0, 1.0, 5.5]])
    torch.testing.assert_close(fresh.normalize(x), torch.tensor([[0.0, 0.0, 0.0]]))
    torch.testing.assert_close(fresh.normalize(torch.tensor([[-1.0, 2.0, 6.0]])), torch.tensor([[-1.0, 1.0, 1.0]]))


def test_ema_follows_the_decay_formula():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    assert ema.module is not model and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    new = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update(model)
    for k in old:
        torch.testing.assert_close(ema.module.state_dict()[k], 0.9 * old[k] + 0.1 * new[k])
    ema.update(model)
    for k in old:
        torch.testing.assert_close(ema.module.state_dict()[k], 0.81 * old[k] + 0.19 * new[k])

    restored = EMA(nn.Linear(3, 2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    for k, v in ema.state_dict().items():
        assert torch.equal(restored.module.state_dict()[k], v)
