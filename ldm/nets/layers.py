"""Building blocks of the latent-diffusion UNet (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", appendix G / Stable Diffusion).

Timestep embedding (Vaswani et al. 2017; Ho et al. 2020), residual blocks conditioned on the embedding
(Ho et al. 2020; Dhariwal & Nichol 2021), spatial transformers with self- and cross-attention and a GEGLU
feed-forward (Shazeer 2020), strided-conv downsampling and nearest+conv upsampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[cos, sin]`` order.

    Matches diffusers' ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``:
    ``freq_i = max_period ** (-i / half)``, ``emb = [cos(t * freq), sin(t * freq)]`` (zero-padded if odd).
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(t.shape)}; pass one value per sample")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2 * half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def group_norm(channels: int, norm_groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``norm_groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(norm_groups, channels), channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter so the module starts as a no-op on its residual branch."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding by a per-channel shift (Ho et al. 2020).

    ``eps`` is the GroupNorm epsilon (diffusers' ``norm_eps``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float,
        norm_groups: int,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels, norm_groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017), self- or cross-.

    ``mask`` (B, L) bool, True = real token: masked keys get zero attention weight. A sample whose
    mask is all False attends to nothing, so its output is the output-projection bias only (no NaN).
    ``upcast=True`` computes q, k, v and the softmax in float32 when they are half precision
    (Stable Diffusion 2.x ``upcast_attention``); a no-op in float32.
    """

    def __init__(
        self, query_dim: int, context_dim: int | None, num_heads: int, dropout: float, upcast: bool = False
    ) -> None:
        super().__init__()
        if query_dim % num_heads != 0:
            raise ValueError(
                f"attention width {query_dim} is not divisible by num_heads={num_heads}; "
                "choose num_heads dividing model_channels * every channel_mult"
            )
        kv_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, query_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(dropout))

    def _heads(self, t: Tensor) -> Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, h, N, d)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context  # (B, L, D)
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        attn_mask = None
        empty = None
        if mask is not None:
            empty = ~mask.any(dim=1)  # (B,) samples with no real token
            # attend to every key in empty rows (avoids NaN), their output is zeroed below
            attn_mask = (mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, L)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
            out = out.to(q.dtype)  # (B, h, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None, None], 0.0)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, C)


class GEGLUFeedForward(nn.Module):
    """Transformer MLP with a GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, dropout: float, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, inner * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)  # 2 x (B, N, inner)
        return self.proj_out(self.dropout(value * F.gelu(gate)))  # (B, N, C)


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the context (if any), GEGLU feed-forward."""

    def __init__(
        self, dim: int, context_dim: int | None, num_heads: int, dropout: float, upcast: bool = False
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, num_heads, dropout, upcast)
        self.norm2: nn.LayerNorm | None = None
        self.attn2: Attention | None = None
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, context_dim, num_heads, dropout, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, dropout)

    def forward(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, C)
        if self.attn2 is not None and self.norm2 is not None:
            x = x + self.attn2(self.norm2(x), context, mask)  # (B, N, C)
        return x + self.ff(self.norm3(x))


def _projection(channels: int, use_linear: bool) -> nn.Module:
    """Channel projection: Linear on (B, N, C) tokens or 1x1 Conv2d on (B, C, H, W) maps."""
    return nn.Linear(channels, channels) if use_linear else nn.Conv2d(channels, channels, 1)


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map (Rombach et al. 2022, Sec. 3.3):
    GroupNorm, 1x1 proj in, transformer block(s), zero-initialised 1x1 proj out, residual.

    ``depth`` stacks transformer blocks: the first is ``block`` and the others ``extra_blocks`` (so the
    depth-1 state-dict keys are unchanged). ``use_linear=True`` projects in and out with Linear layers
    on the (B, H*W, C) tokens instead of 1x1 convolutions (Stable Diffusion 2.x ``use_linear_projection``).
    """

    def __init__(
        self,
        channels: int,
        context_dim: int | None,
        num_heads: int,
        dropout: float,
        norm_groups: int,
        depth: int = 1,
        use_linear: bool = False,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"transformer depth must be >= 1, got {depth}")
        self.use_linear = use_linear
        self.norm = group_norm(channels, norm_groups, eps=1e-6)
        self.proj_in = _projection(channels, use_linear)
        self.block = TransformerBlock(channels, context_dim, num_heads, dropout, upcast)
        self.extra_blocks = nn.ModuleList(
            TransformerBlock(channels, context_dim, num_heads, dropout, upcast) for _ in range(depth - 1)
        )
        self.proj_out = zero_module(_projection(channels, use_linear))

    def forward(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)  # (B, C, H, W)
        if not self.use_linear:
            t = self.proj_in(t)  # (B, C, H, W)
        t = t.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            t = self.proj_in(t)  # (B, H*W, C)
        t = self.block(t, context, mask)  # (B, H*W, C)
        for block in self.extra_blocks:
            t = block(t, context, mask)  # (B, H*W, C)
        if self.use_linear:
            t = self.proj_out(t)  # (B, H*W, C)
        t = t.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        if not self.use_linear:
            t = self.proj_out(t)  # (B, C, H, W)
        return x + t


def check_backbone_inputs(
    net: nn.Module,
    x: Tensor,
    c_noise: Tensor,
    context: Tensor | None,
    context_mask: Tensor | None,
    *,
    multiple: int,
    size_fix: str,
) -> tuple[Tensor, Tensor | None]:
    """The checks every backbone makes on ``forward``'s inputs (UNet, DiT), one-line errors naming the fix.

    ``multiple``: what the latent's height and width must be divisible by (``size_fix`` says how to get
    there). Returns c_noise (B,) and the mask as bool (B, L) or None."""
    name = type(net).__name__
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != net.in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but the {name} expects in_channels={net.in_channels}; "
            "set net.in_channels to the autoencoder's latent channels"
        )
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by {size_fix}")
    b = x.shape[0]
    c_noise = c_noise.reshape(-1)
    if c_noise.numel() == 1:
        c_noise = c_noise.expand(b)
    if c_noise.numel() != b:
        raise ValueError(f"c_noise must have shape (B,) = ({b},), got {c_noise.numel()} values")
    if net.context_dim is None:
        if context is not None:
            raise ValueError(
                f"context given to an unconditional {name}; set net.context_dim to the conditioner's "
                "output dim or do not pass context"
            )
        return c_noise, None
    if context is None:
        raise ValueError(f"{name} has context_dim={net.context_dim} but no context was passed")
    if context.ndim != 3 or context.shape[0] != b:
        raise ValueError(f"context must be (B={b}, L, D), got shape {tuple(context.shape)}")
    if context.shape[-1] != net.context_dim:
        raise ValueError(
            f"context last dim is {context.shape[-1]} but the {name} has context_dim={net.context_dim}; "
            "set net.context_dim to the conditioner's output dim"
        )
    if context_mask is None:
        return c_noise, None
    if context_mask.shape != context.shape[:2]:
        raise ValueError(
            f"context_mask must be (B, L) = {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
        )
    if context_mask.is_floating_point():
        raise ValueError("context_mask must be bool (True = real token) or integer 1/0, not float")
    return c_noise, context_mask.bool()


def check_vector_and_concat(net: nn.Module, x: Tensor, vector: Tensor | None, concat: Tensor | None) -> None:
    """The checks on the two optional inputs (``ldm.interfaces.COND_KEYS``): the pooled/size/label ``vector``
    added to the timestep embedding and the ``concat`` channels joined to x; one-line errors naming the
    fix."""
    name = type(net).__name__
    if (vector is None) != (net.vector_dim is None):
        raise ValueError(
            f"{name} has vector_dim={net.vector_dim} but {'no' if vector is None else 'a'} vector was "
            f"passed: set "
            "net.vector_dim to the summed output_dim of the conditioners with output=vector (null when there "
            "are none)"
        )
    if vector is not None and (vector.ndim != 2 or vector.shape != (x.shape[0], net.vector_dim)):
        raise ValueError(
            f"vector must be (B, vector_dim) = ({x.shape[0]}, {net.vector_dim}), got {tuple(vector.shape)}: "
            "set net.vector_dim to the summed output_dim of the vector conditioners"
        )
    if (concat is None) != (net.concat_channels == 0):
        raise ValueError(
            f"{name} has concat_channels={net.concat_channels} but {'no' if concat is None else 'a'} concat "
            f"input was "
            "passed: set net.concat_channels to the channels of the output=concat conditioners (0 when there "
            "are none)"
        )
    if concat is not None and concat.shape != (x.shape[0], net.concat_channels, *x.shape[2:]):
        raise ValueError(
            f"concat must be (B, concat_channels, h, w) = {(x.shape[0], net.concat_channels, *x.shape[2:])}, "
            f"got {tuple(concat.shape)}: give the concat conditioner inputs at the latent size"
        )


def vector_embedding(vector_dim: int, emb_dim: int) -> nn.Sequential:
    """(B, vector_dim) -> (B, emb_dim) added to the timestep embedding (SDXL's ``label_emb``, Podell et al.
    2023, Sec. 2.2; DiT's class embedder, Peebles & Xie 2023). Its last layer is zero-initialised, so a net
    that gains a vector input computes exactly what it computed without one until training moves it."""
    return nn.Sequential(nn.Linear(vector_dim, emb_dim), nn.SiLU(), zero_module(nn.Linear(emb_dim, emb_dim)))
