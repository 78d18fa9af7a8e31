"""Make bicubic LR images from a folder of HR images, the way the SR benchmarks do.

For every image in ``--input`` (png/jpg/jpeg/bmp/tif/tiff, any case) the HR image is read with
OpenCV (BGR, uint8), grayscale becomes 3 channels and RGBA becomes RGB (alpha dropped), it is
mod-cropped to (H - H % scale, W - W % scale) pixels, and downscaled by ``1 / scale`` with BasicSR's
MATLAB-like ``imresize`` (bicubic, antialiased) in float32 [0, 1], then rounded and clipped to
uint8. The LR image, (H // scale, W // scale, 3) pixels, is written as ``<name>.png`` in
``--output``; with ``--gt-output`` the mod-cropped HR is written there as ``<name>.png`` too.

Example::

    python scripts/data/generate_bicubic_lr.py --input datasets/DIV2K/DIV2K_train_HR \\
        --output datasets/DIV2K/DIV2K_train_LR_bicubic/X4 --scale 4 --workers 4

The helpers here (:func:`list_images`, :func:`read_image`, :func:`check_output_dir`) are also used
by the sibling scripts ``extract_subimages.py`` and ``build_demo_dataset.py``.
"""
import argparse
import os
import os.path as osp
import sys
from multiprocessing import Pool

import cv2
import numpy as np
from tqdm import tqdm

from fmpsr.compat import patch_basicsr

patch_basicsr()  # must run before the first basicsr import

from basicsr.data.transforms import mod_crop  # noqa: E402
from basicsr.utils import imfrombytes, scandir  # noqa: E402
from basicsr.utils.matlab_functions import imresize  # noqa: E402

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
_PNG_END = b'IEND\xaeB`\x82'  # the last 8 bytes of every complete PNG file
_JPEG_END = b'\xff\xd9'  # JPEG end-of-image marker


def list_images(folder):
    """Sorted full paths of the images (``IMG_EXTENSIONS``, any case) directly in ``folder``.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.
        ValueError: ``folder`` holds no image.
    """
    if not osp.isdir(folder):
        raise FileNotFoundError(f'input folder {folder!r} does not exist or is not a folder')
    paths = sorted(p for p in scandir(folder, full_path=True) if p.lower().endswith(IMG_EXTENSIONS))
    if not paths:
        raise ValueError(f'input folder {folder!r} holds no image ({"/".join(IMG_EXTENSIONS)})')
    return paths


def read_image(path):
    """Read an image file as stored (``cv2.IMREAD_UNCHANGED``) and check it is complete.

    Returns:
        ndarray: uint8, (H, W) grayscale or (H, W, C) with C in 1, 3 (BGR) or 4 (BGRA), in pixels.

    Raises:
        ValueError: the file cannot be decoded, is truncated (PNG without IEND, JPEG without its
            end marker: ``cv2.imread`` decodes such a JPEG grey-padded with only a warning), or is
            not 8 bits per channel. The message names the file.
    """
    with open(path, 'rb') as f:
        content = f.read()
    ext = osp.splitext(path)[1].lower()
    tail = content[-4096:]  # tolerate a little trailing padding after the end marker
    truncated = (ext == '.png' and _PNG_END not in tail) or (ext in ('.jpg', '.jpeg') and _JPEG_END not in tail)
    img = None if truncated else imfrombytes(content, flag='unchanged')
    if img is None:
        raise ValueError(f'cannot read image {path!r}: the file is truncated or not a valid image')
    if img.dtype != np.uint8:
        raise ValueError(f'image {path!r} is {img.dtype}; only 8-bit images are supported')
    return img


def to_bgr(img):
    """(H, W) / (H, W, 1) grayscale -> (H, W, 3); (H, W, 4) BGRA -> (H, W, 3) (alpha dropped)."""
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return np.ascontiguousarray(img[:, :, :3])
    return img


def check_scale(scale):
    """Return ``scale`` as an int; raise ValueError (naming the value) unless it is an integer >= 2."""
    try:
        ok = float(scale) == int(float(scale)) and int(float(scale)) >= 2
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f'scale must be an integer >= 2, got {scale!r}')
    return int(float(scale))


def check_output_dir(folder, input_folders=(), overwrite=False):
    """Create ``folder`` if needed; refuse (ValueError naming it) if it already holds images
    (unless ``overwrite``) or is one of ``input_folders``."""
    for inp in input_folders:
        if osp.isdir(folder) and osp.isdir(inp) and osp.samefile(folder, inp):
            raise ValueError(f'output folder {folder!r} is the input folder; choose another one')
    if not overwrite and osp.isdir(folder) and any(
            name.lower().endswith(IMG_EXTENSIONS) for name in os.listdir(folder)):
        raise ValueError(f'output folder {folder!r} already holds images; remove it or pass --overwrite')
    os.makedirs(folder, exist_ok=True)


def bicubic_downscale(img, scale):
    """MATLAB-like bicubic downscaling of a uint8 image.

    Args:
        img (ndarray): uint8, (H, W, C) with H and W multiples of ``scale``, in pixels.
        scale (int): downscaling factor.

    Returns:
        ndarray: uint8, (H // scale, W // scale, C).
    """
    lr = imresize(img.astype(np.float32) / 255., 1 / scale)
    return np.clip(np.round(lr * 255.), 0, 255).astype(np.uint8)


def _process(args):
    """Pool worker: one HR file -> LR png (and mod-cropped HR png). Returns the LR path."""
    path, lr_dir, scale, gt_dir = args
    name = osp.splitext(osp.basename(path))[0]
    hr = mod_crop(to_bgr(read_image(path)), scale)
    if hr.shape[0] == 0 or hr.shape[1] == 0:
        raise ValueError(f'image {path!r} is smaller than the scale {scale}')
    lr_path = osp.join(lr_dir, f'{name}.png')
    cv2.imwrite(lr_path, bicubic_downscale(hr, scale))
    if gt_dir is not None:
        cv2.imwrite(osp.join(gt_dir, f'{name}.png'), hr)
    return lr_path


def _init_worker():
    import torch
    torch.set_num_threads(1)


def generate_bicubic_lr(hr_paths, lr_dir, scale, gt_dir=None, workers=1, overwrite=False):
    """Write the bicubic LR (and optionally the mod-cropped HR) of every image in ``hr_paths``.

    Args:
        hr_paths (list[str]): HR image files; output names are their base names + ``.png``.
        lr_dir (str): folder for the LR images (created; must not hold images yet).
        scale (int): integer downscaling factor >= 2.
        gt_dir (str | None): folder for the mod-cropped HR images, or None.
        workers (int): processes; 1 runs in this process.
        overwrite (bool): allow output folders that already hold images (same names are replaced).

    Returns:
        list[str]: the LR files written, in the order of ``hr_paths``.

    Raises:
        ValueError: bad scale, two inputs with the same base name, an output folder that already
            holds images, or an unreadable image (named).
    """
    scale = check_scale(scale)
    names = {}
    for path in hr_paths:
        name = osp.splitext(osp.basename(path))[0]
        if name in names:
            raise ValueError(f'{names[name]!r} and {path!r} would both be written as {name}.png')
        names[name] = path
    if gt_dir is not None and osp.abspath(gt_dir) == osp.abspath(lr_dir):
        raise ValueError(f'the LR and GT output folders are the same folder {lr_dir!r}')
    in_dirs = {osp.dirname(p) for p in hr_paths}
    for out_dir in (lr_dir, gt_dir):
        if out_dir is not None:
            check_output_dir(out_dir, in_dirs, overwrite)
    jobs = [(p, lr_dir, scale, gt_dir) for p in hr_paths]
    desc = f'LR x{scale}'
    if workers > 1:
        with Pool(workers, initializer=_init_worker) as pool:
            return list(tqdm(pool.imap(_process, jobs), total=len(jobs), unit='img', desc=desc))
    return [_process(job) for job in tqdm(jobs, unit='img', desc=desc)]


def _scale_arg(value):
    try:
        return check_scale(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def positive_int(value):
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {value!r}')
    return number


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', required=True, help='folder of HR images')
    parser.add_argument('--output', required=True, help='folder for the LR images (<name>.png)')
    parser.add_argument('--scale', required=True, type=_scale_arg, help='integer downscaling factor >= 2')
    parser.add_argument('--gt-output', help='also write the mod-cropped HR images (<name>.png) here')
    parser.add_argument('--workers', type=positive_int, default=1, help='processes (default 1)')
    parser.add_argument('--overwrite', action='store_true', help='write into output folders that hold images')
    args = parser.parse_args(argv)
    paths = generate_bicubic_lr(list_images(args.input), args.output, args.scale, args.gt_output, args.workers,
                                args.overwrite)
    print(f'Wrote {len(paths)} LR images (x{args.scale}) to {args.output}')
    return paths


if __name__ == '__main__':
    from fmpsr.cli import run_cli  # one line on stderr, exit status 2 for bad input (FMPSR_TRACEBACK=1: traceback)
    run_cli(main, prog='generate_bicubic_lr.py')
