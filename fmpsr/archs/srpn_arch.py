"""SRPN-Lite (SRP, Zhang et al., ICLR 2022, Sec. 3.4): the EDSR baseline without its final conv.

EDSR-baseline body (``num_block`` residual blocks without BN, a conv after the body and a long skip
add), and an upsampler of one conv ``num_feat -> num_out_ch * upscale**2`` followed by PixelShuffle
(no conv after it). SRP trains it at 256 channels (19.5 M params at x2) and prunes every block to 45
channels: 609,042 / 615,132 / 623,658 conv params at x2 / x3 / x4 (paper: 609 K / 615 K / 623 K).
"""
import torch
from torch import nn

from basicsr.archs.arch_util import ResidualBlockNoBN, make_layer
from basicsr.utils.registry import ARCH_REGISTRY


@ARCH_REGISTRY.register()
class SRPNLite(nn.Module):
    """SRPN-Lite: maps an LR image (B, num_in_ch, H, W) to (B, num_out_ch, H*upscale, W*upscale).

    Args:
        num_in_ch (int): input channels. Default: 3.
        num_out_ch (int): output channels. Default: 3.
        num_feat (int): channels of the body. Default: 256 (SRP's dense network; 45 after pruning).
        num_block (int): residual blocks. Default: 16.
        upscale (int): scale factor (any integer >= 1; one PixelShuffle). Default: 2.
        res_scale (float): residual scale of the blocks. Default: 1.
        img_range (float): image range (EDSR: 255). Default: 255.
        rgb_mean (sequence): mean subtracted from the input, added back to the output (a buffer, not a
            parameter). Default: DIV2K's (0.4488, 0.4371, 0.4040).
    """

    def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=256, num_block=16, upscale=2, res_scale=1,
                 img_range=255., rgb_mean=(0.4488, 0.4371, 0.4040)):
        super().__init__()
        self.img_range = img_range
        self.register_buffer('mean', torch.Tensor(rgb_mean).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = make_layer(ResidualBlockNoBN, num_block, num_feat=num_feat, res_scale=res_scale, pytorch_init=True)
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsampler = nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1)
        self.pixel_shuffle = nn.PixelShuffle(upscale)

    def forward(self, x):
        mean = self.mean.type_as(x)
        x = self.conv_first((x - mean) * self.img_range)
        x = x + self.conv_after_body(self.body(x))
        return self.pixel_shuffle(self.upsampler(x)) / self.img_range + mean
