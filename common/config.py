"""The pretraining options the training scripts pass on, and the named presets (`--preset cpu`).

`PretrainConfig` is both the model part of `pretrain_models.py`'s flags (`--dm-dim 32`) and, nested, the
training scripts' (`--pretrain.dm-dim 32`): what they use when they make missing models first.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Optional


@dataclass
class PretrainConfig:
    # Diffusion model (EDM, paper Table 3)
    dm_dim: int = 128
    """width of the temporal U-Net (paper: 128)"""
    dm_dim_mults: tuple[int, ...] = (1, 4, 8)
    """channel multipliers of the U-Net levels (paper: 1 4 8)"""
    dm_steps: int = 100_000
    """DM gradient steps"""
    dm_batch_size: int = 256
    """DM batch size (windows)"""
    dm_lr: float = 2e-4
    """DM learning rate (Adam)"""
    dm_cond_channels: bool = True
    """give the U-Net the clean s_0 (on every row) and actions as extra input channels (paper: no; the paper's
    U-Net is `--no-dm-cond-channels --dm-padding zeros --dm-edge-weight 1`)"""
    dm_padding: Literal["replicate", "zeros"] = "replicate"
    """how the U-Net pads the time axis: replicate (the edge rows) or zeros (paper)"""
    dm_full_res_skip: bool = False
    """feed the U-Net's finest-level features to its output block (paper: no, Diffuser's layout; measured: no gain)"""
    dm_relative_states: bool = False
    """denoise the states relative to s_0, so the prior of every state is s_0 (paper: absolute states)"""
    dm_position_channels: bool = False
    """give the U-Net each row's distance to the window's first and last row as two extra input channels (paper: no)"""
    dm_edge_weight: float = 10.0
    """loss weight of the first and the last generated row, s_1 and s_{L-1} (paper: 1, every row alike)"""
    dm_ema_decay: float = 0.999
    """decay of the EMA copy of the DM weights"""
    sigma_data: float = 0.5
    """sigma_data of EDM; data are min/max scaled to [-1, 1] per dimension"""
    p_mean: float = -1.2
    """P_mean: mean of ln(sigma) during training"""
    p_std: float = 1.2
    """P_std: std of ln(sigma) during training"""
    dm_checkpoint_every: int = 2000
    """DM (and SynthER) steps between resumable checkpoints"""

    # Dynamics ensemble
    dyn_members: int = 7
    """ensemble members"""
    dyn_elites: int = 5
    """elite members, picked by held-out loss"""
    dyn_hidden: int = 200
    """hidden units per layer"""
    dyn_batch_size: int = 256
    """ensemble batch size"""
    dyn_max_epochs: int = 200
    """at most this many epochs (early stopping on a held-out split usually stops it sooner)"""
    dyn_max_steps: int = 0
    """if > 0, at most this many gradient steps"""

    # Reward model
    reward_steps: int = 20_000
    """reward-model gradient steps (at most; early stopping)"""
    reward_batch_size: int = 256
    """reward-model batch size"""

    # SynthER (Lu et al. 2023), the paper's baseline: a diffusion model of single transitions (common/synther.py)
    synther_width: int = 1024
    """width of SynthER's residual MLP (its resmlp_w1024_denoiser.gin, and the DyDiff paper's 6.5M parameters;
    its default resmlp_denoiser.gin: 2048)"""
    synther_depth: int = 6
    """residual blocks of SynthER's MLP (SynthER: 6)"""
    synther_dim_t: int = 128
    """width of SynthER's noise-level embedding and input projection (SynthER: 128)"""
    synther_steps: int = 100_000
    """SynthER gradient steps (SynthER: 100,000)"""
    synther_batch_size: Optional[int] = None
    """SynthER batch size; default SynthER's rule: 1024, or 256 for datasets of fewer than 800k transitions"""
    synther_lr: float = 3e-4
    """SynthER's learning rate (AdamW, betas 0.9/0.99, no weight decay, cosine decay to 0, gradient norm clipped at 1)"""
    synther_ema_decay: float = 0.995
    """decay of the EMA copy of SynthER's weights, updated every 10 steps after the first 100 (SynthER: 0.995)"""

    # Held-out data and the model report
    holdout_fraction: float = 0.05
    """the final fraction of the dataset is held out for the model report"""
    report_windows: int = 128
    """start states (and dataset windows) used by the model report"""
    report_iterations: int = 3
    """M: DM <-> policy refinement iterations measured by the report"""
    synther_report_transitions: int = 10_000
    """transitions SynthER generates for its report, each checked against the real simulator"""

    def dm_network(self) -> dict:
        """The DM's network options, as common.edm.build_denoiser takes them (and dm.pt records them)."""
        return dict(
            dim=self.dm_dim,
            dim_mults=list(self.dm_dim_mults),
            sigma_data=self.sigma_data,
            full_res_skip=self.dm_full_res_skip,
            padding_mode=self.dm_padding,
            cond_channels=self.dm_cond_channels,
            relative_states=self.dm_relative_states,
            position_channels=self.dm_position_channels,
        )

    def synther_network(self) -> dict:
        """SynthER's network options, as common.synther.build_synther takes them (and synther.pt records them)."""
        return dict(width=self.synther_width, depth=self.synther_depth, dim_t=self.synther_dim_t)

    def flags(self) -> list[str]:
        """The pretrain_models.py flags of the values that differ from the defaults."""
        out, default = [], PretrainConfig()
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, tuple):
                out += [flag, *map(str, value)]
            else:
                out += [flag, str(value)]
        return out


# Named configurations: the values a preset sets, unless the command line sets them itself.
# "paper": every default (the paper's sizes, for a GPU). "cpu": what two CPU cores can run in about an hour.
PRESETS = {
    "paper": dict(pretrain={}, run={}),
    "cpu": dict(
        pretrain=dict(
            dm_dim=32,
            dm_dim_mults=(1, 2, 4),
            dm_steps=8000,
            dm_batch_size=64,
            dyn_max_steps=20_000,
            reward_steps=20_000,
            synther_width=256,
            synther_steps=40_000,
            synther_batch_size=256,
        ),
        run=dict(
            models_dir="models-cpu",
            total_steps=20_000,
            eval_freq=5000,
            rollout_freq=2000,
            rollout_batch_size=256,
            synther_samples=5_000_000,
            synther_sampler_steps=32,
        ),
    ),
}


def given_flags(argv) -> set[str]:
    """The --flags given on a command line (`--name value` or `--name=value`)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def apply_preset(target, values: dict, argv, prefix: str = "") -> None:
    """Set each of `values` on `target` unless the command line gave its flag (`--{prefix}{name}`)."""
    given = given_flags(argv)
    for name, value in values.items():
        flag = "--" + prefix + name.replace("_", "-")
        if flag not in given and "--no-" + flag[2:] not in given:
            setattr(target, name, value)


def cpu_command(script: str, env_id: str) -> str:
    """The one-line command of the CPU-scale configuration of `script` for `env_id`."""
    return f"python {script} --env-id {env_id} --preset cpu"


def cpu_cost_line(args, state_dim: int, action_dim: int, script: str) -> str | None:
    """Before anything is pretrained or trained, on a CPU: when the run's DM work comes to an hour or more, one line
    with its projected time (pretraining the DM, if {models_dir}/{env_id}/dm.pt is missing, and the DM sampling of
    its rollouts) and the command of the CPU-scale run; else None. Both are measured on 2 and 8 windows of a DM of
    the configured shape (its weights do not change the cost) and extrapolated linearly: about, not exact. Runs that
    sample nothing from the DM (--no-dydiff, M = 0, --rollout-states simulator-replay or simulator): None.

    Leaves every random state as it was, so the run's draws are the same with or without this measurement.
    """
    import time

    import torch

    from common.checkpoints import models_folder
    from common.edm import MinMaxNormalizer, build_denoiser, edm_loss, refine_states

    if not args.dydiff or args.num_iterations == 0 or args.rollout_states != "dm":
        return None
    c, L = args.pretrain, args.rollout_length
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        denoiser = build_denoiser(state_dim, action_dim, **c.dm_network())
        gen = torch.Generator().manual_seed(0)
        C = state_dim + action_dim
        normalizer = MinMaxNormalizer(-torch.ones(C), torch.ones(C))
        cond = torch.zeros(L, C, dtype=torch.bool)
        cond[0, :state_dim], cond[:, state_dim:] = True, True

        def seconds(windows, train):
            """One DM training step (forward and backward), or one network evaluation of the sampler, on `windows`."""
            t0 = time.perf_counter()
            if train:
                edm_loss(denoiser, torch.zeros(windows, L, C), cond, generator=gen).backward()
                return time.perf_counter() - t0
            with torch.no_grad():  # 2 sampler steps: 3 network evaluations
                refine_states(
                    denoiser, normalizer, torch.zeros(windows, state_dim), torch.zeros(windows, L, action_dim), 2, 0.0, gen
                )
            return (time.perf_counter() - t0) / 3

        def per_call(train, batch):
            """Seconds of one call on `batch` windows: a fixed part and a part per window, fitted on 2 and 8 windows
            (a CPU spends much of a small batch on overhead, so scaling 2 windows up would overstate a big batch)."""
            seconds(2, train)  # warm-up
            t2, t8 = (min(seconds(n, train) for _ in range(3)) for n in (2, 8))  # the least disturbed of 3
            per_window = max((t8 - t2) / 6, 0.0)
            return max(t2 - 2 * per_window, 0.0) + per_window * batch

        sample_call = per_call(False, args.rollout_batch_size)
        train_hours = 0.0
        if not (models_folder(args.models_dir, args.env_id) / "dm.pt").exists():
            train_hours = per_call(True, c.dm_batch_size) * c.dm_steps / 3600
    rollouts = -(-args.total_steps // args.rollout_freq)
    sample_hours = rollouts * (2 * args.sampler_steps - 1) * args.num_iterations * sample_call / 3600
    if train_hours + sample_hours < 1:
        return None
    parts = f"pretraining the DM {train_hours:,.1f} h, then " if train_hours else ""
    advice = "" if args.preset == "cpu" else f". A run sized for two CPU cores: {cpu_command(script, args.env_id)}"
    return (
        f"no GPU: this run's DM work takes about {train_hours + sample_hours:,.1f} h on this CPU ({parts}the DM "
        f"sampling of {rollouts:,} rollout steps of {args.rollout_batch_size:,} windows {sample_hours:,.1f} h; measured "
        f"on 2 and 8 windows; the updates come on top){advice}"
    )
