"""SynthER, the paper's baseline (Lu et al. 2023, "Synthetic Experience Replay", arXiv 2303.06614).

A diffusion model of single transitions x = concat(s, a, r, s', terminal) learns the dataset's distribution of
transitions, with no policy in the loop; once trained, it generates many of them (5M by default) before the RL
training starts, and the offline algorithm trains on those. The diffusion is the project's EDM (`common.edm`:
EDMPrecond, edm_loss, edm_sampler); what SynthER adds is its residual-MLP denoiser network, its z-scored inputs
(sigma_data = 1), its training recipe and its sampler settings. Where each setting comes from is written next to it
(the paths are in the SynthER repository, github.com/conglu1997/SynthER) and in docs/scripts.md ("SynthER").

A transition is one row [B, 1, C] to the EDM code (a window of length 1 with no condition), so EDMPrecond's
c_skip/c_out/c_in/c_noise, the loss weighting and the Heun sampler are the very code DyDiff's DM uses; with an
all-False condition mask the sampler's hard replacement changes nothing and it is EDM's plain stochastic sampler.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.edm import EDMPrecond, edm_sampler

SIGMA_DATA = 1.0  # ElucidatedDiffusion.sigma_data (config/resmlp_denoiser.gin): the inputs are z-scored
# The sampler's stochasticity, config/resmlp_denoiser.gin (ElucidatedDiffusion.*); sigma_min, sigma_max and rho are
# EDM's defaults there as in common.edm.edm_sampler. The number of steps (128 there) is a flag of the scripts.
SAMPLER = dict(S_churn=80.0, S_min=0.05, S_max=50.0, S_noise=1.003)
TERMINAL_THRESHOLD = 0.5  # split_diffusion_samples.terminal_threshold: a generated terminal > 0.5 is a terminal
SAMPLE_BATCH = 100_000  # SimpleDiffusionGenerator.sample_batch_size: transitions generated per sampler call
CPU_SAMPLE_BATCH = 10_000  # on a CPU: 1,712 transitions/s against 995 in calls of 100,000 (2 threads, the CPU model)
GENERATION_SEED = 0  # train_diffuser.py's --seed: one set of samples per model, read by every RL seed
CHECK_TRANSITIONS = 10_000  # generated transitions checked against the real simulator (report and training runs)
EMA_EVERY, EMA_AFTER, EMA_POWER = 10, 100, 2 / 3  # ema_pytorch.EMA as SynthER's Trainer makes it (update_every=10)


# ---------------------------------------------------------------------------------------------------------
# Transitions as rows
# ---------------------------------------------------------------------------------------------------------


def transition_rows(observations, actions, rewards, next_observations, terminals) -> np.ndarray:
    """[N, 2 O + A + 2] float32 rows (s, a, r, s', terminal): synther/diffusion/utils.py make_inputs with
    modelled_terminals = True (config/resmlp_denoiser.gin)."""
    return np.concatenate(
        [
            np.asarray(observations, dtype=np.float32),
            np.asarray(actions, dtype=np.float32),
            np.asarray(rewards, dtype=np.float32)[:, None],
            np.asarray(next_observations, dtype=np.float32),
            np.asarray(terminals, dtype=np.float32)[:, None],
        ],
        axis=1,
    )


def split_rows(x: torch.Tensor, obs_dim: int, action_dim: int) -> dict:
    """Rows [N, C] -> obs, actions, rewards, next_obs, dones (a terminal above TERMINAL_THRESHOLD is 1, else 0):
    split_diffusion_samples. The reward is kept as generated (SynthER neither rounds nor clips it)."""
    O, A = obs_dim, action_dim  # noqa: E741
    if x.shape[-1] != 2 * O + A + 2:
        raise ValueError(f"rows of width {x.shape[-1]} are not (s, a, r, s', terminal) with obs {O} and action {A}")
    return dict(
        obs=x[:, :O],
        actions=x[:, O : O + A],
        rewards=x[:, O + A],
        next_obs=x[:, O + A + 1 : 2 * O + A + 1],
        dones=(x[:, -1] > TERMINAL_THRESHOLD).to(x.dtype),
    )


def batch_size_for(n: int) -> int:
    """SynthER's batch size for a dataset of n transitions: Trainer.train_batch_size 1024, or its small_batch_size
    256 when the dataset holds fewer than 800k transitions (elucidated_diffusion.py, Trainer.__init__)."""
    return 256 if n < 800_000 else 1024


# ---------------------------------------------------------------------------------------------------------
# Normalization: z-score, the terminal left as it is
# ---------------------------------------------------------------------------------------------------------


class StandardNormalizer(nn.Module):
    """Per-dimension z-scoring of [..., C] (synther/diffusion/norm.py Normalizer, normalizer_type 'standard'):
    (x - mean) / (std + 1e-5). The last dimension, the terminal, is not normalized (disable_terminal_norm = True):
    mean 0, std 1. The statistics are buffers (saved in state_dict)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).flatten().clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).flatten().clone())

    @classmethod
    def from_data(cls, rows) -> "StandardNormalizer":
        """Fitted to rows [N, C] whose last column is the terminal."""
        x = torch.as_tensor(np.asarray(rows), dtype=torch.float32)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"StandardNormalizer.from_data needs rows [N >= 2, C], got {tuple(x.shape)}")
        mean, std = x.mean(0), x.std(0) + 1e-5
        mean[-1], std[-1] = 0.0, 1.0
        return cls(mean, std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


# ---------------------------------------------------------------------------------------------------------
# Network F: SynthER's residual MLP (synther/diffusion/denoiser_network.py, ResidualMLPDenoiser)
# ---------------------------------------------------------------------------------------------------------


class ResidualMLPDenoiser(nn.Module):
    """F(x, noise): [B, 1, C] (or [B, C]), [B] -> the same shape.

    The noise level (EDM's c_noise) goes through fixed random Fourier features (random_fourier_features = True,
    learned_sinusoidal_dim 16: the level itself, then sin and cos at 8 random frequencies) and a 2-layer SiLU MLP to
    a `dim_t` embedding, which is added to a linear projection of x; then a linear layer to `width`, `depth` residual
    blocks h + W relu(h) (no layer norm: ResidualMLPDenoiser.layer_norm = False), relu, and a linear layer back to C.
    """

    def __init__(self, d_in: int, dim_t: int = 128, width: int = 1024, depth: int = 6, fourier_dim: int = 16):
        super().__init__()
        if fourier_dim % 2:
            raise ValueError(f"fourier_dim must be even, got {fourier_dim}")
        self.d_in = d_in
        self.proj = nn.Linear(d_in, dim_t)
        # Random and fixed (is_random=True): a buffer, so the EMA copies it and no optimizer touches it.
        self.register_buffer("fourier_weights", torch.randn(fourier_dim // 2))
        self.time_mlp = nn.Sequential(nn.Linear(fourier_dim + 1, dim_t), nn.SiLU(), nn.Linear(dim_t, dim_t))
        self.inp = nn.Linear(dim_t, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, d_in)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, self.d_in)
        t = noise.reshape(-1).to(h.dtype).expand(h.shape[0])
        freqs = t[:, None] * self.fourier_weights[None, :].to(h.dtype) * (2 * math.pi)
        emb = self.time_mlp(torch.cat([t[:, None], freqs.sin(), freqs.cos()], dim=-1))
        h = self.inp(self.proj(h) + emb)
        for block in self.blocks:
            h = h + block(F.relu(h))  # x_{l+1} = x_l + W relu(x_l)
        return self.out(F.relu(h)).reshape(shape)


def build_synther(d_in: int, width: int = 1024, depth: int = 6, dim_t: int = 128) -> EDMPrecond:
    """SynthER's denoiser: EDM's preconditioning (common.edm.EDMPrecond, sigma_data 1) around ResidualMLPDenoiser.

    SynthER's config/resmlp_denoiser.gin sets width 2048; its resmlp_w1024_denoiser.gin, which it uses for some
    datasets, 1024. The DyDiff paper reports its SynthER at 6.5M parameters (Appendix E.7): width 1024, depth 6."""
    return EDMPrecond(ResidualMLPDenoiser(d_in, dim_t=dim_t, width=width, depth=depth), sigma_data=SIGMA_DATA)


def ema_decay(step: int, beta: float) -> float | None:
    """The decay of the weights' average after optimizer step `step` (0-based), as ema_pytorch.EMA, which SynthER's
    Trainer updates after every step (beta 0.995, update_every 10, update_after_step 100, inv_gamma 1, power 2/3):
    None when this step makes no update; 0.0 (a copy of the weights) up to step 100; then the warm-up
    1 - (1 + e)^(-2/3) with e = step - 100, capped at beta (0.995 from step ~2,900 on)."""
    if step % EMA_EVERY:
        return None
    if step <= EMA_AFTER:
        return 0.0
    return min(beta, 1.0 - (1.0 + step - EMA_AFTER) ** -EMA_POWER)


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    denoiser,
    normalizer: StandardNormalizer,
    n: int,
    num_steps: int = 128,
    generator: torch.Generator | None = None,
    progress: bool = True,
    batch: int = SAMPLE_BATCH,
) -> torch.Tensor:
    """n transitions as raw rows [n, C] (float32, on the CPU) from the EDM Heun sampler with SynthER's settings, in
    calls of at most `batch` transitions. Samples are not clamped (SynthER clamps only with a min/max normalizer)."""
    from tqdm import tqdm

    C = normalizer.mean.numel()
    device = normalizer.mean.device
    no_condition = torch.zeros(1, C, dtype=torch.bool, device=device)  # nothing is conditioned on
    out = torch.empty(n, C)
    done = 0
    with tqdm(total=n, desc="SynthER samples", unit="transition", disable=not progress, mininterval=2.0) as bar:
        while done < n:
            b = min(batch, n - done)
            x = edm_sampler(
                denoiser,
                torch.zeros(b, 1, C, device=device),
                no_condition,
                num_steps=num_steps,
                generator=generator,
                **SAMPLER,
            )
            out[done : done + b] = normalizer.unnormalize(x[:, 0]).float().cpu()
            done += b
            bar.update(b)
    return out


def file_sha(path) -> str:
    """The first 16 hex digits of a file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def samples_path(folder, n: int, num_steps: int) -> Path:
    """Where the generated transitions of the SynthER model in `folder` are cached: one file per count and steps."""
    return Path(folder) / f"synther_samples_{n}_N{num_steps}.pt"


def load_or_generate(args, data, device) -> tuple[dict, dict]:
    """The run's SynthER transitions: obs, actions, rewards, next_obs, dones as tensors on `device`, and what was done.

    The SynthER model in {models_dir}/{env_id}/synther.pt (checked against `data`: one made for other data stops the
    run with one line) generates `args.synther_samples` transitions with `args.synther_sampler_steps` Heun steps,
    once: they are cached beside the model (synther_samples_<n>_N<steps>.pt, with the model file's SHA-256), so every
    seed, and a resumed run, trains on the same ones, as every SynthER run reads one .npz of samples. Drawn from a
    generator of their own, so no random state of the run changes.
    """
    from common.checkpoints import DamagedFile, atomic_save, load_checkpoint, load_synther, models_folder

    folder = models_folder(args.models_dir, args.env_id)
    n, steps = args.synther_samples, args.synther_sampler_steps
    with torch.random.fork_rng(devices=[]):  # building the network draws its initial weights: not from the run's RNG
        try:
            denoiser, normalizer, ckpt = load_synther(folder, data, device)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(str(e)) from None
    model_sha = file_sha(folder / "synther.pt")
    path = samples_path(folder, n, steps)
    info = dict(path=str(path), count=n, sampler_steps=steps, model_sha=model_sha, params=ckpt.get("params"))
    rows = None
    try:
        cached = load_checkpoint(path)
        if (cached.get("model_sha"), cached.get("count"), cached.get("sampler_steps")) == (model_sha, n, steps):
            rows = cached["rows"]
            print(f"SynthER: {n:,} transitions read from {path}")
            info["generated"] = False
        else:
            print(f"SynthER: {path} was generated by another model or with other settings: generating again")
    except FileNotFoundError:
        pass
    except DamagedFile as e:
        print(f"SynthER: {e}; generating again")
    if rows is None:
        print(f"SynthER: generating {n:,} transitions ({steps} sampler steps) into {path}")
        t0, cpu0 = time.time(), time.process_time()
        gen = torch.Generator(device=device).manual_seed(GENERATION_SEED)
        rows = generate(denoiser, normalizer, n, steps, gen, batch=SAMPLE_BATCH if device.type == "cuda" else CPU_SAMPLE_BATCH)
        info.update(generated=True, generation_s=time.time() - t0, generation_cpu_s=time.process_time() - cpu0)
        atomic_save(dict(info, rows=rows, fingerprint=data.fingerprint), path)
    if not torch.isfinite(rows).all():
        raise SystemExit(f"the SynthER samples in {path} hold NaN or inf; delete them and the model and pretrain again")
    samples = split_rows(rows, data.obs_dim, data.action_dim)
    if getattr(args, "synther_next_states", "model") == "simulator":
        samples = simulator_next_states(data, samples)
        info["next_states"] = "simulator"
    return {k: v.to(device) for k, v in samples.items()}, info


def simulator_next_states(data, samples: dict, chunk: int = 100_000) -> dict:
    """Ablation (`--synther-next-states simulator`): SynthER with perfect dynamics and reward. Each generated (s, a)
    is kept; its s' becomes the real simulator stepped once from it, its reward the task's reward on arriving there,
    its terminal the task's rule (PointMaze never terminates). It reads the simulator, so it is not offline RL: it
    bounds what a SynthER without dynamics or reward errors can give. PointMaze only."""
    from common.pointmaze import BatchedSimulator, goal_reward

    if data.task != "pointmaze":
        raise SystemExit(f"--synther-next-states simulator steps the PointMaze simulator; {data.env_id} is not PointMaze")
    S = data.state_dim
    obs, actions = samples["obs"].double().numpy(), samples["actions"].numpy()
    env = data.make_eval_env()
    simulator = BatchedSimulator(env)
    real = np.concatenate([simulator.step(obs[i : i + chunk, :S], actions[i : i + chunk]) for i in range(0, len(obs), chunk)])
    env.close()
    goal = data.goal if data.goal is not None else obs[:, S : S + 2]  # the fixed goal, or each transition's own
    next_obs = np.concatenate([real, obs[:, S:]], axis=1)  # the goal part of the observation is unchanged
    out = dict(samples)
    out["next_obs"] = torch.as_tensor(next_obs, dtype=samples["next_obs"].dtype)
    out["rewards"] = torch.as_tensor(goal_reward(real[:, :2], goal, data.dense_reward), dtype=samples["rewards"].dtype)
    out["dones"] = torch.zeros_like(samples["dones"])
    return out


# ---------------------------------------------------------------------------------------------------------
# Checks of generated transitions against the real simulator
# ---------------------------------------------------------------------------------------------------------


def transition_checks(data, env, samples: dict, n: int = CHECK_TRANSITIONS, seed: int = 0, prefix: str = "synther/") -> dict:
    """How true `n` of the generated transitions (drawn at random) are, against the real simulator and the task's
    reward; `samples`: obs, actions, rewards, next_obs, dones (tensors or arrays). `env`: the dataset's evaluation env.

    - one_step_error (mean, median, 90th percentile): ||s' - step(s, a)||^2 over the physical state, the simulator
      stepped once from the generated (s, a); one_step_error_copy: the same of s' = s (the no-motion baseline);
    - PointMaze: wall_crossing_share, the share of transitions with s or s', or the segment between them, in a wall
      cell or outside the maze (wall_crossing_share_dataset: the same of as many dataset transitions);
      reward_abs_error, |r - the reward the env pays on arriving at s'| against the task's goal (the fixed goal, or
      the goal in s), reward_agreement (sparse reward: r > 0.5 exactly when s' is within the goal radius) and the
      share of generated s' at the goal by the env's rule against the dataset's share of rewarded transitions;
    - every task: the mean generated reward and terminal share against the dataset's.
    """
    from common.envs import step_from

    rng = np.random.default_rng(seed)
    arrays = {k: (v.float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in samples.items()}
    total = len(arrays["obs"])
    pick = rng.permutation(total)[: min(n, total)]
    S = data.state_dim
    s, a, r = arrays["obs"][pick, :S], arrays["actions"][pick], arrays["rewards"][pick]
    s_next = arrays["next_obs"][pick, :S]
    out = {
        prefix + "checked_transitions": len(pick),
        prefix + "reward_mean": float(arrays["rewards"].mean()),
        prefix + "reward_mean_dataset": float(data.rewards.mean()),
        prefix + "terminal_share": float(arrays["dones"].mean()),
        prefix + "terminal_share_dataset": float(data.terminals.mean()),
    }
    if data.task == "pointmaze":
        from common.pointmaze import GOAL_RADIUS, BatchedSimulator, crosses_wall, goal_reward

        real = BatchedSimulator(env).step(s, a)
        maze = env.unwrapped.maze
        out[prefix + "wall_crossing_share"] = float(crosses_wall(maze, np.stack([s[:, :2], s_next[:, :2]], 1)).mean())
        rows = rng.permutation(data.size)[: len(pick)]
        segments = np.stack([data.observations[rows, :2], data.next_observations[rows, :2]], 1)
        out[prefix + "wall_crossing_share_dataset"] = float(crosses_wall(maze, segments).mean())

        def goal_of(obs):  # the fixed goal, or each transition's own (the goal in its observation)
            return data.goal if data.goal is not None else obs[:, S : S + 2]

        paid = goal_reward(s_next[:, :2].astype(np.float64), goal_of(arrays["obs"][pick]), data.dense_reward)
        out[prefix + "reward_abs_error"] = float(np.abs(r - paid).mean())
        if not data.dense_reward:
            out[prefix + "reward_agreement"] = float(((r > 0.5) == (paid > 0.5)).mean())

        def at_goal(next_obs, obs):
            return np.linalg.norm(next_obs[:, :2] - goal_of(obs), axis=-1) <= GOAL_RADIUS

        out[prefix + "goal_share"] = float(at_goal(s_next, arrays["obs"][pick]).mean())
        out[prefix + "goal_share_dataset"] = float(at_goal(data.next_observations[rows], data.observations[rows]).mean())
    else:
        real = step_from(env, data.task, s, a)
    err = ((s_next - real) ** 2).sum(-1)
    out[prefix + "one_step_error"] = float(err.mean())
    out[prefix + "one_step_error_median"] = float(np.median(err))
    out[prefix + "one_step_error_p90"] = float(np.quantile(err, 0.9))
    out[prefix + "one_step_error_copy"] = float(((s - real) ** 2).sum(-1).mean())
    return out


# ---------------------------------------------------------------------------------------------------------
# Generating ahead of the runs
# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """Generate a SynthER model's transitions into its cache before the training runs, with every thread this process
    gets (a training run generates them with the one thread it is given). The runs then read them:
    python -m common.synther maze2d-large --models-dir models-cpu --synther-samples 5000000 --synther-sampler-steps 32
    """
    import argparse
    from types import SimpleNamespace

    from common.datasets import load_dataset

    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("env_id", help="the --env-id of the runs that will read the transitions")
    p.add_argument("--models-dir", default="models", help="the runs' --models-dir, which holds {env_id}/synther.pt")
    p.add_argument("--synther-samples", type=int, default=5_000_000, help="the runs' --synther-samples")
    p.add_argument("--synther-sampler-steps", type=int, default=128, help="the runs' --synther-sampler-steps")
    p.add_argument("--dataset-steps", type=int, default=None, help="the runs' --dataset-steps (generated PointMaze data)")
    p.add_argument("--offline", action="store_true", help="do not try to download the dataset")
    p.add_argument("--cpu", action="store_true", help="generate on the CPU even where a GPU is present")
    args = p.parse_args(argv)
    for flag in ("synther_samples", "synther_sampler_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a positive number")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    data = load_dataset(args.env_id, offline=args.offline or None, dataset_steps=args.dataset_steps)
    run = SimpleNamespace(
        env_id=args.env_id,
        models_dir=args.models_dir,
        synther_samples=args.synther_samples,
        synther_sampler_steps=args.synther_sampler_steps,
    )
    _, info = load_or_generate(run, data, device)
    took = f" in {info['generation_s'] / 60:.1f} min ({torch.get_num_threads()} threads)" if info["generated"] else ""
    print(f"SynthER: {info['count']:,} transitions in {info['path']}{took}")


if __name__ == "__main__":
    main()
