"""A user's own super-resolution arch, defined outside fmpsr: a small FSRCNN-style network (Dong et al.,
"Accelerating the Super-Resolution Convolutional Neural Network", ECCV 2016, Sec. 3.1) with a fixed
colour normalisation and a transposed-conv upsampler.

* ``sub_mean`` / ``add_mean`` are 1x1 convs with frozen parameters (``requires_grad=False``) that
  subtract and add back the data set's RGB mean, as several SR codebases write it; fmpsr leaves them
  exactly as they are (not pruned, not masked, bit-identical in the export) and fixes their channels.
* ``deconv`` is an ``nn.ConvTranspose2d`` (FSRCNN's deconvolution layer): fmpsr prunes its input
  channels together with the ``expand`` conv that writes them.

Importing this module registers ``MyFSRCNN`` in BasicSR's ``ARCH_REGISTRY``; a train script that imports
``fmpsr`` and this module can then use ``network_g: {type: MyFSRCNN, ...}`` with every pruning method.
It also tells fmpsr which constructor arguments an export of it may carry
(:func:`fmpsr.pruning.untrusted.register_trusted_arch`): options read from a file are untrusted, and only
registered archs with bounded arguments are built from one.
"""
import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from fmpsr.pruning.untrusted import Int, Numbers, register_trusted_arch

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def frozen_mean_shift(rgb_mean, sign):
    """A 1x1 conv computing ``x + sign * mean`` per RGB channel, with frozen weight and bias."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        conv.bias.copy_(sign * torch.tensor(rgb_mean))
    return conv.requires_grad_(False)


@ARCH_REGISTRY.register()
class MyFSRCNN(nn.Module):
    """FSRCNN-style network: feature extraction (5x5, ``d``), shrinking (1x1, ``s``), ``m`` mapping
    3x3 convs (``s``), expanding (1x1, ``d``), PReLU after each, and a 9x9 transposed conv with stride
    ``upscale`` to the HR image, between frozen mean-shift convs.

    Args:
        num_in_ch, num_out_ch (int): image channels (3: the mean shift is RGB).
        d, s, m (int): FSRCNN's widths and mapping depth.
        upscale (int): scale factor.

    Shapes: (N, 3, H, W) -> (N, 3, H * upscale, W * upscale).
    """

    def __init__(self, num_in_ch=3, num_out_ch=3, d=16, s=8, m=2, upscale=2, rgb_mean=DIV2K_RGB_MEAN):
        super().__init__()
        self.sub_mean = frozen_mean_shift(rgb_mean, -1.0)
        self.feature = nn.Sequential(nn.Conv2d(num_in_ch, d, 5, padding=2), nn.PReLU(d))
        self.shrink = nn.Sequential(nn.Conv2d(d, s, 1), nn.PReLU(s))
        self.mapping = nn.Sequential(*[layer for _ in range(m) for layer in (nn.Conv2d(s, s, 3, padding=1),
                                                                             nn.PReLU(s))])
        self.expand = nn.Sequential(nn.Conv2d(s, d, 1), nn.PReLU(d))
        self.deconv = nn.ConvTranspose2d(d, num_out_ch, 9, stride=upscale, padding=4, output_padding=upscale - 1)
        self.add_mean = frozen_mean_shift(rgb_mean, 1.0)

    def forward(self, x):
        x = self.sub_mean(x)
        x = self.expand(self.mapping(self.shrink(self.feature(x))))
        return self.add_mean(self.deconv(x))


# what an export of MyFSRCNN may carry: bounded numbers only (exports may come from strangers)
register_trusted_arch('MyFSRCNN', {'num_in_ch': Int(3, 3), 'num_out_ch': Int(3, 3), 'd': Int(1, 1024),
                                   's': Int(1, 1024), 'm': Int(0, 64), 'upscale': Int(1, 8),
                                   'rgb_mean': Numbers(3, 0.0, 1.0)})
