"""Stage-1 KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", sec. 3 and appendix G).

A convolutional encoder maps an image x (B, 3, H, W) in [-1, 1] to the moments of a diagonal Gaussian
posterior q(z|x) over a latent z (B, z_channels, H/f, W/f), f = 2 ** (len(channel_mult) - 1); a mirrored
decoder maps z back to pixels. A small KL penalty towards N(0, I) keeps the latent variance bounded.
The layout (ResNet blocks with GroupNorm + SiLU, one self-attention block in the middle, stride-2
downsampling and nearest-neighbour upsampling) follows appendix G, sized down so that it trains on CPU
at 32x32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DiagonalGaussian", "KLAutoencoder"]


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))) (Kingma & Welling 2014, eq. 9)."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must have one shape")
        self.mean = mean  # (B, C, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)  # (B, C, h, w), clamped as in Rombach et al.
        self.std = torch.exp(0.5 * self.logvar)  # (B, C, h, w)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample z = mean + std * eps, eps ~ N(0, I)  # (B, C, h, w)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The posterior mode (= mean)  # (B, C, h, w)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over C, h, w  # (B,)."""
        per_elem = self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar  # (B, C, h, w)
        return 0.5 * per_elem.flatten(1).sum(dim=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) x 2 plus a 1x1 skip when C changes."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (Vaswani et al. 2017, eq. 1)."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, 1, HW, C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (0, 1, 0, 1) padding: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(channels: int, norm_groups: int, attention: bool) -> nn.Sequential:
    attn: nn.Module = AttnBlock(channels, norm_groups) if attention else nn.Identity()
    return nn.Sequential(
        ResBlock(channels, channels, norm_groups), attn, ResBlock(channels, channels, norm_groups)
    )


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> posterior moments (B, 2 * z_channels, H/f, W/f)."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        norm_groups: int,
        mid_attention: bool,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        layers: list[nn.Module] = []
        ch = base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, width, norm_groups))
                ch = width
            if level != len(widths) - 1:
                layers.append(Downsample(ch))
        self.down = nn.Sequential(*layers)
        self.mid = _mid_block(ch, norm_groups, mid_attention)
        self.norm_out = _norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, 2 * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 z, H/f, W/f)


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> x (B, out_channels, h * f, w * f)."""

    def __init__(
        self,
        out_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        norm_groups: int,
        mid_attention: bool,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = _mid_block(ch, norm_groups, mid_attention)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(ch, widths[level], norm_groups))
                ch = widths[level]
            if level != 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))  # (B, base_channels * mult[0], H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)


class KLAutoencoder(nn.Module):
    """KL-regularised autoencoder ("KL-f4" for channel_mult of length 3; Rombach et al. 2022, sec. 3)."""

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 4,
        norm_groups: int = 32,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult={channel_mult} must be a non-empty sequence of positive ints")
        bad = [base_channels * m for m in channel_mult if (base_channels * m) % norm_groups]
        if base_channels % norm_groups or bad:
            raise ValueError(
                f"norm_groups={norm_groups} must divide base_channels={base_channels} and every "
                f"base_channels * channel_mult; pick norm_groups dividing {base_channels}"
            )
        self._config = {
            "in_channels": int(in_channels),
            "base_channels": int(base_channels),
            "channel_mult": list(channel_mult),
            "num_res_blocks": int(num_res_blocks),
            "z_channels": int(z_channels),
            "norm_groups": int(norm_groups),
            "mid_attention": bool(mid_attention),
        }
        self.in_channels = in_channels
        self.latent_channels = z_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        shared = dict(
            base_channels=base_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            norm_groups=norm_groups,
            mid_attention=mid_attention,
        )
        self.encoder = Encoder(in_channels=in_channels, **shared)
        self.decoder = Decoder(out_channels=in_channels, **shared)
        # 1x1 "quant" convs between encoder/decoder and latent space, as in the reference design.
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def _check_input(self, x: Tensor) -> None:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"expected images (B, {self.in_channels}, H, W) with H, W divisible by {f}, got "
                f"{tuple(x.shape)}; resize or crop the images"
            )

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> q(z|x) over z (B, z_channels, H/f, W/f)."""
        self._check_input(x)
        moments = self.quant_conv(self.encoder(x))  # (B, 2 z, H/f, W/f)
        mean, logvar = moments.chunk(2, dim=1)  # each (B, z, H/f, W/f)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, z_channels, h, w) -> reconstruction (B, 3, h * f, w * f) (unbounded, ~[-1, 1])."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}; "
                "check the autoencoder's latent_channels"
            )
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (training) or its mode; returns (recon, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, z, H/f, W/f)
        return self.decode(z), posterior

    def config(self) -> dict:
        """Constructor kwargs, JSON-able: KLAutoencoder(**model.config()) rebuilds the architecture."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"f={self.downsample_factor}, z_channels={self.latent_channels}, params={n / 1e6:.2f}M"
