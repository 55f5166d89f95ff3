# Docs: docs/scripts.md, section "dydiff_cql.py"
"""CQL (Kumar et al., 2020; SAC-based, as CORL's cql.py) with DyDiff data augmentation (arXiv 2405.19189,
Algorithm 1), offline.

Every `rollout_freq` gradient steps the learning policy rolls out synthetic trajectories: a dynamics
ensemble gives the first draft, the diffusion model (DM) re-samples the states given s_0 and the
actions M times while the policy relabels the actions with samples a_t ~ pi(.|s_t), a reward model
scores them, the best are kept and pushed into a FIFO synthetic buffer that is mixed into each batch
at the real ratio. `--no-dydiff` is the plain CQL; `--num-iterations 0` uses single-step-model rollouts only;
`--augment synther` is the paper's baseline, SynthER: CQL on transitions generated once, before training, by a
diffusion model of the dataset's transitions.
"""

import math
import os
import random
import sys
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

    # CQL (Kumar et al. 2020), SAC-based; defaults from CORL's configs/offline/cql/*
    total_steps: int = 1_000_000
    """gradient steps"""
    batch_size: int = 256
    """B: transitions per gradient step"""
    policy_lr: float = 3e-5
    """learning rate of the policy and of the entropy temperature alpha (CORL: 3e-5, maze2d and MuJoCo)"""
    qf_lr: float = 3e-4
    """learning rate of the critics and of the Lagrange multiplier alpha'"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network update rate"""
    cql_n_actions: int = 10
    """actions sampled per state (uniform, pi(.|s), pi(.|s')) for the conservative term"""
    cql_temperature: float = 1.0
    """temperature of the conservative term's logsumexp"""
    cql_alpha: float = 10.0
    """weight of the conservative term (fixed), or the scale of the Lagrange multiplier alpha'"""
    cql_lagrange: Optional[bool] = None
    """--cql-lagrange/--no-cql-lagrange: tune alpha' to hold the gap at the target; default True maze2d, False MuJoCo"""
    cql_target_action_gap: float = 5.0
    """target of (logsumexp Q - Q on dataset actions) in the Lagrange variant"""
    bc_steps: int = 0
    """first steps of the policy trained by behaviour cloning (log-likelihood) instead of Q"""
    normalize_states: bool = True
    """z-score observations with the real dataset's statistics"""
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
    rollout_freq: int = 500
    """gradient steps between two rollout steps"""
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


def defaults_for(args: Args, env_id: str) -> Args:
    """Fill the per-dataset defaults of paper Table 4 and of CORL's CQL configs."""
    if args.num_iterations is None and args.augment != "synther":  # SynthER makes no rollouts
        args.num_iterations = 1 if "maze" in env_id else 2
    if args.filter_proportion is None:
        args.filter_proportion = 0.8 if ("medium-replay" in env_id or "medium-expert" in env_id) else 0.6
    if args.cql_lagrange is None:  # CORL: maze2d configs use the Lagrange variant, MuJoCo a fixed weight
        args.cql_lagrange = "maze" in env_id
    return args


def check_args(args: Args) -> None:
    """One clear message per invalid hyper-parameter."""
    problems = shared_arg_problems(args)
    if args.bc_steps < 0:
        problems.append(f"--bc-steps must be >= 0, got {args.bc_steps}")
    for name in ("cql_temperature", "policy_lr", "qf_lr"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("cql_n_actions",):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if problems:
        raise SystemExit("; ".join(problems))


def flag_pair(argv, name="--cql-lagrange"):
    """Accept `--cql-lagrange` / `--no-cql-lagrange` for the Optional[bool] flag (None = per-dataset default)."""
    out, no = [], "--no-" + name[2:]
    for i, a in enumerate(argv):
        if a == no:
            out += [name, "False"]
        elif a == name and (i + 1 == len(argv) or argv[i + 1] not in ("None", "True", "False")):
            out += [name, "True"]
        else:
            out.append(a)
    return out


def mlp(in_dim, out_dim, hidden=256, layers=3):
    dims = [in_dim] + [hidden] * layers
    mods = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(dims[-1], out_dim))


class TanhGaussianPolicy(nn.Module):
    """a = max_action * tanh(u), u ~ N(mean(s), std(s)); log-prob with the tanh (and scale) change of variables."""

    def __init__(self, obs_dim, action_dim, max_action, log_std_min=-20.0, log_std_max=2.0):
        super().__init__()
        self.net = mlp(obs_dim, 2 * action_dim)
        self.max_action, self.log_std_min, self.log_std_max = max_action, log_std_min, log_std_max

    def _params(self, obs):
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def _log_prob(self, u, mean, log_std):
        gauss = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), numerically stable
        log_det = (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1) + u.shape[-1] * math.log(self.max_action)
        return gauss - log_det

    def forward(self, obs, deterministic=False):
        """(action, log pi(action|obs)); deterministic gives max_action * tanh(mean)."""
        mean, log_std = self._params(obs)
        u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        return self.max_action * torch.tanh(u), self._log_prob(u, mean, log_std)

    def log_prob(self, obs, actions):
        """log pi(actions|obs) of given actions (behaviour cloning warm-up)."""
        mean, log_std = self._params(obs)
        u = torch.atanh((actions / self.max_action).clamp(-1 + 1e-6, 1 - 1e-6))
        return self._log_prob(u, mean, log_std)


class Critic(nn.Module):
    def __init__(self, obs_dim, action_dim):
        super().__init__()
        self.net = mlp(obs_dim + action_dim, 1)

    def forward(self, obs, action):
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


class Scalar(nn.Module):
    """A learnable scalar (log alpha, log alpha')."""

    def __init__(self, init):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init)))

    def forward(self):
        return self.value


def cql_penalty(q_data, q_rand, q_curr, logp_curr, q_next, logp_next, rand_log_density, temperature=1.0):
    """Per-state conservative term [B]: T * logsumexp over the 3N importance-weighted sampled actions of Q/T, minus Q on
    the dataset action. Samples: uniform (density rand_log_density), pi(.|s) and pi(.|s') (their log pi), all at s."""
    cat = torch.cat([q_rand - rand_log_density, q_next - logp_next, q_curr - logp_curr], dim=1)
    return torch.logsumexp(cat / temperature, dim=1) * temperature - q_data


def alpha_prime_value(log_alpha_prime):
    """alpha' = exp(log alpha') clamped to [0, 1e6] (CORL)."""
    return log_alpha_prime().exp().clamp(0.0, 1e6)


def lagrange_loss(log_alpha_prime, gap1, gap2, cql_alpha, target_action_gap):
    """Dual loss of alpha': minimising it raises alpha' while the gaps are above the target, lowers it below."""
    alpha_prime = alpha_prime_value(log_alpha_prime)
    return -0.5 * alpha_prime * cql_alpha * ((gap1.detach() - target_action_gap) + (gap2.detach() - target_action_gap))


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


def make_update_fn(nets, optimizers, args, max_action, obs_mean, obs_std, action_dim):
    """CQL's gradient step as one function of a raw batch: update(batch, global_step) -> the losses to log."""
    actor, qf1, qf2, qf1_target, qf2_target, log_alpha, log_alpha_prime = nets
    q_optimizer, actor_optimizer, alpha_optimizer, alpha_prime_optimizer = optimizers
    A = action_dim
    target_entropy = -float(A)
    rand_log_density = A * math.log(0.5 / max_action)  # uniform on [-max_action, max_action]^A

    def update(batch, global_step):
        obs, next_obs = (batch["obs"] - obs_mean) / obs_std, (batch["next_obs"] - obs_mean) / obs_std
        B, N = len(obs), args.cql_n_actions

        # policy and entropy temperature (SAC; behaviour cloning during the first bc_steps)
        new_actions, log_pi = actor(obs)
        alpha_loss = -(log_alpha() * (log_pi + target_entropy).detach()).mean()
        alpha = log_alpha().exp().detach()
        if global_step < args.bc_steps:
            policy_loss = (alpha * log_pi - actor.log_prob(obs, batch["actions"])).mean()
        else:
            q_new = torch.min(qf1(obs, new_actions), qf2(obs, new_actions))
            policy_loss = (alpha * log_pi - q_new).mean()

        # critics: TD loss + conservative term
        with torch.no_grad():
            next_actions, _ = actor(next_obs)
            target_q = torch.min(qf1_target(next_obs, next_actions), qf2_target(next_obs, next_actions))
            target_q = batch["rewards"] + (1.0 - batch["dones"]) * args.gamma * target_q
            obs_rep, next_obs_rep = obs.repeat_interleave(N, 0), next_obs.repeat_interleave(N, 0)
            rand_actions = (torch.rand(B * N, A, device=obs.device) * 2.0 - 1.0) * max_action
            curr_actions, logp_curr = actor(obs_rep)
            next_sampled, logp_next = actor(next_obs_rep)
        q1_pred, q2_pred = qf1(obs, batch["actions"]), qf2(obs, batch["actions"])
        qf1_loss, qf2_loss = F.mse_loss(q1_pred, target_q), F.mse_loss(q2_pred, target_q)
        gaps = []
        for qf, q_pred in ((qf1, q1_pred), (qf2, q2_pred)):
            q_rand, q_curr, q_next = (qf(obs_rep, a).view(B, N) for a in (rand_actions, curr_actions, next_sampled))
            gaps.append(
                cql_penalty(
                    q_pred,
                    q_rand,
                    q_curr,
                    logp_curr.view(B, N),
                    q_next,
                    logp_next.view(B, N),
                    rand_log_density,
                    args.cql_temperature,
                ).mean()
            )
        if args.cql_lagrange:
            alpha_prime = alpha_prime_value(log_alpha_prime).detach()
            cql_loss = (
                alpha_prime
                * args.cql_alpha
                * ((gaps[0] - args.cql_target_action_gap) + (gaps[1] - args.cql_target_action_gap))
            )
            alpha_prime_loss = lagrange_loss(log_alpha_prime, gaps[0], gaps[1], args.cql_alpha, args.cql_target_action_gap)
            alpha_prime_optimizer.zero_grad(set_to_none=True)
            alpha_prime_loss.backward()
            alpha_prime_optimizer.step()
        else:
            cql_loss = args.cql_alpha * (gaps[0] + gaps[1])
        qf_loss = qf1_loss + qf2_loss + cql_loss

        alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        alpha_optimizer.step()
        actor_optimizer.zero_grad(set_to_none=True)
        policy_loss.backward()
        actor_optimizer.step()
        q_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        q_optimizer.step()
        with torch.no_grad():
            for net, target in ((qf1, qf1_target), (qf2, qf2_target)):
                for p, tp in zip(net.parameters(), target.parameters()):
                    tp.lerp_(p, args.tau)
        return dict(
            qf_loss=qf_loss.detach(),
            qf1_loss=qf1_loss.detach(),
            qf2_loss=qf2_loss.detach(),
            cql_qf1_gap=gaps[0].detach(),
            cql_qf2_gap=gaps[1].detach(),
            cql_loss=cql_loss.detach(),
            policy_loss=policy_loss.detach(),
            log_pi=log_pi.mean().detach(),
            alpha=alpha,
            alpha_loss=alpha_loss.detach(),
            qf1_values=q1_pred.mean().detach(),
            **(dict(alpha_prime=alpha_prime, alpha_prime_loss=alpha_prime_loss.detach()) if args.cql_lagrange else {}),
        )

    return update


if __name__ == "__main__":
    args = parse_args(Args, flag_pair(sys.argv[1:]))
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
    actor = TanhGaussianPolicy(obs_dim, A, max_action).to(device)
    qf1, qf2 = Critic(obs_dim, A).to(device), Critic(obs_dim, A).to(device)
    qf1_target, qf2_target = Critic(obs_dim, A).to(device), Critic(obs_dim, A).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    log_alpha, log_alpha_prime = Scalar(0.0).to(device), Scalar(1.0).to(device)
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.qf_lr)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    alpha_optimizer = torch.optim.Adam(log_alpha.parameters(), lr=args.policy_lr)  # as CORL: the policy's lr
    alpha_prime_optimizer = torch.optim.Adam(log_alpha_prime.parameters(), lr=args.qf_lr)
    # D_syn: DyDiff's FIFO buffer of rollouts, or all of SynthER's transitions from the start
    synther = args.augment == "synther"
    synthetic = SyntheticBuffer(len(syn["obs"]) if synther else args.synthetic_buffer_size, obs_dim, A, device)
    if synther:
        synthetic.add(**syn)

    def policy(obs):
        """The learning policy on raw observations, sampling a ~ pi(.|s) (what the rollout and relabelling call)."""
        return actor((obs - obs_mean) / obs_std)[0]

    def policy_deterministic(obs):
        """max_action * tanh(mean): the action evaluated in the environment."""
        return actor((obs - obs_mean) / obs_std, deterministic=True)[0]

    nets = (actor, qf1, qf2, qf1_target, qf2_target, log_alpha, log_alpha_prime)
    optimizers = (q_optimizer, actor_optimizer, alpha_optimizer, alpha_prime_optimizer)
    update = make_update_fn(nets, optimizers, args, max_action, obs_mean, obs_std, A)

    # The run folder: a new one, or the killed run of --resume with everything its checkpoint holds
    state = dict(
        actor=actor,
        qf1=qf1,
        qf2=qf2,
        qf1_target=qf1_target,
        qf2_target=qf2_target,
        log_alpha=log_alpha,
        log_alpha_prime=log_alpha_prime,
        q_optimizer=q_optimizer,
        actor_optimizer=actor_optimizer,
        alpha_optimizer=alpha_optimizer,
        alpha_prime_optimizer=alpha_prime_optimizer,
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

        # CQL update
        batch, n_syn = mixed_batch(real, synthetic, args.batch_size, args.real_ratio, gen)
        losses = update(batch, global_step)

        # Logging, evaluation and checkpoint
        step = global_step + 1
        if step % 1000 == 0 or step == args.total_steps:
            if not torch.isfinite(losses["qf_loss"]):
                raise SystemExit(f"NaN/inf in the critic loss at step {step}; lower --qf-lr or check the data")
            metrics = {f"losses/{k}": v.item() for k, v in losses.items() if k != "qf_loss"}
            run.log(dict(metrics, **{"charts/synthetic_in_batch": n_syn / args.batch_size, "charts/SPS": run.sps(step)}), step)
        if step % args.eval_freq == 0 or step == args.total_steps:
            actor.eval()
            with torch.no_grad():
                returns_eval, scores_eval = evaluate(
                    numpy_policy(policy_deterministic, device),
                    eval_envs,
                    args.seed * 10_000 + step,
                    data.ref_min_score,
                    data.ref_max_score,
                )
            actor.train()
            run.evaluated(scores_eval, step, data.d4rl_normalized_score(returns_eval))  # logs, prints, checkpoints

    run.finish(dict(actor=actor.state_dict(), obs_mean=obs_mean.cpu(), obs_std=obs_std.cpu()), cql_lagrange=args.cql_lagrange)
