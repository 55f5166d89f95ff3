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
