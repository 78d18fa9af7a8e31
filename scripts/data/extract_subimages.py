"""Cut every image of a folder into overlapping square sub-images (BasicSR's DIV2K practice).

Same positions and names as BasicSR's ``scripts/data_preparation/extract_subimages.py``: for an
(H, W) image the top rows are ``range(0, H - crop_size + 1, step)``, plus ``H - crop_size`` when
the uncovered remainder at the bottom is larger than ``thresh_size`` pixels; the same for columns.
Sub-images are numbered from 1, row-major, and written as ``<name>_s<index:03d>.png`` (images are
kept as stored: channels and bit depth unchanged). Unlike BasicSR, names are not stripped of
``x2``/``x3``/``x4``/``x8``, and outputs are always PNG.

To get aligned HR/LR sub-images, run it on the HR folder with (crop_size, step, thresh_size) and on
the LR xS folder with (crop_size / S, step / S, thresh_size / S), e.g. for DIV2K x4::

    python scripts/data/extract_subimages.py --input datasets/DIV2K/DIV2K_train_HR \\
        --output datasets/DIV2K/DIV2K_train_HR_sub --crop-size 480 --step 240 --workers 8
    python scripts/data/extract_subimages.py --input datasets/DIV2K/DIV2K_train_LR_bicubic/X4 \\
        --output datasets/DIV2K/DIV2K_train_LR_bicubic/X4_sub --crop-size 120 --step 60 --workers 8
"""
import argparse
import os.path as osp
import sys
from multiprocessing import Pool

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from generate_bicubic_lr import check_output_dir, list_images, positive_int, read_image  # noqa: E402


def crop_positions(length, crop_size, step, thresh_size=0):
    """Start offsets (pixels) of the crops along one axis of ``length`` pixels.

    ``range(0, length - crop_size + 1, step)``, plus ``length - crop_size`` if the remainder after
    the last crop is larger than ``thresh_size``. Empty if ``length < crop_size``.
    """
    positions = list(range(0, length - crop_size + 1, step))
    if positions and length - (positions[-1] + crop_size) > thresh_size:
        positions.append(length - crop_size)
    return positions


def extract_image(path, out_dir, crop_size, step, thresh_size=0, compression=3):
    """Write the sub-images of one image file.

    Args:
        path (str): image file, (H, W[, C]) pixels with H, W >= ``crop_size``.
        out_dir (str): existing output folder.
        crop_size, step, thresh_size (int): in pixels, see :func:`crop_positions`.
        compression (int): PNG compression level 0..9.

    Returns:
        int: the number of sub-images written.

    Raises:
        ValueError: unreadable image or image smaller than ``crop_size`` (the file is named).
    """
    img = read_image(path)
    h, w = img.shape[:2]
    if h < crop_size or w < crop_size:
        raise ValueError(f'image {path!r} is {h}x{w} pixels, smaller than the crop size {crop_size}')
    name = osp.splitext(osp.basename(path))[0]
    index = 0
    for x in crop_positions(h, crop_size, step, thresh_size):
        for y in crop_positions(w, crop_size, step, thresh_size):
            index += 1
            sub = np.ascontiguousarray(img[x:x + crop_size, y:y + crop_size, ...])
            cv2.imwrite(osp.join(out_dir, f'{name}_s{index:03d}.png'), sub,
                        [cv2.IMWRITE_PNG_COMPRESSION, compression])
    return index


def _extract_job(args):
    return extract_image(*args)


def extract_subimages(paths, out_dir, crop_size, step, thresh_size=0, workers=1, compression=3,
                      overwrite=False):
    """Write the sub-images of every image file in ``paths`` to ``out_dir``.

    Args:
        paths (list[str]): image files.
        out_dir (str): output folder (created; must not hold images unless ``overwrite``).
        crop_size (int): sub-image side in pixels, >= 1.
        step (int): stride in pixels, >= 1.
        thresh_size (int): remainder (pixels) above which a last, border-aligned crop is added.
        workers (int): processes; 1 runs in this process.
        compression (int): PNG compression level 0..9.
        overwrite (bool): allow an output folder that already holds images.

    Returns:
        int: the total number of sub-images written.

    Raises:
        ValueError: bad sizes, two inputs with the same base name, an output folder holding
            images, or a bad input image (named).
    """
    for arg, value in (('crop_size', crop_size), ('step', step)):
        if int(value) != value or value < 1:
            raise ValueError(f'{arg} must be an integer >= 1, got {value!r}')
    if thresh_size < 0:
        raise ValueError(f'thresh_size must be >= 0, got {thresh_size!r}')
    if not 0 <= compression <= 9:
        raise ValueError(f'PNG compression must be in 0..9, got {compression!r}')
    names = {}
    for path in paths:
        name = osp.splitext(osp.basename(path))[0]
        if name in names:
            raise ValueError(f'{names[name]!r} and {path!r} would both be cut into {name}_sNNN.png')
        names[name] = path
    check_output_dir(out_dir, {osp.dirname(p) for p in paths}, overwrite)
    jobs = [(p, out_dir, crop_size, step, thresh_size, compression) for p in paths]
    desc = f'sub-images {crop_size}px'
    if workers > 1:
        with Pool(workers) as pool:
            counts = list(tqdm(pool.imap_unordered(_extract_job, jobs), total=len(jobs), unit='img', desc=desc))
    else:
        counts = [_extract_job(job) for job in tqdm(jobs, unit='img', desc=desc)]
    return sum(counts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', required=True, help='folder of images')
    parser.add_argument('--output', required=True, help='folder for the sub-images (<name>_s001.png, ...)')
    parser.add_argument('--crop-size', required=True, type=positive_int, help='sub-image side, pixels')
    parser.add_argument('--step', required=True, type=positive_int, help='stride between sub-images, pixels')
    parser.add_argument('--thresh-size', type=int, default=0,
                        help='add a last, border-aligned crop when the remainder exceeds this (pixels, default 0)')
    parser.add_argument('--workers', type=positive_int, default=1, help='processes (default 1)')
    parser.add_argument('--compression', type=int, default=3, help='PNG compression level 0..9 (default 3)')
    parser.add_argument('--overwrite', action='store_true', help='write into an output folder that holds images')
    args = parser.parse_args(argv)
    total = extract_subimages(list_images(args.input), args.output, args.crop_size, args.step, args.thresh_size,
                              args.workers, args.compression, args.overwrite)
    print(f'Wrote {total} sub-images to {args.output}')
    return total


if __name__ == '__main__':
    from fmpsr.cli import run_cli  # one line on stderr, exit status 2 for bad input (FMPSR_TRACEBACK=1: traceback)
    run_cli(main, prog='extract_subimages.py')
