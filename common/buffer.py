"""The synthetic replay buffer D_syn of DyDiff: a FIFO ring buffer, preallocated on the device."""

import torch


class SyntheticBuffer:
    """FIFO ring buffer of synthetic transitions, preallocated on the device; add() never waits on the device."""

    def __init__(self, capacity, obs_dim, action_dim, device):
        self.capacity = capacity
        # One spare row at the end takes the writes of masked-out rows, so an insert needs no host sync.
        self.obs = torch.zeros(capacity + 1, obs_dim, device=device)
        self.actions = torch.zeros(capacity + 1, action_dim, device=device)
        self.rewards = torch.zeros(capacity + 1, device=device)
        self.next_obs = torch.zeros(capacity + 1, obs_dim, device=device)
        self.dones = torch.zeros(capacity + 1, device=device)
        self.ptr = torch.zeros((), dtype=torch.long, device=device)  # next slot to write
        self.count = torch.zeros((), dtype=torch.long, device=device)  # transitions held, <= capacity
        self.empty = True  # known on the host: sampling needs no sync either

    @property
    def size(self):
        """Transitions held (reads the device: for logs and checkpoints, not for the training loop)."""
        return int(self.count)

    def add(self, obs, actions, rewards, next_obs, dones, valid=None):
        """Append the rows where `valid` [n] is True (all if None), in order; once full, the oldest go."""
        if len(obs) == 0:
            return
        if valid is None:
            valid = torch.ones(len(obs), dtype=torch.bool, device=self.obs.device)
        rank = valid.long().cumsum(0)  # 1-based position among the valid rows
        total = rank[-1]
        fits = valid & (rank > total - self.capacity)  # only the newest `capacity` rows fit
        slot = torch.where(fits, (self.ptr + rank - 1) % self.capacity, self.capacity)
        for buf, x in (
            (self.obs, obs),
            (self.actions, actions),
            (self.rewards, rewards),
            (self.next_obs, next_obs),
            (self.dones, dones),
        ):
            buf[slot] = x.to(buf.dtype)
        self.ptr = (self.ptr + total) % self.capacity
        self.count = (self.count + total).clamp(max=self.capacity)
        self.empty = False

    def state_dict(self):
        """The stored rows only, as CPU copies (a slice alone would make torch.save write the whole buffer)."""
        s = self.size
        rows = {name: getattr(self, name)[:s].cpu().clone() for name in ("obs", "actions", "rewards", "next_obs", "dones")}
        return dict(capacity=self.capacity, size=s, ptr=int(self.ptr), **rows)

    def load_state_dict(self, d):
        s = int(d["size"])
        for name in ("obs", "actions", "rewards", "next_obs", "dones"):
            getattr(self, name)[:s] = d[name].to(self.obs.device)
        self.count.fill_(s)
        self.ptr.fill_(int(d["ptr"]))
        self.empty = s == 0
