"""Shared machinery of the training-script tests: tiny flags, running a script, killing it, forged models."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("DYDIFF_TEST_DEVICE", "cpu")  # set by `pytest --device` (conftest.py)
DEVICE_FLAG = "--cuda" if DEVICE == "cuda" else "--no-cuda"
# The tiny models' options: flags of pretrain_models.py, and nested (`--pretrain.dm-dim 8`) in the training scripts.
MODEL_FLAGS = (
    "--dm-dim 8 --dm-dim-mults 1 2 --dm-steps 20 --dm-batch-size 16 --dyn-hidden 32 --dyn-max-steps 40 "
    "--reward-steps 40 --report-windows 4 --report-iterations 1 --holdout-fraction 0.1"
)
PRETRAIN = f"{MODEL_FLAGS} --sampler-steps 4 {DEVICE_FLAG}"
# W&B is imported only under --track: where wandb is not installed (a GPU node without it), the tests run without
# --track and skip what they would check of W&B, so that every other check still runs.


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook that hides the module
        return False


HAVE_WANDB = _installed("wandb")
TRACK = ["--track"] if HAVE_WANDB else []


def nested(flags: str) -> list[str]:
    """pretrain_models.py's flags as a training script's nested ones: --dm-dim 8 -> --pretrain.dm-dim 8."""
    return ["--pretrain." + t[2:] if t.startswith("--") else t for t in flags.split()]


TINY = [
    "--env-id",
    "maze2d-umaze",
    "--dataset-steps",
    "10000",
    "--eval-episodes",
    "1",
    "--rollout-freq",
    "50",
    "--rollout-batch-size",
    "32",
    "--rollout-length",
    "16",
    "--sampler-steps",
    "4",
    DEVICE_FLAG,
    *nested(MODEL_FLAGS),
]


SCRIPTS = ["dydiff_td3bc.py", "dydiff_cql.py", "dydiff_diffql.py"]
# keep the tiny runs of CQL and Diffusion-QL short (Diffusion-QL: a smaller batch, fewer action samples per evaluation step)
EXTRA = {
    "dydiff_cql.py": ["--batch-size", "32", "--cql-n-actions", "2"],
    "dydiff_diffql.py": ["--batch-size", "32", "--eval-samples", "4"],
}


def tiny(script, models, runs, *args):
    """A tiny run's command-line arguments for `script` with models in `models`, writing to `runs`."""
    return [*TINY, *EXTRA.get(script, []), "--models-dir", str(models), "--runs-dir", str(runs), *args]


def run_script(script, *args, check=True, timeout=600, env=None):
    """Run `script` (e.g. dydiff_td3bc.py) from the repository root; fail with its output unless it exits 0."""
    env = None if env is None else {**os.environ, **env}
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def metrics(run_dir):
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kill_after_first_checkpoint(script, args, runs, exp_name):
    """Start `script`, SIGKILL it once its run folder holds a checkpoint; return that run folder."""
    proc = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        ckpt["physical_fingerprint"] = "fedcba9876543210"
        torch.save(ckpt, dest / "maze2d-umaze" / f)
    return dest


# Installed with PYTHONPATH in a resumed run: torch.load with any map_location but "cpu" hands back every
# byte tensor (random states) as another tensor type, as loading them onto a GPU does. Resuming must still
# continue the run exactly: random states have to be loaded onto the CPU.
_MOVED_TENSORS_HOOK = """
import torch
_load = torch.load

def _load_elsewhere(*args, map_location=None, **kwargs):
    obj = _load(*args, map_location="cpu", **kwargs)
    if map_location == "cpu":
        return obj

    def moved(x):
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            return x.to(torch.int16)
        if isinstance(x, dict):
            return {k: moved(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(moved(v) for v in x)
        return x

    return moved(obj)

torch.load = _load_elsewhere
"""


def moved_tensors_env(folder):
    """Environment for run_script whose torch.load moves tensors unless told map_location="cpu"."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_MOVED_TENSORS_HOOK)
    return {"PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}
