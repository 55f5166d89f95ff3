"""dydiff_td3bc.py: subprocess runs in base, M = 0 and DyDiff modes, resume, bad inputs; its DyDiff pieces."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from script_runs import TINY, kill_after_first_checkpoint, metrics, models_for_other_data, run_script  # noqa: E402
from common.buffer import SyntheticBuffer  # noqa: E402
from common.cudagraphs import cuda_graphed  # noqa: E402
from dydiff_td3bc import Actor, Critic, alive_mask, filter_trajectories, make_update_fns, mixed_batch  # noqa: E402



def run(*args, **kwargs):
    return run_script("dydiff_td3bc.py", *args, **kwargs)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def dydiff_run(dirs):
    models, runs = dirs
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "dydiff",
              "--total-steps", "120", "--eval-freq", "60")
    return next(runs.glob("*dydiff__*")), out


def test_dydiff_mode_pretrains_first_then_trains_and_logs(dydiff_run, dirs):
    run_dir, out = dydiff_run
    assert "no pretrained models" in out.stdout and "pretrain_models.py --env-id maze2d-umaze" in out.stdout
    assert (dirs[0] / "maze2d-umaze" / "dm.pt").exists()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["total_steps"] == 120 and len(result["evaluations"]) == 2 and result["num_iterations"] == 1
    assert result["final_normalized_score"] == pytest.approx(np.mean(result["evaluations"]))
    m = metrics(run_dir)
    rollouts = [r for r in m if "dydiff/kept_fraction" in r]
    assert [r["step"] for r in rollouts] == [0, 50, 100]
    # eta = 0.6 of B_r = 32 kept: floor(19.2) = 19 trajectories of up to L-1 = 15 transitions each
    assert all(r["dydiff/kept_fraction"] == 19 / 32 for r in rollouts)
    assert rollouts[0]["dydiff/synthetic_buffer_size"] == 19 * 15
    assert rollouts[-1]["dydiff/synthetic_buffer_size"] == 3 * 19 * 15
    assert 0.0 <= rollouts[0]["dydiff/wall_crossing_share"] <= 1.0
    assert any("eval/normalized_score" in r for r in m) and any("charts/SPS" in r for r in m)
    assert (run_dir / "synthetic_trajectories.png").stat().st_size > 1000
    assert (run_dir / "final_policy.pt").exists()


def test_base_and_single_step_modes(dydiff_run, dirs):
    models, runs = dirs
    run(*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "base", "--no-dydiff",
        "--total-steps", "60", "--eval-freq", "60")
    base = next(runs.glob("*base__*"))
    assert not any("dydiff/kept_fraction" in r for r in metrics(base))
    assert json.loads((base / "result.json").read_text())["dydiff"] is False
    wandb_dir = runs / "wandb-files"
    wandb_dir.mkdir()
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "m0", "--num-iterations", "0",
              "--total-steps", "60", "--eval-freq", "60", "--track", env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)})
    assert list(wandb_dir.glob("wandb/offline-run-*")), "--track logs to W&B (offline here)"
    assert "no pretrained models" not in out.stdout  # found by dataset
    m0 = next(runs.glob("*m0__*"))
    assert json.loads((m0 / "result.json").read_text())["num_iterations"] == 0
    assert any("dydiff/rollout_time" in r for r in metrics(m0))


def test_speed_switches_keep_the_run_working_on_cpu(dydiff_run, dirs):
    models, runs = dirs
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "switches", "--compile-dm",
              "--cudagraphs", "--total-steps", "60", "--eval-freq", "60")
    assert "--cudagraphs needs a GPU: the update runs eagerly" in out.stdout
    m = metrics(next(runs.glob("*switches__*")))
    rollouts = [r for r in m if "dydiff/kept_fraction" in r]
    assert [r["step"] for r in rollouts] == [0, 50] and rollouts[-1]["dydiff/synthetic_buffer_size"] == 2 * 19 * 15


def test_kill_and_resume_reaches_the_same_final_step(dydiff_run, dirs):
    models, runs = dirs
    args = [*TINY, "--models-dir", str(models), "--runs-dir", str(runs), "--exp-name", "killed",
            "--total-steps", "1500", "--eval-freq", "100"]
    run_dir = kill_after_first_checkpoint("dydiff_td3bc.py", args, runs, "killed")
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert 0 < ckpt["step"] < 1500, "the run was killed before it finished"
    buf = ckpt["synthetic"]
    assert buf["size"] > 0 and buf["obs"].shape == (buf["size"], 6) and torch.isfinite(buf["obs"]).all()
    out = run("--resume", str(run_dir), "--total-steps", "1")  # the saved arguments win over the command line
    assert f"resuming {run_dir} at step {ckpt['step']:,}" in out.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["total_steps"] == 1500 and len(result["evaluations"]) == 15
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert final["step"] == 1500 and final["synthetic"]["size"] >= buf["size"]
    np.testing.assert_array_equal(final["evaluations"][: len(ckpt["evaluations"])], ckpt["evaluations"])


def test_bad_inputs_end_in_one_clear_message(dydiff_run, dirs, tmp_path):
    models, runs = dirs
    out = run("--env-id", "maze2d-huge", "--runs-dir", str(tmp_path), check=False)
    assert out.returncode != 0 and "unknown --env-id 'maze2d-huge'" in out.stderr and "Traceback" not in out.stderr
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(tmp_path), "--real-ratio", "1.5", check=False)
    assert out.returncode != 0 and "--real-ratio must be in [0, 1]" in out.stderr and "Traceback" not in out.stderr
    out = run(*TINY, "--models-dir", str(models), "--runs-dir", str(tmp_path), "--sampler-steps", "1", "--sampler-churn", "-1",
              check=False)
    assert out.returncode != 0 and "--sampler-steps must be >= 2" in out.stderr and "--sampler-churn must be >= 0" in out.stderr
    # Models made for another dataset (a different seed of the generated maze) are refused.
    other = models_for_other_data(models, tmp_path / "other-models")
    out = run(*TINY, "--models-dir", str(other), "--runs-dir", str(tmp_path), check=False)
    assert out.returncode != 0 and "was trained on dataset local/pointmaze/umaze-other-v2" in out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- DyDiff pieces
def test_hardmax_keeps_exactly_the_top_floor_eta_b():
    scores = torch.randperm(100).float()
    keep = filter_trajectories(scores, 0.6, "hardmax", 0.05)
    assert len(keep) == 60
    assert sorted(scores[keep].tolist()) == list(range(40, 100))
    assert len(filter_trajectories(torch.randn(7), 0.6, "hardmax", 0.05)) == 4  # floor(4.2)


def test_softmax_filter_limits():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200)
    top = set(filter_trajectories(scores, 0.3, "hardmax", 0.05).tolist())
    for _ in range(5):  # a tiny temperature is hardmax
        assert set(filter_trajectories(scores, 0.3, "softmax", 1e-4, g).tolist()) == top
    counts = torch.zeros(200)
    for _ in range(400):  # a huge temperature is near uniform: every trajectory kept ~30% of the time
        counts[filter_trajectories(scores, 0.3, "softmax", 1e6, g)] += 1
    freq = counts / 400
    assert abs(freq.mean().item() - 0.3) < 1e-6
    assert freq.min() > 0.15 and freq.max() < 0.45
    assert np.corrcoef(freq.numpy(), scores.numpy())[0, 1] < 0.3
    # keeps distinct trajectories (without replacement)
    keep = filter_trajectories(scores, 0.5, "softmax", 0.05, g)
    assert len(keep) == len(set(keep.tolist())) == 100


def test_batch_mix_follows_the_real_ratio():
    g = torch.Generator().manual_seed(0)
    real = {k: torch.zeros(1000, *s) for k, s in
            (("obs", (3,)), ("actions", (2,)), ("rewards", ()), ("next_obs", (3,)), ("dones", ()))}
    syn = SyntheticBuffer(500, 3, 2, "cpu")
    batch, n_syn = mixed_batch(real, syn, 256, 0.6, g)
    assert n_syn == 0 and batch["obs"].shape == (256, 3)  # empty D_syn: all real
    syn.add(torch.ones(400, 3), torch.ones(400, 2), torch.ones(400), torch.ones(400, 3), torch.zeros(400))
    for ratio, expected_syn in ((0.6, 102), (1.0, 0), (0.0, 256)):
        batch, n_syn = mixed_batch(real, syn, 256, ratio, g)
        assert n_syn == expected_syn and batch["rewards"].sum().item() == expected_syn  # synthetic rewards are 1


def test_synthetic_buffer_is_fifo():
    buf = SyntheticBuffer(5, 1, 1, "cpu")
    for start in (0, 3, 6):
        v = torch.arange(start, start + 3).float()
        buf.add(v[:, None], v[:, None], v, v[:, None], torch.zeros(3))
    assert buf.size == 5
    assert buf.rewards[:5].tolist() == [5.0, 6.0, 7.0, 8.0, 4.0]  # the oldest four are gone, ring order
    restored = SyntheticBuffer(5, 1, 1, "cpu")
    restored.load_state_dict(buf.state_dict())
    assert torch.equal(restored.rewards[:5], buf.rewards[:5]) and int(restored.ptr) == int(buf.ptr) == 4
    assert not restored.empty and restored.size == 5


def test_masked_insert_equals_inserting_the_selected_rows():
    g = torch.Generator().manual_seed(0)
    masked, selected = SyntheticBuffer(50, 2, 1, "cpu"), SyntheticBuffer(50, 2, 1, "cpu")
    for n in (7, 30, 1, 40, 12):  # wraps around several times, one insert larger than what it keeps
        x = torch.randn(n, 2, generator=g)
        valid = torch.rand(n, generator=g) < 0.6
        valid[0] = True
        masked.add(x, x[:, :1], x[:, 0], -x, x[:, 1] > 0, valid=valid)
        selected.add(x[valid], x[valid, :1], x[valid, 0], -x[valid], x[valid, 1] > 0)
        assert masked.size == selected.size and int(masked.ptr) == int(selected.ptr)
        for name in ("obs", "actions", "rewards", "next_obs", "dones"):
            assert torch.equal(getattr(masked, name)[:50], getattr(selected, name)[:50])
    big = SyntheticBuffer(4, 1, 1, "cpu")  # more valid rows than the capacity: the newest 4 are kept
    v = torch.arange(10.0)
    big.add(v[:, None], v[:, None], v, v[:, None], torch.zeros(10), valid=v % 2 == 0)
    assert big.size == 4 and sorted(big.rewards[:4].tolist()) == [2.0, 4.0, 6.0, 8.0]


def test_mixed_batch_draws_only_stored_synthetic_rows():
    g = torch.Generator().manual_seed(0)
    real = {k: torch.zeros(100, *s) for k, s in
            (("obs", (1,)), ("actions", (1,)), ("rewards", ()), ("next_obs", (1,)), ("dones", ()))}
    syn = SyntheticBuffer(1000, 1, 1, "cpu")
    v = torch.arange(1.0, 4.0)  # three rows, rewards 1, 2, 3; the other 997 slots stay zero
    syn.add(v[:, None], v[:, None], v, v[:, None], torch.zeros(3))
    drawn = torch.cat([mixed_batch(real, syn, 100, 0.0, g)[0]["rewards"] for _ in range(20)])
    assert set(drawn.tolist()) == {1.0, 2.0, 3.0}


def test_synthetic_trajectories_stop_at_their_first_terminal():
    dones = torch.tensor([[0, 0, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0.0]])
    np.testing.assert_array_equal(alive_mask(dones).numpy(), [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])


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
    b = dict(obs=torch.randn(64, 3, generator=g), actions=torch.rand(64, 2, generator=g) * 2 - 1,
             rewards=torch.randn(64, generator=g), next_obs=torch.randn(64, 3, generator=g), dones=torch.zeros(64))
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
