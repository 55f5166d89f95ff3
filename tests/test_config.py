"""common/config.py: presets (flags on the command line win), the nested pretraining config, the CPU cost line."""

import signal
from types import SimpleNamespace

import pytest
import torch

from common.config import PRESETS, PretrainConfig, apply_preset, rollout_cost_on_cpu
from common.edm import MinMaxNormalizer, build_denoiser
from common.runs import parse_args
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
    )
    state = torch.get_rng_state()
    line = rollout_cost_on_cpu(args, denoiser, normalizer, 4, 2, "dydiff_td3bc.py")
    assert torch.equal(state, torch.get_rng_state())
    assert "h on this CPU" in line and line.endswith("python dydiff_td3bc.py --env-id maze2d-large --preset cpu")
    args.total_steps = 500  # one rollout of a tiny network: far below an hour, nothing to say
    assert rollout_cost_on_cpu(args, denoiser, normalizer, 4, 2, "dydiff_td3bc.py") is None
