"""common.results on tiny fake run folders: summaries, the Markdown table, the plot, bad inputs."""

import json
import math

import pytest

from common import results


def fake_run(
    root, name, seed, scores, dydiff=True, m=1, finished=True, wall=600.0, duplicate_step=None, form="fixed-goal", **flags
):
    """A run folder as a training script leaves it (evaluations every 1000 steps); `flags` override its arguments."""
    run = root / name
    run.mkdir()
    args = dict(
        exp_name="dydiff_td3bc" if dydiff else "dydiff_td3bc-base",
        env_id="maze2d-large",
        seed=seed,
        dydiff=dydiff,
        num_iterations=m,
        total_steps=1000 * len(scores),
        eval_freq=1000,
        rollout_batch_size=64,
        rollout_freq=500,
        synthetic_buffer_size=62_500,
        real_ratio=0.6,
    )
    args.update(flags)
    (run / "args.json").write_text(json.dumps(args))
    rows = []
    for i, score in enumerate(scores):
        step = 1000 * (i + 1)
        rows.append({"step": step, "losses/qf1_loss": 1.0})
        if dydiff:  # a rollout's synthetic-data metrics
            rows.append({"step": step, "dydiff/wall_crossing_share": 0.1 * seed, "dydiff/rollout_time": 2.0})
        if step == duplicate_step:  # a resumed run redid this step: first a stale value, then the kept one
            rows.append({"step": step, "eval/normalized_score": -999.0})
        rows.append({"step": step, "eval/normalized_score": score, "eval/d4rl_normalized_score": 2 * score})
    lines = [json.dumps(r) for r in rows] + ['{"step": 99, "eval/norm']  # a line cut by a kill
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "task.json").write_text(json.dumps(dict(form=form, dataset_ids=["local/pointmaze/large-v3"])))
    if finished:
        final = sum(scores[-5:]) / len(scores[-5:])
        result = dict(
            form=form,
            dataset_ids=["local/pointmaze/large-v3"],
            final_normalized_score=final,
            evaluations=scores,
            wall_time_s=wall,
        )
        (run / "result.json").write_text(json.dumps(dict(result, final_d4rl_normalized_score=2 * final)))
    return run


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    base = [fake_run(root, f"base{s}", s, [10.0 * s] * 6, dydiff=False, wall=60.0) for s in (1, 2, 3)]
    dyd = [fake_run(root, f"dydiff{s}", s, [0, 0, 0, 0, 0, 20.0 * s], wall=3600.0 * s, duplicate_step=3000) for s in (1, 2, 3)]
    m0 = [fake_run(root, "m0_1", 1, [5.0] * 6, m=0), fake_run(root, "m0_2", 2, [1.0, 2.0], m=0, finished=False)]
    return base, dyd, m0


def test_arm_names():
    assert results.arm_name(dict(exp_name="dydiff_td3bc-base", dydiff=False)) == "TD3+BC"
    assert results.arm_name(dict(exp_name="dydiff_cql", dydiff=True, num_iterations=2)) == "CQL + DyDiff (M=2)"
    assert results.arm_name(dict(exp_name="dydiff_diffql", dydiff=True, num_iterations=0)).startswith("Diffusion-QL + M=0")
    assert results.arm_name(dict(exp_name="my-run", dydiff=False)) == "my-run"
    ablation = dict(exp_name="dydiff_td3bc-sim", dydiff=True, num_iterations=1, rollout_states="simulator-replay")
    assert results.arm_name(ablation) == "TD3+BC + DyDiff (M=1), simulator states"
    # a run from before --rollout-states replaced --simulator-states is the same arm
    old = dict(exp_name="dydiff_td3bc-sim", dydiff=True, num_iterations=1, simulator_states=True)
    assert results.arm_name(old) == results.arm_name(ablation)
    ladder = {
        "TD3+BC + simulator rollouts, true rewards": dict(rollout_states="simulator", rollout_rewards="simulator"),
        "TD3+BC + simulator rollouts": dict(rollout_states="simulator", rollout_rewards="model"),
        "TD3+BC + DyDiff (M=1), simulator states, conditioning actions": dict(
            rollout_states="simulator-replay", stored_actions="conditioning"
        ),
        "TD3+BC + DyDiff (M=1), conditioning actions": dict(rollout_states="dm", stored_actions="conditioning"),
        "TD3+BC + DyDiff (M=1), true rewards": dict(rollout_rewards="simulator"),
    }
    for name, flags in ladder.items():
        assert results.arm_name(dict(exp_name="dydiff_td3bc", dydiff=True, num_iterations=1, **flags)) == name
    assert results.paper_score("maze2d-large", "fixed-goal", results.arm_name(ablation)) == "—"
    assert results.paper_score("maze2d-medium", "fixed-goal", "CQL + DyDiff (M=1)") == "156 ± 17"
    assert results.paper_score("maze2d-medium", "fixed-goal", "CQL + DyDiff (M=2)") == "—"


def test_summary_of_a_run_folder(runs):
    base, dyd, m0 = runs
    s = results.summarize_run(dyd[1])
    assert s["arm"] == "TD3+BC + DyDiff (M=1)" and s["seed"] == 2 and s["finished"]
    assert s["eval_steps"] == [1000, 2000, 3000, 4000, 5000, 6000]
    assert s["eval_scores"] == [0, 0, 0, 0, 0, 40.0]  # the redone step's stale value is dropped
    assert s["final_normalized_score"] == pytest.approx(8.0) and s["wall_time_s"] == 7200.0
    unfinished = results.summarize_run(m0[1])
    assert not unfinished["finished"] and unfinished["final_normalized_score"] is None
    assert unfinished["eval_scores"] == [1.0, 2.0]


def test_table_means_and_stds(runs):
    base, dyd, m0 = runs
    text = results.table(results.load([*base, *dyd, *m0]))
    rows = {line.split(" | ")[2]: line for line in text.splitlines()[2:] if line.startswith("|")}
    assert set(rows) == {"TD3+BC", "TD3+BC + DyDiff (M=1)", "TD3+BC + M=0 (ensemble rollouts)"}
    assert all(line.startswith("| maze2d-large | fixed goal (D4RL) |") for line in rows.values())
    assert "| 3 | 20.0 ± 10.0 |" in rows["TD3+BC"] and "| 1 min |" in rows["TD3+BC"]
    assert "| 3 | 8.0 ± 4.0 |" in rows["TD3+BC + DyDiff (M=1)"]  # finals 4, 8, 12
    # all evaluations [0 x 5, 20 s]: 3.3, 6.7, 10; second halves [0, 0, 20 s]: 6.7, 13.3, 20
    assert "(seed 3) | 16.0 ± 8.0 | 182 ± 42 | 6.7 ± 3.3 | 13.3 ± 6.7 |" in rows["TD3+BC + DyDiff (M=1)"]
    assert (
        "| 20.0 ± 10.0 | 10.0 (seed 1), 20.0 (seed 2), 30.0 (seed 3) | 40.0 ± 20.0 | 43 ± 46 | 20.0 ± 10.0 | 20.0 ± 10.0 |"
        in rows["TD3+BC"]
    )  # the D4RL-scale column: twice the score in these fake runs; then the paper's Table 2
    assert "| 16.0 ± 8.0 | 182 ± 42 |" in rows["TD3+BC + DyDiff (M=1)"]
    assert "| 10.0 ± 0.0 | — |" in rows["TD3+BC + M=0 (ensemble rollouts)"]  # the paper has no M = 0 row
    assert "2 h 00 min" in rows["TD3+BC + DyDiff (M=1)"]  # mean of 1, 2, 3 hours
    assert "| 1 | 5.0 ± 0.0 |" in rows["TD3+BC + M=0 (ensemble rollouts)"]
    assert "unfinished: seed 2 at step 2,000" in rows["TD3+BC + M=0 (ensemble rollouts)"]


def test_summaries_rebuild_the_same_table_and_plot(runs, tmp_path):
    base, dyd, m0 = runs
    out = tmp_path / "summaries"
    results.main(
        [
            *map(str, base + dyd + m0),
            "--summaries",
            str(out),
            "--table",
            str(tmp_path / "a.md"),
            "--plot",
            str(tmp_path / "a.png"),
        ]
    )
    files = sorted(out.glob("*.json"))
    assert len(files) == 8
    results.main([*map(str, files), "--table", str(tmp_path / "b.md"), "--plot", str(tmp_path / "b.png")])
    assert (tmp_path / "a.md").read_text() == (tmp_path / "b.md").read_text()
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(tmp_path):
    with pytest.raises(SystemExit, match="args.json is missing"):
        results.summarize_run(tmp_path)
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="is not a summary"):
        results.load([bad])
    bad.write_text("{")
    with pytest.raises(SystemExit, match="not valid JSON"):
        results.load([bad])


def test_the_moving_average_of_the_curves():
    assert results.moving_average([0.0, 2.0, 4.0, 6.0], 2) == [0.0, 1.0, 3.0, 5.0]
    assert results.moving_average([0.0, 3.0, 6.0, 9.0], 3) == [0.0, 1.5, 3.0, 6.0]
    assert results.moving_average([1.0, 5.0], 1) == [1.0, 5.0]


def test_a_bad_smoothing_ends_in_one_message(runs, capsys):
    with pytest.raises(SystemExit):
        results.main([str(runs[0][0]), "--smooth", "0"])
    assert "--smooth 0: give a number of evaluations, at least 1" in capsys.readouterr().err


def test_the_synthetic_data_table(runs):
    base, dyd, m0 = runs
    summaries = results.load([*base, *dyd, *m0])
    assert summaries[0]["synthetic"] == {}  # a base run has no rollouts
    assert summaries[3]["synthetic"] == {"dydiff/wall_crossing_share": pytest.approx(0.1), "dydiff/rollout_time": 2.0}
    lines = results.synthetic_table(summaries).splitlines()
    assert lines[0] == "| env | task | arm | seeds | share of trajectories through a wall | rollout time (s) |"  # logged ones
    rows = {line.split(" | ")[2]: line for line in lines[2:]}
    assert set(rows) == {"TD3+BC + DyDiff (M=1)", "TD3+BC + M=0 (ensemble rollouts)"}  # base runs have none
    assert rows["TD3+BC + DyDiff (M=1)"].endswith("| 3 | 0.20 ± 0.10 | 2.00 ± 0.00 |")
    assert rows["TD3+BC + M=0 (ensemble rollouts)"].endswith("| 1 | 0.10 ± 0.00 | 2.00 ± 0.00 |")  # finished only
    assert results.synthetic_table(results.load(base)) == ""


def test_the_two_maze2d_tasks_never_share_a_row(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    fixed = [fake_run(root, f"fixed{s}", s, [10.0] * 6, dydiff=False) for s in (1, 2)]
    gc = [fake_run(root, f"gc{s}", s, [70.0] * 6, dydiff=False, form="goal-conditioned") for s in (1, 2)]
    summaries = results.load([*fixed, *gc])
    assert [s["task"] for s in summaries] == ["fixed-goal"] * 2 + ["goal-conditioned"] * 2
    assert summaries[0]["eval_d4rl_scores"] == [20.0] * 6 and summaries[0]["final_d4rl_normalized_score"] == 20.0
    rows = results.table(summaries).splitlines()[2:]
    assert len(rows) == 2
    assert rows[0].startswith("| maze2d-large | fixed goal (D4RL) | TD3+BC | 2 | 10.0 ± 0.0 |")
    assert rows[1].startswith("| maze2d-large | goal-conditioned (Minari) | TD3+BC | 2 | 70.0 ± 0.0 |")
    assert "| 20.0 ± 0.0 | 43 ± 46 |" in rows[0] and "| 140.0 ± 0.0 | — |" in rows[1]  # the paper ran the fixed goal


def test_summaries_of_an_older_version_are_refused(runs, tmp_path):
    s = results.summarize_run(runs[0][0])
    old = tmp_path / "old.json"
    old.write_text(json.dumps(dict(s, version=1)))
    with pytest.raises(SystemExit, match="write it again from its run folder"):
        results.load([old])


def test_welch_t_and_the_bootstrap_interval():
    t, df = results.welch_t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert t == pytest.approx(-3 / (2 / 3) ** 0.5) and df == pytest.approx(4.0)
    t, df = results.welch_t([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 6.0])  # unequal variances: fewer degrees of freedom
    assert t == pytest.approx((2.5 - 2.0) / (5 / 12 + 12 / 3) ** 0.5) and 2 < df < 3
    lo, hi = results.bootstrap_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert -5.0 <= lo < -3.0 < hi <= -1.0
    assert results.bootstrap_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == (lo, hi)  # seeded: the same every time
    assert math.isnan(results.welch_t([1.0], [2.0, 3.0])[0])


def test_the_comparison_table(runs):
    base, dyd, m0 = runs
    lines = results.comparison_table(results.load([*base, *dyd, *m0])).splitlines()
    rows = lines[2:]
    assert len(rows) == 3  # only base and DyDiff have >= 2 finished seeds: one pair, three scores
    final = next(r for r in rows if "| final |" in r)
    # base finals 10, 20, 30 vs DyDiff 4, 8, 12: +12.0, t = 12 / sqrt(100/3 + 16/3)
    assert "| TD3+BC vs TD3+BC + DyDiff (M=1) | final | +12.0 | +1.93 (" in final


def test_the_ladder_orders_the_ablations_and_splits_rollout_volumes(runs, tmp_path):
    root = runs[0][0].parent
    sim = dict(rollout_states="simulator")
    fake_run(root, "simtrue1", 1, [50.0] * 6, rollout_rewards="simulator", **sim)
    fake_run(root, "simmodel1", 1, [40.0] * 6, **sim)
    fake_run(root, "simmodel-big1", 1, [45.0] * 6, rollout_batch_size=2048, synthetic_buffer_size=2_000_000, **sim)
    fake_run(root, "replay1", 1, [30.0] * 6, rollout_states="simulator-replay")
    fake_run(root, "replaycond1", 1, [35.0] * 6, rollout_states="simulator-replay", stored_actions="conditioning")
    summaries = results.load(sorted(root.iterdir()))
    arms = {arm for _, _, arm in results.group(summaries)}
    # one arm at two rollout volumes: two arms, named by B_r; the others keep their names
    assert {"TD3+BC + simulator rollouts, B_r 64", "TD3+BC + simulator rollouts, B_r 2,048"} <= arms
    assert "TD3+BC + DyDiff (M=1)" in arms and "TD3+BC + simulator rollouts" not in arms
    ladder = sorted((a for a in arms if a.startswith("TD3+BC + ")), key=results.ladder_rank)
    assert ladder == [
        "TD3+BC + simulator rollouts, true rewards",
        "TD3+BC + simulator rollouts, B_r 64",
        "TD3+BC + simulator rollouts, B_r 2,048",
        "TD3+BC + DyDiff (M=1), simulator states, conditioning actions",
        "TD3+BC + DyDiff (M=1), simulator states",
        "TD3+BC + DyDiff (M=1)",
        "TD3+BC + M=0 (ensemble rollouts)",
    ]
    results.main([str(p) for p in sorted(root.iterdir())] + ["--ladder", str(tmp_path / "ladder.png")])
    assert (tmp_path / "ladder.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no finished augmented runs"):
        results.ladder_plot([s for s in summaries if not s["args"]["dydiff"]], tmp_path / "none.png")


def test_the_evaluation_episode_length_is_recorded_or_the_registration_s():
    def length(env_id, **args):
        return results.episode_length(dict(env_id=env_id, args=args))

    assert length("maze2d-large") == "800" and length("local/pointmaze/umaze-v3") == "300"
    assert length("maze2d-large", eval_max_steps=1000) == "1,000" and length("hopper-medium") == "1,000"
    assert length("my/other-v0") == "—"


def test_runs_on_data_of_other_sizes_are_arms_of_their_own(runs, tmp_path):
    root = runs[0][0].parent
    for seed in (1, 2):  # the base on D4RL's 4M: the size is read from the local dataset's id, or recorded
        run = fake_run(root, f"base4m{seed}", seed, [60.0] * 6, dydiff=False)
        task = dict(form="fixed-goal", dataset_ids=["local/pointmaze/large-4000000steps-seed123-v3"])
        if seed == 2:
            task = dict(task, dataset_ids=["some/other-id"], size=4_000_000)
        result = json.loads((run / "result.json").read_text())
        (run / "result.json").write_text(json.dumps(dict(result, **task)))
    summaries = results.load(sorted(root.iterdir()))
    groups = results.group(summaries)
    arms = {arm for _, _, arm in groups}
    assert {"TD3+BC, 1M data", "TD3+BC, 4M data"} <= arms and "TD3+BC" not in arms
    assert [s["seed"] for s in groups[("maze2d-large", "fixed-goal", "TD3+BC, 4M data")]] == [1, 2]
    assert "TD3+BC + DyDiff (M=1)" in arms  # an arm with one size keeps its name
    # the paper's column stands beside either size (its data were D4RL's)
    assert results.paper_score("maze2d-large", "fixed-goal", "TD3+BC, 4M data") == "43 ± 46"
    assert results.paper_score("maze2d-large", "fixed-goal", "TD3+BC, 1M data") == "43 ± 46"
    # the ladder keeps the augmented runs' size: its base line is the 1M base, not a panel of its own
    results.ladder_plot(summaries, tmp_path / "ladder.png")
    assert (tmp_path / "ladder.png").stat().st_size > 10_000


def test_the_data_size_of_older_summaries_comes_from_the_dataset_id():
    assert results.dataset_size(dict(dataset_ids=["local/pointmaze/large-v3"])) == 1_000_000
    assert results.dataset_size(dict(dataset_ids=["local/pointmaze/large-dense-2000000steps-seed123-v3"])) == 2_000_000
    assert results.dataset_size(dict(dataset_ids=["D4RL/pointmaze/large-v2"])) is None
    assert results.dataset_size(dict(dataset_ids=["D4RL/pointmaze/large-v2"], dataset_size=123)) == 123


def test_the_table_says_where_one_rows_runs_differ_in_a_setting(runs, tmp_path):
    root = runs[0][0].parent
    for seed, extra in ((1, {}), (2, dict(models={"reward": "e366dce0bc8f75c1"})), (3, dict(models={"reward": "ffff"}))):
        run = fake_run(root, f"simmodel{seed}", seed, [40.0] * 6, rollout_states="simulator", eval_episodes=10 + (seed == 3))
        result = json.loads((run / "result.json").read_text())
        (run / "result.json").write_text(json.dumps(dict(result, **extra)))
    text = results.table(results.load(sorted(root.iterdir())))
    notes = [n for n in text.split("Settings that differ among the runs of one row")[1].splitlines() if "simulator" in n]
    assert len(notes) == 1 and notes[0].startswith("- maze2d-large, fixed goal (D4RL), TD3+BC + simulator rollouts: ")
    assert "eval_episodes: 10 (seeds 1, 2), 11 (seed 3)" in notes[0]
    assert "models: not on record (seed 1); reward e366dce0 (seed 2); reward ffff (seed 3)" in notes[0]
    base, dyd, _ = runs  # rows whose runs agree have no note
    assert "Settings that differ" not in results.table(results.load([*base, *dyd]))
