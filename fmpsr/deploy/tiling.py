"""Run an SR network on an image of any size: padding to the arch's minimum input, and tiling.

Tiling follows Real-ESRGAN (``RealESRGANer.tile_process``): the LR image is cut into ``tile`` x
``tile`` pixel tiles, each is run with ``tile_pad`` extra LR pixels of context on every side that
the image has, and only the tile's own part of the output is kept. For a network whose receptive
field is finite (EDSR, IMDN's convs) the result equals the untiled one once ``tile_pad`` covers the
receptive-field radius. ESA (LSRB, RLFN) pools over the whole input and CCA (IMDN) averages over
it, so those archs differ slightly near tile seams; a larger ``tile_pad`` makes that smaller.
"""
import math

from torch.nn import functional as F


def pad_to_min(x, pre_pad, min_size):
    """Pad ``x`` (B, C, H, W) at the bottom and right by ``pre_pad`` LR pixels, and further when H or W
    would stay below ``min_size``. Reflection padding where the image is large enough, edge
    replication otherwise.

    Returns:
        tuple: (padded tensor, (pad_bottom, pad_right)) in LR pixels.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = max(pre_pad, min_size - h, 0), max(pre_pad, min_size - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x, (0, 0)
    mode = 'reflect' if pad_h < h and pad_w < w else 'replicate'
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (pad_h, pad_w)


def _windows(length, tile, tile_pad, min_size):
    """(out_start, out_end, in_start, in_end) along one axis for tiles of ``tile`` pixels with
    ``tile_pad`` context, each input window widened to ``min_size`` inside ``[0, length)``."""
    for i in range(math.ceil(length / tile)):
        start, end = i * tile, min((i + 1) * tile, length)
        in_start, in_end = max(start - tile_pad, 0), min(end + tile_pad, length)
        if in_end - in_start < min_size:
            in_start = max(0, in_end - min_size)
            in_end = min(length, in_start + min_size)
        yield start, end, in_start, in_end


def tiled_forward(net, x, scale, tile=0, tile_pad=10, pre_pad=0, min_size=1):
    """Upscale ``x`` with ``net``, tiled when ``tile`` > 0.

    Args:
        net (nn.Module): SR network, (B, C_in, h, w) -> (B, C_out, scale*h, scale*w), in eval mode,
            on ``x``'s device and dtype.
        x (Tensor): LR images (B, C_in, H, W), values in [0, 1].
        scale (int): the network's upscale factor.
        tile (int): tile size in LR pixels; 0 runs the whole image at once.
        tile_pad (int): context in LR pixels around each tile.
        pre_pad (int): LR pixels of reflection padding at the bottom and right of the whole image,
            removed from the output (Real-ESRGAN's ``pre_pad``: less border effect there).
        min_size (int): the arch's minimum LR input height / width in pixels (15 for ESA archs, see
            :mod:`fmpsr.archs.limits`); smaller images are padded up to it.

    Returns:
        Tensor: (B, C_out, scale*H, scale*W).

    Raises:
        ValueError: ``tile`` is positive and smaller than ``min_size``, a negative ``tile_pad`` or
            ``pre_pad``, or a network output whose size is not ``scale`` times its input.
    """
    if tile and tile < min_size:
        raise ValueError(f'tile={tile} LR pixels is smaller than this arch\'s minimum input of {min_size} pixels')
    if tile < 0 or tile_pad < 0 or pre_pad < 0:
        raise ValueError(f'tile, tile_pad and pre_pad must be >= 0, got {tile}, {tile_pad}, {pre_pad}')
    height, width = x.shape[-2:]
    padded, _ = pad_to_min(x, pre_pad, min_size)
    if not tile or (padded.shape[-2] <= tile and padded.shape[-1] <= tile):
        out = _run(net, padded, scale)
    else:
        out = _tile_process(net, padded, scale, tile, tile_pad, min_size)
    return out[..., :height * scale, :width * scale]


def _run(net, x, scale):
    out = net(x)
    if tuple(out.shape[-2:]) != (x.shape[-2] * scale, x.shape[-1] * scale):
        raise ValueError(f'the network turned a {tuple(x.shape[-2:])} input into {tuple(out.shape[-2:])}, '
                         f'not {scale} times larger')
    return out


def _tile_process(net, x, scale, tile, tile_pad, min_size):
    height, width = x.shape[-2:]
    out = None
    for y0, y1, iy0, iy1 in _windows(height, tile, tile_pad, min_size):
        for x0, x1, ix0, ix1 in _windows(width, tile, tile_pad, min_size):
            piece = _run(net, x[..., iy0:iy1, ix0:ix1], scale)
            if out is None:
                out = x.new_zeros(x.shape[0], piece.shape[1], height * scale, width * scale)
            out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                piece[..., (y0 - iy0) * scale:(y1 - iy0) * scale, (x0 - ix0) * scale:(x1 - ix0) * scale]
    return out
