"""Atomic checkpoints and the pretrained-model files that DyDiff's training scripts load."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

MODEL_FILES = {"dm": "dm.pt", "dynamics": "dynamics.pt", "reward": "reward.pt"}


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """torch.load a checkpoint onto the CPU, whatever device the run uses.

    Modules and optimizers copy what they load onto their own device (load_state_dict), and random
    states must stay on the CPU (torch.set_rng_state and Generator.set_state take CPU byte tensors), so
    one loading path serves every device.
    """
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(*generators: torch.Generator) -> dict:
    """Every random state a run draws from: Python, NumPy, torch's CPU and CUDA generators, and `generators`."""
    return dict(
        python=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        generators=[g.get_state() for g in generators],
    )


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    """Restore what rng_state saved, on whatever device each tensor was loaded to (each goes back to the CPU)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if len(state["generators"]) != len(generators):
        raise ValueError(f"the checkpoint holds {len(state['generators'])} generator states, this run has {len(generators)}")
    for g, s in zip(generators, state["generators"]):
        g.set_state(s.cpu())


def models_folder(models_dir: str, env_id: str) -> Path:
    """Per-dataset folder of the pretrained models: {models_dir}/{env_id} (slashes of Minari ids become '_')."""
    return Path(models_dir) / re.sub(r"[^A-Za-z0-9_.-]", "_", env_id)


def load_model_file(folder, name: str, fingerprint: str | None = None, map_location="cpu") -> dict:
    """Load one pretrained-model file; refuse one made for other data than `fingerprint`."""
    path = Path(folder) / MODEL_FILES[name]
    if not path.exists():
        raise FileNotFoundError(
            f"no pretrained {name} model at {path}; make it with `python pretrain_models.py --env-id <env-id> "
            f"--models-dir {Path(folder).parent}`"
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if fingerprint is not None and ckpt["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was trained on dataset {', '.join(ckpt['dataset_ids'])} (fingerprint {ckpt['fingerprint']}), "
            f"not on the data of this run (fingerprint {fingerprint}); pretrain models for this dataset with "
            f"`python pretrain_models.py --env-id <env-id>` or point --models-dir elsewhere"
        )
    return ckpt


def load_dm(folder, fingerprint: str | None = None, device="cpu"):
    """The pretrained DM (EMA weights, eval mode) and its min/max normalizer, from {folder}/dm.pt."""
    from common.edm import MinMaxNormalizer, build_denoiser

    ckpt = load_model_file(folder, "dm", fingerprint)
    C = ckpt["state_dim"] + ckpt["action_dim"]
    # Files written before the network options existed hold the paper's network: the options' defaults.
    options = {k: ckpt[k] for k in ("full_res_skip", "padding_mode", "cond_channels", "relative_states") if k in ckpt}
    denoiser = build_denoiser(
        ckpt["state_dim"],
        ckpt["action_dim"],
        dim=ckpt["dim"],
        dim_mults=tuple(ckpt["dim_mults"]),
        sigma_data=ckpt["sigma_data"],
        **options,
    )
    denoiser.load_state_dict(ckpt["state_dict"])
    normalizer = MinMaxNormalizer(torch.zeros(C), torch.ones(C))
    normalizer.load_state_dict(ckpt["normalizer"])
    return denoiser.to(device).eval(), normalizer.to(device), ckpt


def load_dynamics(folder, fingerprint: str | None = None, device="cpu"):
    """The pretrained dynamics ensemble, from {folder}/dynamics.pt."""
    from common.dynamics import EnsembleDynamics

    ckpt = load_model_file(folder, "dynamics", fingerprint)
    model = EnsembleDynamics(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def load_reward(folder, fingerprint: str | None = None, device="cpu"):
    """The pretrained reward model, from {folder}/reward.pt."""
    from common.dynamics import RewardModel

    ckpt = load_model_file(folder, "reward", fingerprint)
    model = RewardModel(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def load_or_pretrain_models(args, data, device):
    """DyDiff's three pretrained models for `data`, from {args.models_dir}/{env_id}/, made first if missing.

    A missing model is made by running `pretrain_models.py` (with `args.pretrain_args`) in a subprocess.
    Returns (denoiser, dm_normalizer, dynamics, reward_model); stops with one message when the models were
    made for other data or for another rollout length.
    """
    import shlex
    import subprocess
    import sys

    folder = models_folder(args.models_dir, args.env_id)
    if not all((folder / f).exists() for f in MODEL_FILES.values()):
        script = Path(__file__).resolve().parents[1] / "pretrain_models.py"
        cmd = [
            sys.executable,
            str(script),
            "--env-id",
            args.env_id,
            "--models-dir",
            args.models_dir,
            "--dataset-steps",
            str(args.dataset_steps),
            "--rollout-length",
            str(args.rollout_length),
            *shlex.split(args.pretrain_args),
        ]
        print(f"no pretrained models in {folder}: making them first (to do it separately: {shlex.join(cmd[1:])})")
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit("pretraining failed; see its message above")
    try:
        denoiser, dm_normalizer, dm_info = load_dm(folder, data.fingerprint, device)
        dynamics = load_dynamics(folder, data.fingerprint, device)
        reward_model = load_reward(folder, data.fingerprint, device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e))
    if dm_info["horizon"] != args.rollout_length:
        raise SystemExit(
            f"the DM in {folder} was trained with L={dm_info['horizon']}, not --rollout-length "
            f"{args.rollout_length}; use --rollout-length {dm_info['horizon']} or pretrain with "
            f"--rollout-length {args.rollout_length}"
        )
    return denoiser, dm_normalizer, dynamics, reward_model
