"""The noise-free expert's return on maze2d-large's evaluation env at 800 and at 1000 steps, on D4RL's scale.

Why: the paper's Table 2 reports maze2d scores on D4RL maze2d-v1's scale without their episode length; the
evaluation env here cuts episodes at 800 steps (the registration), D4RL's released evaluation code at 1000. If the
paper's DyDiff (182 on maze2d-large) equals the expert's 800-step score, 1000-step episodes are the likelier reading.

    python experiments/expert_episode_length.py            # 100 episodes, about a minute on one core
"""

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import pointmaze  # noqa: E402
from common.envs import register_envs  # noqa: E402


def main(maze: str = "large", episodes: int = 100, lengths=(800, 1000)) -> None:
    register_envs()
    env = gym.make(
        pointmaze.gym_env_id(maze),
        maze_map=pointmaze.eval_maze_map(maze),
        continuing_task=True,
        reset_target=False,
        max_episode_steps=max(lengths),
    )
    expert = pointmaze.WaypointController(env.unwrapped.maze, np.random.RandomState(0))
    returns = {n: [] for n in lengths}
    for ep in range(episodes):
        obs, _ = env.reset(seed=123 + ep)
        total = 0.0
        for t in range(max(lengths)):
            obs, reward, terminated, truncated, _ = env.step(expert.compute_action(obs))
            total += reward
            if t + 1 in returns:
                returns[t + 1].append(total)
    env.close()
    lo, hi = pointmaze.D4RL_REF_SCORES[(maze, False)]
    print(f"maze2d-{maze}, noise-free expert, {episodes} episodes (seeds 123..{122 + episodes}):")
    for n, r in returns.items():
        r = np.asarray(r)
        print(
            f"  {n} steps: return {r.mean():.1f} ± {r.std():.1f}, D4RL maze2d-v1 scale {100 * (r.mean() - lo) / (hi - lo):.1f}"
        )


if __name__ == "__main__":
    main()
