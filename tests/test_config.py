"""common/config.py: presets (flags on the command line win), the nested pretraining config, the CPU cost line."""

import re
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from common.config import PRESETS, PretrainConfig, apply_preset, cpu_cost_line
from common.runs import Run, parse_args
from dydiff_td3bc import Args


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """parse_args installs the scripts' Ctrl-C handlers: give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_cpu_preset_sets_what_the_command_line_does_not():
    args = parse_args(Args, ["--preset", "cpu", "--total-steps", "500", "--pretrain.dm-steps", "100"])
    assert (args.models_dir, args.total_steps, args.eval_freq, args.rollout_batch_size) == ("models-cpu", 500, 5000, 256)
    assert (args.pretrain.dm_dim, args.pretrain.dm_dim_mults, args.pretrain.dm_steps) == (32, (1, 2, 4), 100)
    paper = parse_args(Args, [])
    assert paper.models_dir == "models" and paper.total_steps == 1_000_000 and paper.pretrain == PretrainConfig()
    assert set(PRESETS) == {"paper", "cpu"} and PRESETS["paper"] == dict(pretrain={}, run={})


def test_pretrain_flags_are_the_values_that_differ_from_the_defaults():
    config = PretrainConfig()
    assert config.flags() == []
    apply_preset(config, PRESETS["cpu"]["pretrain"], [])
    config.dm_cond_channels, config.dm_padding = False, "zeros"
    flags = config.flags()
    assert flags[:6] == ["--dm-dim", "32", "--dm-dim-mults", "1", "2", "4"]
    assert "--no-dm-cond-channels" in flags and flags[flags.index("--dm-padding") + 1] == "zeros"
    assert "--reward-steps" not in flags  # 20,000 is the default too


def cost_args(models_dir, **kw):
    """A paper-size run's arguments, as cpu_cost_line reads them (a tiny DM shape, so that measuring is quick)."""
    base = dict(
        preset="paper",
        dydiff=True,
        num_iterations=1,
        rollout_states="dm",
        rollout_length=16,
        total_steps=10**9,
        rollout_freq=500,
        rollout_batch_size=2048,
        sampler_steps=34,
        env_id="maze2d-large",
        models_dir=str(models_dir),
        pretrain=PretrainConfig(dm_dim=8, dm_dim_mults=(1, 2)),
    )
    return SimpleNamespace(**{**base, **kw})


def test_the_cpu_cost_line_comes_before_pretraining_names_the_cpu_command_and_draws_no_random_numbers(tmp_path):
    args = cost_args(tmp_path)
    state = torch.get_rng_state()
    line = cpu_cost_line(args, 4, 2, "dydiff_td3bc.py")
    assert torch.equal(state, torch.get_rng_state())
    assert line.startswith("no GPU: this run's DM work takes about") and "pretraining the DM" in line
    assert line.endswith(". A run sized for two CPU cores: python dydiff_td3bc.py --env-id maze2d-large --preset cpu")
    # a DM made already: its sampling alone
    (tmp_path / "maze2d-large").mkdir()
    (tmp_path / "maze2d-large" / "dm.pt").write_bytes(b"")
    line = cpu_cost_line(args, 4, 2, "dydiff_td3bc.py")
    assert "pretraining" not in line and "the DM sampling of 2,000,000 rollout steps of 2,048 windows" in line
    assert "A run sized" not in cpu_cost_line(cost_args(tmp_path, preset="cpu"), 4, 2, "dydiff_td3bc.py")
    # runs that sample nothing from the DM have nothing to say
    for kw in (
        dict(rollout_states="simulator-replay"),
        dict(rollout_states="simulator"),
        dict(num_iterations=0),
        dict(dydiff=False),
    ):
        assert cpu_cost_line(cost_args(tmp_path, **kw), 4, 2, "dydiff_td3bc.py") is None
    # one rollout of two windows of a tiny network, the DM made: far below an hour (even 1000 times slower)
    assert cpu_cost_line(cost_args(tmp_path, total_steps=500, rollout_batch_size=2), 4, 2, "dydiff_td3bc.py") is None


def steps_of(total_steps, preset, on_cpu, capsys, dydiff=True):
    """Run.steps of a run at step 10 of `total_steps`, 20 steps of 5 ms; what it printed."""
    run = Run.__new__(Run)  # only what steps() reads
    run.args = SimpleNamespace(total_steps=total_steps, preset=preset, env_id="maze2d-large", dydiff=dydiff)
    run.start_step, run.name = 10, "run"
    for step in run.steps(on_cpu, measure_s=0.03):
        time.sleep(0.005)
        if step == 30:
            break
    return capsys.readouterr().out


def test_a_long_cpu_run_says_its_projected_time_and_the_cpu_command(capsys):
    out = steps_of(10**8, "paper", True, capsys)
    hours = float(re.search(r"takes about ([\d,.]+) h", out).group(1).replace(",", ""))
    assert 50 < hours < 1000  # 1e8 steps of ~5 ms (139 h), measured on a few steps
    assert out.rstrip().endswith("--env-id maze2d-large --preset cpu")
    assert steps_of(10**8, "paper", True, capsys, dydiff=False).rstrip().endswith("--preset cpu --no-dydiff")
    assert "a run sized for two CPU cores" not in steps_of(10**8, "cpu", True, capsys)  # already the CPU preset
    assert "no GPU" not in steps_of(10**8, "paper", False, capsys)  # on a GPU
    assert "no GPU" not in steps_of(1000, "paper", True, capsys)  # seconds, not hours
