"""common/buffer.py: the synthetic buffer D_syn is a FIFO ring, its masked insert equals inserting the rows."""

import torch

from common.buffer import SyntheticBuffer


def test_synthetic_buffer_is_fifo_and_round_trips_its_state():
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
