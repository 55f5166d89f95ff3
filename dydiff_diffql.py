# Docs: docs/scripts.md, section "dydiff_diffql.py"
"""Diffusion-QL (Wang, Hunt & Zhou, 2022) with DyDiff data augmentation (arXiv 2405.19189, Algorithm 1), offline.

The policy is a 5-step VP diffusion model over actions (noise-prediction MLP, Mish), trained with the
denoising (BC) loss plus eta times a normalized Q loss; twin Mish critics bootstrap from an EMA copy of
the policy. Every `rollout_freq` gradient steps the learning policy (one reverse-process sample per
state) rolls out synthetic trajectories: a dynamics ensemble gives the first draft, the diffusion model
(DM) re-samples the states given s_0 and the actions M times while the policy relabels the actions, a
reward model scores them, the best are kept and pushed into a FIFO synthetic buffer that is mixed into
each batch at the real ratio. `--no-dydiff` is the plain Diffusion-QL; `--num-iterations 0` uses
single-step-model rollouts only; `--augment synther` is the paper's baseline, SynthER: Diffusion-QL on transitions
generated once, before training, by a diffusion model of the dataset's transitions.

Per-dataset eta and grad_norm (gradient-norm clipping of actor and critics) are the Diffusion-QL
authors' `hyperparameters` dict in main.py of github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL
(paper Table 6): eta = 1.0 for every Gym locomotion dataset; grad_norm halfcheetah / hopper / walker2d
= 9 / 9 / 1 (medium), 2 / 4 / 4 (medium-replay), 7 / 5 / 5 (medium-expert); lr 3e-4, no max-Q backup.
Levels the table lacks (expert, simple, random, ...) take the medium values.

maze2d (not in the Diffusion-QL table): eta = 1.0, grad_norm = 5.0. The maze2d datasets are long, noisy
waypoint-controller trajectories with a sparse goal reward, closest in character to the locomotion
medium-replay / medium-expert data (multi-modal, partly sub-optimal behaviour), for which the authors use
eta = 1.0 throughout; eta = 1.0 keeps the same balance between staying on the data (BC loss) and
improving Q, and the Q loss is normalized by mean|Q| so its scale does not depend on the reward scale
of the maze. grad_norm = 5.0 is the middle of the authors' locomotion range (1 to 9) and their
medium-expert value for hopper and walker2d: a moderate clip that tames the early critic spikes of
the sparse maze return without slowing learning; the large values of 9 were only needed for the
smooth halfcheetah / hopper medium data. Both can be overridden with --eta and --grad-norm.
"""

import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.args import shared_arg_problems
from common.buffer import SyntheticBuffer
from common.checkpoints import load_or_pretrain_models
from common.config import PretrainConfig, cpu_cost_line
from common.d4rl import dataset_name
from common.datasets import OFFLINE_ENV_VAR, load_dataset
from common.edm import refine_states
from common.envs import evaluate, numpy_policy, termination_fn
from common.pointmaze import BatchedSimulator, true_rewards
from common.runs import Run, parse_args
from common.synther import load_or_generate as synther_transitions


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled by default"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "dydiff"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    wandb_group: Optional[str] = None
    """the wandb group of the run"""
    runs_dir: str = "runs"
    """each run writes metrics, checkpoints and pictures to {runs_dir}/{run_name}/"""
    resume: Optional[str] = None
    """a run folder to continue (a killed run resumes from its last checkpoint to the same total steps)"""

    # Data and pretrained models
    env_id: str = "maze2d-umaze"
    """D4RL-style name (maze2d-large, hopper-medium, ...) or a Minari dataset id"""
    offline: bool = False
    """never try to download a dataset (also: DYDIFF_OFFLINE=1)"""
    dataset_steps: int | None = None
    """steps of a locally generated PointMaze dataset (default: D4RL's size for maze2d-*: 1M umaze, 2M medium, 4M large)"""
    models_dir: str = "models"
    """pretrained models are read from {models_dir}/{env_id}/ (made first if missing)"""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """the models' options when they must be made first (`--pretrain.dm-dim 32`, ...; as pretrain_models.py's)"""
    preset: Literal["paper", "cpu"] = "paper"
    """named configuration (docs/scripts.md, "Presets"): paper = the paper's settings (GPU); cpu = a run two CPU cores
    finish in about an hour, with CPU-size models in models-cpu/; flags on the command line win over it"""

    # Diffusion-QL (Wang, Hunt & Zhou 2022)
    total_steps: int = 500_000
    """gradient steps (the released DyDiff code's Diffusion-QL budget: 2000 epochs x 250)"""
    batch_size: int = 256
    """B: transitions per gradient step"""
    learning_rate: float = 3e-4
    """learning rate of the actor and the critics"""
    lr_decay: bool = False
    """cosine decay of both learning rates to 0 over total_steps (a larger --total-steps on resume: the rest of the
    decay of the new budget)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target critic update rate"""
    eta: Optional[float] = None
    """weight of the Q loss in the actor loss; default per dataset (module docstring)"""
    grad_norm: Optional[float] = None
    """max gradient norm of actor and critics (<= 0: no clipping); default per dataset (module docstring)"""
    max_q_backup: bool = False
    """target = max over 10 sampled next actions of min(Q1, Q2)"""
    n_timesteps: int = 5
    """diffusion steps of the policy (VP schedule)"""
    ema_decay: float = 0.995
    """decay of the EMA actor used for the targets"""
    step_start_ema: int = 1000
    """the EMA actor is updated from this step on"""
    update_ema_every: int = 5
    """EMA update every this many steps"""
    eval_samples: int = 50
    """evaluation: actions sampled per state, one picked by softmax over Q"""
    normalize_states: bool = False
    """z-score observations with the real dataset's statistics (Diffusion-QL does not)"""
    eval_freq: int = 5000
    """evaluate (and checkpoint) every this many steps"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    eval_max_steps: Optional[int] = None
    """length of an evaluation episode; default: the env's registration (maze2d 300/600/800 by maze, MuJoCo 1000)"""

    # The augmentation: DyDiff (the paper's method), SynthER (the paper's baseline) or none (the base algorithm)
    augment: Literal["dydiff", "synther", "none"] = "dydiff"
    """dydiff = rollouts of the learning policy (paper Algorithm 1); synther = SynthER's transitions, generated once
    before training by a diffusion model of the dataset's transitions; none = the plain base algorithm"""
    dydiff: bool = True
    """--no-dydiff is --augment none (kept for older commands and run folders)"""

    # DyDiff (paper Table 4)
    rollout_freq: int = 250
    """gradient steps between two rollout steps (the released code: one rollout per epoch of 250 steps)"""
    rollout_batch_size: int = 2048
    """B_r: synthetic trajectories per rollout step"""
    rollout_length: int = 100
    """L: length of a synthetic trajectory (the DM's horizon)"""
    num_iterations: Optional[int] = None
    """M: DM <-> policy refinement iterations (paper Alg. 1); default 1 maze2d, 2 MuJoCo; 0 = ensemble only"""
    filter: Literal["softmax", "hardmax", "none"] = "softmax"
    """trajectory filter: top-k (hardmax) or sampling without replacement p ~ exp(z-scored return / T); with
    --augment synther none unless given (softmax: SynthER-f, paper Table 6, on each transition's generated reward)"""
    filter_temperature: float = 0.05
    """T of the softmax filter"""
    filter_proportion: Optional[float] = None
    """eta: fraction of trajectories kept; default 0.6 (maze2d, medium), 0.8 (medium-replay, medium-expert)"""
    real_ratio: float = 0.6
    """alpha: fraction of real transitions in a batch (all real while the synthetic buffer is empty); with
    --augment synther 0 unless given (SynthER's offline runs train on its transitions alone)"""
    synthetic_buffer_size: int = 2_000_000
    """capacity of the FIFO synthetic buffer (transitions)"""
    average_with_previous: bool = False
    """the released code's variant: average new DM states with the previous iteration's"""
    sampler_steps: int = 34
    """N: EDM sampler steps (paper Table 3: 34)"""
    sampler_churn: float = 60.0
    """S_churn: the sampler's stochasticity (paper Table 3: 60; 0 is EDM's deterministic Heun sampler)"""
    dm_bf16: bool = True
    """run the DM in bfloat16 autocast on a GPU (the sampler's own arithmetic stays float32)"""
    compile_dm: bool = False
    """torch.compile the DM for the sampler (compiles during the first rollout; meant for GPUs)"""
    check_trajectories: int = 64
    """PointMaze: kept synthetic trajectories per rollout replayed in the real simulator to check them (0: none)"""
    # Ablations (PointMaze): each swaps one of DyDiff's approximations for the real thing. They read the real
    # simulator, so a run with one is no longer offline RL (docs/scripts.md, "Ablations").
    rollout_states: Literal["dm", "simulator-replay", "simulator"] = "dm"
    """dm = DyDiff; simulator-replay = each DM round is the simulator replaying the actions from s_0 (a perfect DM);
    simulator = the policy acting in the simulator from s_0 (true on-policy rollouts: no ensemble, no DM)"""
    stored_actions: Literal["relabelled", "conditioning"] = "relabelled"
    """the actions stored with the final states: the policy's relabelled ones (Algorithm 1), or those the last DM
    round was given (so each stored transition is consistent with the dynamics that made it)"""
    rollout_rewards: Literal["model", "simulator"] = "model"
    """what the filter ranks and D_syn stores: the reward model's rewards, or the task's true rewards"""

    # SynthER (Lu et al. 2023), the paper's baseline: --augment synther (docs/scripts.md, "SynthER")
    synther_samples: int = 5_000_000
    """transitions SynthER generates once before training (SynthER: 5M), cached beside its model"""
    synther_sampler_steps: int = 128
    """Heun steps of SynthER's sampler (SynthER: 128)"""
    synther_next_states: Literal["model", "simulator"] = "model"
    """ablation: each generated (s, a)'s s', reward and terminal as generated, or from the real simulator stepped
    once and the task's reward (SynthER with perfect dynamics; PointMaze only, reads the simulator)"""


# (eta, grad_norm) of Diffusion-QL's main.py `hyperparameters` (the -v2 Gym locomotion datasets).
DIFFQL_HYPERPARAMETERS = {
    "halfcheetah-medium": (1.0, 9.0),
    "hopper-medium": (1.0, 9.0),
    "walker2d-medium": (1.0, 1.0),
    "halfcheetah-medium-replay": (1.0, 2.0),
    "hopper-medium-replay": (1.0, 4.0),
    "walker2d-medium-replay": (1.0, 4.0),
    "halfcheetah-medium-expert": (1.0, 7.0),
    "hopper-medium-expert": (1.0, 5.0),
    "walker2d-medium-expert": (1.0, 5.0),
}
MAZE2D_HYPERPARAMETERS = (1.0, 5.0)  # our choice, justified in the module docstring


def diffql_hyperparameters(env_id: str) -> tuple[float, float]:
    """(eta, grad_norm) for a dataset: the authors' table; other levels take medium; maze2d and others ours."""
    name = env_id.lower().replace("_", "-")
    for task in ("halfcheetah", "hopper", "walker2d"):
        if task in name:
            level = next((lv for lv in ("medium-expert", "medium-replay") if lv in name), "medium")
            return DIFFQL_HYPERPARAMETERS[f"{task}-{level}"]
    return MAZE2D_HYPERPARAMETERS


def defaults_for(args: Args, env_id: str) -> Args:
    """Fill the per-dataset defaults of paper Table 4 and of Diffusion-QL's table."""
    if args.num_iterations is None and args.augment != "synther":  # SynthER makes no rollouts
        args.num_iterations = 1 if "maze" in env_id else 2
    if args.filter_proportion is None:
        args.filter_proportion = 0.8 if ("medium-replay" in env_id or "medium-expert" in env_id) else 0.6
    eta, grad_norm = diffql_hyperparameters(env_id)
    if args.eta is None:
        args.eta = eta
    if args.grad_norm is None:
        args.grad_norm = grad_norm
    return args


def check_args(args: Args) -> None:
    """One clear message per invalid hyper-parameter."""
    problems = shared_arg_problems(args)
    if not 0.0 <= args.ema_decay <= 1.0:
        problems.append(f"--ema-decay must be in [0, 1], got {args.ema_decay}")
    if args.eta < 0:
        problems.append(f"--eta must be >= 0, got {args.eta}")
    for name in ("n_timesteps", "update_ema_every", "eval_samples"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if problems:
        raise SystemExit("; ".join(problems))


# ----------------------------------------------------------------------------- the diffusion policy
def vp_beta_schedule(timesteps: int) -> torch.Tensor:
    """Diffusion-QL's 'vp' schedule: beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1) / (2 T^2)), t = 1..T."""
    t = np.arange(1, timesteps + 1)
    b_max, b_min = 10.0, 0.1
    alpha = np.exp(-b_min / timesteps - 0.5 * (b_max - b_min) * (2 * t - 1) / timesteps**2)
    return torch.tensor(1.0 - alpha, dtype=torch.float32)


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        emb = t.float()[:, None] * freqs[None, :]
        return torch.cat([emb.sin(), emb.cos()], dim=-1)


class NoiseMLP(nn.Module):
    """eps_theta(a_t, t, s): 3 x 256 Mish over concat(s, a_t, time embedding (16 -> 32 -> 16))."""

    def __init__(self, obs_dim, action_dim, t_dim=16):
        super().__init__()
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(t_dim), nn.Linear(t_dim, 2 * t_dim), nn.Mish(), nn.Linear(2 * t_dim, t_dim)
        )
        self.net = nn.Sequential(
            nn.Linear(obs_dim + action_dim + t_dim, 256),
            nn.Mish(),
            nn.Linear(256, 256),
            nn.Mish(),
            nn.Linear(256, 256),
            nn.Mish(),
            nn.Linear(256, action_dim),
        )

    def forward(self, x, t, obs):
        return self.net(torch.cat([obs, x, self.time_mlp(t)], dim=-1))


class DiffusionPolicy(nn.Module):
    """DDPM over actions given the state, noise prediction, denoised estimates clipped to the action box."""

    def __init__(self, model, action_dim, max_action, n_timesteps=5):
        super().__init__()
        self.model, self.action_dim, self.max_action, self.n_timesteps = model, action_dim, max_action, n_timesteps
        betas = vp_beta_schedule(n_timesteps)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        for name, value in (
            ("betas", betas),
            ("alphas_cumprod", ac),
            ("sqrt_alphas_cumprod", ac.sqrt()),
            ("sqrt_one_minus_alphas_cumprod", (1.0 - ac).sqrt()),
            ("sqrt_recip_alphas_cumprod", (1.0 / ac).sqrt()),
            ("sqrt_recipm1_alphas_cumprod", (1.0 / ac - 1.0).sqrt()),
            ("posterior_log_variance", post_var.clamp_min(1e-20).log()),
            ("posterior_mean_coef1", betas * ac_prev.sqrt() / (1.0 - ac)),
            ("posterior_mean_coef2", (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)),
        ):
            self.register_buffer(name, value)

    def sample(self, obs, generator=None):
        """One action per state by the reverse process, in [-max_action, max_action]."""
        B = len(obs)
        x = torch.randn(B, self.action_dim, device=obs.device, generator=generator)
        for i in reversed(range(self.n_timesteps)):
            t = torch.full((B,), i, device=obs.device, dtype=torch.long)
            eps = self.model(x, t, obs)
            x_recon = self.sqrt_recip_alphas_cumprod[i] * x - self.sqrt_recipm1_alphas_cumprod[i] * eps
            x_recon = x_recon.clamp(-self.max_action, self.max_action)
            x = self.posterior_mean_coef1[i] * x_recon + self.posterior_mean_coef2[i] * x
            if i > 0:
                noise = torch.randn(x.shape, device=obs.device, generator=generator)
                x = x + (0.5 * self.posterior_log_variance[i]).exp() * noise
        return x.clamp(-self.max_action, self.max_action)

    forward = sample

    def bc_loss(self, obs, actions, generator=None):
        """Denoising loss: MSE between the true and the predicted noise at a uniform random step."""
        t = torch.randint(self.n_timesteps, (len(obs),), device=obs.device, generator=generator)
        noise = torch.randn(actions.shape, device=obs.device, generator=generator)
        x_t = self.sqrt_alphas_cumprod[t, None] * actions + self.sqrt_one_minus_alphas_cumprod[t, None] * noise
        return F.mse_loss(self.model(x_t, t, obs), noise)


class Critic(nn.Module):
    """Twin Q networks, 3 x 256 Mish each."""

    def __init__(self, obs_dim, action_dim):
        super().__init__()

        def q():
            return nn.Sequential(
                nn.Linear(obs_dim + action_dim, 256),
                nn.Mish(),
                nn.Linear(256, 256),
                nn.Mish(),
                nn.Linear(256, 256),
                nn.Mish(),
                nn.Linear(256, 1),
            )

        self.q1, self.q2 = q(), q()

    def forward(self, obs, action):
        x = torch.cat([obs, action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q_min(self, obs, action):
        return torch.min(*self(obs, action))


def pick_by_q(q, generator=None):
    """Diffusion-QL's action selection: an index drawn with probability softmax(q)."""
    return torch.multinomial(F.softmax(q, dim=-1), 1, generator=generator).squeeze(-1)


def select_actions(actor, critic, obs, samples, generator=None):
    """Diffusion-QL's evaluation policy on states [n, obs_dim]: `samples` actions per state, one drawn by pick_by_q
    over min(Q1, Q2) of that state's candidates; [n, A]."""
    n = len(obs)
    o = obs.repeat_interleave(samples, dim=0)  # the `samples` copies of each state side by side
    actions = actor.sample(o, generator=generator)
    idx = pick_by_q(critic.q_min(o, actions).view(n, samples), generator)
    return actions.view(n, samples, -1)[torch.arange(n, device=obs.device), idx]


# ---- DyDiff: the trajectory filter and the real-ratio batch mix (the same text in the three scripts) ----
def filter_trajectories(scores, proportion, method, temperature, generator=None):
    """Indices of the floor(eta * B_r) trajectories kept: top-k (hardmax) or softmax sampling without replacement."""
    k = int(np.floor(proportion * len(scores)))
    if method == "hardmax":
        return torch.topk(scores, k).indices
    z = (scores - scores.mean()) / (scores.std() + 1e-8)
    # Gumbel top-k draws k items without replacement with p proportional to exp(z / T).
    u = torch.rand(scores.shape, generator=generator, device=generator.device if generator is not None else scores.device)
    gumbel = -torch.log(-torch.log(u.to(scores.device).clamp_min(1e-20)))
    return torch.topk(z / temperature + gumbel, k).indices


def alive_mask(dones):
    """[B, L-1] mask of the transitions before and at each trajectory's first terminal."""
    ones = torch.ones_like(dones[:, :1])
    return torch.cat([ones, 1.0 - dones[:, :-1]], dim=1).cumprod(dim=1)


def mixed_batch(real, synthetic, batch_size, real_ratio, generator):
    """A batch of round(real_ratio * B) real transitions and the rest synthetic (all real while D_syn is empty)."""
    n_syn = 0 if synthetic.empty else batch_size - int(round(real_ratio * batch_size))
    n_real = batch_size - n_syn
    dev = real["obs"].device
    ri = torch.randint(len(real["obs"]), (n_real,), device=dev, generator=generator)
    batch = {k: v[ri] for k, v in real.items()}
    if n_syn:
        # uniform below the buffer's count, which stays on the device
        u = torch.rand(n_syn, device=dev, generator=generator)
        si = (u * synthetic.count).long().clamp(max=synthetic.count - 1)
        syn = dict(
            obs=synthetic.obs[si],
            actions=synthetic.actions[si],
            rewards=synthetic.rewards[si],
            next_obs=synthetic.next_obs[si],
            dones=synthetic.dones[si],
        )
        batch = {k: torch.cat([batch[k], syn[k]]) for k in batch}
    return batch, n_syn


# ---- end of the DyDiff pieces ----


def make_update_fn(nets, optimizers, schedulers, args, obs_mean, obs_std, generator):
    """Diffusion-QL's gradient step as one function of a raw batch: update(batch, global_step) -> the losses to log."""
    actor, ema_actor, critic, critic_target = nets
    actor_optimizer, critic_optimizer = optimizers

    def update(batch, global_step):
        obs, next_obs = (batch["obs"] - obs_mean) / obs_std, (batch["next_obs"] - obs_mean) / obs_std
        with torch.no_grad():  # targets from the EMA actor and the target critics
            if args.max_q_backup:
                next_rpt = next_obs.repeat_interleave(10, dim=0)
                tq1, tq2 = critic_target(next_rpt, ema_actor.sample(next_rpt))
                target_q = torch.min(tq1.view(-1, 10).amax(1), tq2.view(-1, 10).amax(1))
            else:
                target_q = critic_target.q_min(next_obs, ema_actor.sample(next_obs))
            target_q = batch["rewards"] + (1.0 - batch["dones"]) * args.gamma * target_q
        current_q1, current_q2 = critic(obs, batch["actions"])
        critic_loss = F.mse_loss(current_q1, target_q) + F.mse_loss(current_q2, target_q)
        critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        if args.grad_norm > 0:
            nn.utils.clip_grad_norm_(critic.parameters(), max_norm=args.grad_norm)
        critic_optimizer.step()

        bc_loss = actor.bc_loss(obs, batch["actions"])
        new_q1, new_q2 = critic(obs, actor.sample(obs))
        # Q1 or Q2 at random, as the authors; the coin stays on the device (no host sync per step)
        coin = torch.rand((), device=obs.device, generator=generator) > 0.5
        ql_loss = torch.where(
            coin, -new_q1.mean() / new_q2.abs().mean().detach(), -new_q2.mean() / new_q1.abs().mean().detach()
        )
        actor_loss = bc_loss + args.eta * ql_loss
        actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        if args.grad_norm > 0:
            nn.utils.clip_grad_norm_(actor.parameters(), max_norm=args.grad_norm)
        actor_optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        with torch.no_grad():
            if global_step % args.update_ema_every == 0 and global_step >= args.step_start_ema:
                for p, ep in zip(actor.parameters(), ema_actor.parameters()):
                    ep.lerp_(p, 1.0 - args.ema_decay)
            for p, tp in zip(critic.parameters(), critic_target.parameters()):
                tp.lerp_(p, args.tau)
        return dict(
            bc_loss=bc_loss.detach(),
            ql_loss=ql_loss.detach(),
            actor_loss=actor_loss.detach(),
            critic_loss=critic_loss.detach(),
            qf1_values=current_q1.mean().detach(),
        )

    return update


if __name__ == "__main__":
    args = parse_args(Args)
    args = defaults_for(args, dataset_name(args.env_id))  # a D4RL file: by its dataset's name
    check_args(args)
    if args.offline:
        os.environ[OFFLINE_ENV_VAR] = "1"

    # Seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    gen = torch.Generator(device=device).manual_seed(args.seed)

    # Data: the whole real dataset on the device
    try:
        data = load_dataset(args.env_id, dataset_steps=args.dataset_steps)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e))
    S, A, obs_dim = data.state_dim, data.action_dim, data.obs_dim
    eval_envs = data.make_eval_envs(args.eval_episodes, args.eval_max_steps)
    args.eval_max_steps = eval_envs.envs[0].spec.max_episode_steps  # recorded: the episode length of the scores
    max_action = float(eval_envs.single_action_space.high[0])
    obs_mean, obs_std = data.observation_stats(args.normalize_states, device)
    real = data.tensors(device)

    # Pretrained models: DM, dynamics ensemble, reward model (made first if missing)
    if args.dydiff:
        check_env = data.make_eval_env() if data.task == "pointmaze" else None  # checks the synthetic data
        if check_env is None and (args.rollout_states != "dm" or args.rollout_rewards != "model"):
            raise SystemExit(
                f"--rollout-states/--rollout-rewards simulator need the PointMaze simulator; {args.env_id} is not PointMaze"
            )
        simulator = BatchedSimulator(check_env) if args.rollout_states != "dm" else None  # the ablations' real dynamics
        if device.type == "cpu" and (cost := cpu_cost_line(args, S, A, os.path.basename(__file__))):
            print(cost)  # before any pretraining: a paper-size run on a CPU takes days
        # the models this run's rollouts use (None for those an ablation replaces)
        denoiser, dm_normalizer, dynamics, reward_model = load_or_pretrain_models(args, data, device)
        if args.compile_dm and denoiser is not None:
            denoiser = torch.compile(denoiser)
        is_terminal = termination_fn(data.task)
        dm_bf16 = args.dm_bf16 and device.type == "cuda"  # bf16 convolutions are slow on most CPUs

    # SynthER (the paper's baseline): transitions generated once, before training, by a diffusion model of the
    # dataset's transitions (pretrained first if missing); cached beside it, so every seed reads the same ones
    if args.augment == "synther":
        load_or_pretrain_models(args, data, device)
        syn, syn_info = synther_transitions(args, data, device)
        if args.filter != "none":  # SynthER-f (paper Table 6): DyDiff's filter on each transition's generated reward
            keep = filter_trajectories(syn["rewards"], args.filter_proportion, args.filter, args.filter_temperature, gen)
            syn = {k: v[keep] for k, v in syn.items()}

    # Networks
    actor = DiffusionPolicy(NoiseMLP(obs_dim, A), A, max_action, args.n_timesteps).to(device)
    ema_actor = copy.deepcopy(actor).requires_grad_(False)
    critic = Critic(obs_dim, A).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate)

    def cosine(step):  # the factor of the learning rate; reads args.total_steps, so a resume's larger budget applies
        return 0.5 * (1 + math.cos(math.pi * step / args.total_steps))

    schedulers = (
        [torch.optim.lr_scheduler.LambdaLR(o, cosine) for o in (actor_optimizer, critic_optimizer)] if args.lr_decay else []
    )
    # D_syn: DyDiff's FIFO buffer of rollouts, or all of SynthER's transitions from the start
    synther = args.augment == "synther"
    synthetic = SyntheticBuffer(len(syn["obs"]) if synther else args.synthetic_buffer_size, obs_dim, A, device)
    if synther:
        synthetic.add(**syn)

    def norm(obs):
        return (obs - obs_mean) / obs_std

    def policy(obs):
        """The learning policy on raw observations: one reverse-process sample per state (rollouts, relabelling)."""
        return actor.sample(norm(obs), generator=gen)

    def act(obs):
        """Evaluation on states [n, obs_dim]: `eval_samples` actions per state, one drawn by softmax over min(Q1, Q2)
        of the target critics."""
        return select_actions(actor, critic_target, norm(obs), args.eval_samples)

    update = make_update_fn(
        (actor, ema_actor, critic, critic_target),
        (actor_optimizer, critic_optimizer),
        schedulers,
        args,
        obs_mean,
        obs_std,
        gen,
    )

    # The run folder: a new one, or the killed run of --resume with everything its checkpoint holds
    state = dict(
        actor=actor,
        ema_actor=ema_actor,
        critic=critic,
        critic_target=critic_target,
        actor_optimizer=actor_optimizer,
        critic_optimizer=critic_optimizer,
        schedulers=schedulers,
    )
    if not synther:  # SynthER's transitions are read again from their cache, not written into every checkpoint
        state["synthetic"] = synthetic
    run = Run(args, state, gen, data.describe())
    if synther:  # how true they are, against the real simulator (measured, not used)
        run.log_synther(data, syn, syn_info)

    # Training loop
    for global_step in run.steps(on_cpu=device.type == "cpu"):
        # ---- DyDiff rollout step (paper Algorithm 1; the same text in the three scripts) ----
        if args.dydiff and global_step % args.rollout_freq == 0:
            t0 = time.time()
            B_r, L = args.rollout_batch_size, args.rollout_length
            with torch.no_grad():
                # a. start states from the real dataset; the context (goal) rides along unchanged
                idx = torch.randint(data.size, (B_r,), device=device, generator=gen)
                s0, context = real["obs"][idx, :S], real["obs"][idx, S:]
                if args.rollout_states == "simulator":  # ablation: the policy in the real simulator, no models
                    states, actions = simulator.rollout(policy, s0, L, context=context)
                else:
                    # b. autoregressive rollout of the learning policy in the dynamics ensemble
                    states, actions = dynamics.rollout(policy, s0, L, context=context, generator=gen)
                # c. M rounds: DM states given (s_0, actions), then relabel every action with the policy
                for _ in range(args.num_iterations if args.rollout_states != "simulator" else 0):
                    conditioning = actions
                    if args.rollout_states == "simulator-replay":  # ablation: what a perfect DM would return
                        new_states = simulator.replay(s0, actions)
                    else:
                        new_states = refine_states(
                            denoiser, dm_normalizer, s0, actions, args.sampler_steps, args.sampler_churn, gen, bf16=dm_bf16
                        )
                    states = 0.5 * (states + new_states) if args.average_with_previous else new_states
                    obs = torch.cat([states, context[:, None].expand(B_r, L, -1)], dim=-1)
                    actions = policy(obs.reshape(B_r * L, obs_dim)).reshape(B_r, L, A)
                if args.stored_actions == "conditioning":  # ablation: the actions the final states came from
                    actions = conditioning
                obs = torch.cat([states, context[:, None].expand(B_r, L, -1)], dim=-1)
                # d. rewards from r_psi (ablation: the task's true rewards); a trajectory ends at its first terminal
                if args.rollout_rewards == "simulator":
                    rewards = true_rewards(data, states, context)
                else:
                    flat = obs[:, :-1].reshape(-1, obs_dim), actions[:, :-1].reshape(-1, A)
                    rewards = reward_model(*flat).reshape(B_r, L - 1)
                dones = is_terminal(states[:, 1:]).float()
                alive = alive_mask(dones)
                scores = (rewards * alive).sum(dim=1)
                # e. filter by predicted return
                keep = filter_trajectories(scores, args.filter_proportion, args.filter, args.filter_temperature, gen)
                # f. push every transition of the kept trajectories (up to the first terminal) into D_syn
                #    (a mask, not boolean indexing: nothing here waits on the device)
                synthetic.add(
                    obs[keep, :-1].flatten(0, 1),
                    actions[keep, :-1].flatten(0, 1),
                    rewards[keep].flatten(),
                    obs[keep, 1:].flatten(0, 1),
                    dones[keep].flatten(),
                    valid=alive[keep].flatten().bool(),
                )
            # what the synthetic data carry, and on PointMaze the real simulator's say (measured, not used)
            rollout = (states, actions, rewards, scores, dones, keep, context)
            run.log_rollout(global_step, t0, rollout, data, check_env, synthetic, args.check_trajectories, args.eval_freq)
        # ---- end of the DyDiff rollout step ----

        # Diffusion-QL update
        batch, n_syn = mixed_batch(real, synthetic, args.batch_size, args.real_ratio, gen)
        losses = update(batch, global_step)

        # Logging, evaluation and checkpoint
        step = global_step + 1
        if step % 1000 == 0 or step == args.total_steps:
            if not torch.isfinite(losses["critic_loss"]):
                raise SystemExit(f"NaN/inf in the critic loss at step {step}; lower --learning-rate or check the data")
            metrics = {f"losses/{k}": v.item() for k, v in losses.items()}
            metrics["charts/learning_rate"] = actor_optimizer.param_groups[0]["lr"]
            run.log(dict(metrics, **{"charts/synthetic_in_batch": n_syn / args.batch_size, "charts/SPS": run.sps(step)}), step)
        if step % args.eval_freq == 0 or step == args.total_steps:
            actor.eval()
            with torch.no_grad():
                returns_eval, scores_eval = evaluate(
                    numpy_policy(act, device), eval_envs, args.seed * 10_000 + step, data.ref_min_score, data.ref_max_score
                )
            actor.train()
            run.evaluated(scores_eval, step, data.d4rl_normalized_score(returns_eval))  # logs, prints, checkpoints

    run.finish(
        dict(
            actor=actor.state_dict(), critic_target=critic_target.state_dict(), obs_mean=obs_mean.cpu(), obs_std=obs_std.cpu()
        )
    )
