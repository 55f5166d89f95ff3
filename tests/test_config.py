"""common/config.py: presets (flags on the command line win), the nested pretraining config, the CPU cost line."""

import re
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from common.config import PRESETS, PretrainConfig, apply_preset, rollout_cost_on_cpu
from common.edm import MinMaxNormalizer, build_denoiser
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


def test_the_cpu_cost_line_names_the_cpu_command_and_draws_no_random_numbers():
    denoiser = build_denoiser(4, 2, dim=8, dim_mults=(1, 2)).eval()
    normalizer = MinMaxNormalizer(-torch.ones(6), torch.ones(6))
    args = SimpleNamespace(
        preset="paper",
        num_iterations=1,
        rollout_length=16,
        total_steps=10**9,
        rollout_freq=500,
        rollout_batch_size=2048,
        sampler_steps=34,
        env_id="maze2d-large",
        rollout_states="dm",
    )
    state = torch.get_rng_state()
    line = rollout_cost_on_cpu(args, denoiser, normalizer, 4, 2, "dydiff_td3bc.py")
    assert torch.equal(state, torch.get_rng_state())
    assert "h on this CPU" in line and line.endswith("python dydiff_td3bc.py --env-id maze2d-large --preset cpu")
    for states in ("simulator-replay", "simulator"):  # the ablations sample nothing from the DM
        args.rollout_states = states
        assert rollout_cost_on_cpu(args, denoiser, normalizer, 4, 2, "dydiff_td3bc.py") is None
    args.rollout_states = "dm"
    # one rollout of two windows of a tiny network: far below an hour, nothing to say (even if a busy machine
    # makes the measurement 1000 times slower)
    args.total_steps, args.rollout_batch_size = 500, 2
    assert rollout_cost_on_cpu(args, denoiser, normalizer, 4, 2, "dydiff_td3bc.py") is None


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
