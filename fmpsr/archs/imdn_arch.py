"""IMDN: information multi-distillation network (Hui et al., ACM MM 2019).

A lightweight SR network built on channel splits and concatenations, which makes it the test of
fmpsr's automatic channel coupling on those ops. Module names follow the authors' code
(``fea_conv``, ``IMDB1`` .. ``IMDBn`` with ``c1`` .. ``c5`` and ``cca``, ``c``, ``LR_conv``,
``upsampler``).

Two deliberate differences from the authors' code, both for pruning:

* split sizes are read from the conv widths at run time (``distilled = c1.out - c2.in``), so the
  network still runs when fmpsr narrows its convs (``CompactArch``); with the dense widths they are
  the authors' 25 % / 75 %;
* the contrast (standard deviation) of CCA is ``sqrt(var + 1e-12)`` instead of ``sqrt(var)``: a
  pruned channel is exactly zero in the hypernetwork, and the gradient of ``sqrt`` at 0 is infinite.
"""
import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY


class CCALayer(nn.Module):
    """Contrast-aware channel attention: ``x * sigmoid(up(relu(down(std(x) + mean(x)))))``.

    Args:
        channels (int): C. reduction (int): squeeze factor of the 1x1 convs. Default: 16.
    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels, reduction=16):
        super().__init__()
        self.conv_du = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(channels // reduction, channels, 1), nn.Sigmoid())

    def forward(self, x):
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = ((x - mean).pow(2).mean(dim=(2, 3), keepdim=True) + 1e-12).sqrt()
        return x * self.conv_du(std + mean)


class IMDModule(nn.Module):
    """Information multi-distillation block: three splits into distilled / remaining channels, the
    distilled parts and a last conv concatenated, CCA, a 1x1 fusion conv, and a skip.

    Args:
        num_feat (int): C, channels in and out. distillation_rate (float): distilled share. Default: 0.25.
    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, num_feat, distillation_rate=0.25):
        super().__init__()
        distilled = int(num_feat * distillation_rate)
        remaining = num_feat - distilled
        self.c1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.c2 = nn.Conv2d(remaining, num_feat, 3, padding=1)
        self.c3 = nn.Conv2d(remaining, num_feat, 3, padding=1)
        self.c4 = nn.Conv2d(remaining, distilled, 3, padding=1)
        self.c5 = nn.Conv2d(distilled * 4, num_feat, 1)
        self.cca = CCALayer(distilled * 4)

    @staticmethod
    def split(x, reader):
        """Split ``x`` into (distilled, remaining), the remaining part being what ``reader`` reads."""
        return torch.split(x, (x.size(1) - reader.in_channels, reader.in_channels), dim=1)

    def forward(self, x):
        d1, r1 = self.split(F.leaky_relu(self.c1(x), 0.05), self.c2)
        d2, r2 = self.split(F.leaky_relu(self.c2(r1), 0.05), self.c3)
        d3, r3 = self.split(F.leaky_relu(self.c3(r2), 0.05), self.c4)
        out = torch.cat([d1, d2, d3, self.c4(r3)], dim=1)
        return self.c5(self.cca(out)) + x


@ARCH_REGISTRY.register()
class IMDN(nn.Module):
    """IMDN (Hui et al. 2019): ``f = fea_conv(x)``; blocks B1..Bn in a chain;
    ``y = LR_conv(lrelu(c(cat(B1..Bn)))) + f``; ``out = pixel_shuffle(upsampler(y))``.

    Args:
        num_in_ch (int): Image channels in. Default: 3.
        num_out_ch (int): Image channels out. Default: 3.
        num_feat (int): Feature channels. Default: 64.
        num_block (int): Number of IMD blocks. Default: 6.
        upscale (int): Scale factor s. Default: 4.

    Shapes:
        x: (B, num_in_ch, H, W) -> (B, num_out_ch, s*H, s*W).
    """

    def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=64, num_block=6, upscale=4):
        super().__init__()
        self.num_block = num_block
        self.fea_conv = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        for i in range(1, num_block + 1):
            self.add_module(f'IMDB{i}', IMDModule(num_feat))
        self.c = nn.Conv2d(num_feat * num_block, num_feat, 1)
        self.LR_conv = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.upsampler = nn.Sequential(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, padding=1),
                                       nn.PixelShuffle(upscale))

    def forward(self, x):
        feature = self.fea_conv(x)
        outs, out = [], feature
        for i in range(1, self.num_block + 1):
            out = getattr(self, f'IMDB{i}')(out)
            outs.append(out)
        fused = F.leaky_relu(self.c(torch.cat(outs, dim=1)), 0.05)
        return self.upsampler(self.LR_conv(fused) + feature)
