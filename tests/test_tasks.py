"""The two maze2d tasks of one dataset: D4RL's fixed-goal task (maze2d-*) and Minari's goal-conditioned one (a Minari id).

The relabelled rewards against the real evaluation env, observation sizes, the D4RL maze2d-v1 scores, the
models the two tasks share, and the guards that came with them (non-finite flags, temporary maze files).
"""

import json
import os
import shutil
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from script_runs import PRETRAIN, run_script

from common import pointmaze
from common.args import non_finite_problems
from common.checkpoints import atomic_save, load_model_file
from common.datasets import fixed_goal_task, load_dataset
from common.envs import set_physical_state

STEPS = 10_000
GC_ID = "local/pointmaze/umaze-10000steps-seed123-v3"  # the goal-conditioned task of the same data


@pytest.fixture(scope="module")
def fixed():
    return load_dataset("maze2d-umaze", dataset_steps=STEPS, progress=False)


@pytest.fixture(scope="module")
def gc(fixed):
    return load_dataset(GC_ID, progress=False)


@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_the_fixed_goal_is_the_centre_of_the_evaluation_goal_cell(maze):
    env = pointmaze.make_eval_env(maze)
    centre = env.unwrapped.maze.cell_rowcol_to_xy(np.array(pointmaze.EVAL_GOAL_CELLS[maze]))
    np.testing.assert_allclose(pointmaze.goal_xy(maze), centre)
    for seed in range(20):  # every reset's goal: the centre plus the env's U(-0.25, 0.25) noise per axis
        env.reset(seed=seed)
        assert np.abs(env.unwrapped.goal - centre).max() <= 0.25
    env.close()


@pytest.mark.parametrize("dense", [False, True])
def test_the_relabelled_reward_is_what_the_evaluation_env_pays(dense):
    """Step the real evaluation env near its goal and compare its reward with goal_reward on the state it arrived at."""
    env = pointmaze.make_eval_env("umaze", dense)
    env.reset(seed=3)
    u = env.unwrapped
    rng = np.random.default_rng(0)
    paid, relabelled, at_centre, centre_reward = [], [], [], []
    for episode in range(6):
        env.reset(seed=episode)
        set_physical_state(env, "pointmaze", np.r_[u.goal + rng.uniform(-0.6, 0.6, 2), 0.0, 0.0])
        for _ in range(40):
            obs, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 2))
            paid.append(reward)
            relabelled.append(pointmaze.goal_reward(obs["achieved_goal"], obs["desired_goal"], dense))
            at_centre.append(obs["achieved_goal"])
    np.testing.assert_allclose(relabelled, paid, rtol=1e-6)
    if not dense:
        assert 0 < np.mean(paid) < 1  # both kinds of step were compared
    # with the goal put at the cell's centre, the env pays exactly what the fixed-goal data are labelled with
    u.goal = pointmaze.goal_xy("umaze")
    for xy in at_centre[:50]:
        set_physical_state(env, "pointmaze", np.r_[xy, 0.0, 0.0])
        obs, reward, *_ = env.step(np.zeros(2))
        centre_reward.append((reward, pointmaze.goal_reward(obs["achieved_goal"], pointmaze.goal_xy("umaze"), dense)))
    np.testing.assert_allclose(*zip(*centre_reward), rtol=1e-6)
    # torch gives the same values
    xy = np.array(at_centre, dtype=np.float32)
    np.testing.assert_allclose(
        pointmaze.goal_reward(torch.as_tensor(xy), pointmaze.goal_xy("umaze"), dense).numpy(),
        pointmaze.goal_reward(xy, pointmaze.goal_xy("umaze"), dense),
        rtol=1e-5,
    )
    env.close()


def test_the_fixed_goal_task_from_the_same_data(fixed, gc):
    assert (fixed.form, fixed.obs_dim, fixed.state_dim) == ("fixed-goal", 4, 4)
    assert (gc.form, gc.obs_dim, gc.state_dim) == ("goal-conditioned", 6, 4)
    assert fixed.dataset_ids == gc.dataset_ids == (GC_ID,)
    np.testing.assert_array_equal(fixed.observations, gc.observations[:, :4])
    np.testing.assert_array_equal(fixed.next_observations, gc.next_observations[:, :4])
    np.testing.assert_array_equal(fixed.actions, gc.actions)
    goal = pointmaze.goal_xy("umaze")
    distance = np.linalg.norm(gc.next_observations[:, :2] - goal, axis=1)
    np.testing.assert_array_equal(fixed.rewards, (distance <= 0.45).astype(np.float32))  # on arriving, radius 0.45
    assert fixed.rewards.sum() > 0 and not fixed.terminals.any()
    # the goal-conditioned task keeps Minari's own rewards (each against its episode's goal)
    minari_rewards = np.linalg.norm(gc.next_observations[:, :2] - gc.observations[:, 4:6], axis=1) <= 0.45
    np.testing.assert_array_equal(gc.rewards, minari_rewards.astype(np.float32))
    assert not np.array_equal(fixed.rewards, gc.rewards)
    # timeouts mark where the recorded trajectory is cut (the end of each physical segment), not Minari's goals
    np.testing.assert_array_equal(np.flatnonzero(fixed.timeouts), fixed.segment_ends - 1)
    # dense: exp(-distance) against the same goal
    np.testing.assert_allclose(fixed_goal_task(gc, "umaze", dense=True).rewards, np.exp(-distance), rtol=1e-6)
    # the same physical data: one physical fingerprint, two task fingerprints
    assert fixed.physical_fingerprint == gc.physical_fingerprint and fixed.fingerprint != gc.fingerprint
    assert fixed.describe()["form"] == "fixed-goal" and gc.describe()["obs_dim"] == 6


def test_the_evaluation_env_of_each_task(fixed, gc):
    env = fixed.make_eval_env()
    obs, _ = env.reset(seed=1)
    assert obs.shape == (4,) and env.observation_space.shape == (4,)
    assert env.spec.max_episode_steps == 300
    obs, *_ = env.step(np.zeros(2, dtype=np.float32))
    assert obs.shape == (4,)
    gc_obs, _ = gc.make_eval_env().reset(seed=1)
    assert set(gc_obs) == {"observation", "achieved_goal", "desired_goal"}
    np.testing.assert_array_equal(gc_obs["observation"], fixed.make_eval_env().reset(seed=1)[0])  # the same starts
    envs = fixed.make_eval_envs(2)
    assert envs.reset(seed=0)[0].shape == (2, 4)


def test_d4rl_scores(fixed, gc):
    assert (fixed.d4rl_ref_min_score, fixed.d4rl_ref_max_score) == (23.85, 161.86)
    assert (gc.d4rl_ref_min_score, gc.d4rl_ref_max_score) == (23.85, 161.86)
    np.testing.assert_allclose(fixed.d4rl_normalized_score(np.array([23.85, 161.86, 92.855])), [0.0, 100.0, 50.0])
    assert pointmaze.D4RL_REF_SCORES[("large", False)] == (6.7, 273.99)
    assert pointmaze.D4RL_REF_SCORES[("medium", False)] == (13.13, 277.39)
    assert round(pointmaze.D4RL_REF_SCORES[("large", True)][1], 2) == 303.49
    large = replace(fixed, d4rl_ref_min_score=6.7, d4rl_ref_max_score=273.99)
    assert large.d4rl_normalized_score(np.array([273.99]))[0] == pytest.approx(100.0)
    assert replace(fixed, d4rl_ref_min_score=None).d4rl_normalized_score(np.array([1.0])) is None  # no D4RL scale


def test_models_of_the_other_task_are_refused_with_the_reason(fixed, gc, tmp_path):
    meta = dict(dataset_ids=list(gc.dataset_ids), obs_dim=gc.obs_dim)
    atomic_save(dict(meta, fingerprint=gc.fingerprint, physical_fingerprint=gc.physical_fingerprint), tmp_path / "reward.pt")
    with pytest.raises(ValueError, match="made for the goal-conditioned task; maze2d-umaze is D4RL's fixed-goal task"):
        load_model_file(tmp_path, "reward", fixed)
    assert load_model_file(tmp_path, "reward", gc)["obs_dim"] == 6
    # the DM and the ensemble fit both tasks: they are checked by the physical fingerprint
    atomic_save(dict(meta, fingerprint=gc.fingerprint, physical_fingerprint=gc.physical_fingerprint), tmp_path / "dm.pt")
    assert load_model_file(tmp_path, "dm", fixed)["fingerprint"] == gc.fingerprint
    # files made before the physical fingerprint existed fit the very data they were made for, only
    atomic_save(dict(meta, fingerprint=gc.fingerprint), tmp_path / "dynamics.pt")
    assert load_model_file(tmp_path, "dynamics", gc)
    with pytest.raises(ValueError, match="was trained on dataset"):
        load_model_file(tmp_path, "dynamics", fixed)


def test_switching_task_retrains_the_reward_model_alone(tiny_models, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "maze2d-umaze", models / "maze2d-umaze", copy_function=os.link)
    out = run_script(
        "pretrain_models.py", "--env-id", GC_ID, "--rollout-length", "16", "--models-dir", str(models), *PRETRAIN.split()
    )
    folder = models / "local_pointmaze_umaze-10000steps-seed123-v3"
    for name in ("dm.pt", "dynamics.pt"):  # linked, not trained again
        assert (folder / name).samefile(models / "maze2d-umaze" / name), name
    assert "dm: reusing" in out.stdout and "dynamics: reusing" in out.stdout
    timings = json.loads(out.stdout.split("timings (s): ")[1].splitlines()[0])
    assert set(timings) == {"reward_s", "report_s"}  # only the reward model was trained
    reward = load_model_file(folder, "reward")
    assert reward["form"] == "goal-conditioned" and reward["obs_dim"] == 6
    assert load_model_file(models / "maze2d-umaze", "reward")["obs_dim"] == 4  # the fixed-goal task's stays
    report = json.loads((folder / "report.json").read_text())
    assert report["form"] == "goal-conditioned" and report["physical_fingerprint"] == reward["physical_fingerprint"]


def test_non_finite_float_flags_end_in_one_line(tmp_path):
    from dydiff_td3bc import Args

    args = Args()
    args.learning_rate, args.pretrain.dm_lr, args.alpha = float("nan"), float("inf"), 2.5
    assert sorted(non_finite_problems(args)) == [
        "--learning-rate must be a finite number, got nan",
        "--pretrain.dm-lr must be a finite number, got inf",
    ]
    out = run_script(
        "pretrain_models.py", "--env-id", "maze2d-umaze", "--models-dir", str(tmp_path), "--dm-lr", "nan", check=False
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "--dm-lr must be a finite number, got nan" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing made


def test_maze_envs_leave_no_file_in_the_temporary_folder(fixed, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where gymnasium-robotics writes its maze XML
    for maze in pointmaze.MAZES:
        pointmaze.make_eval_env(maze).close()
    fixed.make_eval_envs(3).close()
    assert list(tmp_path.iterdir()) == []


def test_synthetic_data_metrics_against_the_real_simulator(fixed):
    """Two kept trajectories: one really sits at the goal; one claims to reach it through a wall but never moves there."""
    env = fixed.make_eval_env()
    goal = pointmaze.goal_xy("umaze")
    L = 10
    states = np.zeros((3, L, 4), dtype=np.float32)
    states[0, :, :2] = goal  # at the goal, at rest, with zero actions: the simulator stays there
    start = np.array([1.0, -1.0])  # the bottom-right cell of the U; the goal is top-left, behind the wall
    states[1, :, :2] = np.linspace(start, goal, L)  # a straight line through the middle wall
    states[2, :, :2] = start  # filtered out
    actions = np.zeros((3, L, 2), dtype=np.float32)
    rewards = np.zeros((3, L - 1), dtype=np.float32)
    rewards[0] = 1.0
    rewards[1, -1] = 0.7  # the reward model: a goal reward (>= 0.5) at the end of trajectory 1
    keep = torch.tensor([0, 1])
    context = torch.zeros(3, 0)
    out = pointmaze.synthetic_data_metrics(fixed, env, *map(torch.as_tensor, (states, actions, rewards)), keep, context, 8)
    assert out["dydiff/goal_share_reward_model"] == 1.0
    assert out["dydiff/goal_share_generated"] == 1.0
    assert out["dydiff/goal_share_real"] == 0.5  # the straight line is not what the simulator does
    assert out["dydiff/goal_share_generated_checked"] == 1.0
    assert out["dydiff/return_kept_predicted"] == pytest.approx((9 + 0.7) / 2)
    assert out["dydiff/return_kept_real"] == pytest.approx(9 / 2)  # only the trajectory at the goal earns, every step
    assert out["dydiff/wall_crossing_share"] == pytest.approx(1 / 3) and out["dydiff/wall_crossing_share_kept"] == 0.5
    assert "dydiff/goal_share_real" not in pointmaze.synthetic_data_metrics(
        fixed, env, *map(torch.as_tensor, (states, actions, rewards)), keep, context, 0
    )
    env.close()
