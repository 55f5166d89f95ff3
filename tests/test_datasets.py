"""The data layer: names, loading offline, PointMaze generation, flattening, windows, scores, termination."""

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest

from common import datasets, pointmaze
from common.datasets import gather_windows, load_dataset, resolve_env_id, segment_windows
from common.envs import evaluate, normalized_score, register_envs, termination_fn

STEPS = 10_000


# ----------------------------------------------------------------------------- names
def test_maze2d_names_map_to_pointmaze_v2():
    spec = resolve_env_id("maze2d-large")
    assert spec.minari_ids == ("D4RL/pointmaze/large-v2",)
    assert spec.maze == "large" and not spec.dense
    assert spec.local_id(1_000_000) == "local/pointmaze/large-v3"
    assert spec.local_id() == "local/pointmaze/large-4000000steps-seed123-v3"  # D4RL maze2d-large-v1's size
    assert spec.local_id(20_000, 3) == "local/pointmaze/large-20000steps-seed3-v3"
    dense = resolve_env_id("maze2d-umaze-dense")
    assert dense.minari_ids == ("D4RL/pointmaze/umaze-dense-v2",) and dense.dense


def test_mujoco_names_and_medium_expert_combination():
    assert resolve_env_id("hopper-medium").minari_ids == ("mujoco/hopper/medium-v0",)
    assert resolve_env_id("walker2d-simple").minari_ids == ("mujoco/walker2d/simple-v0",)
    assert resolve_env_id("halfcheetah-medium-expert").minari_ids == (
        "mujoco/halfcheetah/medium-v0",
        "mujoco/halfcheetah/expert-v0",
    )
    assert resolve_env_id("hopper-medium").maze is None  # nothing to generate for MuJoCo


def test_raw_minari_ids_are_accepted():
    assert resolve_env_id("mujoco/hopper/expert-v0").minari_ids == ("mujoco/hopper/expert-v0",)
    official = resolve_env_id("D4RL/pointmaze/medium-v2")
    assert official.minari_ids == ("D4RL/pointmaze/medium-v2",) and official.maze == "medium"


@pytest.mark.parametrize("bad", ["maze2d-huge", "hopper", "ant-medium", "hopper-random"])
def test_unknown_names_list_the_known_ones(bad):
    with pytest.raises(ValueError, match="unknown --env-id") as err:
        resolve_env_id(bad)
    for known in ("maze2d-umaze", "maze2d-large", "hopper-medium-expert", "walker2d-expert"):
        assert known in str(err.value)


def test_medium_replay_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no MuJoCo medium-replay") as err:
        resolve_env_id("hopper-medium-replay")
    assert "maze2d-umaze" in str(err.value)


# ----------------------------------------------------------------------------- offline loading
def test_mujoco_dataset_offline_names_the_download_command():
    with pytest.raises(FileNotFoundError, match="minari download mujoco/walker2d/medium-v0"):
        load_dataset("walker2d-medium-expert", offline=True)


def test_offline_flag_and_unreachable_remote_skip_the_download(monkeypatch):
    calls = []
    monkeypatch.setattr(minari, "download_dataset", lambda i, **k: calls.append(i))
    monkeypatch.setattr(datasets, "remote_reachable", lambda timeout=3.0: calls.append("probe") or False)
    with pytest.raises(FileNotFoundError):
        load_dataset("hopper-expert", offline=False)
    assert calls == ["probe"]  # probed, found no network, never called the download
    calls.clear()
    monkeypatch.setenv("DYDIFF_OFFLINE", "1")
    with pytest.raises(FileNotFoundError):
        load_dataset("hopper-expert")
    assert calls == []  # offline: not even probed


def test_remote_probe_fails_fast_without_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert datasets.remote_reachable() is False


# ----------------------------------------------------------------------------- PointMaze generation
@pytest.fixture(scope="module")
def umaze():
    return load_dataset("maze2d-umaze", dataset_steps=STEPS, seed=0, progress=False)


@pytest.fixture(scope="module")
def umaze_gc(umaze):
    """The same data in Minari's goal-conditioned form: the local Minari id."""
    return load_dataset(umaze.dataset_ids[0], progress=False)


def _episodes(data):
    ends = np.r_[data.episode_starts[1:], data.size]
    return list(zip(data.episode_starts, ends))


def test_generated_pointmaze_is_a_minari_dataset(umaze):
    local_id = "local/pointmaze/umaze-10000steps-seed0-v3"
    assert umaze.dataset_ids == (local_id,)
    ds = minari.load_dataset(local_id)
    assert ds.total_steps == STEPS == umaze.size
    assert ds.total_episodes == len(umaze.episode_starts)
    assert ds.storage.metadata["ref_min_score"] == umaze.ref_min_score


def test_generation_is_deterministic_for_a_seed():
    _, a, _ = pointmaze.collect("umaze", dataset_steps=1500, seed=7, ref_episodes=0, progress=False)
    _, b, _ = pointmaze.collect("umaze", dataset_steps=1500, seed=7, ref_episodes=0, progress=False)
    _, c, _ = pointmaze.collect("umaze", dataset_steps=1500, seed=8, ref_episodes=0, progress=False)
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        np.testing.assert_array_equal(ea["actions"], eb["actions"])
        np.testing.assert_array_equal(ea["observations"]["observation"], eb["observations"]["observation"])
    assert not np.array_equal(a[0]["actions"], c[0]["actions"])


def test_expert_reaches_goals_and_each_success_truncates(umaze_gc):
    umaze = umaze_gc
    pos_next = umaze.next_observations[:, :2]
    goal = umaze.observations[:, 4:6]
    success = np.linalg.norm(pos_next - goal, axis=1) <= 0.45
    # A noisy expert in the U-maze reaches a goal every ~100 steps.
    assert len(umaze.episode_starts) > STEPS / 200
    # A truncation exactly at each success; the final step of the data is a truncation too.
    expected = success.copy()
    expected[-1] = True
    np.testing.assert_array_equal(umaze.timeouts, expected)
    assert not umaze.terminals.any()  # a continuing task never terminates
    # Sparse reward: 1 within 0.45 of the goal.
    np.testing.assert_array_equal(umaze.rewards, success.astype(np.float32))
    assert np.abs(umaze.actions).max() <= 1.0


def test_pointmaze_observation_layout(umaze_gc):
    umaze = umaze_gc
    assert umaze.form == "goal-conditioned"
    assert umaze.obs_dim == 6 and umaze.state_dim == 4 and umaze.action_dim == 2 and umaze.task == "pointmaze"
    for s, e in _episodes(umaze):
        goal = umaze.observations[s:e, 4:6]
        assert np.all(goal == goal[0]), "the goal is constant within an episode"
        np.testing.assert_array_equal(umaze.next_observations[s:e, 4:6], goal)
        np.testing.assert_array_equal(umaze.next_observations[s : e - 1, :4], umaze.observations[s + 1 : e, :4])
    # A new episode starts where the last one ended, with a new goal: one physical trajectory.
    s = umaze.episode_starts[1]
    np.testing.assert_array_equal(umaze.observations[s, :4], umaze.next_observations[s - 1, :4])
    assert not np.array_equal(umaze.observations[s, 4:], umaze.observations[s - 1, 4:])
    np.testing.assert_array_equal(umaze.segment_starts, [0])
    np.testing.assert_array_equal(umaze.segment_ends, [STEPS])


def test_reference_scores_and_evaluation_env(umaze):
    assert 0 <= umaze.ref_min_score < umaze.ref_max_score <= 300
    ds = minari.load_dataset(umaze.dataset_ids[0])
    assert ds.storage.metadata["num_episodes_average_score"] == 100
    env = umaze.make_eval_env()
    assert env.spec.max_episode_steps == 300
    assert env.spec.kwargs["reset_target"] is False and env.spec.kwargs["continuing_task"] is True
    maze_map = env.spec.kwargs["maze_map"]
    assert maze_map[1][1] == "g" and sum(row.count("g") for row in maze_map) == 1
    assert not any("r" in row for row in maze_map)  # no reset cell: every start is drawn at random


@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_evaluation_starts_vary_over_the_free_cells_outside_the_goal_radius(maze):
    env = pointmaze.make_eval_env(maze)
    assert env.spec.max_episode_steps == pointmaze.EVAL_EPISODE_STEPS[maze]
    grid = env.unwrapped.maze
    goal_cell = pointmaze.EVAL_GOAL_CELLS[maze]
    free = {(i, j) for i, row in enumerate(grid.maze_map) for j, c in enumerate(row) if c != 1}
    starts, offsets = set(), []
    for seed in range(600):
        obs, _ = env.reset(seed=seed)
        assert tuple(grid.cell_xy_to_rowcol(obs["desired_goal"])) == goal_cell
        assert np.linalg.norm(obs["achieved_goal"] - obs["desired_goal"]) > 0.45  # never starts at the goal
        cell = tuple(int(v) for v in grid.cell_xy_to_rowcol(obs["achieved_goal"]))
        starts.add(cell)
        offsets.append(obs["achieved_goal"] - grid.cell_rowcol_to_xy(np.array(cell)))
    assert starts == free - {goal_cell}
    offsets = np.array(offsets)  # the environment's own U(-0.25, 0.25) position noise
    assert np.abs(offsets).max() <= 0.25 and offsets.std() > 0.1
    a, _ = env.reset(seed=5)
    b, _ = env.reset(seed=5)
    np.testing.assert_array_equal(a["observation"], b["observation"])  # seeded episodes repeat


def test_reloading_reuses_the_stored_dataset(umaze):
    again = load_dataset("maze2d-umaze", dataset_steps=STEPS, seed=0, progress=False, generate=False)
    assert again.fingerprint == umaze.fingerprint
    np.testing.assert_array_equal(again.observations, umaze.observations)


def test_evaluate_scores_expert_high_and_random_low(umaze_gc):
    umaze = umaze_gc
    envs = umaze.make_eval_envs(3)
    assert envs.num_envs == 3
    controllers = [pointmaze.WaypointController(umaze.make_eval_env().unwrapped.maze) for _ in range(3)]

    def expert(flat):  # one controller per episode: each keeps its own plan
        return np.stack(
            [c({"observation": o[:4], "achieved_goal": o[:2], "desired_goal": o[4:6]}) for c, o in zip(controllers, flat)]
        )

    rng = np.random.default_rng(0)
    returns, scores = evaluate(expert, envs, seed=100, ref_min=umaze.ref_min_score, ref_max=umaze.ref_max_score)
    assert returns.shape == scores.shape == (3,)
    np.testing.assert_allclose(scores, normalized_score(returns, umaze.ref_min_score, umaze.ref_max_score))
    assert scores.mean() > 70
    _, random_scores = evaluate(lambda o: rng.uniform(-1, 1, (len(o), 2)), envs, 100, umaze.ref_min_score, umaze.ref_max_score)
    assert random_scores.mean() < 40


def test_normalized_score_values():
    np.testing.assert_allclose(normalized_score([10.0, 110.0, 60.0], 10.0, 110.0), [0.0, 100.0, 50.0])


# ----------------------------------------------------------------------------- windows
def test_windows_of_the_generated_data(umaze):
    L = 32
    starts, lengths = umaze.windows(L)
    assert len(starts) == STEPS - L + 1 and np.all(lengths == L)
    x, mask = umaze.gather_windows(starts[:5], lengths[:5], L)
    assert x.shape == (5, L, 4 + 2) and mask.all()
    np.testing.assert_array_equal(x[2, :, :4], umaze.observations[2 : 2 + L, :4])
    np.testing.assert_array_equal(x[2, :, 4:], umaze.actions[2 : 2 + L])


def test_windows_never_mix_segments_and_pad_short_ones():
    seg_starts, seg_ends = np.array([0, 10, 13, 40]), np.array([10, 13, 40, 41])
    L = 8
    starts, lengths = segment_windows(seg_starts, seg_ends, L)
    # 10 -> 3 windows, 3 (short) -> 1, 27 -> 20, 1 (short) -> 1
    assert len(starts) == 3 + 1 + 20 + 1
    seg_of = np.searchsorted(seg_ends, starts, side="right")
    assert np.all(starts + lengths <= seg_ends[seg_of])
    assert np.all(starts >= seg_starts[seg_of])
    n, S, A = 41, 3, 2
    rng = np.random.default_rng(0)
    states, actions, next_states = rng.normal(size=(n, S)), rng.normal(size=(n, A)), rng.normal(size=(n, S))
    x, mask = gather_windows(states, actions, next_states, starts, lengths, L)
    assert x.shape == (len(starts), L, S + A)
    short = np.flatnonzero(lengths < L)
    np.testing.assert_array_equal(lengths[short], [3, 1])
    w = short[0]  # segment 10..13: rows 10, 11, 12 then padding
    np.testing.assert_array_equal(mask[w], [True] * 3 + [False] * 5)
    np.testing.assert_array_equal(x[w, :3, :S], states[10:13])
    np.testing.assert_array_equal(x[w, 3:, :S], np.repeat(next_states[12][None], 5, axis=0))
    np.testing.assert_array_equal(x[w, 3:, S:], 0.0)


def test_window_length_must_be_positive():
    with pytest.raises(ValueError, match="L must be >= 1"):
        segment_windows(np.array([0]), np.array([5]), 0)


# ----------------------------------------------------------------------------- MuJoCo path
def _random_mujoco_episodes(env_id, steps, seed):
    register_envs()
    env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    episodes, obs_list, acts, rews, terms = [], [], [], [], []
    obs, _ = env.reset(seed=seed)
    obs_list.append(obs)
    for t in range(steps):
        a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        obs, r, term, trunc, _ = env.step(a)
        obs_list.append(obs)
        acts.append(a)
        rews.append(r)
        terms.append(term)
        if term or trunc or t == steps - 1:
            n = len(acts)
            episodes.append(
                dict(
                    observations=np.array(obs_list),
                    actions=np.array(acts),
                    rewards=np.array(rews),
                    terminations=np.array(terms),
                    truncations=np.r_[np.zeros(n - 1, bool), [not term]],
                )
            )
            obs, _ = env.reset(seed=seed + 1 + len(episodes))
            obs_list, acts, rews, terms = [obs], [], [], []
    return env, episodes


@pytest.fixture(scope="module")
def hopper():
    from minari.data_collector import EpisodeBuffer

    env, episodes = _random_mujoco_episodes("Hopper-v5", 1500, seed=0)
    buffers = [EpisodeBuffer(id=i, infos={}, **ep) for i, ep in enumerate(episodes)]
    minari.create_dataset_from_buffers(
        "local/hopper/random-test-v0",
        buffers,
        env=env.spec,
        ref_min_score=-20.0,
        ref_max_score=3234.3,
        algorithm_name="random",
        data_format="hdf5",
    )
    return load_dataset("local/hopper/random-test-v0"), episodes


def test_hopper_dataset_flattens_with_true_terminals(hopper):
    data, episodes = hopper
    assert data.task == "hopper" and data.obs_dim == data.state_dim == 11 and data.action_dim == 3
    assert data.size == sum(len(e["actions"]) for e in episodes)
    assert data.terminals.sum() == sum(e["terminations"].sum() for e in episodes) > 0
    assert not (data.terminals & data.timeouts).any()
    # Every Hopper episode starts from a reset: one physical segment per episode.
    np.testing.assert_array_equal(data.segment_starts, data.episode_starts)
    starts, lengths = data.windows(16)
    seg_of = np.searchsorted(data.segment_ends, starts, side="right")
    assert np.all(starts + lengths <= data.segment_ends[seg_of])
    env = data.make_eval_env()
    assert env.spec.id.startswith("Hopper")


@pytest.mark.parametrize(
    "env_id,task", [("Hopper-v5", "hopper"), ("Walker2d-v5", "walker2d"), ("HalfCheetah-v5", "halfcheetah")]
)
def test_termination_rule_matches_the_simulator_on_every_step(env_id, task):
    _, episodes = _random_mujoco_episodes(env_id, 1500, seed=1)
    next_obs = np.concatenate([e["observations"][1:] for e in episodes])
    terminated = np.concatenate([e["terminations"] for e in episodes])
    done = termination_fn(task)(next_obs)
    np.testing.assert_array_equal(done, terminated)
    if task != "halfcheetah":
        assert terminated.sum() >= 5  # random actions make the robot fall: the rule is exercised


def test_termination_rule_runs_on_torch_tensors():
    import torch

    obs = torch.zeros(4, 11)
    obs[:, 0] = torch.tensor([1.2, 0.5, 1.2, float("nan")])  # healthy, too low, healthy, NaN
    obs[2, 1] = 0.3  # tilted
    done = termination_fn("hopper")(obs)
    assert done.tolist() == [False, True, True, True]
    assert termination_fn("pointmaze")(torch.zeros(3, 6)).tolist() == [False] * 3


def test_flat_cache_is_written_and_a_broken_one_is_rebuilt(umaze):
    from pathlib import Path

    folder = Path(datasets.datasets_root()) / umaze.dataset_ids[0]
    caches = list(folder.glob("dydiff-flat-*.npz"))
    assert len(caches) == 1
    good = caches[0].read_bytes()
    stale = folder / "dydiff-flat-0000.tmp999.npz"  # what a killed write leaves
    for broken in (b"not an npz", good[: len(good) // 2]):  # garbage, and a truncated zip
        caches[0].write_bytes(broken)
        stale.write_bytes(b"x")
        again = load_dataset("maze2d-umaze", dataset_steps=STEPS, seed=0, progress=False, generate=False)
        assert again.fingerprint == umaze.fingerprint
        np.testing.assert_array_equal(again.segment_ends, umaze.segment_ends)
        with np.load(caches[0]) as z:  # rewritten as a valid cache (the goal-conditioned arrays both tasks come from)
            assert z["observations"].shape == (umaze.size, umaze.state_dim + 2)
        assert not stale.exists() and not list(folder.glob("*.tmp*"))


def test_an_unreadable_minari_dataset_is_named_with_the_fix(umaze, monkeypatch):
    from pathlib import Path

    def damaged(*args, **kwargs):
        raise OSError("Unable to open file (truncated file)")

    for cache in (Path(datasets.datasets_root()) / umaze.dataset_ids[0]).glob("dydiff-flat-*.npz"):
        cache.rename(cache.with_suffix(".kept"))  # no cache: the Minari files are read
    monkeypatch.setattr(datasets, "_flatten", damaged)
    try:
        with pytest.raises(ValueError, match=r"cannot be read \(OSError: .*truncated.*delete that folder and run again"):
            load_dataset("maze2d-umaze", dataset_steps=STEPS, seed=0, progress=False, generate=False)
    finally:
        for kept in (Path(datasets.datasets_root()) / umaze.dataset_ids[0]).glob("dydiff-flat-*.kept"):
            kept.rename(kept.with_suffix(".npz"))


# ----------------------------------------------------------------------------- simulator replay
def test_replaying_dataset_actions_reproduces_pointmaze_states(umaze):
    from common.envs import replay_actions

    env = umaze.make_eval_env()
    for s in (0, 1234, 7000):
        real = replay_actions(env, "pointmaze", umaze.observations[s, :4], umaze.actions[s : s + 50])
        np.testing.assert_allclose(real, umaze.observations[s : s + 50, :4], atol=1e-5)


def test_replaying_dataset_actions_reproduces_hopper_states(hopper):
    from common.envs import replay_actions

    data, _ = hopper
    env = data.make_eval_env()
    s = int(data.segment_starts[1])
    real = replay_actions(env, "hopper", data.observations[s], data.actions[s : s + 10])
    np.testing.assert_allclose(real, data.observations[s : s + 10], atol=1e-4)


def test_atomic_save_and_refusing_models_of_other_data(tmp_path):
    from common.checkpoints import atomic_save, load_model_file

    atomic_save({"fingerprint": "abc", "dataset_ids": ["local/x-v0"], "w": 1}, tmp_path / "dm.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["dm.pt"]  # no temporary file left behind
    assert load_model_file(tmp_path, "dm", "abc")["w"] == 1
    with pytest.raises(ValueError, match="trained on dataset local/x-v0"):
        load_model_file(tmp_path, "dm", "other")
    with pytest.raises(FileNotFoundError, match="pretrain_models.py"):
        load_model_file(tmp_path, "reward", "abc")


def test_wall_crossing_of_pointmaze_trajectories(umaze):
    from common.pointmaze import crosses_wall

    maze = umaze.make_eval_env().unwrapped.maze
    xy = lambda cells: np.array([maze.cell_rowcol_to_xy(np.array(c)) for c in cells])  # noqa: E731
    along_corridor = xy([(1, 1), (1, 2), (1, 3), (2, 3), (3, 3)])
    through_the_middle_wall = xy([(1, 1), (3, 1)])  # one jump over the wall row (2, 1)
    into_a_wall = xy([(1, 1), (2, 1)])
    out_of_the_maze = np.array([[0.0, 0.0], [0.0, 9.0]])
    # Every state of the dataset itself is free of walls.
    real = umaze.observations[:3000, :2][None]
    np.testing.assert_array_equal(
        crosses_wall(maze, np.stack([along_corridor[:2], through_the_middle_wall, into_a_wall, out_of_the_maze])),
        [False, True, True, True],
    )
    assert not crosses_wall(maze, along_corridor) and not crosses_wall(maze, real).any()


def test_an_interrupted_generation_leaves_no_half_written_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setattr(pointmaze, "REF_EPISODES", 1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".generating-{int(dead.stdout)}-x1" / "local").mkdir(parents=True)  # left by a SIGKILLed write
    (tmp_path / f".generating-{os.getpid()}-x2").mkdir()  # a write still going on (this process)

    def interrupted(**kwargs):
        (Path(os.environ["MINARI_DATASETS_PATH"]) / kwargs["dataset_id"]).mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(minari, "create_dataset_from_buffers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pointmaze.generate_dataset("local/pointmaze/umaze-test-v3", "umaze", dataset_steps=300, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".generating-{os.getpid()}-x2"]
