"""Upscale your own images with an exported (compact) network, in the manner of Real-ESRGAN's
``inference_realesrgan.py``.

``python scripts/inference.py -i <file or folder> -o <folder> --model <export folder>`` (installed as
the console script ``fmpsr-infer``). 8- and 16-bit images, grayscale, BGR and BGRA are kept as they
are: the output has the input's dtype and channel count. Alpha is upscaled separately, by the
network or bicubically (``--alpha-upsampler``).

Limits, for folders of images from anywhere: an image of more than ``--max-pixels`` pixels (default
64 megapixels) is refused from its header, before it is decoded; an image of more than
:data:`AUTO_TILE_ABOVE` LR pixels is run in :data:`AUTO_TILE` x :data:`AUTO_TILE` tiles unless
``--tile`` is given; an image that fails (unreadable, too large, out of memory) is reported in one
line and skipped, the others are written, and the exit status is then 1. Two inputs that would write
the same output file are refused before anything is written.
"""
import argparse
import os
import sys

import cv2
import numpy as np
import torch

from fmpsr.archs.limits import min_lr_size
from fmpsr.pruning.export import WEIGHTS_FILE, load_compact, read_network_options

from .image_io import DEFAULT_MAX_PIXELS, EXTENSIONS, ImageReadError, from_float, read_image, to_float, write_image
from .tiling import tiled_forward

ALPHA_UPSAMPLERS = ('network', 'bicubic')
AUTO_TILE = 512               # LR pixels: tile size used when --tile is not given and the image is large
AUTO_TILE_ABOVE = 2 ** 21     # LR pixels (about 2 megapixels; 1920 x 1080 is below): larger images are tiled
_OUT_OF_MEMORY = ('out of memory', "can't allocate memory", 'not enough memory', 'failed to allocate')


def resolve_device(device, half=False):
    """``auto`` -> ``cuda`` when available, else ``cpu``.

    Raises:
        ValueError: ``cuda`` asked for without CUDA, or ``half`` on a CPU device (float16 convs are
            not implemented on CPU: "slow_conv2d_cpu not implemented for 'Half'").
    """
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if str(device).startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {device}: CUDA is not available on this machine; use --device cpu')
    if half and not str(device).startswith('cuda'):
        raise ValueError('--half needs a CUDA device: PyTorch has no float16 convolutions on CPU '
                         f'(device is {device!r}). Drop --half, or run with --device cuda.')
    return torch.device(device)


def _weights_path(model):
    return os.path.join(model, WEIGHTS_FILE) if os.path.isdir(model) else model


def model_min_size(model):
    """Minimum LR input size (pixels) of the exported network at ``model`` (folder or safetensors),
    read from its metadata without building it; None for a ``.pth`` checkpoint (known once loaded).

    Raises:
        FileNotFoundError: no weights there. ValueError: an unreadable file or refused options
            (see :func:`fmpsr.pruning.export.read_network_options`).
    """
    weights = _weights_path(model)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'--model {model!r}: no exported weights at {weights!r}')
    if weights.endswith(('.pth', '.pt')):
        return None
    return min_lr_size(read_network_options(weights))


class Upscaler:
    """An exported network ready to upscale numpy images.

    Args:
        model (str): export folder or its ``net_g.safetensors`` (loaded with
            :func:`fmpsr.pruning.load_compact`).
        device (str): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        half (bool): float16 (CUDA only).
        tile, tile_pad, pre_pad (int): LR pixels, see :func:`fmpsr.deploy.tiling.tiled_forward`;
            ``tile`` None (default): :data:`AUTO_TILE` for images of more than :data:`AUTO_TILE_ABOVE`
            pixels, no tiling below; 0: never tile.

    Attributes:
        scale (int): the network's upscale factor (measured on a dummy input).
        min_size (int): minimum LR input in pixels (15 for ESA archs).
        in_channels (int): image channels the network takes (1 or 3).

    Raises:
        FileNotFoundError / ValueError: from :func:`load_compact`, :func:`resolve_device`; a tile
            smaller than ``min_size``.
    """

    def __init__(self, model, device='auto', half=False, tile=None, tile_pad=10, pre_pad=10):
        self.device = resolve_device(device, half)
        self.net, self.network_opt, _ = load_compact(model, self.device)
        self.min_size = min_lr_size(self.network_opt)
        if tile and tile < self.min_size:
            raise ValueError(f'--tile {tile} is smaller than the minimum LR input of this network '
                             f'({self.min_size} pixels); use --tile {self.min_size} or more, or --tile 0')
        self.half, self.tile, self.tile_pad, self.pre_pad = half, tile, tile_pad, pre_pad
        self.dtype = torch.float16 if half else torch.float32
        self.net = self.net.to(self.dtype)
        first_conv = next(m for m in self.net.modules() if isinstance(m, torch.nn.Conv2d))
        self.in_channels = first_conv.in_channels
        size = max(self.min_size, 16)
        with torch.inference_mode():
            out = self.net(torch.zeros(1, self.in_channels, size, size, device=self.device, dtype=self.dtype))
        self.scale = out.shape[-1] // size
        if out.shape[1] != self.in_channels or self.scale < 1 or out.shape[-1] != self.scale * size:
            raise ValueError(f'{model!r}: a network mapping {self.in_channels} to {out.shape[1]} channels '
                             f'(scale {out.shape[-1] / size}) cannot be used as an image upscaler here')

    @torch.inference_mode()
    def upscale_float(self, img):
        """Upscale a float image by ``scale`` with the network.

        Args:
            img (ndarray): (H, W, C) float32 in [0, 1], RGB order when C = 3 (C = ``in_channels``).

        Returns:
            ndarray: (scale*H, scale*W, C) float32, not clipped.
        """
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
        x = x.to(self.device, self.dtype)
        out = tiled_forward(self.net, x, self.scale, self.tile_for(*img.shape[:2]), self.tile_pad, self.pre_pad,
                            self.min_size)
        return out[0].float().cpu().numpy().transpose(1, 2, 0)

    def tile_for(self, height, width):
        """Tile size (LR pixels, 0 = none) used for an image of ``height`` x ``width`` pixels."""
        if self.tile is not None:
            return self.tile
        return max(AUTO_TILE, self.min_size) if height * width > AUTO_TILE_ABOVE else 0

    def _upscale_channels(self, img):
        """(H, W, C) float with C in {1, 3} (RGB) -> upscaled (sH, sW, C) float, whatever ``in_channels``."""
        c = img.shape[2]
        if c == self.in_channels:
            return self.upscale_float(img)
        if self.in_channels == 3 and c == 1:  # gray through an RGB network, back to gray (Y)
            out = self.upscale_float(np.repeat(img, 3, axis=2))
            return cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[:, :, None]
        if self.in_channels == 1:  # each channel as a gray image
            return np.concatenate([self.upscale_float(img[:, :, i:i + 1]) for i in range(c)], axis=2)
        raise ValueError(f'cannot feed a {c}-channel image to a network with {self.in_channels} input channels')

    def enhance(self, img, outscale=None, alpha_upsampler='network'):
        """Upscale one image as read by :func:`fmpsr.deploy.image_io.read_image`.

        Args:
            img (ndarray): (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA; uint8 or uint16.
            outscale (float | None): final scale; the network's output is resized to
                ``(round(outscale*H), round(outscale*W))`` with Lanczos when it differs from ``scale``.
                None means ``scale``.
            alpha_upsampler (str): ``network`` (alpha run through the network as a gray image) or
                ``bicubic`` (``cv2.resize`` with ``INTER_CUBIC``).

        Returns:
            ndarray: same dtype and channel count as ``img``.

        Raises:
            ValueError: an unknown ``alpha_upsampler`` or a non-positive ``outscale``.
        """
        if alpha_upsampler not in ALPHA_UPSAMPLERS:
            raise ValueError(f'alpha_upsampler must be one of {ALPHA_UPSAMPLERS}, got {alpha_upsampler!r}')
        if outscale is not None and outscale <= 0:
            raise ValueError(f'outscale must be > 0, got {outscale}')
        height, width = img.shape[:2]
        data = to_float(img)
        alpha = None
        if data.ndim == 2:
            color = data[:, :, None]
        else:
            color = cv2.cvtColor(data[:, :, :3], cv2.COLOR_BGR2RGB)
            alpha = data[:, :, 3] if data.shape[2] == 4 else None
        out = self._upscale_channels(color)
        if out.shape[2] == 3:
            out = cv2.cvtColor(out, cv2.COLOR_RGB2BGR)
        if alpha is not None:
            if alpha_upsampler == 'network':
                up_alpha = self._upscale_channels(alpha[:, :, None])[:, :, 0]
            else:
                up_alpha = cv2.resize(alpha, (width * self.scale, height * self.scale), interpolation=cv2.INTER_CUBIC)
            out = np.dstack([out, up_alpha])
        if outscale is not None and outscale != self.scale:
            size = (max(1, round(width * outscale)), max(1, round(height * outscale)))
            out = cv2.resize(out, size, interpolation=cv2.INTER_LANCZOS4)
        if out.ndim == 3 and img.ndim == 2:
            out = out[:, :, 0]
        elif out.ndim == 2 and img.ndim == 3:
            out = out[:, :, None]
        return from_float(out, img.dtype)


def list_inputs(path):
    """``path`` itself when it is a file, else the sorted regular, non-hidden files in the folder.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f'-i {path!r}: no such file or folder')
    return [os.path.join(path, name) for name in sorted(os.listdir(path))
            if not name.startswith('.') and os.path.isfile(os.path.join(path, name))]


def output_path(in_path, out_dir, suffix, ext, has_alpha=False):
    """``<out_dir>/<stem>_<suffix>.<ext>`` (no ``_`` when ``suffix`` is empty). ``ext`` auto keeps the
    input's extension; images with alpha are always written as PNG (as Real-ESRGAN does)."""
    stem, in_ext = os.path.splitext(os.path.basename(in_path))
    ext = (in_ext[1:] or 'png') if ext == 'auto' else ext
    if has_alpha:
        ext = 'png'
    name = f'{stem}_{suffix}' if suffix else stem
    return os.path.join(out_dir, f'{name}.{ext.lower()}')


def output_names(inputs, out_dir, suffix, ext):
    """The output path of every input, checked before anything is written.

    Whether an image has alpha (then written as PNG) is known only once it is decoded, so each input
    is given both names it may write; two inputs that share a possible name are refused.

    Returns:
        dict: input path -> (output path without alpha, output path with alpha).

    Raises:
        ValueError: two inputs that may write the same file, or an output that is an input (both named).
    """
    names, owner = {}, {}
    inputs_real = {os.path.realpath(p): p for p in inputs}
    for path in inputs:
        both = (output_path(path, out_dir, suffix, ext), output_path(path, out_dir, suffix, ext, has_alpha=True))
        for target in set(both):
            key = os.path.realpath(target)
            if key in owner:
                raise ValueError(f'{owner[key]!r} and {path!r} would both be written to {target!r}; '
                                 'rename one, or use --suffix / --ext / separate runs')
            if key in inputs_real:
                raise ValueError(f'{path!r} would be written to {target!r}, which is the input '
                                 f'{inputs_real[key]!r}; use another output folder or --suffix')
            owner[key] = path
        names[path] = both
    return names


def is_out_of_memory(error):
    """True for ``MemoryError`` and for torch / OpenCV errors that report a failed allocation."""
    if isinstance(error, MemoryError) or type(error).__name__ == 'OutOfMemoryError':
        return True
    return isinstance(error, (RuntimeError, cv2.error)) and any(m in str(error).lower() for m in _OUT_OF_MEMORY)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='fmpsr-infer', description='Upscale images with an exported fmpsr network (Real-ESRGAN-style options). '
        'Exit status: 0 every image written, 1 some skipped (each reported), 2 bad options or model (nothing written).')
    parser.add_argument('-i', '--input', required=True, help='input image or folder')
    parser.add_argument('-o', '--output', default='results', help='output folder (default: results)')
    parser.add_argument('--model', '-m', required=True,
                        help='export folder or its net_g.safetensors (or the net_g_*.pth of an fmpsr run)')
    parser.add_argument('--outscale', '-s', type=float, default=None,
                        help='final upscale factor; the output is resized (Lanczos) after the network '
                             '(default: the network\'s scale)')
    parser.add_argument('--suffix', default='out', help='suffix of output names: <name>_<suffix>.<ext> (default: out)')
    parser.add_argument('--ext', choices=('auto',) + EXTENSIONS, default='auto',
                        help='output format; auto keeps the input\'s; images with alpha are always PNG')
    parser.add_argument('--tile', '-t', type=int, default=None,
                        help=f'tile size in LR pixels; 0 = never tile (default: {AUTO_TILE} for images of more than '
                             f'{AUTO_TILE_ABOVE:,} pixels, none below)')
    parser.add_argument('--tile-pad', '--tile_pad', type=int, default=10,
                        help='context around each tile, LR pixels (default 10)')
    parser.add_argument('--pre-pad', '--pre_pad', type=int, default=10,
                        help='reflection padding at the bottom/right of each image, LR pixels (default 10)')
    parser.add_argument('--max-pixels', type=int, default=DEFAULT_MAX_PIXELS,
                        help=f'refuse (skip) images of more pixels, checked before decoding; 0 = no limit '
                             f'(default {DEFAULT_MAX_PIXELS:,})')
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N (default auto)')
    parser.add_argument('--half', action='store_true', help='float16 inference (CUDA only)')
    parser.add_argument('--alpha-upsampler', '--alpha_upsampler', choices=ALPHA_UPSAMPLERS, default='network',
                        help='how the alpha channel is upscaled (default: network)')
    parser.add_argument('--overwrite', action='store_true', help='replace output files that already exist')
    return parser


def main(argv=None):
    """Command line entry point (``fmpsr-infer``).

    Prints one line per image written (stdout) and one per image skipped (stderr).

    Returns:
        int: 0 when every file was written, 1 when some were skipped (each is reported on stderr).

    Raises:
        SystemExit: bad options (status 2, argparse's message), before anything is written.
        ValueError, OSError: an unreadable or refused model, or inputs that would share an output file
            (:func:`cli` prints them in one line, status 2), before anything is written.
    """
    from tqdm import tqdm

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ('tile', 'tile_pad', 'pre_pad', 'max_pixels'):
        if (getattr(args, name) or 0) < 0:
            parser.error(f'--{name.replace("_", "-")} must be >= 0, got {getattr(args, name)}')
    if args.outscale is not None and args.outscale <= 0:
        parser.error(f'--outscale must be > 0, got {args.outscale}')
    try:
        resolve_device(args.device, args.half)
    except ValueError as err:
        parser.error(str(err))
    min_size = model_min_size(args.model)  # a bad model file: one line from cli(), status 2
    if args.tile and min_size and args.tile < min_size:
        parser.error(f'--tile {args.tile} is smaller than the minimum LR input of this network '
                     f'({min_size} pixels, ESA); use --tile {min_size} or more, or --tile 0')
    inputs = list_inputs(args.input)
    if not inputs:
        parser.error(f'-i {args.input!r}: the folder holds no files')
    names = output_names(inputs, args.output, args.suffix, args.ext)
    upscaler = Upscaler(args.model, args.device, args.half, args.tile, args.tile_pad, args.pre_pad)
    os.makedirs(args.output, exist_ok=True)
    failed = []
    for path in tqdm(inputs, unit='image', desc='upscaling', file=sys.stderr):
        try:
            img = read_image(path, args.max_pixels)
            target = names[path][int(img.ndim == 3 and img.shape[2] == 4)]
            if os.path.exists(target) and not args.overwrite:
                raise FileExistsError(f'{target!r} exists (use --overwrite to replace it)')
            out = upscaler.enhance(img, args.outscale, args.alpha_upsampler)
            write_image(target, out)
            tqdm.write(f'wrote {target} ({img.shape[1]}x{img.shape[0]} -> {out.shape[1]}x{out.shape[0]})',
                       file=sys.stdout)
        except Exception as err:  # noqa: BLE001 (bad images and memory errors are skipped; anything else is a bug)
            if not (isinstance(err, (ImageReadError, FileExistsError, ValueError, cv2.error, OSError))
                    or is_out_of_memory(err)):
                raise
            if is_out_of_memory(err):
                err = f'out of memory ({str(err).splitlines()[0] if str(err) else type(err).__name__}); ' \
                      'try a smaller --tile'
                if upscaler.device.type == 'cuda':
                    torch.cuda.empty_cache()
            failed.append(path)
            message = ' '.join(str(err).split())
            tqdm.write(f'skipped {path}: {message}', file=sys.stderr)
        finally:
            img = out = None
    written = len(inputs) - len(failed)
    print(f'{written} of {len(inputs)} images written to {args.output}', file=sys.stdout)
    if failed:
        print(f'{len(failed)} of {len(inputs)} files skipped: {", ".join(failed)}', file=sys.stderr)
    return 1 if failed else 0


def cli():
    """Console-script entry point (``fmpsr-infer``): :func:`main` with one-line errors for bad input
    (:func:`fmpsr.cli.run_cli`)."""
    from fmpsr.cli import run_cli
    run_cli(main, prog='fmpsr-infer', use_return_code=True)
