"""Turn training runs into a results table and a learning-curve plot.

    python -m common.results runs/maze2d-large__* --summaries results/maze2d-large        # summarize the runs
    python -m common.results results/maze2d-large/*.json --plot results/maze2d-large.png  # rebuild from summaries
    python -m common.results results/maze2d-large/*.json --ladder results/maze2d-large-ladder.png  # the ablations

Each argument is a run folder (what a training script writes: `args.json`, `metrics.jsonl`, and
`result.json` once it has finished) or a summary JSON written by this command. `--summaries DIR`
writes one small summary per run folder (its arm, seed, evaluations and wall time), so the table
and the plot can be rebuilt later without the run folders. The Markdown table (final normalized
score, mean ± std over seeds, per arm; then, for the augmented arms, the synthetic data: the share of
trajectories through a wall, whether the kept ones reach the goal by the reward model, by their own states and in
the real simulator, predicted vs real return, the critic's Q on real and synthetic transitions, the rollout time;
then, for each pair of arms, the difference of the means with Welch's t and a bootstrap interval) goes to stdout
or `--table FILE`. Runs on the two maze2d tasks (fixed-goal, goal-conditioned) never share a row.

An arm is one algorithm with one setting: the base algorithm (`--no-dydiff`), DyDiff with M
refinement iterations, M = 0 (dynamics-ensemble rollouts only), an ablation (`--rollout-states`,
`--stored-actions`, `--rollout-rewards`), or the paper's baseline SynthER (`--augment synther`; SynthER-f with its
filter; its ablation `--synther-next-states simulator`); runs of one arm at different B_r (SynthER: different
sample counts) are arms of their own. `--ladder FILE` draws the ablations' ladder: each arm's final score and mean
of all evaluations, every seed shown, the base as a line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

SUMMARY_VERSION = 2  # 2: the task (maze2d: fixed-goal or goal-conditioned) and the D4RL maze2d-v1 scores
SYNTHETIC_METRICS = {  # logged at each rollout (the critic's Q at each logging step): the columns of the synthetic-data table
    "dydiff/wall_crossing_share": "share of trajectories through a wall",
    "dydiff/wall_crossing_share_kept": "through a wall, kept",
    "dydiff/return_all": "predicted return, all",
    "dydiff/return_kept": "predicted return, kept",
    "dydiff/goal_share_reward_model": "kept reaching the goal: reward model",
    "dydiff/goal_share_generated": "kept reaching the goal: own states",
    "dydiff/goal_share_real": "kept reaching the goal: real simulator",
    "dydiff/return_kept_predicted": "checked kept: predicted return",
    "dydiff/return_kept_real": "checked kept: real return",
    "losses/q_real": "critic Q, real",
    "losses/q_synthetic": "critic Q, synthetic",
    "dydiff/rollout_time": "rollout time (s)",
    # SynthER's generated transitions, checked once before training (common.synther.transition_checks)
    "synther/one_step_error": "SynthER: one-step error",
    "synther/one_step_error_copy": "SynthER: one-step error of s' = s",
    "synther/wall_crossing_share": "SynthER: transitions through a wall",
    "synther/reward_abs_error": "SynthER: reward error",
    "synther/goal_share": "SynthER: s' at the goal",
    "synther/goal_share_dataset": "dataset: s' at the goal",
}
TASK_NAMES = {"fixed-goal": "fixed goal (D4RL)", "goal-conditioned": "goal-conditioned (Minari)", "": "—"}
ALGO_NAMES = {"dydiff_td3bc": "TD3+BC", "dydiff_cql": "CQL", "dydiff_diffql": "Diffusion-QL"}


# The paper's Table 2 (D4RL maze2d-v1 scale, mean ± std over 3 runs): env -> algorithm -> (base, DyDiff (M=1)).
# SynthER's columns of Table 2, and SynthER-f (with TD3+BC only) of Table 6: env -> arm -> (mean, std).
PAPER_SYNTHER = {
    "maze2d-umaze": {
        "TD3+BC + SynthER": (32, 9),
        "CQL + SynthER": (10, 12),
        "Diffusion-QL + SynthER": (45, 2),
        "TD3+BC + SynthER-f": (39, 15),
    },
    "maze2d-medium": {
        "TD3+BC + SynthER": (49, 20),
        "CQL + SynthER": (92, 3),
        "Diffusion-QL + SynthER": (17, 4),
        "TD3+BC + SynthER-f": (73, 28),
    },
    "maze2d-large": {
        "TD3+BC + SynthER": (98, 33),
        "CQL + SynthER": (37, 5),
        "Diffusion-QL + SynthER": (138, 26),
        "TD3+BC + SynthER-f": (87, 29),
    },
}
PAPER_TABLE2 = {
    "maze2d-umaze": {"TD3+BC": ((35, 10), (55, 12)), "CQL": ((19, 15), (58, 43)), "Diffusion-QL": ((47, 1), (46, 2))},
    "maze2d-medium": {"TD3+BC": ((81, 50), (134, 19)), "CQL": ((93, 13), (156, 17)), "Diffusion-QL": ((50, 2), (162, 2))},
    "maze2d-large": {"TD3+BC": ((43, 46), (182, 42)), "CQL": ((5, 11), (110, 7)), "Diffusion-QL": ((109, 29), (197, 15))},
}


def paper_score(env_id: str, task: str, arm: str) -> str:
    """The paper's Table 2 value for this row ('mean ± std', D4RL scale), or '—' where the paper has none: it ran
    D4RL's fixed-goal maze2d, the base algorithms and DyDiff with M = 1."""
    if task != "fixed-goal":
        return "—"
    arm = re.sub(r", [^,]* data$", "", arm)  # the paper's data were D4RL's; the table names the size beside it
    from common.d4rl import dataset_name

    env = dataset_name(env_id).removesuffix("-v1")  # a D4RL file, maze2d-large-v1.hdf5: the paper's very data
    if arm in PAPER_SYNTHER.get(env, {}):
        return "{} ± {}".format(*PAPER_SYNTHER[env][arm])
    for algo, (base, dydiff) in PAPER_TABLE2.get(env, {}).items():
        for name, (m, s) in ((algo, base), (f"{algo} + DyDiff (M=1)", dydiff)):
            if arm == name:
                return f"{m} ± {s}"
    return "—"


def arm_name(args: dict) -> str:
    """'TD3+BC', 'TD3+BC + DyDiff (M=1)', 'TD3+BC + M=0 (ensemble rollouts)', 'TD3+BC + SynthER' or
    'TD3+BC + SynthER-f' (its softmax filter; 'SynthER-f (hardmax)' with the other), from a run's args.json."""
    script = args.get("script") or args.get("exp_name", "")
    algo = next((name for key, name in ALGO_NAMES.items() if script.startswith(key)), script)
    if args.get("augment") == "synther":
        filtered = {"none": "", "softmax": "-f"}.get(args.get("filter", "none"), f"-f ({args.get('filter')})")
        perfect = ", simulator next states" if args.get("synther_next_states", "model") == "simulator" else ""
        return f"{algo} + SynthER{filtered}{perfect}"
    if not args.get("dydiff", True):
        return algo
    m = args.get("num_iterations")
    states = args.get("rollout_states") or ("simulator-replay" if args.get("simulator_states") else "dm")
    if states == "simulator":
        name = f"{algo} + simulator rollouts"
    elif m == 0:
        name = f"{algo} + M=0 (ensemble rollouts)"
    else:
        name = f"{algo} + DyDiff (M={m})" + (", simulator states" if states == "simulator-replay" else "")
    if args.get("stored_actions", "relabelled") == "conditioning":
        name += ", conditioning actions"
    return name + (", true rewards" if args.get("rollout_rewards", "model") == "simulator" else "")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path} is missing: {what}")
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path} is not valid JSON ({e}); rerun the training script or delete the file")


def summarize_run(run_dir: Path) -> dict:
    """The summary of one run folder: arm, seed, evaluations (step, score), final score, wall time."""
    run_dir = Path(run_dir)
    args = _read_json(run_dir / "args.json", "is this a run folder of a training script?")
    evals, d4rl = {}, {}  # step -> score; a resumed run may have logged a redone step twice: the last one counts
    rollouts = {}  # step -> that rollout's synthetic-data metrics (the same rule)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if "eval/normalized_score" in row:
                evals[int(row["step"])] = float(row["eval/normalized_score"])
            if "eval/d4rl_normalized_score" in row:
                d4rl[int(row["step"])] = float(row["eval/d4rl_normalized_score"])
            found = {k: float(row[k]) for k in SYNTHETIC_METRICS if isinstance(row.get(k), (int, float))}
            if found:
                rollouts.setdefault(int(row["step"]), {}).update(found)
    result = _read_json(run_dir / "result.json", "") if (run_dir / "result.json").exists() else None
    task = result if result is not None else {}
    if not task and (run_dir / "task.json").exists():
        task = _read_json(run_dir / "task.json", "")
    steps = sorted(evals)
    if result is not None and len(result.get("evaluations", [])) == len(steps):
        scores = [float(s) for s in result["evaluations"]]  # the run's own record is authoritative
    else:
        scores = [evals[s] for s in steps]
    return dict(
        version=SUMMARY_VERSION,
        run=run_dir.name,
        arm=arm_name(args),
        env_id=args.get("env_id"),
        task=task.get("form", ""),
        dataset_ids=task.get("dataset_ids"),
        data_fingerprint=task.get("fingerprint"),
        dataset_size=task.get("size"),
        models=task.get("models"),
        seed=args.get("seed"),
        total_steps=args.get("total_steps"),
        finished=result is not None,
        final_normalized_score=None if result is None else result["final_normalized_score"],
        wall_time_s=None if result is None else result.get("wall_time_s"),
        final_d4rl_normalized_score=None if result is None else result.get("final_d4rl_normalized_score"),
        eval_steps=steps,
        eval_scores=scores,
        eval_d4rl_scores=[d4rl[s] for s in steps] if all(s in d4rl for s in steps) and d4rl else None,
        synthetic={  # the mean over the run's rollouts of each synthetic-data metric it logged
            k: sum(v) / len(v) for k in SYNTHETIC_METRICS if (v := [r[k] for r in rollouts.values() if k in r])
        },
        args={
            k: args.get(k)
            for k in (
                "rollout_batch_size",
                "rollout_freq",
                "synthetic_buffer_size",
                "real_ratio",
                "num_iterations",
                "sampler_steps",
                "sampler_churn",
                "eval_freq",
                "eval_episodes",
                "eval_max_steps",
                "dataset_steps",
                "models_dir",
                "dydiff",
                "rollout_states",
                "stored_actions",
                "rollout_rewards",
                "augment",
                "synther_samples",
                "synther_sampler_steps",
                "synther_next_states",
                "filter",
                "filter_proportion",
            )
        },
    )


def load(paths) -> list[dict]:
    """Summaries from run folders and summary files, in the order given."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.append(summarize_run(p))
        else:
            s = _read_json(p, "give run folders or summary files written by --summaries")
            if s.get("version") != SUMMARY_VERSION or "arm" not in s:
                raise SystemExit(
                    f"{p} is not a summary written by this version of `python -m common.results --summaries`; "
                    f"write it again from its run folder"
                )
            out.append(s)
    if not out:
        raise SystemExit("no runs given: pass run folders (runs/...) or summary files")
    return out


def dataset_size(summary: dict) -> int | None:
    """Transitions a run trained on: recorded since the data size became D4RL's by default; for older runs read from a
    locally generated dataset's id (local/pointmaze/large-v3 is Minari's 1M recipe, other sizes carry theirs)."""
    if summary.get("dataset_size"):
        return int(summary["dataset_size"])
    sizes = set()
    for did in summary.get("dataset_ids") or ():
        if not did.startswith("local/pointmaze/"):
            return None
        m = re.search(r"-(\d+)steps-seed\d+-v\d+$", did)
        sizes.add(int(m.group(1)) if m else 1_000_000)
    return sizes.pop() if len(sizes) == 1 else None


def _size_name(n: int | None) -> str:
    return "data size unknown" if n is None else f"{n / 1e6:g}M data" if n % 100_000 == 0 else f"{n:,} steps of data"


def group(summaries: list[dict]) -> dict[tuple, list[dict]]:
    """(env_id, task, arm) -> that arm's runs, sorted by seed: runs on the two maze2d tasks never share a row. Runs of
    one arm at different rollout volumes (B_r; SynthER: sample counts) are arms of their own, named with them; so are
    runs of one arm on datasets of different sizes (named with the size)."""

    def volume(s):
        if s["args"].get("augment") == "synther":
            return "synther_samples", "samples"
        return ("rollout_batch_size", "B_r") if s["args"].get("dydiff", True) else (None, None)

    volumes: dict[tuple, set] = {}
    sizes: dict[tuple, set] = {}
    for s in summaries:
        key = (s["env_id"], s["task"], s["arm"])
        sizes.setdefault(key, set()).add(dataset_size(s))
        if (name := volume(s)[0]) is not None:
            volumes.setdefault(key, set()).add(s["args"].get(name))
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        key = (s["env_id"], s["task"], s["arm"])
        arm = s["arm"]
        if len(volumes.get(key, ())) > 1:
            name, unit = volume(s)
            arm = f"{arm}, B_r {s['args'][name]:,}" if unit == "B_r" else f"{arm}, {s['args'][name]:,} samples"
        if len(sizes[key] - {None}) > 1:  # a run whose size is not on record splits nothing
            arm = f"{arm}, {_size_name(dataset_size(s))}"
        groups.setdefault((s["env_id"], s["task"], arm), []).append(s)
    for runs in groups.values():
        runs.sort(key=lambda s: s["seed"] if s["seed"] is not None else -1)
    return groups


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def second_half(summary: dict) -> float:
    """The mean of a run's last half of its evaluations."""
    scores = summary["eval_scores"]
    return sum(scores[len(scores) // 2 :]) / len(scores[len(scores) // 2 :])


def episode_length(summary: dict) -> str:
    """The evaluation episodes' length of a run (runs from before --eval-max-steps: the registration's)."""
    from common import pointmaze
    from common.envs import task_of

    n, env_id = summary["args"].get("eval_max_steps"), summary["env_id"] or ""
    if n is None and task_of(env_id) == "pointmaze":
        n = next((pointmaze.EVAL_EPISODE_STEPS[m] for m in pointmaze.MAZES if m in env_id), None)
    elif n is None and task_of(env_id) in ("hopper", "walker2d", "halfcheetah"):
        n = 1000  # Gymnasium's MuJoCo registrations
    return "—" if n is None else f"{n:,}"


def table(summaries: list[dict]) -> str:
    """Markdown: one row per (env, arm); the final score is the mean of each run's last 5 evaluations (the paper's),
    the mean of all its evaluations (how fast it learned, as well), and the second-half score, the mean of its last half
    of the evaluations (less noisy than the final score, it says more of how a run held)."""
    lines = [
        "| env | task | arm | seeds | final normalized score (mean ± std) | per seed | final, D4RL maze2d-v1 scale "
        "| paper, Table 2 (D4RL scale, most likely 1000-step episodes) | mean of all evaluations (mean ± std) "
        "| second-half score (mean ± std) | steps | evaluation episode length | wall time per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (env_id, task, arm), runs in group(summaries).items():
        done = [r for r in runs if r["finished"]]
        d4rl = "—"
        if done and all(r.get("final_d4rl_normalized_score") is not None for r in done):
            d4rl = "{:.1f} ± {:.1f}".format(*mean_std([r["final_d4rl_normalized_score"] for r in done]))
        if done:
            m, s = mean_std([r["final_normalized_score"] for r in done])
            score = f"{m:.1f} ± {s:.1f}"
            per_seed = ", ".join(f"{r['final_normalized_score']:.1f} (seed {r['seed']})" for r in done)
            m, s = mean_std([sum(r["eval_scores"]) / len(r["eval_scores"]) for r in done])
            overall = f"{m:.1f} ± {s:.1f}"
            m, s = mean_std([second_half(r) for r in done])
            held = f"{m:.1f} ± {s:.1f}"
            times = [r["wall_time_s"] for r in done if r.get("wall_time_s") is not None]
            wall = _duration(sum(times) / len(times)) if times else "—"
        else:
            score, per_seed, overall, held, wall = "—", "—", "—", "—", "—"
        unfinished = len(runs) - len(done)
        if unfinished:
            last = ", ".join(
                f"seed {r['seed']} at step {r['eval_steps'][-1] if r['eval_steps'] else 0:,}"
                for r in runs
                if not r["finished"]
            )
            per_seed += f"; unfinished: {last}"
        steps = ", ".join(sorted({f"{r['total_steps']:,}" for r in runs}))
        length = ", ".join(sorted({episode_length(r) for r in runs}))
        paper = paper_score(env_id, task, arm)
        lines.append(
            f"| {env_id} | {TASK_NAMES.get(task, task)} | {arm} | {len(done)} | {score} | {per_seed} | {d4rl} | {paper} "
            f"| {overall} | {held} | {steps} | {length} | {wall} |"
        )
    notes = [
        f"- {env_id}, {TASK_NAMES.get(task, task)}, {arm}: " + "; ".join(mixed)
        for (env_id, task, arm), runs in group(summaries).items()
        if (mixed := mixed_settings(runs))
    ]
    if notes:
        lines += ["", "Settings that differ among the runs of one row (compare its seeds with care):", *notes]
    return "\n".join(lines)


def mixed_settings(runs: list[dict]) -> list[str]:
    """The settings in which one arm's runs differ, one 'setting: value (seeds), value (seeds)' each. An argument
    not on record (a run older than its flag) counts as no difference; models not on record are said."""

    def seeds(rs):
        return "seed" + ("s " if len(rs) > 1 else " ") + ", ".join(str(r["seed"]) for r in rs)

    settings = {"total_steps": lambda r: r.get("total_steps"), "data": lambda r: r.get("data_fingerprint")}
    keys = sorted({k for r in runs for k in r["args"]} - {"models_dir"})
    settings.update({k: (lambda r, k=k: r["args"].get(k)) for k in keys})
    out = []
    for name, value in settings.items():
        by_value: dict = {}
        for r in runs:
            if (v := value(r)) is not None:
                by_value.setdefault(json.dumps(v, sort_keys=True), []).append(r)
        if len(by_value) > 1:
            out.append(f"{name}: " + ", ".join(f"{v} ({seeds(rs)})" for v, rs in by_value.items()))
    models: dict = {}
    for r in runs:
        m = r.get("models")
        key = "not on record" if m is None else ", ".join(f"{k} {v[:8]}" for k, v in sorted(m.items())) or "none"
        models.setdefault(key, []).append(r)
    if len(models) > 1:
        out.append("models: " + "; ".join(f"{k} ({seeds(rs)})" for k, rs in models.items()))
    return out


def synthetic_table(summaries: list[dict]) -> str:
    """Markdown: per augmented arm, each synthetic-data metric's run mean, mean ± std over the finished seeds."""
    groups = {key: [r for r in runs if r["finished"] and r.get("synthetic")] for key, runs in group(summaries).items()}
    shown = [k for k in SYNTHETIC_METRICS if any(k in r["synthetic"] for runs in groups.values() for r in runs)]
    lines = [
        "| env | task | arm | seeds | " + " | ".join(SYNTHETIC_METRICS[k] for k in shown) + " |",
        "|---|---|---|---|" + "---|" * len(shown),
    ]
    for (env_id, task, arm), done in groups.items():
        if not done:
            continue
        cells = []
        for k in shown:
            values = [r["synthetic"][k] for r in done if k in r["synthetic"]]
            cells.append("—" if not values else "{:.2f} ± {:.2f}".format(*mean_std(values)))
        lines.append(f"| {env_id} | {TASK_NAMES.get(task, task)} | {arm} | {len(done)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def welch_t(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic of mean(a) - mean(b) and its Welch-Satterthwaite degrees of freedom (nan with < 2 values)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    if va + vb == 0:
        return (0.0 if ma == mb else math.copysign(math.inf, ma - mb)), float("nan")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va * vb > 0 else float(len(a) + len(b) - 2)
    return (ma - mb) / math.sqrt(va + vb), df


def bootstrap_interval(a: list[float], b: list[float], level: float = 0.9, resamples: int = 10_000, seed: int = 0):
    """Percentile bootstrap interval of mean(a) - mean(b), resampling each arm's seeds with replacement."""
    import random

    rng = random.Random(seed)
    diffs = sorted(sum(rng.choices(a, k=len(a))) / len(a) - sum(rng.choices(b, k=len(b))) / len(b) for _ in range(resamples))
    lo = diffs[int((1 - level) / 2 * resamples)]
    hi = diffs[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


SCORES = {  # the per-run scores the comparison table tests
    "final": lambda r: r["final_normalized_score"],
    "mean of all evaluations": lambda r: sum(r["eval_scores"]) / len(r["eval_scores"]),
    "second half": second_half,
}


def comparison_table(summaries: list[dict]) -> str:
    """Markdown: for each pair of arms on one env and task (finished runs, at least 2 seeds each) and each score, the
    difference of the means, Welch's t (degrees of freedom) and a 90 % bootstrap interval of the difference."""
    groups = {k: [r for r in runs if r["finished"]] for k, runs in group(summaries).items()}
    lines = [
        "| env | task | arms (A vs B) | score | A − B | Welch's t (df) | 90 % bootstrap interval of A − B |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = [k for k, runs in groups.items() if len(runs) >= 2]
    for i, (env, task, arm_a) in enumerate(keys):
        for env_b, task_b, arm_b in keys[i + 1 :]:
            if (env_b, task_b) != (env, task):
                continue
            for name, score in SCORES.items():
                a = [score(r) for r in groups[(env, task, arm_a)]]
                b = [score(r) for r in groups[(env, task, arm_b)]]
                t, df = welch_t(a, b)
                lo, hi = bootstrap_interval(a, b)
                lines.append(
                    f"| {env} | {TASK_NAMES.get(task, task)} | {arm_a} vs {arm_b} | {name} | "
                    f"{mean_std(a)[0] - mean_std(b)[0]:+.1f} | {t:+.2f} ({df:.1f}) | {lo:+.1f} to {hi:+.1f} |"
                )
    return "\n".join(lines) if len(lines) > 2 else ""


def moving_average(values: list[float], k: int) -> list[float]:
    """Each value averaged with the k - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - k + 1) : i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(values))]


def plot(summaries: list[dict], path: Path, smooth: int = 1) -> None:
    """Learning curves: per arm the mean over seeds and the min-max band, one panel per env; each seed's
    curve first averaged over `smooth` consecutive evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(summaries)
    envs = sorted({(env, task) for env, task, _ in groups})
    fig, axes = plt.subplots(1, len(envs), figsize=(6.5 * len(envs), 4.2), squeeze=False)
    for ax, (env, task) in zip(axes[0], envs):
        for (e, t, arm), runs in groups.items():
            if (e, t) != (env, task):
                continue
            common_steps = sorted(set.intersection(*(set(r["eval_steps"]) for r in runs)))
            if not common_steps:
                continue
            curves = [
                moving_average([dict(zip(r["eval_steps"], r["eval_scores"]))[s] for s in common_steps], smooth) for r in runs
            ]
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(common_steps))]
            lo = [min(c[i] for c in curves) for i in range(len(common_steps))]
            hi = [max(c[i] for c in curves) for i in range(len(common_steps))]
            (line,) = ax.plot(common_steps, mean, label=f"{arm} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
            ax.fill_between(common_steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        title = f"{env}, {TASK_NAMES.get(task, task)}"
        ax.set_title(title)
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("normalized score (mean, min–max over seeds)")
        if smooth > 1:
            ax.set_title(f"{title}\n(each seed: moving average of {smooth} evaluations)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ladder_rank(arm: str) -> tuple:
    """Where an arm stands on the ladder from true on-policy rollouts (first) to DyDiff and M = 0 (last)."""
    states = 0 if "simulator rollouts" in arm else 1 if "simulator states" in arm else 3 if "M=0" in arm else 2
    states = 4 if "SynthER" in arm else states  # the baseline, after DyDiff's rungs
    volume = int(m.group(1).replace(",", "")) if (m := re.search(r"B_r ([\d,]+)", arm)) else 0
    return (states, "true rewards" not in arm, "conditioning actions" not in arm, volume, arm)


def ladder_plot(summaries: list[dict], path: Path) -> None:
    """The ladder: per (env, task, algorithm) with augmented arms, each arm's final score and mean of all evaluations
    (every seed a dot, the mean a bar), arms ordered from true on-policy rollouts to DyDiff, the base algorithm as a
    line (its mean; its seeds' range shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one data size per (env, task): the augmented runs' most common one, the base runs on it alike
    counts: dict[tuple, dict] = {}
    for s in summaries:
        if s["args"].get("dydiff", True):
            sizes = counts.setdefault((s["env_id"], s["task"]), {})
            sizes[dataset_size(s)] = sizes.get(dataset_size(s), 0) + 1
    size = {k: max(v, key=v.get) for k, v in counts.items()}
    summaries = [s for s in summaries if dataset_size(s) == size.get((s["env_id"], s["task"]), dataset_size(s))]
    groups = {k: [r for r in runs if r["finished"]] for k, runs in group(summaries).items()}
    panels = []  # (env, task, algo, base runs, [(arm, runs)])
    for env, task in sorted({(e, t) for e, t, _ in groups}):
        for algo in sorted({arm.split(" + ")[0] for e, t, arm in groups if (e, t) == (env, task)}):
            arms = sorted(
                (
                    (arm, runs)
                    for (e, t, arm), runs in groups.items()
                    if (e, t) == (env, task) and arm.startswith(algo + " + ")
                ),
                key=lambda x: ladder_rank(x[0]),
            )
            arms = [(arm, runs) for arm, runs in arms if runs]
            if arms:
                panels.append((env, task, algo, groups.get((env, task, algo), []), arms))
    if not panels:
        raise SystemExit("--ladder: no finished augmented runs among the given ones")
    scores = (("final normalized score", SCORES["final"]), ("mean of all evaluations", SCORES["mean of all evaluations"]))
    fig, axes = plt.subplots(
        len(panels), 2, figsize=(13, 1.2 + 0.55 * max(len(p[4]) for p in panels) * len(panels) + 2), squeeze=False
    )
    for row, (env, task, algo, base, arms) in zip(axes, panels):
        for ax, (what, score) in zip(row, scores):
            y = list(range(len(arms)))[::-1]
            for yi, (arm, runs) in zip(y, arms):
                values = [score(r) for r in runs]
                ax.barh(yi, sum(values) / len(values), color="tab:blue", alpha=0.35, height=0.6)
                ax.scatter(values, [yi] * len(values), color="tab:blue", s=18, zorder=3)
            if base:
                values = [score(r) for r in base]
                ax.axvline(sum(values) / len(values), color="black", linewidth=1.2, label=f"{algo} ({len(values)} seeds)")
                ax.axvspan(min(values), max(values), color="gray", alpha=0.15, linewidth=0)
                ax.legend(fontsize=8, loc="lower right")
            ax.set_yticks(y, [f"{arm[len(algo) + 3 :]} ({len(runs)})" for arm, runs in arms], fontsize=8)
            ax.set_xlabel(what)
            ax.set_title(f"{env}, {TASK_NAMES.get(task, task)}: {algo} + ...", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders and/or summary JSON files")
    p.add_argument("--summaries", type=Path, help="write one summary JSON per run folder into this folder")
    p.add_argument("--table", type=Path, help="write the Markdown table here (default: print it)")
    p.add_argument("--plot", type=Path, help="write the learning-curve PNG here")
    p.add_argument("--smooth", type=int, default=10, help="the plot's moving average, in evaluations (1: none)")
    p.add_argument("--ladder", type=Path, help="write the ladder PNG here: each arm's final and mean-of-all score")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"--smooth {args.smooth}: give a number of evaluations, at least 1 (1: no moving average)")
    summaries = load(args.paths)
    if args.summaries is not None:
        args.summaries.mkdir(parents=True, exist_ok=True)
        for s, path in zip(summaries, map(Path, args.paths)):
            if path.is_dir():
                out = args.summaries / f"{s['run']}.json"
                out.write_text(json.dumps(s, indent=1) + "\n")
                print(f"wrote {out}")
    text = table(summaries)
    if synthetic := synthetic_table(summaries):
        text += "\n\nThe synthetic data (each run: the mean over its rollouts):\n\n" + synthetic
    if comparison := comparison_table(summaries):
        text += "\n\nPairs of arms (finished runs; a bootstrap over 2–3 seeds is coarse):\n\n" + comparison
    if args.table is not None:
        args.table.write_text(text + "\n")
        print(f"wrote {args.table}")
    else:
        print(text)
    if args.plot is not None:
        plot(summaries, args.plot, args.smooth)
        print(f"wrote {args.plot}")
    if args.ladder is not None:
        ladder_plot(summaries, args.ladder)
        print(f"wrote {args.ladder}")


if __name__ == "__main__":
    main()
