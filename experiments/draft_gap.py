"""What the ensemble's draft does to a policy's rollouts: one trained policy, the same start states, three ways.

The ladder (docs/results.md) finds its largest drop between rung b (the policy's own rollouts in the simulator) and
rung c (DyDiff with a perfect DM: the dynamics ensemble drafts the rollout, the simulator replays the drafted actions
open loop from s_0, the policy relabels the actions). Across runs that comparison mixes two things: the data and
the policy that learned from them. Here the policy is fixed (a finished run's final_policy.pt) and so are the start
states, so what differs is the rollout alone:

- closed loop: the policy acting in the real simulator, each action chosen at the true state (rungs a, b);
- draft: the ensemble's own states (what M = 0 stores);
- draft replayed, M rounds: the rounds of a perfect DM. Each replays the current actions from s_0 in the simulator
  and relabels them with the policy; the first round's states are what rungs c and d store. After M rounds the first
  M + 1 states are the closed-loop ones exactly, so M = L - 1 rounds give the policy's own rollout.

For each: the task's true return of the L-step trajectories, the share reaching the goal, the mean return of the
best 60 % (what the filter keeps, ranking by the true return here), and for the rounds the relabelling gap: how far
the policy's action at each replayed state is from the action that state came from.

    python experiments/draft_gap.py runs/<run>/ [more run folders] --models-dir models-cpu [--rounds 1 2 4 8]

The runs must be PointMaze TD3+BC runs; their data and the dynamics ensemble in --models-dir are loaded as the runs
had them. Prints one table row per run and writes nothing.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoints import load_checkpoint, load_dynamics, models_folder  # noqa: E402
from common.datasets import load_dataset  # noqa: E402
from common.pointmaze import BatchedSimulator, true_rewards  # noqa: E402
from dydiff_td3bc import Actor  # noqa: E402


def measure(states, data, context, keep_share: float) -> dict:
    """True return of each trajectory, the share reaching the goal, and the mean return of the top keep_share."""
    rewards = true_rewards(data, states, context)  # [B, L-1]
    returns = rewards.sum(1)
    kept = returns.topk(max(1, int(keep_share * len(returns)))).values
    return dict(ret=returns.mean().item(), goal=(rewards.max(1).values > 0).float().mean().item(), kept=kept.mean().item())


@torch.no_grad()  # evaluation only; a decorator, so grad mode is back on when main returns (tests call it)
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders (with final_policy.pt)")
    p.add_argument("--models-dir", default="models-cpu", help="where the runs' dynamics ensemble is")
    p.add_argument("--starts", type=int, default=2048, help="start states drawn from the dataset")
    p.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 4, 8], help="M: replay-and-relabel rounds to show")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.rounds) < 1:
        p.error("--rounds: give numbers of rounds, each at least 1")
    rounds = sorted(set(args.rounds))
    print(
        "| run | final score | closed loop | draft (ensemble states) | "
        + " | ".join(f"draft replayed, M = {m}" for m in rounds)
        + " |"
    )
    print("|---" * (4 + len(rounds)) + "|")
    print(
        "| | | return, reaching the goal, top 60 % | the same | "
        + " | ".join("the same, relabelling gap" for _ in rounds)
        + " |"
    )
    cache = {}
    for run in args.runs:
        policy_file = run / "final_policy.pt"
        if not policy_file.exists():
            raise SystemExit(f"{policy_file} is missing: give finished run folders")
        saved = load_checkpoint(policy_file)
        run_args = saved["args"]
        key = (run_args["env_id"], run_args.get("dataset_steps"))
        if key not in cache:
            data = load_dataset(run_args["env_id"], dataset_steps=run_args.get("dataset_steps"), progress=False)
            if data.task != "pointmaze":
                raise SystemExit(f"{run}: {run_args['env_id']} is not PointMaze; the draft gap needs its simulator")
            dynamics = load_dynamics(models_folder(args.models_dir, run_args["env_id"]), data)
            env = data.make_eval_env()
            cache[key] = data, dynamics, BatchedSimulator(env), float(env.action_space.high[0])
        data, dynamics, simulator, max_action = cache[key]
        S, A, L = data.state_dim, data.action_dim, run_args["rollout_length"]
        actor = Actor(data.obs_dim, A, max_action)
        actor.load_state_dict(saved["actor"])
        mean, std = saved["obs_mean"], saved["obs_std"]

        def policy(obs):
            return actor((obs - mean) / std)

        gen = torch.Generator().manual_seed(args.seed)
        obs = torch.as_tensor(data.observations, dtype=torch.float32)
        idx = torch.randint(len(obs), (args.starts,), generator=gen)
        s0, context = obs[idx, :S], obs[idx, S:]
        eta = run_args.get("filter_proportion") or 0.6

        def cell(states, gap=None):
            m = measure(states, data, context, eta)
            return f"{m['ret']:.2f}, {m['goal']:.0%}, {m['kept']:.2f}" + ("" if gap is None else f", {gap:.2f}")

        closed_states, _ = simulator.rollout(policy, s0, L, context=context)
        states, actions = dynamics.rollout(policy, s0, L, context=context, generator=gen)
        cells = [cell(closed_states), cell(states)]
        for m in range(1, rounds[-1] + 1):  # a perfect DM's rounds: replay the actions, then relabel them
            conditioning = actions
            states = simulator.replay(s0, conditioning)
            obs_m = torch.cat([states, context[:, None].expand(-1, L, -1)], -1).reshape(-1, data.obs_dim)
            actions = policy(obs_m).reshape(-1, L, A)
            if m in rounds:
                gap = (actions[:, :-1] - conditioning[:, :-1]).norm(dim=-1).mean().item()
                cells.append(cell(states, gap))
        result = json.loads((run / "result.json").read_text()) if (run / "result.json").exists() else {}
        final = result.get("final_normalized_score")
        print(f"| {run.name} | {'—' if final is None else f'{final:.1f}'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
