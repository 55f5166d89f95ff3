"""The --simulator-states ablation: each DyDiff round takes its states from the real simulator (a perfect DM).

The replayed batch is the simulator's, step by step; a run with it logs synthetic trajectories that cross no wall;
flags that leave it nothing to replace are refused.
"""

import json

import numpy as np
import pytest
import torch
from script_runs import metrics, run_script, tiny

from common import pointmaze
from common.datasets import load_dataset
from common.envs import replay_actions, replay_batch, step_from
from common.results import arm_name


@pytest.fixture(scope="module")
def fixed():
    return load_dataset("maze2d-umaze", dataset_steps=10_000, progress=False)


def test_replay_batch_is_the_simulator_step_by_step(fixed):
    env = fixed.make_eval_env()
    rng = np.random.default_rng(0)
    B, L = 5, 12
    s0 = torch.as_tensor(fixed.observations[rng.choice(fixed.size, B, replace=False), :4])
    actions = torch.as_tensor(rng.uniform(-1, 1, (B, L, 2)), dtype=torch.float32)
    states = replay_batch(env, "pointmaze", s0, actions)
    assert states.shape == (B, L, 4) and states.dtype == s0.dtype
    assert torch.equal(states[:, 0], s0)  # s_0 exactly
    for i in range(B):
        one = replay_actions(env, "pointmaze", s0[i].numpy(), actions[i].numpy())
        np.testing.assert_allclose(states[i].numpy(), one, atol=1e-6)
    # each step is the simulator's step from the state before (what the DM is trained to imitate)
    flat = step_from(env, "pointmaze", states[:, :-1].reshape(-1, 4).numpy(), actions[:, :-1].reshape(-1, 2).numpy())
    np.testing.assert_allclose(flat.reshape(B, L - 1, 4), states[:, 1:].numpy(), atol=1e-4)
    assert (states[:, 1:] != states[:, :-1]).any()  # it moved
    assert not pointmaze.crosses_wall(env.unwrapped.maze, states[..., :2].numpy()).any()
    env.close()


def test_a_run_with_simulator_states_logs_only_real_trajectories(tiny_models, tmp_path):
    script = "dydiff_td3bc.py"
    flags = ("--exp-name", "dydiff_td3bc-sim", "--total-steps", "120", "--eval-freq", "60", "--check-trajectories", "64")
    run_script(script, *tiny(script, tiny_models, tmp_path, "--simulator-states", *flags))
    run_dir = next(tmp_path.glob("*dydiff_td3bc-sim__*"))
    args = json.loads((run_dir / "args.json").read_text())
    assert args["simulator_states"] is True
    assert arm_name(args) == "TD3+BC + DyDiff (M=1), simulator states"
    rollouts = [r for r in metrics(run_dir) if "dydiff/kept_fraction" in r]
    assert [r["step"] for r in rollouts] == [0, 50, 100]
    for r in rollouts:
        # the states are the simulator's: none passes through a wall (the tiny DM's go through walls). The goal
        # shares need not agree: the checks replay the relabelled actions, the states came from the previous ones.
        assert r["dydiff/wall_crossing_share"] == 0.0 and r["dydiff/wall_crossing_share_kept"] == 0.0
    assert json.loads((run_dir / "result.json").read_text())["total_steps"] == 120


@pytest.mark.parametrize("flags", [["--num-iterations", "0"], ["--no-dydiff"]])
def test_simulator_states_without_dm_rounds_are_refused(flags, tmp_path):
    out = run_script("dydiff_td3bc.py", "--env-id", "maze2d-umaze", "--simulator-states", *flags, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "--simulator-states replaces the DM's states" in out.stderr and "--num-iterations >= 1" in out.stderr
