"""D4RL datasets through Minari, with no network needed: names, loading, flattening, DM windows.

    python -m common.datasets maze2d-umaze maze2d-medium maze2d-large   # make / check the datasets

Load order for a dataset: the local Minari store -> a download (only when the remote answers within
seconds; skipped with offline=True or DYDIFF_OFFLINE=1) -> local generation (PointMaze only).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch

from common import d4rl, pointmaze
from common.envs import PhysicalObservation, normalized_score, register_envs, task_of, vector_env

OFFLINE_ENV_VAR = "DYDIFF_OFFLINE"
MUJOCO_TASKS = ("hopper", "halfcheetah", "walker2d")
MUJOCO_LEVELS = ("simple", "medium", "expert", "medium-expert")


def known_env_ids() -> list[str]:
    """Every D4RL-style --env-id name this project maps to Minari."""
    names = [f"maze2d-{m}{d}" for m in pointmaze.MAZES for d in ("", "-dense")]
    names += [f"{t}-{lvl}" for t in MUJOCO_TASKS for lvl in MUJOCO_LEVELS]
    return names


@dataclass(frozen=True)
class DatasetSpec:
    """What an --env-id stands for: its Minari dataset ids, and how to make it locally if that is possible."""

    env_id: str
    minari_ids: tuple[str, ...]
    maze: str | None = None  # PointMaze layout, when the data can be generated locally
    dense: bool = False
    fixed_goal: bool = False  # D4RL's maze2d task (maze2d-* names), made from the goal-conditioned Minari data

    @property
    def default_steps(self) -> int:
        """Steps of a locally generated dataset when none are asked for: D4RL maze2d-v1's size for the fixed-goal task
        (1M umaze, 2M medium, 4M large), Minari's 1M for a Minari id."""
        return pointmaze.D4RL_STEPS[self.maze] if self.fixed_goal else pointmaze.DEFAULT_STEPS

    def local_id(self, dataset_steps: int | None = None, seed: int = pointmaze.DEFAULT_SEED) -> str | None:
        """Minari id of the locally generated PointMaze dataset (never the official id). Minari's recipe (1M steps,
        seed 123) has the plain name, local/pointmaze/large-v3; any other size or seed is in the name."""
        if self.maze is None:
            return None
        dataset_steps = self.default_steps if dataset_steps is None else dataset_steps
        tag = (
            ""
            if (dataset_steps, seed) == (pointmaze.DEFAULT_STEPS, pointmaze.DEFAULT_SEED)
            else f"-{dataset_steps}steps-seed{seed}"
        )
        return f"local/pointmaze/{self.maze}{'-dense' if self.dense else ''}{tag}-{pointmaze.RECIPE}"


def resolve_env_id(env_id: str) -> DatasetSpec:
    """Map a D4RL-style name (maze2d-large, hopper-medium-expert, ...) or a raw Minari id to its datasets."""
    if "/" in env_id:  # a raw Minari id, e.g. mujoco/hopper/medium-v0 or local/pointmaze/large-v2
        parts = env_id.split("/")
        if len(parts) >= 3 and parts[-2] == "pointmaze":
            name = parts[-1].rsplit("-v", 1)[0]
            maze, dense = name.removesuffix("-dense"), name.endswith("-dense")
            if maze in pointmaze.MAZES:  # the goal-conditioned task; only the official ids can be generated here
                return DatasetSpec(env_id, (env_id,), maze if parts[0] != "local" else None, dense)
        return DatasetSpec(env_id, (env_id,))
    known = ", ".join(known_env_ids())
    if env_id.startswith("maze2d-"):
        name = env_id.removeprefix("maze2d-")
        maze, dense = name.removesuffix("-dense"), name.endswith("-dense")
        if maze in pointmaze.MAZES:
            return DatasetSpec(env_id, (f"D4RL/pointmaze/{maze}{'-dense' if dense else ''}-v2",), maze, dense, True)
    task, _, level = env_id.partition("-")
    if task in MUJOCO_TASKS:
        if level == "medium-replay":
            raise ValueError(
                f"--env-id {env_id!r}: Minari has no MuJoCo medium-replay dataset (D4RL's was never ported); pass D4RL's "
                f"own file instead (--env-id path/to/{task}-medium-replay-v2.hdf5, docs/datasets.md), pick another level "
                f"or pass a Minari id with a slash. Known: {known}"
            )
        if level == "medium-expert":
            return DatasetSpec(env_id, (f"mujoco/{task}/medium-v0", f"mujoco/{task}/expert-v0"))
        if level in MUJOCO_LEVELS:
            return DatasetSpec(env_id, (f"mujoco/{task}/{level}-v0",))
    raise ValueError(
        f"unknown --env-id {env_id!r}; known: {known} (or a Minari dataset id such as mujoco/hopper/medium-v0, or a D4RL "
        f"file such as path/to/maze2d-large-v1.hdf5)"
    )


def datasets_root() -> str:
    """Where Minari keeps datasets on this machine (MINARI_DATASETS_PATH or ~/.minari/datasets)."""
    from minari.storage import get_dataset_path

    return str(get_dataset_path())


def _is_local(dataset_id: str) -> bool:
    import minari

    return dataset_id in minari.list_local_datasets()


def remote_reachable(timeout: float = 3.0) -> bool:
    """Whether Minari's remote answers a TCP connection within `timeout` seconds."""
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    if remote.startswith("gcp://"):
        host = "storage.googleapis.com"
    else:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _fetch(spec: DatasetSpec, offline: bool, generate: bool, dataset_steps: int, seed: int, progress: bool) -> list[str]:
    """Make every Minari dataset of `spec` available locally; return the ids to load."""
    import minari

    if all(_is_local(i) for i in spec.minari_ids):
        if spec.fixed_goal and dataset_steps != pointmaze.DEFAULT_STEPS:
            print(
                f"[dydiff] {spec.env_id}: using Minari's official {spec.minari_ids[0]} as it is (1M steps); D4RL's "
                f"maze2d-{spec.maze}-v1 held {pointmaze.D4RL_STEPS[spec.maze]:,}, and --dataset-steps applies to "
                f"generated data only (move the official dataset out of {datasets_root()} to generate that size)",
                file=sys.stderr,
            )
        return list(spec.minari_ids)
    local_id = spec.local_id(dataset_steps, seed)
    if local_id and _is_local(local_id):
        return [local_id]
    if not offline and remote_reachable():
        try:
            for i in spec.minari_ids:
                if not _is_local(i):
                    minari.download_dataset(i)
            return list(spec.minari_ids)
        except Exception as e:  # a failed download falls through to the local fallback
            print(f"[dydiff] download of {spec.minari_ids} failed: {e}", file=sys.stderr)
    if local_id and generate:
        print(
            f"[dydiff] {spec.minari_ids[0]} is not available offline; generating {local_id} "
            f"({dataset_steps:,} steps, seed {seed}) into {datasets_root()} — later runs load it from there.",
            file=sys.stderr,
        )
        pointmaze.generate_dataset(local_id, spec.maze, spec.dense, dataset_steps=dataset_steps, seed=seed, progress=progress)
        return [local_id]
    missing = [i for i in spec.minari_ids if not _is_local(i)]
    raise FileNotFoundError(
        f"dataset {', '.join(missing)} for --env-id {spec.env_id!r} is not in the local Minari store "
        f"({datasets_root()}) and could not be downloaded (no network). On a machine with network run "
        + " && ".join(f"`minari download {i}`" for i in missing)
        + ", then copy those folders from its Minari store into this one (or point MINARI_DATASETS_PATH at them)."
    )


@dataclass
class OfflineData:
    """A dataset flattened for RL, plus the physical segments that DM windows need.

    Observations are what the policy sees: for PointMaze concat(observation, desired_goal). The first
    `state_dim` entries are the physical state (modelled by the DM and the dynamics ensemble); the rest
    is task context, constant along a transition. Transitions are stored in dataset order, so a physical
    segment — consecutive episodes whose first physical state equals the previous episode's last one —
    is the contiguous range segment_starts[k]:segment_ends[k].
    """

    env_id: str
    dataset_ids: tuple[str, ...]
    task: str
    observations: np.ndarray  # [N, obs_dim] float32
    actions: np.ndarray  # [N, A] float32
    rewards: np.ndarray  # [N] float32
    next_observations: np.ndarray  # [N, obs_dim] float32
    terminals: np.ndarray  # [N] bool, true terminations only
    timeouts: np.ndarray  # [N] bool, truncations
    state_dim: int
    episode_starts: np.ndarray  # [E] int64, where each Minari episode begins
    segment_starts: np.ndarray  # [K] int64
    segment_ends: np.ndarray  # [K] int64, exclusive
    ref_min_score: float
    ref_max_score: float
    minari_dataset: object = field(repr=False, default=None)  # first component, for its evaluation env
    form: str = ""  # PointMaze: "fixed-goal" (D4RL's maze2d task) or "goal-conditioned" (Minari's); else ""
    goal: np.ndarray | None = None  # the fixed goal (x, y) of the fixed-goal task
    dense_reward: bool = False  # PointMaze: the dense reward exp(-distance) instead of the sparse one
    d4rl_ref_min_score: float | None = None  # D4RL maze2d-v1's reference scores, for scores next to the paper's
    d4rl_ref_max_score: float | None = None
    eval_env_maker: Callable | None = field(repr=False, default=None)  # max_steps -> env, where no Minari dataset is
    d4rl_file: str | None = None  # the D4RL .hdf5 file the data come from (common.d4rl), if any

    @property
    def size(self) -> int:
        return len(self.actions)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def fingerprint(self) -> str:
        """A short hash of the task's data (observations, rewards, terminals too): the reward model records it.

        The two maze2d tasks of one dataset have different fingerprints and the same physical_fingerprint.
        """
        h = hashlib.sha256(",".join(self.dataset_ids).encode())
        for a in (self.observations, self.actions, self.rewards, self.terminals, self.segment_starts):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    @property
    def physical_fingerprint(self) -> str:
        """A short hash of the physical data alone (states, actions, segments): the DM and the ensemble record it."""
        h = hashlib.sha256(("physical:" + ",".join(self.dataset_ids)).encode())
        for a in (self.observations[:, : self.state_dim], self.actions, self.segment_starts, self.segment_ends):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def d4rl_normalized_score(self, returns):
        """Returns on D4RL maze2d-v1's scale (d4rl/infos.py), to sit next to published maze2d scores; None elsewhere."""
        if self.d4rl_ref_min_score is None:
            return None
        return normalized_score(returns, self.d4rl_ref_min_score, self.d4rl_ref_max_score)

    def describe(self) -> dict:
        """What a run trains on, for its run folder and result: the task's form, dataset ids, sizes, fingerprints."""
        return dict(
            form=self.form,
            dataset_ids=list(self.dataset_ids),
            size=self.size,
            obs_dim=self.obs_dim,
            fingerprint=self.fingerprint,
            physical_fingerprint=self.physical_fingerprint,
            **({"d4rl_file": self.d4rl_file} if self.d4rl_file else {}),
        )

    def tensors(self, device) -> dict:
        """The whole dataset as tensors on `device`: obs, actions, rewards, next_obs, dones (terminals, float)."""
        return dict(
            obs=torch.as_tensor(self.observations, device=device),
            actions=torch.as_tensor(self.actions, device=device),
            rewards=torch.as_tensor(self.rewards, device=device),
            next_obs=torch.as_tensor(self.next_observations, device=device),
            dones=torch.as_tensor(self.terminals, dtype=torch.float32, device=device),
        )

    def observation_stats(self, normalize: bool, device) -> tuple:
        """(mean, std) of the observations for z-scoring them, as float32 tensors; (0, 1) when not `normalize`."""
        mean = self.observations.mean(0) if normalize else np.zeros(self.obs_dim)
        std = self.observations.std(0) + 1e-3 if normalize else np.ones(self.obs_dim)
        return (
            torch.as_tensor(mean, dtype=torch.float32, device=device),
            torch.as_tensor(std, dtype=torch.float32, device=device),
        )

    def make_eval_env(self, max_steps: int | None = None):
        """The dataset's real evaluation environment (the fixed-goal task: observing the physical state alone), its
        episodes cut at `max_steps` (None: the registration's length, e.g. 800 for maze2d-large, 1000 for MuJoCo)."""
        register_envs()
        if self.eval_env_maker is not None:  # a D4RL file: common.d4rl.eval_env_maker
            return self.eval_env_maker(max_steps)
        kwargs = {} if max_steps is None else {"max_episode_steps": max_steps}
        env = self.minari_dataset.recover_environment(eval_env=True, **kwargs)
        return PhysicalObservation(env) if self.form == "fixed-goal" else env

    def make_eval_envs(self, n: int, max_steps: int | None = None):
        """`n` copies of the evaluation environment as one vector env, for common.envs.evaluate."""
        return vector_env(lambda: self.make_eval_env(max_steps), n)

    def windows(self, L: int) -> tuple[np.ndarray, np.ndarray]:
        """All DM windows of length L: (start index, number of real rows) for each. See segment_windows."""
        return segment_windows(self.segment_starts, self.segment_ends, L)

    def gather_windows(self, starts: np.ndarray, lengths: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows [W, L, S+A] of rows (s_t, a_t) over physical states, and their real-row mask [W, L]."""
        S = self.state_dim
        return gather_windows(self.observations[:, :S], self.actions, self.next_observations[:, :S], starts, lengths, L)


def segment_windows(segment_starts: np.ndarray, segment_ends: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Stride-1 windows of L rows that never cross a segment boundary.

    A segment of T >= L transitions gives T - L + 1 windows of L real rows. A shorter segment gives one
    window with its T real rows; the rest is padding (see gather_windows).
    """
    if L < 1:
        raise ValueError(f"window length L must be >= 1, got {L}")
    lengths = segment_ends - segment_starts
    counts = np.maximum(lengths - L + 1, 1)
    seg = np.repeat(np.arange(len(lengths)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return segment_starts[seg] + offsets, np.minimum(lengths[seg], L)


def gather_windows(states, actions, next_states, starts, lengths, L):
    """Rows t = start .. start+L-1 as concat(s_t, a_t); returns (windows [W, L, S+A], mask [W, L]).

    Padding rule for a window with fewer than L real rows: every padding row is the segment's final
    state s_T (the next state of its last transition) with a zero action, and its mask entry is False,
    so losses can skip it. Works on NumPy arrays or on torch tensors (on their device).
    """
    as_numpy = not isinstance(states, torch.Tensor)
    states, actions, next_states = (torch.as_tensor(a) for a in (states, actions, next_states))
    starts = torch.as_tensor(starts, device=states.device)
    lengths = torch.as_tensor(lengths, device=states.device)
    t = torch.arange(L, device=states.device)
    mask = t[None, :] < lengths[:, None]
    idx = starts[:, None] + torch.minimum(t[None, :], lengths[:, None] - 1)
    x = torch.cat([states[idx], actions[idx]], dim=-1)
    pad = ~mask[..., None]
    last = next_states[starts + lengths - 1][:, None, :]  # [W, 1, S]
    S = states.shape[1]
    x = torch.cat([torch.where(pad, last, x[..., :S]), x[..., S:].masked_fill(pad, 0.0)], dim=-1)
    return (x.numpy(), mask.numpy()) if as_numpy else (x, mask)


def _flatten(dataset_ids: list[str], env_id: str) -> OfflineData:
    import minari

    obs, nobs, acts, rews, terms, truncs, phys_first, phys_last, ep_len = [], [], [], [], [], [], [], [], []
    first = None
    state_dim = None
    for did in dataset_ids:
        ds = minari.load_dataset(did)
        first = first or ds
        for ep in ds.storage.get_episodes(range(ds.total_episodes)):
            o = ep["observations"]
            if isinstance(o, dict):  # goal-conditioned: physical state + the goal as context
                phys, goal = np.asarray(o["observation"]), np.asarray(o["desired_goal"])
                # A transition is scored against the goal in force during its step, which the env reports in
                # the step's resulting observation: an episode's first observation may still carry the goal
                # of the episode before (Minari's DataCollector starts an episode with the last one's final
                # observation, built before the env drew the new goal).
                cur = np.concatenate([phys[:-1], goal[1:]], axis=1)
                nxt = np.concatenate([phys[1:], goal[1:]], axis=1)
            else:
                phys = np.asarray(o)
                cur, nxt = phys[:-1], phys[1:]
            state_dim = phys.shape[1]
            obs.append(cur)
            nobs.append(nxt)
            acts.append(np.asarray(ep["actions"]).reshape(len(cur), -1))
            rews.append(ep["rewards"])
            terms.append(ep["terminations"])
            truncs.append(ep["truncations"])
            phys_first.append(phys[0])
            phys_last.append(phys[-1])
            ep_len.append(len(cur))
    ep_len = np.array(ep_len)
    ep_end = np.cumsum(ep_len)
    # Episode k+1 continues episode k's physics when it starts where k ended (and k did not terminate).
    joined = np.array(
        [np.array_equal(phys_first[k + 1], phys_last[k]) and not terms[k][-1] for k in range(len(ep_len) - 1)],
        dtype=bool,
    )
    new_segment = np.r_[True, ~joined]
    seg_first_ep = np.flatnonzero(new_segment)
    seg_last_ep = np.r_[seg_first_ep[1:] - 1, len(ep_len) - 1]
    segment_starts = (ep_end - ep_len)[seg_first_ep]
    segment_ends = ep_end[seg_last_ep]

    meta = first.storage.metadata
    ref_min, ref_max = meta.get("ref_min_score"), meta.get("ref_max_score")
    if ref_min is None or ref_max is None:
        raise ValueError(f"dataset {dataset_ids[0]} has no reference scores (ref_min_score / ref_max_score)")
    return OfflineData(
        env_id=env_id,
        dataset_ids=tuple(dataset_ids),
        task=task_of(dataset_ids[0]),
        observations=np.concatenate(obs).astype(np.float32),
        actions=np.concatenate(acts).astype(np.float32),
        rewards=np.concatenate(rews).astype(np.float32),
        next_observations=np.concatenate(nobs).astype(np.float32),
        terminals=np.concatenate(terms).astype(bool),
        timeouts=np.concatenate(truncs).astype(bool),
        state_dim=int(state_dim),
        episode_starts=(ep_end - ep_len).astype(np.int64),
        segment_starts=segment_starts.astype(np.int64),
        segment_ends=segment_ends.astype(np.int64),
        ref_min_score=float(ref_min),
        ref_max_score=float(ref_max),
        minari_dataset=first,
    )


CACHE_VERSION = 2  # bumped whenever the flattening changes
_CACHED_ARRAYS = (
    "observations",
    "actions",
    "rewards",
    "next_observations",
    "terminals",
    "timeouts",
    "episode_starts",
    "segment_starts",
    "segment_ends",
)


def _source_key(dataset_ids: list[str]) -> str:
    """Identifies the stored files of the datasets (path, size, mtime), so a stale cache is never used."""
    from pathlib import Path

    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for did in dataset_ids:
        for f in sorted((Path(datasets_root()) / did).rglob("*")):
            if f.is_file() and not f.name.startswith("dydiff-flat"):
                st = f.stat()
                h.update(f"{f.relative_to(datasets_root())}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _load_flat(dataset_ids: list[str], env_id: str) -> OfflineData:
    """_flatten, through a cache of the flat arrays kept beside the first dataset (written atomically).

    Reading a Minari HDF5 file episode by episode costs ~2 ms an episode; the cache loads in a second.
    """
    from pathlib import Path

    import minari

    key = _source_key(dataset_ids)
    name = "dydiff-flat-" + hashlib.sha256(",".join(dataset_ids).encode()).hexdigest()[:8] + ".npz"
    path = Path(datasets_root()) / dataset_ids[0] / name
    for stale in path.parent.glob("dydiff-flat-*.tmp*.npz"):  # left by a killed write
        stale.unlink(missing_ok=True)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return OfflineData(
                        env_id=env_id,
                        dataset_ids=tuple(dataset_ids),
                        task=str(z["task"]),
                        state_dim=int(z["state_dim"]),
                        ref_min_score=float(z["ref_min_score"]),
                        ref_max_score=float(z["ref_max_score"]),
                        minari_dataset=minari.load_dataset(dataset_ids[0]),
                        **{k: z[k] for k in _CACHED_ARRAYS},
                    )
        except Exception as e:  # truncated or damaged (zip, pickle, key errors): rebuild it
            print(f"[dydiff] {path} is damaged ({type(e).__name__}): rebuilding it", file=sys.stderr)
    try:
        data = _flatten(dataset_ids, env_id)
    except Exception as e:  # a damaged Minari file: h5py, pyarrow and json raise many kinds
        folder = Path(datasets_root()) / dataset_ids[0]
        raise ValueError(
            f"the Minari dataset {', '.join(dataset_ids)} in {folder} cannot be read ({type(e).__name__}: {e}); "
            f"delete that folder and run again (a local PointMaze dataset is generated again, a Minari one "
            f"downloaded again)"
        ) from None
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        np.savez(
            tmp,
            key=key,
            task=data.task,
            state_dim=data.state_dim,
            ref_min_score=data.ref_min_score,
            ref_max_score=data.ref_max_score,
            **{k: getattr(data, k) for k in _CACHED_ARRAYS},
        )
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full store: work without the cache
        print(f"[dydiff] could not write the cache {path} ({e.strerror or e}); loading goes on without it", file=sys.stderr)
    finally:  # failed or interrupted: no temporary file stays
        tmp.unlink(missing_ok=True)
    return data


def fixed_goal_task(data: OfflineData, maze: str, dense: bool) -> OfflineData:
    """D4RL's maze2d task made from goal-conditioned PointMaze data: the one place where the relabel happens.

    D4RL's maze2d-*-v1 data were collected by a controller driving to random goals, stored with 4-dim
    observations (x, y, vx, vy), and every reward was then relabelled against the evaluation env's one fixed
    goal: the agent must stitch behaviour aimed elsewhere into one path to one goal. Here:
    - observation = the physical state (x, y, vx, vy); the goal leaves the observation;
    - reward of a transition = what the evaluation env pays on arriving at its next state, against the centre of
      the evaluation goal cell (sparse: 1 within 0.45; dense: exp(-distance));
    - no terminals (the evaluation env never terminates); a timeout marks the end of each physical segment
      (where the recorded trajectory is cut), not Minari's goal-reached truncations, which mean nothing here.
    Where this differs from D4RL: D4RL's relabel script (scripts/generation/relabel_maze2d_rewards.py) scored
    the transition's current state, with radius 0.5, against its env's goal; its data came from its own
    controller on its own MuJoCo port. The sizes are D4RL's by default (1M / 2M / 4M steps for umaze / medium / large;
    Minari's official data: 1M each).
    """
    S = data.state_dim
    goal = pointmaze.goal_xy(maze)
    timeouts = np.zeros(data.size, dtype=bool)
    timeouts[data.segment_ends - 1] = True
    d4rl_min, d4rl_max = pointmaze.D4RL_REF_SCORES[(maze, dense)]
    return replace(
        data,
        observations=np.ascontiguousarray(data.observations[:, :S]),
        next_observations=np.ascontiguousarray(data.next_observations[:, :S]),
        rewards=pointmaze.goal_reward(data.next_observations[:, :2], goal, dense),
        terminals=np.zeros(data.size, dtype=bool),
        timeouts=timeouts,
        form="fixed-goal",
        goal=goal,
        dense_reward=dense,
        d4rl_ref_min_score=d4rl_min,
        d4rl_ref_max_score=d4rl_max,
    )


def load_dataset(
    env_id: str,
    offline: bool | None = None,
    generate: bool = True,
    dataset_steps: int | None = None,
    seed: int = pointmaze.DEFAULT_SEED,
    progress: bool = True,
) -> OfflineData:
    """Load `env_id` (D4RL-style name, Minari id or D4RL .hdf5 file) as OfflineData, fetching or generating it if needed.

    offline: skip the download attempt (default: the DYDIFF_OFFLINE environment variable).
    dataset_steps, seed: size and seed of a locally generated PointMaze dataset (tests use ~10k steps); None: D4RL's
    size for maze2d-* (1M umaze, 2M medium, 4M large), Minari's 1M for a Minari id (DatasetSpec.default_steps).
    A path ending in .hdf5 is one of D4RL's own files, read by common.d4rl.load_file (no Minari, no cache).
    """
    if d4rl.is_d4rl_file(env_id):
        register_envs()
        return d4rl.load_file(env_id)
    spec = resolve_env_id(env_id)
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV_VAR, "0").lower() not in ("", "0", "false", "no")
    dataset_steps = spec.default_steps if dataset_steps is None else dataset_steps
    if dataset_steps < 1:
        raise ValueError(f"dataset_steps must be >= 1, got {dataset_steps}")
    register_envs()
    ids = _fetch(spec, offline, generate, dataset_steps, seed, progress)
    data = _load_flat(ids, env_id)
    if spec.fixed_goal:
        return fixed_goal_task(data, spec.maze, spec.dense)
    if data.task == "pointmaze" and data.obs_dim > data.state_dim:
        data.form = "goal-conditioned"
        maze, dense = _pointmaze_layout(ids[0])
        data.dense_reward = dense
        if maze is not None:
            data.d4rl_ref_min_score, data.d4rl_ref_max_score = pointmaze.D4RL_REF_SCORES[(maze, dense)]
    return data


def _pointmaze_layout(dataset_id: str) -> tuple[str | None, bool]:
    """(maze, dense) of a PointMaze dataset id: D4RL/pointmaze/large-dense-v2, local/pointmaze/umaze-10000steps-seed0-v3."""
    name = dataset_id.split("/")[-1].rsplit("-v", 1)[0]
    for maze in pointmaze.MAZES:
        if name == maze or name.startswith(maze + "-"):
            return maze, "-dense" in name
    return None, False


def main(argv: list[str] | None = None) -> None:
    """Make (if needed) and summarise datasets: python -m common.datasets maze2d-umaze [...] [--dataset-steps N]."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("env_ids", nargs="+", help="--env-id names, e.g. maze2d-umaze maze2d-medium maze2d-large")
    parser.add_argument(
        "--dataset-steps",
        type=int,
        default=None,
        help="steps of a generated PointMaze dataset (default: D4RL's size for maze2d-*: 1M umaze, 2M medium, 4M large; "
        "1M for a Minari id)",
    )
    parser.add_argument("--seed", type=int, default=pointmaze.DEFAULT_SEED, help="seed of a generated PointMaze dataset")
    parser.add_argument("--offline", action="store_true", help="do not try to download")
    args = parser.parse_args(argv)
    print(f"Minari datasets root: {datasets_root()}")
    for env_id in args.env_ids:
        import time

        t0 = time.time()
        data = load_dataset(env_id, offline=args.offline or None, dataset_steps=args.dataset_steps, seed=args.seed)
        episodes = len(data.episode_starts)
        print(
            f"{env_id}: {', '.join(data.dataset_ids)}{' (' + data.form + ' task)' if data.form else ''} | "
            f"{data.size:,} steps, {episodes:,} episodes, "
            f"{len(data.segment_starts):,} physical segments | obs {data.obs_dim} (state {data.state_dim}), "
            f"action {data.action_dim} | ref_min {data.ref_min_score:.2f}, ref_max {data.ref_max_score:.2f} | "
            f"fingerprint {data.fingerprint} | {time.time() - t0:.1f} s"
        )


if __name__ == "__main__":
    main()
