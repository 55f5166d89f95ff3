"""Run the grid env id x seed x algorithm x base/DyDiff, with W&B sweeps or without.

    python -m common.sweep --algo dydiff_td3bc --env-id maze2d-umaze --seed 1 --dydiff true   # one run
    python -m common.sweep --list [--shard K/N]                                               # the grid's commands

A W&B sweep agent calls the first form (see docs/many-seeds.md); --list prints one
shell command per grid point, optionally only shard K of N, for machines without W&B.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
from pathlib import Path

ALGOS = ("dydiff_td3bc", "dydiff_cql", "dydiff_diffql")
ENV_IDS = ("maze2d-umaze", "maze2d-medium", "maze2d-large")
SEEDS = (1, 2, 3)
ROOT = Path(__file__).resolve().parents[1]


def command(algo: str, env_id: str, seed: int, dydiff: bool, extra: list[str] = ()) -> list[str]:
    """The command line of one run of the grid."""
    if algo not in ALGOS:
        raise SystemExit(f"unknown --algo {algo!r}; known: {', '.join(ALGOS)}")
    cmd = [
        sys.executable,
        str(ROOT / f"{algo}.py"),
        "--env-id",
        env_id,
        "--seed",
        str(seed),
        "--exp-name",
        f"{algo}{'' if dydiff else '-base'}",
    ]
    return cmd + ([] if dydiff else ["--no-dydiff"]) + list(extra)


def grid(algos=ALGOS, env_ids=ENV_IDS, seeds=SEEDS):
    """Every (algo, env_id, seed, dydiff) of the grid, in a fixed order."""
    return list(itertools.product(algos, env_ids, seeds, (True, False)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=ALGOS)
    p.add_argument("--env-id")
    p.add_argument("--seed", type=int)
    p.add_argument("--dydiff", choices=("true", "false"), default="true")
    p.add_argument("--list", action="store_true", help="print the grid's commands instead of running one")
    p.add_argument("--shard", default="1/1", help="K/N: only every N-th grid point, starting at the K-th")
    p.add_argument("--algos", nargs="+", default=list(ALGOS))
    p.add_argument("--env-ids", nargs="+", default=list(ENV_IDS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    args, extra = p.parse_known_args(argv)  # anything else goes to the training script
    if args.list:
        k, n = (int(v) for v in args.shard.split("/"))
        if not 1 <= k <= n:
            raise SystemExit(f"--shard must be K/N with 1 <= K <= N, got {args.shard}")
        for i, (algo, env_id, seed, dydiff) in enumerate(grid(args.algos, args.env_ids, args.seeds)):
            if i % n == k - 1:
                print(shlex.join(command(algo, env_id, seed, dydiff, extra)))
        return
    if not (args.algo and args.env_id and args.seed is not None):
        raise SystemExit("one run needs --algo, --env-id and --seed (or use --list)")
    cmd = command(args.algo, args.env_id, args.seed, args.dydiff == "true", extra)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
