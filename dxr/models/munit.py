"""MUNIT (Huang et al. 2018) for MUNIT-LQ: unpaired translation between the LQ (DRR) and HQ domains.

Each domain has a generator — a content encoder (down-sampling convolutions and instance-normalised
residual blocks), a style encoder (a global style code of dimension 8) and a decoder whose residual
blocks are AdaIN-modulated by an MLP of the style code — and a multi-scale LSGAN discriminator.
Translating HQ → LQ keeps the content code of the HQ image and decodes it with an LQ style code:
random (N(0, I)) or taken from a given LQ image.

The normalisations run on the fused kernels: instance norm is ``dxr.nn.GroupNorm`` with one group per
channel, the decoder's layer norm (over C, H, W with a per-channel affine) is ``GroupNorm`` with one
group, and the AdaIN is ``dxr.ops.adain``; ``backend`` picks their kernels.
Loss weights and optimiser settings default to those of NVlabs' MUNIT configurations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dxr import ops
from dxr.nn import GroupNorm


@dataclass
class MUNITConfig:
    """Architecture and loss weights of :class:`MUNIT`; ``asdict`` of it is what checkpoints record."""

    channels: int = 1
    dim: int = 64  # channels after the first convolution
    style_dim: int = 8
    mlp_dim: int = 256
    n_downsample: int = 2  # content encoder (and decoder up-sampling) levels
    n_res: int = 4  # residual blocks in the content encoder and in the decoder
    style_downsample: int = 4
    dis_dim: int = 64
    dis_layers: int = 4
    dis_scales: int = 3
    gan_w: float = 1.0
    recon_x_w: float = 10.0
    recon_s_w: float = 1.0
    recon_c_w: float = 1.0
    recon_x_cyc_w: float = 0.0  # the cycle term is optional: off by default
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 1e-4

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this: every strided path halves them that often
        (content encoder, style encoder, and the coarsest discriminator after its poolings)."""
        return 2 ** max(self.n_downsample, self.style_downsample, self.dis_layers + self.dis_scales - 1)

    def validate(self) -> None:
        """Raise ValueError, naming the setting, for an architecture that cannot be built."""
        for name in ("channels", "dim", "style_dim", "mlp_dim", "dis_dim", "dis_layers", "dis_scales"):
            if getattr(self, name) < 1:
                raise ValueError(f"munit.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_downsample", "style_downsample"):
            if getattr(self, name) < 0:
                raise ValueError(f"munit.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_res < 1:
            raise ValueError(f"munit.n_res must be >= 1 (the decoder's AdaIN blocks carry the style), got {self.n_res}")


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    # reflection padding keeps the border statistics of radiographs (no dark frame)
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2 if stride == 1 else 1,
                     padding_mode="reflect")


class ConvBlock(nn.Sequential):
    """Convolution → normalisation (instance, layer or none) → activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, *, norm: str = "none",
                 activation: str = "relu", backend: Optional[str] = None):
        layers: list[nn.Module] = [_conv(in_channels, out_channels, kernel, stride)]
        if norm == "instance":
            layers.append(GroupNorm(out_channels, out_channels, affine=False, backend=backend))
        elif norm == "layer":
            layers.append(GroupNorm(1, out_channels, backend=backend))
        layers.append(nn.ReLU() if activation == "relu" else nn.LeakyReLU(0.2))
        super().__init__(*layers)


class InstanceResBlock(nn.Module):
    """x + IN(conv(ReLU(IN(conv(x))))): the residual block of the content encoder."""

    def __init__(self, channels: int, backend: Optional[str] = None):
        super().__init__()
        self.conv1 = ConvBlock(channels, channels, 3, norm="instance", backend=backend)
        self.conv2 = _conv(channels, channels, 3)
        self.norm2 = GroupNorm(channels, channels, affine=False, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm2(self.conv2(self.conv1(x)))


class AdaINResBlock(nn.Module):
    """x + AdaIN(conv(ReLU(AdaIN(conv(x))))), with the four (N, C) AdaIN parameters given at call time."""

    num_params = 4  # scale and shift of each of the two AdaINs, per channel

    def __init__(self, channels: int, backend: Optional[str] = None):
        super().__init__()
        self.conv1 = _conv(channels, channels, 3)
        self.conv2 = _conv(channels, channels, 3)
        self.backend = backend

    def forward(self, x: Tensor, params: Tensor) -> Tensor:
        scale1, shift1, scale2, shift2 = params.to(x.dtype).chunk(4, dim=1)
        h = F.relu(ops.adain(self.conv1(x), scale1, shift1, backend=self.backend))
        return x + ops.adain(self.conv2(h), scale2, shift2, backend=self.backend)


class ContentEncoder(nn.Module):
    """Image (N, channels, H, W) → content code (N, dim·2^n_downsample, H/2^n, W/2^n)."""

    def __init__(self, c: MUNITConfig, backend: Optional[str] = None):
        super().__init__()
        layers: list[nn.Module] = [ConvBlock(c.channels, c.dim, 7, norm="instance", backend=backend)]
        dim = c.dim
        for _ in range(c.n_downsample):
            layers.append(ConvBlock(dim, 2 * dim, 4, 2, norm="instance", backend=backend))
            dim *= 2
        layers += [InstanceResBlock(dim, backend) for _ in range(c.n_res)]
        self.layers = nn.Sequential(*layers)
        self.out_channels = dim

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class StyleEncoder(nn.Module):
    """Image (N, channels, H, W) → style code (N, style_dim): strided convolutions, global mean, 1×1 conv."""

    def __init__(self, c: MUNITConfig):
        super().__init__()
        layers: list[nn.Module] = [ConvBlock(c.channels, c.dim, 7)]
        dim = c.dim
        for level in range(c.style_downsample):
            doubled = 2 * dim if level < 2 else dim  # the width stops growing after two levels
            layers.append(ConvBlock(dim, doubled, 4, 2))
            dim = doubled
        layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, c.style_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).flatten(1)


class Decoder(nn.Module):
    """(content, style) → image in [-1, 1]: AdaIN residual blocks (parameters from an MLP of the style),
    then nearest ×2 up-sampling with 5×5 convolutions and layer norm, then a 7×7 convolution and tanh."""

    def __init__(self, c: MUNITConfig, content_channels: int, backend: Optional[str] = None):
        super().__init__()
        dim = content_channels
        self.blocks = nn.ModuleList([AdaINResBlock(dim, backend) for _ in range(c.n_res)])
        self.mlp = nn.Sequential(
            nn.Linear(c.style_dim, c.mlp_dim), nn.ReLU(),
            nn.Linear(c.mlp_dim, c.mlp_dim), nn.ReLU(),
            nn.Linear(c.mlp_dim, c.n_res * AdaINResBlock.num_params * dim),
        )
        layers: list[nn.Module] = []
        for _ in range(c.n_downsample):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       ConvBlock(dim, dim // 2, 5, norm="layer", backend=backend)]
            dim //= 2
        layers += [_conv(dim, c.channels, 7), nn.Tanh()]
        self.up = nn.Sequential(*layers)

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        params = self.mlp(style).chunk(len(self.blocks), dim=1)
        h = content
        for block, p in zip(self.blocks, params):
            h = block(h, p)
        return self.up(h)


class Generator(nn.Module):
    """One domain's auto-encoder: ``encode(x) → (content, style)``, ``decode(content, style) → x``."""

    def __init__(self, c: MUNITConfig, backend: Optional[str] = None):
        super().__init__()
        self.content = ContentEncoder(c, backend)
        self.style = StyleEncoder(c)
        self.decoder = Decoder(c, self.content.out_channels, backend)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.content(x), self.style(x)

    def decode(self, content: Tensor, style: Tensor) -> Tensor:
        return self.decoder(content, style)


class MultiScaleDiscriminator(nn.Module):
    """LSGAN discriminators at ``dis_scales`` scales (each input 3×3-average-pooled by 2 from the last);
    ``forward(x)`` → the list of patch score maps, one per scale."""

    def __init__(self, c: MUNITConfig):
        super().__init__()
        self.nets = nn.ModuleList()
        for _ in range(c.dis_scales):
            layers: list[nn.Module] = [ConvBlock(c.channels, c.dis_dim, 4, 2, activation="lrelu")]
            dim = c.dis_dim
            for _ in range(c.dis_layers - 1):
                layers.append(ConvBlock(dim, 2 * dim, 4, 2, activation="lrelu"))
                dim *= 2
            layers.append(nn.Conv2d(dim, 1, 1))
            self.nets.append(nn.Sequential(*layers))

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for i, net in enumerate(self.nets):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            outputs.append(net(x))
        return outputs


def lsgan_loss(outputs: list[Tensor], target: float) -> Tensor:
    """Σ over scales of mean((D(x) - target)²): target 1 for real, 0 for fake."""
    return sum(F.mse_loss(o.float(), torch.full_like(o.float(), target)) for o in outputs)


def _l1(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference, in float32."""
    return F.l1_loss(a.float(), b.float())


def _init_weights(module: nn.Module, kind: str) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if kind == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


class MUNIT(nn.Module):
    """Both domains' generators and discriminators, their losses, and the translations.

    Images are (N, channels, H, W) in [-1, 1] with H and W multiples of 2^max(n_downsample, style_downsample,
    dis_layers + dis_scales - 1) — 64 for the defaults. ``forward(x_lq, x_hq, part)`` returns
    (loss, parts) for ``part`` "dis" (discriminator update) or "gen" (generator update), so that one
    DistributedDataParallel wrapper serves both updates. Raises ValueError for another ``part``.
    """

    def __init__(self, config: Optional[MUNITConfig] = None, *, backend: Optional[str] = None, **overrides):
        super().__init__()
        self.config = MUNITConfig(**{**(asdict(config) if config else {}), **overrides})
        self.config.validate()
        self.gen_lq, self.gen_hq = Generator(self.config, backend), Generator(self.config, backend)
        self.dis_lq, self.dis_hq = MultiScaleDiscriminator(self.config), MultiScaleDiscriminator(self.config)
        for gen in (self.gen_lq, self.gen_hq):
            _init_weights(gen, "kaiming")
        for dis in (self.dis_lq, self.dis_hq):
            _init_weights(dis, "gaussian")

    def random_style(self, x: Tensor) -> Tensor:
        """Style codes (N, style_dim) ~ N(0, I) from torch's global generator, in x's dtype and device."""
        return torch.randn(x.shape[0], self.config.style_dim, device=x.device, dtype=x.dtype)

    def hq_to_lq(self, x_hq: Tensor, lq_style_image: Optional[Tensor] = None) -> Tensor:
        """HQ → LQ: the HQ content decoded with a random LQ style, or with the style of ``lq_style_image``
        (one image, broadcast, or one per HQ image)."""
        return self._translate(self.gen_hq, self.gen_lq, x_hq, lq_style_image)

    def lq_to_hq(self, x_lq: Tensor, hq_style_image: Optional[Tensor] = None) -> Tensor:
        """LQ → HQ, the mirror of :meth:`hq_to_lq`."""
        return self._translate(self.gen_lq, self.gen_hq, x_lq, hq_style_image)

    def _translate(self, source, target, x: Tensor, style_image: Optional[Tensor]) -> Tensor:
        content = source.content(x)
        style = self.random_style(x) if style_image is None else target.style(style_image).expand(x.shape[0], -1)
        return target.decode(content, style)

    def generator_loss(self, x_lq: Tensor, x_hq: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The generators' objective: GAN + image, style and content reconstruction (+ cycle) terms."""
        c = self.config
        content_lq, style_lq_own = self.gen_lq.encode(x_lq)
        content_hq, style_hq_own = self.gen_hq.encode(x_hq)
        style_lq, style_hq = self.random_style(x_lq), self.random_style(x_hq)
        # within-domain reconstruction
        lq_recon = self.gen_lq.decode(content_lq, style_lq_own)
        hq_recon = self.gen_hq.decode(content_hq, style_hq_own)
        # cross-domain translation with random styles, then re-encoding of the translations
        hq_to_lq = self.gen_lq.decode(content_hq, style_lq)
        lq_to_hq = self.gen_hq.decode(content_lq, style_hq)
        content_hq_recon, style_lq_recon = self.gen_lq.encode(hq_to_lq)
        content_lq_recon, style_hq_recon = self.gen_hq.encode(lq_to_hq)
        parts = {
            "gan": lsgan_loss(self.dis_lq(hq_to_lq), 1.0) + lsgan_loss(self.dis_hq(lq_to_hq), 1.0),
            "recon_x": _l1(lq_recon, x_lq) + _l1(hq_recon, x_hq),
            "recon_s": _l1(style_lq_recon, style_lq) + _l1(style_hq_recon, style_hq),
            "recon_c": _l1(content_hq_recon, content_hq) + _l1(content_lq_recon, content_lq),
        }
        loss = (c.gan_w * parts["gan"] + c.recon_x_w * parts["recon_x"] + c.recon_s_w * parts["recon_s"]
                + c.recon_c_w * parts["recon_c"])
        if c.recon_x_cyc_w > 0:
            lq_cycle = self.gen_lq.decode(content_lq_recon, style_lq_own)
            hq_cycle = self.gen_hq.decode(content_hq_recon, style_hq_own)
            parts["recon_cyc"] = _l1(lq_cycle, x_lq) + _l1(hq_cycle, x_hq)
            loss = loss + c.recon_x_cyc_w * parts["recon_cyc"]
        return loss, parts

    def discriminator_loss(self, x_lq: Tensor, x_hq: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminators' LSGAN objective on real images and (detached) random-style translations."""
        with torch.no_grad():
            hq_to_lq = self.gen_lq.decode(self.gen_hq.content(x_hq), self.random_style(x_hq))
            lq_to_hq = self.gen_hq.decode(self.gen_lq.content(x_lq), self.random_style(x_lq))
        losses = []
        for dis, real, fake in ((self.dis_lq, x_lq, hq_to_lq), (self.dis_hq, x_hq, lq_to_hq)):
            # real and fake in one batch: one forward per discriminator
            scores = dis(torch.cat([real, fake.to(real.dtype)]))
            n = real.shape[0]
            losses.append(lsgan_loss([s[:n] for s in scores], 1.0) + lsgan_loss([s[n:] for s in scores], 0.0))
        return self.config.gan_w * (losses[0] + losses[1]), {"lq": losses[0], "hq": losses[1]}

    def forward(self, x_lq: Tensor, x_hq: Tensor, part: str) -> tuple[Tensor, dict[str, Tensor]]:
        if part == "gen":
            return self.generator_loss(x_lq, x_hq)
        if part == "dis":
            return self.discriminator_loss(x_lq, x_hq)
        raise ValueError(f"part must be 'gen' or 'dis', got {part!r}")

    def generator_parameters(self):
        return list(self.gen_lq.parameters()) + list(self.gen_hq.parameters())

    def discriminator_parameters(self):
        return list(self.dis_lq.parameters()) + list(self.dis_hq.parameters())


__all__ = ["MUNIT", "MUNITConfig", "Generator", "MultiScaleDiscriminator", "lsgan_loss"]
