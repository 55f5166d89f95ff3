"""Vectorized evaluation gives, episode by episode, the returns of one env run episode after episode."""

import gymnasium as gym
import numpy as np
import pytest

from common import pointmaze
from common.envs import evaluate, flatten_obs, normalized_score, vector_env


def sequential_returns(env, policy, episodes, seed):
    """The reference: one env, episode ep reset with seed + ep, the policy called on one observation at a time."""
    returns, lengths = np.zeros(episodes), np.zeros(episodes, dtype=int)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            action = np.asarray(policy(flatten_obs(obs)[None])[0], dtype=np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            returns[ep] += reward
            lengths[ep] += 1
            done = terminated or truncated
    return returns, lengths


class Recorder:
    """Wraps a batched policy and records the shape of every batch it is called with."""

    def __init__(self, policy):
        self.policy, self.shapes = policy, []

    def __call__(self, obs):
        self.shapes.append(obs.shape)
        return self.policy(obs)


def check_against_sequential(make_env, policy, episodes, seed):
    """evaluate's returns equal the reference's exactly; one batched policy call per step; returns the lengths."""
    expected, lengths = sequential_returns(make_env(), policy, episodes, seed)
    recorder = Recorder(policy)
    returns, scores = evaluate(recorder, vector_env(make_env, episodes), seed, ref_min=-1.0, ref_max=3.0)
    np.testing.assert_array_equal(returns, expected)
    np.testing.assert_array_equal(scores, normalized_score(expected, -1.0, 3.0))
    assert len(set(expected.tolist())) == episodes  # every seed gives its own episode: a mix-up would show
    obs_dim = recorder.shapes[0][1]
    assert recorder.shapes == [(episodes, obs_dim)] * lengths.max()  # one call per step, on every copy at once
    return lengths


def test_pointmaze_evaluation_matches_the_sequential_loop():
    # A PD controller towards the goal, row by row (element-wise, so a row's action does not depend on the batch).
    def towards_goal(obs):
        return np.clip(5.0 * (obs[:, 4:6] - obs[:, :2]) - obs[:, 2:4], -1.0, 1.0)

    # The dense reward, so that no two episodes share a return (the sparse one is 0 for every start it strands).
    lengths = check_against_sequential(lambda: pointmaze.make_eval_env("umaze", dense=True), towards_goal, episodes=4, seed=7)
    assert (lengths == pointmaze.EVAL_EPISODE_STEPS["umaze"]).all()  # PointMaze only truncates


def test_mujoco_episodes_that_end_early_stop_counting():
    try:
        gym.make("Hopper-v5").close()
    except Exception as e:  # gymnasium[mujoco] missing
        pytest.skip(f"Hopper-v5 unavailable: {e}")

    # A fixed feedback policy under which the hopper falls after 150-210 steps, at a different step per seed.
    def feedback(obs):
        return np.tanh(3.0 * obs[:, 2:5] - obs[:, 8:11])

    lengths = check_against_sequential(lambda: gym.make("Hopper-v5"), feedback, episodes=4, seed=0)
    # Terminations at different steps: the early finishers then restart (autoreset) and earn the healthy
    # reward again, which must not count.
    assert len(set(lengths.tolist())) == 4 and lengths.max() < 1000
