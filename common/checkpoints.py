"""Atomic checkpoints and the pretrained-model files that DyDiff's training scripts load."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

MODEL_FILES = {"dm": "dm.pt", "dynamics": "dynamics.pt", "reward": "reward.pt"}


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    from common.edm import EDMPrecond, MinMaxNormalizer, TemporalUnet

    ckpt = load_model_file(folder, "dm", fingerprint)
    C = ckpt["state_dim"] + ckpt["action_dim"]
    denoiser = EDMPrecond(TemporalUnet(C, dim=ckpt["dim"], dim_mults=tuple(ckpt["dim_mults"])), sigma_data=ckpt["sigma_data"])
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
