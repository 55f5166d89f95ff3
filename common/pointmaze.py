"""Local generation of the D4RL PointMaze ("maze2d") datasets, the way Minari's D4RL/pointmaze-v2 was made.

With no network the official datasets can't be downloaded, so we make them: a shortest-path waypoint
planner over maze cells drives a PD controller, with N(0, 0.5) action noise, for 1M steps of a
continuing task whose goal is redrawn each time it is reached. Each success truncates the Minari
episode (physics continues), so consecutive episodes join into one physical trajectory.
Reference scores come from 100 random and 100 expert episodes in the fixed-start, fixed-goal
evaluation maze.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections import deque
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from common.envs import register_envs

MAZES = {"umaze": "UMaze", "medium": "Medium", "large": "Large"}
# Evaluation maze: the standard map with one reset cell R and one goal cell G, as (row, col).
EVAL_CELLS = {"umaze": ((1, 3), (3, 3)), "medium": ((1, 1), (6, 6)), "large": ((1, 1), (7, 9))}
EVAL_EPISODE_STEPS = {"umaze": 300, "medium": 600, "large": 800}
ACTION_NOISE_STD = 0.5
DEFAULT_STEPS = 1_000_000
DEFAULT_SEED = 0


def gym_env_id(maze: str, dense: bool = False) -> str:
    """Gymnasium-Robotics id of a PointMaze layout, e.g. PointMaze_Large-v3 or PointMaze_LargeDense-v3."""
    return f"PointMaze_{MAZES[maze]}{'Dense' if dense else ''}-v3"


def eval_maze_map(maze: str) -> list[list]:
    """The standard map of `maze` with its single evaluation reset cell 'r' and goal cell 'g'."""
    register_envs()
    base = gym.spec(gym_env_id(maze)).kwargs["maze_map"]
    maze_map = [[1 if c == 1 else 0 for c in row] for row in base]
    (rr, rc), (gr, gc) = EVAL_CELLS[maze]
    maze_map[rr][rc], maze_map[gr][gc] = "r", "g"
    return maze_map


def make_eval_env(maze: str, dense: bool = False) -> gym.Env:
    """The fixed-R/G evaluation environment of `maze` (300 / 600 / 800 steps)."""
    register_envs()
    return gym.make(
        gym_env_id(maze, dense),
        maze_map=eval_maze_map(maze),
        continuing_task=True,
        reset_target=False,
        max_episode_steps=EVAL_EPISODE_STEPS[maze],
    )


def wall_cells(maze) -> np.ndarray:
    """[rows, cols] bool map of the maze's wall cells."""
    return np.array([[c == 1 for c in row] for row in maze.maze_map])


def in_wall(maze, xy: np.ndarray) -> np.ndarray:
    """Whether each (x, y) in [..., 2] lies inside a wall cell or outside the maze."""
    walls = wall_cells(maze)
    rows = np.floor((maze.y_map_center - xy[..., 1]) / maze.maze_size_scaling).astype(int)
    cols = np.floor((xy[..., 0] + maze.x_map_center) / maze.maze_size_scaling).astype(int)
    inside = (rows >= 0) & (rows < walls.shape[0]) & (cols >= 0) & (cols < walls.shape[1])
    return ~inside | walls[rows.clip(0, walls.shape[0] - 1), cols.clip(0, walls.shape[1] - 1)]


def crosses_wall(maze, xy: np.ndarray, substeps: int = 8) -> np.ndarray:
    """For trajectories [..., L, 2] of (x, y): whether any state, or any straight segment between
    consecutive states (checked at `substeps` points), lies in a wall cell or outside the maze."""
    w = np.linspace(0.0, 1.0, substeps, endpoint=False)[:, None]
    a, b = xy[..., :-1, None, :], xy[..., 1:, None, :]
    points = np.concatenate([(a + w * (b - a)).reshape(*xy.shape[:-2], -1, 2), xy[..., -1:, :]], axis=-2)
    return in_wall(maze, points).any(-1)


class WaypointController:
    """Expert of the maze2d datasets: follow cell centres along a shortest path, then go to the goal.

    A PD law a = clip(kp * (waypoint - pos) + kd * vel, -1, 1) tracks the current waypoint; the next
    waypoint is taken once within `threshold` of the current one. Intermediate waypoints are the
    cell centre minus U(0, jitter) per axis, as in D4RL's and Minari's controller.
    """

    def __init__(self, maze, rng: np.random.Generator | None = None, kp=10.0, kd=-1.0, threshold=0.1, jitter=0.2):
        self.maze, self.kp, self.kd, self.threshold, self.jitter = maze, kp, kd, threshold, jitter
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.open = {
            (i, j)
            for i, row in enumerate(maze.maze_map)
            for j, c in enumerate(row)
            if c != 1
        }
        self.goal = None

    def cell(self, xy) -> tuple[int, int]:
        return tuple(int(v) for v in self.maze.cell_xy_to_rowcol(xy))

    def _next_cells(self, goal_cell):
        """Breadth-first search from the goal: for every open cell, its neighbour one step closer."""
        nxt, queue = {goal_cell: goal_cell}, deque([goal_cell])
        while queue:
            c = queue.popleft()
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                n = (c[0] + di, c[1] + dj)
                if n in self.open and n not in nxt:
                    nxt[n] = c
                    queue.append(n)
        return nxt

    def _aim_after(self, cell):
        """Set the waypoint to the cell after `cell` on the path (the goal itself in the goal cell)."""
        self.waypoint_cell = self.next_cell.get(cell, self.goal_cell)
        if self.waypoint_cell == self.goal_cell:
            self.target = self.goal.copy()
        else:
            centre = self.maze.cell_rowcol_to_xy(np.array(self.waypoint_cell))
            self.target = centre - self.rng.uniform(size=2) * self.jitter

    def __call__(self, obs: dict) -> np.ndarray:
        pos, vel, goal = obs["achieved_goal"], obs["observation"][2:4], obs["desired_goal"]
        if self.goal is None or np.linalg.norm(goal - self.goal) > 1e-3:  # new goal: plan again
            self.goal, self.goal_cell = np.array(goal, dtype=np.float64), self.cell(goal)
            self.next_cell = self._next_cells(self.goal_cell)
            self._aim_after(self.cell(pos))
        if self.waypoint_cell != self.goal_cell and np.linalg.norm(self.target - pos) <= self.threshold:
            self._aim_after(self.waypoint_cell)
        return np.clip(self.kp * (self.target - pos) + self.kd * vel, -1.0, 1.0)


def _episode(obs_list, actions, rewards, truncated_at_end):
    n = len(actions)
    keys = obs_list[0].keys()
    return dict(
        observations={k: np.stack([o[k] for o in obs_list]) for k in keys},
        actions=np.asarray(actions, dtype=np.float32),
        rewards=np.asarray(rewards, dtype=np.float64),
        terminations=np.zeros(n, dtype=bool),
        truncations=np.r_[np.zeros(n - 1, dtype=bool), [truncated_at_end]],
    )


def collect(maze: str, dense: bool = False, num_steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED,
            progress: bool = True) -> tuple[gym.Env, list[dict]]:
    """Run the noisy expert for `num_steps` steps; return the env and the episodes (dicts of arrays).

    An episode ends with a truncation at each success; the next one starts from the same physical
    state with the newly drawn goal, so the goal is constant within an episode.
    """
    register_envs()
    env = gym.make(gym_env_id(maze, dense), continuing_task=True, reset_target=True, max_episode_steps=num_steps)
    rng = np.random.default_rng(seed)
    controller = WaypointController(env.unwrapped.maze, rng)
    obs, _ = env.reset(seed=seed)
    episodes, ep_obs, ep_act, ep_rew = [], [obs], [], []
    for t in tqdm(range(num_steps), desc=f"generating maze2d-{maze}", unit="step", disable=not progress,
                  mininterval=1.0):
        action = np.clip(controller(obs) + rng.normal(0.0, ACTION_NOISE_STD, size=2), -1.0, 1.0)
        obs, reward, _, _, info = env.step(action)
        ep_act.append(action)
        ep_rew.append(reward)
        ep_obs.append(obs)
        if info["success"] or t == num_steps - 1:
            episodes.append(_episode(ep_obs, ep_act, ep_rew, truncated_at_end=True))
            # Same physical state, the goal the env has just drawn.
            obs = dict(obs, desired_goal=env.unwrapped.goal.copy())
            ep_obs, ep_act, ep_rew = [obs], [], []
    return env, episodes


def reference_scores(maze: str, dense: bool = False, episodes: int = 100, seed: int = DEFAULT_SEED,
                     progress: bool = True) -> tuple[float, float]:
    """(ref_min, ref_max): mean return of a uniform-random policy and of the noise-free expert."""
    env = make_eval_env(maze, dense)
    rng = np.random.default_rng(seed)
    means = []
    for name in ("random", "expert"):
        returns = []
        for ep in tqdm(range(episodes), desc=f"maze2d-{maze} {name} reference", disable=not progress):
            obs, _ = env.reset(seed=seed + ep)
            policy = WaypointController(env.unwrapped.maze, rng) if name == "expert" else None
            ret, done = 0.0, False
            while not done:
                action = policy(obs) if policy else rng.uniform(-1.0, 1.0, size=2)
                obs, r, term, trunc, _ = env.step(action)
                ret += r
                done = term or trunc
            returns.append(ret)
        means.append(float(np.mean(returns)))
    env.close()
    return means[0], means[1]


def generate_dataset(dataset_id: str, maze: str, dense: bool = False, num_steps: int = DEFAULT_STEPS,
                     seed: int = DEFAULT_SEED, progress: bool = True):
    """Collect, score and store a PointMaze dataset as a Minari dataset under `dataset_id`."""
    import minari
    from minari.data_collector import EpisodeBuffer
    from minari.storage import get_dataset_path

    env, episodes = collect(maze, dense, num_steps, seed, progress)
    ref_min, ref_max = reference_scores(maze, dense, seed=seed, progress=progress)
    buffers = [EpisodeBuffer(id=i, infos={}, **ep) for i, ep in enumerate(episodes)]
    eval_env = make_eval_env(maze, dense)
    # Write into a hidden folder of the store (Minari skips those), then move it into place in one
    # rename, so a killed run never leaves a half-written dataset under `dataset_id`.
    root = Path(get_dataset_path())
    tmp_root = Path(tempfile.mkdtemp(prefix=".generating-", dir=root))
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(tmp_root)
    try:
        with warnings.catch_warnings():  # Minari asks for an author and a code link
            warnings.simplefilter("ignore", UserWarning)
            minari.create_dataset_from_buffers(
                dataset_id=dataset_id,
                buffer=buffers,
                env=env.spec,
                eval_env=eval_env.spec,
                algorithm_name="shortest-path waypoints + PD controller + N(0, 0.5) action noise",
                ref_min_score=ref_min,
                ref_max_score=ref_max,
                description=(
                    f"Local re-creation of D4RL/pointmaze/{maze}{'-dense' if dense else ''}-v2: {num_steps} steps, "
                    f"seed {seed}, continuing task with a new goal after each success (truncation)."
                ),
                data_format="hdf5",
            )
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    for meta in tmp_root.rglob("namespace_metadata.json"):  # namespace files Minari made alongside
        target = root / meta.relative_to(tmp_root)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(meta, target)
    final = root / dataset_id
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_root / dataset_id, final)
    shutil.rmtree(tmp_root, ignore_errors=True)
    env.close()
    eval_env.close()
    return minari.load_dataset(dataset_id)
