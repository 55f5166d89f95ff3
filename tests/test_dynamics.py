"""The dynamics ensemble and the reward model, checked against systems whose truth we know."""

import copy

import numpy as np
import pytest
import torch

from common.dynamics import EnsembleDynamics, EnsembleLinear, RewardModel

S, A = 3, 2
SIGMA = 0.05  # std of the transition noise of the linear test system
E, ELITES = 5, 3


class LinearSystem:
    """s' = M s + N a + N(0, SIGMA^2): a random stable linear system (spectral radius 0.9)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        m = self.rng.normal(size=(S, S))
        self.M = 0.9 * m / np.abs(np.linalg.eigvals(m)).max()
        self.N = 0.5 * self.rng.normal(size=(S, A))

    def mean(self, s, a):
        return s @ self.M.T + a @ self.N.T

    def sample(self, n: int):
        """(s, a, noisy s', noise-free s') with s ~ N(0, I), a ~ U(-1, 1)."""
        s = self.rng.normal(size=(n, S))
        a = self.rng.uniform(-1, 1, size=(n, A))
        mean = self.mean(s, a)
        return s, a, mean + SIGMA * self.rng.normal(size=(n, S)), mean


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP contention (measured 30x faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_ensemble() -> EnsembleDynamics:
    return EnsembleDynamics(S, A, num_members=E, num_elites=ELITES, hidden=32, layers=2)


@pytest.fixture(scope="module")
def fitted():
    """One ensemble fitted on 3000 transitions of the linear system, shared by the tests (they copy it to modify it)."""
    torch.manual_seed(0)
    system = LinearSystem(0)
    model = tiny_ensemble()
    report = model.fit(*system.sample(3000)[:3], batch_size=128, max_steps=1500, patience=20, progress=False, seed=0)
    return model, system, report


def t(x):
    return torch.as_tensor(x, dtype=torch.float32)


# ------------------------------------------------------------------ structure


def test_ensemble_linear_matches_a_per_member_matmul():
    torch.manual_seed(1)
    layer = EnsembleLinear(4, 6, num_members=3)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 10, 4)
    expected = torch.stack([x[e] @ layer.weight[e] + layer.bias[e] for e in range(3)])
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight.shape == (3, 4, 6) and layer.bias.shape == (3, 1, 6)
    # Truncated-normal init scaled by fan-in: bounded by 2 std = 1/sqrt(in), and not all zero.
    assert layer.weight.abs().max() <= 1 / 4**0.5 + 1e-6 and layer.weight.std() > 0.05


def test_forward_is_one_batched_pass_over_members():
    torch.manual_seed(2)
    model = tiny_ensemble()
    # No per-member submodules: every layer is one EnsembleLinear whose weight holds all members.
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, EnsembleLinear)]
    assert len(layers) == 3
    for layer in layers:
        assert layer.weight.dim() == 3 and layer.weight.shape[0] == E
    s, a = torch.randn(7, S), torch.randn(7, A)
    mean, logvar = model(s, a)
    assert mean.shape == logvar.shape == (E, 7, S)
    # Members differ (independent init) and each sees its own slice of [E, B, .] inputs.
    assert not torch.allclose(mean[0], mean[1])
    s_e, a_e = torch.randn(E, 7, S), torch.randn(E, 7, A)
    mean_e, _ = model(s_e, a_e)
    for e in range(E):
        torch.testing.assert_close(mean_e[e], model(s_e[e], a_e[e])[0][e])
    # The soft bounds hold even for inputs far outside anything seen (the upper one up to
    # softplus(x) - x = log(1 + e^-x) at x = max - min = 10.5, i.e. 3e-5: MBPO's formula).
    _, logvar_far = model(1e3 * s, 1e3 * a)
    assert (logvar_far <= model.max_logvar + 1e-4).all() and (logvar_far >= model.min_logvar - 1e-5).all()
    assert logvar_far.max() > 0.4 and logvar_far.min() < -9.9  # both bounds were actually reached


# ------------------------------------------------------------------ fitting


def test_fit_recovers_a_linear_system(fitted):
    model, system, report = fitted
    s, a, s_next, s_true = system.sample(2000)
    pred = model.predict(s, a, deterministic=True).numpy()
    delta_var = (s_true - s).var(axis=0).mean()
    # Var(Δs) is O(1) here (s ~ N(0, I), ||M - I|| ~ 1) while the noise variance is SIGMA^2 = 0.0025,
    # so a model that learned the map must be within a small fraction of Var(Δs) of the noise-free
    # truth; 1% leaves ample room for a 1500-step fit and still rules out any model that merely
    # predicts the average change (error ~ Var(Δs)) or s' = s.
    assert ((pred - s_true) ** 2).mean() < 0.01 * delta_var
    # Against noisy targets the error cannot beat the noise, and a good fit is not far above it.
    assert SIGMA**2 * 0.7 < ((pred - s_next) ** 2).mean() < 3 * SIGMA**2
    # The report's raw-unit held-out MSE measures the same thing.
    assert SIGMA**2 * 0.7 < report["elite_holdout_mse_raw"] < 3 * SIGMA**2
    assert len(report["holdout_mse"]) == len(report["holdout_mse_raw"]) == E
    assert report["elites"] == sorted(report["elites"]) and len(report["elites"]) == ELITES
    assert report["steps"] <= 1500 and report["num_holdout"] == 300


def test_learned_variance_reflects_the_noise_level(fitted):
    model, system, _ = fitted
    s, a, _, _ = system.sample(2000)
    with torch.no_grad():
        _, logvar = model(t(s), t(a))
    # Predicted raw-unit std, averaged as a variance over elites, rows and dims: within 2x of the true noise.
    raw_var = logvar[model.elites].exp() * model.delta_std**2
    assert 0.5 * SIGMA < raw_var.mean().sqrt().item() < 2 * SIGMA


def test_early_stopping_ends_training_when_nothing_improves():
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    s, a = rng.normal(size=(200, S)), rng.normal(size=(200, A))
    s_next = s + rng.normal(size=(200, S))  # pure noise: nothing to learn after the first epochs
    model = tiny_ensemble()
    report = model.fit(t(s), t(a), t(s_next), max_epochs=500, patience=3, progress=False, seed=3)
    assert 4 <= report["epochs"] < 500
    # Normalizers come from the data (training split): Δ std is about 1, not the default.
    assert torch.allclose(model.delta_std, torch.ones(S), atol=0.25)
    assert torch.allclose(model.input_std[:S], torch.ones(S), atol=0.25)


def test_max_steps_caps_training():
    model = tiny_ensemble()
    s = np.random.default_rng(4).normal(size=(1000, S))
    report = model.fit(s, np.zeros((1000, A)), s * 0.5, batch_size=32, max_steps=7, progress=False, seed=4)
    assert report["steps"] == 7 and report["epochs"] == 1


# ------------------------------------------------------------------ elites


def test_select_elites_drops_sabotaged_members(fitted):
    model, system, _ = fitted
    model = copy.deepcopy(model)
    sabotaged = model.elites[:2].tolist()  # two current elites, so the test fails if selection did nothing
    with torch.no_grad():
        for layer in [*model.hidden_layers, model.output_layer]:
            layer.weight[sabotaged] = 3 * torch.randn_like(layer.weight[sabotaged])
    s, a, s_next, _ = system.sample(1000)
    mse = model.select_elites(s, a, s_next)
    elites = model.elites.tolist()
    assert len(elites) == ELITES and not set(sabotaged) & set(elites)
    healthy = [e for e in range(E) if e not in sabotaged]
    assert mse[sabotaged].min() > 10 * mse[healthy].max()
    raw = model.holdout_loss(s, a, s_next)
    assert raw.shape == (E,) and raw[sabotaged].min() > 10 * raw[healthy].max()


def test_predict_only_uses_elites_uniformly(fitted):
    model, system, _ = fitted
    model = copy.deepcopy(model)
    model.elites.copy_(torch.tensor([1, 3, 4]))
    with torch.no_grad():
        # Member k predicts a z-scored Δ of exactly k with a small variance; non-elites predict NaN.
        model.output_layer.weight.zero_()
        model.output_layer.bias[:, :, :S] = torch.arange(E, dtype=torch.float32).view(E, 1, 1)
        model.output_layer.bias[:, :, S:] = -4.0
        for k in (0, 2):
            model.output_layer.bias[k] = float("nan")
    s, a, _, _ = system.sample(3000)
    for deterministic in (True, False):
        nxt = model.predict(s, a, deterministic=deterministic, generator=torch.Generator().manual_seed(5))
        assert torch.isfinite(nxt).all()
    nxt = model.predict(s, a, deterministic=True, generator=torch.Generator().manual_seed(5))
    member = ((nxt - t(s) - model.delta_mean) / model.delta_std).round()
    assert (member == member[:, :1]).all()  # one member per row, for all dims
    used, counts = member[:, 0].unique(return_counts=True)
    assert used.tolist() == [1.0, 3.0, 4.0]
    assert (counts > 0.28 * 3000).all()  # uniform: each 1/3 of the rows, give or take sampling noise


def test_predict_noise_is_reproducible_with_a_generator(fitted):
    model, system, _ = fitted
    s, a, _, _ = system.sample(50)
    p1 = model.predict(s, a, generator=torch.Generator().manual_seed(6))
    p2 = model.predict(s, a, generator=torch.Generator().manual_seed(6))
    p3 = model.predict(s, a, generator=torch.Generator().manual_seed(7))
    assert torch.equal(p1, p2) and not torch.allclose(p1, p3)


def full_forward_predict(model, s, a, deterministic, generator):
    """The reference for predict: every member computed, then one elite picked per row (same draws, same order)."""
    s, a = t(s), t(a)
    mean, logvar = model(s, a)  # [E, B, S]
    rows = torch.arange(len(s))
    member = model.elites[torch.randint(model.num_elites, (len(s),), generator=generator)]
    delta = mean[member, rows]
    if not deterministic:
        delta = delta + (0.5 * logvar[member, rows]).exp() * torch.randn(delta.shape, generator=generator)
    return s + delta * model.delta_std + model.delta_mean


@pytest.mark.parametrize("deterministic", [True, False])
def test_predict_computes_the_elites_only_and_equals_the_full_forward_pick(fitted, deterministic):
    from torch.utils.flop_counter import FlopCounterMode

    model, system, _ = fitted
    model = copy.deepcopy(model)
    model.elites.copy_(torch.tensor([1, 3, 4]))  # not the first members: a slip to "the first K" would show
    with torch.no_grad():  # members that differ clearly, so a wrong pick cannot pass for float rounding
        for k in range(E):
            model.output_layer.bias[k, :, :S] += k
    s, a, _, _ = system.sample(500)
    expected = full_forward_predict(model, s, a, deterministic, torch.Generator().manual_seed(9))
    got = model.predict(s, a, deterministic=deterministic, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, expected)
    # Non-elite members never enter: NaN in every one of their parameters leaves the output as it was.
    non_elites = [0, 2]
    with torch.no_grad():
        for p in model.parameters():
            p[non_elites] = float("nan")
    got = model.predict(s, a, deterministic=deterministic, generator=torch.Generator().manual_seed(9))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)
    # ... and they are not even computed: the matmuls cost ELITES / E of a full forward.
    with FlopCounterMode(display=False) as full:
        model(t(s), t(a))
    with FlopCounterMode(display=False) as elites_only:
        model.predict(s, a, deterministic=deterministic)
    assert full.get_total_flops() > 0
    assert elites_only.get_total_flops() == full.get_total_flops() * ELITES // E


# ------------------------------------------------------------------ rollouts


class RecordingPolicy:
    """A fixed nonlinear policy that records what it was called with and what it returned."""

    def __init__(self, obs_dim: int):
        self.W = torch.randn(obs_dim, A, generator=torch.Generator().manual_seed(8)) * 0.3
        self.inputs, self.outputs = [], []

    def __call__(self, obs):
        out = torch.tanh(obs @ self.W)
        self.inputs.append(obs.clone())
        self.outputs.append(out.clone())
        return out


def test_rollout_shapes_context_and_actions(fitted):
    model, system, _ = fitted
    B, L, C = 4, 6, 2
    s0 = t(system.sample(B)[0])
    context = torch.randn(B, C)
    policy = RecordingPolicy(S + C)
    states, actions = model.rollout(policy, s0, L, context=context, generator=torch.Generator().manual_seed(0))
    assert states.shape == (B, L, S) and actions.shape == (B, L, A)
    assert torch.equal(states[:, 0], s0)
    assert len(policy.inputs) == L
    for step in range(L):
        assert torch.equal(policy.inputs[step][:, :S], states[:, step])
        assert torch.equal(policy.inputs[step][:, S:], context)  # unchanged at every step
        assert torch.equal(actions[:, step], policy.outputs[step])
    # Each next state is the model's own (stochastic) prediction from the previous state and action:
    # replaying predict() with an identically seeded generator reproduces the rollout exactly.
    g = torch.Generator().manual_seed(0)
    for step in range(L - 1):
        expected = model.predict(states[:, step], actions[:, step], generator=g)
        assert torch.equal(states[:, step + 1], expected)
    assert torch.isfinite(torch.cat([states, actions], dim=-1)).all()


def test_rollout_context_forms(fitted):
    model, system, _ = fitted
    s0 = t(system.sample(3)[0])
    policy = RecordingPolicy(S + 2)
    model.rollout(policy, s0, 3, context=torch.tensor([0.5, -1.0]))  # one goal for the whole batch
    assert all(torch.equal(x[:, S:], torch.tensor([[0.5, -1.0]] * 3)) for x in policy.inputs)
    for context in (None, torch.zeros(3, 0)):  # MuJoCo: no context, the policy sees the state only
        policy = RecordingPolicy(S)
        states, _ = model.rollout(policy, s0, 3, context=context)
        assert policy.inputs[0].shape == (3, S) and torch.equal(policy.inputs[1], states[:, 1])


def test_rollout_follows_the_true_linear_system(fitted):
    model, system, _ = fitted
    B, L = 64, 6
    s0 = system.rng.normal(size=(B, S)) * 0.7  # well inside the training distribution
    policy = RecordingPolicy(S)
    states, actions = model.rollout(policy, t(s0), L, deterministic=True)
    # The true system driven by the same policy, with no noise.
    true = [t(s0)]
    for step in range(L - 1):
        a = policy(true[-1]).double().numpy()
        true.append(t(system.mean(true[-1].double().numpy(), a)))
    true = torch.stack(true, dim=1)
    err = (states - true).pow(2).mean(dim=(0, 2)).sqrt()  # RMS error per step
    assert err[0] == 0
    # The per-step model error is ~0.015 (RMS); compounded over 5 steps of a contraction it stays small
    # next to the state scale (~0.7).
    assert err.max() < 0.1, err


def test_rollout_is_reproducible_with_a_generator(fitted):
    model, system, _ = fitted
    s0 = t(system.sample(8)[0])
    policy = RecordingPolicy(S)
    r1 = model.rollout(policy, s0, 5, generator=torch.Generator().manual_seed(9))
    r2 = model.rollout(policy, s0, 5, generator=torch.Generator().manual_seed(9))
    r3 = model.rollout(policy, s0, 5, generator=torch.Generator().manual_seed(10))
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert not torch.allclose(r1[0], r3[0])


# ------------------------------------------------------------------ persistence


def test_state_dict_round_trip(fitted):
    model, system, _ = fitted
    model = copy.deepcopy(model)
    model.elites.copy_(torch.tensor([0, 2, 4]))  # not the default arange, so the buffer must travel
    torch.manual_seed(11)
    fresh = EnsembleDynamics(**model.config)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.elites, model.elites)
    s, a, _, _ = system.sample(100)
    for deterministic in (True, False):
        p_old = model.predict(s, a, deterministic=deterministic, generator=torch.Generator().manual_seed(12))
        p_new = fresh.predict(s, a, deterministic=deterministic, generator=torch.Generator().manual_seed(12))
        assert torch.equal(p_old, p_new)
    # A model without the fitted state predicts something else (the test above is not vacuous).
    assert not torch.allclose(EnsembleDynamics(**model.config).predict(s, a, deterministic=True), p_new)


# ------------------------------------------------------------------ reward model


def reward_data(n: int, rng):
    """obs = (2 physical dims, 2 context dims), r = sin(s0) + 0.5 a0^2 + 3 (the offset checks raw units)."""
    obs = rng.normal(size=(n, 4)) * np.array([1.5, 1.0, 2.0, 2.0])
    act = rng.uniform(-1, 1, size=(n, 2))
    return obs, act, np.sin(obs[:, 0]) + 0.5 * act[:, 0] ** 2 + 3.0


@pytest.fixture(scope="module")
def fitted_reward():
    torch.manual_seed(13)
    rng = np.random.default_rng(13)
    model = RewardModel(4, 2, hidden=64, layers=2)
    report = model.fit(*reward_data(4000, rng), max_steps=3000, eval_every=250, progress=False, seed=13)
    return model, report, rng


def test_reward_model_fits_a_known_function(fitted_reward):
    model, report, rng = fitted_reward
    obs, act, r = reward_data(2000, rng)
    pred = model(torch.as_tensor(obs), torch.as_tensor(act))
    assert pred.shape == (2000,)
    # Var(r) ~ 0.5; an MLP on 4000 noise-free samples of a smooth 2-D function gets well under 1% of it,
    # while predicting the mean (or ignoring either input: each explains about half of Var(r)) cannot.
    var = r.var()
    assert ((pred.detach().numpy() - r) ** 2).mean() < 0.01 * var
    assert report["holdout_mse"] < 0.01 * var and report["train_mse"] < 0.01 * var
    assert report["num_holdout"] == 400 and report["best_step"] > 0


def test_reward_model_state_dict_round_trip(fitted_reward):
    model, _, rng = fitted_reward
    fresh = RewardModel(**model.config)
    fresh.load_state_dict(model.state_dict())
    obs, act, _ = reward_data(100, rng)
    with torch.no_grad():
        assert torch.equal(fresh(obs, act), model(obs, act))
        assert not torch.allclose(RewardModel(**model.config)(obs, act), model(obs, act))


# ------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_everything_runs_on_cuda():
    system = LinearSystem(14)
    model = tiny_ensemble().cuda()
    model.fit(*system.sample(500)[:3], max_steps=20, progress=False, seed=14)
    s0 = torch.randn(4, S)
    states, actions = model.rollout(
        lambda obs: torch.tanh(obs[:, :A]),
        s0,
        5,
        context=torch.randn(4, 2).cuda(),
        generator=torch.Generator().manual_seed(14),
    )  # a CPU generator is fine
    assert states.is_cuda and actions.is_cuda and torch.isfinite(states).all()
    reward = RewardModel(S, A, hidden=16, layers=1).cuda()
    reward.fit(states[:, 0].cpu().numpy(), actions[:, 0].cpu().numpy(), np.ones(4), max_steps=5, progress=False)
    assert reward(states[:, 0], actions[:, 0]).is_cuda
