"""What the ensemble's draft does to a policy's rollouts: one trained policy, the same start states, three ways.

The ladder (docs/results.md) finds its largest drop between rung b (the policy's own rollouts in the simulator) and
rung c (DyDiff with a perfect DM: the dynamics ensemble drafts the rollout, the simulator replays the drafted actions
open loop from s_0, the policy relabels the actions). Across runs that comparison mixes two things: the data and
the policy that learned from them. Here the policy is fixed (a finished run's final_policy.pt) and so are the start
states, so what differs is the rollout alone:

- closed loop: the policy acting in the real simulator, each action chosen at the true state (rungs a, b);
- draft, replayed: the ensemble rolls the policy out, the simulator replays those actions from s_0 (rungs c, d);
- draft: the ensemble's own states (what M = 0 stores).

For each: the task's true return of the L-step trajectories (with the run's own filter ranking by it, the return of
the kept ones), the share reaching the goal, and for the replay the relabelling gap: how far the policy's action at
each replayed state is from the action the state came from (what rung d stores instead).

    python experiments/draft_gap.py runs/<run>/ [more run folders] --models-dir models-cpu [--starts 2048]

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders (with final_policy.pt)")
    p.add_argument("--models-dir", default="models-cpu", help="where the runs' dynamics ensemble is")
    p.add_argument("--starts", type=int, default=2048, help="start states drawn from the dataset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    print(
        "| run | final score | closed loop: return, reaching the goal | draft replayed: return, reaching the goal "
        "| draft (ensemble states): return, reaching the goal | top 60 % by true return: closed loop, replayed "
        "| relabelling gap ‖π(s_t) − a_t‖ (replayed) |"
    )
    print("|---|---|---|---|---|---|---|")
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
            cache[key] = data, dynamics, BatchedSimulator(data.make_eval_env())
        data, dynamics, simulator = cache[key]
        S, A, L = data.state_dim, data.action_dim, run_args["rollout_length"]
        actor = Actor(data.obs_dim, A, float(data.make_eval_env().action_space.high[0]))
        actor.load_state_dict(saved["actor"])
        mean, std = saved["obs_mean"], saved["obs_std"]

        def policy(obs):
            return actor((obs - mean) / std)

        gen = torch.Generator().manual_seed(args.seed)
        obs = torch.as_tensor(data.observations, dtype=torch.float32)
        idx = torch.randint(len(obs), (args.starts,), generator=gen)
        s0, context = obs[idx, :S], obs[idx, S:]
        eta = run_args.get("filter_proportion") or 0.6
        closed_states, _ = simulator.rollout(policy, s0, L, context=context)
        draft_states, draft_actions = dynamics.rollout(policy, s0, L, context=context, generator=gen)
        replayed = simulator.replay(s0, draft_actions)
        relabelled = policy(torch.cat([replayed, context[:, None].expand(-1, L, -1)], -1).reshape(-1, data.obs_dim))
        gap = (relabelled.reshape(-1, L, A)[:, :-1] - draft_actions[:, :-1]).norm(dim=-1).mean().item()
        closed = measure(closed_states, data, context, eta)
        rep = measure(replayed, data, context, eta)
        dra = measure(draft_states, data, context, eta)
        result = json.loads((run / "result.json").read_text()) if (run / "result.json").exists() else {}
        final = result.get("final_normalized_score")
        print(
            f"| {run.name} | {final if final is None else f'{final:.1f}'} "
            f"| {closed['ret']:.2f}, {closed['goal']:.0%} | {rep['ret']:.2f}, {rep['goal']:.0%} "
            f"| {dra['ret']:.2f}, {dra['goal']:.0%} | {closed['kept']:.2f}, {rep['kept']:.2f} | {gap:.3f} |"
        )


if __name__ == "__main__":
    main()
