"""Local re-creation of Minari's D4RL/pointmaze-v2 datasets ("maze2d"), rule by rule, and their evaluation env.

With no network the official datasets can't be downloaded, so we make them the way Minari did, following
its public generation scripts (Farama-Foundation/minari-dataset-generation-scripts, scripts/pointmaze/):

- create_pointmaze_dataset.py: the collection loop (continuing task, a new goal at each success, which
  truncates the Minari episode while the physics goes on), the seed, the N(0, 0.5) action noise then the
  clip, the evaluation maps and the reference scores;
- controller.py: the waypoint controller (PD gains, waypoint threshold, waypoint jitter);
- maze_solver.py: the path solvers (DFS, QIteration).

Each rule below names the upstream file it comes from. The script pinned gymnasium-robotics 1.2.4 and
MuJoCo < 3; we pin gymnasium-robotics 1.4.2, whose maze and point-mass code (maze_v4.py, point_maze.py,
point.py, point.xml, maps.py) is the same apart from comments and a temporary file name, and MuJoCo 4,
which can change floating-point details. So the data follow the same rules, not the same bits.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from common.envs import register_envs

MAZES = {"umaze": "UMaze", "medium": "Medium", "large": "Large"}
# create_pointmaze_dataset.py, EVAL_ENV_MAPS: the standard map with a single goal cell G (row, col) and no
# reset cell, so every evaluation episode starts in a random free cell.
EVAL_GOAL_CELLS = {"umaze": (1, 1), "medium": (6, 6), "large": (7, 9)}
# The registered max_episode_steps of PointMaze_<Maze>-v3, which the evaluation env keeps.
EVAL_EPISODE_STEPS = {"umaze": 300, "medium": 600, "large": 800}
ACTION_NOISE_STD = 0.5  # create_pointmaze_dataset.py: action += np.random.randn(2) * 0.5, then clip to [-1, 1]
DEFAULT_STEPS = 1_000_000  # create_pointmaze_dataset.py: range(1_000_000)
# D4RL maze2d-*-v1's sizes (the shapes its get_dataset() returns; 7M in all): the default of the fixed-goal maze2d-* task
D4RL_STEPS = {"umaze": 1_000_000, "medium": 2_000_000, "large": 4_000_000}
DEFAULT_SEED = 123  # create_pointmaze_dataset.py: np.random.seed(123); collector_env.reset(seed=123)
# controller.py: WaypointController(maze) is built without a maze_solver argument, so its default applies.
DEFAULT_SOLVER = "DFS"
SOLVERS = ("DFS", "QIteration")
REF_EPISODES = 100  # minari.create_dataset: num_episodes_average_score=100
# create_pointmaze_dataset.py (the version that wrote the v2 data with Minari 0.4.3): every 200,000 steps the
# data are saved, which truncates the open episode, and the env is reset with the seed plus one.
CHECKPOINT_EVERY = 200_000
RECIPE = "v3"  # version suffix of our local ids; bumped whenever the generated data change
GOAL_RADIUS = 0.45  # gymnasium-robotics maze_v4.py: success and the sparse reward within 0.45 of the goal
# D4RL's maze2d-*-v1 reference scores (d4rl/infos.py, and the same values in d4rl/pointmaze/__init__.py's
# registrations), for scores next to the paper's: (maze, dense) -> (ref_min, ref_max).
D4RL_REF_SCORES = {
    ("umaze", False): (23.85, 161.86),
    ("medium", False): (13.13, 277.39),
    ("large", False): (6.7, 273.99),
    ("umaze", True): (68.537689, 193.66285642381482),
    ("medium", True): (44.264742, 297.4552547777125),
    ("large", True): (30.569041, 303.4857382709002),
}


def gym_env_id(maze: str, dense: bool = False) -> str:
    """Gymnasium-Robotics id of a PointMaze layout, e.g. PointMaze_Large-v3 or PointMaze_LargeDense-v3."""
    return f"PointMaze_{MAZES[maze]}{'Dense' if dense else ''}-v3"


def eval_maze_map(maze: str) -> list[list]:
    """The standard map of `maze` with its single evaluation goal cell 'g' (create_pointmaze_dataset.py)."""
    register_envs()
    base = gym.spec(gym_env_id(maze)).kwargs["maze_map"]
    maze_map = [[1 if c == 1 else 0 for c in row] for row in base]
    row, col = EVAL_GOAL_CELLS[maze]
    maze_map[row][col] = "g"
    return maze_map


def goal_xy(maze: str) -> np.ndarray:
    """Centre (x, y) of the evaluation goal cell of `maze`: the fixed goal of D4RL's maze2d task.

    gymnasium-robotics' Maze.cell_rowcol_to_xy with maze_size_scaling 1: the map is centred on the origin,
    x grows with the column and y falls with the row.
    """
    register_envs()
    rows = gym.spec(gym_env_id(maze)).kwargs["maze_map"]
    row, col = EVAL_GOAL_CELLS[maze]
    return np.array([col + 0.5 - len(rows[0]) / 2, len(rows) / 2 - (row + 0.5)])


def goal_reward(xy, goal, dense: bool):
    """What a PointMaze env pays for arriving at position `xy` ([..., 2]) with goal `goal` ([2] or [..., 2]).

    gymnasium-robotics maze_v4.py, compute_reward: sparse 1 within GOAL_RADIUS of the goal, else 0;
    dense exp(-distance). NumPy or torch.
    """
    if isinstance(xy, np.ndarray):
        distance = np.linalg.norm(xy - goal, axis=-1)
        return (np.exp(-distance) if dense else (distance <= GOAL_RADIUS)).astype(np.float32)
    import torch

    distance = torch.linalg.vector_norm(xy - torch.as_tensor(goal, dtype=xy.dtype, device=xy.device), dim=-1)
    return torch.exp(-distance) if dense else (distance <= GOAL_RADIUS).to(xy.dtype)


def make_eval_env(maze: str, dense: bool = False, max_steps: int | None = None) -> gym.Env:
    """Minari's evaluation env of `maze`: G-only map, continuing_task=True, reset_target=False, 300/600/800 steps
    (or `max_steps`).

    Every reset draws the start among the free cells other than G, at least half a cell from the (noisy)
    goal, and adds the environment's own U(-0.25, 0.25) position noise: gymnasium-robotics' reset rule.
    """
    register_envs()
    kwargs = {} if max_steps is None else {"max_episode_steps": max_steps}
    env = gym.make(gym_env_id(maze, dense), maze_map=eval_maze_map(maze), continuing_task=True, reset_target=False, **kwargs)
    assert env.spec.max_episode_steps == (max_steps or EVAL_EPISODE_STEPS[maze])
    return env


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


# ----------------------------------------------------------------------------- maze solvers (maze_solver.py)
# maze_solver.py, EXPLORATION_ACTIONS: (row, col) steps, tried in this order.
MOVES = ((0, 1), (0, -1), (-1, 0), (1, 0))


def _valid(maze_map, cell) -> bool:
    """maze_solver.py, _check_valid_cell: inside the map's upper bounds and not a wall."""
    return cell[0] < len(maze_map) and cell[1] < len(maze_map[0]) and maze_map[cell[0]][cell[1]] != 1


def dfs_path(maze_map, start: tuple, goal: tuple) -> dict:
    """maze_solver.py, DFS: depth-first search from `start`; returns {cell: next cell} along the path found.

    Not a shortest path: the last neighbour pushed is explored first, and a cell is marked explored when
    pushed. Empty when start == goal.
    """
    frontier, explored, parent = [start], {start}, {}
    while frontier:
        cell = frontier.pop()
        if cell == goal:
            break
        for dr, dc in MOVES:
            nxt = (cell[0] + dr, cell[1] + dc)
            if _valid(maze_map, nxt) and nxt not in explored:
                explored.add(nxt)
                frontier.append(nxt)
                parent[nxt] = cell
    path, cell = {}, goal
    while cell != start:
        path[parent[cell]] = cell
        cell = parent[cell]
    return path


def q_iteration_path(maze_map, start: tuple, goal: tuple, iterations: int = 50, discount: float = 0.99) -> dict:
    """maze_solver.py, QIteration: 50 sweeps of Q-value iteration (reward 1 for stepping into the goal cell,
    discount 0.99), then the greedy path (ties to the first move) from `start`; {cell: next cell}."""
    rows, cols = len(maze_map), len(maze_map[0])
    n = rows * cols
    transition = np.zeros((n, len(MOVES), n))
    reward = np.zeros((n, len(MOVES)))
    for s in range(n):
        r, c = divmod(s, cols)
        for a, (dr, dc) in enumerate(MOVES):
            nxt = (r + dr, c + dc)
            reward[s, a] = float(nxt == goal)
            if 0 <= nxt[0] and 0 <= nxt[1] and _valid(maze_map, nxt):
                transition[s, a, nxt[0] * cols + nxt[1]] = 1.0
    q = np.zeros((n, len(MOVES)))
    for _ in range(iterations):
        q = reward + discount * transition.dot(q.max(axis=1))
    path, cell = {}, start
    while True:
        dr, dc = MOVES[int(np.argmax(q[cell[0] * cols + cell[1]]))]
        path[cell] = (cell[0] + dr, cell[1] + dc)
        if path[cell] == goal:
            return path
        cell = path[cell]


# ----------------------------------------------------------------------------- the expert (controller.py)
class WaypointController:
    """controller.py, WaypointController: a PD controller that follows the solver's cells to the goal.

    a = kp (target - pos) + kd vel, not clipped here (the collection loop clips after adding noise; the env
    clips too). The plan is made again whenever the observed goal moves by more than 1e-3. The first
    target of a plan is the exact centre of the next cell; a target is passed once within `threshold`;
    each later intermediate target is the cell centre minus U(0, 1) * jitter per axis; the goal cell's
    target is the goal itself, except when it is the plan's first target (then its centre, which lies
    within the 0.45 success radius of any goal in that cell).
    """

    def __init__(
        self,
        maze,
        rng: np.random.RandomState | None = None,
        solver: str = DEFAULT_SOLVER,
        kp: float = 10.0,
        kd: float = -1.0,
        threshold: float = 0.1,
        jitter: float = 0.2,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"unknown maze solver {solver!r}; known: {', '.join(SOLVERS)}")
        self.maze, self.kp, self.kd, self.threshold, self.jitter = maze, kp, kd, threshold, jitter
        # The upstream script draws jitter and action noise from NumPy's global RandomState seeded with 123.
        self.rng = rng if rng is not None else np.random.RandomState(DEFAULT_SEED)
        self.solve = dfs_path if solver == "DFS" else q_iteration_path
        self.goal_xy = np.full(2, np.inf)
        self.path = None
        self.target_cell = None

    def _cell(self, xy) -> tuple[int, int]:
        return tuple(int(v) for v in self.maze.cell_xy_to_rowcol(xy))

    def _centre(self, cell) -> np.ndarray:
        return self.maze.cell_rowcol_to_xy(np.array(cell))

    def compute_action(self, obs: dict) -> np.ndarray:
        pos, vel, goal = obs["achieved_goal"], obs["observation"][2:4], obs["desired_goal"]
        if self.path is None or np.linalg.norm(self.goal_xy - goal) > 1e-3:  # a new goal: plan again
            start = self._cell(pos)
            self.goal_cell, self.goal_xy = self._cell(goal), np.array(goal, dtype=np.float64)
            self.path = self.solve(self.maze.maze_map, start, self.goal_cell)
            if self.path:
                self.target_cell = self.path[start]
                self.target_xy = self._centre(self.target_cell)  # no jitter on a plan's first target
            else:
                # Already in the goal cell: aim at the goal. Upstream keeps its previous target cell here
                # (and fails on the very first action, which we let aim at the goal too).
                if self.target_cell is None:
                    self.target_cell = self.goal_cell
                self.path = {self.target_cell: self.target_cell}
                self.target_xy = self.goal_xy
        if np.linalg.norm(self.target_xy - pos) <= self.threshold and self.target_cell != self.goal_cell:
            self.target_cell = self.path[self.target_cell]
            if self.target_cell == self.goal_cell:
                self.target_xy = self.goal_xy
            else:
                self.target_xy = self._centre(self.target_cell) - self.rng.uniform(size=2) * self.jitter
        return self.kp * (self.target_xy - pos) + self.kd * vel

    __call__ = compute_action


# ----------------------------------------------------------------------------- collection
def _episode(obs_list, actions, rewards):
    n = len(actions)
    return dict(
        observations={k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]},
        actions=np.asarray(actions, dtype=np.float32),
        rewards=np.asarray(rewards, dtype=np.float64),
        terminations=np.zeros(n, dtype=bool),
        truncations=np.r_[np.zeros(n - 1, dtype=bool), [True]],
    )


def reference_scores(
    maze: str,
    dense: bool = False,
    rng: np.random.RandomState | None = None,
    solver: str = DEFAULT_SOLVER,
    episodes: int = REF_EPISODES,
) -> tuple[float, float]:
    """(ref_min, ref_max) as Minari computes them when a dataset is created with an eval env and an expert:
    minari.utils.get_average_reference_score over `episodes` episodes of the evaluation env (reset with
    seed 123, then unseeded) for a uniform-random policy (its action space seeded with 123) and for the
    noise-free expert, whose waypoint jitter draws from `rng`."""
    from minari.utils import RandomPolicy, get_average_reference_score

    env = make_eval_env(maze, dense)
    expert = WaypointController(env.unwrapped.maze, rng, solver)
    ref_min = get_average_reference_score(env, RandomPolicy(env), episodes)
    ref_max = get_average_reference_score(env, expert.compute_action, episodes)
    env.close()
    return ref_min, ref_max


def collect(
    maze: str,
    dense: bool = False,
    dataset_steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    solver: str = DEFAULT_SOLVER,
    checkpoint_every: int = CHECKPOINT_EVERY,
    ref_episodes: int = REF_EPISODES,
    progress: bool = True,
) -> tuple[gym.Env, list[dict], tuple[float, float] | None]:
    """Run the noisy expert for `dataset_steps` steps as create_pointmaze_dataset.py does.

    Returns the env, the episodes (dicts of arrays, as Minari's DataCollector records them) and the
    reference scores (None when ref_episodes is 0).

    - Each success truncates the episode; the next one begins with that same observation (its
      `desired_goal` is still the goal just reached: the env draws the new goal after building the
      observation) and the physics goes on.
    - Every `checkpoint_every` steps the script saves the data, which truncates the open episode, then
      resets the env with the seed plus one (a new physical segment). The reset after the last step is
      never saved, so it is not made here.
    - At the first checkpoint (or at the end, if that comes first) Minari computes the reference scores.
      The expert's jitter draws from the same random state as the collection (the script's global NumPy
      state), so every later step depends on it, as upstream.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    register_envs()
    # create_pointmaze_dataset.py: a continuing task with a new goal at each success; the time limit is the
    # dataset's size, so it never ends an episode before the last step.
    env = gym.make(gym_env_id(maze, dense), continuing_task=True, reset_target=True, max_episode_steps=dataset_steps)
    rng = np.random.RandomState(seed)  # the script's np.random.seed(seed): jitter and action noise
    controller = WaypointController(env.unwrapped.maze, rng, solver)
    obs, _ = env.reset(seed=seed)
    refs = None
    episodes, ep_obs, ep_act, ep_rew = [], [obs], [], []
    for t in tqdm(range(dataset_steps), desc=f"generating maze2d-{maze}", unit="step", disable=not progress, mininterval=1.0):
        action = np.clip(controller.compute_action(obs) + rng.randn(2) * ACTION_NOISE_STD, -1.0, 1.0)
        obs, reward, _, truncated, info = env.step(action)
        ep_obs.append(obs)
        ep_act.append(action)
        ep_rew.append(reward)
        checkpoint = (t + 1) % checkpoint_every == 0 or t + 1 == dataset_steps
        if info["success"] or truncated or checkpoint:
            episodes.append(_episode(ep_obs, ep_act, ep_rew))
            ep_obs, ep_act, ep_rew = [obs], [], []
        if checkpoint and refs is None and ref_episodes > 0:
            if progress:
                tqdm.write(
                    f"[dydiff] reference scores: {ref_episodes} random and {ref_episodes} expert episodes "
                    "of the evaluation env"
                )
            refs = reference_scores(maze, dense, rng, solver, ref_episodes)
        if checkpoint and t + 1 < dataset_steps:
            seed += 1
            obs, _ = env.reset(seed=seed)
            ep_obs = [obs]
    return env, episodes, refs


def remove_stale_generations(root: Path) -> None:
    """Remove the hidden folders of dataset writes whose process is gone (killed with SIGKILL)."""
    for folder in root.glob(".generating-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def generate_dataset(dataset_id: str, maze: str, dense: bool = False, progress: bool = True, **options):
    """Collect and store a PointMaze dataset as a Minari dataset under `dataset_id`.

    `options`: `collect`'s dataset_steps, seed, solver and checkpoint_every (their defaults otherwise).
    """
    import minari
    from minari.data_collector import EpisodeBuffer
    from minari.storage import get_dataset_path

    defaults = dict(dataset_steps=DEFAULT_STEPS, seed=DEFAULT_SEED, solver=DEFAULT_SOLVER, checkpoint_every=CHECKPOINT_EVERY)
    options = {**defaults, **options}
    env, episodes, (ref_min, ref_max) = collect(maze, dense, ref_episodes=REF_EPISODES, progress=progress, **options)
    dataset_steps, seed, solver, checkpoint_every = (
        options[k] for k in ("dataset_steps", "seed", "solver", "checkpoint_every")
    )
    buffers = [EpisodeBuffer(id=i, infos={}, **ep) for i, ep in enumerate(episodes)]
    eval_env = make_eval_env(maze, dense)
    # Write into a hidden folder of the store (Minari skips those), then move it into place in one
    # rename, so a killed run never leaves a half-written dataset under `dataset_id`.
    root = Path(get_dataset_path())
    remove_stale_generations(root)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".generating-{os.getpid()}-", dir=root))
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
                ref_min_score=ref_min,
                ref_max_score=ref_max,
                num_episodes_average_score=REF_EPISODES,
                algorithm_name=f"{solver} waypoints + PD controller + N(0, {ACTION_NOISE_STD}) action noise",
                description=(
                    f"Local re-creation of D4RL/pointmaze/{maze}{'-dense' if dense else ''}-v2 with Minari's "
                    f"generation rules: {dataset_steps} steps, seed {seed}, {solver} solver, continuing task with a "
                    f"new goal after each success (truncation), a reset every {checkpoint_every} steps."
                ),
                data_format="hdf5",
            )
    except BaseException:  # Ctrl-C, a kill (SIGTERM) or a failed write: no half-written dataset stays behind
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
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


def maze_picture(data, states, keep, path):
    """PointMaze: sampled synthetic trajectories over the maze walls; returns the share crossing a wall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = data.make_eval_env()
    maze = env.unwrapped.maze
    walls = wall_cells(maze)
    xy = states[..., :2].cpu().numpy()
    crossing = crosses_wall(maze, xy)
    fig, ax = plt.subplots(figsize=(5, 5 * walls.shape[0] / walls.shape[1]))
    s = maze.maze_size_scaling
    for i, j in zip(*np.nonzero(walls)):
        x, y = maze.cell_rowcol_to_xy(np.array([i, j]))
        ax.add_patch(plt.Rectangle((x - s / 2, y - s / 2), s, s, color="0.3"))
    kept = np.zeros(len(xy), dtype=bool)
    kept[keep.cpu().numpy()] = True
    for n in range(min(64, len(xy))):
        ax.plot(
            xy[n, :, 0], xy[n, :, 1], lw=0.8, color=("tab:red" if crossing[n] else "tab:blue"), alpha=0.9 if kept[n] else 0.3
        )
    ax.set_aspect("equal")
    ax.set_xlim(-maze.x_map_center, maze.x_map_center)
    ax.set_ylim(-maze.y_map_center, maze.y_map_center)
    ax.set_title(f"synthetic trajectories (red: through a wall, {crossing.mean():.0%}; faint: filtered out)", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except BaseException:  # interrupted or failed: no temporary file survives
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
        env.close()
    return float(crossing.mean())


def synthetic_data_metrics(data, env, states, actions, rewards, keep, context, replay: int, seed: int = 0) -> dict:
    """What one rollout's kept synthetic trajectories carry, and whether it is true (PointMaze).

    states [B, L, S], actions [B, L, A], rewards [B, L-1] (the reward model's), keep [K] (indices of the kept
    trajectories), context [B, C] (the goal, in the goal-conditioned task): tensors. `env`: the evaluation env.
    A trajectory "reaches the goal" when it comes within the goal radius of its goal (the fixed goal, or its
    own goal in the goal-conditioned task). Returns, over the kept trajectories:
    - goal_share_reward_model: the reward model pays a goal reward somewhere along it;
    - goal_share_generated: its own generated states reach the goal;
    - goal_share_real: the real simulator, replaying its actions from s_0, reaches the goal (`replay` of the
      kept trajectories drawn at random, all of them if fewer), and for those same trajectories
      return_kept_predicted (the reward model's return) and return_kept_real (the real states' return);
    - wall_crossing_share (all B trajectories) and wall_crossing_share_kept.
    """
    from common.envs import replay_actions

    keep = keep.cpu().numpy()
    states, actions, rewards = (t.float().cpu().numpy() for t in (states, actions, rewards))
    goals = np.broadcast_to(data.goal, (len(states), 2)) if data.goal is not None else context[:, :2].float().cpu().numpy()
    dense = data.dense_reward
    threshold = float(np.exp(-GOAL_RADIUS)) if dense else 0.5  # a reward at least that of the goal radius
    maze = env.unwrapped.maze
    crossing = crosses_wall(maze, states[..., :2])
    reached_generated = (np.linalg.norm(states[:, 1:, :2] - goals[:, None], axis=-1) <= GOAL_RADIUS).any(1)
    out = {
        "dydiff/goal_share_reward_model": float((rewards[keep] >= threshold).any(1).mean()),
        "dydiff/goal_share_generated": float(reached_generated[keep].mean()),
        "dydiff/wall_crossing_share": float(crossing.mean()),
        "dydiff/wall_crossing_share_kept": float(crossing[keep].mean()),
    }
    if replay > 0 and len(keep):
        chosen = np.random.default_rng(seed).permutation(keep)[:replay]
        real_reached, real_returns = [], []
        for i in chosen:
            real = replay_actions(env, "pointmaze", states[i, 0], actions[i])
            real_rewards = goal_reward(real[1:, :2], goals[i], dense)
            real_reached.append(bool((np.linalg.norm(real[1:, :2] - goals[i], axis=-1) <= GOAL_RADIUS).any()))
            real_returns.append(float(real_rewards.sum()))
        out.update(
            {
                "dydiff/goal_share_real": float(np.mean(real_reached)),
                "dydiff/goal_share_generated_checked": float(reached_generated[chosen].mean()),
                "dydiff/return_kept_predicted": float(rewards[chosen].sum(1).mean()),
                "dydiff/return_kept_real": float(np.mean(real_returns)),
            }
        )
    return out


class BatchedSimulator:
    """The PointMaze physics stepping a whole batch of states at once in C (`mujoco.rollout`).

    One step is what `env.step` does to one state (gymnasium-robotics point.py, PointEnv.step): the action is
    clipped to [-1, 1] (after a float32 cast, as the env's action space has it), the velocity to [-5, 5], then
    one `mj_step` (frame_skip 1); the next state is (qpos, qvel). Walls are the env's own MuJoCo geoms, so contacts
    are the simulator's. States (x, y, vx, vy) are float64 NumPy arrays; the goal plays no part in the physics.
    Used by the ablations that replace DyDiff's models by the real dynamics (`--rollout-states`).
    """

    def __init__(self, env: gym.Env):
        import mujoco
        import mujoco.rollout

        self.model = env.unwrapped.point_env.model
        self._data = mujoco.MjData(self.model)
        spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
        if (self.model.nq, self.model.nv, self.model.na) != (2, 2, 0) or mujoco.mj_stateSize(self.model, spec) != 5:
            raise ValueError("BatchedSimulator expects PointMaze's point mass: qpos (x, y), qvel (vx, vy), no actuator state")
        self._rollout = mujoco.rollout.Rollout(nthread=0)  # one thread: the training has the other core

    def step(self, states, actions) -> np.ndarray:
        """Next states [N, 4] (float64) from states [N, 4] and actions [N, 2]."""
        states = np.asarray(states, dtype=np.float64)
        # full physics state: (time, qpos, qvel); time does not enter the dynamics
        initial = np.zeros((len(states), 5))
        initial[:, 1:3] = states[:, :2]
        initial[:, 3:5] = np.clip(states[:, 2:4], -5.0, 5.0)  # PointEnv._clip_velocity, before the step
        control = np.clip(np.asarray(actions, dtype=np.float32), -1.0, 1.0).astype(np.float64)[:, None]
        out, _ = self._rollout.rollout(self.model, self._data, initial, control, nstep=1)
        return out[:, 0, 1:5]

    def replay(self, s0, actions):
        """Open loop: states s_0..s_{L-1} [B, L, 4] from executing actions a_0..a_{L-2} [B, L, 2] from s0 [B, 4].

        Torch in, torch out (s0's dtype and device); state 0 is s0 exactly. What a perfect DM would return.
        """
        import torch

        s, a = s0.double().cpu().numpy(), actions.float().cpu().numpy()
        out = np.empty((a.shape[0], a.shape[1], s.shape[1]))
        out[:, 0] = s
        for t in range(a.shape[1] - 1):
            out[:, t + 1] = self.step(out[:, t], a[:, t])
        result = torch.as_tensor(out, dtype=s0.dtype, device=s0.device)
        result[:, 0] = s0
        return result

    def rollout(self, policy, s0, L: int, context=None):
        """Closed loop: the policy acting in the real simulator from s0 [B, 4] for L states; the context (goal), if
        any, rides along for the policy. Returns states [B, L, 4] and actions [B, L, A] (a_t = policy(s_t), the last
        one included, as EnsembleDynamics.rollout), as tensors on s0's device: true on-policy rollouts."""
        import torch

        B = len(s0)
        states = torch.empty(B, L, s0.shape[1], dtype=s0.dtype, device=s0.device)
        actions = None
        s = s0.double().cpu().numpy()
        for t in range(L):
            states[:, t] = torch.as_tensor(s, dtype=s0.dtype, device=s0.device) if t else s0
            obs = states[:, t] if context is None or context.shape[-1] == 0 else torch.cat([states[:, t], context], -1)
            a = policy(obs)
            if actions is None:
                actions = torch.empty(B, L, a.shape[-1], dtype=a.dtype, device=a.device)
            actions[:, t] = a
            if t + 1 < L:
                s = self.step(s, a.float().cpu().numpy())
        return states, actions


def true_rewards(data, states, context):
    """The task's own reward for each transition of trajectories states [B, L, S] (torch): what the env pays on
    arriving at s_{t+1}, sparse or dense, against the goal the dataset's rewards use (the fixed task: the goal cell's
    centre; goal-conditioned: each trajectory's goal in `context`); [B, L-1]. What DyDiff's reward model learns."""
    goal = data.goal if data.goal is not None else context[:, None, :2]
    return goal_reward(states[:, 1:, :2], goal, data.dense_reward)
