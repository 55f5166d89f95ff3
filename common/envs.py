"""Environments: registration, observation flattening, termination rules, D4RL scores and evaluation."""

from __future__ import annotations

import contextlib
import functools
import io
import os
from typing import Callable

import gymnasium as gym
import numpy as np

_registered = False


def register_envs() -> None:
    """Register the Gymnasium-Robotics environments (PointMaze) once, quietly; maze envs leave no file behind."""
    global _registered
    if not _registered:
        # gymnasium_robotics prints an unrelated Adroit notice on import.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import gymnasium_robotics
        gym.register_envs(gymnasium_robotics)
        _remove_maze_xml_after_init()
        _registered = True


def _remove_maze_xml_after_init() -> None:
    """gymnasium-robotics writes every maze env's MuJoCo model to an XML file in the temporary folder
    (maze_v4.py, Maze.make_maze) and never removes it: each PointMaze env made would leave one behind. MuJoCo
    has read it by the end of the env's constructor, so the file is removed there."""
    from gymnasium_robotics.envs.maze import point_maze

    init = point_maze.PointMazeEnv.__init__
    if getattr(init, "removes_maze_xml", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        finally:
            path = getattr(self, "tmp_xml_file_path", None)
            if path:
                with contextlib.suppress(OSError):
                    os.remove(path)

    __init__.removes_maze_xml = True
    point_maze.PointMazeEnv.__init__ = __init__


def flatten_obs(obs) -> np.ndarray:
    """RL observation: a goal-conditioned dict becomes concat(observation, desired_goal)."""
    if isinstance(obs, dict):
        return np.concatenate([obs["observation"], obs["desired_goal"]], axis=-1)
    return np.asarray(obs)


class PhysicalObservation(gym.ObservationWrapper):
    """A goal-conditioned PointMaze env that shows the agent its physical state (x, y, vx, vy) alone.

    The fixed-goal (D4RL maze2d) task: rewards, goal, starts and episode length are the wrapped env's own.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = env.observation_space["observation"]

    def observation(self, observation):
        return observation["observation"]


def task_of(env_name: str) -> str:
    """The task family ('pointmaze', 'hopper', 'walker2d', 'halfcheetah' or 'other') of an env or dataset id."""
    name = env_name.lower().replace("_", "").replace("maze2d", "pointmaze")
    for task in ("pointmaze", "hopper", "walker2d", "halfcheetah"):
        if task in name:
            return task
    return "other"


def _hopper_done(obs):
    z, angle, rest = obs[..., 0], obs[..., 1], obs[..., 1:]
    # Hopper-v5 is_healthy: 0.7 < z, |angle| < 0.2, every entry of qpos[2:], qvel inside (-100, 100).
    healthy = (z > 0.7) & (z < float("inf")) & (angle > -0.2) & (angle < 0.2)
    healthy = healthy & ((rest > -100.0) & (rest < 100.0)).all(-1)
    return ~healthy


def _walker2d_done(obs):
    z, angle = obs[..., 0], obs[..., 1]
    # Walker2d-v5 is_healthy: 0.8 < z < 2.0, -1 < angle < 1.
    return ~((z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0))


def _never_done(obs):
    return obs[..., 0] != obs[..., 0]  # False, except for NaN states


TERMINATION_FNS = {"hopper": _hopper_done, "walker2d": _walker2d_done}


def termination_fn(task: str) -> Callable:
    """done(next_obs) for synthetic transitions: the env's own healthy-state rule (NumPy or torch, [..., D]).

    Hopper and Walker2d terminate when unhealthy; HalfCheetah and PointMaze never terminate.
    Comparisons with NaN are false, so a NaN state counts as terminal.
    """
    return TERMINATION_FNS.get(task, _never_done)


def set_physical_state(env: gym.Env, task: str, state) -> None:
    """Put the simulator in a physical state taken from an observation.

    PointMaze: qpos = (x, y), qvel = (vx, vy). MuJoCo locomotion: qpos[1:] and qvel are in the
    observation; the x position (qpos[0]) is not, and no dynamics depend on it, so it is set to 0.
    """
    u = env.unwrapped
    state = np.asarray(state, dtype=np.float64)
    if task == "pointmaze":
        u.point_env.set_state(state[:2], state[2:4])
    elif task in ("hopper", "walker2d", "halfcheetah"):
        nq = u.model.nq
        u.set_state(np.r_[0.0, state[: nq - 1]], state[nq - 1 :])
    else:
        raise ValueError(f"cannot set the simulator state of task {task!r}; known: pointmaze, hopper, walker2d, halfcheetah")


def physical_part(obs) -> np.ndarray:
    """The physical state in an env observation (PointMaze: obs['observation'])."""
    return np.asarray(obs["observation"] if isinstance(obs, dict) else obs)


def replay_actions(env: gym.Env, task: str, s0, actions) -> np.ndarray:
    """Real states s_0..s_{L-1} from executing actions a_0..a_{L-2} from physical state s0; [L, S].

    Steps the unwrapped env, so a time limit or a termination does not stop the replay.
    """
    env.reset(seed=0)
    set_physical_state(env, task, s0)
    states = [np.asarray(s0, dtype=np.float64)]
    for a in actions[:-1]:
        obs = env.unwrapped.step(np.asarray(a, dtype=np.float32))[0]
        states.append(physical_part(obs))
    return np.stack(states)


def step_from(env: gym.Env, task: str, states, actions) -> np.ndarray:
    """The real simulator's next state from each (state, action) pair: [N, S] from [N, S] and [N, A]."""
    env.reset(seed=0)
    out = []
    for s, a in zip(np.asarray(states, dtype=np.float64), np.asarray(actions)):
        set_physical_state(env, task, s)
        out.append(physical_part(env.unwrapped.step(np.asarray(a, dtype=np.float32))[0]))
    return np.stack(out) if out else np.zeros((0, np.asarray(states).shape[-1]))


def normalized_score(returns, ref_min: float, ref_max: float):
    """D4RL normalized score: 100 * (R - ref_min) / (ref_max - ref_min)."""
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


def vector_env(make_env: Callable[[], gym.Env], n: int) -> gym.vector.SyncVectorEnv:
    """`n` copies of make_env() stepped together in this process.

    A copy whose episode ended resets itself, unseeded, on the step after (NEXT_STEP autoreset); evaluate
    counts no reward from then on.
    """
    return gym.vector.SyncVectorEnv([make_env] * n, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def numpy_policy(policy: Callable, device) -> Callable[[np.ndarray], np.ndarray]:
    """A torch policy (float32 tensor [n, obs_dim] on `device` -> tensor [n, act_dim]) on NumPy arrays, for evaluate."""
    import torch

    def act(obs: np.ndarray) -> np.ndarray:
        return policy(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()

    return act


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray], envs: gym.vector.VectorEnv, seed: int, ref_min: float, ref_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """One episode in each of the `envs.num_envs` copies of a vector env (see vector_env), all stepped together.

    `policy` maps flat observations [n, obs_dim] to actions [n, act_dim]: one call per step for every copy.
    Copy i is reset with seed `seed + i`, so episode i is the one a single env would give after
    env.reset(seed=seed + i). Copies that finished early go on stepping (autoreset) until the last one
    finishes, without counting their rewards. Returns (returns, normalized scores), each [n].
    """
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(envs.num_envs)
    running = np.ones(envs.num_envs, dtype=bool)
    while running.any():
        actions = np.asarray(policy(flatten_obs(obs)), dtype=np.float32)
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        # A finished copy restarts on its next step: its reward no longer counts.
        returns[running] += rewards[running]
        running &= ~(terminated | truncated)
    return returns, normalized_score(returns, ref_min, ref_max)
