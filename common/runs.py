"""A training run's folder and logs: arguments, metrics, checkpoints, resume, the final result, W&B.

    runs/{env_id}__{exp_name}__{seed}__{time}/
        args.json                 the run's arguments (--resume reads them back)
        task.json                 what it trains on: the task's form (maze2d: fixed-goal or goal-conditioned), dataset
                                  ids, observation size, fingerprint, and the pretrained models it uses (SHA-256)
        metrics.jsonl             one JSON record per logged step
        checkpoint.pt             the training state at the last evaluation (written atomically)
        checkpoint.prev.pt        the one before: --resume falls back on it if checkpoint.pt is damaged
        synthetic_trajectories_{step}.png   PointMaze: sampled synthetic trajectories over the maze
        result.json               the evaluations and the final score, once the run has finished
        final_policy.pt           the final actor and its observation statistics

Ctrl-C or a kill (SIGINT, SIGTERM) ends a run with one line: what is kept and the command that continues.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.args import settle_augment
from common.checkpoints import (
    DamagedFile,
    atomic_save,
    load_checkpoint,
    model_fingerprints,
    previous,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)

from common.config import PRESETS, PretrainConfig, apply_preset, cpu_command, given_flags
from common.d4rl import env_label

CHANGEABLE_ON_RESUME = ("--total-steps",)


def stop_on_signals(message) -> None:
    """From now on, SIGINT (Ctrl-C) and SIGTERM end the program with `message()`, one line, no traceback."""

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        raise SystemExit("\n" + message())  # on a line of its own, not after a progress bar

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block ends (then the handler runs as usual)."""
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def parse_args(cls, argv=None):
    """A training script's arguments: its command line with `--preset`'s values for the flags not given,
    or, with `--resume RUN`, the arguments RUN began with (only --total-steps may change).

    Also makes Ctrl-C or a kill before training begins end in one line.
    """
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    args = tyro.cli(cls, args=argv)
    settle_augment(args, argv)
    if not args.resume:
        apply_preset(args, PRESETS[args.preset]["run"], argv)
        apply_preset(args.pretrain, PRESETS[args.preset]["pretrain"], argv, prefix="pretrain.")
    return resumed_args(args, cls, argv)


def resumed_args(args, cls, argv):
    """With `--resume RUN`, the arguments RUN began with (only --total-steps may change); else `args`."""
    stop_on_signals(lambda: "interrupted before training began; run the same command again (models already "
                             "pretrained are kept, an interrupted pretraining resumes, a dataset generation starts over)")
    if not args.resume:
        return args
    run_dir = Path(args.resume)
    if not (run_dir / "checkpoint.pt").exists() and not previous(run_dir / "checkpoint.pt").exists():
        raise SystemExit(f"--resume {run_dir}: no checkpoint.pt there; pass the folder of a run that has evaluated once")
    try:
        saved = json.loads((run_dir / "args.json").read_text())
        if "simulator_states" in saved:  # a run from before --rollout-states, which replaced that flag
            saved["rollout_states"] = "simulator-replay" if saved.pop("simulator_states") else "dm"
        if "augment" not in saved:  # a run from before --augment: --no-dydiff was its only other arm
            saved["augment"] = "dydiff" if saved.get("dydiff", True) else "none"
        pretrain = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["pretrain"].items()}  # JSON made tuples lists
        resumed = cls(**{**saved, "resume": str(run_dir), "pretrain": PretrainConfig(**pretrain)})
    except FileNotFoundError:
        raise SystemExit(f"{run_dir / 'args.json'} is missing: the run's arguments are gone, so it cannot be resumed; "
                         f"start a new run") from None
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise SystemExit(f"{run_dir / 'args.json'} is damaged or was written by another version ({type(e).__name__}); "
                         f"it cannot be resumed: start a new run") from None
    others = given_flags(argv) - {"--resume", *CHANGEABLE_ON_RESUME}
    if others:
        raise SystemExit(f"--resume continues a run with the arguments it began with; only --total-steps may change "
                         f"(drop {', '.join(sorted(others))})")
    if "--total-steps" in given_flags(argv):
        resumed.total_steps = args.total_steps
    return resumed


def _state_dict(x):
    return [m.state_dict() for m in x] if isinstance(x, (list, tuple)) else x.state_dict()


def _load_state_dict(x, state):
    if isinstance(x, (list, tuple)):
        for m, s in zip(x, state):
            m.load_state_dict(s)
    else:
        x.load_state_dict(state)


class Run:
    """The folder, logs and checkpoints of one training run, new or resumed.

    `state` names everything a checkpoint holds (networks, optimizers, the synthetic buffer, lists of
    schedulers): on `--resume` each gets its saved state back, with every random state (`generator` too).
    """

    def __init__(self, args, state: dict, generator, task: dict | None = None):
        self.args, self.state, self.generator = args, state, generator
        self.task = task or {}  # what the run trains on (form, dataset ids, fingerprint), kept in result.json
        self.start_step, self.evaluations, self.time_before = 0, [], 0.0
        self.d4rl_evaluations = []  # the same evaluations on D4RL maze2d-v1's scale, where the task has one
        self.checkpoint_step = None  # the step of the newest checkpoint on disk
        if args.resume:
            self.dir = Path(args.resume)
            remove_stale_temporaries(self.dir)
            ckpt = self._load_newest_checkpoint()
            if ckpt["step"] >= args.total_steps:
                raise SystemExit(f"{self.dir} is at step {ckpt['step']:,} already; to train on, resume with a larger "
                                 f"--total-steps (it has {args.total_steps:,})")
            try:
                for key, module in state.items():
                    _load_state_dict(module, ckpt[key])
            except (KeyError, RuntimeError, ValueError) as e:  # e.g. a network or scheduler of another shape or type
                message = str(e).splitlines()[0] if str(e) else repr(e)
                raise SystemExit(f"the checkpoint in {self.dir} does not fit this version of the script ({message}): "
                                 f"start a new run") from None
            set_rng_state(ckpt["rng"], generator)
            if self.task and (self.dir / "task.json").exists():  # the models it began with (their SHA-256)
                self.task = {**self.task, "models": json.loads((self.dir / "task.json").read_text()).get("models")}
            self.start_step, self.evaluations = ckpt["step"], ckpt["evaluations"]
            self.d4rl_evaluations = ckpt.get("d4rl_evaluations", [])
            self.checkpoint_step = ckpt["step"]
            self.time_before = ckpt.get("wall_time_s", 0.0)  # training time of the earlier sittings
            self._truncate_metrics(ckpt.get("metrics_bytes"))
            self._write_args()  # a changed --total-steps holds for later resumes too
            print(f"resuming {self.dir} at step {self.start_step:,} (of {args.total_steps:,})")
        else:
            name = f"{env_label(args.env_id)}__{args.exp_name}__{args.seed}__{int(time.time())}"
            self.dir = Path(args.runs_dir) / name
            if self.task:  # and the pretrained models it uses, by the SHA-256 of their files
                self.task = {**self.task, "models": model_fingerprints(args)}
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._write_args()
                if self.task:
                    tmp = self.dir / ".task.json.tmp"
                    tmp.write_text(json.dumps(self.task, indent=1))
                    os.replace(tmp, self.dir / "task.json")
            except OSError as e:
                raise SystemExit(f"cannot write the run folder {self.dir}: {e.strerror or e}; choose a writable "
                                 f"--runs-dir") from None
        self.name = self.dir.name
        stop_on_signals(self._stop_message)
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, group=args.wandb_group,
                                    config=asdict(args), name=self.name, id=self.name.replace("/", "_")[-64:],
                                    resume="allow", save_code=True)
            if args.resume and self.wandb.offline:
                print(f"W&B offline cannot continue a run: this sitting logs to a new offline folder with the run's id "
                      f"({self.wandb.id}); {self.dir / 'metrics.jsonl'} holds the whole run (online, W&B continues it)")
        self.metrics_file = open(self.dir / "metrics.jsonl", "a")
        self.start_time = time.time()

    # --------------------------------------------------------------------------------------- files
    def _write_args(self):
        tmp = self.dir / ".args.json.tmp"
        tmp.write_text(json.dumps(asdict(self.args), indent=1))
        os.replace(tmp, self.dir / "args.json")

    def _load_newest_checkpoint(self) -> dict:
        """checkpoint.pt, or the one before it if that is missing or damaged (saying so)."""
        path, prev = self.dir / "checkpoint.pt", previous(self.dir / "checkpoint.pt")
        try:
            return load_checkpoint(path)
        except (DamagedFile, FileNotFoundError) as e:
            problem = str(e) if isinstance(e, DamagedFile) else f"{path} is missing"
            if not prev.exists():
                raise SystemExit(f"{problem}, and there is no earlier checkpoint to fall back on: start a new run") from None
            try:
                ckpt = load_checkpoint(prev)
            except DamagedFile as e2:
                raise SystemExit(f"{problem}, and so is the one before ({e2}): start a new run") from None
            print(f"{problem}; resuming from the checkpoint before it, {prev.name} (step {ckpt['step']:,})")
            return ckpt

    def _truncate_metrics(self, size):
        """Drop the metric rows logged after the checkpoint: the resumed run logs those steps again."""
        path = self.dir / "metrics.jsonl"
        if size is not None and path.exists() and path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)

    def _stop_message(self) -> str:
        if self.checkpoint_step is None:  # nothing worth keeping: no half-made run folder stays behind
            shutil.rmtree(self.dir, ignore_errors=True)
            return f"interrupted before the first checkpoint; nothing was kept (removed {self.dir})"
        command = shlex.join([os.path.basename(sys.executable), sys.argv[0], "--resume", str(self.dir)])
        return (f"interrupted: the checkpoint of step {self.checkpoint_step:,} in {self.dir} is kept; "
                f"continue with: {command}")

    # --------------------------------------------------------------------------------------- training steps
    def steps(self, on_cpu: bool, measure_s: float = 60.0):
        """The gradient steps left to run, with a progress bar (average-rate ETA). On a CPU, after `measure_s`
        seconds, the projected time of the rest when it is an hour or more, with the CPU-scale command."""
        args, start = self.args, time.time()
        said = not on_cpu
        steps = range(self.start_step, args.total_steps)
        with signals_held():  # a Ctrl-C inside tqdm's constructor would leave a half-made bar that errs when collected
            bar = tqdm(steps, initial=self.start_step, total=args.total_steps, desc=self.name, mininterval=5.0, smoothing=0)
        for step in bar:
            if not said and time.time() - start >= measure_s and step > self.start_step:
                said = True
                hours = (args.total_steps - step) * (time.time() - start) / (step - self.start_step) / 3600
                if hours >= 1:
                    arm = " --augment synther" if getattr(args, "augment", None) == "synther" else ""
                    command = cpu_command(sys.argv[0], args.env_id) + (arm or ("" if args.dydiff else " --no-dydiff"))
                    advice = "" if args.preset == "cpu" else f"; a run sized for two CPU cores: {command}"
                    tqdm.write(f"no GPU: at its pace so far, the rest of this run takes about {hours:,.1f} h{advice}")
            yield step

    # --------------------------------------------------------------------------------------- logging
    def sps(self, step):
        """Gradient steps per second in this sitting."""
        return (step - self.start_step) / (time.time() - self.start_time)

    def wall_time(self):
        """Training seconds of this run, over all its sittings."""
        return self.time_before + time.time() - self.start_time

    def log(self, metrics, step, picture=None):
        """One record in metrics.jsonl (and W&B, with `picture` as an image)."""
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            if picture is not None:
                import wandb

                metrics = dict(metrics, **{"dydiff/trajectories": wandb.Image(str(picture))})
            self.wandb.log(metrics, step=step)

    def log_rollout(self, step, t0, rollout, data, check_env, synthetic, check_trajectories=64, picture_every=None):
        """Log one DyDiff rollout step (its measurements only; nothing here changes the training).

        `rollout` = (states, actions, rewards, scores, dones, keep, context), as the scripts' rollout step names them.
        The rollout's own figures (kept fraction, predicted returns, buffer size, terminals) and its time since `t0`
        (read after them, so it includes the device's work); on PointMaze (`check_env` given), what the kept
        trajectories carry against the real simulator (common.pointmaze.synthetic_data_metrics, on up to
        `check_trajectories` of them) and, every `picture_every` steps and at the run's first step, a picture of them
        over the maze with the share through a wall.
        """
        import time

        from common.pointmaze import maze_picture, synthetic_data_metrics

        states, actions, rewards, scores, dones, keep, context = rollout
        metrics = {
            "dydiff/kept_fraction": len(keep) / len(scores),
            "dydiff/return_kept": scores[keep].mean().item(),
            "dydiff/return_all": scores.mean().item(),
            "dydiff/synthetic_buffer_size": synthetic.size,
            "dydiff/terminal_fraction": dones.amax(1).mean().item(),
        }
        metrics["dydiff/rollout_time"] = time.time() - t0
        picture = None
        if check_env is not None:
            t0 = time.time()
            metrics.update(
                synthetic_data_metrics(data, check_env, states, actions, rewards, keep, context, check_trajectories, step)
            )
            metrics["dydiff/check_time"] = time.time() - t0
            if picture_every and (step % picture_every == 0 or step == self.start_step):
                picture = self.dir / f"synthetic_trajectories_{step:07d}.png"
                metrics["dydiff/wall_crossing_share"] = maze_picture(data, states, keep, picture)
        self.log(metrics, step, picture)

    def log_synther(self, data, samples, info):
        """Log SynthER's transitions once, before the first step (a resumed run has logged them already): how many the
        run trains on and how they were made, and how true they are against the real simulator and the task's reward
        (common.synther.transition_checks); the same in synther_report.json. Nothing here changes the training."""
        from common.synther import transition_checks

        if self.start_step > 0:
            return
        t0 = time.time()
        env = data.make_eval_env()
        metrics = {
            "synther/transitions": len(samples["obs"]),
            "synther/kept_fraction": len(samples["obs"]) / info["count"],
            **transition_checks(data, env, samples, seed=self.args.seed),
        }
        env.close()
        if info.get("generated"):
            metrics["synther/generation_time"] = info["generation_s"]
        metrics["synther/check_time"] = time.time() - t0
        tmp = self.dir / ".synther_report.json.tmp"
        tmp.write_text(json.dumps(dict(info, **metrics), indent=1))
        os.replace(tmp, self.dir / "synther_report.json")
        self.log(metrics, 0)
        shown = ("one_step_error", "one_step_error_copy", "wall_crossing_share", "reward_abs_error", "terminal_share")
        print(f"SynthER: training on {len(samples['obs']):,} generated transitions; checked against the real simulator: "
              + ", ".join(f"{k} {metrics['synther/' + k]:.4g}" for k in shown if "synther/" + k in metrics))

    def evaluated(self, scores, step, d4rl_scores=None):
        """Record an evaluation's normalized scores (one per episode; `d4rl_scores`: the same on D4RL maze2d-v1's
        scale, or None), print it, and write the checkpoint."""
        self.evaluations.append(float(scores.mean()))
        metrics = {"eval/normalized_score": float(scores.mean()), "eval/normalized_score_std": float(scores.std())}
        line = f"step {step:,}: normalized score {scores.mean():.1f} ± {scores.std():.1f}"
        if d4rl_scores is not None:
            self.d4rl_evaluations.append(float(d4rl_scores.mean()))
            metrics["eval/d4rl_normalized_score"] = float(d4rl_scores.mean())
            line += f" (D4RL maze2d-v1 scale: {d4rl_scores.mean():.1f})"
        self.log(metrics, step)
        print(line)
        atomic_save(
            dict(**{key: _state_dict(m) for key, m in self.state.items()}, rng=rng_state(self.generator), step=step,
                 evaluations=self.evaluations, d4rl_evaluations=self.d4rl_evaluations, wall_time_s=self.wall_time(),
                 metrics_bytes=self.metrics_file.tell()),
            self.dir / "checkpoint.pt",
            keep_previous=True,
        )
        self.checkpoint_step = step

    def finish(self, final_policy: dict, **result):
        """Write result.json (final score: the mean of the last 5 evaluations) and final_policy.pt."""
        args = self.args
        final = float(np.mean(self.evaluations[-5:])) if self.evaluations else float("nan")
        augment = getattr(args, "augment", "dydiff" if args.dydiff else "none")
        result = dict(env_id=args.env_id, seed=args.seed, augment=augment, dydiff=args.dydiff,
                      num_iterations=args.num_iterations,
                      **self.task, **result, final_normalized_score=final, evaluations=self.evaluations,
                      wall_time_s=self.wall_time(), total_steps=args.total_steps)
        if self.d4rl_evaluations:
            result.update(final_d4rl_normalized_score=float(np.mean(self.d4rl_evaluations[-5:])),
                          d4rl_evaluations=self.d4rl_evaluations)
        (self.dir / "result.json").write_text(json.dumps(result, indent=1))
        atomic_save(dict(**final_policy, args=asdict(args)), self.dir / "final_policy.pt")
        d4rl = result.get("final_d4rl_normalized_score")
        print(f"final normalized score (mean of the last 5 evaluations): {final:.1f}"
              + ("" if d4rl is None else f" (D4RL maze2d-v1 scale: {d4rl:.1f})") + f"; run folder {self.dir}")
        if self.wandb is not None:
            self.wandb.summary["final_normalized_score"] = final
            if d4rl is not None:
                self.wandb.summary["final_d4rl_normalized_score"] = d4rl
            self.wandb.finish()
        self.metrics_file.close()
