"""The seeds-and-tasks grid: its commands, sharding, and errors."""

import subprocess
import sys

import pytest

from common import sweep


def test_grid_covers_every_combination_once():
    points = sweep.grid()
    assert len(points) == len(set(points)) == 3 * 3 * 3 * 2


def test_commands_turn_dydiff_off_with_one_flag():
    on = sweep.command("dydiff_cql", "maze2d-large", 2, True, ["--track"])
    off = sweep.command("dydiff_cql", "maze2d-large", 2, False)
    assert on[1].endswith("dydiff_cql.py") and on[2:6] == ["--env-id", "maze2d-large", "--seed", "2"]
    assert "--no-dydiff" in off and "--no-dydiff" not in on and on[-1] == "--track"


def test_shards_split_the_grid_without_overlap(capsys):
    lines = []
    for k in (1, 2, 3):
        sweep.main(["--list", "--shard", f"{k}/3", "--track"])
        lines.append(capsys.readouterr().out.splitlines())
    assert sum(map(len, lines)) == 54 and len(set().union(*map(set, lines))) == 54
    assert all(line.endswith("--track") for shard in lines for line in shard)


def test_bad_input():
    with pytest.raises(SystemExit, match="unknown --algo"):
        sweep.command("dydiff_ppo", "maze2d-umaze", 1, True)
    out = subprocess.run([sys.executable, "-m", "common.sweep", "--algo", "dydiff_td3bc"], capture_output=True, text=True)
    assert out.returncode != 0 and "needs --algo, --env-id and --seed" in out.stderr


def test_a_wandb_agent_call_runs_the_right_script(monkeypatch):
    calls = []
    monkeypatch.setattr(sweep.os, "execv", lambda path, cmd: calls.append(cmd))
    # What `wandb agent` passes with command: [${env}, python, -m, common.sweep, ${args}]
    sweep.main(["--algo=dydiff_diffql", "--dydiff=false", "--env-id=maze2d-medium", "--seed=3", "--track"])
    (cmd,) = calls
    assert cmd[1].endswith("dydiff_diffql.py") and cmd[2:6] == ["--env-id", "maze2d-medium", "--seed", "3"]
    assert "--no-dydiff" in cmd and cmd[-1] == "--track"
