"""dydiff_td3bc.py's own parts: making missing models first, the speed switches, the TD3+BC update.

What the three scripts share is tested in test_scripts.py."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from script_runs import TINY, metrics, run_script

from common.cudagraphs import cuda_graphed
from dydiff_td3bc import Actor, Critic, make_update_fns


def run(*args, **kwargs):
    return run_script("dydiff_td3bc.py", *args, **kwargs)


def test_dydiff_mode_pretrains_the_missing_models_first(tmp_path):
    models, runs = tmp_path / "models", tmp_path / "runs"
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--total-steps", "20", "--eval-freq", "20")
    assert "no pretrained models" in out.stdout and "pretrain_models.py --env-id maze2d-umaze" in out.stdout
    assert "--rollout-length 16" in out.stdout
    assert all((models / "maze2d-umaze" / f).exists() for f in ("dm.pt", "dynamics.pt", "reward.pt"))
    assert json.loads((next(runs.glob("*")) / "result.json").read_text())["total_steps"] == 20


def test_speed_switches_keep_the_run_working_on_cpu(tiny_models, tmp_path):
    out = run(
        *TINY,
        "--models-dir",
        str(tiny_models),
        "--runs-dir",
        str(tmp_path),
        "--exp-name",
        "switches",
        "--compile-dm",
        "--cudagraphs",
        "--total-steps",
        "60",
        "--eval-freq",
        "60",
    )
    assert "--cudagraphs needs a GPU: the update runs eagerly" in out.stdout
    m = metrics(next(tmp_path.glob("*switches__*")))
    rollouts = [r for r in m if "dydiff/kept_fraction" in r]
    assert [r["step"] for r in rollouts] == [0, 50] and rollouts[-1]["dydiff/synthetic_buffer_size"] == 2 * 19 * 15


# ----------------------------------------------------------------------------- the update step
def _trainer(device="cpu", capturable=False, seed=0):
    from types import SimpleNamespace

    torch.manual_seed(seed)
    hp = SimpleNamespace(policy_noise=0.0, noise_clip=0.5, gamma=0.99, alpha=2.5, tau=0.005)  # no noise: deterministic
    actor, qf1, qf2 = Actor(3, 2, 1.0), Critic(3, 2), Critic(3, 2)
    targets = [Actor(3, 2, 1.0), Critic(3, 2), Critic(3, 2)]
    for t, n in zip(targets, (actor, qf1, qf2)):
        t.load_state_dict(n.state_dict())
    nets = [m.to(device) for m in (actor, qf1, qf2, *targets)]
    q_opt = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=1e-3, capturable=capturable)
    a_opt = torch.optim.Adam(actor.parameters(), lr=1e-3, capturable=capturable)
    stats = torch.zeros(3, device=device), torch.ones(3, device=device)
    return nets, (q_opt, a_opt), make_update_fns(*nets, q_opt, a_opt, hp, 1.0, *stats)


def _batch(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    b = dict(
        obs=torch.randn(64, 3, generator=g),
        actions=torch.rand(64, 2, generator=g) * 2 - 1,
        rewards=torch.randn(64, generator=g),
        next_obs=torch.randn(64, 3, generator=g),
        dones=torch.zeros(64),
    )
    return {k: v.to(device) for k, v in b.items()}


def test_update_moves_the_critics_and_polyaks_the_targets():
    nets, _, (update_critic, update_actor) = _trainer()
    actor, qf1, _, actor_t, qf1_t, _ = nets
    batch = _batch(0)
    losses = [update_critic(batch)[0].item() for _ in range(30)]
    assert losses[-1] < losses[0]  # the critic learns the fixed batch's TD targets
    before = [p.clone() for p in actor_t.parameters()] + [p.clone() for p in qf1_t.parameters()]
    update_actor(batch)
    after = list(actor_t.parameters()) + list(qf1_t.parameters())
    online = list(actor.parameters()) + list(qf1.parameters())
    for b, a, o in zip(before, after, online):  # target <- (1 - tau) target + tau online, for every parameter
        torch.testing.assert_close(a, 0.995 * b + 0.005 * o)
        assert not torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphed_update_takes_the_same_steps_as_the_eager_one():
    eager_nets, _, (ec, ea) = _trainer("cuda")
    graph_nets, opts, (gc, ga) = _trainer("cuda", capturable=True)
    gc, ga = cuda_graphed(gc, graph_nets, opts), cuda_graphed(ga, graph_nets, opts)
    for i in range(6):
        batch = _batch(i, "cuda")
        torch.testing.assert_close(gc(batch)[0], ec(batch)[0])
        if i % 2 == 0:
            torch.testing.assert_close(ga(batch)[0], ea(batch)[0])
    for e, g in zip(eager_nets, graph_nets):
        for pe, pg in zip(e.parameters(), g.parameters()):
            torch.testing.assert_close(pg, pe)


def test_the_critic_on_real_and_synthetic_transitions():
    from dydiff_td3bc import critic_on_real_and_synthetic

    batch = {"obs": torch.arange(6, dtype=torch.float32)[:, None], "actions": torch.zeros(6, 2)}
    qf = lambda obs, actions: obs[:, 0] * 2  # noqa: E731  (Q = 2 * the normalized observation)
    out = critic_on_real_and_synthetic(qf, batch, 2, torch.tensor([1.0]), torch.tensor([0.5]))
    assert out == {"losses/q_real": pytest.approx(4 * 1.5 - 4), "losses/q_synthetic": pytest.approx(4 * 4.5 - 4)}
    assert critic_on_real_and_synthetic(qf, batch, 0, torch.tensor([0.0]), torch.tensor([1.0])) == {"losses/q_real": 5.0}
