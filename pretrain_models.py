# Docs: docs/pretrained-models.md
"""Pretrain DyDiff's three models for one dataset, then measure them (paper §4.1-4.2, Appendix C).

1. the EDM trajectory denoiser D_theta over windows [B, L, S+A] (Eq. 2-4), with an EMA copy;
2. the single-step dynamics ensemble T_phi (Eq. 5): 7 members, 5 elites;
3. the reward model r_psi(s, a) (Eq. 10).
Then the model report: held-out losses; state error versus horizon of the ensemble's autoregressive
rollout, of DM samples after M = 1, 2, 3 refinement iterations and of copying s_0; and the one-step
validity of the DM's generated transitions against the real simulator, by position in the window.
`--report-only` measures the models already in a folder.

`--models synther` makes the paper's baseline instead (or besides): SynthER's diffusion model of single
transitions (common/synther.py), with its own report (synther_report.json): its held-out loss, and generated
transitions checked against the real simulator and the task's reward.
"""

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import tqdm

from common.args import non_finite_problems
from common.checkpoints import (
    DYDIFF_MODELS,
    MODEL_FILES,
    PHYSICAL_MODELS,
    DamagedFile,
    atomic_save,
    fits_data,
    load_checkpoint,
    load_dm,
    load_dynamics,
    load_model_file,
    load_reward,
    load_synther,
    models_folder,
    previous,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
    share_file,
)
from common.config import PRESETS, PretrainConfig, apply_preset, cpu_command
from common.datasets import OFFLINE_ENV_VAR, gather_windows, load_dataset, segment_windows
from common.dynamics import EnsembleDynamics, RewardModel
from common.edm import EMA, MinMaxNormalizer, build_denoiser, condition_mask, edm_loss, refine_states
from common.envs import replay_actions, step_from
from common.pointmaze import crosses_wall
from common.runs import stop_on_signals
from common.synther import (
    StandardNormalizer,
    batch_size_for,
    build_synther,
    ema_decay,
    generate,
    split_rows,
    transition_checks,
    transition_rows,
)


@dataclass
class Args(PretrainConfig):
    """The model options (DM, dynamics ensemble, reward model, report) come from common.config.PretrainConfig."""

    preset: Literal["paper", "cpu"] = "paper"
    """named configuration (see docs/scripts.md, "Presets"): paper = the paper's sizes (GPU); cpu = what 2 CPU cores
    train in about half an hour (into models-cpu/); flags given on the command line win over the preset"""
    exp_name: str = "pretrain"
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

    # Data
    env_id: str = "maze2d-umaze"
    """D4RL-style name (maze2d-large, hopper-medium, ...) or a Minari dataset id"""
    offline: bool = False
    """never try to download a dataset (also: DYDIFF_OFFLINE=1)"""
    dataset_steps: int | None = None
    """steps of a locally generated PointMaze dataset (default: D4RL's size for maze2d-*: 1M umaze, 2M medium, 4M large)"""
    models_dir: str = "models"
    """the models are saved to {models_dir}/{env_id}/"""
    resume: bool = True
    """continue an interrupted pretraining (models already finished are kept)"""
    rollout_length: int = 100
    """L: length of the trajectory windows the DM generates"""
    models: tuple[Literal["dm", "dynamics", "reward", "synther"], ...] = ("dm", "dynamics", "reward")
    """the models to make (a training script asks for those its run uses): DyDiff's three by default, whose model
    report needs all three; synther = the paper's baseline, SynthER (with its own report)"""
    dm_bf16: bool = True
    """train (and sample, in the report) the DM in bfloat16 autocast on a GPU, as the training scripts sample it"""

    # Model report
    report_only: bool = False
    """measure the models already in {models_dir}/{env_id} (made by an earlier run) and rewrite their report"""
    sampler_steps: int = 34
    """N: EDM sampler steps (paper Table 3)"""
    sampler_churn: float = 60.0
    """S_churn: EDM's stochasticity (paper Table 3: 60; 0 makes the sampler deterministic)"""
    synther_sampler_steps: int = 128
    """Heun steps of SynthER's sampler in its report (SynthER: 128; the training scripts' --synther-sampler-steps)"""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


def split_segments(data, holdout_fraction: float):
    """Cut the dataset at one index: (train segments, held-out segments) as (starts, ends) arrays."""
    n_train = int(round(data.size * (1.0 - holdout_fraction)))
    starts, ends = data.segment_starts, data.segment_ends
    train = (np.minimum(starts, n_train), np.minimum(ends, n_train))
    held = (np.maximum(starts, n_train), np.maximum(ends, n_train))
    keep_t, keep_h = train[1] > train[0], held[1] > held[0]
    return (train[0][keep_t], train[1][keep_t]), (held[0][keep_h], held[1][keep_h]), n_train


class RandomPolicy(nn.Module):
    """A fixed random tanh MLP on z-scored observations: a non-behaviour policy for the model report."""

    def __init__(self, obs_mean, obs_std, action_dim, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = len(obs_mean)
        self.register_buffer("mean", torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(obs_std, dtype=torch.float32))
        self.w1 = nn.Parameter(torch.randn(d, 64, generator=g) / d**0.5, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(64, action_dim, generator=g) / 8.0, requires_grad=False)

    def forward(self, obs):
        return torch.tanh(torch.tanh(((obs - self.mean) / self.std) @ self.w1) @ self.w2 * 2.0)


def model_meta(args, data, **extra):
    """What every model file records, so it can be used without the training run."""
    return dict(
        env_id=args.env_id,
        dataset_ids=list(data.dataset_ids),
        fingerprint=data.fingerprint,
        physical_fingerprint=data.physical_fingerprint,
        task=data.task,
        form=data.form,
        obs_dim=data.obs_dim,
        state_dim=data.state_dim,
        action_dim=data.action_dim,
        args=asdict(args),
        **extra,
    )


def dm_config(args) -> dict:
    """The DM's shape, as saved in dm.pt and dm_train.pt: what must match to keep or resume a DM."""
    return dict(horizon=args.rollout_length, **args.dm_network())


def load_dm_checkpoint(path, what="the DM"):
    """A training checkpoint (the DM's, or `what`'s), or the one before it if it is damaged (saying so); None if
    there is none."""
    for candidate in (path, previous(path)):
        try:
            ckpt = load_checkpoint(candidate)
        except FileNotFoundError:
            continue
        except DamagedFile as e:
            print(f"{e}; trying the checkpoint before it" if candidate == path else f"{e}; training {what} from scratch")
            continue
        if candidate != path:
            print(f"resuming from {candidate.name}, the checkpoint before {path.name}")
        return ckpt
    return None


class LoopChores:
    """What the DM's and SynthER's training loops do besides the gradient step: a progress bar, one line when a short
    measurement on a CPU says the rest will take over an hour, a NaN check every 100 steps and before each save
    (reading the loss waits for the device; a NaN spreads to the weights, so a later check still sees it), the
    smoothed loss on the bar and the logged loss and speed, and whether a checkpoint is due."""

    def __init__(self, name, key, first, total, every, device, log, nan_fix, cpu_hint):
        self.name, self.key, self.first, self.total, self.every = name, key, first, total, every
        self.device, self.log, self.nan_fix, self.cpu_hint = device, log, nan_fix, cpu_hint
        self.t0, self.loss_avg = time.time(), None
        self.bar = tqdm(range(first, total), initial=first, total=total, desc=name, mininterval=2.0, smoothing=0)

    def __iter__(self):
        return iter(self.bar)

    def before_step(self, step):
        if step != self.first + 20 or self.device.type != "cpu":
            return
        hours = (time.time() - self.t0) / 20 * (self.total - step) / 3600
        if hours > 1:  # say so, then go on: the command may be meant for a bigger machine
            tqdm.write(
                f"no GPU: the {self.total - step:,} {self.name} steps left will take about {hours:,.1f} h on this CPU "
                f"(measured). CPU-size models: {self.cpu_hint}"
            )

    def after_step(self, step, loss) -> bool:
        """Checks and logs the step's loss; True when a checkpoint is due."""
        checkpoint = (step + 1) % self.every == 0 or step + 1 == self.total
        if (step % 100 == 0 or checkpoint) and not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name} loss is {loss.item()} at step {step}; {self.nan_fix}")
        if step % 100 == 0:
            loss_val = loss.item()
            self.loss_avg = loss_val if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * loss_val
            self.bar.set_postfix(loss=f"{self.loss_avg:.4f}")
            rate = (step + 1 - self.first) / max(time.time() - self.t0, 1e-9)
            self.log({f"losses/{self.key}": loss_val, f"charts/{self.key}_steps_per_s": rate}, step)
        return checkpoint


def train_dm(args, data, train_segs, device, folder, log):
    """Train the EDM denoiser on training windows; resumable from {folder}/dm_train.pt."""
    S, A, L = data.state_dim, data.action_dim, args.rollout_length
    states = torch.as_tensor(data.observations[:, :S], device=device)
    actions = torch.as_tensor(data.actions, device=device)
    next_states = torch.as_tensor(data.next_observations[:, :S], device=device)
    starts, lengths = (torch.as_tensor(a, device=device) for a in segment_windows(*train_segs, L))
    n_train = int(train_segs[1].max())
    normalizer = MinMaxNormalizer.from_data(
        np.concatenate([data.observations[:n_train, :S], data.actions[:n_train]], axis=1)
    ).to(device)
    config = dm_config(args)
    denoiser = build_denoiser(S, A, **{k: v for k, v in config.items() if k != "horizon"}).to(device)
    ema = EMA(denoiser, decay=args.dm_ema_decay)
    opt = torch.optim.Adam(denoiser.parameters(), lr=args.dm_lr)
    cond_mask = condition_mask(L, S, A, device=device)
    row_weight = None
    if args.dm_edge_weight != 1.0:  # s_1 and s_{L-1}: the rows next to the condition s_0 and to the window's end
        row_weight = torch.ones(L, device=device)
        row_weight[[1, L - 1]] = args.dm_edge_weight
    gen = torch.Generator(device=device).manual_seed(args.seed)
    dm_bf16 = args.dm_bf16 and device.type == "cuda"
    step = 0
    ckpt_path = folder / "dm_train.pt"
    ckpt = load_dm_checkpoint(ckpt_path) if args.resume else None
    if ckpt is not None:
        saved = (ckpt.get("physical_fingerprint"), ckpt["config"], ckpt.get("edge_weight", 1.0), "rng" in ckpt)
        if saved != (data.physical_fingerprint, config, args.dm_edge_weight, True):
            print(f"{ckpt_path} is for other data or another DM configuration: training the DM from scratch")
        else:
            denoiser.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
            for group in opt.param_groups:  # this command's --dm-lr, not the saved one
                group["lr"] = args.dm_lr
            set_rng_state(ckpt["rng"], gen)
            step = ckpt["step"]
            print(f"resuming DM training at step {step:,} from {ckpt_path}")
    n_params = sum(p.numel() for p in denoiser.parameters())
    print(
        f"DM: temporal U-Net dim {args.dm_dim}, mults {args.dm_dim_mults}, full-resolution skip "
        f"{args.dm_full_res_skip}, {args.dm_padding} padding, condition channels {args.dm_cond_channels}, "
        f"states relative to s_0 {args.dm_relative_states}, position channels {args.dm_position_channels}, "
        f"edge-row loss weight {args.dm_edge_weight}, "
        f"{n_params / 1e6:.2f}M parameters; "
        f"{len(starts):,} training windows of L={L}"
    )
    chores = LoopChores(
        "DM",
        "dm",
        step,
        args.dm_steps,
        args.dm_checkpoint_every,
        device,
        log,
        nan_fix=f"lower --dm-lr (now {args.dm_lr})",
        cpu_hint=cpu_command("pretrain_models.py", args.env_id),
    )
    for step in chores:
        chores.before_step(step)
        idx = torch.randint(len(starts), (args.dm_batch_size,), device=device, generator=gen)
        x, valid = gather_windows(states, actions, next_states, starts[idx], lengths[idx], L)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dm_bf16):
            loss = edm_loss(
                denoiser,
                normalizer.normalize(x),
                cond_mask,
                args.p_mean,
                args.p_std,
                valid=valid,
                generator=gen,
                row_weight=row_weight,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(denoiser)
        if chores.after_step(step, loss):
            atomic_save(
                dict(
                    model=denoiser.state_dict(),
                    ema=ema.state_dict(),
                    opt=opt.state_dict(),
                    rng=rng_state(gen),
                    step=step + 1,
                    fingerprint=data.fingerprint,
                    physical_fingerprint=data.physical_fingerprint,
                    config=config,
                    edge_weight=args.dm_edge_weight,
                ),
                ckpt_path,
                keep_previous=True,
            )
    atomic_save(
        dict(
            model_meta(args, data, steps=args.dm_steps, **config),
            state_dict=ema.module.state_dict(),
            normalizer=normalizer.state_dict(),
        ),
        folder / MODEL_FILES["dm"],
    )
    return ema.module.eval(), normalizer


def synther_config(args, n_train: int) -> dict:
    """SynthER's network and training, as saved in synther.pt and synther_train.pt: what must match to keep or resume
    it (the batch size by SynthER's rule unless given)."""
    return dict(
        network=args.synther_network(),
        steps=args.synther_steps,
        batch_size=args.synther_batch_size or batch_size_for(n_train),
        lr=args.synther_lr,
        ema_decay=args.synther_ema_decay,
        p_mean=args.p_mean,
        p_std=args.p_std,
    )


def synther_rows(data, start: int, stop: int) -> np.ndarray:
    """The transitions data[start:stop] as SynthER's rows (s, a, r, s', terminal)."""
    part = slice(start, stop)
    return transition_rows(
        data.observations[part], data.actions[part], data.rewards[part], data.next_observations[part], data.terminals[part]
    )


def train_synther(args, data, n_train, device, folder, log):
    """Train SynthER's denoiser on the training transitions, as SynthER's Trainer does (elucidated_diffusion.py):
    EDM loss on z-scored rows, AdamW, cosine learning-rate decay, gradient norm clipped at 1, an EMA of the weights;
    resumable from {folder}/synther_train.pt. Batches are drawn uniformly with replacement (SynthER: shuffled epochs)."""
    rows = synther_rows(data, 0, n_train)
    normalizer = StandardNormalizer.from_data(rows).to(device)
    x_all = normalizer.normalize(torch.as_tensor(rows, device=device))  # z-scored once; the loss sees these
    config = synther_config(args, n_train)
    C = rows.shape[1]
    denoiser = build_synther(C, **config["network"]).to(device)
    ema = EMA(denoiser, decay=0.0)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=args.synther_lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.synther_steps)
    no_condition = torch.zeros(1, C, dtype=torch.bool, device=device)  # an unconditional model of transitions
    gen = torch.Generator(device=device).manual_seed(args.seed)
    step = 0
    ckpt_path = folder / "synther_train.pt"
    ckpt = load_dm_checkpoint(ckpt_path, "SynthER") if args.resume else None
    if ckpt is not None:
        if (ckpt.get("fingerprint"), ckpt.get("config"), "rng" in ckpt) != (data.fingerprint, config, True):
            print(f"{ckpt_path} is for other data or another SynthER configuration: training SynthER from scratch")
        else:
            denoiser.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
            schedule.load_state_dict(ckpt["schedule"])
            set_rng_state(ckpt["rng"], gen)
            step = ckpt["step"]
            print(f"resuming SynthER training at step {step:,} from {ckpt_path}")
    n_params = sum(p.numel() for p in denoiser.parameters())
    print(
        f"SynthER: residual MLP width {args.synther_width}, depth {args.synther_depth}, {n_params / 1e6:.2f}M parameters; "
        f"{n_train:,} training transitions of {C} dimensions, batch {config['batch_size']}, {args.synther_steps:,} steps"
    )
    chores = LoopChores(
        "SynthER",
        "synther",
        step,
        args.synther_steps,
        args.dm_checkpoint_every,
        device,
        log,
        nan_fix=f"lower --synther-lr (now {args.synther_lr})",
        cpu_hint=f"{cpu_command('pretrain_models.py', args.env_id)} --models synther",
    )
    for step in chores:
        chores.before_step(step)
        idx = torch.randint(len(x_all), (config["batch_size"],), device=device, generator=gen)
        loss = edm_loss(denoiser, x_all[idx, None], no_condition, args.p_mean, args.p_std, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        schedule.step()
        if (decay := ema_decay(step, args.synther_ema_decay)) is not None:
            ema.decay = decay
            ema.update(denoiser)
        if chores.after_step(step, loss):
            atomic_save(
                dict(
                    model=denoiser.state_dict(),
                    ema=ema.state_dict(),
                    opt=opt.state_dict(),
                    schedule=schedule.state_dict(),
                    rng=rng_state(gen),
                    step=step + 1,
                    fingerprint=data.fingerprint,
                    config=config,
                ),
                ckpt_path,
                keep_previous=True,
            )
    atomic_save(
        dict(
            model_meta(args, data, **config, params=n_params),
            state_dict=ema.module.state_dict(),
            normalizer=normalizer.state_dict(),
        ),
        folder / MODEL_FILES["synther"],
    )
    return ema.module.eval(), normalizer


@torch.no_grad()
def synther_report(args, data, n_train, denoiser, normalizer, device, folder, log):
    """SynthER's report: the EDM loss on held-out transitions, and generated transitions checked against the real
    simulator and the task's reward (common.synther.transition_checks); writes synther_report.json."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    C = normalizer.mean.numel()
    held = normalizer.normalize(torch.as_tensor(synther_rows(data, n_train, data.size), device=device))
    no_condition = torch.zeros(1, C, dtype=torch.bool, device=device)
    losses = [
        float(edm_loss(denoiser, held[idx, None], no_condition, args.p_mean, args.p_std, generator=gen))
        for idx in torch.randint(len(held), (8, min(1024, len(held))), device=device, generator=gen)
    ]
    t0 = time.time()
    rows = generate(denoiser, normalizer, args.synther_report_transitions, args.synther_sampler_steps, gen, progress=False)
    seconds = time.time() - t0
    samples = split_rows(rows, data.obs_dim, data.action_dim)
    env = data.make_eval_env()
    checks = transition_checks(data, env, samples, n=len(rows), seed=args.seed, prefix="")
    env.close()
    saved = load_model_file(folder, "synther")
    report = {
        "env_id": args.env_id,
        "fingerprint": data.fingerprint,
        "form": data.form,
        "network": saved["network"],
        "params": saved["params"],
        "steps": saved["steps"],
        "batch_size": saved["batch_size"],
        "heldout_transitions": data.size - n_train,
        "heldout_loss": float(np.mean(losses)),
        "sampler_steps": args.synther_sampler_steps,
        "generated_transitions": len(rows),
        "generation_s": seconds,
        "checks": checks,
    }
    with open(folder / ".synther_report.json.tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(folder / ".synther_report.json.tmp", folder / "synther_report.json")
    log({"report/synther_heldout_loss": report["heldout_loss"], **{f"report/synther_{k}": v for k, v in checks.items()}}, None)
    return report


def state_error(pred, true):
    """Mean over windows of the squared state error at each horizon t: [L]."""
    return ((np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)) ** 2).sum(-1).mean(0)


def middle_positions(n: int) -> slice:
    """The middle half of n transition positions (n // 4 .. n - n // 4): the mid-window reference."""
    return slice(n // 4, n - n // 4) if n >= 4 else slice(0, n)


def one_step_summary(err: np.ndarray, stat) -> dict:
    """err [W, L-1] (window, position) -> stat (np.mean or np.median) over windows of the first, second and last
    transition, and over windows and the middle half of the positions pooled ("middle").

    A single mid-window position is not a reference: one-step errors are heavy-tailed (a rare window whose
    generated state meets a wall differently from the simulator outweighs hundreds of others), so the mean
    at one position depends on which windows happen to have such an event there."""
    n = err.shape[1]
    return {
        "first": float(stat(err[:, 0])),
        "second": float(stat(err[:, min(1, n - 1)])),
        "middle": float(stat(err[:, middle_positions(n)])),
        "last": float(stat(err[:, -1])),
    }


def first_over_middle(err: np.ndarray, stat: str, rng, resamples: int = 1000) -> dict:
    """The ratio of the first transition's error to the middle half's (err [W, L-1]), by mean or median over
    windows, with a 90 % bootstrap interval over windows."""
    f = np.mean if stat == "mean" else np.median
    first, middle = err[:, 0], err[:, middle_positions(err.shape[1])]

    def ratio(rows):
        return float(f(first[rows]) / max(float(f(middle[rows])), 1e-30))

    boot = [ratio(rng.integers(len(err), size=len(err))) for _ in range(resamples)]
    return {"ratio": ratio(np.arange(len(err))), "low": float(np.quantile(boot, 0.05)), "high": float(np.quantile(boot, 0.95))}


@torch.no_grad()
def model_report(args, data, held_segs, denoiser, normalizer, dynamics, reward_model, device, folder, log):
    """Held-out losses and state error versus horizon; writes report.json and report.png."""
    S, A, L = data.state_dim, data.action_dim, args.rollout_length
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    n0 = int(held_segs[0].min())
    report = {
        "env_id": args.env_id,
        "fingerprint": data.fingerprint,
        "physical_fingerprint": data.physical_fingerprint,
        "form": data.form,
        "horizon": L,
        "heldout_transitions": data.size - n0,
        "dm": {
            "dim": args.dm_dim,
            "dim_mults": list(args.dm_dim_mults),
            "steps": args.dm_steps,
            "full_res_skip": args.dm_full_res_skip,
            "padding_mode": args.dm_padding,
            "cond_channels": args.dm_cond_channels,
            "relative_states": args.dm_relative_states,
            "position_channels": args.dm_position_channels,
            "edge_weight": args.dm_edge_weight,
            "sampler_steps": args.sampler_steps,
            "sampler_churn": args.sampler_churn,
            "params": sum(p.numel() for p in denoiser.parameters()),
        },
    }

    # Held-out losses
    obs_h, act_h, rew_h = (torch.as_tensor(a[n0:], device=device) for a in (data.observations, data.actions, data.rewards))
    nobs_h = torch.as_tensor(data.next_observations[n0:], device=device)
    report["dynamics_heldout_mse_per_member"] = dynamics.holdout_loss(obs_h[:, :S], act_h, nobs_h[:, :S]).tolist()
    report["dynamics_elites"] = dynamics.elites.tolist()
    report["reward_heldout_mse"] = float(((reward_model(obs_h, act_h) - rew_h) ** 2).mean())
    h_starts, h_lengths = segment_windows(*held_segs, L)
    cond_mask = condition_mask(L, S, A, device=device)
    dm_losses = []
    for _ in range(8):
        idx = rng.integers(len(h_starts), size=min(256, len(h_starts)))
        x, valid = gather_windows(
            data.observations[:, :S], data.actions, data.next_observations[:, :S], h_starts[idx], h_lengths[idx], L
        )
        x, valid = torch.as_tensor(x, device=device), torch.as_tensor(valid, device=device)
        dm_losses.append(
            float(edm_loss(denoiser, normalizer.normalize(x), cond_mask, args.p_mean, args.p_std, valid=valid, generator=gen))
        )
    report["dm_heldout_loss"] = float(np.mean(dm_losses))

    # (a) Held-out dataset windows: the dataset's own actions, ground truth = the dataset's states.
    full = np.flatnonzero(h_lengths == L)
    if len(full) == 0:
        raise ValueError(f"no held-out segment is {L} steps long; raise --holdout-fraction or lower --rollout-length")
    pick = rng.choice(full, size=min(args.report_windows, len(full)), replace=False)
    x, _ = gather_windows(
        data.observations[:, :S], data.actions, data.next_observations[:, :S], h_starts[pick], h_lengths[pick], L
    )
    x = torch.as_tensor(x, device=device)
    true_states, acts = x[..., :S], x[..., S:]
    ens = [true_states[:, 0]]
    for t in range(L - 1):
        ens.append(dynamics.predict(ens[-1], acts[:, t], generator=gen))
    ens = torch.stack(ens, 1)
    dm = refine_states(
        denoiser,
        normalizer,
        true_states[:, 0],
        acts,
        args.sampler_steps,
        args.sampler_churn,
        gen,
        bf16=args.dm_bf16 and device.type == "cuda",
    )
    copy_s0 = true_states[:, :1].expand_as(true_states)  # the baseline that predicts no motion at all
    curves = {
        "dataset/ensemble": state_error(ens.cpu(), true_states.cpu()),
        "dataset/dm": state_error(dm.cpu(), true_states.cpu()),
        "dataset/copy_s0": state_error(copy_s0.cpu(), true_states.cpu()),
    }
    env = data.make_eval_env()

    def one_step(states, actions):
        """One-step validity of the transitions (s_t, a_t, s_t+1) of generated windows: the squared error
        [W, L-1] (window, position t) against the real simulator stepped once from s_t with a_t, of the
        generated s_t+1, of copying s_t, and of the ensemble's one-step prediction from the same s_t."""
        W = states.shape[0]
        s_t, a_t = states[:, :-1].reshape(-1, S), actions[:, :-1].reshape(-1, A)
        real = torch.as_tensor(step_from(env, data.task, s_t.cpu().numpy(), a_t.cpu().numpy()), dtype=s_t.dtype, device=device)

        def err(pred):
            return ((pred - real) ** 2).sum(-1).reshape(W, L - 1).cpu().numpy()

        return {
            "generated": err(states[:, 1:].reshape(-1, S)),
            "copy": err(s_t),
            "ensemble": err(dynamics.predict(s_t, a_t, generator=gen)),
        }

    validity = {"dataset/dm": one_step(dm, acts)}

    # (b) A non-behaviour policy, replayed in the real simulator (paper Fig. 4 and 7).
    context = torch.as_tensor(data.observations[h_starts[pick], S:], device=device)
    obs_mean, obs_std = data.observations.mean(0), data.observations.std(0) + 1e-6
    policy = RandomPolicy(obs_mean, obs_std, A, seed=args.seed).to(device)
    s0 = true_states[:, 0]

    def replay(actions):
        return np.stack([replay_actions(env, data.task, s.cpu().numpy(), a.cpu().numpy()) for s, a in zip(s0, actions)])

    ens_states, ens_actions = dynamics.rollout(policy, s0, L, context=context, generator=gen)
    real_states = replay(ens_actions)
    curves["policy/ensemble"] = state_error(ens_states.cpu(), real_states)
    curves["policy/copy_s0"] = state_error(np.repeat(s0.cpu().numpy()[:, None], L, axis=1), real_states)
    trajectories = {
        "dataset/ensemble": ens.cpu().numpy(),
        "dataset/dm": dm.cpu().numpy(),
        "policy/real": real_states,
        "policy/ensemble": ens_states.cpu().numpy(),
    }
    actions = ens_actions
    for k in range(1, args.report_iterations + 1):
        states_k = refine_states(
            denoiser,
            normalizer,
            s0,
            actions,
            args.sampler_steps,
            args.sampler_churn,
            gen,
            bf16=args.dm_bf16 and device.type == "cuda",
        )
        curves[f"policy/dm_M{k}"] = state_error(states_k.cpu(), replay(actions))
        if k == 1:
            validity["policy/dm_M1"] = one_step(states_k, actions)
        obs_k = torch.cat([states_k, context[:, None].expand(-1, L, -1)], dim=-1)
        actions = policy(obs_k.reshape(-1, data.obs_dim)).reshape(-1, L, A)  # relabel: a_t = pi(s_t)
        trajectories[f"policy/dm_M{k}"] = states_k.cpu().numpy()

    if data.task == "pointmaze":  # share of trajectories that pass through a wall
        maze = env.unwrapped.maze
        report["wall_crossing_share"] = {k: float(crosses_wall(maze, v[..., :2]).mean()) for k, v in trajectories.items()}
    env.close()
    report["state_error_vs_horizon"] = {k: v.tolist() for k, v in curves.items()}
    report[f"state_error_at_{L - 1}"] = {k: float(v[-1]) for k, v in curves.items()}
    report["state_error_mean"] = {k: float(v.mean()) for k, v in curves.items()}
    report["one_step_error_vs_position"] = {
        k: {kind: e.mean(0).tolist() for kind, e in v.items()} for k, v in validity.items()
    }
    report["one_step_error"] = {k: {kind: one_step_summary(e, np.mean) for kind, e in v.items()} for k, v in validity.items()}
    report["one_step_error_median"] = {
        k: {kind: one_step_summary(e, np.median) for kind, e in v.items()} for k, v in validity.items()
    }
    report["one_step_first_over_middle"] = {
        k: {stat: first_over_middle(v["generated"], stat, rng) for stat in ("mean", "median")} for k, v in validity.items()
    }
    with open(folder / ".report.json.tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(folder / ".report.json.tmp", folder / "report.json")
    png = plot_report(curves, folder / "report.png", args.env_id)
    log(
        {f"report/{k}_final": float(v[-1]) for k, v in curves.items()}
        | {
            "report/dm_heldout_loss": report["dm_heldout_loss"],
            "report/reward_heldout_mse": report["reward_heldout_mse"],
        },
        None,
        image=png,
    )
    return report


def plot_report(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, err in curves.items():
        ax.plot(np.arange(len(err)), np.maximum(err, 1e-8), ("--" if name.startswith("dataset") else "-"), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("horizon t")
    ax.set_ylabel("mean squared state error")
    ax.set_title(
        f"{title}: rollout error vs horizon (dataset actions: dashed; random policy, real simulator: solid)", fontsize=8
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(".report.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    args = tyro.cli(Args)
    run_preset = PRESETS[args.preset]["run"]
    apply_preset(
        args,
        dict(
            PRESETS[args.preset]["pretrain"],
            models_dir=run_preset.get("models_dir", args.models_dir),
            synther_sampler_steps=run_preset.get("synther_sampler_steps", args.synther_sampler_steps),
        ),
        sys.argv[1:],
    )
    stop_on_signals(
        lambda: (
            "interrupted before pretraining began; nothing was saved: run the same command again "
            "(an interrupted dataset generation starts over)"
        )
    )
    if problems := non_finite_problems(args):
        raise SystemExit("; ".join(problems))
    if args.rollout_length < 2:
        raise SystemExit(f"--rollout-length must be >= 2, got {args.rollout_length}")
    if not 0.0 < args.holdout_fraction < 0.5:
        raise SystemExit(f"--holdout-fraction must be in (0, 0.5), got {args.holdout_fraction}")
    if args.dyn_elites > args.dyn_members:
        raise SystemExit(f"--dyn-elites ({args.dyn_elites}) cannot exceed --dyn-members ({args.dyn_members})")
    if not args.dm_edge_weight > 0:
        raise SystemExit(f"--dm-edge-weight must be > 0 (1: every row alike), got {args.dm_edge_weight}")
    for name in ("synther_width", "synther_depth", "synther_dim_t", "synther_steps", "synther_report_transitions"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.synther_batch_size is not None and args.synther_batch_size < 1:
        raise SystemExit(f"--synther-batch-size must be >= 1 (or not given: SynthER's rule), got {args.synther_batch_size}")
    if args.synther_sampler_steps < 2:
        raise SystemExit(f"--synther-sampler-steps must be >= 2, got {args.synther_sampler_steps}")
    if args.offline:
        os.environ[OFFLINE_ENV_VAR] = "1"
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    try:
        data = load_dataset(args.env_id, dataset_steps=args.dataset_steps)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e))
    folder = models_folder(args.models_dir, args.env_id)
    made_folder = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(
            f"cannot make the models folder {folder}: {e.strerror or e}; choose a writable --models-dir"
        ) from None
    remove_stale_temporaries(folder)

    def stop_message():
        if made_folder and not any(folder.iterdir()):  # nothing saved yet: no half-made folder stays behind
            folder.rmdir()
            return f"interrupted before anything was saved; removed {folder}"
        return (
            f"interrupted: the models finished so far and the DM's last checkpoint are kept in {folder}; "
            f"run the same command again to continue"
        )

    stop_on_signals(stop_message)
    print(
        f"pretraining models for {args.env_id} ({', '.join(data.dataset_ids)}"
        f"{', ' + data.form + ' task' if data.form else ''}, fingerprint {data.fingerprint}, physical fingerprint "
        f"{data.physical_fingerprint}) "
        f"into {folder} on {device}"
    )

    wandb_run = None
    if args.track:
        import wandb

        wandb_run = wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            group=args.wandb_group,
            config=vars(args),
            name=run_name,
            save_code=True,
        )

    def log(metrics, step, image=None):
        if wandb_run is not None:
            if image is not None:
                import wandb

                metrics = dict(metrics, **{"report/plot": wandb.Image(str(image))})
            wandb_run.log(metrics, step=step)

    def fits(ckpt, name):
        """Whether a model file is what this command would make: this data (for the DM and the ensemble, this
        physical data, whatever the task) and, for the DM and SynthER, this shape and training."""
        if name == "synther":
            config = synther_config(args, n_train)
            return all(ckpt.get(k) == v for k, v in config.items()) and fits_data(ckpt, name, data)
        if name == "dm":
            saved = dict(dm_config(args), **{k: ckpt[k] for k in dm_config(args) if k in ckpt})  # old files: paper net
            if saved != dm_config(args) or ckpt["steps"] != args.dm_steps:
                return False
            if ckpt["args"].get("dm_edge_weight", 1.0) != args.dm_edge_weight:  # the same network, trained otherwise
                return False
        return fits_data(ckpt, name, data)

    def finished(name):
        """A fitting model file exists and we resume: keep it. The DM and the ensemble may come from another task's
        folder of the same physical data (the two maze2d tasks of one dataset): they are linked in, not retrained."""
        path = folder / MODEL_FILES[name]
        if args.report_only:
            return True
        if not args.resume:
            return False
        if path.exists():
            try:
                if fits(load_model_file(folder, name), name):
                    return True
            except DamagedFile as e:
                print(f"{e.args[0].split(';')[0]}: training it again")
        return name in PHYSICAL_MODELS and shared_model(name)

    def shared_model(name):
        """Link a fitting DM or ensemble from another folder of --models-dir into this one; whether one was found."""
        for other in sorted(Path(args.models_dir).glob(f"*/{MODEL_FILES[name]}")):
            if other.parent.resolve() == folder.resolve():
                continue
            try:
                ckpt = load_model_file(other.parent, name)
            except DamagedFile:
                continue
            if "physical_fingerprint" in ckpt and fits(ckpt, name):
                share_file(other, folder / MODEL_FILES[name])
                print(
                    f"{name}: reusing {other} ({ckpt['env_id']}: the same physical data, physical fingerprint "
                    f"{data.physical_fingerprint}); only the reward model is made per task"
                )
                return True
        return False

    if args.report_only and not set(DYDIFF_MODELS) & set(args.models):  # SynthER's report alone
        try:
            args.holdout_fraction = load_model_file(folder, "synther", data)["args"]["holdout_fraction"]
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(str(e))
    elif args.report_only:  # measure the models as they are, whatever command made them
        try:
            dm_info = load_model_file(folder, "dm", data)
            for name in ("dynamics", "reward"):
                load_model_file(folder, name, data)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(str(e))
        args.rollout_length, args.dm_dim, args.dm_dim_mults, args.dm_steps = (
            dm_info["horizon"],
            dm_info["dim"],
            tuple(dm_info["dim_mults"]),
            dm_info["steps"],
        )
        args.holdout_fraction = dm_info["args"]["holdout_fraction"]
        args.dm_full_res_skip, args.dm_padding, args.dm_cond_channels, args.dm_relative_states = (
            dm_info.get("full_res_skip", False),
            dm_info.get("padding_mode", "zeros"),
            dm_info.get("cond_channels", False),
            dm_info.get("relative_states", False),
        )
        args.dm_position_channels = dm_info.get("position_channels", False)
        args.dm_edge_weight = dm_info["args"].get("dm_edge_weight", 1.0)
    train_segs, held_segs, n_train = split_segments(data, args.holdout_fraction)
    S = data.state_dim
    timings = {}

    # 1. Dynamics ensemble on the training part (its own random split decides early stopping and elites)
    t0 = time.time()
    dynamics = EnsembleDynamics(
        S, data.action_dim, num_members=args.dyn_members, num_elites=args.dyn_elites, hidden=args.dyn_hidden
    ).to(device)
    if "dynamics" not in args.models:
        pass
    elif finished("dynamics"):
        dynamics = load_dynamics(folder, data, device)
        print("dynamics ensemble: already trained, kept")
    else:
        stats = dynamics.fit(
            data.observations[:n_train, :S],
            data.actions[:n_train],
            data.next_observations[:n_train, :S],
            batch_size=args.dyn_batch_size,
            max_epochs=args.dyn_max_epochs,
            max_steps=args.dyn_max_steps or None,
            seed=args.seed,
        )
        atomic_save(
            dict(model_meta(args, data, config=dynamics.config, fit=stats), state_dict=dynamics.state_dict()),
            folder / MODEL_FILES["dynamics"],
        )
        timings["dynamics_s"] = time.time() - t0
        log({"losses/dynamics_holdout_mse": float(np.mean(stats["holdout_mse"]))}, None)

    # 2. Reward model r(s, a) on full RL observations
    t0 = time.time()
    reward_model = RewardModel(data.obs_dim, data.action_dim).to(device)
    if "reward" not in args.models:
        pass
    elif finished("reward"):
        reward_model = load_reward(folder, data, device)
        print("reward model: already trained, kept")
    else:
        stats = reward_model.fit(
            data.observations[:n_train],
            data.actions[:n_train],
            data.rewards[:n_train],
            batch_size=args.reward_batch_size,
            max_steps=args.reward_steps,
            seed=args.seed,
        )
        atomic_save(
            dict(model_meta(args, data, config=reward_model.config, fit=stats), state_dict=reward_model.state_dict()),
            folder / MODEL_FILES["reward"],
        )
        timings["reward_s"] = time.time() - t0
        log({"losses/reward_holdout_mse": float(stats["holdout_mse"])}, None)

    # 3. Diffusion model
    t0 = time.time()
    if "dm" not in args.models:
        pass
    elif finished("dm"):
        denoiser, normalizer, _ = load_dm(folder, data, device)
        print("diffusion model: already trained, kept")
    else:
        try:
            denoiser, normalizer = train_dm(args, data, train_segs, device, folder, log)
        except FloatingPointError as e:
            raise SystemExit(f"{e}; the last good checkpoint, {folder / 'dm_train.pt'}, is kept (if any)")
        timings["dm_s"] = time.time() - t0

    # 4. SynthER, the paper's baseline (when asked for: --models synther), and its own report
    if "synther" in args.models:
        t0 = time.time()
        if finished("synther"):
            try:
                synther, synther_normalizer, _ = load_synther(folder, data, device)
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(str(e))
            print("SynthER: already trained, kept")
        else:
            try:
                synther, synther_normalizer = train_synther(args, data, n_train, device, folder, log)
            except FloatingPointError as e:
                raise SystemExit(f"{e}; the last good checkpoint, {folder / 'synther_train.pt'}, is kept (if any)")
            timings["synther_s"] = time.time() - t0
        t0 = time.time()
        checks = synther_report(args, data, n_train, synther, synther_normalizer, device, folder, log)["checks"]
        timings["synther_report_s"] = time.time() - t0
        print(
            f"SynthER's generated transitions ({checks['checked_transitions']:,} checked against the real "
            "simulator): " + ", ".join(f"{k} {v:.4g}" for k, v in checks.items() if k != "checked_transitions")
        )

    if not set(DYDIFF_MODELS) <= set(args.models):
        if set(DYDIFF_MODELS) & set(args.models):
            print(f"made {', '.join(sorted(set(args.models)))} in {folder}; the model report needs all three models")
        else:
            done = "measured" if args.report_only else "made"
            print(f"{done} synther in {folder}; its report: {folder / 'synther_report.json'}")
        print(f"timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        if wandb_run is not None:
            wandb_run.finish()
        raise SystemExit(0)

    # 5. Report
    t0 = time.time()
    report = model_report(args, data, held_segs, denoiser, normalizer, dynamics, reward_model, device, folder, log)
    timings["report_s"] = time.time() - t0
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "dm_heldout_loss",
                    "reward_heldout_mse",
                    "dynamics_heldout_mse_per_member",
                    f"state_error_at_{args.rollout_length - 1}",
                )
            },
            indent=1,
        )
    )
    print(
        "one-step error of generated transitions vs the real simulator, by position in the window "
        "(generated / copy s_t / ensemble; middle: the middle half of the positions):"
    )
    for stat, key in (("mean", "one_step_error"), ("median", "one_step_error_median")):
        for name, kinds in report[key].items():
            r = report["one_step_first_over_middle"][name][stat]
            print(
                f"  {stat}, {name}: "
                + ", ".join(
                    f"{p} {kinds['generated'][p]:.4g} / {kinds['copy'][p]:.4g} / {kinds['ensemble'][p]:.4g}"
                    for p in kinds["generated"]
                )
                + f"; first / middle {r['ratio']:.2f}x (90 % interval {r['low']:.2f}-{r['high']:.2f})"
            )
    print(f"timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    print(f"models, report.json and report.png in {folder}")
    if wandb_run is not None:
        wandb_run.finish()
