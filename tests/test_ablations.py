"""The ablations that swap DyDiff's approximations for the real thing (--rollout-states, --stored-actions,
--rollout-rewards), and the batched PointMaze simulator they run on.

The batched simulator is env.step transition by transition, wall contacts and both clips included; each flag
changes what reaches the synthetic buffer in the way it says (checked on the buffer of a run's checkpoint against
the real simulator); flags that replace nothing are refused with their reason.
"""

import json
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from script_runs import SCRIPTS, metrics, run_script, tiny

from common import pointmaze
from common.checkpoints import models_needed
from common.datasets import load_dataset
from common.envs import replay_actions, set_physical_state, step_from
from common.results import arm_name
from common.runs import resumed_args


@pytest.fixture(scope="module")
def fixed():
    return load_dataset("maze2d-umaze", dataset_steps=10_000, progress=False)


def test_batched_step_is_env_step_with_contacts_and_clips(fixed):
    env = fixed.make_eval_env()
    sim = pointmaze.BatchedSimulator(env)
    rng = np.random.default_rng(0)
    n = 400
    # positions anywhere in the maze (walls included), velocities and actions beyond their clips
    states = np.c_[rng.uniform(-2.5, 2.5, (n, 2)), rng.uniform(-7, 7, (n, 2))]
    actions = rng.uniform(-1.5, 1.5, (n, 2))
    expected, contacts = [], 0
    env.reset(seed=0)
    for s, a in zip(states, actions):
        set_physical_state(env, "pointmaze", s)
        expected.append(env.unwrapped.step(a.astype(np.float32))[0]["observation"])
        contacts += env.unwrapped.point_env.data.ncon > 0
    ours = sim.step(states, actions)
    assert ours.shape == (n, 4) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, np.stack(expected), rtol=0, atol=1e-9)
    assert contacts > 20  # many of these steps touch a wall
    assert (np.abs(states[:, 2:]) > 5).any() and (np.abs(actions) > 1).any()
    env.close()


def test_replay_and_closed_loop_rollout(fixed):
    env = fixed.make_eval_env()
    sim = pointmaze.BatchedSimulator(env)
    rng = np.random.default_rng(1)
    B, L = 6, 12
    s0 = torch.as_tensor(fixed.observations[rng.choice(fixed.size, B, replace=False), :4])
    actions = torch.as_tensor(rng.uniform(-1, 1, (B, L, 2)), dtype=torch.float32)
    replayed = sim.replay(s0, actions)
    assert replayed.shape == (B, L, 4) and replayed.dtype == s0.dtype and torch.equal(replayed[:, 0], s0)
    for i in range(B):  # the open-loop replay is the env's, step after step
        np.testing.assert_allclose(
            replayed[i].numpy(), replay_actions(env, "pointmaze", s0[i].numpy(), actions[i].numpy()), atol=1e-6
        )

    goal = torch.tensor([0.5, -0.5])
    weights = torch.tensor([[-0.8, 0.1], [0.2, -0.6], [0.3, 0.0], [0.0, 0.3], [0.5, -0.2], [0.1, 0.4]])

    def policy(obs):  # depends on the state and on the context riding along
        assert obs.shape[-1] == 6
        return torch.tanh(obs @ weights)

    states, acts = sim.rollout(policy, s0, L, context=goal.expand(B, 2))
    assert states.shape == (B, L, 4) and acts.shape == (B, L, 2) and torch.equal(states[:, 0], s0)
    obs = torch.cat([states, goal.expand(B, L, 2)], -1)
    torch.testing.assert_close(acts, torch.tanh(obs @ weights))
    # closed loop: each state is the simulator's step from the one before under the action chosen there
    nxt = step_from(env, "pointmaze", states[:, :-1].reshape(-1, 4).numpy(), acts[:, :-1].reshape(-1, 2).numpy())
    np.testing.assert_allclose(nxt.reshape(B, L - 1, 4), states[:, 1:].numpy(), atol=1e-5)
    env.close()


@pytest.mark.parametrize("dense", [False, True])
def test_true_rewards_are_what_the_env_pays(dense):
    data = load_dataset("maze2d-umaze-dense" if dense else "maze2d-umaze", dataset_steps=10_000, progress=False)
    env = data.make_eval_env()
    rng = np.random.default_rng(2)
    env.reset(seed=0)
    env.unwrapped.goal = data.goal  # the goal cell's centre, as the dataset's rewards (the env adds noise at reset)
    set_physical_state(env, "pointmaze", np.r_[data.goal, 0.0, 0.0])
    states, paid = [np.r_[data.goal, 0.0, 0.0]], []
    for t in range(80):  # away from the goal and back: in and out of its radius
        obs, r, *_ = env.unwrapped.step(np.array([1.0 if t < 30 else -1.0, rng.uniform(-0.3, 0.3)], np.float32))
        states.append(obs["observation"])
        paid.append(r)
    ours = pointmaze.true_rewards(data, torch.as_tensor(np.stack(states)[None]), None)  # float64, as the env
    assert ours.shape == (1, 80)
    np.testing.assert_allclose(ours[0].numpy(), paid, atol=1e-5)
    if not dense:
        assert 0 < sum(paid) < 80
    env.close()


def test_models_needed():
    def need(**kw):
        base = dict(dydiff=True, num_iterations=1, rollout_states="dm", rollout_rewards="model")
        return set(models_needed(SimpleNamespace(**{**base, **kw})))

    assert need() == {"dm", "dynamics", "reward"}
    assert need(num_iterations=0) == {"dynamics", "reward"}
    assert need(rollout_states="simulator-replay") == {"dynamics", "reward"}
    assert need(rollout_states="simulator") == {"reward"}
    assert need(rollout_states="simulator", rollout_rewards="simulator") == set()
    assert need(rollout_rewards="simulator") == {"dm", "dynamics"}
    assert need(dydiff=False) == set()


def synthetic_buffer(run_dir):
    """The synthetic transitions held in a run's last checkpoint."""
    syn = torch.load(run_dir / "checkpoint.pt", weights_only=False)["synthetic"]
    return {k: syn[k][: syn["size"]].numpy() for k in ("obs", "actions", "rewards", "next_obs")}


def one_step_error(data, syn):
    """|simulator step of each stored (s, a) - stored s'|, the largest entry per transition."""
    env = data.make_eval_env()
    nxt = step_from(env, "pointmaze", syn["obs"][:, :4], syn["actions"])
    env.close()
    return np.abs(nxt - syn["next_obs"][:, :4]).max(1)


FLAGS = ("--total-steps", "60", "--eval-freq", "60", "--check-trajectories", "8", "--eval-max-steps", "50")


@pytest.mark.parametrize("script", SCRIPTS)
def test_simulator_rollouts_with_true_rewards_need_no_models(script, fixed, tmp_path):
    """Rung a: true on-policy rollouts. No pretraining (the models folder stays empty), every stored transition is
    the simulator's and its reward the task's."""
    models = tmp_path / "no-models"
    flags = ("--exp-name", "sim", "--rollout-states", "simulator", "--rollout-rewards", "simulator", *FLAGS)
    out = run_script(script, *tiny(script, models, tmp_path, *flags))
    assert "pretraining" not in out.stdout + out.stderr and not models.exists()
    run_dir = next(tmp_path.glob("*__sim__*"))
    assert json.loads((run_dir / "task.json").read_text())["models"] == {}
    assert json.loads((run_dir / "args.json").read_text())["eval_max_steps"] == 50  # the episode length, recorded
    syn = synthetic_buffer(run_dir)
    assert len(syn["obs"]) > 0
    assert one_step_error(fixed, syn).max() < 1e-4
    np.testing.assert_allclose(syn["rewards"], pointmaze.goal_reward(syn["next_obs"][:, :2], fixed.goal, False))
    rollouts = [r for r in metrics(run_dir) if "dydiff/kept_fraction" in r]
    assert [r["step"] for r in rollouts] == [0, 50]
    for r in rollouts:  # the checks' replay of the stored actions finds the same trajectories
        assert r["dydiff/wall_crossing_share"] == 0.0
        assert r["dydiff/goal_share_real"] == r["dydiff/goal_share_generated_checked"]
        assert r["dydiff/return_kept_predicted"] == pytest.approx(r["dydiff/return_kept_real"], abs=1e-4)


@pytest.mark.parametrize("script", SCRIPTS)
def test_conditioning_actions_make_the_stored_transitions_the_simulator_s(script, tiny_models, fixed, tmp_path):
    """With a perfect DM, the stored transitions follow the dynamics exactly when they keep the actions the states
    came from, and mostly do not with Algorithm 1's relabelled ones."""
    errors = {}
    for stored in ("conditioning", "relabelled"):
        flags = (
            "--rollout-states",
            "simulator-replay",
            "--stored-actions",
            stored,
            "--exp-name",
            f"{script[:-3]}-{stored}",
            *FLAGS,
        )
        run_script(script, *tiny(script, tiny_models, tmp_path, *flags))
        run_dir = next(tmp_path.glob(f"*-{stored}__*"))
        args = json.loads((run_dir / "args.json").read_text())
        assert set(json.loads((run_dir / "task.json").read_text())["models"]) == {"dynamics", "reward"}
        errors[stored] = one_step_error(fixed, synthetic_buffer(run_dir))
        assert all(r["dydiff/wall_crossing_share"] == 0.0 for r in metrics(run_dir) if "dydiff/kept_fraction" in r)
    assert errors["conditioning"].max() < 1e-4
    assert (errors["relabelled"] > 1e-3).mean() > 0.5
    assert arm_name(args) == f"{arm_name(dict(exp_name=script, dydiff=False))} + DyDiff (M=1), simulator states"


def test_dm_rounds_with_conditioning_actions_and_true_rewards(tiny_models, fixed, tmp_path):
    """The DM with conditioning actions (a candidate change to DyDiff) and true rewards on its states."""
    flags = ("--stored-actions", "conditioning", "--rollout-rewards", "simulator", "--exp-name", "dydiff_td3bc-dmcond", *FLAGS)
    run_script("dydiff_td3bc.py", *tiny("dydiff_td3bc.py", tiny_models, tmp_path, *flags))
    run_dir = next(tmp_path.glob("*-dmcond__*"))
    assert set(json.loads((run_dir / "task.json").read_text())["models"]) == {"dm", "dynamics"}
    syn = synthetic_buffer(run_dir)
    np.testing.assert_allclose(syn["rewards"], pointmaze.goal_reward(syn["next_obs"][:, :2], fixed.goal, False))
    assert (
        arm_name(json.loads((run_dir / "args.json").read_text()))
        == "TD3+BC + DyDiff (M=1), conditioning actions, true rewards"
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--rollout-states", "simulator", "--no-dydiff"], "--no-dydiff makes none"),
        (["--rollout-rewards", "simulator", "--no-dydiff"], "--no-dydiff makes none"),
        (["--stored-actions", "conditioning", "--no-dydiff"], "--no-dydiff makes none"),
        (["--rollout-states", "simulator-replay", "--num-iterations", "0"], "--num-iterations 0 samples none"),
        (["--stored-actions", "conditioning", "--num-iterations", "0"], "keeps the actions the last DM round was given"),
        (["--stored-actions", "conditioning", "--rollout-states", "simulator"], "simulator has no DM rounds"),
        (["--rollout-states", "simulator-replay", "--average-with-previous"], "--average-with-previous mixes"),
        (["--stored-actions", "conditioning", "--average-with-previous"], "--average-with-previous mixes"),
    ],
)
def test_ablations_that_replace_nothing_are_refused(flags, message):
    out = run_script("dydiff_td3bc.py", "--env-id", "maze2d-umaze", *flags, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_ablations_need_pointmaze(tmp_path):
    import minari
    from minari.data_collector import EpisodeBuffer

    from common.envs import register_envs

    register_envs()
    import gymnasium as gym

    env = gym.make("Hopper-v5")
    rng = np.random.default_rng(0)
    obs = [env.reset(seed=0)[0]]
    acts = rng.uniform(-1, 1, (40, 3)).astype(np.float32)
    rews = []
    for a in acts:
        o, r, *_ = env.step(a)
        obs.append(o)
        rews.append(r)
    buffer = EpisodeBuffer(
        id=0,
        infos={},
        observations=np.array(obs),
        actions=acts,
        rewards=np.array(rews),
        terminations=np.zeros(40, bool),
        truncations=np.r_[np.zeros(39, bool), True],
    )
    minari.create_dataset_from_buffers(
        "local/hopper/ablation-test-v0",
        [buffer],
        env=env.spec,
        ref_min_score=0.0,
        ref_max_score=1.0,
        algorithm_name="random",
        data_format="hdf5",
    )
    env.close()
    for flag in (["--rollout-states", "simulator"], ["--rollout-rewards", "simulator"]):
        out = run_script(
            "dydiff_td3bc.py", "--env-id", "local/hopper/ablation-test-v0", "--models-dir", str(tmp_path), *flag, check=False
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert "need the PointMaze simulator; local/hopper/ablation-test-v0 is not PointMaze" in out.stderr
    assert not any(tmp_path.iterdir())  # refused before any pretraining


def test_a_run_from_before_rollout_states_resumes_as_its_ablation(tmp_path):
    from dydiff_td3bc import Args

    saved = json.loads(json.dumps(asdict(Args())))  # as args.json holds it: tuples are lists
    del saved["rollout_states"]
    saved["simulator_states"] = True
    (tmp_path / "args.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    args = resumed_args(Args(resume=str(tmp_path)), Args, ["--resume", str(tmp_path)])
    assert args.rollout_states == "simulator-replay" and args.stored_actions == "relabelled"
    assert args.pretrain.dm_dim_mults == (1, 4, 8) and "--dm-dim-mults" not in args.pretrain.flags()  # the default


def test_a_run_pretrains_only_the_models_it_uses(tmp_path):
    """Real rollouts with the reward model: the missing models are made first, the reward model alone."""
    models = tmp_path / "models"
    flags = ("--exp-name", "dydiff_td3bc-simmodel", "--rollout-states", "simulator", *FLAGS)
    out = run_script("dydiff_td3bc.py", *tiny("dydiff_td3bc.py", models, tmp_path, *flags))
    assert sorted(p.name for p in (models / "maze2d-umaze").glob("*.pt")) == ["reward.pt"]
    assert "the model report needs all three models" in out.stdout
    run_dir = next(tmp_path.glob("*-simmodel__*"))
    assert set(json.loads((run_dir / "task.json").read_text())["models"]) == {"reward"}


def test_the_evaluation_length_is_the_registration_s_unless_given(fixed, tmp_path):
    from dydiff_td3bc import Args

    assert Args().eval_max_steps is None
    assert fixed.make_eval_envs(1).envs[0].spec.max_episode_steps == 300  # maze2d-umaze's registration
    assert fixed.make_eval_envs(1, 1000).envs[0].spec.max_episode_steps == 1000
    out = run_script("dydiff_td3bc.py", "--env-id", "maze2d-umaze", "--eval-max-steps", "0", check=False)
    assert out.returncode != 0 and "--eval-max-steps must be >= 1, got 0" in out.stderr and "Traceback" not in out.stderr


def test_the_draft_gap_compares_one_policy_s_rollouts_three_ways(fixed, tiny_models, tmp_path, capsys):
    """experiments/draft_gap.py: one fixed policy from the same start states, closed loop, the ensemble's draft replayed,
    the draft itself; one well-formed row per run folder, a folder without a final policy refused."""
    import importlib.util

    from script_runs import ROOT

    spec = importlib.util.spec_from_file_location("draft_gap", ROOT / "experiments" / "draft_gap.py")
    draft_gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(draft_gap)
    torch.manual_seed(0)
    actor = draft_gap.Actor(fixed.obs_dim, fixed.action_dim, 1.0)
    run = tmp_path / "run"
    run.mkdir()
    args = dict(env_id="maze2d-umaze", dataset_steps=10_000, rollout_length=16, filter_proportion=0.6)
    stats = dict(obs_mean=torch.zeros(fixed.obs_dim), obs_std=torch.ones(fixed.obs_dim))
    torch.save(dict(actor=actor.state_dict(), args=args, **stats), run / "final_policy.pt")
    draft_gap.main([str(run), "--models-dir", str(tiny_models), "--starts", "64", "--rounds", "15", "1"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["run", "—"] and len(cells) == 6  # closed loop, draft, M = 1, M = 15
    closed, draft, m1, m15 = (c.split(", ") for c in cells[2:])
    for c in (closed, draft, m1, m15):
        assert float(c[0]) >= 0 and 0 <= float(c[1].rstrip("%")) <= 100 and float(c[2]) >= float(c[0])
    assert float(m1[3]) > 0  # after one round the policy acts differently at the replayed states
    # L - 1 = 15 rounds of a perfect DM are the closed-loop rollout itself: the same states, so the same figures
    assert m15[:3] == closed and float(m15[3]) < 1e-5
    (run / "final_policy.pt").unlink()
    with pytest.raises(SystemExit, match="final_policy.pt is missing"):
        draft_gap.main([str(run), "--models-dir", str(tiny_models)])
