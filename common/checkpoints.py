"""Atomic checkpoints and the pretrained-model files that DyDiff's training scripts load."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

MODEL_FILES = {"dm": "dm.pt", "dynamics": "dynamics.pt", "reward": "reward.pt", "synther": "synther.pt"}
DYDIFF_MODELS = ("dm", "dynamics", "reward")
PHYSICAL_MODELS = ("dm", "dynamics")  # they model the physical state alone: shared by the tasks of one dataset


class DamagedFile(ValueError):
    """A file the project wrote cannot be read back (truncated, empty, or not what it should be)."""


def atomic_save(obj, path, keep_previous: bool = False) -> None:
    """torch.save to a temporary file, then rename it over `path`: a kill never leaves a truncated file.

    With `keep_previous`, the file being replaced is kept as `<name>.prev<ext>` (the last good one to fall
    back on). A failed write (full disk, read-only folder) or an interrupted one removes its temporary
    file and leaves `path` untouched; a failed write stops with one message naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        if keep_previous and path.exists():
            os.replace(path, previous(path))
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        reason = e.strerror or str(e)
        raise SystemExit(
            f"could not write {path}: {reason}; free some disk space or choose a writable folder "
            f"(what was saved before is untouched)"
        ) from None
    except BaseException:  # interrupted (Ctrl-C, SystemExit from a signal handler): no temporary file survives
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # its folder is not there or not a folder: nothing to remove
        pass


def previous(path) -> Path:
    """Where atomic_save(keep_previous=True) keeps the file it replaced: checkpoint.pt -> checkpoint.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporary files that killed writes left in `folder` (`.<name>.tmp<pid>`); returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def share_file(source, path) -> None:
    """Put `source` at `path` as a hard link (no copy of a large model; a later atomic rewrite of either file
    replaces that name alone), or as a copy where links are impossible; atomically, like atomic_save."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def load_checkpoint(path) -> dict:
    """torch.load a checkpoint onto the CPU, whatever device the run uses; DamagedFile if it can't be read.

    Modules and optimizers copy what they load onto their own device (load_state_dict), and random
    states must stay on the CPU (torch.set_rng_state and Generator.set_state take CPU byte tensors), so
    one loading path serves every device.
    """
    path = Path(path)
    if path.exists() and path.stat().st_size == 0:
        raise DamagedFile(f"{path} is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, unpickling errors, EOF: torch raises many kinds
        raise DamagedFile(f"{path} is damaged and cannot be read ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise DamagedFile(f"{path} does not hold a checkpoint")
    return obj


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
    """Per-dataset folder of the pretrained models: {models_dir}/{env_id} (slashes of Minari ids become '_'; a D4RL
    file's folder is named by its stem: models/maze2d-large-sparse-v1)."""
    from common.d4rl import env_label

    return Path(models_dir) / env_label(env_id)


def fits_data(ckpt: dict, name: str, data) -> bool:
    """Whether a pretrained-model file was made for `data` (an OfflineData).

    The DM and the dynamics ensemble model the physical state alone, so they fit every task made from the same
    physical data (the two maze2d tasks of one dataset): they are checked by the physical fingerprint. The reward
    model and SynthER (whose transitions hold the task's rewards and observations) are per task: checked by the
    task's fingerprint. Files written before the physical fingerprint existed fit the very data they were made for.
    """
    if name in PHYSICAL_MODELS and "physical_fingerprint" in ckpt:
        return ckpt["physical_fingerprint"] == data.physical_fingerprint
    return ckpt["fingerprint"] == data.fingerprint


def load_model_file(folder, name: str, fingerprint=None) -> dict:
    """Load one pretrained-model file (onto the CPU); refuse a damaged one, or one made for other data.

    `fingerprint`: the run's OfflineData (checked with fits_data), a fingerprint string (the file's task
    fingerprint must equal it), or None (no check).
    """
    path = Path(folder) / MODEL_FILES[name]
    if not path.exists():
        raise FileNotFoundError(
            f"no pretrained {name} model at {path}; make it with `python pretrain_models.py --env-id <env-id> "
            f"--models-dir {Path(folder).parent}`"
        )
    remake = (
        f"delete it and make it again with `python pretrain_models.py --env-id <env-id> --models-dir {Path(folder).parent}`"
    )
    try:
        ckpt = load_checkpoint(path)
    except DamagedFile as e:
        raise DamagedFile(f"{e}; {remake}") from None
    if "fingerprint" not in ckpt or "dataset_ids" not in ckpt:
        raise DamagedFile(f"{path} is not a pretrained-model file of this project; {remake}")
    if fingerprint is None:
        return ckpt
    data = None if isinstance(fingerprint, str) else fingerprint
    if data is None and ckpt["fingerprint"] == fingerprint or data is not None and fits_data(ckpt, name, data):
        return ckpt
    ours = fingerprint if data is None else data.fingerprint
    hint = ""
    minari_fixed_goal = data is not None and data.form == "fixed-goal" and data.d4rl_file is None
    if minari_fixed_goal and ckpt.get("obs_dim", data.obs_dim) != data.obs_dim:
        hint = (
            f" (it was made for the goal-conditioned task; {data.env_id} is D4RL's fixed-goal task, and "
            f"the goal-conditioned one is --env-id {data.dataset_ids[0]})"
        )
    raise ValueError(
        f"{path} was trained on dataset {', '.join(ckpt['dataset_ids'])} (fingerprint {ckpt['fingerprint']}), "
        f"not on the data of this run (fingerprint {ours}){hint}; pretrain models for this dataset with "
        f"`python pretrain_models.py --env-id <env-id>` or point --models-dir elsewhere"
    )


def load_dm(folder, fingerprint=None, device="cpu"):
    """The pretrained DM (EMA weights, eval mode) and its min/max normalizer, from {folder}/dm.pt."""
    from common.edm import MinMaxNormalizer, build_denoiser

    ckpt = load_model_file(folder, "dm", fingerprint)
    C = ckpt["state_dim"] + ckpt["action_dim"]
    # Files written before the network options existed hold the paper's network: the options' defaults.
    options = {
        k: ckpt[k]
        for k in ("full_res_skip", "padding_mode", "cond_channels", "relative_states", "position_channels")
        if k in ckpt
    }
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


def load_dynamics(folder, fingerprint=None, device="cpu"):
    """The pretrained dynamics ensemble, from {folder}/dynamics.pt."""
    from common.dynamics import EnsembleDynamics

    ckpt = load_model_file(folder, "dynamics", fingerprint)
    model = EnsembleDynamics(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def load_reward(folder, fingerprint=None, device="cpu"):
    """The pretrained reward model, from {folder}/reward.pt."""
    from common.dynamics import RewardModel

    ckpt = load_model_file(folder, "reward", fingerprint)
    model = RewardModel(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def load_synther(folder, fingerprint=None, device="cpu"):
    """SynthER's pretrained denoiser (EMA weights, eval mode) and its normalizer, from {folder}/synther.pt."""
    from common.synther import StandardNormalizer, build_synther

    ckpt = load_model_file(folder, "synther", fingerprint)
    C = 2 * ckpt["obs_dim"] + ckpt["action_dim"] + 2
    denoiser = build_synther(C, **ckpt["network"])
    denoiser.load_state_dict(ckpt["state_dict"])
    normalizer = StandardNormalizer(torch.zeros(C), torch.ones(C))
    normalizer.load_state_dict(ckpt["normalizer"])
    return denoiser.to(device).eval(), normalizer.to(device), ckpt


def _die_with_parent():
    """In a child process (Linux): receive SIGTERM when the parent dies, even by SIGKILL, so no orphan is left."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's own handler still stops the child
        pass


def models_needed(args) -> tuple[str, ...]:
    """The pretrained models a run uses: SynthER's alone for `--augment synther`, none for the plain base algorithm,
    and DyDiff's, where the ablations that take the real simulator's states or rewards (`--rollout-states`,
    `--rollout-rewards`) drop the models they replace."""
    if getattr(args, "augment", None) == "synther":
        return ("synther",)
    if not getattr(args, "dydiff", False):
        return ()
    states = getattr(args, "rollout_states", "dm")
    needed = []
    if states != "simulator":
        needed.append("dynamics")  # the first draft
        if states == "dm" and args.num_iterations >= 1:
            needed.append("dm")
    if getattr(args, "rollout_rewards", "model") == "model":
        needed.append("reward")
    return tuple(needed)


def model_fingerprints(args) -> dict:
    """{model: the first 16 hex digits of its file's SHA-256} for the pretrained models a run uses."""
    import hashlib

    folder = models_folder(args.models_dir, args.env_id)
    out = {}
    for name in models_needed(args):
        path = folder / MODEL_FILES[name]
        if path.exists():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


def load_or_pretrain_models(args, data, device):
    """The pretrained models for `data`, from {args.models_dir}/{env_id}/, made first if one the run uses
    (`models_needed`) is missing. SynthER's is only made here; common.synther.load_or_generate loads it.

    A missing model is made by running `pretrain_models.py` (with the options of `args.pretrain`) in a subprocess.
    Returns (denoiser, dm_normalizer, dynamics, reward_model), None for each model the run does not use; stops with
    one message when the models were made for other data or for another rollout length.
    """
    import shlex
    import subprocess
    import sys

    needed = models_needed(args)
    folder = models_folder(args.models_dir, args.env_id)
    if not all((folder / MODEL_FILES[name]).exists() for name in needed):
        script = Path(__file__).resolve().parents[1] / "pretrain_models.py"
        cmd = [
            sys.executable,
            str(script),
            "--env-id",
            args.env_id,
            "--models-dir",
            args.models_dir,
            *([] if args.dataset_steps is None else ["--dataset-steps", str(args.dataset_steps)]),
            "--rollout-length",
            str(args.rollout_length),
            "--models",
            *needed,  # only those this run uses (an ablation's run may need no DM)
            *args.pretrain.flags(),
            # the report measures the DM with the sampler this run uses, on its device
            "--sampler-steps",
            str(args.sampler_steps),
            "--sampler-churn",
            str(args.sampler_churn),
            *(["--synther-sampler-steps", str(args.synther_sampler_steps)] if "synther" in needed else []),
            *([] if args.cuda else ["--no-cuda"]),
        ]
        print(f"no pretrained models in {folder}: making them first (to do it separately: python {shlex.join(cmd[1:])})")
        # Ctrl-C reaches this process alone (the child has its own session); stopping here kills the child,
        # which loses nothing (its files are written atomically), and the child dies with this process.
        if subprocess.run(cmd, start_new_session=True, preexec_fn=_die_with_parent).returncode != 0:
            raise SystemExit("pretraining failed; see its message above")
    denoiser = dm_normalizer = dynamics = reward_model = None
    try:
        if "dm" in needed:
            denoiser, dm_normalizer, dm_info = load_dm(folder, data, device)
        if "dynamics" in needed:
            dynamics = load_dynamics(folder, data, device)
        if "reward" in needed:
            reward_model = load_reward(folder, data, device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e))
    if "dm" in needed and dm_info["horizon"] != args.rollout_length:
        raise SystemExit(
            f"the DM in {folder} was trained with L={dm_info['horizon']}, not --rollout-length "
            f"{args.rollout_length}; use --rollout-length {dm_info['horizon']} or pretrain with "
            f"--rollout-length {args.rollout_length}"
        )
    return denoiser, dm_normalizer, dynamics, reward_model
