"""The DyDiff diffusion model: EDM denoiser, loss and Heun sampler with hard replacement (paper Eq. 4, Alg. 2).

A trajectory window x is a tensor [B, L, C] with C = S + A and row t = concat(s_t, a_t), every dimension
min/max-scaled to [-1, 1] (hence sigma_data = 0.5). The conditions are s_0 (row 0, state columns) and
every action; the DM generates s_1 .. s_{L-1}. Conditioning is by hard replacement: wherever
`cond_mask` is True the window holds the clean condition, in training and in every sampling step.

EDM: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Table 1 (preconditioning, loss weighting), Algorithm 2 (sampler). Network: the 1-D temporal U-Net of
Diffuser (Janner et al. 2022) / Decision Diffuser (Ajay et al. 2022).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def condition_mask(L: int, state_dim: int, action_dim: int, device=None) -> torch.Tensor:
    """Bool [L, C]: True at the conditioned entries, s_0 (row 0, state columns) and every action."""
    mask = torch.zeros(L, state_dim + action_dim, dtype=torch.bool, device=device)
    mask[0, :state_dim] = True
    mask[:, state_dim:] = True
    return mask


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped `shape`, with like's dtype and device, drawn from `generator` if given."""
    # A torch.Generator lives on one device: draw there, then move, so a CPU generator also seeds CUDA runs.
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


# ---------------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------------


class MinMaxNormalizer(nn.Module):
    """Per-dimension min/max scaling of [..., C] to [-1, 1]; the statistics are buffers (saved in state_dict)."""

    def __init__(self, low, high, eps: float = 1e-6):
        """low, high: per-dimension minimum and maximum [C]; a (near) constant dimension gets range 2."""
        super().__init__()
        low = torch.as_tensor(low, dtype=torch.float32).flatten()
        high = torch.as_tensor(high, dtype=torch.float32).flatten()
        if low.shape != high.shape:
            raise ValueError(f"low and high must have the same shape, got {tuple(low.shape)} and {tuple(high.shape)}")
        if bool((high < low).any()):
            raise ValueError("every high must be >= its low; pass the per-dimension min as low and max as high")
        # A constant dimension would divide by zero: widen it to [c - 1, c + 1], so c maps to 0 and back exactly.
        flat = (high - low) < eps
        centre = (high + low) / 2
        self.register_buffer("low", torch.where(flat, centre - 1.0, low))
        self.register_buffer("high", torch.where(flat, centre + 1.0, high))

    @classmethod
    def from_data(cls, x) -> "MinMaxNormalizer":
        """Normalizer fitted to data x [N, C] (NumPy array or tensor; leading dims are flattened)."""
        x = x.float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.float32)
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            raise ValueError("MinMaxNormalizer.from_data got no rows; pass data of shape [N, C] with N >= 1")
        return cls(x.min(dim=0).values, x.max(dim=0).values)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [..., C] from [low, high] to [-1, 1]."""
        return 2.0 * (x - self.low) / (self.high - self.low) - 1.0

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [..., C] from [-1, 1] back to [low, high]."""
        return (x + 1.0) / 2.0 * (self.high - self.low) + self.low


# ---------------------------------------------------------------------------------------------------------
# Network F: 1-D temporal U-Net (Diffuser / Decision Diffuser)
# ---------------------------------------------------------------------------------------------------------


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding [B] -> [B, dim] of a scalar (here EDM's c_noise)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> [B, dim]: sines then cosines at geometrically spaced frequencies 1 .. 1/10000."""
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * (-math.log(10000.0) / (half - 1)))
        args = t[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d (same length) -> GroupNorm(8) -> Mish, on [B, channels, L]."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 5, n_groups: int = 8, padding_mode: str = "zeros"
    ):
        super().__init__(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode=padding_mode),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )


class ResidualTemporalBlock(nn.Module):
    """Two Conv1dBlocks with the noise embedding added between them, plus a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, kernel_size: int = 5, padding_mode: str = "zeros"):
        super().__init__()
        self.block1 = Conv1dBlock(in_channels, out_channels, kernel_size, padding_mode=padding_mode)
        self.block2 = Conv1dBlock(out_channels, out_channels, kernel_size, padding_mode=padding_mode)
        self.embed_mlp = nn.Sequential(nn.Mish(), nn.Linear(embed_dim, out_channels))
        # A 1x1 conv only where the channel count changes, so the residual can be added.
        self.residual = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, in, L], emb [B, embed_dim] -> [B, out, L]."""
        h = self.block1(x) + self.embed_mlp(emb)[:, :, None]  # same shift at every time step
        return self.block2(h) + self.residual(x)


class TemporalUnet(nn.Module):
    """Diffuser's temporal U-Net F(x, noise): [B, L, C_in], [B] -> [B, L, C]; convolutions run over time.

    The defaults are the paper's network (Diffuser's layout). Two options change how the window's
    edges are modelled: `full_res_skip` also feeds the finest level's features (which see every row
    at full resolution, s_0 included) to the output block, and `padding_mode="replicate"` pads the
    time axis with the edge rows instead of zeros.
    """

    def __init__(
        self,
        transition_dim: int,
        dim: int = 128,
        dim_mults: tuple[int, ...] = (1, 4, 8),
        in_channels: int | None = None,
        full_res_skip: bool = False,
        padding_mode: str = "zeros",
    ):
        """transition_dim: C = S + A, the output width; dim: base width; dim_mults: width of each resolution
        level; in_channels: input width (default C; more when conditions come as extra channels)."""
        super().__init__()
        if padding_mode not in ("zeros", "replicate"):
            raise ValueError(f"padding_mode must be 'zeros' or 'replicate', got {padding_mode!r}")
        dims = [in_channels or transition_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.num_downsamples = len(dim_mults) - 1
        self.full_res_skip = full_res_skip
        self.padding_mode = padding_mode
        block = lambda d_in, d_out: ResidualTemporalBlock(d_in, d_out, dim, padding_mode=padding_mode)  # noqa: E731

        self.noise_mlp = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))

        self.downs = nn.ModuleList()
        for level, (d_in, d_out) in enumerate(in_out):
            is_last = level == len(in_out) - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        block(d_in, d_out),
                        block(d_out, d_out),
                        nn.Conv1d(d_out, d_out, 3, stride=2, padding=1, padding_mode=padding_mode)  # Downsample1d
                        if not is_last
                        else nn.Identity(),
                    ]
                )
            )

        self.mid1 = block(dims[-1], dims[-1])
        self.mid2 = block(dims[-1], dims[-1])

        # As in Diffuser, the up path has one level fewer than the down path (in_out[1:]): it undoes the
        # len(dim_mults) - 1 downsamplings and ends at width `dim`; the finest skip is used only with full_res_skip.
        self.ups = nn.ModuleList()
        for d_in, d_out in reversed(in_out[1:]):
            self.ups.append(
                nn.ModuleList(
                    [
                        block(d_out * 2, d_in),
                        block(d_in, d_in),
                        nn.ConvTranspose1d(d_in, d_in, 4, stride=2, padding=1),  # Upsample1d
                    ]
                )
            )

        final_in = dim * 2 if full_res_skip else dim
        self.final = nn.Sequential(Conv1dBlock(final_in, dim, padding_mode=padding_mode), nn.Conv1d(dim, transition_dim, 1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x [B, L, C_in], noise [B] (EDM's c_noise) -> [B, L, C]."""
        L = x.shape[1]
        # Each downsampling halves the time axis: pad it to a multiple of 2**num_downsamples, crop at the end.
        multiple = 2**self.num_downsamples
        pad = (-L) % multiple
        h = F.pad(x.transpose(1, 2), (0, pad), mode="constant" if self.padding_mode == "zeros" else "replicate")
        emb = self.noise_mlp(noise.reshape(-1).to(x.dtype).expand(x.shape[0]))

        skips = []
        for block1, block2, downsample in self.downs:
            h = block2(block1(h, emb), emb)
            skips.append(h)
            h = downsample(h)

        h = self.mid2(self.mid1(h, emb), emb)

        for block1, block2, upsample in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(block2(block1(h, emb), emb))

        if self.full_res_skip:
            h = torch.cat([h, skips.pop()], dim=1)
        return self.final(h)[:, :, :L].transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# EDM preconditioning, loss, sampler
# ---------------------------------------------------------------------------------------------------------


class EDMPrecond(nn.Module):
    """EDM denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around a network F(x, noise).

    With `cond_channels=(S, A)`, F also receives the conditions at their own scale as S + A extra input
    channels on every row: s_0 (repeated) and that row's action. Without them (the paper's network) the
    conditions reach F only through c_in x, scaled down with the noise level like everything else
    (c_in = 0.012 at sigma = 80). With `relative_states=S`, the denoiser works on the states relative to
    s_0: it subtracts s_0 from the first S columns of every row, denoises, and adds s_0 back. That is an
    exact change of variables (s_0 is clean), but it changes the prior: where F says nothing, the
    denoised state is s_0, not the data's mean. With `position_channels`, F also receives two channels
    that say where each row is: 1 / (1 + t) and 1 / (1 + L - 1 - t), which single out the rows next to
    s_0 and to the window's end (a convolution alone cannot tell them from the others). The conditions
    are read from x, which always holds them clean (hard replacement, in training and in sampling).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        cond_channels: tuple[int, int] | None = None,
        relative_states: int = 0,
        position_channels: bool = False,
    ):
        """net: F(x [B, L, C(+S+A)(+2)], noise [B]) -> [B, L, C]; sigma_data: std of the (normalized) data;
        cond_channels: (S, A) to give F the clean s_0 and actions as extra channels, None for the paper's F;
        relative_states: S to denoise the states relative to s_0, 0 for the paper's absolute states;
        position_channels: give F each row's distance to the window's first and last row."""
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.cond_channels = tuple(cond_channels) if cond_channels else None
        self.relative_states = relative_states
        self.position_channels = position_channels

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; sigma) for x [B, L, C] and sigma a float or a tensor broadcastable to [B]."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1).expand(x.shape[0], 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)  # c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()  # c_out = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in = 1 / (sigma**2 + sd**2).sqrt()  # c_in = 1 / sqrt(sigma^2 + sigma_data^2)
        c_noise = sigma.log().reshape(-1) / 4  # c_noise = ln(sigma) / 4
        shift = torch.zeros_like(x[:, :1])
        if self.relative_states:  # s_0 in the state columns, zero in the action columns
            shift = F.pad(x[:, :1, : self.relative_states], (0, x.shape[-1] - self.relative_states))
        net_in = c_in * (x - shift)
        if self.cond_channels:
            S, A = self.cond_channels
            s0 = x[:, :1, :S].expand(-1, x.shape[1], -1)
            net_in = torch.cat([net_in, s0, x[:, :, S : S + A]], dim=-1)
        if self.position_channels:
            t = torch.arange(x.shape[1], dtype=x.dtype, device=x.device)
            where = torch.stack([1 / (1 + t), 1 / (x.shape[1] - t)], dim=-1)  # 1/(1+t), 1/(1+L-1-t)
            net_in = torch.cat([net_in, where.expand(x.shape[0], -1, -1)], dim=-1)
        return c_skip * (x - shift) + c_out * self.net(net_in, c_noise) + shift


def build_denoiser(
    state_dim: int,
    action_dim: int,
    dim: int = 128,
    dim_mults: tuple[int, ...] = (1, 4, 8),
    sigma_data: float = 0.5,
    full_res_skip: bool = False,
    padding_mode: str = "zeros",
    cond_channels: bool = False,
    relative_states: bool = False,
    position_channels: bool = False,
) -> EDMPrecond:
    """The DM's denoiser: an EDMPrecond around a TemporalUnet. The defaults are the paper's network."""
    C = state_dim + action_dim
    net = TemporalUnet(
        C,
        dim=dim,
        dim_mults=tuple(dim_mults),
        in_channels=(2 * C if cond_channels else C) + (2 if position_channels else 0),
        full_res_skip=full_res_skip,
        padding_mode=padding_mode,
    )
    return EDMPrecond(
        net,
        sigma_data=sigma_data,
        cond_channels=(state_dim, action_dim) if cond_channels else None,
        relative_states=state_dim if relative_states else 0,
        position_channels=position_channels,
    )


def edm_loss(
    denoiser,
    x0: torch.Tensor,
    cond_mask: torch.Tensor,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paper Eq. 4: EDM loss on the generated entries only, conditions clean (hard-replaced) in the input.

    denoiser: D(x, sigma [B]) with attribute sigma_data (an EDMPrecond); x0 [B, L, C] clean windows;
    cond_mask [L, C] (or broadcastable to x0); valid [B, L] bool, False on padding rows, which are skipped;
    row_weight [L]: a weight per row, the loss then being the weighted mean (None: every row alike, the paper's).
    """
    B = x0.shape[0]
    cond_mask = cond_mask.to(x0.device)
    sigma = (P_mean + P_std * _randn([B, 1, 1], x0, generator)).exp()  # ln(sigma) ~ N(P_mean, P_std^2)
    noised = x0 + sigma * _randn(x0.shape, x0, generator)
    # The conditions are given clean at every noise level, in training as in sampling (hard replacement).
    noised = torch.where(cond_mask, x0, noised)
    D = denoiser(noised, sigma.reshape(B))
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2  # lambda(sigma), paper Table 3

    # Only the generated states of real rows count; torch.where (not a product) keeps NaN/inf out from the rest.
    counted = ~cond_mask.expand_as(x0)
    if valid is not None:
        counted = counted & valid.to(x0.device)[:, :, None]
    per_entry = torch.where(counted, weight * (D - x0) ** 2, torch.zeros_like(x0))
    if row_weight is None:
        return per_entry.sum() / counted.sum().clamp(min=1)
    row_weight = row_weight.to(x0)[None, :, None]
    return (per_entry * row_weight).sum() / (counted * row_weight).sum().clamp(min=1e-12)


@torch.no_grad()
def edm_sampler(
    denoiser,
    cond: torch.Tensor,
    cond_mask: torch.Tensor,
    num_steps: int = 34,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 60.0,
    S_min: float = 0.370,
    S_max: float = 52.212,
    S_noise: float = 1.002,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Paper Alg. 2: EDM's stochastic Heun sampler, with s_0 and the actions hard-replaced after every step.

    cond [B, L, C] holds the conditions (only its cond_mask entries are read); cond_mask [L, C].
    Returns windows [B, L, C] whose conditioned entries are exactly `cond`.
    """
    if num_steps < 2:
        raise ValueError(f"edm_sampler needs num_steps >= 2 (the schedule spans sigma_max..sigma_min), got {num_steps}")
    cond_mask = cond_mask.to(cond.device)

    def hard_replace(x):
        """The one DyDiff addition to EDM's sampler: put the clean s_0 and actions back."""
        return torch.where(cond_mask, cond, x)

    def batch_sigma(t):
        """The noise level t as one sigma per window, the denoiser's calling convention."""
        return torch.full((cond.shape[0],), t, dtype=cond.dtype, device=cond.device)

    # Time step discretization.
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (
        sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)]).tolist()  # t_N = 0

    # Main sampling loop. Unlike NVlabs (float64), x stays in cond's dtype: the network runs in it anyway.
    x_next = hard_replace(_randn(cond.shape, cond, generator) * t_steps[0])
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # 0, ..., N-1
        x_cur = x_next

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * _randn(cond.shape, cond, generator)
        x_hat = hard_replace(x_hat)

        # Euler step.
        denoised = denoiser(x_hat, batch_sigma(t_hat))
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        x_next = hard_replace(x_next)

        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised = denoiser(x_next, batch_sigma(t_next))
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
            x_next = hard_replace(x_next)

    return x_next


@torch.no_grad()
def refine_states(
    denoiser,
    normalizer: MinMaxNormalizer,
    s0: torch.Tensor,
    actions: torch.Tensor,
    num_steps: int = 34,
    S_churn: float = 60.0,
    generator: torch.Generator | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """One DM refinement of DyDiff (paper Alg. 1, step c): the states of a window given s_0 and the actions.

    s0 [B, S] and actions [B, L, A] in raw units; returns states [B, L, S] in raw units whose row 0 is s0
    exactly (not its normalize round trip). `bf16` runs the network in bfloat16 autocast; the sampler's
    own arithmetic stays float32.
    """
    B, L, A = actions.shape
    S = s0.shape[1]
    cond = torch.cat([s0[:, None, :].expand(B, L, S), actions], dim=-1)
    mask = condition_mask(L, S, A, device=s0.device)
    with torch.autocast(s0.device.type, dtype=torch.bfloat16, enabled=bf16):
        x = edm_sampler(denoiser, normalizer.normalize(cond), mask, num_steps=num_steps, S_churn=S_churn, generator=generator)
    return torch.cat([s0[:, None], normalizer.unnormalize(x)[:, 1:, :S]], dim=1)


# ---------------------------------------------------------------------------------------------------------
# EMA of weights
# ---------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's weights: ema <- decay * ema + (1 - decay) * model."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        """Start the average at a frozen copy of `model` (in eval mode)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards `model`'s current weights; buffers are copied as they are."""
        # One fused call over all parameters: a per-tensor loop launches hundreds of tiny kernels on a GPU.
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        """The averaged module's state_dict, loadable straight into a fresh model for sampling."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the averaged weights saved by state_dict()."""
        self.module.load_state_dict(state_dict)
