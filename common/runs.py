"""A training run's folder and logs: arguments, metrics, checkpoints, resume, the final result, W&B.

    runs/{env_id}__{exp_name}__{seed}__{time}/
        args.json            the run's arguments (--resume reads them back)
        metrics.jsonl        one JSON record per logged step
        checkpoint.pt        the training state at the last evaluation (written atomically)
        result.json          the evaluations and the final score, once the run has finished
        final_policy.pt      the final actor and its observation statistics
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common.checkpoints import atomic_save, load_checkpoint, rng_state, set_rng_state


def resumed_args(args, cls):
    """With `--resume RUN`, the arguments RUN started with (a killed run continues as it began); else `args`."""
    if not args.resume:
        return args
    run_dir = Path(args.resume)
    if not (run_dir / "checkpoint.pt").exists():
        raise SystemExit(f"--resume {run_dir}: no checkpoint.pt there; pass the folder of a run that has evaluated once")
    saved = json.loads((run_dir / "args.json").read_text())
    return cls(**{**saved, "resume": str(run_dir)})


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

    def __init__(self, args, state: dict, generator):
        self.args, self.state, self.generator = args, state, generator
        self.start_step, self.evaluations, self.time_before = 0, [], 0.0
        if args.resume:
            self.dir = Path(args.resume)
            ckpt = load_checkpoint(self.dir / "checkpoint.pt")
            for key, module in state.items():
                _load_state_dict(module, ckpt[key])
            set_rng_state(ckpt["rng"], generator)
            self.start_step, self.evaluations = ckpt["step"], ckpt["evaluations"]
            self.time_before = ckpt.get("wall_time_s", 0.0)  # training time of the earlier sittings
            print(f"resuming {self.dir} at step {self.start_step:,}")
        else:
            name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
            self.dir = Path(args.runs_dir) / name
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "args.json").write_text(json.dumps(asdict(args), indent=1))
        self.name = self.dir.name
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, group=args.wandb_group,
                                    config=vars(args), name=self.name, id=self.name.replace("/", "_")[-64:],
                                    resume="allow", save_code=True)
        self.metrics_file = open(self.dir / "metrics.jsonl", "a")
        self.start_time = time.time()

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

    def evaluated(self, scores, step):
        """Record an evaluation's normalized scores (one per episode), print it, and write the checkpoint."""
        self.evaluations.append(float(scores.mean()))
        self.log({"eval/normalized_score": float(scores.mean()), "eval/normalized_score_std": float(scores.std())}, step)
        print(f"step {step:,}: normalized score {scores.mean():.1f} ± {scores.std():.1f}")
        atomic_save(dict(**{key: _state_dict(m) for key, m in self.state.items()}, rng=rng_state(self.generator),
                         step=step, evaluations=self.evaluations, wall_time_s=self.wall_time()),
                    self.dir / "checkpoint.pt")

    def finish(self, final_policy: dict, **result):
        """Write result.json (final score: the mean of the last 5 evaluations) and final_policy.pt."""
        args = self.args
        final = float(np.mean(self.evaluations[-5:])) if self.evaluations else float("nan")
        result = dict(env_id=args.env_id, seed=args.seed, dydiff=args.dydiff, num_iterations=args.num_iterations,
                      **result, final_normalized_score=final, evaluations=self.evaluations,
                      wall_time_s=self.wall_time(), total_steps=args.total_steps)
        (self.dir / "result.json").write_text(json.dumps(result, indent=1))
        atomic_save(dict(**final_policy, args=asdict(args)), self.dir / "final_policy.pt")
        print(f"final normalized score (mean of the last 5 evaluations): {final:.1f}; run folder {self.dir}")
        if self.wandb is not None:
            self.wandb.summary["final_normalized_score"] = final
            self.wandb.finish()
        self.metrics_file.close()
