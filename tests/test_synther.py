"""SynthER, the paper's baseline (--augment synther): its denoiser, training and sampler on the project's EDM code, the
terminals, its model file and report, the transition checks against the simulator, the arm in the three scripts
(SynthER-f's filter, resume, refusals) and its name in the results."""

import json
import math
import shlex
import signal
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from script_runs import DEVICE_FLAG, ROOT, SCRIPTS, metrics, run_script, tiny

from common import synther
from common.checkpoints import load_checkpoint, load_synther, models_needed
from common.datasets import load_dataset
from common.edm import edm_loss
from common.results import arm_name, paper_score
from common.runs import parse_args, resumed_args

# A tiny SynthER: pretrain_models.py's flags, and nested (--pretrain.synther-width 32) in the training scripts.
SYNTHER_FLAGS = "--synther-width 32 --synther-depth 2 --synther-steps 200 --synther-report-transitions 500"
RUN = ("--augment", "synther", "--synther-samples", "2000", "--synther-sampler-steps", "4", "--eval-max-steps", "50")
DATA = ("--env-id", "maze2d-umaze", "--dataset-steps", "10000")


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """parse_args installs the scripts' Ctrl-C handlers: give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def fixed():
    return load_dataset("maze2d-umaze", dataset_steps=10_000, progress=False)


@pytest.fixture(scope="module")
def synther_models(tmp_path_factory):
    """A tiny SynthER for maze2d-umaze (10k generated steps), made by pretrain_models.py --models synther."""
    folder = tmp_path_factory.mktemp("synther-models")
    out = run_script(
        "pretrain_models.py", *DATA, "--models", "synther", "--models-dir", str(folder), "--synther-sampler-steps", "4",
        *shlex.split(SYNTHER_FLAGS), DEVICE_FLAG,
    )  # fmt: skip
    return folder, out


# ----------------------------------------------------------------------------- the model, on the project's EDM code
def test_the_denoiser_keeps_its_input_s_shape_and_has_the_paper_s_size():
    net = synther.ResidualMLPDenoiser(12, dim_t=16, width=32, depth=2)
    noise = torch.full((5,), 0.3)
    assert net(torch.randn(5, 1, 12), noise).shape == (5, 1, 12)
    assert net(torch.randn(5, 12), noise).shape == (5, 12)
    assert "fourier_weights" in dict(net.named_buffers()) and "fourier_weights" not in dict(net.named_parameters())
    # The DyDiff paper's SynthER has 6.5M parameters (Appendix E.7): width 1024, depth 6 on maze2d's 12 columns.
    paper = synther.build_synther(12, width=1024, depth=6)
    assert 6.4e6 < sum(p.numel() for p in paper.parameters()) < 6.6e6
    assert paper.sigma_data == 1.0
    x = torch.randn(7, 1, 12)
    assert paper(x, torch.full((7,), 0.5)).shape == (7, 1, 12)


def test_edm_training_learns_a_tiny_distribution_of_transitions():
    """Two modes of s, a = s / 2, s' = s + a, r = [s > 0], terminals 30 %: the loss falls and the samples hold it."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 4000
    obs = np.c_[rng.choice([-1.0, 1.0], n) + 0.05 * rng.standard_normal(n)]
    act = 0.5 * obs + 0.05 * rng.standard_normal((n, 1))
    rows = synther.transition_rows(obs, act, (obs[:, 0] > 0).astype(np.float32), obs + act, rng.random(n) < 0.3)
    normalizer = synther.StandardNormalizer.from_data(rows)
    x = normalizer.normalize(torch.as_tensor(rows))
    denoiser = synther.build_synther(rows.shape[1], width=64, depth=2, dim_t=32)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    no_condition = torch.zeros(1, rows.shape[1], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(800):
        loss = edm_loss(denoiser, x[torch.randint(n, (256,), generator=gen), None], no_condition, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
    rows = synther.generate(denoiser.eval(), normalizer, 2000, 16, torch.Generator().manual_seed(1), progress=False)
    assert rows.shape == (2000, 5) and torch.isfinite(rows).all()  # (s, a, r, s', terminal)
    s = synther.split_rows(rows, 1, 1)
    o, a = s["obs"][:, 0], s["actions"][:, 0]
    assert (o.abs() > 0.5).float().mean() > 0.9  # both modes, nothing in between
    assert 0.2 < (o > 0).float().mean() < 0.8
    assert (a - 0.5 * o).abs().median() < 0.15 and (s["next_obs"][:, 0] - o - a).abs().median() < 0.2
    assert ((s["rewards"] > 0.5) == (o > 0)).float().mean() > 0.95
    assert set(s["dones"].unique().tolist()) <= {0.0, 1.0} and 0.2 < s["dones"].mean() < 0.4


def test_terminals_are_not_normalized_and_are_thresholded_at_one_half():
    rows = np.array([[1.0, 0.0, 0.5, 2.0, 0.0], [3.0, 1.0, 0.0, 4.0, 1.0], [5.0, 2.0, 1.0, 6.0, 0.0]], dtype=np.float32)
    norm = synther.StandardNormalizer.from_data(rows)
    assert norm.mean[-1] == 0 and norm.std[-1] == 1  # the terminal column as it is
    torch.testing.assert_close(norm.normalize(torch.as_tensor(rows))[:, 0], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm.unnormalize(norm.normalize(torch.as_tensor(rows))), torch.as_tensor(rows))
    generated = torch.tensor([[0.1, 0.2, 0.37, 0.4, t] for t in (-0.3, 0.2, 0.5, 0.51, 0.9, 1.4)])
    split = synther.split_rows(generated, 1, 1)
    assert split["dones"].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert split["rewards"].tolist() == pytest.approx([0.37] * 6)  # the reward stays as generated
    with pytest.raises(ValueError, match="not .s, a, r, s', terminal."):
        synther.split_rows(generated, 2, 1)


def test_the_weights_average_as_synther_s_ema():
    assert synther.ema_decay(7, 0.995) is None and synther.ema_decay(0, 0.995) == 0.0
    assert synther.ema_decay(100, 0.995) == 0.0  # a copy for the first 100 steps
    assert synther.ema_decay(110, 0.995) == pytest.approx(1 - 11 ** (-2 / 3))
    assert synther.ema_decay(100_000, 0.995) == 0.995
    assert synther.batch_size_for(799_999) == 256 and synther.batch_size_for(1_000_000) == 1024


def test_the_checks_find_real_transitions_true_and_shuffled_ones_false(fixed):
    env = fixed.make_eval_env()
    real = dict(
        obs=fixed.observations, actions=fixed.actions, rewards=fixed.rewards, next_obs=fixed.next_observations,
        dones=fixed.terminals.astype(np.float32),
    )  # fmt: skip
    checks = synther.transition_checks(fixed, env, real, n=2000, seed=0)
    assert checks["synther/checked_transitions"] == 2000
    assert checks["synther/one_step_error"] < 1e-6 and checks["synther/one_step_error_copy"] > 1e-4
    assert checks["synther/wall_crossing_share"] == 0.0 and checks["synther/wall_crossing_share_dataset"] == 0.0
    assert checks["synther/reward_abs_error"] < 1e-6 and checks["synther/reward_agreement"] == 1.0
    assert checks["synther/terminal_share"] == checks["synther/terminal_share_dataset"] == 0.0
    rng = np.random.default_rng(0)
    shuffled = dict(real, next_obs=real["next_obs"][rng.permutation(fixed.size)], rewards=1.0 - real["rewards"])
    bad = synther.transition_checks(fixed, env, shuffled, n=2000, seed=0)
    assert bad["synther/one_step_error"] > 0.1 and bad["synther/wall_crossing_share"] > 0.05
    assert bad["synther/reward_agreement"] < 0.5
    env.close()


def test_the_simulator_s_next_states_make_every_transition_true_and_keep_s_and_a(fixed):
    """--synther-next-states simulator (the ablation: SynthER with perfect dynamics and reward): s' from the real
    simulator, the task's reward on arriving there, no terminal; the generated s and a untouched."""
    rng = np.random.default_rng(0)
    rows = torch.as_tensor(rng.permutation(fixed.size)[:3000])
    real = dict(
        obs=torch.as_tensor(fixed.observations)[rows], actions=torch.as_tensor(fixed.actions)[rows],
        rewards=torch.as_tensor(fixed.rewards)[rows], next_obs=torch.as_tensor(fixed.next_observations)[rows],
        dones=torch.zeros(len(rows)),
    )  # fmt: skip
    wrong = dict(real, next_obs=real["next_obs"][torch.randperm(len(rows))], rewards=1.0 - real["rewards"])
    wrong["dones"] = torch.ones(len(rows))
    fixed_up = synther.simulator_next_states(fixed, wrong, chunk=1000)  # three calls of the simulator
    assert fixed_up["obs"] is wrong["obs"] and fixed_up["actions"] is wrong["actions"]
    assert {k: v.dtype for k, v in fixed_up.items()} == {k: v.dtype for k, v in wrong.items()}
    env = fixed.make_eval_env()
    checks = synther.transition_checks(fixed, env, fixed_up, n=3000, seed=0)
    env.close()
    assert checks["synther/one_step_error"] < 1e-6 and checks["synther/reward_abs_error"] < 1e-6
    assert checks["synther/wall_crossing_share"] == 0.0 and checks["synther/terminal_share"] == 0.0
    assert torch.allclose(fixed_up["next_obs"], real["next_obs"], atol=1e-4)  # the dataset's own next states
    assert torch.equal(fixed_up["rewards"], real["rewards"])
    with pytest.raises(SystemExit, match="--synther-next-states simulator steps the PointMaze simulator; hopper-medium"):
        synther.simulator_next_states(SimpleNamespace(task="hopper", env_id="hopper-medium"), wrong)


# ----------------------------------------------------------------------------- pretraining: file, fingerprint, report
def test_pretraining_makes_synther_s_file_with_its_fingerprint_and_report(synther_models, fixed):
    folder, out = synther_models
    names = {p.name for p in (folder / "maze2d-umaze").glob("*.pt")}
    assert {"synther.pt", "synther_train.pt"} <= names and not names & {"dm.pt", "dynamics.pt", "reward.pt"}
    ckpt = load_checkpoint(folder / "maze2d-umaze" / "synther.pt")
    assert ckpt["fingerprint"] == fixed.fingerprint and ckpt["network"] == dict(width=32, depth=2, dim_t=128)
    assert ckpt["batch_size"] == 256 and ckpt["steps"] == 200  # SynthER's rule: 256 below 800k transitions
    denoiser, normalizer, _ = load_synther(folder / "maze2d-umaze", fixed)
    assert sum(p.numel() for p in denoiser.parameters()) == ckpt["params"] and normalizer.std[-1] == 1
    report = json.loads((folder / "maze2d-umaze" / "synther_report.json").read_text())
    assert report["generated_transitions"] == 500 and report["sampler_steps"] == 4 and math.isfinite(report["heldout_loss"])
    for key in ("one_step_error", "one_step_error_copy", "wall_crossing_share", "reward_abs_error", "terminal_share"):
        assert math.isfinite(report["checks"][key])
    assert "made synther in" in out.stdout and "checked against the real simulator" in out.stdout
    # made again with the same options: kept; the report is rewritten
    again = run_script(
        "pretrain_models.py", *DATA, "--models", "synther", "--models-dir", str(folder), "--synther-sampler-steps", "4",
        *shlex.split(SYNTHER_FLAGS), DEVICE_FLAG,
    )  # fmt: skip
    assert "SynthER: already trained, kept" in again.stdout
    # the default pretraining is DyDiff's three models: SynthER only when asked for
    from pretrain_models import Args as PretrainArgs

    assert PretrainArgs().models == ("dm", "dynamics", "reward")


def test_a_synther_model_for_other_data_is_refused_in_one_line(synther_models, tmp_path):
    folder, _ = synther_models
    ckpt = load_checkpoint(folder / "maze2d-umaze" / "synther.pt")
    ckpt["fingerprint"], ckpt["dataset_ids"] = "0123456789abcdef", ["local/pointmaze/umaze-other-v2"]
    (tmp_path / "other" / "maze2d-umaze").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "other" / "maze2d-umaze" / "synther.pt")
    out = run_script("dydiff_td3bc.py", *tiny("dydiff_td3bc.py", tmp_path / "other", tmp_path, *RUN), check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "was trained on dataset local/pointmaze/umaze-other-v2" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "other" / "maze2d-umaze").glob("synther_samples_*"))  # nothing generated


# ----------------------------------------------------------------------------- the arm in the three scripts
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_trains_on_synther_s_transitions_alone(script, synther_models, fixed, tmp_path):
    folder, _ = synther_models
    flags = ("--exp-name", f"{script[:-3]}-synther", "--total-steps", "60", "--eval-freq", "30", *RUN)
    out = run_script(script, *tiny(script, folder, tmp_path, *flags))
    run_dir = next(tmp_path.glob("*-synther__*"))
    assert (folder / "maze2d-umaze" / "synther_samples_2000_N4.pt").exists()  # cached beside the model
    args = json.loads((run_dir / "args.json").read_text())
    assert (args["augment"], args["dydiff"], args["real_ratio"], args["filter"], args["num_iterations"]) == (
        "synther", False, 0.0, "none", None,
    )  # fmt: skip
    assert arm_name(args) == f"{arm_name(dict(exp_name=script, dydiff=False))} + SynthER"
    assert set(json.loads((run_dir / "task.json").read_text())["models"]) == {"synther"}
    rows = metrics(run_dir)
    first = rows[0]
    assert first["step"] == 0 and first["synther/transitions"] == 2000 and first["synther/kept_fraction"] == 1.0
    report = json.loads((run_dir / "synther_report.json").read_text())
    assert report["count"] == 2000 and report["sampler_steps"] == 4 and report["synther/checked_transitions"] == 2000
    assert math.isfinite(report["synther/one_step_error"]) and 0 <= report["synther/wall_crossing_share"] <= 1
    assert [r["charts/synthetic_in_batch"] for r in rows if "charts/synthetic_in_batch" in r] == [1.0]  # no real data
    assert "synthetic" not in load_checkpoint(run_dir / "checkpoint.pt")  # the samples stay in their cache
    assert not any("dydiff/kept_fraction" in r for r in rows)  # no DyDiff rollout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["augment"] == "synther" and len(result["evaluations"]) == 2
    assert "checked against the real simulator" in out.stdout


def test_synther_with_the_simulator_s_next_states_trains_on_true_transitions(synther_models, tmp_path):
    folder, _ = synther_models
    flags = ("--exp-name", "dydiff_td3bc-perfect", "--total-steps", "30", "--eval-freq", "30", *RUN)
    flags += ("--synther-next-states", "simulator")
    run_script("dydiff_td3bc.py", *tiny("dydiff_td3bc.py", folder, tmp_path, *flags))
    run_dir = next(tmp_path.glob("*perfect__*"))
    assert arm_name(json.loads((run_dir / "args.json").read_text())) == "TD3+BC + SynthER, simulator next states"
    report = json.loads((run_dir / "synther_report.json").read_text())
    assert report["next_states"] == "simulator" and report["synther/transitions"] == 2000
    assert report["synther/one_step_error"] < 1e-6 and report["synther/reward_abs_error"] < 1e-6
    assert report["synther/one_step_error_copy"] > 1e-4  # the generated s and a are kept: the states still move


def test_synther_f_keeps_eta_and_a_resumed_run_trains_on_the_same_transitions(tmp_path):
    """SynthER-f on a models folder without SynthER (made first, from the nested flags), run uninterrupted and in two
    sittings: the same kept transitions, the same training."""
    models = tmp_path / "models"
    nested = ["--pretrain." + t[2:] if t.startswith("--") else t for t in shlex.split(SYNTHER_FLAGS)]
    flags = (*RUN, "--filter", "softmax", "--filter-proportion", "0.3", "--eval-freq", "30", *nested)
    whole = run_script("dydiff_td3bc.py", *tiny("dydiff_td3bc.py", models, tmp_path / "a", *flags, "--total-steps", "60"))
    assert "making them first" in whole.stdout and "SynthER: generating 2,000 transitions" in whole.stdout
    split = run_script("dydiff_td3bc.py", *tiny("dydiff_td3bc.py", models, tmp_path / "b", *flags, "--total-steps", "30"))
    assert "making them first" not in split.stdout and "SynthER: 2,000 transitions read from" in split.stdout
    run_b = next((tmp_path / "b").iterdir())
    resumed = run_script("dydiff_td3bc.py", "--resume", str(run_b), "--total-steps", "60")
    assert "read from" in resumed.stdout and "generating" not in resumed.stdout
    run_a = next((tmp_path / "a").iterdir())
    args = json.loads((run_a / "args.json").read_text())
    assert arm_name(args) == "TD3+BC + SynthER-f" and args["real_ratio"] == 0.0
    first = metrics(run_a)[0]
    assert first["synther/transitions"] == 600 and first["synther/kept_fraction"] == 0.3  # floor(0.3 * 2000)
    last_a, last_b = metrics(run_a)[-2], metrics(run_b)[-2]  # the losses logged at step 60
    assert last_a["step"] == last_b["step"] == 60 and last_a["losses/qf1_loss"] == last_b["losses/qf1_loss"]
    untimed = lambda row: {k: v for k, v in row.items() if not k.endswith("_time")}  # noqa: E731
    assert [untimed(r) for r in metrics(run_b) if "synther/transitions" in r] == [untimed(first)]  # once, at step 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_softmax_filter_keeps_eta_of_the_transitions_favouring_high_rewards(script):
    import importlib

    filter_transitions = importlib.import_module(script[:-3]).filter_trajectories
    rewards = torch.cat([torch.ones(50), torch.zeros(950)]) + 0.01 * torch.randn(1000)
    keep = filter_transitions(rewards, 0.6, "softmax", 0.05, torch.Generator().manual_seed(0))
    assert len(keep) == 600 and len(set(keep.tolist())) == 600
    assert (keep < 50).sum() == 50  # every rewarded transition is kept


def test_the_synther_code_is_the_same_text_in_the_three_scripts():
    texts = [(ROOT / s).read_text() for s in SCRIPTS]
    starts = ("    # SynthER (the paper's baseline)", "    # D_syn: DyDiff's FIFO buffer", "    if not synther:  # SynthER's")
    for start in starts:
        blocks = [t[t.index(start) : t.index("\n\n", t.index(start))] for t in texts]  # up to the next blank line
        assert blocks[0].count("\n") >= 3
        for script, block in zip(SCRIPTS[1:], blocks[1:]):
            assert block == blocks[0], f"{script}'s block from {start.strip()!r} differs from {SCRIPTS[0]}'s"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--augment", "synther", "--num-iterations", "1"], "--num-iterations 1 is DyDiff's M, and --augment synther"),
        (["--augment", "synther", "--rollout-states", "simulator"], "--augment synther makes none"),
        (["--augment", "synther", "--average-with-previous"], "--augment synther makes none"),
        (["--augment", "synther", "--no-dydiff"], "--no-dydiff is --augment none, and --augment is synther"),
        (["--synther-samples", "100"], "--synther-samples set SynthER's transitions, and --augment is dydiff"),
        (["--no-dydiff", "--synther-sampler-steps", "8"], "and --augment is none: add --augment synther"),
        (["--synther-next-states", "simulator"], "--synther-next-states set SynthER's transitions, and --augment is dydiff"),
        (["--filter", "none"], "--filter none is for --augment synther"),
        (["--augment", "synther", "--synther-samples", "0"], "--synther-samples must be >= 1"),
        (["--augment", "synther", "--filter", "softmax", "--synther-samples", "1"], "keeps no transition"),
    ],
)
def test_what_synther_cannot_do_is_refused_in_one_line(flags, message, tmp_path):
    out = run_script("dydiff_td3bc.py", *DATA, "--models-dir", str(tmp_path), *flags, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # refused before any pretraining


# ----------------------------------------------------------------------------- arguments, old run folders, results
def test_augment_and_its_alias_and_synther_s_defaults():
    from dydiff_td3bc import Args

    base = parse_args(Args, ["--no-dydiff"])
    assert (base.augment, base.dydiff, base.real_ratio, base.filter) == ("none", False, 0.6, "softmax")
    assert parse_args(Args, ["--augment", "none"]).dydiff is False
    dydiff = parse_args(Args, [])
    assert (dydiff.augment, dydiff.dydiff) == ("dydiff", True)
    syn = parse_args(Args, ["--augment", "synther"])
    assert (syn.dydiff, syn.real_ratio, syn.filter, syn.synther_samples, syn.synther_sampler_steps) == (
        False, 0.0, "none", 5_000_000, 128,
    )  # fmt: skip
    mixed = parse_args(Args, ["--augment", "synther", "--real-ratio", "0.5", "--filter", "softmax"])
    assert (mixed.real_ratio, mixed.filter) == (0.5, "softmax")
    cpu = parse_args(Args, ["--augment", "synther", "--preset", "cpu"])
    assert (cpu.synther_samples, cpu.synther_sampler_steps, cpu.models_dir) == (5_000_000, 32, "models-cpu")
    assert (cpu.pretrain.synther_width, cpu.pretrain.synther_steps, cpu.pretrain.synther_batch_size) == (256, 40_000, 256)
    assert models_needed(SimpleNamespace(augment="synther", dydiff=False)) == ("synther",)
    assert models_needed(SimpleNamespace(augment="none", dydiff=False)) == ()


@pytest.mark.parametrize("dydiff", [True, False])
def test_a_run_from_before_augment_resumes_as_its_arm(dydiff, tmp_path):
    from dydiff_cql import Args

    saved = json.loads(json.dumps(asdict(Args(dydiff=dydiff, num_iterations=1))))  # as args.json holds it
    for key in ("augment", "synther_samples", "synther_sampler_steps", "synther_next_states"):
        del saved[key]
    for key in [k for k in saved["pretrain"] if k.startswith("synther_")]:
        del saved["pretrain"][key]
    (tmp_path / "args.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    args = resumed_args(Args(resume=str(tmp_path)), Args, ["--resume", str(tmp_path)])
    assert (args.augment, args.dydiff, args.num_iterations) == ("dydiff" if dydiff else "none", dydiff, 1)


def test_a_synther_run_resumes_with_its_settings(tmp_path):
    from dydiff_diffql import Args

    saved = json.loads(json.dumps(asdict(parse_args(Args, ["--augment", "synther", "--filter", "softmax"]))))
    (tmp_path / "args.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    args = resumed_args(Args(resume=str(tmp_path)), Args, ["--resume", str(tmp_path)])
    assert (args.augment, args.dydiff, args.real_ratio, args.filter) == ("synther", False, 0.0, "softmax")


def test_results_name_the_arms_and_give_the_paper_s_values():
    assert arm_name(dict(exp_name="dydiff_td3bc", augment="synther", dydiff=False, filter="none")) == "TD3+BC + SynthER"
    assert arm_name(dict(exp_name="dydiff_cql-x", augment="synther", dydiff=False, filter="softmax")) == "CQL + SynthER-f"
    assert arm_name(dict(exp_name="dydiff_td3bc", augment="synther", filter="hardmax")).endswith("SynthER-f (hardmax)")
    assert arm_name(dict(exp_name="dydiff_td3bc", augment="none", dydiff=False)) == "TD3+BC"
    assert paper_score("maze2d-large", "fixed-goal", "TD3+BC + SynthER") == "98 ± 33"
    assert paper_score("maze2d-large", "fixed-goal", "TD3+BC + SynthER-f") == "87 ± 29"
    assert paper_score("maze2d-medium", "fixed-goal", "Diffusion-QL + SynthER") == "17 ± 4"
    assert paper_score("maze2d-large", "goal-conditioned", "TD3+BC + SynthER") == "—"


def test_the_transitions_can_be_generated_ahead_of_the_runs(synther_models, capsys):
    """python -m common.synther: the runs' cache, made before them; made once; a folder without SynthER in one line."""
    folder, _ = synther_models
    flags = ["maze2d-umaze", "--models-dir", str(folder), "--dataset-steps", "10000", "--synther-sampler-steps", "4"]
    synther.main([*flags, "--synther-samples", "300", "--cpu"])
    out = capsys.readouterr().out
    path = folder / "maze2d-umaze" / "synther_samples_300_N4.pt"
    assert "generating 300 transitions" in out and f"300 transitions in {path} in " in out
    cached = load_checkpoint(path)
    assert cached["rows"].shape == (300, 2 * 4 + 2 + 2) and torch.isfinite(cached["rows"]).all()
    synther.main([*flags, "--synther-samples", "300", "--cpu"])  # again: read, not generated
    assert "300 transitions read from" in capsys.readouterr().out
    assert torch.equal(load_checkpoint(path)["rows"], cached["rows"])
    with pytest.raises(SystemExit, match="synther.pt"):
        synther.main(["maze2d-umaze", "--models-dir", str(folder / "none"), "--dataset-steps", "10000", "--cpu"])
    with pytest.raises(SystemExit):
        synther.main([*flags, "--synther-samples", "0"])
    assert "--synther-samples 0: give a positive number" in capsys.readouterr().err
