# Docs: docs/performance.md
"""Speed of DyDiff's parts, printed as tables: denoiser, sampler, rollout step, TD3+BC update, whole-run projection.

    python tests/benchmark.py                # small sizes on CPU, the paper's sizes on a GPU (--size picks)
    python tests/benchmark.py --size full --json-out bench.json
    python tests/benchmark.py --sections evaluation ensemble   # vectorized evaluation, elites-only predict

The models have random weights: speed does not depend on what they learned. Shapes are maze2d's (state 4,
goal 2, action 2). Every variant (bf16, torch.compile, sync-free insert) is measured in the same run as its
baseline. Not collected by pytest (the name does not start with test_).
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.buffer import SyntheticBuffer
from common.checkpoints import load_model_file
from common.cudagraphs import cuda_graphed
from common.dynamics import EnsembleDynamics, RewardModel
from common.edm import EDMPrecond, MinMaxNormalizer, TemporalUnet, condition_mask, edm_sampler, refine_states
from common.envs import evaluate, flatten_obs, numpy_policy, termination_fn, vector_env
from dydiff_td3bc import Actor, Critic, alive_mask, filter_trajectories, make_update_fns, mixed_batch

S, CONTEXT, A = 4, 2, 2  # maze2d: physical state (x, y, vx, vy), goal (x, y), force (fx, fy)
OBS = S + CONTEXT

SIZES = {  # what --size picks; the paper's values are the "full" ones (Tables 3 and 4)
    "full": dict(
        dm_dim=128,
        dm_dim_mults=(1, 4, 8),
        rollout_batch_size=2048,
        real_size=1_000_000,
        synthetic_size=2_000_000,
        update_steps=2000,
        repeats=3,
    ),
    "small": dict(
        dm_dim=32,
        dm_dim_mults=(1, 2, 4),
        rollout_batch_size=256,
        real_size=100_000,
        synthetic_size=200_000,
        update_steps=300,
        repeats=2,
    ),
}
DENOISERS = [(128, (1, 4, 8)), (64, (1, 4, 8)), (64, (1, 2, 4)), (32, (1, 4, 8)), (32, (1, 2, 4))]


@dataclass
class Args:
    size: Literal["auto", "small", "full"] = "auto"
    """full: the paper's sizes (59M-parameter U-Net, B_r 2048); small: CPU sizes; auto: full on a GPU"""
    cuda: bool = True
    """use the GPU when there is one"""
    sections: tuple[str, ...] = ("forward", "sampler", "rollout", "update", "projection", "denoisers")
    """what to measure (projection needs rollout and update); also evaluation, ensemble and simulator, not run by
    default"""
    dm_dim: Optional[int] = None
    """U-Net width (default: by --size)"""
    dm_dim_mults: Optional[tuple[int, ...]] = None
    """U-Net level multipliers (default: by --size)"""
    rollout_batch_size: Optional[int] = None
    """B_r (default: by --size)"""
    rollout_length: int = 100
    """L"""
    sampler_steps: int = 34
    """N: EDM sampler steps (2N - 1 network evaluations per sample; paper Table 3: 34)"""
    sampler_churn: float = 60.0
    """S_churn of the sampler (paper Table 3: 60)"""
    average_with_previous: bool = False
    """the rollout averages new DM states with the previous iteration's, as the scripts' flag of that name"""
    num_iterations: tuple[int, ...] = (1, 2)
    """M values for the sampler figures; the rollout and the projection use the first"""
    repeats: Optional[int] = None
    """timed repetitions of each measurement (the median is reported; default: by --size)"""
    compile: bool = True
    """also measure torch.compile variants (the first call compiles, which takes a minute or more)"""
    variants: tuple[str, ...] = ()
    """only these denoiser variants ("fp32 eager", "bf16 eager", "fp32 compiled", "bf16 compiled") in the forward,
    sampler and rollout figures; default: every one that --bf16 and --compile give"""
    bf16: Literal["auto", "on", "off"] = "auto"
    """also measure bf16 autocast variants: on, off, or auto (on a GPU only)"""
    total_steps: int = 1_000_000
    """gradient steps of the projected run"""
    rollout_freq: int = 500
    """gradient steps between rollout steps, for the projection"""
    eval_freq: int = 5000
    """steps between evaluations, for the projection"""
    eval_episodes: int = 10
    """episodes per evaluation, for the projection and the evaluation section"""
    eval_maze: Literal["umaze", "medium", "large"] = "umaze"
    """PointMaze layout of the evaluation section"""
    dm_train_steps: int = 100_000
    """DM pretraining steps, for the projection"""
    models_dirs: tuple[str, ...] = ()
    """pretrained-model folders (e.g. models/maze2d-large) whose report.json errors join the denoiser table"""
    json_out: Optional[str] = None
    """also write every figure to this JSON file"""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=1):
    """Median wall seconds of fn() over `repeats` calls after `warmup` untimed ones (device work included)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attempt(name, fn):
    """fn()'s result, or None after one line saying why this variant failed (the others are still measured)."""
    try:
        return fn()
    except Exception as e:  # a compiler or graph-capture failure must not hide the baseline figures
        print(f"\n{name}: failed, left out ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None


def forward_flops(net, x, noise):
    """FLOPs of one forward pass, counted per operator (a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, noise)
    return counter.get_total_flops()


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def make_denoiser(dim, dim_mults, device):
    return EDMPrecond(TemporalUnet(S + A, dim=dim, dim_mults=dim_mults)).to(device).eval().requires_grad_(False)


def table(title, header, rows):
    """Print a Markdown table (so the output pastes into docs/performance.md as it is)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


# ---------------------------------------------------------------------------------------------- sections


def bench_forward(args, device, denoiser, variants, results):
    """Bare network F on B_r windows: windows/s and achieved TFLOP/s, for each variant."""
    B, L = args.rollout_batch_size, args.rollout_length
    x, noise = torch.randn(B, L, S + A, device=device), torch.zeros(B, device=device)
    flops = forward_flops(denoiser.net, x, noise)
    rows, out = [], {"flops_per_window": flops / B}
    for name, (net, bf16) in variants(denoiser.net).items():

        def fwd():
            with torch.no_grad(), autocast(device, bf16):
                net(x, noise)

        t = attempt(name, lambda: timed(fwd, device, 5 * args.repeats))
        if t is None:
            continue
        out[name] = dict(seconds=t, windows_per_s=B / t, tflops=flops / t / 1e12)
        rows.append([name, f"{B / t:,.0f}", f"{flops / t / 1e12:.3f}"])
    table(
        f"Denoiser forward (F only), batch {B} x L {L}, {flops / B / 1e9:.3f} GFLOP per window",
        ["variant", "windows/s", "TFLOP/s"],
        rows,
    )
    results["forward"] = out


def bench_sampler(args, device, denoiser, variants, results):
    """edm_sampler (Alg. 2) on B_r windows: transitions/s at each M, and its speed vs the bare network's.

    The ratio compares one sample with 2N - 1 bare forward passes of F on the same batch, timed alternately
    (so drifting clock speeds hit both alike): 1.0 means no time is lost around the network.
    """
    B, L, N = args.rollout_batch_size, args.rollout_length, args.sampler_steps
    cond = torch.randn(B, L, S + A, device=device).clamp(-1, 1)
    x, noise = torch.randn(B, L, S + A, device=device), torch.zeros(B, device=device)
    mask = condition_mask(L, S, A, device=device)
    evals = 2 * N - 1
    rows, out = [], {}
    for name, (net, bf16) in variants(denoiser.net).items():
        d = EDMPrecond(net, denoiser.sigma_data)

        def sample():
            with autocast(device, bf16):
                edm_sampler(d, cond, mask, num_steps=N)

        def bare():
            with torch.no_grad(), autocast(device, bf16):
                for _ in range(evals):
                    net(x, noise)

        pairs = attempt(
            name,
            lambda: [
                (timed(sample, device, 1, warmup=int(i == 0)), timed(bare, device, 1, warmup=int(i == 0)))
                for i in range(args.repeats)
            ],
        )
        if pairs is None:
            continue
        t = statistics.median(p[0] for p in pairs)
        ratio = statistics.median(p[1] / p[0] for p in pairs)
        out[name] = dict(
            seconds=t,
            ratio_to_forward=ratio,
            **{f"transitions_per_s_M{m}": B * (L - 1) / (m * t) for m in args.num_iterations},
        )
        rows.append([name, f"{t:.3f}", *(f"{B * (L - 1) / (m * t):,.0f}" for m in args.num_iterations), f"{ratio:.3f}"])
    table(
        f"Sampler, B_r {B}, L {L}, N {N} ({evals} network evaluations per sample)",
        ["variant", "s per sample", *(f"transitions/s M={m}" for m in args.num_iterations), "speed vs bare forward passes"],
        rows,
    )
    results["sampler"] = out


def rollout_parts(args, device):
    """Random-weight models of the paper's sizes: ensemble (7 x 4 x 200), reward MLP, TD3+BC actor."""
    dynamics = EnsembleDynamics(S, A, num_members=7, num_elites=5, hidden=200).to(device)
    reward_model = RewardModel(OBS, A).to(device)
    actor = Actor(OBS, A, 1.0).to(device)
    return dynamics, reward_model, actor


def bench_rollout(args, device, denoiser, variants, results):
    """One DyDiff rollout step, phase by phase (synchronised between phases), then whole (no syncs inside)."""
    B, L, M, N = args.rollout_batch_size, args.rollout_length, args.num_iterations[0], args.sampler_steps
    dynamics, reward_model, actor = rollout_parts(args, device)
    real_obs = torch.randn(args.real_size, OBS, device=device)
    is_terminal = termination_fn("pointmaze")
    gen = torch.Generator(device=device).manual_seed(0)
    synthetic = SyntheticBuffer(args.synthetic_size, OBS, A, device)
    net, bf16 = variants(denoiser.net)[args.rollout_variant]
    d = EDMPrecond(net, denoiser.sigma_data)
    normalizer = MinMaxNormalizer(-torch.ones(S + A), torch.ones(S + A)).to(device)  # random data: identity scaling

    def rollout(timer, masked_insert=True):
        """The rollout block of the training scripts, with their functions; timer(name) closes the phase that ended."""
        with torch.no_grad():
            idx = torch.randint(len(real_obs), (B,), device=device, generator=gen)
            s0, context = real_obs[idx, :S], real_obs[idx, S:]
            timer("start states")
            states, actions = dynamics.rollout(actor, s0, L, context=context, generator=gen)
            timer("ensemble rollout")
            for _ in range(M):
                new_states = refine_states(d, normalizer, s0, actions, N, args.sampler_churn, gen, bf16=bf16)
                states = 0.5 * (states + new_states) if args.average_with_previous else new_states
                timer("DM sampling")
                obs = torch.cat([states, context[:, None].expand(B, L, -1)], dim=-1)
                actions = actor(obs.reshape(B * L, OBS)).reshape(B, L, A)
                timer("relabelling")
            obs = torch.cat([states, context[:, None].expand(B, L, -1)], dim=-1)
            rewards = reward_model(obs[:, :-1].reshape(-1, OBS), actions[:, :-1].reshape(-1, A)).reshape(B, L - 1)
            dones = is_terminal(states[:, 1:]).float()
            alive = alive_mask(dones)
            scores = (rewards * alive).sum(dim=1)
            timer("rewards")
            keep = filter_trajectories(scores, 0.6, "softmax", 0.05, gen)
            timer("filter")
            if masked_insert:
                synthetic.add(
                    obs[keep, :-1].flatten(0, 1),
                    actions[keep, :-1].flatten(0, 1),
                    rewards[keep].flatten(),
                    obs[keep, 1:].flatten(0, 1),
                    dones[keep].flatten(),
                    valid=alive[keep].flatten().bool(),
                )
            else:  # boolean indexing: the host waits for the device to learn the count
                valid = alive[keep].bool()
                synthetic.add(
                    obs[keep, :-1][valid],
                    actions[keep, :-1][valid],
                    rewards[keep][valid],
                    obs[keep, 1:][valid],
                    dones[keep][valid],
                )
            timer("buffer insert")

    phases = {}

    def phase_timer():
        last = [time.perf_counter()]

        def timer(name):
            sync(device)
            now = time.perf_counter()
            phases.setdefault(name, []).append(now - last[0])
            last[0] = now

        return timer

    rollout(lambda name: None)  # warm-up (and compilation)
    for _ in range(args.repeats):
        rollout(phase_timer())
    parts = {k: statistics.median(v) for k, v in phases.items()}
    whole = timed(lambda: rollout(lambda name: None), device, args.repeats, warmup=0)
    phases.clear()
    for _ in range(args.repeats):
        rollout(phase_timer(), masked_insert=False)
    bool_insert = statistics.median(phases["buffer insert"])
    total = sum(parts.values())
    rows = [[k, f"{v * 1000:,.1f}", f"{v / total:.1%}"] for k, v in parts.items()]
    rows.append(["sum of phases", f"{total * 1000:,.1f}", "100%"])
    rows.append(["whole step, no syncs inside", f"{whole * 1000:,.1f}", ""])
    rows.append(["buffer insert with boolean indexing (before)", f"{bool_insert * 1000:,.1f}", ""])
    table(f"Rollout step, B_r {B}, L {L}, M {M}, N {N}, denoiser {args.rollout_variant}", ["phase", "ms", "share"], rows)
    results["rollout"] = dict(phases_s=parts, whole_s=whole, boolean_insert_s=bool_insert, variant=args.rollout_variant)


def bench_update(args, device, results):
    """TD3+BC gradient steps/s: real batches only (the base algorithm) and mixed with D_syn, eager and compiled."""
    from types import SimpleNamespace

    hp = SimpleNamespace(policy_noise=0.2, noise_clip=0.5, gamma=0.99, alpha=2.5, tau=0.005)
    n = args.real_size
    real = dict(
        obs=torch.randn(n, OBS, device=device),
        actions=torch.rand(n, A, device=device) * 2 - 1,
        rewards=torch.rand(n, device=device),
        next_obs=torch.randn(n, OBS, device=device),
        dones=torch.zeros(n, device=device),
    )
    full = SyntheticBuffer(args.synthetic_size, OBS, A, device)
    full.add(
        torch.randn(args.synthetic_size, OBS, device=device),
        torch.rand(args.synthetic_size, A, device=device),
        torch.rand(args.synthetic_size, device=device),
        torch.randn(args.synthetic_size, OBS, device=device),
        torch.zeros(args.synthetic_size, device=device),
    )
    empty = SyntheticBuffer(1, OBS, A, device)
    gen = torch.Generator(device=device).manual_seed(0)
    mean, std = torch.zeros(OBS, device=device), torch.ones(OBS, device=device)

    def trainer(variant):
        graphs = variant == "CUDA graphs"
        actor, actor_t = Actor(OBS, A, 1.0).to(device), Actor(OBS, A, 1.0).to(device)
        qs = [Critic(OBS, A).to(device) for _ in range(4)]
        q_opt = torch.optim.Adam(list(qs[0].parameters()) + list(qs[1].parameters()), lr=3e-4, capturable=graphs)
        a_opt = torch.optim.Adam(actor.parameters(), lr=3e-4, capturable=graphs)
        fns = make_update_fns(actor, qs[0], qs[1], actor_t, qs[2], qs[3], q_opt, a_opt, hp, 1.0, mean, std)
        if variant == "compiled":
            return tuple(torch.compile(f) for f in fns)
        if graphs:
            return tuple(cuda_graphed(f, (actor, actor_t, *qs), (q_opt, a_opt)) for f in fns)
        return fns

    variants = ["eager"] + ["compiled"] * args.compile + ["CUDA graphs"] * (device.type == "cuda")
    rows, out = [], {}

    def steps_per_s(variant, buffer):
        update_critic, update_actor = trainer(variant)

        def steps(k):
            for i in range(k):
                batch, _ = mixed_batch(real, buffer, 256, 0.6, gen)
                update_critic(batch)
                if i % 2 == 0:
                    update_actor(batch)

        steps(20)  # warm-up (and compilation, graph capture)
        return args.update_steps / timed(lambda: steps(args.update_steps), device, 1, warmup=0)

    for name in variants:
        mixes = (("real only", empty), ("mixed with D_syn", full))
        measured = attempt(name, lambda: [(mix, steps_per_s(name, buffer)) for mix, buffer in mixes])
        for mix, sps in measured or []:
            out[f"{name}/{mix}"] = sps
            rows.append([name, mix, f"{sps:,.0f}", f"{1000 / sps:.3f}"])
    table("TD3+BC gradient steps, batch 256 (policy delay 2)", ["variant", "batch", "steps/s", "ms per step"], rows)
    results["update"] = out


def bench_eval(device, episodes_steps=800):
    """Seconds per evaluation env step on maze2d-large (MuJoCo + one policy call on a single observation)."""
    from common.envs import flatten_obs
    from common.pointmaze import make_eval_env

    env = make_eval_env("large")
    actor = Actor(OBS, A, 1.0).to(device)
    obs, _ = env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(episodes_steps):
        with torch.no_grad():
            a = actor(torch.as_tensor(flatten_obs(obs), dtype=torch.float32, device=device)[None])[0].cpu().numpy()
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    return (time.perf_counter() - t0) / episodes_steps


def bench_evaluation(args, device, results):
    """One evaluation of `eval_episodes` PointMaze episodes: one env, episode after episode, the policy on one
    observation per call (the loop evaluate ran before) vs all episodes as one vector env, one batched call per step."""
    from common.pointmaze import make_eval_env

    actor = Actor(OBS, A, 1.0).to(device).eval()
    n, seed = args.eval_episodes, 0

    def sequential(env):
        returns = []
        for ep in range(n):
            obs, _ = env.reset(seed=seed + ep)
            total, done = 0.0, False
            while not done:
                with torch.no_grad():
                    a = actor(torch.as_tensor(flatten_obs(obs), dtype=torch.float32, device=device)[None])[0].cpu().numpy()
                obs, reward, terminated, truncated, _ = env.step(a)
                total += reward
                done = terminated or truncated
            returns.append(total)
        return returns

    def vectorized(envs):
        with torch.no_grad():
            return evaluate(numpy_policy(actor, device), envs, seed, 0.0, 1.0)[0].tolist()

    t0 = time.perf_counter()
    env = make_eval_env(args.eval_maze)
    make_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    envs = vector_env(lambda: make_eval_env(args.eval_maze), n)
    make_vector = time.perf_counter() - t0
    same = sequential(env) == vectorized(envs)
    t_seq = timed(lambda: sequential(env), device, args.repeats, warmup=0)
    t_vec = timed(lambda: vectorized(envs), device, args.repeats, warmup=0)
    steps = env.spec.max_episode_steps
    table(
        f"Evaluation, {n} maze2d-{args.eval_maze} episodes of {steps} steps, TD3+BC actor (2 x 256); "
        f"returns identical: {same}",
        ["loop", "s per evaluation", "env creation s (once per run)"],
        [
            ["sequential, one observation per policy call", f"{t_seq:.3f}", f"{make_one:.3f}"],
            [f"vector env, one batched policy call per step ({n} rows)", f"{t_vec:.3f}", f"{make_vector:.3f}"],
            ["speed-up", f"{t_seq / t_vec:.2f}x", ""],
        ],
    )
    results["evaluation"] = dict(
        sequential_s=t_seq,
        vectorized_s=t_vec,
        speedup=t_seq / t_vec,
        same_returns=same,
        env_creation_s=make_one,
        vector_env_creation_s=make_vector,
    )
    env.close()
    envs.close()


def bench_simulator(args, device, results):
    """The real PointMaze dynamics of the ablations (--rollout-states): one env step after another in Python (the
    checks' replay_actions) vs the whole batch per step in C (BatchedSimulator); and a closed-loop rollout of B_r."""
    from common.envs import replay_actions
    from common.pointmaze import BatchedSimulator, make_eval_env

    env = make_eval_env(args.eval_maze)
    sim = BatchedSimulator(env)
    B, L = args.rollout_batch_size, args.rollout_length
    gen = torch.Generator().manual_seed(0)
    s0 = torch.cat([torch.rand(B, 2, generator=gen) * 2 - 1, torch.zeros(B, 2)], 1)  # near the maze's centre
    actions = torch.rand(B, L, 2, generator=gen) * 2 - 1
    loop_n = min(B, 16)
    t_loop = timed(
        lambda: [replay_actions(env, "pointmaze", s, a) for s, a in zip(s0[:loop_n].numpy(), actions.numpy())],
        torch.device("cpu"),
        args.repeats,
    )
    t_batch = timed(lambda: sim.replay(s0, actions), torch.device("cpu"), args.repeats)
    actor = Actor(4, A, 1.0).to(device).eval()
    s0_dev = s0.to(device)
    with torch.no_grad():
        t_closed = timed(lambda: sim.rollout(actor, s0_dev, L), device, args.repeats)
    per_loop, per_batch = t_loop / (loop_n * (L - 1)), t_batch / (B * (L - 1))
    table(
        f"Real PointMaze dynamics (maze2d-{args.eval_maze}), B_r {B}, L {L}",
        ["what", "s", "us per state step"],
        [
            [f"replay, Python loop of env.step ({loop_n} trajectories)", f"{t_loop:.3f}", f"{per_loop * 1e6:.1f}"],
            ["replay, BatchedSimulator (mujoco.rollout)", f"{t_batch:.3f}", f"{per_batch * 1e6:.1f}"],
            [
                "closed-loop rollout with a TD3+BC actor (--rollout-states simulator)",
                f"{t_closed:.3f}",
                f"{t_closed / (B * (L - 1)) * 1e6:.1f}",
            ],
            ["speed-up of the batched replay", f"{per_loop / per_batch:.1f}x", ""],
        ],
    )
    results["simulator"] = dict(
        loop_us_per_step=per_loop * 1e6, batched_us_per_step=per_batch * 1e6, closed_loop_rollout_s=t_closed
    )
    env.close()


def predict_all_members(dynamics, s, a, deterministic, generator):
    """EnsembleDynamics.predict as it was before computing the elites only: every member, then a pick per row."""
    mean, logvar = dynamics(s, a)
    rows = torch.arange(len(s), device=s.device)
    member = dynamics.elites[torch.randint(dynamics.num_elites, (len(s),), generator=generator, device=s.device)]
    delta = mean[member, rows]
    if not deterministic:
        noise = torch.randn(delta.shape, generator=generator, device=s.device)
        delta = delta + (0.5 * logvar[member, rows]).exp() * noise
    return s + dynamics._delta_to_raw(delta)


def bench_ensemble(args, device, results):
    """EnsembleDynamics.predict on B_r rows (the paper's 7 members, 5 elites): all members computed vs elites only."""
    dynamics = rollout_parts(args, device)[0].eval()
    B = args.rollout_batch_size
    s, a = torch.randn(B, S, device=device), torch.rand(B, A, device=device) * 2 - 1
    rows, out = [], {}
    for deterministic in (False, True):

        def full():
            with torch.no_grad():
                return predict_all_members(dynamics, s, a, deterministic, torch.Generator(device).manual_seed(0))

        def elites():
            return dynamics.predict(s, a, deterministic=deterministic, generator=torch.Generator(device).manual_seed(0))

        same = torch.allclose(full(), elites(), rtol=1e-5, atol=1e-6)
        t_full = timed(full, device, 20 * args.repeats)
        t_elites = timed(elites, device, 20 * args.repeats)
        kind = "deterministic" if deterministic else "sampled"
        out[kind] = dict(all_members_s=t_full, elites_only_s=t_elites, speedup=t_full / t_elites, same_output=same)
        rows.append([kind, f"{t_full * 1000:.3f}", f"{t_elites * 1000:.3f}", f"{t_full / t_elites:.2f}x", str(same)])
    table(
        f"Ensemble predict, {B} rows, {dynamics.num_members} members ({dynamics.num_elites} elites) x "
        f"{len(dynamics.hidden_layers)} x {dynamics.hidden_layers[0].out_features}",
        ["noise", "all members ms", "elites only ms", "speed-up", "same output"],
        rows,
    )
    results["ensemble"] = out


def bench_dm_train_step(args, device, bf16):
    """Seconds per DM training step at batch 256 (EDM loss, backward, Adam)."""
    from common.edm import edm_loss

    denoiser = EDMPrecond(TemporalUnet(S + A, dim=args.dm_dim, dim_mults=args.dm_dim_mults)).to(device)
    opt = torch.optim.Adam(denoiser.parameters(), lr=2e-4)
    x = torch.randn(256, args.rollout_length, S + A, device=device).clamp(-1, 1)
    mask = condition_mask(args.rollout_length, S, A, device=device)

    def step():
        with autocast(device, bf16):
            loss = edm_loss(denoiser, x, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, device, args.repeats)


def projection(args, device, results, bf16):
    """Wall time of a full DyDiff-TD3BC run implied by the measured parts, and of the base TD3+BC run."""
    upd = results["update"]
    best = max((k for k in upd if k.endswith("/mixed with D_syn")), key=upd.get).split("/")[0]
    base_sps, mixed_sps = upd[f"{best}/real only"], upd[f"{best}/mixed with D_syn"]
    rollout_s = results["rollout"]["whole_s"]
    eval_step = bench_eval(device)
    dm_step = bench_dm_train_step(args, device, bf16)
    T = args.total_steps
    n_evals, n_rollouts = T // args.eval_freq, -(-T // args.rollout_freq)
    eval_s = n_evals * args.eval_episodes * 800 * eval_step  # maze2d-large episodes last at most 800 steps
    parts = {
        "DM pretraining": args.dm_train_steps * dm_step,
        "TD3+BC steps (base)": T / base_sps,
        "extra for mixed batches": T / mixed_sps - T / base_sps,
        "rollout steps": n_rollouts * rollout_s,
        "evaluation (upper bound)": eval_s,
    }
    base = parts["TD3+BC steps (base)"] + eval_s
    dydiff = sum(parts.values())
    rows = [[k, f"{v / 60:,.1f}"] for k, v in parts.items()]
    rows.append(["DyDiff-TD3BC run, pretraining included", f"{dydiff / 60:,.1f}"])
    rows.append(["base TD3+BC run", f"{base / 60:,.1f}"])
    rows.append(
        ["DyDiff's addition to the base run, pretraining excluded", f"{(dydiff - parts['DM pretraining'] - base) / base:+.0%}"]
    )
    table(
        f"Projected maze2d-large run: {T:,} steps, a rollout every {args.rollout_freq}, {n_evals} evaluations "
        f"of {args.eval_episodes} episodes; update variant {best}, denoiser {results['rollout']['variant']} "
        "(ensemble and reward-model pretraining not included)",
        ["part", "minutes"],
        rows,
    )
    results["projection"] = dict(parts_s=parts, dydiff_s=dydiff, base_s=base, eval_step_s=eval_step, dm_train_step_s=dm_step)


def bench_denoisers(args, device, results):
    """Cost of the paper-size U-Net and narrower ones: parameters, FLOPs, forward windows/s, sampler cost ratio."""
    B, L = min(args.rollout_batch_size, 256), args.rollout_length
    x, noise = torch.randn(B, L, S + A, device=device), torch.zeros(B, device=device)
    bf16 = args.bf16
    errors = {}
    for folder in args.models_dirs:
        report_file = Path(folder) / "report.json"
        if not report_file.exists():
            raise SystemExit(f"no report.json in {folder}; pass folders made by pretrain_models.py (e.g. models/maze2d-large)")
        report = json.loads(report_file.read_text())
        cfg = report.get("dm") or load_model_file(folder, "dm")  # reports before the "dm" entry: the model file says
        errors[(cfg["dim"], tuple(cfg["dim_mults"]))] = (cfg, report)
    configs = DENOISERS + [c for c in errors if c not in DENOISERS]
    rows, out, ref = [], {}, None
    for dim, mults in configs:
        net = make_denoiser(dim, mults, device).net
        params = sum(p.numel() for p in net.parameters())
        flops = forward_flops(net, x, noise) / B

        def fwd():
            with torch.no_grad(), autocast(device, bf16):
                net(x, noise)

        t = timed(fwd, device, args.repeats)
        ref = ref or t
        key = f"dim {dim}, mults {'-'.join(map(str, mults))}"
        err = ""
        if (dim, mults) in errors:
            cfg, rep = errors[(dim, mults)]
            at = rep.get(f"state_error_at_{rep['horizon'] - 1}", {})
            err = (
                f"{at.get('dataset/dm', float('nan')):.3f} / {at.get('policy/dm_M1', float('nan')):.3f} "
                f"({rep['env_id']}, {cfg['steps']:,} DM steps)"
            )
        out[key] = dict(params=params, gflops_per_window=flops / 1e9, windows_per_s=B / t, cost_vs_paper=t / ref)
        rows.append([key, f"{params / 1e6:.2f}M", f"{flops / 1e9:.3f}", f"{B / t:,.0f}", f"{ref / t:.1f}x", err])
    table(
        f"Denoiser sizes, forward at batch {B} x L {L}{' (bf16)' if bf16 else ''}",
        [
            "U-Net",
            "parameters",
            "GFLOP/window",
            "windows/s",
            "speed vs paper size",
            "report's state error at its last step: dataset / policy M1",
        ],
        rows,
    )
    results["denoisers"] = out


def main(args: Args):
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "small")
    for k, v in SIZES[size].items():
        if getattr(args, k, None) is None or k in ("real_size", "synthetic_size", "update_steps"):
            setattr(args, k, v)
    args.bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"# DyDiff benchmark: {name}, torch {torch.__version__}, size {size}")
    print(f"`python tests/benchmark.py {shlex.join(sys.argv[1:])}`")

    def variants(net):
        """name -> (network, bf16) for each variant measured: eager fp32, then bf16 and compiled if asked."""
        out = {"fp32 eager": (net, False)}
        if args.bf16:
            out["bf16 eager"] = (net, True)
        if args.compile:
            compiled = torch.compile(net)
            out["fp32 compiled"] = (compiled, False)
            if args.bf16:
                out["bf16 compiled"] = (compiled, True)
        return {k: v for k, v in out.items() if k in args.variants} if args.variants else out

    cache = {}

    def cached_variants(net):
        if id(net) not in cache:
            cache[id(net)] = variants(net)
        return cache[id(net)]

    given = [("fp32", "eager")] + [("bf16", "eager")] * args.bf16 + [("fp32", "compiled")] * args.compile
    given = {" ".join(v) for v in given + [("bf16", "compiled")] * (args.bf16 and args.compile)}
    if set(args.variants) - given:
        raise SystemExit(f"--variants: {sorted(set(args.variants) - given)} not among those measured here: {sorted(given)}")
    denoiser = make_denoiser(args.dm_dim, args.dm_dim_mults, device)
    print(
        f"denoiser: dim {args.dm_dim}, mults {args.dm_dim_mults}, "
        f"{sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M parameters; B_r {args.rollout_batch_size}, "
        f"L {args.rollout_length}, N {args.sampler_steps}"
    )
    results = {"device": name, "size": size, "args": {k: v for k, v in asdict(args).items()}}
    if "forward" in args.sections:
        bench_forward(args, device, denoiser, cached_variants, results)
    if "sampler" in args.sections:
        bench_sampler(args, device, denoiser, cached_variants, results)
    # The rollout uses the fastest sampler variant measured (the first variant if the sampler was not measured).
    sampler = results.get("sampler", {})
    args.rollout_variant = (
        min(sampler, key=lambda k: sampler[k]["seconds"]) if sampler else next(iter(cached_variants(denoiser.net)))
    )
    if "rollout" in args.sections:
        bench_rollout(args, device, denoiser, cached_variants, results)
    if "update" in args.sections:
        bench_update(args, device, results)
    if "projection" in args.sections and "rollout" in results and "update" in results:
        projection(args, device, results, args.bf16)
    if "denoisers" in args.sections:
        bench_denoisers(args, device, results)
    if "evaluation" in args.sections:
        bench_evaluation(args, device, results)
    if "ensemble" in args.sections:
        bench_ensemble(args, device, results)
    if "simulator" in args.sections:
        bench_simulator(args, device, results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
        print(f"\nfigures written to {args.json_out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
