"""Make bicubic LR images from a folder of HR images, the way the SR benchmarks do.

For every image in ``--input`` (png/jpg/jpeg/bmp/tif/tiff, any case) the HR image is read with
OpenCV (BGR, uint8), grayscale becomes 3 channels and RGBA becomes RGB (alpha dropped), it is
mod-cropped to (H - H % scale, W - W % scale) pixels, and downscaled by ``1 / scale`` with BasicSR's
MATLAB-like ``imresize`` (bicubic, antialiased) in float32 [0, 1], then rounded and clipped to
uint8. The LR image, (H // scale, W // scale, 3) pixels, is written as ``<name>.png`` in
``--output``; with ``--gt-output`` the mod-cropped HR is written there as ``<name>.png`` too.

The HR of a training pair must be the mod-cropped HR: the LR only covers its top-left
(H - H % scale, W - W % scale) pixels, and sub-images cut from the uncropped HR and from the LR do
not line up. So without ``--gt-output`` every input must already be a multiple of the scale (checked
from the file headers before anything is written; the file at fault is named).

Example::

    python scripts/data/generate_bicubic_lr.py --input datasets/DIV2K/DIV2K_train_HR_original \\
        --gt-output datasets/DIV2K/DIV2K_train_HR --output datasets/DIV2K/DIV2K_train_LR_bicubic/X4 --scale 4

The helpers here (:func:`list_images`, :func:`read_image`, :func:`check_output_dir`) are also used
by the sibling scripts ``extract_subimages.py`` and ``build_demo_dataset.py``.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile
from multiprocessing import Pool

import cv2
import numpy as np
from tqdm import tqdm

from fmpsr.compat import patch_basicsr

patch_basicsr()  # must run before the first basicsr import

from basicsr.data.transforms import mod_crop  # noqa: E402
from basicsr.utils import imfrombytes, scandir  # noqa: E402
from basicsr.utils.matlab_functions import imresize  # noqa: E402


def quiet_opencv():
    """Keep OpenCV's own log (``[ WARN:0@...] ...`` lines) to errors: the data scripts report a bad
    file themselves, in one line that names it. Called on import, so every data script gets it."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


quiet_opencv()

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
    img, message = (None, '') if truncated else _decode(content)
    if img is None or 'premature end' in message.lower():
        raise ValueError(f'cannot read image {path!r}: the file is truncated or not a valid image'
                         + (f' (decoder: {message})' if message else ''))
    if message:  # e.g. libjpeg's "Corrupt JPEG data: N extraneous bytes": one line naming the file
        print(f'warning: image {path!r}: decoder says: {message}', file=sys.stderr)
    if img.dtype != np.uint8:
        raise ValueError(f'image {path!r} is {img.dtype}; only 8-bit images are supported')
    return img


def _decode(content):
    """Decode image bytes (``cv2.IMREAD_UNCHANGED``) and return ``(image or None, decoder message)``.

    libjpeg writes its warnings ("Corrupt JPEG data: premature end of data segment", a grey-padded
    image) straight to file descriptor 2, past OpenCV's log level; they are caught here so that the
    caller can name the file. File descriptor 2 is swapped during the call: not for use from several
    threads at once (the data scripts use processes).
    """
    sys.stderr.flush()
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            img = imfrombytes(content, flag='unchanged')
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        lines = [line.strip() for line in err.read().decode(errors='replace').splitlines() if line.strip()]
    return img, '; '.join(lines)


def image_size(path):
    """``(H, W)`` of an image file from its header (Pillow), or None when Pillow cannot tell."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            width, height = im.size
        return height, width
    except Exception:  # noqa: BLE001 (the full read names a bad file later)
        return None


def check_multiple_of_scale(paths, scale):
    """Raise ValueError naming the first file whose size is not a multiple of ``scale`` (and how many
    there are); sizes from the file headers, so nothing is decoded."""
    bad = []
    for path in paths:
        size = image_size(path)
        if size is not None and (size[0] % scale or size[1] % scale):
            bad.append((path, size))
    if bad:
        path, (h, w) = bad[0]
        raise ValueError(f'image {path!r} is {h}x{w} pixels, not a multiple of the scale {scale} '
                         f'({len(bad)} of {len(paths)} images are not): its LR covers only the top-left '
                         f'{h - h % scale}x{w - w % scale} pixels, so sub-images of this HR and of its LR '
                         'would not line up; pass --gt-output FOLDER to write the mod-cropped HR there and '
                         'use that folder as the HR of the pairs')


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


def by_stem(paths, output='{}.png'):
    """``{name without extension: path}`` of ``paths``.

    Raises:
        ValueError: two paths with one name (``a.png``, ``a.jpg``), which would write the same output
            (``output`` formatted with the name, for the message); both are named.
    """
    names = {}
    for path in paths:
        name = osp.splitext(osp.basename(path))[0]
        if name in names:
            raise ValueError(f'{names[name]!r} and {path!r} would both be written as {output.format(name)}')
        names[name] = path
    return names


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
    img = to_bgr(read_image(path))
    if gt_dir is None and (img.shape[0] % scale or img.shape[1] % scale):
        check_multiple_of_scale([path], scale)  # the header did not tell: refuse now, naming the file
        raise ValueError(f'image {path!r} is {img.shape[0]}x{img.shape[1]} pixels, not a multiple of the '
                         f'scale {scale}; pass --gt-output to write the mod-cropped HR')
    hr = mod_crop(img, scale)
    if hr.shape[0] == 0 or hr.shape[1] == 0:
        raise ValueError(f'image {path!r} is smaller than the scale {scale}')
    lr_path = osp.join(lr_dir, f'{name}.png')
    write_image(lr_path, bicubic_downscale(hr, scale))
    if gt_dir is not None:
        write_image(osp.join(gt_dir, f'{name}.png'), hr)
    return lr_path


def write_image(path, img, params=()):
    """``cv2.imwrite`` that raises OSError naming ``path`` when nothing was written (full disk, bad folder)."""
    if not cv2.imwrite(path, img, list(params)):
        raise OSError(f'could not write image {path!r}')


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
            holds images, an unreadable image, or (without ``gt_dir``) an image whose size is not a
            multiple of ``scale`` (named; checked before anything is written).
    """
    scale = check_scale(scale)
    by_stem(hr_paths, '{}.png')
    if gt_dir is not None and osp.abspath(gt_dir) == osp.abspath(lr_dir):
        raise ValueError(f'the LR and GT output folders are the same folder {lr_dir!r}')
    if gt_dir is None:
        check_multiple_of_scale(hr_paths, scale)
    in_dirs = {osp.dirname(p) for p in hr_paths}
    for out_dir in (lr_dir, gt_dir):
        if out_dir is not None:
            check_output_dir(out_dir, in_dirs, overwrite)
    jobs = [(p, lr_dir, scale, gt_dir) for p in hr_paths]
    desc = f'LR x{scale}'
    if workers > 1:
        with Pool(workers, initializer=_init_worker) as pool:
            return list(tqdm(pool.imap(_process, jobs), total=len(jobs), unit='img', desc=desc, disable=None))
    return [_process(job) for job in tqdm(jobs, unit='img', desc=desc, disable=None)]


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
    parser.add_argument('--gt-output', help='also write the mod-cropped HR images (<name>.png) here: the HR '
                        'of the training pairs (required when an input is not a multiple of the scale)')
    parser.add_argument('--workers', type=positive_int, default=1, help='processes (default 1)')
    parser.add_argument('--overwrite', action='store_true', help='write into output folders that hold images')
    args = parser.parse_args(argv)
    paths = generate_bicubic_lr(list_images(args.input), args.output, args.scale, args.gt_output, args.workers,
                                args.overwrite)
    print(f'Wrote {len(paths)} LR images (x{args.scale}) to {args.output}'
          + (f' and their mod-cropped HR to {args.gt_output}' if args.gt_output else ''))
    return paths


if __name__ == '__main__':
    from fmpsr.cli import run_cli  # one line on stderr, exit status 2 for bad input (FMPSR_TRACEBACK=1: traceback)
    run_cli(main, prog='generate_bicubic_lr.py')
