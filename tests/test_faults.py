"""Fault injection: damaged and missing files, failed and killed writes, Ctrl-C and kills of a running script.

Each case must end in one line naming the file or what was kept (no traceback), lose nothing that was
saved, and leave nothing behind (no temporary file, no half-made run folder).
"""

import errno
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from script_runs import PRETRAIN, ROOT, SCRIPTS, TINY, run_script, tiny

from common import checkpoints
from common.checkpoints import DamagedFile, atomic_save, load_checkpoint, previous, remove_stale_temporaries


def one_line(err):
    """The message a stopped script ends with: its last line (progress bars aside), and no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines, "no message"
    return lines[-1]


# ----------------------------------------------------------------------------- writes
def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path, keep_previous=True)

    def full_disk(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"could not write .*checkpoint.pt: No space left on device"):
        atomic_save({"step": 2}, path, keep_previous=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["step"] == 1


def test_an_unwritable_folder_ends_in_one_message(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")  # fails for root too, unlike permissions
    with pytest.raises(SystemExit, match="could not write .*not-a-folder/x.pt"):
        atomic_save({"a": 1}, blocker / "x.pt")


def test_an_interrupted_write_removes_its_temporary(tmp_path, monkeypatch):
    def interrupted(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": 1}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_keeping_the_previous_checkpoint_and_cleaning_stale_temporaries(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for step in (1, 2, 3):
        atomic_save({"step": step}, path, keep_previous=True)
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(previous(path))["step"] == 2
    stale = tmp_path / ".checkpoint.pt.tmp12345"  # what a SIGKILL during a write leaves
    stale.write_bytes(b"x" * 100)
    assert remove_stale_temporaries(tmp_path) == [stale] and not stale.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x80\x02not a pickle"])
def test_damaged_checkpoints_are_named(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(DamagedFile, match="checkpoint.pt is"):
        load_checkpoint(path)


def test_damaged_model_files_are_named_with_the_fix(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save({"fingerprint": "f", "dataset_ids": ["x"], "w": 1}, good)
    (tmp_path / "dm.pt").write_bytes(good.read_bytes()[:50])
    with pytest.raises(DamagedFile, match="dm.pt is damaged .*delete it and make it again with `python pretrain_models.py"):
        checkpoints.load_model_file(tmp_path, "dm")
    torch.save({"w": 1}, tmp_path / "reward.pt")
    with pytest.raises(DamagedFile, match="reward.pt is not a pretrained-model file"):
        checkpoints.load_model_file(tmp_path, "reward")


def test_checkpoints_hold_only_the_stored_rows_of_the_synthetic_buffer(tiny_models, tmp_path):
    # a 2M-transition buffer preallocates ~120 MB; the checkpoint holds the few hundred rows stored
    run_script(
        "dydiff_td3bc.py",
        *tiny(
            "dydiff_td3bc.py",
            tiny_models,
            tmp_path,
            "--total-steps",
            "60",
            "--eval-freq",
            "60",
            "--synthetic-buffer-size",
            "2000000",
        ),
    )
    ckpt_path = next(tmp_path.glob("*/checkpoint.pt"))
    assert load_checkpoint(ckpt_path)["synthetic"]["size"] == 2 * 19 * 15
    assert ckpt_path.stat().st_size < 10_000_000  # networks and optimizers ~3 MB; the whole buffer would be 128 MB


# ----------------------------------------------------------------------------- resume from damaged files
def finished_run(script, tiny_models, runs):
    run_script(script, *tiny(script, tiny_models, runs, "--total-steps", "200", "--eval-freq", "100"))
    return next(runs.glob("*__*"))


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tiny_models, tmp_path):
    run = finished_run("dydiff_td3bc.py", tiny_models, tmp_path)
    assert load_checkpoint(previous(run / "checkpoint.pt"))["step"] == 100
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated
    out = run_script("dydiff_td3bc.py", "--resume", str(run), "--total-steps", "300")
    assert "checkpoint.pt is damaged and cannot be read" in out.stdout
    assert "resuming from the checkpoint before it, checkpoint.prev.pt (step 100)" in out.stdout
    result = json.loads((run / "result.json").read_text())
    assert result["total_steps"] == 300 and len(result["evaluations"]) == 3
    steps = [
        r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/normalized_score" in r
    ]
    assert steps == [100, 200, 300]  # the rows after the fallen-back-to checkpoint were logged once


def test_a_larger_total_steps_on_resume_gives_the_rest_of_the_new_budgets_cosine_decay(tiny_models, tmp_path):
    script = "dydiff_diffql.py"
    run_script(script, *tiny(script, tiny_models, tmp_path, "--total-steps", "200", "--eval-freq", "50", "--lr-decay"))
    run = next(tmp_path.glob("*__*"))

    def lr(ckpt):
        return ckpt["actor_optimizer"]["param_groups"][0]["lr"]

    assert lr(load_checkpoint(run / "checkpoint.pt")) == pytest.approx(0.0, abs=1e-12)  # decayed to 0 at step 200
    run_script(script, "--resume", str(run), "--total-steps", "300")
    ckpt, before = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(previous(run / "checkpoint.pt"))
    assert (before["step"], ckpt["step"]) == (250, 300)
    assert lr(before) == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 250 / 300)))  # the 300-step schedule
    assert lr(ckpt) == pytest.approx(0.0, abs=1e-12)


def test_a_tracked_offline_run_says_on_resume_that_w_and_b_starts_a_new_offline_folder(tiny_models, tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    args = tiny("dydiff_td3bc.py", tiny_models, tmp_path / "runs", "--no-dydiff", "--total-steps", "60", "--eval-freq", "60")
    run_script("dydiff_td3bc.py", *args, "--track", env=env)
    run = next((tmp_path / "runs").glob("*__*"))
    out = run_script("dydiff_td3bc.py", "--resume", str(run), "--total-steps", "120", env=env)
    assert "W&B offline cannot continue a run" in out.stdout and str(run / "metrics.jsonl") in out.stdout
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 2  # what the message warns of


def test_a_checkpoint_of_another_version_ends_in_one_line(tiny_models, tmp_path):
    run = finished_run("dydiff_td3bc.py", tiny_models, tmp_path)
    for path in (run / "checkpoint.pt", previous(run / "checkpoint.pt")):
        ckpt = load_checkpoint(path)
        ckpt["actor"].pop(next(iter(ckpt["actor"])))  # a network of another shape
        atomic_save(ckpt, path)
    out = run_script("dydiff_td3bc.py", "--resume", str(run), "--total-steps", "300", check=False)
    assert "does not fit this version of the script (Error(s) in loading state_dict" in one_line(out.stderr)


def test_resume_without_usable_files_ends_in_one_line(tiny_models, tmp_path):
    run = finished_run("dydiff_td3bc.py", tiny_models, tmp_path)
    (run / "checkpoint.pt").write_bytes(b"")
    previous(run / "checkpoint.pt").unlink()
    out = run_script("dydiff_td3bc.py", "--resume", str(run), "--total-steps", "300", check=False)
    assert "checkpoint.pt is empty, and there is no earlier checkpoint" in one_line(out.stderr)
    (run / "args.json").write_text("{")
    out = run_script("dydiff_td3bc.py", "--resume", str(run), check=False)
    assert "args.json is damaged" in one_line(out.stderr)
    (run / "args.json").unlink()
    out = run_script("dydiff_td3bc.py", "--resume", str(run), check=False)
    assert "args.json is missing" in one_line(out.stderr)


# ----------------------------------------------------------------------------- Ctrl-C and kills of a running script
def start(script, args):
    return subprocess.Popen(
        [sys.executable, script, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, proc, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the script ended early: {proc.communicate()}")
        time.sleep(0.1)
    assert condition(), "timed out"


# SIGINT through each script; SIGTERM takes the same handler, so one script shows it
@pytest.mark.parametrize("script, sig", [(s, signal.SIGINT) for s in SCRIPTS] + [(SCRIPTS[0], signal.SIGTERM)])
def test_ctrl_c_or_a_kill_while_training_keeps_the_checkpoint_and_says_how_to_continue(script, sig, tiny_models, tmp_path):
    proc = start(script, tiny(script, tiny_models, tmp_path, "--total-steps", "5000", "--eval-freq", "100"))
    wait_for(lambda: list(tmp_path.glob("*/checkpoint.pt")), proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    run = next(tmp_path.glob("*__*"))
    line = one_line(err)
    assert proc.returncode != 0 and line.startswith("interrupted: the checkpoint of step")
    assert f"--resume {run}" in line and script in line
    assert not list(run.glob(".*tmp*")), "no temporary file survives"
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert f"step {step:,}" in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_before_the_first_checkpoint_leaves_no_run_folder(script, tiny_models, tmp_path):
    proc = start(script, tiny(script, tiny_models, tmp_path, "--total-steps", "5000", "--eval-freq", "5000"))
    wait_for(lambda: list(tmp_path.glob("*/metrics.jsonl")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert one_line(err).startswith("interrupted before the first checkpoint; nothing was kept")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the pretraining child
def processes_mentioning(text):
    """PIDs of the processes whose command line contains `text` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def start_with_long_pretraining(tmp_path):
    models = tmp_path / "fresh-models"
    args = [*TINY, "--pretrain.dm-steps", "100000", "--models-dir", str(models), "--runs-dir", str(tmp_path / "runs")]
    proc = start("dydiff_td3bc.py", args)
    wait_for(lambda: (models / "maze2d-umaze" / "reward.pt").exists(), proc)  # the child is training its DM now
    child = [p for p in processes_mentioning(str(models)) if p != proc.pid]
    assert len(child) == 1
    return proc, child[0], models


def gone(pid, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not Path(f"/proc/{pid}").exists() or "(Z)" in Path(f"/proc/{pid}/stat").read_text():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_during_pretraining_stops_the_child_in_one_line(tmp_path):
    proc, child, models = start_with_long_pretraining(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert one_line(err).startswith("interrupted before training began; run the same command again")
    assert gone(child), "the pretraining child outlived the script"
    assert {"dynamics.pt", "reward.pt"} <= {p.name for p in (models / "maze2d-umaze").iterdir()}  # kept
    assert not list(tmp_path.glob("runs/*")), "no run folder was made"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_script_leaves_no_orphan_pretraining(tmp_path):
    proc, child, _ = start_with_long_pretraining(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert gone(child), "the pretraining child outlived the script killed with SIGKILL"


def test_ctrl_c_in_pretraining_says_what_is_kept(tmp_path):
    models = tmp_path / "models"
    args = [
        "--env-id",
        "maze2d-umaze",
        "--dataset-steps",
        "10000",
        "--rollout-length",
        "16",
        "--models-dir",
        str(models),
        *PRETRAIN.replace("--dm-steps 20", "--dm-steps 100000").split(),
    ]
    proc = start("pretrain_models.py", args)
    wait_for(lambda: (models / "maze2d-umaze" / "reward.pt").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    line = one_line(err)
    assert line.startswith("interrupted: the models finished so far and the DM's last checkpoint are kept in")
    assert not list((models / "maze2d-umaze").glob(".*tmp*"))
