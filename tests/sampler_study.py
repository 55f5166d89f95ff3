# Docs: docs/performance.md, section "Sampler steps and churn: what accuracy they buy"
"""What the DM's sampler settings cost and what they buy: error against the real simulator vs network FLOPs.

    python tests/sampler_study.py --models-dirs models-cpu          # the CPU models of docs/pretrained-models.md
    python tests/sampler_study.py --models-dirs models-cpu models-cpu-dim16 --json-out study.json --plot study.png

For each pretrained DM (one per --models-dirs folder, all for --env-id) and each sampler configuration
(N steps x S_churn) it samples the same held-out windows, with the same noise seeds, and measures the
mean squared state error at horizons 1, 50 and L-1:
  * dataset: the dataset's own actions; ground truth the dataset's states;
  * policy M=1, M=2: a fixed random policy (not the behaviour policy) refines the actions M times,
    a_t = pi(s_t), as in a DyDiff rollout; ground truth the real simulator replaying each window's actions.
Cost per window and refinement iteration: network evaluations (2N - 1, Heun), FLOPs (counted per operator)
and wall seconds on this machine. The paper's U-Net (dim 128, mults 1 4 8; untrained) is listed by FLOPs
and parameters. The paper's sampler is N = 34, S_churn = 60 (Table 3). A configuration "holds" when every
error at horizons 50 and L-1 is within --tolerance of the paper sampler's on the same model.
Not collected by pytest (the name does not start with test_).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.checkpoints import load_dm, load_dynamics, models_folder
from common.datasets import gather_windows, load_dataset, segment_windows
from common.edm import (
    build_denoiser,
    refine_states,
)
from common.envs import replay_actions
from pretrain_models import RandomPolicy, split_segments, state_error

PAPER = (34, 60.0)  # Table 3: N, S_churn


@dataclass
class Args:
    models_dirs: tuple[str, ...] = ("models-cpu",)
    """models folders (each holds {env_id}/dm.pt, dynamics.pt), e.g. one per U-Net width"""
    env_id: str = "maze2d-umaze"
    """the dataset the models were trained on"""
    steps: tuple[int, ...] = (34, 18, 12, 8)
    """N values (sampler steps)"""
    churn: tuple[float, ...] = (60.0, 0.0)
    """S_churn values (60: the paper's; 0: EDM's deterministic Heun sampler)"""
    windows: int = 256
    """held-out windows sampled per configuration"""
    seeds: int = 2
    """noise seeds per configuration; errors are averaged over them (their spread is printed)"""
    tolerance: float = 0.10
    """a configuration holds when its errors at horizons 50 and L-1 are at most (1 + tolerance) x the paper's"""
    timing_repeats: int = 3
    """timed sampler calls per configuration (the median is reported)"""
    seed: int = 0
    """picks the windows"""
    json_out: Optional[str] = None
    """write every figure to this JSON file"""
    plot: Optional[str] = None
    """write the error-vs-cost frontier to this PNG"""


def forward_flops(denoiser, L, C):
    """FLOPs of one denoiser call on one window [1, L, C] (a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        denoiser(torch.zeros(1, L, C), torch.ones(1))
    return counter.get_total_flops()


def pick_windows(data, holdout_fraction, L, n, seed):
    """n full-length held-out windows: s_0 [n, S], actions [n, L, A], states [n, L, S]; and the goal context."""
    _, held_segs, _ = split_segments(data, holdout_fraction)
    starts, lengths = segment_windows(*held_segs, L)
    full = np.flatnonzero(lengths == L)
    pick = np.random.default_rng(seed).choice(full, size=min(n, len(full)), replace=False)
    S = data.state_dim
    x, _ = gather_windows(
        data.observations[:, :S], data.actions, data.next_observations[:, :S], starts[pick], lengths[pick], L
    )
    x = torch.as_tensor(x)
    return x[..., :S], x[..., S:], torch.as_tensor(data.observations[starts[pick], S:])


def measure(args, data, folder):
    """Errors and costs of every sampler configuration on the DM in `folder`."""
    denoiser, normalizer, info = load_dm(folder, data.fingerprint)
    dynamics = load_dynamics(folder, data.fingerprint)
    S, A, L = data.state_dim, data.action_dim, info["horizon"]
    true_states, acts, context = pick_windows(data, info["args"]["holdout_fraction"], L, args.windows, args.seed)
    s0 = true_states[:, 0]
    env = data.make_eval_env()
    policy = RandomPolicy(data.observations.mean(0), data.observations.std(0) + 1e-6, A, seed=1)
    # The first actions come from the ensemble's rollout with the policy, as in the report and in DyDiff.
    _, first_actions = dynamics.rollout(policy, s0, L, context=context, generator=torch.Generator().manual_seed(0))
    replayed = {}

    def replay(actions):
        key = actions.numpy().tobytes()
        if key not in replayed:  # the first iteration's actions are the same for every configuration
            replayed[key] = np.stack([replay_actions(env, data.task, s.numpy(), a.numpy()) for s, a in zip(s0, actions)])
        return replayed[key]

    flops = forward_flops(denoiser, L, S + A)
    horizons = [1, L // 2, L - 1]
    points = []
    configs = [(N, churn) for N in args.steps for churn in args.churn]
    for N, churn in configs + ([PAPER] if PAPER not in configs else []):  # the paper's sampler is the reference
        errors = {"dataset": [], "policy_M1": [], "policy_M2": []}
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(1000 + seed)
            dm = refine_states(denoiser, normalizer, s0, acts, N, churn, gen)
            errors["dataset"].append(state_error(dm, true_states))
            actions = first_actions
            for k in (1, 2):
                states_k = refine_states(denoiser, normalizer, s0, actions, N, churn, gen)
                errors[f"policy_M{k}"].append(state_error(states_k, replay(actions)))
                obs_k = torch.cat([states_k, context[:, None].expand(-1, L, -1)], dim=-1).float()
                actions = policy(obs_k.reshape(-1, data.obs_dim)).reshape(-1, L, A)
        gen = torch.Generator().manual_seed(0)
        times = []
        for _ in range(args.timing_repeats):
            t0 = time.perf_counter()
            refine_states(denoiser, normalizer, s0, acts, N, churn, gen)
            times.append(time.perf_counter() - t0)
        point = dict(
            dim=info["dim"],
            dim_mults=info["dim_mults"],
            steps=N,
            churn=churn,
            nfe=2 * N - 1,
            gflops_per_window=(2 * N - 1) * flops / 1e9,
            ms_per_window=1e3 * float(np.median(times)) / len(s0),
            windows=len(s0),
            seeds=args.seeds,
        )
        for name, runs in errors.items():
            runs = np.stack(runs)  # [seeds, L]
            for t in horizons:
                point[f"{name}@{t}"] = float(runs[:, t].mean())
                point[f"{name}@{t}_spread"] = float(runs[:, t].max() - runs[:, t].min())
        points.append(point)
        print(
            f"  dim {info['dim']} N {N:2d} churn {churn:4g}: "
            + ", ".join(f"{name}@{t} {point[f'{name}@{t}']:.4g}" for name in errors for t in horizons[1:])
            + f"; {point['gflops_per_window']:.3g} GFLOP/window, {point['ms_per_window']:.1f} ms/window",
            flush=True,
        )
    env.close()
    params = sum(p.numel() for p in denoiser.parameters())
    return dict(
        folder=str(folder),
        dim=info["dim"],
        dim_mults=info["dim_mults"],
        params=params,
        horizon=L,
        gflops_per_forward=flops / 1e9,
        dm_steps=info["steps"],
        points=points,
        horizons=horizons,
    )


def holds(point, paper, horizons, tolerance):
    keys = [f"{name}@{t}" for name in ("dataset", "policy_M1", "policy_M2") for t in horizons[1:]]
    return all(point[k] <= (1 + tolerance) * paper[k] for k in keys)


def main(args: Args):
    torch.set_grad_enabled(False)
    first = models_folder(args.models_dirs[0], args.env_id)
    dataset_steps = torch.load(first / "dm.pt", map_location="cpu", weights_only=False)["args"]["dataset_steps"]
    data = load_dataset(args.env_id, dataset_steps=dataset_steps, progress=False)
    results = []
    for models_dir in args.models_dirs:
        folder = models_folder(models_dir, args.env_id)
        print(f"{folder}:", flush=True)
        results.append(measure(args, data, folder))
    L = results[0]["horizon"]
    paper_net = build_denoiser(data.state_dim, data.action_dim)
    paper = dict(
        params=sum(p.numel() for p in paper_net.parameters()),
        gflops_per_forward=forward_flops(paper_net, L, data.state_dim + data.action_dim) / 1e9,
    )

    h = results[0]["horizons"]
    print(
        f"\nSampler study on {args.env_id}: {args.windows} held-out windows of L = {L}, {args.seeds} noise seeds; "
        f"mean squared state error (sum over the state's dimensions) vs the real simulator.\n"
    )
    print(
        "| U-Net | N | S_churn | net evals | GFLOP/window | ms/window (this CPU) | dataset @1 | "
        + " | ".join(f"{name} @{t}" for name in ("dataset", "policy M=1", "policy M=2") for t in h[1:])
        + " | holds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ref = next(p for p in r["points"] if (p["steps"], p["churn"]) == PAPER)
        for p in r["points"]:
            p["holds"] = holds(p, ref, h, args.tolerance)
            p["flops_vs_paper_sampler"] = ref["gflops_per_window"] / p["gflops_per_window"]
            cells = [f"{p[f'dataset@{h[0]}']:.3g}"] + [
                f"{p[f'{n}@{t}']:.3g}" for n in ("dataset", "policy_M1", "policy_M2") for t in h[1:]
            ]
            print(
                f"| dim {r['dim']} ({r['params'] / 1e6:.2f}M) | {p['steps']} | {p['churn']:g} | {p['nfe']} | "
                f"{p['gflops_per_window']:.3g} | {p['ms_per_window']:.1f} | "
                + " | ".join(cells)
                + f" | {'yes' if p['holds'] else 'no'} |"
            )
    for N in sorted(set(args.steps) | {PAPER[0]}, reverse=True):
        print(
            f"| paper, dim 128 ({paper['params'] / 1e6:.1f}M), untrained | {N} | | {2 * N - 1} | "
            f"{(2 * N - 1) * paper['gflops_per_forward']:.1f} | | | | | | | | | |"
        )
    print("\n(spreads over seeds are in the JSON)")
    for r in results:
        ok = [p for p in r["points"] if p["holds"]]
        best = min(ok, key=lambda p: p["gflops_per_window"])
        print(
            f"dim {r['dim']}: cheapest sampler within {args.tolerance:.0%} of the paper sampler's errors: "
            f"N = {best['steps']}, S_churn = {best['churn']:g} ({best['flops_vs_paper_sampler']:.1f}x fewer FLOPs)"
        )

    out = dict(
        env_id=args.env_id,
        windows=args.windows,
        seeds=args.seeds,
        tolerance=args.tolerance,
        paper_sampler=dict(steps=PAPER[0], churn=PAPER[1]),
        paper_unet=paper,
        models=results,
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(out, args.plot)
    return out


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("dataset", "policy_M1")):
        for r in out["models"]:
            t = r["horizons"][-1]
            for churn, marker in ((60.0, "o"), (0.0, "s")):
                pts = sorted((p for p in r["points"] if p["churn"] == churn), key=lambda p: p["gflops_per_window"])
                if pts:
                    ax.plot(
                        [p["gflops_per_window"] for p in pts],
                        [p[f"{key}@{t}"] for p in pts],
                        marker=marker,
                        label=f"dim {r['dim']}, S_churn {churn:g}",
                    )
                    for p in pts:
                        ax.annotate(f"N={p['steps']}", (p["gflops_per_window"], p[f"{key}@{t}"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("network GFLOP per window and iteration")
        ax.set_ylabel(f"state error at t = {out['models'][0]['horizons'][-1]}")
        ax.set_title(f"{out['env_id']}: {'dataset actions' if key == 'dataset' else 'random policy, M = 1'}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
