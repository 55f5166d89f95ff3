"""Single-step dynamics ensemble T_phi(s, a) and reward model r_psi(s, a) used by DyDiff's rollouts.

The ensemble is MBPO's probabilistic ensemble (Janner et al. 2019): E Gaussian MLPs on z-scored
inputs predicting the z-scored state change, trained with a Gaussian NLL, elites chosen on a held-out
split, each prediction drawn from a uniformly random elite. It models only the *physical* state; a task
context (PointMaze's goal) is appended only when the policy is called (docs/datasets.md: "What a loaded dataset holds").

    model = EnsembleDynamics(state_dim, action_dim)
    report = model.fit(states, actions, next_states)             # numpy or tensors
    states, actions = model.rollout(policy, s0, L, context=goal)  # [B, L, S], [B, L, A]

Both models keep their normalizer statistics in buffers, so `model.config` + `model.state_dict()`
is all that is needed to rebuild them: `EnsembleDynamics(**config).load_state_dict(state_dict)`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

EVAL_CHUNK = 8192  # rows per forward pass when evaluating, so a 1M-sample dataset does not exhaust memory


def _as_tensor(x, device) -> torch.Tensor:
    """A float32 tensor on `device` from numpy / a tensor / a list."""
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32, device=device)


def _make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator; without a seed, one drawn from torch's global RNG so torch.manual_seed still rules."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return torch.Generator().manual_seed(seed)


def _split(n: int, holdout_fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (train, holdout) index split; holdout is empty only when holdout_fraction is 0."""
    perm = torch.randperm(n, generator=g)
    n_hold = 0 if holdout_fraction <= 0 else min(max(int(n * holdout_fraction), 1), n - 1)
    return perm[n_hold:], perm[:n_hold]


def _mean_std(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std; constant columns get std 1 so z-scoring never divides by ~0."""
    mean, std = x.mean(0), x.std(0) if len(x) > 1 else torch.ones_like(x[0])
    return mean, torch.where(std < eps, torch.ones_like(std), std)


def _randint(high: int, size: int, device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform ints drawn on the generator's device (a CPU generator works for a CUDA model), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(high, (size,), generator=generator, device=gen_device).to(device)


def _randn(shape, device, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


class EnsembleLinear(nn.Module):
    """E independent linear layers stored as one weight [E, in, out]; one batched matmul for all members."""

    def __init__(self, in_features: int, out_features: int, num_members: int):
        super().__init__()
        self.in_features, self.out_features, self.num_members = in_features, out_features, num_members
        self.weight = nn.Parameter(torch.empty(num_members, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_members, 1, out_features))
        # MBPO's init: truncated normal, std 1 / (2 sqrt(in)), cut at 2 std (xavier-like fan-in scaling).
        std = 1.0 / (2.0 * math.sqrt(in_features))
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """[E, B, in] -> [E, B, out]: bias + x @ weight for every member at once.

        With `members` (K indices), only those members: [K, B, in] -> [K, B, out].
        """
        if members is None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.baddbmm(self.bias[members], x, self.weight[members])

    def extra_repr(self) -> str:
        """Sizes shown by print(model)."""
        return f"in_features={self.in_features}, out_features={self.out_features}, num_members={self.num_members}"


class EnsembleDynamics(nn.Module):
    """MBPO-style probabilistic ensemble over the physical state: (s, a) -> Gaussian over s' - s."""

    def __init__(
        self, state_dim: int, action_dim: int, num_members: int = 7, num_elites: int = 5, hidden: int = 200, layers: int = 4
    ):
        super().__init__()
        if not 1 <= num_elites <= num_members:
            raise ValueError(f"need 1 <= num_elites <= num_members, got {num_elites} and {num_members}")
        self.config = dict(
            state_dim=state_dim,
            action_dim=action_dim,
            num_members=num_members,
            num_elites=num_elites,
            hidden=hidden,
            layers=layers,
        )
        self.state_dim, self.action_dim = state_dim, action_dim
        self.num_members, self.num_elites = num_members, num_elites
        dims = [state_dim + action_dim] + [hidden] * layers
        self.hidden_layers = nn.ModuleList(EnsembleLinear(i, o, num_members) for i, o in zip(dims[:-1], dims[1:]))
        self.output_layer = EnsembleLinear(dims[-1], 2 * state_dim, num_members)  # mean and log-variance
        # Soft bounds on the log-variance, learnt per member (so restoring a member's best weights restores
        # its bounds too). Starting values as in MBPO; units are those of the z-scored state change.
        self.max_logvar = nn.Parameter(torch.full((num_members, 1, state_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((num_members, 1, state_dim), -10.0))
        # Normalizers live in buffers: the state_dict alone is enough to use a fitted model.
        self.register_buffer("input_mean", torch.zeros(state_dim + action_dim))
        self.register_buffer("input_std", torch.ones(state_dim + action_dim))
        self.register_buffer("delta_mean", torch.zeros(state_dim))
        self.register_buffer("delta_std", torch.ones(state_dim))
        self.register_buffer("elites", torch.arange(num_elites, dtype=torch.long))

    @property
    def device(self) -> torch.device:
        """Where the parameters live; every input is moved here."""
        return self.max_logvar.device

    # ---------------------------------------------------------------- forward / prediction

    def _forward_normalized(self, x: torch.Tensor, members: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z-scored inputs [E, B, S+A] -> z-scored Δs mean and bounded log-variance, each [E, B, S].

        With `members` (K indices), only those members are computed: [K, B, S+A] -> [K, B, S] each.
        """
        for layer in self.hidden_layers:
            x = F.silu(layer(x, members))
        mean, logvar = self.output_layer(x, members).chunk(2, dim=-1)
        max_logvar, min_logvar = (
            (self.max_logvar, self.min_logvar) if members is None else (self.max_logvar[members], self.min_logvar[members])
        )
        # Soft clamp (MBPO): smooth, so the bounds themselves receive gradients and can tighten.
        logvar = max_logvar - F.softplus(max_logvar - logvar)
        logvar = min_logvar + F.softplus(logvar - min_logvar)
        return mean, logvar

    def _normalize_inputs(self, states: torch.Tensor, actions: torch.Tensor, copies: int | None = None) -> torch.Tensor:
        """z-score concat(s, a); [B, ...] inputs are shared by all members (or `copies` of them) -> [E, B, S+A]."""
        x = (torch.cat([states, actions], dim=-1) - self.input_mean) / self.input_std
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(copies or self.num_members, -1, -1)
        return x

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the z-scored Δs for every member, [E, B, S], from [B, .] or [E, B, .] inputs."""
        states, actions = _as_tensor(states, self.device), _as_tensor(actions, self.device)
        return self._forward_normalized(self._normalize_inputs(states, actions))

    def _delta_to_raw(self, delta_z: torch.Tensor) -> torch.Tensor:
        """z-scored Δs -> Δs in raw state units."""
        return delta_z * self.delta_std + self.delta_mean

    @torch.no_grad()
    def predict(self, states, actions, deterministic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw next states [B, S]; each row from a uniformly random elite, mean + std * noise unless deterministic."""
        states, actions = _as_tensor(states, self.device), _as_tensor(actions, self.device)
        # One batched pass over the elites only: non-elite members are never computed.
        mean, logvar = self._forward_normalized(self._normalize_inputs(states, actions, self.num_elites), self.elites)
        rows = torch.arange(len(states), device=self.device)
        elite = _randint(self.num_elites, len(states), self.device, generator)  # position in self.elites, per row
        delta = mean[elite, rows]
        if not deterministic:
            delta = delta + (0.5 * logvar[elite, rows]).exp() * _randn(delta.shape, self.device, generator)
        return states + self._delta_to_raw(delta)

    @torch.no_grad()
    def rollout(
        self, policy, s0, L: int, context=None, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoregressive rollout with `policy` ([B, S+C] -> [B, A]): states s_0..s_{L-1} [B, L, S], actions [B, L, A]."""
        s = _as_tensor(s0, self.device)
        B = len(s)
        if context is not None:
            context = _as_tensor(context, self.device)
            context = context.expand(B, -1) if context.dim() == 1 else context
            if context.shape[-1] == 0:
                context = None
        states = torch.empty(B, L, self.state_dim, device=self.device)
        actions = torch.empty(B, L, self.action_dim, device=self.device)
        for t in range(L):
            states[:, t] = s
            # The context (goal) is constant along a rollout: only the policy sees it, the physics does not.
            a = policy(s if context is None else torch.cat([s, context], dim=-1))
            a = _as_tensor(a, self.device)
            if a.shape != (B, self.action_dim):
                raise ValueError(f"policy returned shape {tuple(a.shape)}, expected {(B, self.action_dim)}")
            actions[:, t] = a
            if t + 1 < L:  # s_L is never needed: the window holds s_0..s_{L-1}
                s = self.predict(s, a, deterministic=deterministic, generator=generator)
        return states, actions

    # ---------------------------------------------------------------- evaluation and elites

    @torch.no_grad()
    def _member_mse(self, x_norm: torch.Tensor, delta_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member MSE of the mean prediction on z-scored data: (z-scored units, raw units), each [E]."""
        sq_z = torch.zeros(self.num_members, device=self.device)
        sq_raw = torch.zeros(self.num_members, device=self.device)
        for i in range(0, len(x_norm), EVAL_CHUNK):
            x = x_norm[i : i + EVAL_CHUNK].unsqueeze(0).expand(self.num_members, -1, -1)
            err_z = self._forward_normalized(x)[0] - delta_z[i : i + EVAL_CHUNK]
            sq_z += err_z.pow(2).sum(dim=(1, 2))
            sq_raw += (err_z * self.delta_std).pow(2).sum(dim=(1, 2))  # Δ error in raw units = s' error
        n = max(len(x_norm), 1) * self.state_dim
        return sq_z / n, sq_raw / n

    def _normalized_data(self, states, actions, next_states) -> tuple[torch.Tensor, torch.Tensor]:
        """(z-scored inputs [N, S+A], z-scored Δs [N, S]) with the current normalizer statistics."""
        s, a, s2 = (_as_tensor(x, self.device) for x in (states, actions, next_states))
        x = (torch.cat([s, a], dim=-1) - self.input_mean) / self.input_std
        return x, (s2 - s - self.delta_mean) / self.delta_std

    @torch.no_grad()
    def holdout_loss(self, states, actions, next_states) -> torch.Tensor:
        """Per-member MSE [E] of the deterministic next-state prediction, in raw state units."""
        return self._member_mse(*self._normalized_data(states, actions, next_states))[1]

    @torch.no_grad()
    def select_elites(self, states, actions, next_states) -> torch.Tensor:
        """Make the num_elites members with the lowest MSE on this data the elites; return per-member MSE [E].

        The MSE is in z-scored Δs units so that every state dimension counts equally, whatever its scale.
        """
        mse = self._member_mse(*self._normalized_data(states, actions, next_states))[0]
        self.elites.copy_(torch.argsort(mse)[: self.num_elites].sort().values)
        return mse

    # ---------------------------------------------------------------- training

    def fit(
        self,
        states,
        actions,
        next_states,
        holdout_fraction: float = 0.1,
        batch_size: int = 256,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        patience: int = 5,
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
        logvar_bound_coef: float = 0.01,
        bootstrap: bool = True,
        progress: bool = True,
        seed: int | None = None,
    ) -> dict:
        """Fit normalizers and all members (Gaussian NLL, early stopping on held-out MSE), then pick the elites.

        Each member trains on its own bootstrap resample of the training split (MBPO), reshuffled every
        epoch. Training stops once no member improved its held-out MSE by more than 1% for `patience`
        epochs, or at max_epochs / max_steps; each member then gets back its best weights.
        """
        g = _make_generator(seed)
        s, a, s2 = (_as_tensor(x, self.device) for x in (states, actions, next_states))
        train_idx, hold_idx = _split(len(s), holdout_fraction, g)
        train_idx, hold_idx = train_idx.to(self.device), hold_idx.to(self.device)
        # Normalizer statistics from the training split only: the held-out split stays unseen.
        in_mean, in_std = _mean_std(torch.cat([s, a], dim=-1)[train_idx])
        d_mean, d_std = _mean_std((s2 - s)[train_idx])
        self.input_mean.copy_(in_mean), self.input_std.copy_(in_std)
        self.delta_mean.copy_(d_mean), self.delta_std.copy_(d_std)
        x_all, y_all = self._normalized_data(s, a, s2)
        x_train, y_train = x_all[train_idx], y_all[train_idx]
        # With no held-out split, early stopping and elite selection fall back to the training data.
        x_hold, y_hold = (x_all[hold_idx], y_all[hold_idx]) if len(hold_idx) else (x_train, y_train)
        n_train = len(x_train)

        # Weight decay on the layer weights only (MBPO's L2 penalty), not on biases or the logvar bounds.
        weights = [layer.weight for layer in [*self.hidden_layers, self.output_layer]]
        others = [p for p in self.parameters() if all(p is not w for w in weights)]
        optimizer = torch.optim.Adam(
            [{"params": weights, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}], lr=lr
        )

        # Every parameter has the member as its first dimension, so a member's best weights are a slice.
        best_params = {name: p.detach().clone() for name, p in self.named_parameters()}
        best_mse = torch.full((self.num_members,), float("inf"), device=self.device)
        member_train = (
            torch.randint(n_train, (self.num_members, n_train), generator=g)
            if bootstrap
            else torch.arange(n_train).expand(self.num_members, -1)
        )
        steps, epochs, epochs_since_update = 0, 0, 0
        bar = tqdm(  # no total, so no ETA: early stopping usually ends it long before max_epochs
            iter(range(max_epochs)) if max_epochs is not None else itertools.count(),
            desc=f"dynamics ensemble, epochs (early stopping{f'; at most {max_epochs}' if max_epochs else ''})",
            disable=not progress,
            leave=False,
        )
        for _ in bar:
            # Each member its own shuffle of its own resample: [E, n_train] row indices.
            order = torch.argsort(torch.rand(self.num_members, n_train, generator=g), dim=1)
            epoch_idx = torch.gather(member_train, 1, order).to(self.device)
            self.train()
            for i in range(0, n_train, batch_size):
                idx = epoch_idx[:, i : i + batch_size]
                mean, logvar = self._forward_normalized(x_train[idx])  # [E, b, S+A] -> [E, b, S]
                target = y_train[idx]
                # Gaussian NLL (up to constants), averaged over rows and dims, summed over members.
                nll = ((mean - target).pow(2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
                # Small push to tighten the bounds, else max_logvar would just drift up (MBPO).
                loss = nll + logvar_bound_coef * (self.max_logvar.sum() - self.min_logvar.sum())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            epochs += 1
            self.eval()
            mse = self._member_mse(x_hold, y_hold)[0]
            improved = mse < best_mse * (1 - 0.01)  # more than 1% better than the member's best so far
            best_mse = torch.where(improved, mse, best_mse)
            for name, p in self.named_parameters():
                best_params[name][improved] = p.detach()[improved]
            epochs_since_update = 0 if bool(improved.any()) else epochs_since_update + 1
            bar.set_postfix(holdout_mse=f"{best_mse.mean().item():.4g}", steps=steps)
            if epochs_since_update >= patience or (max_steps is not None and steps >= max_steps):
                break
        bar.close()

        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(best_params[name])
        self.eval()
        mse_z, mse_raw = self._member_mse(x_hold, y_hold)
        self.elites.copy_(torch.argsort(mse_z)[: self.num_elites].sort().values)
        return {
            "holdout_mse": mse_z.tolist(),  # per member, z-scored Δs units
            "holdout_mse_raw": mse_raw.tolist(),  # per member, raw state units
            "elites": self.elites.tolist(),
            "elite_holdout_mse_raw": mse_raw[self.elites].mean().item(),
            "epochs": epochs,
            "steps": steps,
            "num_train": n_train,
            "num_holdout": len(hold_idx),
        }


class RewardModel(nn.Module):
    """MLP r_psi(obs, a) on z-scored inputs, predicting the z-scored reward; obs is the full RL observation."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256, layers: int = 3):
        super().__init__()
        self.config = dict(obs_dim=obs_dim, action_dim=action_dim, hidden=hidden, layers=layers)
        self.obs_dim, self.action_dim = obs_dim, action_dim
        dims = [obs_dim + action_dim] + [hidden] * layers
        blocks = []
        for i, o in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(i, o), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(dims[-1], 1))
        self.register_buffer("input_mean", torch.zeros(obs_dim + action_dim))
        self.register_buffer("input_std", torch.ones(obs_dim + action_dim))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    @property
    def device(self) -> torch.device:
        """Where the parameters live; every input is moved here."""
        return self.reward_mean.device

    def _forward_normalized(self, x_norm: torch.Tensor) -> torch.Tensor:
        """z-scored inputs [B, O+A] -> z-scored reward [B]."""
        return self.net(x_norm).squeeze(-1)

    def forward(self, obs, actions) -> torch.Tensor:
        """Predicted rewards [B] in raw units."""
        x = torch.cat([_as_tensor(obs, self.device), _as_tensor(actions, self.device)], dim=-1)
        return self._forward_normalized((x - self.input_mean) / self.input_std) * self.reward_std + self.reward_mean

    @torch.no_grad()
    def _mse(self, x_norm: torch.Tensor, r_norm: torch.Tensor) -> float:
        """MSE in raw reward units on z-scored data."""
        sq = sum(
            ((self._forward_normalized(x_norm[i : i + EVAL_CHUNK]) - r_norm[i : i + EVAL_CHUNK]) * self.reward_std)
            .pow(2)
            .sum()
            .item()
            for i in range(0, len(x_norm), EVAL_CHUNK)
        )
        return sq / max(len(x_norm), 1)

    def fit(
        self,
        observations,
        actions,
        rewards,
        holdout_fraction: float = 0.1,
        batch_size: int = 256,
        max_steps: int = 100_000,
        eval_every: int = 1000,
        patience: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        progress: bool = True,
        seed: int | None = None,
    ) -> dict:
        """Regress rewards (MSE on z-scored rewards), early stopping on held-out MSE; keeps the best weights.

        Evaluates every `eval_every` steps and stops after `patience` evaluations without a new best.
        """
        g = _make_generator(seed)
        x = torch.cat([_as_tensor(observations, self.device), _as_tensor(actions, self.device)], dim=-1)
        r = _as_tensor(rewards, self.device).reshape(-1)
        train_idx, hold_idx = _split(len(x), holdout_fraction, g)
        train_idx, hold_idx = train_idx.to(self.device), hold_idx.to(self.device)
        mean, std = _mean_std(x[train_idx])
        self.input_mean.copy_(mean), self.input_std.copy_(std)
        r_mean, r_std = _mean_std(r[train_idx].unsqueeze(-1))
        self.reward_mean.copy_(r_mean[0]), self.reward_std.copy_(r_std[0])
        x_norm, r_norm = (x - self.input_mean) / self.input_std, (r - self.reward_mean) / self.reward_std
        x_train, r_train = x_norm[train_idx], r_norm[train_idx]
        x_hold, r_hold = (x_norm[hold_idx], r_norm[hold_idx]) if len(hold_idx) else (x_train, r_train)

        optimizer = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        best_mse, best_step, best_state = float("inf"), 0, None
        evals_since_best, step = 0, 0
        bar = tqdm(range(1, max_steps + 1), desc="reward model", disable=not progress, leave=False)
        for step in bar:
            self.train()
            idx = torch.randint(len(x_train), (batch_size,), generator=g).to(self.device)
            loss = F.mse_loss(self._forward_normalized(x_train[idx]), r_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % eval_every == 0 or step == max_steps:
                self.eval()
                mse = self._mse(x_hold, r_hold)
                if mse < best_mse:
                    best_mse, best_step, evals_since_best = mse, step, 0
                    best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                else:
                    evals_since_best += 1
                bar.set_postfix(holdout_mse=f"{best_mse:.4g}")
                if evals_since_best >= patience:
                    break
        bar.close()
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.eval()
        return {
            "train_mse": self._mse(x_train, r_train),
            "holdout_mse": self._mse(x_hold, r_hold),
            "best_step": best_step,
            "steps": step,
            "num_train": len(x_train),
            "num_holdout": len(hold_idx),
        }
