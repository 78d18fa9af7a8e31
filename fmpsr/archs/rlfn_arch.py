"""RLFN: residual local feature network (Kong et al., CVPRW 2022; NTIRE 2022 ESR winner).

The backbone that LSRB modifies (FMP Sec. 3.2): each block has three 3x3 convs, each followed by
LeakyReLU(0.05), a skip over the three, a 1x1 conv and ESA (the same ESA as
:class:`fmpsr.archs.lsrb_arch.ESA`). Module names follow the authors' code (``conv_1``,
``block_1`` .. ``block_N`` with ``c1_r``, ``c2_r``, ``c3_r``, ``c5``, ``esa``; ``conv_2``;
``upsampler``), so their weights load with a plain ``state_dict``. fmpsr prunes it through the
automatic channel coupling; the compact network is ``CompactArch`` around RLFN.
"""
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY

from .lsrb_arch import ESA


class RLFB(nn.Module):
    """Residual local feature block: ``r = act(c3(act(c2(act(c1(x)))))) + x``; ``y = esa(c5(r))``.

    Args:
        num_feat (int): Channels in and out.
        mid_feat (int | None): Width of ``c1_r`` and ``c2_r``; None means ``num_feat``.
        esa_channels (int): ESA inner width. Default: 16.
    """

    def __init__(self, num_feat, mid_feat=None, esa_channels=16):
        super().__init__()
        mid_feat = mid_feat or num_feat
        self.c1_r = nn.Conv2d(num_feat, mid_feat, 3, padding=1)
        self.c2_r = nn.Conv2d(mid_feat, mid_feat, 3, padding=1)
        self.c3_r = nn.Conv2d(mid_feat, num_feat, 3, padding=1)
        self.c5 = nn.Conv2d(num_feat, num_feat, 1)
        self.esa = ESA(num_feat, esa_channels)

    def forward(self, x):
        out = F.leaky_relu(self.c1_r(x), 0.05)
        out = F.leaky_relu(self.c2_r(out), 0.05)
        out = F.leaky_relu(self.c3_r(out), 0.05) + x
        return self.esa(self.c5(out))


@ARCH_REGISTRY.register()
class RLFN(nn.Module):
    """RLFN (Kong et al. 2022): ``f = conv_1(x)``; ``y = conv_2(blocks(f)) + f``;
    ``out = pixel_shuffle(upsampler(y))``.

    Args:
        num_in_ch (int): Image channels in. Default: 3.
        num_out_ch (int): Image channels out. Default: 3.
        num_feat (int): Feature channels (the authors' ``feature_channels``). Default: 52.
        num_block (int): Number of RLFBs. Default: 6 (as in the authors' code).
        mid_feat (int | None): Inner width of each block; None means ``num_feat``.
        esa_channels (int): ESA inner width. Default: 16.
        upscale (int): Scale factor s. Default: 4.

    Shapes:
        x: (B, num_in_ch, H, W), H, W >= 15 LR pixels (ESA) -> (B, num_out_ch, s*H, s*W).
    """

    def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=52, num_block=6, mid_feat=None, esa_channels=16,
                 upscale=4):
        super().__init__()
        self.num_block = num_block
        self.conv_1 = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        for i in range(1, num_block + 1):
            self.add_module(f'block_{i}', RLFB(num_feat, mid_feat, esa_channels))
        self.conv_2 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.upsampler = nn.Sequential(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, padding=1),
                                       nn.PixelShuffle(upscale))

    def forward(self, x):
        feature = self.conv_1(x)
        out = feature
        for i in range(1, self.num_block + 1):
            out = getattr(self, f'block_{i}')(out)
        return self.upsampler(self.conv_2(out) + feature)
