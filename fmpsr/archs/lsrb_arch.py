"""LSRB: the lightweight SR baseline of FMP (Zhang et al., ICML 2024, Sec. 3.2, Fig. 2).

LSRB is RLFN (Kong et al., NTIRE 2022 ESR winner) with each block's three convs replaced by the
EDSR residual block (conv3x3 - ReLU - conv3x3 + skip), followed by a 1x1 conv and enhanced spatial
attention (ESA). The FMP supplement calls the wide form ESRB (ESRB-6-256 is what FMP prunes).

Every conv width can be given separately, so that a network pruned by channels is an ordinary
``LSRB`` that loads with a plain ``state_dict``. The stream is cut into ``num_block + 1`` block
boundaries: boundary 0 is the head conv's output (read by block 0, met at block 0's residual add and
at the global skip by the after-body conv), boundary i >= 1 is block i-1's output ``conv1x1(r) * ESA
mask`` (read by block i, met at its residual add; the last one is read by the after-body conv). No add
or multiply joins two boundaries, so each may have its own width (``stream_feats``); by default all
are ``num_feat``. Each block's inner width and each ESA's three inner widths are free as well.
"""
import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY


class ESA(nn.Module):
    """Enhanced spatial attention (Liu et al. 2020, as used in RLFN).

    ``c1_ = conv1(x)`` (1x1, C -> f1); ``c1 = conv2(c1_)`` (3x3, stride 2, no padding, f1 -> f2);
    ``v = max_pool2d(c1, 7, 3)``; ``c3 = conv3(v)`` (3x3, f2 -> f3), bilinearly upsampled to x's
    size; ``cf = conv_f(c1_)`` (1x1, f1 -> f3); ``m = sigmoid(conv4(c3 + cf))`` (1x1, f3 -> C);
    returns ``x * m``.

    Args:
        num_feat (int): Channels C of the input and output.
        esa_channels (int | sequence[int]): Inner widths; an int f means (f, f, f), otherwise
            (f1, f2, f3) = (conv1 / conv_f input, conv2 output, conv3 and conv_f output).

    Shapes:
        x: (B, C, H, W) with H, W >= 15 pixels (stride-2 conv, then a 7x7 pool) -> (B, C, H, W).
    """

    def __init__(self, num_feat, esa_channels=16):
        super().__init__()
        f1, f2, f3 = _triple(esa_channels)
        self.conv1 = nn.Conv2d(num_feat, f1, 1)
        self.conv_f = nn.Conv2d(f1, f3, 1)
        self.conv2 = nn.Conv2d(f1, f2, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f2, f3, 3, padding=1)
        self.conv4 = nn.Conv2d(f3, num_feat, 1)

    def forward(self, x):
        c1_ = self.conv1(x)
        c1 = self.conv2(c1_)
        v = F.max_pool2d(c1, kernel_size=7, stride=3)
        c3 = self.conv3(v)
        c3 = F.interpolate(c3, size=(x.size(2), x.size(3)), mode='bilinear', align_corners=False)
        cf = self.conv_f(c1_)
        m = torch.sigmoid(self.conv4(c3 + cf))
        return x * m


class LSRBlock(nn.Module):
    """One LSRB block: ``r = conv2(relu(conv1(x))) + x``; ``y = esa(conv1x1(r))``.

    Args:
        num_feat (int): Input width C_in (also ``conv2``'s output, which meets the input at the add).
        mid_feat (int | None): Output width of ``conv1`` (the free width of the residual part);
            None means ``num_feat``.
        esa_channels (int | sequence[int]): ESA inner widths, see :class:`ESA`.
        out_feat (int | None): Output width C_out of ``conv1x1`` and of the ESA (the next block
            boundary); None means ``num_feat``.

    Shapes:
        x: (B, C_in, H, W), H, W >= 15 pixels -> (B, C_out, H, W).
    """

    def __init__(self, num_feat, mid_feat=None, esa_channels=16, out_feat=None):
        super().__init__()
        mid_feat = num_feat if mid_feat is None else mid_feat
        out_feat = num_feat if out_feat is None else out_feat
        self.conv1 = nn.Conv2d(num_feat, mid_feat, 3, padding=1)
        self.conv2 = nn.Conv2d(mid_feat, num_feat, 3, padding=1)
        self.conv1x1 = nn.Conv2d(num_feat, out_feat, 1)
        self.esa = ESA(out_feat, esa_channels)

    def forward(self, x):
        r = self.conv2(F.relu(self.conv1(x))) + x
        return self.esa(self.conv1x1(r))


@ARCH_REGISTRY.register()
class LSRB(nn.Module):
    """LSRB / ESRB-N-C (FMP Sec. 3.2): head conv, N blocks, after-body conv with a global skip,
    and a one-conv PixelShuffle upsampler.

    ``f = conv_first(x)``; ``y = conv_after_body(body(f)) + f``; ``out = pixel_shuffle(upsampler(y))``.

    Sizes (params = conv weights and biases; MACs = conv multiply-accumulates), checked in tests:
    LSRB-6-48 x4 has 345,504 params and 1.309 G MACs at a 64x64 LR input; ESRB-6-256 has 8,180.9 K /
    8,215.5 K / 8,263.9 K params for x2 / x3 / x4.

    Args:
        num_in_ch (int): Image channels in. Default: 3.
        num_out_ch (int): Image channels out. Default: 3.
        num_feat (int): Stream width C (every block boundary when ``stream_feats`` is not given).
            Default: 48.
        num_block (int): Number of blocks N. Default: 6.
        upscale (int): Scale factor s; the upsampler conv has ``num_out_ch * s * s`` outputs. Default: 4.
        esa_channels (int): ESA inner width f when ``esa_feats`` is not given. Default: 16.
        mid_feats (list[int] | None): Per-block width of the first 3x3 conv; None means
            ``num_feat`` everywhere (the dense network). Used by pruned (compact) networks.
        esa_feats (list[list[int]] | None): Per-block ESA widths ``[f1, f2, f3]``; None means
            ``esa_channels`` everywhere.
        stream_feats (list[int] | None): Widths ``[c_0, ..., c_N]`` of the N + 1 block boundaries:
            ``c_0`` is the output of ``conv_first`` and ``conv_after_body`` (they meet at the global
            skip), the input of the upsampler, and block 0's input and residual width; ``c_i``
            (i >= 1) is the output of block i-1 (its ``conv1x1``, ESA and ``esa.conv4``), the input
            and residual width of block i, and for i = N the input of ``conv_after_body``. None
            means ``num_feat`` everywhere (the dense network); when given, ``c_0`` must equal
            ``num_feat``. Written by the per-boundary pruning grouping
            (:func:`fmpsr.pruning.grouping.lsrb_boundary_grouping`).

    Shapes:
        x: (B, num_in_ch, H, W), H, W >= 15 LR pixels -> (B, num_out_ch, s*H, s*W); inside,
        ``f = conv_first(x)``: (B, c_0, H, W); block i maps (B, c_i, H, W) -> (B, c_{i+1}, H, W);
        ``conv_after_body``: (B, c_N, H, W) -> (B, c_0, H, W); ``upsampler``: (B, c_0, H, W) ->
        (B, num_out_ch * s * s, H, W).

    Raises:
        ValueError: a per-block width list whose length is not ``num_block``, ``stream_feats`` whose
            length is not ``num_block + 1`` or whose first entry differs from ``num_feat``, or a
            width < 1.
    """

    def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=48, num_block=6, upscale=4, esa_channels=16,
                 mid_feats=None, esa_feats=None, stream_feats=None):
        super().__init__()
        mid_feats = [num_feat] * num_block if mid_feats is None else list(mid_feats)
        esa_feats = [[esa_channels] * 3] * num_block if esa_feats is None else [list(e) for e in esa_feats]
        for key, value in (('mid_feats', mid_feats), ('esa_feats', esa_feats)):
            if len(value) != num_block:
                raise ValueError(f'LSRB: {key} has {len(value)} entries, expected num_block={num_block}')
        if stream_feats is None:
            stream_feats = [num_feat] * (num_block + 1)
        else:
            stream_feats = [int(c) for c in stream_feats]
            if len(stream_feats) != num_block + 1:
                raise ValueError(f'LSRB: stream_feats has {len(stream_feats)} entries, expected num_block + 1 = '
                                 f'{num_block + 1} (one per block boundary)')
            if stream_feats[0] != num_feat:
                raise ValueError(f'LSRB: stream_feats[0] = {stream_feats[0]} (the head conv width) must equal '
                                 f'num_feat = {num_feat}')
        widths = stream_feats + mid_feats + [w for e in esa_feats for w in _triple(e)]
        if min(widths) < 1:
            raise ValueError(f'LSRB: every width must be >= 1, got {widths}')
        self.upscale = upscale
        self.conv_first = nn.Conv2d(num_in_ch, stream_feats[0], 3, padding=1)
        self.body = nn.Sequential(*[
            LSRBlock(stream_feats[i], m, e, stream_feats[i + 1]) for i, (m, e) in enumerate(zip(mid_feats, esa_feats))])
        self.conv_after_body = nn.Conv2d(stream_feats[-1], num_feat, 3, padding=1)
        self.upsampler = nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, padding=1)
        self.pixel_shuffle = nn.PixelShuffle(upscale)

    def forward(self, x):
        f = self.conv_first(x)
        y = self.conv_after_body(self.body(f)) + f
        return self.pixel_shuffle(self.upsampler(y))


def _triple(value):
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f'ESA widths must be an int or three ints [f1, f2, f3], got {list(value)}')
    return value
