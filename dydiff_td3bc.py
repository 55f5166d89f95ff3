# Docs: docs/scripts.md, section "dydiff_td3bc.py"
"""TD3+BC (Fujimoto & Gu, 2021) with DyDiff data augmentation (arXiv 2405.19189, Algorithm 1), offline.

Every `rollout_freq` gradient steps the learning policy rolls out synthetic trajectories: a dynamics
ensemble gives the first draft, the diffusion model (DM) re-samples the states given s_0 and the
actions M times while the policy relabels the actions, a reward model scores them, the best are
kept and pushed into a FIFO synthetic buffer that is mixed into each batch at the real ratio.
`--no-dydiff` (`--augment none`) is the plain TD3+BC; `--num-iterations 0` uses single-step-model rollouts only;
`--augment synther` is the paper's baseline, SynthER: TD3+BC on transitions generated once, before training, by a
diffusion model of the dataset's transitions.
"""

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
from common.cudagraphs import cuda_graphed
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

    # TD3+BC (Fujimoto & Gu 2021)
    total_steps: int = 1_000_000
    """gradient steps"""
    batch_size: int = 256
    """B: transitions per gradient step"""
    learning_rate: float = 3e-4
    """learning rate of the actor and the critics"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network update rate"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise (times the action scale)"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise"""
    policy_frequency: int = 2
    """delayed policy updates: one actor update per this many critic updates"""
    alpha: float = 2.5
    """TD3+BC's alpha: lambda = alpha / mean|Q|"""
    normalize_states: bool = True
    """z-score observations with the real dataset's statistics"""
    cudagraphs: bool = False
    """replay the TD3+BC update as CUDA graphs (GPU only; removes the kernel-launch overhead of small networks)"""
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
    """Fill the per-dataset defaults of paper Table 4."""
    if args.num_iterations is None and args.augment != "synther":  # SynthER makes no rollouts
        args.num_iterations = 1 if "maze" in env_id else 2
    if args.filter_proportion is None:
        args.filter_proportion = 0.8 if ("medium-replay" in env_id or "medium-expert" in env_id) else 0.6
    return args


def check_args(args: Args) -> None:
    """One clear message per invalid hyper-parameter."""
    problems = shared_arg_problems(args)
    if args.policy_frequency < 1:
        problems.append(f"--policy-frequency must be >= 1, got {args.policy_frequency}")
    if problems:
        raise SystemExit("; ".join(problems))


class Actor(nn.Module):
    def __init__(self, obs_dim, action_dim, max_action):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, action_dim), nn.Tanh()
        )
        self.max_action = max_action

    def forward(self, obs):
        return self.max_action * self.net(obs)


class Critic(nn.Module):
    def __init__(self, obs_dim, action_dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim + action_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)
        )

    def forward(self, obs, action):
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


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


def make_update_fns(
    actor, qf1, qf2, actor_target, qf1_target, qf2_target, q_optimizer, actor_optimizer, args, max_action, obs_mean, obs_std
):
    """TD3+BC's gradient step as two functions of a raw batch: update_critic(batch) and update_actor(batch)."""
    targets = [p for net in (actor_target, qf1_target, qf2_target) for p in net.parameters()]
    onlines = [p for net in (actor, qf1, qf2) for p in net.parameters()]

    def update_critic(batch):
        """One TD step of both critics towards min(Q1', Q2') at a smoothed target action; returns the two losses."""
        obs, next_obs = (batch["obs"] - obs_mean) / obs_std, (batch["next_obs"] - obs_mean) / obs_std
        with torch.no_grad():
            noise = (torch.randn_like(batch["actions"]) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            next_actions = (actor_target(next_obs) + noise * max_action).clamp(-max_action, max_action)
            target_q = torch.min(qf1_target(next_obs, next_actions), qf2_target(next_obs, next_actions))
            target_q = batch["rewards"] + (1.0 - batch["dones"]) * args.gamma * target_q
        qf1_loss = F.mse_loss(qf1(obs, batch["actions"]), target_q)
        qf2_loss = F.mse_loss(qf2(obs, batch["actions"]), target_q)
        q_optimizer.zero_grad(set_to_none=True)
        (qf1_loss + qf2_loss).backward()
        q_optimizer.step()
        return qf1_loss.detach(), qf2_loss.detach()

    def update_actor(batch):
        """The delayed actor step, -lambda Q(s, pi(s)) + (pi(s) - a)^2, then Polyak targets; returns (loss, mean Q)."""
        obs = (batch["obs"] - obs_mean) / obs_std
        pi = actor(obs)
        q = qf1(obs, pi)
        lmbda = args.alpha / q.abs().mean().detach()
        actor_loss = -lmbda * q.mean() + F.mse_loss(pi, batch["actions"])
        actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(targets, onlines, args.tau)  # every target parameter in one call
        return actor_loss.detach(), q.mean().detach()

    return update_critic, update_actor


def critic_on_real_and_synthetic(qf, batch, n_syn, obs_mean, obs_std) -> dict:
    """The critic's mean Q(s, a) on the batch's real and synthetic transitions (mixed_batch puts the real ones first)."""
    with torch.no_grad():
        q = qf((batch["obs"] - obs_mean) / obs_std, batch["actions"])
    n_real = len(q) - n_syn
    out = {"losses/q_real": q[:n_real].mean().item()} if n_real else {}  # SynthER's batches hold no real transition
    if n_syn:
        out["losses/q_synthetic"] = q[n_real:].mean().item()
    return out


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
    actor = Actor(obs_dim, A, max_action).to(device)
    qf1, qf2 = Critic(obs_dim, A).to(device), Critic(obs_dim, A).to(device)
    actor_target, qf1_target, qf2_target = (
        Actor(obs_dim, A, max_action).to(device),
        Critic(obs_dim, A).to(device),
        Critic(obs_dim, A).to(device),
    )
    actor_target.load_state_dict(actor.state_dict())
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    graphs = args.cudagraphs and device.type == "cuda"
    if args.cudagraphs and not graphs:
        print("--cudagraphs needs a GPU: the update runs eagerly")
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.learning_rate, capturable=graphs)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, capturable=graphs)
    # D_syn: DyDiff's FIFO buffer of rollouts, or all of SynthER's transitions from the start
    synther = args.augment == "synther"
    synthetic = SyntheticBuffer(len(syn["obs"]) if synther else args.synthetic_buffer_size, obs_dim, A, device)
    if synther:
        synthetic.add(**syn)

    def policy(obs):
        """The learning policy on raw observations (what the rollout and the evaluation call)."""
        return actor((obs - obs_mean) / obs_std)

    nets, optimizers = (actor, qf1, qf2, actor_target, qf1_target, qf2_target), (q_optimizer, actor_optimizer)
    update_critic, update_actor = make_update_fns(*nets, *optimizers, args, max_action, obs_mean, obs_std)
    if graphs:  # the update is ~40 small kernels: replaying them as one graph removes the launch overhead
        update_critic = cuda_graphed(update_critic, nets, optimizers)
        update_actor = cuda_graphed(update_actor, nets, optimizers)

    # The run folder: a new one, or the killed run of --resume with everything its checkpoint holds
    names = ("actor", "qf1", "qf2", "actor_target", "qf1_target", "qf2_target", "q_optimizer", "actor_optimizer")
    state = dict(zip(names, nets + optimizers))
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

        # TD3+BC update
        batch, n_syn = mixed_batch(real, synthetic, args.batch_size, args.real_ratio, gen)
        qf1_loss, qf2_loss = update_critic(batch)
        if global_step % args.policy_frequency == 0:
            actor_loss, q_mean = update_actor(batch)

        # Logging, evaluation and checkpoint
        step = global_step + 1
        if step % 1000 == 0 or step == args.total_steps:
            if not torch.isfinite(qf1_loss + qf2_loss):
                raise SystemExit(f"NaN/inf in the critic loss at step {step}; lower --learning-rate or check the data")
            run.log(
                {
                    "losses/qf1_loss": qf1_loss.item(),
                    "losses/qf2_loss": qf2_loss.item(),
                    "losses/actor_loss": actor_loss.item(),
                    "losses/qf1_values": q_mean.item(),
                    "charts/synthetic_in_batch": n_syn / args.batch_size,
                    "charts/SPS": run.sps(step),
                    **critic_on_real_and_synthetic(qf1, batch, n_syn, obs_mean, obs_std),
                },
                step,
            )
        if step % args.eval_freq == 0 or step == args.total_steps:
            actor.eval()
            with torch.no_grad():
                returns_eval, scores_eval = evaluate(
                    numpy_policy(policy, device), eval_envs, args.seed * 10_000 + step, data.ref_min_score, data.ref_max_score
                )
            actor.train()
            run.evaluated(scores_eval, step, data.d4rl_normalized_score(returns_eval))  # logs, prints, checkpoints

    run.finish(dict(actor=actor.state_dict(), obs_mean=obs_mean.cpu(), obs_std=obs_std.cpu()))
