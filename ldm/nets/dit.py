"""Diffusion Transformer over patchified latents (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers", DiT) with text through cross-attention (Chen et al. 2023, "PixArt-alpha", Sec. 2.3 / Fig. 4).

The latent (B, C, H, W) is cut into p x p patches (a stride-p convolution, DiT Sec. 3.2 "Patchify") giving
N = (H/p)(W/p) tokens of width D, plus a fixed 2-D sin-cos positional embedding computed for the input's own
grid on every call, so any H x W divisible by p works (aspect-ratio buckets, other resolutions than trained
on). Each block is: adaLN-modulated self-attention, cross-attention on the text tokens (masked by
``context_mask``), adaLN-modulated MLP (PixArt-alpha Fig. 4). Attention is ``ldm.nets.layers.Attention``, i.e.
PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels where available). A final adaLN +
linear layer maps every token back to a p x p x C patch; it is zero-initialised, so the net outputs exactly
zeros at init (DiT Sec. 3.2 "adaLN-Zero"). ``gradient_checkpointing`` recomputes each block in the backward
pass.

Design choice: **adaLN-single with zero init** rather than DiT's per-block adaLN-Zero. In DiT each block owns
a Linear(D, 6D) from the conditioning vector to its shift/scale/gate (27% of the parameters, PixArt-alpha Sec.
2.3). Here the adaLN signal is one vector (the noise level's embedding, plus the optional ``vector`` input,
see below; text goes through cross-attention), so one shared Linear(D, 6D) of the timestep embedding plus a
learned per-block (6, D) table ``E_i`` (PixArt-alpha's adaLN-single, S_i = f(S + E_i)) carries the same
information with a quarter fewer parameters (DiT-S/2 29.5M instead of 39.3M, B/2 111M instead of 150M). Unlike
PixArt we zero-initialise both the shared layer and the tables, so every gate starts at 0 and every block is
the identity at init: DiT's adaLN-Zero property, which its ablation (Fig. 5) found best. The cross-attention
sublayer is pre-normed (LayerNorm) and its output projection zero-initialised (as PixArt-alpha does); it is
not gated by the timestep.

Conditioning inputs: ``forward(x, c_noise, context, context_mask, vector, concat)`` exactly like
``ldm.nets.unet.UNet`` (``ldm.interfaces.COND_KEYS``). Text goes through cross-attention. ``vector`` (class
labels from a ``ClassConditioner(output="vector")``, pooled text, size micro-conditioning) goes through adaLN:
a zero-initialised MLP maps it to the width D and adds it to the timestep embedding t, which drives every
block's shift/scale/gate and the final layer (DiT Sec. 3.2: "the sum of the embedding vectors of t and c").
``concat`` channels are joined to x before the patch embedding.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nets.checks import check_backbone_inputs, check_vector_and_concat
from ldm.nets.layers import (
    Attention,
    timestep_embedding,
    vector_embedding,
)

log = logging.getLogger(__name__)

__all__ = ["DIT_SIZES", "DiT", "DiTBlock", "build_dit", "sincos_pos_embed_2d"]

# The DiT model sizes (Peebles & Xie 2023, Table 1; DiT's ``DiT_models``): name -> depth, width, heads, patch.
_BASE = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
DIT_SIZES: dict[str, dict[str, int]] = {
    f"dit_{size}{p}": {"depth": d, "hidden_size": w, "num_heads": h, "patch_size": p}
    for size, (d, w, h) in _BASE.items()
    for p in (2, 4, 8)
}


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions -> (N, dim) ``[sin(pos * w), cos(pos * w)]``, w_i = 10000^(-i / (dim/2)) (Vaswani et al.
    2017; MAE / DiT ``get_1d_sincos_pos_embed_from_grid``). Computed in float64."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    angles = pos.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (N, dim)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, device: torch.device | None = None) -> Tensor:
    """(grid_h * grid_w, dim) float64 fixed 2-D sin-cos embedding of a row-major token grid (MAE / DiT
    ``get_2d_sincos_pos_embed``): the first dim/2 channels encode the column x, the last dim/2 the row y."""
    if dim % 4:
        raise ValueError(
            f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}: set net.hidden_size"
        )
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij"
    )  # (gh, gw) each
    return torch.cat([sincos_1d(dim // 2, xs.reshape(-1)), sincos_1d(dim // 2, ys.reshape(-1))], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN (Perez et al. 2018 FiLM; DiT eq. in Sec. 3.2): x (B, N, D), shift/scale (B, D) -> (B, N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention, cross-attention on the context (if any), MLP; adaLN-single modulation with gates.

    ``t_mod`` (B, 6, D) is the shared projection of the timestep embedding; the block adds its own learned
    table (6, D) and splits it into shift/scale/gate for attention and for the MLP (PixArt-alpha Sec. 2.3).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, context_dim: int | None, mlp_ratio: float, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, None, num_heads, dropout)
        self.norm_cross: nn.LayerNorm | None = None
        self.cross_attn: Attention | None = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = Attention(hidden_size, context_dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        inner = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, inner),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(inner, hidden_size),
        )
        # E_i of adaLN-single (rows: shift, scale, gate of attention; shift, scale, gate of the MLP), zero at
        # init
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))

    def forward(self, x: Tensor, t_mod: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        """x (B, N, D); t_mod (B, 6, D); context (B, L, D_ctx); mask (B, L) bool -> (B, N, D)."""
        mod = (self.scale_shift_table[None] + t_mod).unbind(1)  # 6 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None and self.norm_cross is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)  # (B, N, D)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from a (2, D) table + the timestep embedding, PixArt-alpha's T2IFinalLayer) and a
    zero-initialised Linear(D, p*p*C_out): (B, N, D) -> (B, N, p*p*C_out), zeros at init."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """``forward(x, c_noise, context, context_mask, vector, concat) -> Tensor`` (B, out_channels, H, W), H and
    W multiples of ``patch_size``. ``context_dim=None`` builds a DiT without cross-attention; ``vector_dim``
    adds the adaLN vector input, ``concat_channels`` the concatenated channels. Sizes: ``DIT_SIZES``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        context_dim: int | None = 384,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        frequency_embedding_size: int = 256,
        vector_dim: int | None = None,
        concat_channels: int = 0,
    ) -> None:
        super().__init__()
        if patch_size < 1 or depth < 1:
            raise ValueError(
                f"patch_size and depth must be >= 1, got {patch_size} and {depth}: set "
                f"net.patch_size/net.depth"
            )
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}: set net.num_heads to "
                f"a divisor"
            )
        if hidden_size % 4:
            raise ValueError(
                f"hidden_size={hidden_size} must be a multiple of 4 (2-D sin-cos positions): set "
                f"net.hidden_size"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.concat_channels = int(concat_channels)
        self.gradient_checkpointing = gradient_checkpointing
        self.frequency_embedding_size = frequency_embedding_size
        self.x_embedder = nn.Conv2d(
            in_channels + self.concat_channels, hidden_size, patch_size, stride=patch_size
        )  # DiT "Patchify"
        # DiT's TimestepEmbedder: 256-d sinusoid -> MLP -> (B, D)
        self.t_embedder = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.t_block = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)
        )  # adaLN-single: shared
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, context_dim, mlp_ratio, dropout) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self._init_weights()
        if vector_dim is not None:  # after the init above: zero last layer, so adaLN starts as without it
            self.vector_embed = vector_embedding(vector_dim, hidden_size)  # (B, vector_dim) -> (B, D)
        log.debug("DiT built: %.2fM parameters", sum(p.numel() for p in self.parameters()) / 1e6)

    def _init_weights(self) -> None:
        """DiT's ``initialize_weights``: Xavier-uniform linears, patch embed as a linear, N(0, 0.02) timestep
        MLP, zero adaLN (shared layer and tables), zero final layer; plus zero cross-attention output
        projections."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        for block in self.blocks:
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.to_out[0].weight)
                nn.init.zeros_(block.cross_attn.to_out[0].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------ checks
    def _check_inputs(
        self, x: Tensor, c_noise: Tensor, context: Tensor | None, context_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        p = self.patch_size
        size_fix = (
            f"net.patch_size={p}: use an image size (image_size / data buckets) that is a multiple of {p} x "
            "the autoencoder factor, or a smaller net.patch_size"
        )
        return check_backbone_inputs(self, x, c_noise, context, context_mask, multiple=p, size_fix=size_fix)

    # ------------------------------------------------------------------ forward
    def unpatchify(self, tokens: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """(B, gh*gw, p*p*C) -> (B, C, gh*p, gw*p), the inverse of the stride-p patch embedding's layout."""
        b, p, c = tokens.shape[0], self.patch_size, self.out_channels
        x = tokens.reshape(b, grid_h, grid_w, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, grid_h * p, grid_w * p)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        vector: Tensor | None = None,
        concat: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W); c_noise (B,) or scalar; context (B, L, D_ctx); context_mask (B, L) bool, True =
        real token; vector (B, vector_dim); concat (B, concat_channels, H, W). Returns (B, out_channels, H,
        W)."""
        c_noise, mask = self._check_inputs(x, c_noise, context, context_mask)
        check_vector_and_concat(self, x, vector, concat)
        b, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        x_in = x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, C + C_concat, H, W)
        tokens = self.x_embedder(x_in).flatten(2).transpose(1, 2)  # (B, N, D), N = gh * gw, row-major
        pos = sincos_pos_embed_2d(self.hidden_size, gh, gw, x.device)  # (N, D), for this grid
        tokens = tokens + pos.to(tokens.dtype)[None]
        t_freq = timestep_embedding(c_noise, self.frequency_embedding_size).to(tokens.dtype)  # (B, 256)
        t = self.t_embedder(t_freq)  # (B, D)
        if vector is not None:
            t = t + self.vector_embed(vector.to(t.dtype))  # (B, D): DiT's t + y embedding
        t_mod = self.t_block(t).view(b, 6, self.hidden_size)  # (B, 6, D), shared by all blocks
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                tokens = checkpoint(block, tokens, t_mod, context, mask, use_reentrant=False)
            else:
                tokens = block(tokens, t_mod, context, mask)  # (B, N, D)
        out = self.final_layer(tokens, t)  # (B, N, p*p*C_out)
        return self.unpatchify(out, gh, gw)  # (B, C_out, H, W)


def build_dit(name: str, **kwargs: object) -> DiT:
    """A DiT of a registered size (``DIT_SIZES``, e.g. "dit_s2", "dit_b2"); ``kwargs`` give the other
    arguments."""
    if name not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {name!r}: choose one of {', '.join(DIT_SIZES)}")
    return DiT(**DIT_SIZES[name], **kwargs)  # type: ignore[arg-type]
