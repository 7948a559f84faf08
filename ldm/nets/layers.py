"""Building blocks of the latent-diffusion UNet (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", appendix G / Stable Diffusion).

Timestep embedding (Vaswani et al. 2017; Ho et al. 2020), residual blocks conditioned on the embedding
(Ho et al. 2020; Dhariwal & Nichol 2021), spatial transformers with self- and cross-attention and a GEGLU
feed-forward (Shazeer 2020), strided-conv downsampling and nearest+conv upsampling.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

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
        self.is_cross = context_dim is not None
        self.kv_cache: dict | None = None  # on inside ``cross_attention_cache``

    def _heads(self, t: Tensor) -> Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, h, N, d)

    def _keys_values(
        self, ctx: Tensor, mask: Tensor | None, drop_full_mask: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """k, v (B, h, L, d), the SDPA mask (B, 1, 1, L) or None and the (B,) rows with no real token (or
        None). ``drop_full_mask``: a mask that is all True is the same as none (a host sync to find out)."""
        k, v = self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        attn_mask = empty = None
        if mask is not None and not (drop_full_mask and bool(mask.all())):
            empty = ~mask.any(dim=1)  # (B,) samples with no real token
            # attend to every key in empty rows (avoids NaN), their output is zeroed below
            attn_mask = (mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, L)
        return k, v, attn_mask, empty

    @torch.compiler.disable
    def _cached_keys_values(
        self, ctx: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``_keys_values`` once per context tensor inside ``cross_attention_cache``: reused while the same
        tensor (same object, unmodified) comes back. Always eager, also in a compiled net (one graph break
        per cross-attention layer while sampling), so object ids never become guards of a compiled graph."""
        cache = self.kv_cache
        assert cache is not None
        key = (id(ctx), _version(ctx), None if mask is None else (id(mask), _version(mask)))
        if key in cache and cache[key][0]() is ctx and cache[key][1]() is mask:
            return cache[key][2]
        for dead in [k for k, entry in cache.items() if entry[0]() is None]:
            del cache[dead]  # contexts the caller has let go of
        found = self._keys_values(ctx, mask, drop_full_mask=True)
        cache[key] = (weakref.ref(ctx), (lambda: None) if mask is None else weakref.ref(mask), found)
        return found

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        q = self._heads(self.to_q(x))  # (B, h, N, d)
        if context is None:
            k, v, attn_mask, empty = self._heads(self.to_k(x)), self._heads(self.to_v(x)), None, None
        elif self.kv_cache is not None and not torch.is_grad_enabled():
            k, v, attn_mask, empty = self._cached_keys_values(context, mask)
        else:
            k, v, attn_mask, empty = self._keys_values(context, mask)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
            out = out.to(q.dtype)  # (B, h, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None, None], 0.0)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, C)


def _version(t: Tensor) -> int:
    """The tensor's in-place version counter; inference tensors (made under ``torch.inference_mode``) have
    none and cannot be changed in place outside it."""
    return -1 if t.is_inference() else t._version


@contextmanager
def cross_attention_cache(module: nn.Module) -> Iterator[None]:
    """Within the block, every cross-attention layer of ``module`` computes the keys and values of a context
    once and reuses them for as long as the same context tensor comes back, under no_grad only. Sampling
    calls the net 10-1,000 times with one fixed context (``CFGDenoiser`` builds the [uncond; cond] pair
    once), so this saves the two context projections per layer and step; outputs are unchanged. The caches
    are dropped on exit, so weights changed afterwards (training) are never met by stale keys."""
    layers = [m for m in module.modules() if isinstance(m, Attention) and m.is_cross]
    outer = [layer.kv_cache for layer in layers]  # a block inside another leaves the outer one's cache on
    for layer in layers:
        layer.kv_cache = {}
    try:
        yield
    finally:
        for layer, cache in zip(layers, outer, strict=True):
            layer.kv_cache = cache


class _GatedProjection(torch.autograd.Function):
    """``F.linear(value * gelu(gate), weight, bias)`` with (value, gate) = h.chunk(2): the same values as
    the three ops, but autograd keeps h and gelu(gate) (12C per token) and not the product too (16C): the
    feed-forward held 45% of the default UNet's saved activations. The product is recomputed in backward
    (one multiply); every gradient uses the ops autograd would (``aten.gelu_backward``)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        value, gate = h.chunk(2, dim=-1)  # 2 x (..., inner)
        gelu = F.gelu(gate)
        ctx.save_for_backward(h, gelu, weight)
        ctx.has_bias = bias is not None
        return F.linear(value * gelu, weight, bias)  # (..., C)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        h, gelu, weight = ctx.saved_tensors
        value, gate = h.chunk(2, dim=-1)  # 2 x (..., inner)
        d_product = grad @ weight.to(grad.dtype)  # (..., inner); autocast: weight cast like in forward
        d_h = torch.cat([d_product * gelu, torch.ops.aten.gelu_backward(d_product * value, gate)], dim=-1)
        d_weight = d_bias = None
        if ctx.needs_input_grad[1]:
            flat = grad.reshape(-1, grad.shape[-1])  # (T, C)
            d_weight = (flat.t() @ (value * gelu).reshape(flat.shape[0], -1)).to(weight.dtype)  # (C, inner)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)  # (C,)
        return d_h, d_weight, d_bias


class GEGLUFeedForward(nn.Module):
    """Transformer MLP with a GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer").

    Without dropout, the gate, product and output projection run as one ``_GatedProjection`` (half the
    saved activations); a wrapped ``proj_out`` (LoRA) or active dropout takes the plain three-op path."""

    def __init__(self, dim: int, dropout: float, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, inner * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj_in(x)  # (B, N, 2 * inner)
        plain_out = type(self.proj_out) is nn.Linear
        if plain_out and (self.dropout.p == 0 or not self.training) and torch.is_grad_enabled():
            return _GatedProjection.apply(h, self.proj_out.weight, self.proj_out.bias)  # (B, N, C)
        value, gate = h.chunk(2, dim=-1)  # 2 x (B, N, inner)
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


def vector_embedding(vector_dim: int, emb_dim: int) -> nn.Sequential:
    """(B, vector_dim) -> (B, emb_dim) added to the timestep embedding (SDXL's ``label_emb``, Podell et al.
    2023, Sec. 2.2; DiT's class embedder, Peebles & Xie 2023). Its last layer is zero-initialised, so a net
    that gains a vector input computes exactly what it computed without one until training moves it."""
    return nn.Sequential(nn.Linear(vector_dim, emb_dim), nn.SiLU(), zero_module(nn.Linear(emb_dim, emb_dim)))
