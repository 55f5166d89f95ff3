"""Shared machinery of the training-script tests: tiny flags, running a script, killing it, forged models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ("--dm-dim 8 --dm-dim-mults 1 2 --dm-steps 20 --dm-batch-size 16 --dyn-hidden 32 --dyn-max-steps 40 "
            "--reward-steps 40 --report-windows 4 --report-iterations 1 --sampler-steps 4 --holdout-fraction 0.1")
TINY = ["--env-id", "maze2d-umaze", "--dataset-steps", "10000", "--eval-episodes", "1", "--rollout-freq", "50",
        "--rollout-batch-size", "32", "--rollout-length", "16", "--sampler-steps", "4", "--no-cuda",
        f"--pretrain-args={PRETRAIN}"]


def run_script(script, *args, check=True, timeout=600, env=None):
    """Run `script` (e.g. dydiff_td3bc.py) from the repository root; fail with its output unless it exits 0."""
    env = None if env is None else {**os.environ, **env}
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def metrics(run_dir):
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kill_after_first_checkpoint(script, args, runs, exp_name):
    """Start `script`, SIGKILL it once its run folder holds a checkpoint; return that run folder."""
    proc = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(runs.glob(f"*{exp_name}__*/checkpoint.pt")):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return next(runs.glob(f"*{exp_name}__*"))


def models_for_other_data(models, dest):
    """Copies of the maze2d-umaze models in `models`, relabelled as made for another dataset."""
    (dest / "maze2d-umaze").mkdir(parents=True)
    for f in ("dm.pt", "dynamics.pt", "reward.pt"):
        ckpt = torch.load(models / "maze2d-umaze" / f, weights_only=False)
        ckpt["fingerprint"], ckpt["dataset_ids"] = "0123456789abcdef", ["local/pointmaze/umaze-other-v2"]
        torch.save(ckpt, dest / "maze2d-umaze" / f)
    return dest
