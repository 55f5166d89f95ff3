"""The PointMaze generation rules of Minari's D4RL/pointmaze-v2 scripts, one test per rule."""

import dataclasses

import gymnasium as gym
import minari
import numpy as np
import pytest

from common import datasets, pointmaze
from common.datasets import load_dataset
from common.envs import register_envs

# A ring around one wall block: two ways from (1, 1) to (1, 3), of 2 and 6 moves.
RING = [
    [1, 1, 1, 1, 1],
    [1, 0, 0, 0, 1],
    [1, 0, 1, 0, 1],
    [1, 0, 0, 0, 1],
    [1, 1, 1, 1, 1],
]


# ----------------------------------------------------------------------------- solvers
def test_dfs_takes_the_path_its_stack_order_finds_not_the_shortest():
    # Moves are tried col+1, col-1, row-1, row+1 and the last pushed cell is explored first, so DFS goes
    # down and round the ring.
    path = pointmaze.dfs_path(RING, (1, 1), (1, 3))
    assert path == {(1, 1): (2, 1), (2, 1): (3, 1), (3, 1): (3, 2), (3, 2): (3, 3), (3, 3): (2, 3), (2, 3): (1, 3)}
    assert pointmaze.dfs_path(RING, (2, 3), (2, 3)) == {}  # already in the goal cell


def test_q_iteration_takes_the_shortest_path():
    assert pointmaze.q_iteration_path(RING, (1, 1), (1, 3)) == {(1, 1): (1, 2), (1, 2): (1, 3)}
    assert pointmaze.q_iteration_path(RING, (3, 3), (1, 1)) == {(3, 3): (3, 2), (3, 2): (3, 1), (3, 1): (2, 1), (2, 1): (1, 1)}


def test_the_controller_plans_with_dfs_unless_told_otherwise():
    assert pointmaze.DEFAULT_SOLVER == "DFS"
    maze = _umaze()
    assert pointmaze.WaypointController(maze).solve is pointmaze.dfs_path
    assert pointmaze.WaypointController(maze, solver="QIteration").solve is pointmaze.q_iteration_path
    with pytest.raises(ValueError, match="unknown maze solver 'BFS'; known: DFS, QIteration"):
        pointmaze.WaypointController(maze, solver="BFS")


# ----------------------------------------------------------------------------- controller
class CountingRNG:
    """Stands in for the random state: uniform() always returns 0.5 and counts its calls."""

    def __init__(self):
        self.calls = 0

    def uniform(self, size):
        self.calls += 1
        return np.full(size, 0.5)


def _umaze():
    register_envs()
    return gym.make("PointMaze_UMaze-v3").unwrapped.maze


def _obs(pos, goal, vel=(0.0, 0.0)):
    pos = np.asarray(pos, dtype=np.float64)
    return {"observation": np.r_[pos, vel], "achieved_goal": pos.copy(), "desired_goal": np.asarray(goal, float)}


def test_jitter_only_on_intermediate_waypoints_after_the_first():
    maze, rng = _umaze(), CountingRNG()
    centre = lambda cell: maze.cell_rowcol_to_xy(np.array(cell))  # noqa: E731
    goal = centre((3, 1)) + np.array([0.1, -0.15])
    ctrl = pointmaze.WaypointController(maze, rng)
    # U-maze from (1, 1) to (3, 1): (1, 2), (1, 3), (2, 3), (3, 3), (3, 2), then the goal cell.
    action = ctrl(_obs(centre((1, 1)), goal, vel=(0.3, -0.2)))
    np.testing.assert_allclose(action, 10.0 * (centre((1, 2)) - centre((1, 1))) - np.array([0.3, -0.2]))
    assert rng.calls == 0  # the plan's first target is the exact cell centre
    targets = []
    for cell in [(1, 2), (1, 3), (2, 3), (3, 3)]:
        ctrl(_obs(ctrl.target_xy, goal))  # on the target: move on to the next cell
        targets.append(ctrl.target_xy.copy())
    assert rng.calls == 4
    for cell, target in zip([(1, 3), (2, 3), (3, 3), (3, 2)], targets):
        np.testing.assert_allclose(target, centre(cell) - 0.5 * 0.2)  # centre minus U(0, 1) * 0.2 per axis
    ctrl(_obs(ctrl.target_xy, goal))
    np.testing.assert_array_equal(ctrl.target_xy, goal)  # the goal cell: the goal itself, no jitter
    assert rng.calls == 4
    ctrl(_obs(goal, goal))  # at the goal: nothing further
    assert rng.calls == 4 and ctrl.target_cell == (3, 1)
    # A target is passed only within 0.1 of it.
    ctrl2 = pointmaze.WaypointController(maze, CountingRNG())
    ctrl2(_obs(centre((1, 1)), goal))
    ctrl2(_obs(centre((1, 2)) + np.array([0.11, 0.0]), goal))
    assert ctrl2.target_cell == (1, 2)


def test_a_new_goal_replans_from_the_current_cell_without_jitter():
    maze, rng = _umaze(), CountingRNG()
    centre = lambda cell: maze.cell_rowcol_to_xy(np.array(cell))  # noqa: E731
    ctrl = pointmaze.WaypointController(maze, rng)
    ctrl(_obs(centre((1, 1)), centre((3, 1))))
    ctrl(_obs(centre((1, 2)), centre((3, 1))))
    assert rng.calls == 1
    ctrl(_obs(centre((1, 3)) + 0.2, centre((1, 1))))  # the goal moved: plan again from (1, 3)
    assert ctrl.target_cell == (1, 2) and rng.calls == 1
    np.testing.assert_array_equal(ctrl.target_xy, centre((1, 2)))
    # The plan's first target is the goal cell: its centre, which every goal in the cell is within 0.45 of.
    ctrl(_obs(centre((1, 2)), centre((1, 1)) + 0.2))
    assert ctrl.target_cell == (1, 1)
    np.testing.assert_array_equal(ctrl.target_xy, centre((1, 1)))


def test_a_goal_in_the_current_cell_is_aimed_at_directly():
    maze = _umaze()
    centre = lambda cell: maze.cell_rowcol_to_xy(np.array(cell))  # noqa: E731
    ctrl = pointmaze.WaypointController(maze, CountingRNG())
    goal = centre((3, 3)) + np.array([0.2, 0.2])
    action = ctrl(_obs(centre((3, 3)), goal))
    np.testing.assert_allclose(action, 10.0 * (goal - centre((3, 3))))


# ----------------------------------------------------------------------------- collection
def test_actions_are_noisy_expert_actions_clipped_to_the_unit_box():
    _, episodes, _ = pointmaze.collect("umaze", dataset_steps=400, ref_episodes=0, progress=False)
    actions = np.concatenate([e["actions"] for e in episodes])
    assert np.abs(actions).max() <= 1.0
    assert (np.abs(actions) == 1.0).mean() > 0.2  # kp = 10 saturates often
    assert 0.1 < actions.std() < 1.0


def test_episodes_share_their_boundary_observation_as_minaris_collector_records_it():
    _, episodes, _ = pointmaze.collect("umaze", dataset_steps=2000, ref_episodes=0, progress=False)
    assert len(episodes) > 5
    for prev, ep in zip(episodes, episodes[1:]):
        for key in ("observation", "achieved_goal", "desired_goal"):
            # The next episode starts with the success step's observation, old goal included ...
            np.testing.assert_array_equal(ep["observations"][key][0], prev["observations"][key][-1])
        # ... and the new goal shows from its second observation on.
        assert not np.array_equal(ep["observations"]["desired_goal"][1], ep["observations"]["desired_goal"][0])
        goal = ep["observations"]["desired_goal"][1:]
        assert np.all(goal == goal[0])
        assert prev["truncations"][-1] and not prev["truncations"][:-1].any() and not prev["terminations"].any()


def test_checkpoints_truncate_and_reset_with_the_next_seed():
    steps, every = 1000, 300
    env, episodes, _ = pointmaze.collect("umaze", dataset_steps=steps, checkpoint_every=every, ref_episodes=0, progress=False)
    ends = np.cumsum([len(e["actions"]) for e in episodes])
    assert ends[-1] == steps
    assert {300, 600, 900, 1000} <= set(ends.tolist())
    fresh = gym.make(pointmaze.gym_env_id("umaze"), continuing_task=True, reset_target=True)
    for k, end in enumerate((300, 600, 900)):
        i = int(np.flatnonzero(ends == end)[0])
        first = episodes[i + 1]["observations"]
        # Not the previous episode's last state: the env was reset, with the seed plus one.
        assert not np.array_equal(first["observation"][0], episodes[i]["observations"]["observation"][-1])
        obs, _ = fresh.reset(seed=pointmaze.DEFAULT_SEED + 1 + k)
        np.testing.assert_array_equal(first["observation"][0], obs["observation"])
        np.testing.assert_array_equal(first["desired_goal"][0], obs["desired_goal"])
    # Without a checkpoint inside, the same run is one physical trajectory.
    _, whole, _ = pointmaze.collect("umaze", dataset_steps=steps, checkpoint_every=10 * steps, ref_episodes=0, progress=False)
    for prev, ep in zip(whole, whole[1:]):
        np.testing.assert_array_equal(ep["observations"]["observation"][0], prev["observations"]["observation"][-1])
    np.testing.assert_array_equal(whole[0]["actions"][:50], episodes[0]["actions"][:50])
    assert pointmaze.CHECKPOINT_EVERY == 200_000


def test_reference_scores_are_computed_at_the_first_checkpoint_from_the_collection_random_state():
    kwargs = dict(dataset_steps=400, checkpoint_every=200, progress=False)
    _, without, refs0 = pointmaze.collect("umaze", ref_episodes=0, **kwargs)
    _, with_refs, refs = pointmaze.collect("umaze", ref_episodes=2, **kwargs)
    assert refs0 is None and len(refs) == 2 and refs[0] < refs[1]
    a = np.concatenate([e["actions"] for e in without])
    b = np.concatenate([e["actions"] for e in with_refs])
    np.testing.assert_array_equal(a[:200], b[:200])  # identical until the first checkpoint ...
    assert not np.array_equal(a[200:], b[200:])  # ... then the expert's jitter has used the random state


def test_reference_scores_use_minaris_own_rule():
    from minari.utils import RandomPolicy, get_average_reference_score

    ref_min, ref_max = pointmaze.reference_scores("umaze", rng=np.random.RandomState(0), episodes=3)
    env = pointmaze.make_eval_env("umaze")
    assert ref_min == get_average_reference_score(env, RandomPolicy(env), 3)
    expert = pointmaze.WaypointController(env.unwrapped.maze, np.random.RandomState(0))
    assert ref_max == get_average_reference_score(env, expert.compute_action, 3)
    assert ref_max > 150 > 50 > ref_min  # the expert reaches the goal and stays; random rarely does


# ----------------------------------------------------------------------------- versions of the local data
def test_datasets_of_the_earlier_recipe_are_never_reused(monkeypatch):
    spec = datasets.resolve_env_id("maze2d-umaze")
    old = "local/pointmaze/umaze-10000steps-seed123-v2"
    made = []
    monkeypatch.setattr(minari, "list_local_datasets", lambda *a, **k: {old: None})
    monkeypatch.setattr(pointmaze, "generate_dataset", lambda dataset_id, *a, **k: made.append(dataset_id))
    ids = datasets._fetch(spec, offline=True, generate=True, dataset_steps=10_000, seed=123, progress=False)
    assert ids == made == ["local/pointmaze/umaze-10000steps-seed123-v3"]


def test_models_made_on_the_earlier_data_are_refused(tmp_path):
    from common.checkpoints import atomic_save, load_model_file

    data = load_dataset("maze2d-umaze", dataset_steps=10_000, progress=False)
    old = dataclasses.replace(data, dataset_ids=("local/pointmaze/umaze-10000steps-seed123-v2",))
    assert old.fingerprint != data.fingerprint
    atomic_save({"fingerprint": old.fingerprint, "dataset_ids": list(old.dataset_ids)}, tmp_path / "dm.pt")
    with pytest.raises(ValueError, match="trained on dataset local/pointmaze/umaze-10000steps-seed123-v2") as err:
        load_model_file(tmp_path, "dm", data.fingerprint)
    assert "pretrain_models.py" in str(err.value)


def test_flat_transitions_carry_the_goal_they_are_scored_against():
    load_dataset("maze2d-umaze", dataset_steps=10_000, progress=False)
    data = load_dataset("local/pointmaze/umaze-10000steps-seed123-v3", progress=False)  # the goal-conditioned task
    ds = minari.load_dataset(data.dataset_ids[0])
    ep0, ep1 = ds.storage.get_episodes([0, 1])
    stored_goal = ep1["observations"]["desired_goal"]
    np.testing.assert_array_equal(stored_goal[0], ep0["observations"]["desired_goal"][-1])  # Minari's layout
    s = int(data.episode_starts[1])
    np.testing.assert_array_equal(data.observations[s, 4:6], stored_goal[1].astype(np.float32))
    np.testing.assert_array_equal(data.observations[s - 1, 4:6], stored_goal[0].astype(np.float32))


# ----------------------------------------------------------------------------- D4RL's sizes by default
def test_the_fixed_goal_tasks_default_to_d4rls_sizes_and_minari_ids_to_minaris():
    sizes = {m: datasets.resolve_env_id(f"maze2d-{m}").default_steps for m in ("umaze", "medium", "large")}
    assert sizes == {"umaze": 1_000_000, "medium": 2_000_000, "large": 4_000_000}
    assert datasets.resolve_env_id("maze2d-large-dense").default_steps == 4_000_000
    assert datasets.resolve_env_id("D4RL/pointmaze/large-v2").default_steps == 1_000_000
    spec = datasets.resolve_env_id("maze2d-large")
    assert spec.local_id() == "local/pointmaze/large-4000000steps-seed123-v3"
    assert spec.local_id(1_000_000) == "local/pointmaze/large-v3"  # Minari's recipe keeps its name (and fingerprint)


def test_a_run_without_dataset_steps_generates_d4rls_size(monkeypatch):
    made = []
    monkeypatch.setattr(minari, "list_local_datasets", lambda *a, **k: {})

    def generate(dataset_id, maze, dense, dataset_steps, **k):
        made.append((dataset_id, maze, dataset_steps))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pointmaze, "generate_dataset", generate)
    with pytest.raises(RuntimeError, match="stop here"):
        load_dataset("maze2d-medium", offline=True, progress=False)
    assert made == [("local/pointmaze/medium-2000000steps-seed123-v3", "medium", 2_000_000)]


def test_minaris_official_data_are_used_as_they_are_with_one_line_on_d4rls_size(monkeypatch, capsys):
    spec = datasets.resolve_env_id("maze2d-large")
    monkeypatch.setattr(minari, "list_local_datasets", lambda *a, **k: {"D4RL/pointmaze/large-v2": None})
    ids = datasets._fetch(spec, offline=True, generate=True, dataset_steps=4_000_000, seed=123, progress=False)
    assert ids == ["D4RL/pointmaze/large-v2"]
    err = capsys.readouterr().err
    assert "as it is (1M steps)" in err and "maze2d-large-v1 held 4,000,000" in err and len(err.splitlines()) == 1
    spec = datasets.resolve_env_id("maze2d-umaze")  # D4RL's umaze held 1M too: nothing to say
    monkeypatch.setattr(minari, "list_local_datasets", lambda *a, **k: {"D4RL/pointmaze/umaze-v2": None})
    datasets._fetch(spec, offline=True, generate=True, dataset_steps=1_000_000, seed=123, progress=False)
    assert capsys.readouterr().err == ""
