"""D4RL's own `.hdf5` files as a data source: `--env-id path/to/maze2d-large-v1.hdf5`, `hopper-medium-replay-v2.hdf5`.

The file's name says which D4RL dataset it holds (D4RL's own names, `_` or `-` alike); the file is read with h5py
and becomes the same OfflineData as a Minari dataset. What this module takes from D4RL (Farama-Foundation/D4RL),
each rule beside the code that follows it:
- d4rl/__init__.py, qlearning_dataset and sequence_dataset: which steps are transitions, where episodes end;
- d4rl/infos.py: the reference scores of the normalized score;
- d4rl/pointmaze/maze_model.py: the maze strings and the frame the maze2d states live in;
- d4rl/pointmaze/__init__.py: each maze2d-*-v1's maze, reward type and episode length;
- scripts/generation/generate_maze2d_datasets.py, relabel_maze2d_rewards.py: how the maze2d files were written;
- scripts/generation/mujoco/collect_data.py: how the MuJoCo files were written.
"""

from __future__ import annotations

import functools
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import pointmaze

# d4rl/pointmaze/maze_model.py: LARGE_MAZE, MEDIUM_MAZE and U_MAZE, one string per row ('#' wall, 'O' free, 'G' the
# goal cell); each maze2d-<maze>-v1 uses its maze's string (d4rl/pointmaze/__init__.py). The tests check that the
# walls are gymnasium-robotics' maps and the G cells our evaluation goal cells.
MAZE_STRINGS = {
    "umaze": ("#####", "#GOO#", "###O#", "#OOO#", "#####"),
    "medium": ("########", "#OO##OO#", "#OO#OOO#", "##OOO###", "#OO#OOO#", "#O#OO#O#", "#OOO#OG#", "########"),
    "large": (
        "############",
        "#OOOO#OOOOO#",
        "#O##O#O#O#O#",
        "#OOOOOO#OOO#",
        "#O####O###O#",
        "#OO#O#OOOOO#",
        "##O#O#O#O###",
        "#OO#OOO#OGO#",
        "############",
    ),
}
# maze_model.py, point_maze(): the particle's body sits at (1.2, 1.2) and its slide joints start there, so qpos is the
# displacement from (1.2, 1.2); the walls of maze-string cell (row, col) sit at (row + 1, col + 1). A cell's centre is
# therefore at qpos (row - 0.2, col - 0.2): in cell units, row = qpos[0] + 0.2, col = qpos[1] + 0.2.
PARTICLE_BODY = 1.2
CELL_ORIGIN = 1.0
QPOS_OFFSET = PARTICLE_BODY - CELL_ORIGIN  # 0.2

# d4rl/infos.py, REF_MIN_SCORE / REF_MAX_SCORE: the gym-mujoco v1 and v2 datasets take the -random-v0 entry of their
# env; every level of -v0 has that same value.
MUJOCO_REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}
# Gymnasium's v4 envs: the model files and the reward and termination code of the mujoco-py v3 envs that D4RL collected
# with (its gym_mujoco registrations: 1000 steps), on the `mujoco` bindings. v5 would differ: Walker2d-v5 gives both feet
# friction 1.9 (v3/v4: 0.9 and 1.9), and Hopper-v5 and Walker2d-v5 no longer pay the healthy reward on the falling step.
MUJOCO_ENVS = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4"}
MUJOCO_EPISODE_STEPS = 1000
# observation, action, qpos and qvel sizes of each task (the v3 envs' observations: qpos[1:] and qvel)
SIZES = {"pointmaze": (4, 2, 2, 2), "hopper": (11, 3, 6, 6), "halfcheetah": (17, 6, 9, 9), "walker2d": (17, 6, 9, 9)}
MUJOCO_LEVELS = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")

_MAZE2D_NAME = re.compile(r"maze2d-(umaze|medium|large)(-sparse|-dense)?-v1")
_MUJOCO_NAME = re.compile(rf"(hopper|halfcheetah|walker2d)-({'|'.join(MUJOCO_LEVELS)})-v([012])")
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def is_d4rl_file(env_id: str) -> bool:
    """Whether an --env-id names a D4RL file (it ends in .hdf5) rather than a dataset name."""
    return env_id.lower().endswith(".hdf5")


def env_label(env_id: str) -> str:
    """A folder-safe name for an --env-id: a D4RL file's stem (models/<stem>/, runs/<stem>__...), else the id with
    every character outside [A-Za-z0-9_.-] made '_' (a Minari id's slashes)."""
    name = Path(env_id).stem if is_d4rl_file(env_id) else env_id
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def known_names() -> list[str]:
    """The D4RL dataset names a file may carry."""
    names = [f"maze2d-{m}{r}-v1" for m in pointmaze.MAZES for r in ("", "-dense")]
    return names + [f"{t}-{lvl}-v2" for t in MUJOCO_REF_SCORES for lvl in MUJOCO_LEVELS]


@dataclass(frozen=True)
class D4RLTask:
    """What a D4RL file holds, as its name says: the dataset, its task family and what its evaluation needs."""

    name: str  # D4RL's env name, e.g. maze2d-large-v1, maze2d-large-dense-v1, hopper-medium-replay-v2
    task: str  # pointmaze, hopper, halfcheetah, walker2d
    maze: str | None = None
    dense: bool = False

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return SIZES[self.task]

    @property
    def ref_scores(self) -> tuple[float, float]:
        """(ref_min, ref_max) of d4rl/infos.py."""
        if self.task == "pointmaze":
            return pointmaze.D4RL_REF_SCORES[(self.maze, self.dense)]
        return MUJOCO_REF_SCORES[self.task]


def task_of_file(path: str) -> D4RLTask:
    """Which D4RL dataset a file holds, from its name: maze2d-large-v1.hdf5 or maze2d-large-sparse-v1.hdf5 (D4RL's
    download name), maze2d-large-dense-v1, hopper-medium-replay-v2 or hopper_medium_replay-v2 (likewise), ...

    The name decides, not the shapes: halfcheetah and walker2d both have 17-dim observations and 6-dim actions.
    """
    stem = Path(path).stem.lower().replace("_", "-")
    if m := _MAZE2D_NAME.fullmatch(stem):
        dense = m.group(2) == "-dense"
        return D4RLTask(f"maze2d-{m.group(1)}{'-dense' if dense else ''}-v1", "pointmaze", m.group(1), dense)
    if m := _MUJOCO_NAME.fullmatch(stem):
        return D4RLTask(stem, m.group(1))
    raise ValueError(
        f"cannot tell which D4RL dataset {path} holds from its name; give the file its D4RL name, e.g. "
        f"maze2d-large-v1.hdf5 or hopper-medium-replay-v2.hdf5 (known: {', '.join(known_names())}; MuJoCo -v0 and -v1 too)"
    )


def dataset_name(env_id: str) -> str:
    """The D4RL name of a D4RL file's dataset (hopper-medium-replay-v2), else the --env-id itself: what the scripts'
    per-dataset defaults (M, eta, ...) are chosen by. An unrecognised file name gives its stem (loading it then says why)."""
    if not is_d4rl_file(env_id):
        return env_id
    try:
        return task_of_file(env_id).name
    except ValueError:
        return Path(env_id).stem


def maze_shape(maze: str) -> tuple[int, int]:
    """(rows, columns) of a maze string."""
    rows = MAZE_STRINGS[maze]
    return len(rows), len(rows[0])


def maze2d_to_xy(states: np.ndarray, actions: np.ndarray | None, maze: str) -> tuple[np.ndarray, np.ndarray | None]:
    """D4RL maze2d states (qpos, qvel) [..., 4] and actions [..., 2] in gymnasium-robotics PointMaze's frame.

    D4RL: qpos[0] runs along the maze string's rows, qpos[1] along its columns, and a cell's centre is at
    (row - 0.2, col - 0.2) (QPOS_OFFSET). gymnasium-robotics (maze_v4.py, cell_rowcol_to_xy) centres the maze and puts
    cell (row, col)'s centre at x = col + 0.5 - columns / 2, y = rows / 2 - (row + 0.5). So x follows qpos[1] and y
    follows -qpos[0]; velocities and forces turn the same way (a rotation: the point mass's physics is unchanged).
    """
    rows, cols = maze_shape(maze)
    s = np.asarray(states, dtype=np.float64)
    x = s[..., 1] + QPOS_OFFSET + 0.5 - cols / 2
    y = rows / 2 - 0.5 - QPOS_OFFSET - s[..., 0]
    out = np.stack([x, y, s[..., 3], -s[..., 2]], axis=-1)
    if actions is None:
        return out, None
    a = np.asarray(actions, dtype=np.float64)
    return out, np.stack([a[..., 1], -a[..., 0]], axis=-1)


def _maze2d_eval_env(maze: str, dense: bool, max_steps: int | None):
    from common.envs import PhysicalObservation

    return PhysicalObservation(pointmaze.make_eval_env(maze, dense, max_steps))


def _mujoco_eval_env(task: str, max_steps: int | None):
    import gymnasium as gym

    with warnings.catch_warnings():  # "Hopper-v4 is out of date": chosen on purpose, see MUJOCO_ENVS
        warnings.simplefilter("ignore", DeprecationWarning)
        return gym.make(MUJOCO_ENVS[task], max_episode_steps=max_steps or MUJOCO_EPISODE_STEPS)


def eval_env_maker(spec: D4RLTask):
    """max_steps -> the evaluation env of a D4RL file's task (what OfflineData.make_eval_env calls).

    maze2d: our PointMaze evaluation env of that maze (goal cell G, random starts, 300 / 600 / 800 steps as D4RL's
    registrations), observing (x, y, vx, vy). MuJoCo: Gymnasium's v4 env (MUJOCO_ENVS), 1000 steps, terminating by
    its healthy-state rule as the v3 env did.
    """
    if spec.task == "pointmaze":
        return functools.partial(_maze2d_eval_env, spec.maze, spec.dense)
    return functools.partial(_mujoco_eval_env, spec.task)


def read_file(path: str, spec: D4RLTask) -> dict[str, np.ndarray]:
    """The arrays of a D4RL file (h5py), checked: every key D4RL's loaders need, one row per step, the task's sizes.

    Each problem stops with one line naming it. rewards, terminals and timeouts of shape [N, 1] are flattened, as
    D4RL's OfflineEnv.get_dataset does.
    """
    import h5py

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no D4RL file at {path}; download it (D4RL's dataset URLs are in d4rl/infos.py) or fix the path"
        )
    redownload = "download it again"
    optional = ("next_observations", "infos/qpos", "infos/qvel", "infos/goal")
    try:
        with h5py.File(path, "r") as f:
            keys = []
            f.visititems(lambda name, item: keys.append(name) if isinstance(item, h5py.Dataset) else None)
            arrays = {k: f[k][()] for k in REQUIRED_KEYS + optional if k in keys}
    except Exception as e:  # not HDF5, truncated, damaged: h5py raises OSError, ValueError and others
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"D4RL file {path} cannot be read ({type(e).__name__}: {message}); {redownload}") from None
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"D4RL file {path} has no {', '.join(repr(k) for k in missing)} (it has: {', '.join(keys) or 'nothing'}); "
            f"it is not a complete D4RL {spec.name} file: {redownload}"
        )
    obs_dim, act_dim, nq, nv = spec.sizes
    n = len(arrays["observations"]) if np.ndim(arrays["observations"]) >= 1 else 0
    for k in ("rewards", "terminals", "timeouts"):
        if np.ndim(arrays[k]) == 2 and arrays[k].shape[1] == 1:
            arrays[k] = arrays[k][:, 0]
    expected = {
        "observations": (n, obs_dim),
        "actions": (n, act_dim),
        "rewards": (n,),
        "terminals": (n,),
        "timeouts": (n,),
        "next_observations": (n, obs_dim),
        "infos/qpos": (n, nq),
        "infos/qvel": (n, nv),
    }
    if spec.task == "pointmaze":
        expected["infos/goal"] = (n, 2)
    for k, shape in expected.items():
        if k in arrays and np.shape(arrays[k]) != shape:
            raise ValueError(
                f"D4RL file {path}: {k!r} has shape {np.shape(arrays[k])}, expected {shape} for {spec.name} (one row per "
                f"step of 'observations'; sizes obs {obs_dim}, action {act_dim}); the file is damaged or holds another dataset"
            )
    if n < 2:
        raise ValueError(f"D4RL file {path} holds {n} steps; a dataset needs at least 2")
    for k in ("observations", "actions", "rewards", "next_observations"):
        if k in arrays and not np.isfinite(arrays[k]).all():
            raise ValueError(f"D4RL file {path}: {k!r} holds NaN or infinite values; the file is damaged: {redownload}")
    return arrays


def transitions(arrays: dict[str, np.ndarray], path: str = "the file") -> dict[str, np.ndarray]:
    """The transitions of a D4RL file and its episodes and physical segments, by D4RL's own rules.

    d4rl/__init__.py, qlearning_dataset: without next_observations, transition t is (observations[t],
    observations[t + 1]) for t < N - 1, and a step with timeouts[t] is skipped (observations[t + 1] begins another
    episode: D4RL drops the last step of every timeout episode). With next_observations (the MuJoCo -v1/-v2 files),
    every step is a transition with its stored next observation. sequence_dataset: an episode ends at a step with
    terminals or timeouts. A terminal step's next state must be in the file: without next_observations, D4RL's
    observations[t + 1] is the next episode's first observation, so a file with terminals and no next_observations is
    refused.
    A physical segment (DM windows) is a run of transitions whose next state is the next one's state, inside one episode.
    """
    obs = arrays["observations"]
    terminals, timeouts = arrays["terminals"].astype(bool), arrays["timeouts"].astype(bool)
    n = len(obs)
    if "next_observations" in arrays:
        keep = np.arange(n)
        next_obs = arrays["next_observations"]
    else:
        if terminals[:-1].any():
            raise ValueError(
                f"D4RL file {path} has terminal steps but no 'next_observations': the state a terminal step reached is not "
                f"in it; use the dataset's -v2 file, which stores next_observations"
            )
        keep = np.flatnonzero(~timeouts[:-1])
        next_obs = obs[keep + 1]
    states = obs[keep]
    ends = terminals[keep] | timeouts[keep]  # the episode ends with this transition (sequence_dataset)
    gap = np.r_[False, np.diff(keep) != 1]  # a skipped step lies before this transition: its episode ended there
    episode_start = np.r_[True, ends[:-1]] | gap
    # a segment also breaks inside an episode wherever a transition does not start from the state the last one reached
    broken = np.r_[True, (next_obs[:-1] != states[1:]).any(axis=1)]
    segment_start = episode_start | broken
    segment_starts = np.flatnonzero(segment_start)
    segment_ends = np.r_[segment_starts[1:], len(keep)]
    last = np.zeros(len(keep), dtype=bool)
    last[segment_ends - 1] = True
    return dict(
        index=keep,
        observations=states,
        next_observations=next_obs,
        actions=arrays["actions"][keep],
        rewards=arrays["rewards"][keep],
        terminals=terminals[keep],
        timeouts=last & ~terminals[keep],  # where a physical segment is cut without a terminal
        episode_starts=np.flatnonzero(episode_start).astype(np.int64),
        segment_starts=segment_starts.astype(np.int64),
        segment_ends=segment_ends.astype(np.int64),
    )


def maze2d_states(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """The physical state (qpos, qvel) of every record of a maze2d file, and how many records' observations are not it.

    D4RL's maze2d observation is (qpos, qvel) (maze_model.py, _get_obs), and the generation script records the
    simulator's qpos and qvel beside it (infos/qpos, infos/qvel). But when a goal is reached it does not advance its
    observation (generate_maze2d_datasets.py: `s = ns` only when not done), so the record after each such step repeats
    the previous observation while the simulator has moved on. Where the two disagree, the simulator's state is taken:
    it is the state the recorded action was applied to. Files without infos keep their observations.
    """
    obs = arrays["observations"]
    if "infos/qpos" not in arrays or "infos/qvel" not in arrays:
        return obs, 0
    sim = np.concatenate([arrays["infos/qpos"], arrays["infos/qvel"]], axis=1).astype(obs.dtype)
    stale = (obs != sim).any(axis=1)
    return np.where(stale[:, None], sim, obs), int(stale.sum())


def load_file(path: str, env_id: str | None = None):
    """A D4RL .hdf5 file as OfflineData: maze2d as D4RL's fixed-goal task in our PointMaze's frame, MuJoCo as stored.

    maze2d: observation = the physical state (x, y, vx, vy) converted into gymnasium-robotics' frame (maze2d_to_xy),
    actions likewise; the file's rewards kept (D4RL's relabel: within 0.5 of the goal cell's qpos, 0.2 off its centre,
    scored on the current state; dense exp(-distance) from it); no terminals. MuJoCo: observations, rewards and
    terminals as stored. Reference scores: D4RL's (infos.py).
    """
    from common.datasets import OfflineData

    spec = task_of_file(path)
    arrays = read_file(path, spec)
    stale = 0
    if spec.task == "pointmaze":
        arrays["observations"], stale = maze2d_states(arrays)
    t = transitions(arrays, path)
    obs, next_obs, actions = t["observations"], t["next_observations"], t["actions"]
    if spec.task == "pointmaze":
        obs, actions = maze2d_to_xy(obs, actions, spec.maze)
        next_obs, _ = maze2d_to_xy(next_obs, None, spec.maze)
    ref_min, ref_max = spec.ref_scores
    dropped = len(arrays["observations"]) - len(t["index"])
    print(
        f"[dydiff] D4RL file {path}: {spec.name}, {len(arrays['observations']):,} steps -> {len(t['index']):,} transitions "
        f"({dropped:,} dropped by D4RL's qlearning_dataset rule), {len(t['episode_starts']):,} episodes, "
        f"{len(t['segment_starts']):,} physical segments"
        + (
            f"; states in gymnasium-robotics' frame, the file's rewards kept"
            f"{f', {stale:,} stale observations replaced by infos/qpos, infos/qvel' if stale else ''}"
            if spec.task == "pointmaze"
            else ""
        ),
        file=sys.stderr,
    )
    data = OfflineData(
        env_id=env_id or path,
        dataset_ids=(f"d4rl:{spec.name}",),
        task=spec.task,
        observations=np.ascontiguousarray(obs, dtype=np.float32),
        actions=np.ascontiguousarray(actions, dtype=np.float32),
        rewards=np.ascontiguousarray(t["rewards"], dtype=np.float32),
        next_observations=np.ascontiguousarray(next_obs, dtype=np.float32),
        terminals=np.zeros(len(obs), dtype=bool) if spec.task == "pointmaze" else t["terminals"],
        timeouts=t["timeouts"],
        state_dim=spec.sizes[0],
        episode_starts=t["episode_starts"],
        segment_starts=t["segment_starts"],
        segment_ends=t["segment_ends"],
        ref_min_score=float(ref_min),
        ref_max_score=float(ref_max),
        eval_env_maker=eval_env_maker(spec),
        d4rl_file=str(path),
    )
    if spec.task == "pointmaze":
        data.form = "fixed-goal"
        data.goal = pointmaze.goal_xy(spec.maze)
        data.dense_reward = spec.dense
        data.d4rl_ref_min_score, data.d4rl_ref_max_score = float(ref_min), float(ref_max)
    return data
