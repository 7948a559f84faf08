"""Conditional UNet of latent diffusion (Rombach et al. 2022, Sec. 3.3 and appendix G; the Stable
Diffusion backbone): an encoder/middle/decoder of timestep-conditioned ResBlocks with skip connections
(Ronneberger et al. 2015; Ho et al. 2020), spatial transformers with cross-attention to a text context at
the chosen resolutions, zero-initialised output convolution.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nets.checks import check_backbone_inputs, check_vector_and_concat
from ldm.nets.layers import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
    group_norm,
    timestep_embedding,
    vector_embedding,
    zero_module,
)

log = logging.getLogger(__name__)


class UNet(nn.Module):
    """``forward(x, c_noise, context, context_mask, vector, concat) -> Tensor`` of the shape of ``x`` with
    ``out_channels`` (the inputs are ``ldm.interfaces.COND_KEYS``).

    ``attention_resolutions`` lists downsampling factors (1 = input resolution, 2 = after one
    downsample, ...) whose levels get a spatial transformer after each ResBlock; the middle block
    always has one. ``context_dim=None`` builds an unconditional UNet (self-attention only).

    Options for Stable Diffusion 1.x/2.x layouts (``ldm.convert.diffusers_unet`` maps diffusers' names):
    ``num_head_channels`` (if set) fixes the width per head instead of the head count, so each level
    gets ``channels // num_head_channels`` heads (SD 2.x: 64; overrides ``num_heads``);
    ``transformer_depth`` stacks transformer blocks in every spatial transformer;
    ``use_linear_projection`` projects in/out of the transformers with Linear layers (SD 2.x);
    ``upcast_attention`` runs half-precision attention in float32; ``norm_eps`` is the GroupNorm epsilon
    of the ResBlocks and the output norm (the transformers' GroupNorm keeps 1e-6, as in SD).

    ``vector_dim`` (pooled text, size micro-conditioning, labels; SDXL's ``adm_in_channels``) adds a
    zero-initialised MLP of ``vector`` to the timestep embedding; ``concat_channels`` widens the first
    convolution for ``concat`` inputs (inpainting: masked-image latent + mask, C + 1). Both default to off,
    and then the state dict is the one without them.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (1, 2),
        num_heads: int = 4,
        context_dim: int | None = 384,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        norm_groups: int = 32,
        num_head_channels: int | None = None,
        transformer_depth: int = 1,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        vector_dim: int | None = None,
        concat_channels: int = 0,
    ) -> None:
        super().__init__()
        if len(channel_mult) == 0 or num_res_blocks < 1:
            raise ValueError("channel_mult must be non-empty and num_res_blocks >= 1")
        if num_head_channels is not None and num_head_channels < 1:
            raise ValueError(f"num_head_channels must be None or >= 1, got {num_head_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = tuple(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.concat_channels = int(concat_channels)
        self.dropout = dropout
        self.norm_groups = norm_groups
        self.transformer_depth = transformer_depth
        self.use_linear_projection = use_linear_projection
        self.upcast_attention = upcast_attention
        self.norm_eps = norm_eps
        self.gradient_checkpointing = gradient_checkpointing
        emb_dim = 4 * model_channels
        # (B, model_channels) sinusoid -> (B, 4 * model_channels)
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, dropout, norm_groups, norm_eps)

        def attn(c: int) -> SpatialTransformer:
            if num_head_channels is not None and c % num_head_channels:
                raise ValueError(
                    f"attention width {c} is not a multiple of num_head_channels={num_head_channels}"
                )
            heads = num_heads if num_head_channels is None else c // num_head_channels
            return SpatialTransformer(
                c,
                context_dim,
                heads,
                dropout,
                norm_groups,
                transformer_depth,
                use_linear=use_linear_projection,
                upcast=upcast_attention,
            )

        ch = model_channels
        skip_channels = [ch]
        conv_in = nn.Conv2d(in_channels + self.concat_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([nn.ModuleList([conv_in])])
        for level, mult in enumerate(self.channel_mult):
            ds = 2**level
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(self.channel_mult))):
            mult = self.channel_mult[level]
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if 2**level in attention_resolutions:
                    layers.append(attn(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(layers))

        self.out = nn.Sequential(
            group_norm(ch, norm_groups, norm_eps),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )
        if vector_dim is not None:  # built last: the other layers draw the same init as without it
            self.vector_embed = vector_embedding(
                vector_dim, emb_dim
            )  # (B, vector_dim) -> (B, 4 * mc), 0 at init
        log.debug("UNet built: %.2fM parameters", sum(p.numel() for p in self.parameters()) / 1e6)

    # ------------------------------------------------------------------ checks
    def _check_inputs(
        self, x: Tensor, c_noise: Tensor, context: Tensor | None, context_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        factor = 2 ** (len(self.channel_mult) - 1)
        size_fix = (
            f"{factor} (2**(len(channel_mult)-1)); use an image/latent size that is a multiple of {factor} "
            "or fewer channel_mult levels"
        )
        return check_backbone_inputs(
            self, x, c_noise, context, context_mask, multiple=factor, size_fix=size_fix
        )

    # ------------------------------------------------------------------ forward
    def _run_layer(
        self, layer: nn.Module, h: Tensor, emb: Tensor, ctx: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if isinstance(layer, ResBlock):
            args: tuple = (h, emb)
        elif isinstance(layer, SpatialTransformer):
            args = (h, ctx, mask)
        else:
            return layer(h)
        if use_ckpt:
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        vector: Tensor | None = None,
        concat: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W); c_noise (B,) timestep; context (B, L, D); context_mask (B, L) bool;
        vector (B, vector_dim); concat (B, concat_channels, H, W)."""
        c_noise, mask = self._check_inputs(x, c_noise, context, context_mask)
        check_vector_and_concat(self, x, vector, concat)
        emb = self.time_embed(timestep_embedding(c_noise, self.model_channels).to(x.dtype))  # (B, 4*mc)
        if vector is not None:
            emb = emb + self.vector_embed(vector.to(emb.dtype))  # (B, 4*mc)
        h = x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, C + C_concat, H, W)
        skips: list[Tensor] = []
        for block in self.input_blocks:
            for layer in block:
                h = self._run_layer(layer, h, emb, context, mask)
            skips.append(h)  # (B, C_l, H_l, W_l)
        for layer in self.middle_block:
            h = self._run_layer(layer, h, emb, context, mask)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H_l, W_l)
            for layer in block:
                h = self._run_layer(layer, h, emb, context, mask)
        return self.out(h)  # (B, out_channels, H, W)
