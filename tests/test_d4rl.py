"""D4RL's own .hdf5 files (common.d4rl): names, D4RL's episode rules, the maze2d frame, bad files, the four scripts.

No D4RL file can be downloaded here, so the tests write small ones in D4RL's layout: maze2d data made by D4RL's maze
model rebuilt in MuJoCo (d4rl/pointmaze/maze_model.py) and recorded the way scripts/generation/
generate_maze2d_datasets.py records, and Hopper data recorded the way scripts/generation/mujoco/collect_data.py does.
"""

import json
import warnings

import gymnasium as gym
import h5py
import mujoco
import numpy as np
import pytest
from script_runs import DEVICE_FLAG, EXTRA, MODEL_FLAGS, metrics, nested, run_script

from common import d4rl, pointmaze
from common.checkpoints import atomic_save, load_model_file
from common.datasets import load_dataset, resolve_env_id
from common.envs import replay_actions, termination_fn

MAZE2D_STEPS = 3000


def write_d4rl_file(path, arrays: dict) -> str:
    """An .hdf5 file with D4RL's layout: one dataset per key ('infos/qpos' is the dataset qpos of the group infos)."""
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value, compression="gzip")
    return str(path)


# ----------------------------------------------------------------------------- D4RL's maze2d model, rebuilt
def d4rl_maze_model(maze: str) -> mujoco.MjModel:
    """D4RL's maze2d model as maze_model.py's point_maze() builds it: timestep 0.01, no gravity, Euler, damping 1; a
    0.1 sphere on two slide joints in a body at (1.2, 1.2); a 1 x 1 x 0.4 box for each wall cell (row, col) at
    (row + 1, col + 1, 0); motors of gear 100 clipped to [-1, 1]; the geoms' contact defaults."""
    walls = "".join(
        f'<geom name="wall_{r}_{c}" type="box" pos="{r + 1} {c + 1} 0" size="0.5 0.5 0.2" conaffinity="1"/>'
        for r, row in enumerate(d4rl.MAZE_STRINGS[maze])
        for c, cell in enumerate(row)
        if cell == "#"
    )
    xml = f"""<mujoco>
  <compiler inertiafromgeom="true" angle="radian"/>
  <option timestep="0.01" gravity="0 0 0" iterations="20" integrator="Euler"/>
  <default>
    <joint damping="1" limited="false"/>
    <geom friction=".5 .1 .1" density="1000" margin="0.002" condim="1" contype="2" conaffinity="1"/>
  </default>
  <worldbody>
    <geom name="ground" type="plane" size="40 40 0.25" pos="0 0 -0.1" contype="1" conaffinity="0"/>
    <body name="particle" pos="1.2 1.2 0">
      <geom name="particle_geom" type="sphere" size="0.1" contype="1"/>
      <joint name="ball_x" type="slide" pos="0 0 0" axis="1 0 0"/>
      <joint name="ball_y" type="slide" pos="0 0 0" axis="0 1 0"/>
    </body>
    {walls}
  </worldbody>
  <actuator>
    <motor joint="ball_x" ctrlrange="-1 1" ctrllimited="true" gear="100"/>
    <motor joint="ball_y" ctrlrange="-1 1" ctrllimited="true" gear="100"/>
  </actuator>
</mujoco>"""
    return mujoco.MjModel.from_xml_string(xml)


def d4rl_step(model, data, action) -> bool:
    """D4RL's MazeEnv.step on the physics: clip the action, clip the velocity to [-5, 5], one mj_step. Returns whether
    the particle touched a wall during the step."""
    data.qvel[:] = np.clip(data.qvel, -5.0, 5.0)
    mujoco.mj_forward(model, data)
    data.ctrl[:] = np.clip(action, -1.0, 1.0)
    mujoco.mj_step(model, data)
    names = (model.geom(c.geom1).name + model.geom(c.geom2).name for c in data.contact[: data.ncon])
    return any("wall" in n for n in names)


def make_maze2d_file(path, maze="umaze", steps=MAZE2D_STEPS, seed=0, dense=False, episode_steps=60):
    """A maze2d-<maze>-v1 file as D4RL's scripts wrote them, from the rebuilt model; returns (path, ground truth).

    generate_maze2d_datasets.py: each record holds the observation s, the action, the goal and the simulator's qpos and
    qvel; when the goal is reached (or the episode is long enough) a new goal is drawn and s is *not* advanced, so the
    next record repeats the observation. The released files mark those steps in `timeouts` (no terminals).
    relabel_maze2d_rewards.py: reward = within 0.5 of the goal cell (row, col) in qpos, on the record's observation
    (dense: exp(-distance)). Our driver is a noisy P controller aimed straight at random goals, so it often pushes
    against walls (D4RL's waypoint controller went round them): the conversion is checked where contacts happen.
    """
    rng = np.random.default_rng(seed)
    model, data = d4rl_maze_model(maze), None
    data = mujoco.MjData(model)
    rows = d4rl.MAZE_STRINGS[maze]
    free = np.array([(r, c) for r, row in enumerate(rows) for c, cell in enumerate(row) if cell != "#"], dtype=float)
    data.qpos[:] = free[rng.integers(len(free))] + rng.uniform(-0.1, 0.1, 2)
    data.qvel[:] = rng.normal(0, 0.1, 2)
    mujoco.mj_forward(model, data)
    target = free[rng.integers(len(free))] + rng.uniform(-0.1, 0.1, 2)
    s = np.r_[data.qpos, data.qvel]
    rec = {k: [] for k in ("observations", "actions", "timeouts", "infos/goal", "infos/qpos", "infos/qvel")}
    before, after, wall = [], [], []
    ts = 0
    for _ in range(steps):
        action = np.clip(10 * (target - s[:2]) - s[2:] + rng.normal(0, 0.5, 2), -1.0, 1.0)
        done = np.linalg.norm(data.qpos - target) <= 0.5 or ts >= episode_steps
        for k, v in zip(rec, (s, action, done, target, data.qpos.copy(), data.qvel.copy())):
            rec[k].append(v)
        before.append(np.r_[data.qpos, data.qvel])
        wall.append(d4rl_step(model, data, action))
        after.append(np.r_[data.qpos, data.qvel])
        ts += 1
        if done:
            target, ts = free[rng.integers(len(free))] + rng.uniform(-0.1, 0.1, 2), 0
        else:
            s = np.r_[data.qpos, data.qvel]
    arrays = {k: np.array(v, dtype=bool if k == "timeouts" else np.float32) for k, v in rec.items()}
    goal = np.argwhere(np.array([list(r) for r in rows]) == "G")[0].astype(float)
    distance = np.linalg.norm(arrays["observations"][:, :2] - goal, axis=1)
    arrays["rewards"] = (np.exp(-distance) if dense else distance <= 0.5).astype(np.float32)
    arrays["terminals"] = np.zeros(steps, dtype=bool)
    name = f"maze2d-{maze}-{'dense' if dense else 'sparse'}-v1.hdf5"  # D4RL's download names
    truth = dict(before=np.array(before), after=np.array(after), wall=np.array(wall), arrays=arrays)
    return write_d4rl_file(path / name, arrays), truth


@pytest.fixture(scope="module")
def maze2d_file(tmp_path_factory):
    return make_maze2d_file(tmp_path_factory.mktemp("d4rl"))


@pytest.fixture(scope="module")
def maze2d(maze2d_file):
    return load_dataset(maze2d_file[0])


def wall_distance(qpos, maze):
    """Distance from the particle's centre (D4RL's qpos) to the nearest wall box of D4RL's model."""
    xy = np.asarray(qpos) + d4rl.PARTICLE_BODY
    cells = np.argwhere(np.array([list(r) for r in d4rl.MAZE_STRINGS[maze]]) == "#") + d4rl.CELL_ORIGIN  # box centres
    gap = np.maximum(np.abs(xy[:, None, :] - cells[None]) - 0.5, 0.0)
    return np.linalg.norm(gap, axis=-1).min(axis=1)


def _kept(timeouts):
    """The records D4RL's qlearning_dataset makes transitions of (no next_observations): t < N - 1, not a timeout."""
    return np.flatnonzero(~timeouts[:-1])


def _simulator(maze="umaze"):
    return pointmaze.BatchedSimulator(pointmaze.make_eval_env(maze))


# ----------------------------------------------------------------------------- the maze2d frame
@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_d4rl_maze_strings_are_our_mazes_with_our_goal_cells(maze):
    grid = np.array([list(row) for row in d4rl.MAZE_STRINGS[maze]])
    ours = pointmaze.make_eval_env(maze).spec.kwargs["maze_map"]
    np.testing.assert_array_equal(grid == "#", np.array([[c == 1 for c in row] for row in ours]))
    assert tuple(np.argwhere(grid == "G")[0]) == pointmaze.EVAL_GOAL_CELLS[maze]
    assert d4rl.maze_shape(maze) == grid.shape


def test_converted_d4rl_transitions_replay_in_our_evaluation_env_and_need_the_offset(maze2d_file, monkeypatch):
    """Transitions of D4RL's own model, converted, are what our evaluation env does from the converted state (float64
    states straight from the rebuilt model); without the 0.2 the transitions near walls miss."""
    _, truth = maze2d_file
    sim = _simulator()
    actions = truth["arrays"]["actions"]
    wall = truth["wall"]
    assert wall.mean() > 0.1  # many transitions touch a wall: the frame is checked where it matters

    def replay_error():
        s, a = d4rl.maze2d_to_xy(truth["before"], actions, "umaze")
        nxt, _ = d4rl.maze2d_to_xy(truth["after"], None, "umaze")
        return np.abs(sim.step(s, a) - nxt).max(axis=1)

    err = replay_error()
    assert err.max() < 1e-6, err.max()  # measured ~1e-8; a solver warm start (D4RL stepped with one) can add ~1e-7
    monkeypatch.setattr(d4rl, "QPOS_OFFSET", 0.0)
    err0 = replay_error()
    missed = err0 > 1e-3
    assert err0.max() > 0.1 and missed.mean() > 0.05
    # only the walls tell the frames apart: every miss starts within reach of a wall (radius 0.1, the shift of up to
    # 0.2 * sqrt(2), one step's travel at the velocity limit 5 * 0.01, the contact margin 0.002), and the steps
    # farther from every wall replay either way
    near = wall_distance(truth["before"][:, :2], "umaze") < 0.1 + 0.2 * np.sqrt(2) + 0.05 + 0.002
    assert near[missed].all() and (~near).sum() > 100 and err0[~near].max() < 1e-6


def test_a_d4rl_maze2d_file_follows_d4rls_rules(maze2d_file, maze2d):
    path, truth = maze2d_file
    arrays = truth["arrays"]
    kept = _kept(arrays["timeouts"])
    assert maze2d.size == len(kept) < MAZE2D_STEPS - 20  # qlearning_dataset drops each timeout step and the last
    assert maze2d.task == "pointmaze" and maze2d.form == "fixed-goal" and maze2d.obs_dim == maze2d.state_dim == 4
    assert maze2d.dataset_ids == ("d4rl:maze2d-umaze-v1",) and maze2d.d4rl_file == path
    np.testing.assert_array_equal(maze2d.rewards, arrays["rewards"][kept])  # the file's rewards, kept
    assert maze2d.rewards.sum() > 0
    _, a = d4rl.maze2d_to_xy(np.zeros((len(kept), 4)), arrays["actions"][kept], "umaze")
    np.testing.assert_allclose(maze2d.actions, a, atol=1e-7)
    assert not maze2d.terminals.any()
    # Episodes (sequence_dataset) and physical segments both start after each dropped step; windows never cross one.
    starts = np.flatnonzero(np.r_[True, np.diff(kept) != 1])
    np.testing.assert_array_equal(maze2d.episode_starts, starts)
    np.testing.assert_array_equal(maze2d.segment_starts, starts)
    np.testing.assert_array_equal(np.flatnonzero(maze2d.timeouts), maze2d.segment_ends - 1)
    np.testing.assert_array_equal(
        maze2d.next_observations[:-1][~maze2d.timeouts[:-1]], maze2d.observations[1:][~maze2d.timeouts[:-1]]
    )
    w, lengths = maze2d.windows(16)
    seg = np.searchsorted(maze2d.segment_ends, w, side="right")
    assert np.all(w + lengths <= maze2d.segment_ends[seg])
    # D4RL's reference scores (infos.py) for both scales
    assert (maze2d.ref_min_score, maze2d.ref_max_score) == (23.85, 161.86)
    np.testing.assert_allclose(maze2d.d4rl_normalized_score([23.85, 161.86]), [0.0, 100.0])


def test_the_read_file_replays_in_our_evaluation_env(maze2d_file, maze2d, monkeypatch):
    """Every transition the reader makes is what our evaluation env does from its state, to the file's float32 precision
    (D4RL stores float32; at a wall the contact turns a 1e-7 rounding of the position into ~1e-5 of velocity). Without
    the 0.2 offset, or without the simulator's state where the observation is stale, the check fails."""
    path, truth = maze2d_file
    sim = _simulator()
    err = np.abs(sim.step(maze2d.observations, maze2d.actions) - maze2d.next_observations).max(axis=1)
    assert err.max() < 5e-5, err.max()
    # The records after each reached goal repeat the observation: those transitions start from infos/qpos, infos/qvel.
    timeouts = truth["arrays"]["timeouts"]
    after_goal = np.isin(_kept(timeouts), np.flatnonzero(timeouts) + 1)
    assert after_goal.sum() >= 20
    monkeypatch.setattr(d4rl, "maze2d_states", lambda arrays: (arrays["observations"], 0))
    stale = load_dataset(path)
    err_stale = np.abs(sim.step(stale.observations, stale.actions) - stale.next_observations).max(axis=1)
    assert err_stale[after_goal].min() > 1e-3 and err_stale[~after_goal].max() < 5e-5
    monkeypatch.undo()
    monkeypatch.setattr(d4rl, "QPOS_OFFSET", 0.0)
    shifted = load_dataset(path)
    assert np.abs(sim.step(shifted.observations, shifted.actions) - shifted.next_observations).max() > 0.1


def test_the_evaluation_env_of_a_maze2d_file(maze2d):
    env = maze2d.make_eval_env()
    assert env.observation_space.shape == (4,) and env.spec.max_episode_steps == 300  # D4RL's maze2d-umaze-v1 length
    assert env.spec.kwargs["maze_map"][1][1] == "g" and not env.spec.kwargs["reset_target"]
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,)
    np.testing.assert_allclose(maze2d.goal, pointmaze.goal_xy("umaze"))
    assert maze2d.make_eval_env(50).spec.max_episode_steps == 50
    envs = maze2d.make_eval_envs(2, 20)
    assert envs.num_envs == 2 and envs.single_observation_space.shape == (4,)


def test_a_dense_file_keeps_its_dense_rewards(tmp_path):
    path, truth = make_maze2d_file(tmp_path, steps=300, dense=True)
    data = load_dataset(path)
    assert data.dense_reward and data.dataset_ids == ("d4rl:maze2d-umaze-dense-v1",)
    np.testing.assert_array_equal(data.rewards, truth["arrays"]["rewards"][_kept(truth["arrays"]["timeouts"])])
    assert (data.ref_min_score, data.ref_max_score) == pointmaze.D4RL_REF_SCORES[("umaze", True)]


# ----------------------------------------------------------------------------- MuJoCo files
def make_hopper_file(path, name="hopper-medium-replay-v2", steps=1500, seed=0, max_path=40):
    """A Hopper file as collect_data.py writes one: observation, action, next observation, reward; a timeout when the
    episode reaches max_path steps, else a terminal when the env says done; qpos and qvel before the step; float32.
    The last episode is cut by the end of the file (as stitched datasets are)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        env = gym.make("Hopper-v4")
    rng = np.random.default_rng(seed)
    keys = ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts", "infos/qpos", "infos/qvel")
    rec = {k: [] for k in keys}
    s, _ = env.reset(seed=seed)
    t = 0
    for _ in range(steps):
        qpos, qvel = env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()
        a = rng.uniform(-1, 1, 3)
        ns, r, done, _, _ = env.step(a)
        t += 1
        timeout = t == max_path
        terminal = bool(done) and not timeout
        for k, v in zip(keys, (s, a, ns, r, terminal, timeout, qpos, qvel)):
            rec[k].append(v)
        s = ns
        if terminal or timeout:
            s, _ = env.reset(seed=int(rng.integers(1 << 30)))
            t = 0
    arrays = {k: np.array(v, dtype=bool if k in ("terminals", "timeouts") else np.float32) for k, v in rec.items()}
    return write_d4rl_file(path / f"{name}.hdf5", arrays), arrays


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    return make_hopper_file(tmp_path_factory.mktemp("d4rl-hopper"))


def test_a_d4rl_hopper_file_keeps_every_step_and_its_terminals(hopper_file):
    path, arrays = hopper_file
    data = load_dataset(path)
    assert data.task == "hopper" and data.obs_dim == 11 and data.action_dim == 3 and data.form == ""
    assert data.size == len(arrays["observations"])  # next_observations stored: every step is a transition
    np.testing.assert_array_equal(data.observations, arrays["observations"])
    np.testing.assert_array_equal(data.next_observations, arrays["next_observations"])
    np.testing.assert_array_equal(data.terminals, arrays["terminals"])
    assert data.terminals.sum() > 5 and arrays["timeouts"].sum() > 0
    ends = arrays["terminals"] | arrays["timeouts"]
    np.testing.assert_array_equal(data.episode_starts, np.flatnonzero(np.r_[True, ends[:-1]]))
    np.testing.assert_array_equal(data.segment_starts, data.episode_starts)  # every episode starts from a reset
    np.testing.assert_array_equal(termination_fn("hopper")(data.next_observations), data.terminals)
    assert (data.ref_min_score, data.ref_max_score) == (-20.272305, 3234.3) and data.d4rl_normalized_score([0.0]) is None
    env = data.make_eval_env()
    assert env.spec.id == "Hopper-v4" and env.spec.max_episode_steps == 1000
    s = int(data.segment_starts[2])
    real = replay_actions(env, "hopper", data.observations[s], data.actions[s : s + 8])
    np.testing.assert_allclose(real, data.observations[s : s + 8], atol=1e-4)


def test_walker2d_and_halfcheetah_files_are_told_apart_by_their_names(tmp_path):
    rng = np.random.default_rng(0)
    n = 50
    arrays = dict(
        observations=rng.normal(size=(n, 17)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, 6)).astype(np.float32),
        next_observations=rng.normal(size=(n, 17)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        terminals=np.zeros(n, bool),
        timeouts=np.r_[np.zeros(n - 1, bool), True],
    )
    walker = load_dataset(write_d4rl_file(tmp_path / "walker2d_medium_expert-v2.hdf5", arrays))
    cheetah = load_dataset(write_d4rl_file(tmp_path / "halfcheetah-medium-v2.hdf5", arrays))
    assert walker.task == "walker2d" and walker.make_eval_env().spec.id == "Walker2d-v4"
    assert cheetah.task == "halfcheetah" and cheetah.make_eval_env().spec.id == "HalfCheetah-v4"
    assert walker.ref_max_score == 4592.3 and cheetah.ref_min_score == -280.178953
    assert walker.fingerprint != cheetah.fingerprint  # the dataset's name is part of it


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "file,name,task",
    [
        ("maze2d-large-v1.hdf5", "maze2d-large-v1", "pointmaze"),
        ("data/maze2d-large-sparse-v1.hdf5", "maze2d-large-v1", "pointmaze"),
        ("maze2d-medium-dense-v1.hdf5", "maze2d-medium-dense-v1", "pointmaze"),
        ("/x/hopper_medium_replay-v2.hdf5", "hopper-medium-replay-v2", "hopper"),
        ("walker2d-medium-expert-v2.HDF5", "walker2d-medium-expert-v2", "walker2d"),
        ("halfcheetah-random-v0.hdf5", "halfcheetah-random-v0", "halfcheetah"),
    ],
)
def test_files_are_named_as_d4rl_names_them(file, name, task):
    spec = d4rl.task_of_file(file)
    assert (spec.name, spec.task) == (name, task)
    assert d4rl.is_d4rl_file(file) and d4rl.dataset_name(file) == name


def test_folder_names_and_per_dataset_defaults_of_a_file():
    from common.checkpoints import models_folder

    assert d4rl.env_label("/data/runs/hopper_medium_replay-v2.hdf5") == "hopper_medium_replay-v2"
    assert d4rl.env_label("D4RL/pointmaze/large-v2") == "D4RL_pointmaze_large-v2"
    assert str(models_folder("models", "/a/b/maze2d-large-v1.hdf5")) == "models/maze2d-large-v1"
    assert d4rl.dataset_name("maze2d-large") == "maze2d-large"
    # the scripts' defaults read the dataset's name: a folder named "mazes" must not make a hopper file maze2d
    from dydiff_td3bc import Args, defaults_for

    args = defaults_for(Args(), d4rl.dataset_name("/mazes/hopper_medium_replay-v2.hdf5"))
    assert (args.num_iterations, args.filter_proportion) == (2, 0.8)


def test_runs_on_a_maze2d_file_sit_next_to_the_papers_table_2():
    from common.results import paper_score

    assert paper_score("/data/maze2d-large-sparse-v1.hdf5", "fixed-goal", "TD3+BC + DyDiff (M=1)") == "182 ± 42"
    assert paper_score("maze2d-large-v1.hdf5", "fixed-goal", "CQL") == "5 ± 11"
    assert paper_score("maze2d-large-dense-v1.hdf5", "fixed-goal", "CQL") == "—"  # Table 2 is the sparse task


def test_medium_replay_names_point_to_the_d4rl_file():
    with pytest.raises(ValueError, match=r"no MuJoCo medium-replay.*hopper-medium-replay-v2\.hdf5"):
        resolve_env_id("hopper-medium-replay")


# ----------------------------------------------------------------------------- bad files: one line each
def _small_maze2d(n=40):
    rng = np.random.default_rng(1)
    return dict(
        observations=rng.uniform(0, 3, (n, 4)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        rewards=np.zeros(n, np.float32),
        terminals=np.zeros(n, bool),
        timeouts=np.zeros(n, bool),
    )


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("missing file", FileNotFoundError, r"no D4RL file at .*maze2d-umaze-v1\.hdf5; download it"),
        ("not hdf5", ValueError, r"cannot be read \(.*\); download it again"),
        ("truncated", ValueError, r"cannot be read \(.*\); download it again"),
        ("no timeouts", ValueError, r"has no 'timeouts' \(it has: .*\); it is not a complete D4RL maze2d-umaze-v1 file"),
        ("short actions", ValueError, r"'actions' has shape \(39, 2\), expected \(40, 2\) for maze2d-umaze-v1"),
        ("hopper-sized observations", ValueError, r"'observations' has shape \(40, 11\), expected \(40, 4\)"),
        ("rewards of two columns", ValueError, r"'rewards' has shape \(40, 2\), expected \(40,\)"),
        ("NaN", ValueError, r"'observations' holds NaN or infinite values"),
        ("unknown task", ValueError, r"cannot tell which D4RL dataset .*mystery\.hdf5 holds from its name; give the file"),
        ("terminals without next states", ValueError, r"terminal steps but no 'next_observations'.*-v2 file"),
    ],
)
def test_a_bad_file_stops_with_one_line_naming_the_problem(tmp_path, case, error, match):
    path = tmp_path / "maze2d-umaze-v1.hdf5"
    arrays = _small_maze2d()
    if case == "not hdf5":
        path.write_bytes(b"this is not an HDF5 file")
    elif case != "missing file":
        if case == "no timeouts":
            del arrays["timeouts"]
        elif case == "short actions":
            arrays["actions"] = arrays["actions"][:-1]
        elif case == "hopper-sized observations":
            arrays["observations"] = np.zeros((40, 11), np.float32)
        elif case == "rewards of two columns":
            arrays["rewards"] = np.zeros((40, 2), np.float32)
        elif case == "NaN":
            arrays["observations"][3, 1] = np.nan
        elif case == "unknown task":
            path = tmp_path / "mystery.hdf5"
        elif case == "terminals without next states":
            arrays["terminals"][10] = True
        write_d4rl_file(path, arrays)
        if case == "truncated":
            path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(error, match=match) as e:
        load_dataset(str(path))
    assert "\n" not in str(e.value)


def test_rewards_and_flags_of_shape_n_by_1_are_read_as_d4rl_reads_them(tmp_path):
    arrays = _small_maze2d()
    arrays["rewards"] = arrays["rewards"][:, None]
    arrays["timeouts"] = arrays["timeouts"][:, None]
    data = load_dataset(write_d4rl_file(tmp_path / "maze2d-umaze-v1.hdf5", arrays))
    assert data.rewards.shape == (39,)


def test_models_made_for_a_minari_dataset_are_refused_for_a_d4rl_file(maze2d, tmp_path):
    for name in ("dm", "reward"):
        atomic_save(
            {
                "fingerprint": "0123456789abcdef",
                "physical_fingerprint": "fedcba9876543210",
                "dataset_ids": ["D4RL/pointmaze/umaze-v2"],
                "obs_dim": 6,
            },
            tmp_path / f"{name}.pt",
        )
        with pytest.raises(ValueError) as e:
            load_model_file(tmp_path, name, maze2d)
        message = str(e.value)
        assert "trained on dataset D4RL/pointmaze/umaze-v2" in message and maze2d.fingerprint in message
        assert "pretrain models for this dataset" in message and "--env-id d4rl:" not in message and "\n" not in message


# ----------------------------------------------------------------------------- the scripts
def _tiny_run(path, models, runs, *extra):
    return [
        "--env-id",
        path,
        "--eval-episodes",
        "1",
        "--eval-max-steps",
        "30",
        "--total-steps",
        "60",
        "--eval-freq",
        "60",
        "--rollout-freq",
        "50",
        "--rollout-batch-size",
        "32",
        "--rollout-length",
        "16",
        "--sampler-steps",
        "4",
        "--models-dir",
        str(models),
        "--runs-dir",
        str(runs),
        DEVICE_FLAG,
        *nested(MODEL_FLAGS),
        *extra,
    ]


def test_td3bc_with_dydiff_on_a_maze2d_file_pretrains_and_trains(maze2d_file, tmp_path):
    path, _ = maze2d_file
    models, runs = tmp_path / "models", tmp_path / "runs"
    out = run_script("dydiff_td3bc.py", *_tiny_run(path, models, runs))
    folder = models / "maze2d-umaze-sparse-v1"  # the file's stem
    assert "pretrain_models.py --env-id " + path in out.stdout
    assert all((folder / f).exists() for f in ("dm.pt", "dynamics.pt", "reward.pt", "report.json"))
    run = next(runs.glob("maze2d-umaze-sparse-v1__dydiff_td3bc__1__*"))
    args = json.loads((run / "args.json").read_text())
    assert (args["num_iterations"], args["filter_proportion"], args["eval_max_steps"]) == (1, 0.6, 30)
    task = json.loads((run / "task.json").read_text())
    assert task["form"] == "fixed-goal" and task["dataset_ids"] == ["d4rl:maze2d-umaze-v1"] and task["d4rl_file"] == path
    m = metrics(run)
    assert [r["step"] for r in m if "dydiff/kept_fraction" in r] == [0, 50]
    assert any("eval/d4rl_normalized_score" in r for r in m)
    assert json.loads((run / "result.json").read_text())["total_steps"] == 60


def test_td3bc_with_dydiff_on_a_hopper_medium_replay_file(hopper_file, tmp_path):
    path, _ = hopper_file
    runs = tmp_path / "runs"
    run_script("dydiff_td3bc.py", *_tiny_run(path, tmp_path / "models", runs))
    run = next(runs.glob("hopper-medium-replay-v2__dydiff_td3bc__1__*"))
    args = json.loads((run / "args.json").read_text())
    assert (args["num_iterations"], args["filter_proportion"]) == (2, 0.8)  # Table 4's medium-replay defaults
    m = metrics(run)
    assert [r["step"] for r in m if "dydiff/kept_fraction" in r] == [0, 50]
    assert json.loads((run / "result.json").read_text())["total_steps"] == 60


@pytest.mark.parametrize("script", ["dydiff_cql.py", "dydiff_diffql.py"])
def test_cql_and_diffql_train_on_a_maze2d_file(maze2d_file, tmp_path, script):
    path, _ = maze2d_file
    run_script(script, *_tiny_run(path, tmp_path / "models", tmp_path / "runs", "--no-dydiff", *EXTRA.get(script, [])))
    run = next((tmp_path / "runs").glob("maze2d-umaze-sparse-v1__*"))
    assert json.loads((run / "result.json").read_text())["total_steps"] == 60


def test_a_script_stops_with_the_files_one_line(tmp_path):
    path = write_d4rl_file(tmp_path / "mystery.hdf5", _small_maze2d())
    out = run_script("dydiff_td3bc.py", "--env-id", path, "--no-dydiff", DEVICE_FLAG, check=False)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith(f"cannot tell which D4RL dataset {path} holds from its name")
