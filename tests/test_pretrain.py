"""pretrain_models.py end to end on a tiny dataset: model files that load, a report, resume, refusal."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from script_runs import DEVICE_FLAG, HAVE_WANDB, TRACK

from common.checkpoints import load_dm, load_model_file, models_folder
from common.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--env-id",
    "maze2d-umaze",
    "--dataset-steps",
    "10000",
    "--rollout-length",
    "16",
    "--holdout-fraction",
    "0.1",
    "--dm-dim",
    "8",
    "--dm-dim-mults",
    "1",
    "2",
    "--dm-steps",
    "30",
    "--dm-batch-size",
    "16",
    "--dm-checkpoint-every",
    "10",
    "--dyn-hidden",
    "32",
    "--dyn-max-steps",
    "60",
    "--reward-steps",
    "60",
    "--report-windows",
    "4",
    "--report-iterations",
    "2",
    "--sampler-steps",
    "4",
    DEVICE_FLAG,
]


def run(*args, check=True, env=None):
    env = None if env is None else {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "pretrain_models.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    models_dir = tmp_path_factory.mktemp("models")
    wandb_dir = tmp_path_factory.mktemp("wandb")
    out = run(*TINY, "--models-dir", str(models_dir), *TRACK, env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)})
    if HAVE_WANDB:
        assert list(wandb_dir.glob("wandb/offline-run-*")), "--track logs to W&B (offline here)"
    return models_dir, out


def test_writes_model_files_that_load_for_this_dataset(pretrained):
    models_dir, _ = pretrained
    folder = models_folder(str(models_dir), "maze2d-umaze")
    data = load_dataset("maze2d-umaze", dataset_steps=10_000, progress=False)
    for name in ("dm", "dynamics", "reward"):
        ckpt = load_model_file(folder, name, data)
        assert ckpt["state_dim"] == 4 and ckpt["obs_dim"] == 4 and ckpt["action_dim"] == 2  # the fixed-goal task
        assert ckpt["dataset_ids"] == list(data.dataset_ids) and ckpt["form"] == "fixed-goal"
        assert (ckpt["fingerprint"], ckpt["physical_fingerprint"]) == (data.fingerprint, data.physical_fingerprint)
    dm = load_model_file(folder, "dm", data.fingerprint)
    assert dm["horizon"] == 16 and "normalizer" in dm
    from common.checkpoints import load_dynamics, load_reward

    denoiser, normalizer, _ = load_dm(folder, data.fingerprint)
    dynamics, reward = load_dynamics(folder, data.fingerprint), load_reward(folder, data.fingerprint)
    obs = torch.as_tensor(data.observations[:5])
    assert dynamics.predict(obs[:, :4], torch.as_tensor(data.actions[:5])).shape == (5, 4)
    assert reward(obs, torch.as_tensor(data.actions[:5])).shape == (5,)
    x = normalizer.normalize(torch.as_tensor(np.c_[data.observations[:16, :4], data.actions[:16]])[None])
    assert denoiser(x, torch.tensor([1.0])).shape == (1, 16, 6)
    assert not (folder / ".dm.pt.tmp").exists()


def test_report_has_losses_and_error_curves(pretrained):
    models_dir, out = pretrained
    folder = models_folder(str(models_dir), "maze2d-umaze")
    report = json.loads((folder / "report.json").read_text())
    assert np.isfinite(report["dm_heldout_loss"]) and report["dm_heldout_loss"] > 0
    assert len(report["dynamics_heldout_mse_per_member"]) == 7 and len(report["dynamics_elites"]) == 5
    denoiser, _, info = load_dm(folder)
    assert report["dm"]["params"] == sum(p.numel() for p in denoiser.parameters()) > 0
    assert (report["dm"]["dim"], tuple(report["dm"]["dim_mults"])) == (info["dim"], tuple(info["dim_mults"]))
    curves = report["state_error_vs_horizon"]
    assert set(curves) == {
        "dataset/ensemble",
        "dataset/dm",
        "dataset/copy_s0",
        "policy/ensemble",
        "policy/copy_s0",
        "policy/dm_M1",
        "policy/dm_M2",
    }
    for name, err in curves.items():
        assert len(err) == 16 and err[0] == pytest.approx(0.0, abs=1e-10), name  # s0 is given, never generated
        assert all(np.isfinite(err))
    # Copying s0 is exact at t = 0 and then wrong by however far the point has moved.
    assert curves["dataset/copy_s0"][15] > curves["dataset/copy_s0"][1] > 0
    by_position = report["one_step_error_vs_position"]
    assert set(by_position) == set(report["one_step_error"]) == {"dataset/dm", "policy/dm_M1"}
    for name, kinds in by_position.items():
        assert set(kinds) == {"generated", "copy", "ensemble"}
        for kind, err in kinds.items():
            assert len(err) == 15 and all(np.isfinite(err)) and min(err) >= 0, (name, kind)
            at = report["one_step_error"][name][kind]
            assert [at["first"], at["second"], at["last"]] == [err[0], err[1], err[14]]
            assert at["middle"] == pytest.approx(np.mean(err[3:12]))  # the middle half of the 15 positions
            median = report["one_step_error_median"][name][kind]
            assert set(median) == set(at) and all(np.isfinite(list(median.values()))), (name, kind)
        for stat, key in (("mean", "one_step_error"), ("median", "one_step_error_median")):
            gen = report[key][name]["generated"]
            r = report["one_step_first_over_middle"][name][stat]
            assert r["ratio"] == pytest.approx(gen["first"] / gen["middle"], rel=1e-5) and 0 < r["low"] <= r["high"]
    assert (folder / "report.png").stat().st_size > 1000
    assert "state_error_at_15" in out.stdout and "one-step error of generated transitions" in out.stdout


def test_one_step_of_the_simulator_reproduces_the_dataset():
    from common.envs import step_from

    data = load_dataset("maze2d-umaze", dataset_steps=10_000, progress=False)
    idx = np.array([0, 17, 4000, 9998])
    real = step_from(data.make_eval_env(), "pointmaze", data.observations[idx, :4], data.actions[idx])
    np.testing.assert_allclose(real, data.next_observations[idx, :4], atol=1e-5)


def test_report_only_measures_the_models_of_a_folder(pretrained, tmp_path):
    models_dir, _ = pretrained
    folder = models_folder(str(models_dir), "maze2d-umaze")
    before = {n: (folder / n).stat().st_mtime_ns for n in ("dm.pt", "dynamics.pt", "reward.pt")}
    # Other sizes on the command line: the models' own horizon and U-Net size are used.
    out = run(
        "--env-id",
        "maze2d-umaze",
        "--dataset-steps",
        "10000",
        "--models-dir",
        str(models_dir),
        "--report-only",
        "--report-windows",
        "4",
        "--report-iterations",
        "1",
        "--sampler-steps",
        "4",
        DEVICE_FLAG,
    )
    assert {n: (folder / n).stat().st_mtime_ns for n in before} == before  # nothing retrained
    report = json.loads((folder / "report.json").read_text())
    assert report["horizon"] == 16 and report["dm"]["dim"] == 8 and "state_error_at_15" in out.stdout
    assert len(report["one_step_error_vs_position"]["dataset/dm"]["generated"]) == 15
    out = run(
        "--env-id", "maze2d-umaze", "--dataset-steps", "10000", "--models-dir", str(tmp_path), "--report-only", check=False
    )
    assert out.returncode != 0 and "no pretrained dm model" in out.stderr and "Traceback" not in out.stderr


def test_rerun_keeps_finished_models_and_resumes_the_dm(pretrained):
    models_dir, _ = pretrained
    folder = models_folder(str(models_dir), "maze2d-umaze")
    before = {n: (folder / n).stat().st_mtime_ns for n in ("dynamics.pt", "reward.pt")}
    out = run(*TINY, "--models-dir", str(models_dir), "--dm-steps", "40")  # 10 more DM steps
    assert "already trained, kept" in out.stdout
    assert "resuming DM training at step 30" in out.stdout
    assert {n: (folder / n).stat().st_mtime_ns for n in before} == before
    assert torch.load(folder / "dm_train.pt", weights_only=False)["step"] == 40


def test_another_edge_weight_trains_the_dm_afresh(pretrained, tmp_path):
    """The same network trained with another loss is another DM: neither dm.pt nor dm_train.pt is kept."""
    models_dir, _ = pretrained
    src, folder = models_folder(str(models_dir), "maze2d-umaze"), models_folder(str(tmp_path), "maze2d-umaze")
    shutil.copytree(src, folder)
    out = run(*TINY, "--models-dir", str(tmp_path), "--dm-edge-weight", "3", "--report-iterations", "1")
    assert "dynamics ensemble: already trained, kept" in out.stdout
    assert "another DM configuration: training the DM from scratch" in out.stdout
    assert load_model_file(folder, "dm")["args"]["dm_edge_weight"] == 3.0
    assert torch.load(folder / "dm_train.pt", weights_only=False)["edge_weight"] == 3.0


def test_another_dm_shape_is_trained_afresh_and_recorded(pretrained, tmp_path):
    models_dir, _ = pretrained
    src, folder = models_folder(str(models_dir), "maze2d-umaze"), models_folder(str(tmp_path), "maze2d-umaze")
    shutil.copytree(src, folder)
    out = run(
        *TINY,
        "--models-dir",
        str(tmp_path),
        "--dm-full-res-skip",
        "--dm-padding",
        "replicate",
        "--dm-cond-channels",
        "--dm-relative-states",
        "--dm-position-channels",
        "--dm-edge-weight",
        "4",
        "--report-iterations",
        "1",
    )
    assert "dynamics ensemble: already trained, kept" in out.stdout
    assert "another DM configuration: training the DM from scratch" in out.stdout
    info = load_model_file(folder, "dm")
    assert (info["full_res_skip"], info["padding_mode"], info["cond_channels"], info["relative_states"]) == (
        True,
        "replicate",
        True,
        True,
    )
    assert info["position_channels"] and info["args"]["dm_edge_weight"] == 4.0
    denoiser, _, _ = load_dm(folder)
    assert denoiser.position_channels and denoiser.net.downs[0][0].block1[0].in_channels == 2 * (4 + 2) + 2
    report = json.loads((folder / "report.json").read_text())
    assert (report["dm"]["position_channels"], report["dm"]["edge_weight"]) == (True, 4.0)
    assert (report["dm"]["full_res_skip"], report["dm"]["padding_mode"], report["dm"]["cond_channels"]) == (
        True,
        "replicate",
        True,
    )


def test_bad_inputs_end_in_one_clear_message(tmp_path):
    out = run("--env-id", "maze2d-huge", "--models-dir", str(tmp_path), check=False)
    assert out.returncode != 0 and "unknown --env-id 'maze2d-huge'" in out.stderr
    assert "Traceback" not in out.stderr
    out = run(*TINY, "--models-dir", str(tmp_path), "--dyn-elites", "9", check=False)
    assert out.returncode != 0 and "--dyn-elites" in out.stderr and "Traceback" not in out.stderr
    out = run(*TINY, "--models-dir", str(tmp_path), "--dm-edge-weight", "0", check=False)
    assert out.returncode != 0 and "--dm-edge-weight must be > 0" in out.stderr and "Traceback" not in out.stderr


def test_a_diverging_dm_stops_with_one_message_and_keeps_its_last_checkpoint(pretrained, tmp_path):
    models_dir, _ = pretrained
    src, folder = models_folder(str(models_dir), "maze2d-umaze"), models_folder(str(tmp_path), "maze2d-umaze")
    folder.mkdir(parents=True)
    for name in ("dynamics.pt", "reward.pt", "dm_train.pt"):  # the DM resumes from its last checkpoint
        shutil.copy(src / name, folder / name)
    good = torch.load(folder / "dm_train.pt", weights_only=False)
    out = run(*TINY, "--models-dir", str(tmp_path), "--dm-steps", str(good["step"] + 20), "--dm-lr", "1e30", check=False)
    assert f"resuming DM training at step {good['step']}" in out.stdout
    assert out.returncode != 0 and "DM loss is" in out.stderr and "lower --dm-lr" in out.stderr
    assert "Traceback" not in out.stderr
    kept = torch.load(folder / "dm_train.pt", weights_only=False)
    assert kept["step"] == good["step"] and all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())
    assert not (folder / "dm.pt").exists()


def test_a_resumed_dm_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    from script_runs import moved_tensors_env

    cut, whole = tmp_path / "cut", tmp_path / "whole"
    run(*TINY, "--models-dir", str(cut), "--dm-steps", "20")
    # Resumed with a torch.load that moves tensors unless asked for the CPU, as loading onto a GPU does.
    out = run(*TINY, "--models-dir", str(cut), "--dm-steps", "30", env=moved_tensors_env(tmp_path / "hook"))
    assert "resuming DM training at step 20" in out.stdout
    run(*TINY, "--models-dir", str(whole), "--dm-steps", "30")
    a, b = (torch.load(models_folder(str(d), "maze2d-umaze") / "dm.pt", weights_only=False) for d in (cut, whole))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), f"{name} differs after resuming"


def test_one_step_summary_uses_the_middle_half_and_a_median_that_ignores_rare_events():
    """A rare huge error at one mid-window position moves the mean of the middle half, not its median."""
    from pretrain_models import first_over_middle, one_step_summary

    err = np.ones((100, 20))  # 100 windows, 20 transitions
    err[:, 0], err[:, -1] = 3.0, 5.0
    err[7, 10] = 1000.0  # one window meets a wall at s_10
    err[:, 2] = 50.0  # outside the middle half (positions 5..14): no effect on "middle"
    mean, median = one_step_summary(err, np.mean), one_step_summary(err, np.median)
    assert mean == pytest.approx(dict(first=3.0, second=1.0, middle=1 + 999 / (100 * 10), last=5.0))
    assert median == dict(first=3.0, second=1.0, middle=1.0, last=5.0)
    rng = np.random.default_rng(0)
    r = first_over_middle(err, "median", rng)
    assert r == dict(ratio=3.0, low=3.0, high=3.0)  # every resample has the same medians
    r = first_over_middle(err, "mean", rng)
    assert r["ratio"] == pytest.approx(3.0 / 1.999) and r["low"] < r["ratio"] <= r["high"] == pytest.approx(3.0)


def test_the_training_loops_chores_checkpoint_log_and_stop_on_nan(monkeypatch):
    """LoopChores, shared by the DM's and SynthER's loops: checkpoints every `every` steps and at the end, the loss and
    the speed of this sitting logged every 100 steps, a NaN stopping the run with its fix, the CPU warning once."""
    import pretrain_models

    clock = iter(range(0, 100_000, 1000))  # 1000 s a call (start, the CPU check, the logs): predictable speeds
    monkeypatch.setattr(pretrain_models.time, "time", lambda: next(clock))
    logged, written = [], []
    monkeypatch.setattr(pretrain_models.tqdm, "write", staticmethod(written.append))
    chores = pretrain_models.LoopChores(
        "DM", "dm", 50, 260, 100, torch.device("cpu"), lambda m, s: logged.append((s, m)), "lower --dm-lr", "HINT"
    )
    due = []
    for step in chores:
        chores.before_step(step)
        if chores.after_step(step, torch.tensor(1.0)):
            due.append(step + 1)
    assert due == [100, 200, 260]
    assert [s for s, _ in logged] == [100, 200]
    assert set(logged[0][1]) == {"losses/dm", "charts/dm_steps_per_s"}
    assert logged[0][1]["charts/dm_steps_per_s"] == pytest.approx(51 / 2000)  # this sitting's steps 50..100, not 101
    assert len(written) == 1 and "DM steps left" in written[0] and "HINT" in written[0]
    nan = pretrain_models.LoopChores("SynthER", "synther", 0, 10, 5, torch.device("cpu"), lambda m, s: None, "FIX", "")
    with pytest.raises(FloatingPointError, match="SynthER loss is nan at step 0; FIX"):
        nan.after_step(0, torch.tensor(float("nan")))
    assert not nan.after_step(3, torch.tensor(float("nan")))  # between checks a NaN passes: the next check sees it
