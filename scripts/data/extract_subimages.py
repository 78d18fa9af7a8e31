"""Cut every image of a folder into overlapping square sub-images (BasicSR's DIV2K practice).

Same positions and names as BasicSR's ``scripts/data_preparation/extract_subimages.py``: for an
(H, W) image the top rows are ``range(0, H - crop_size + 1, step)``, plus ``H - crop_size`` when
the uncovered remainder at the bottom is larger than ``thresh_size`` pixels; the same for columns.
Sub-images are numbered from 1, row-major, and written as ``<name>_s<index:03d>.png`` (images are
kept as stored: channels and bit depth unchanged). Unlike BasicSR, names are not stripped of
``x2``/``x3``/``x4``/``x8``, and outputs are always PNG.

Training pairs: cut the HR and the LR folder in ONE run (``--lq-input``, ``--lq-output``,
``--scale``). The positions are worked out once, on the HR, and every LR crop is the HR crop divided
by the scale: (y / S, x / S, crop_size / S), so each pair covers the same scene. ``crop_size`` and
``step`` must be multiples of S, the LR of an (H, W) HR must be (H // S, W // S) pixels (the file
pair is named otherwise), and an HR that is not a multiple of S is cut within its top-left
(H - H % S, W - W % S) pixels, the part its LR was made from. (Cutting the two folders in separate
runs puts the last, border-aligned crop of an HR that is not a multiple of S ``H % S`` HR pixels
away from its LR crop.) E.g. for DIV2K x4::

    python scripts/data/extract_subimages.py --input datasets/DIV2K/DIV2K_train_HR \\
        --output datasets/DIV2K/DIV2K_train_HR_sub --lq-input datasets/DIV2K/DIV2K_train_LR_bicubic/X4 \\
        --lq-output datasets/DIV2K/DIV2K_train_LR_bicubic/X4_sub --scale 4 --crop-size 480 --step 240 --workers 8

``scripts/data/check_pairs.py`` checks afterwards that every pair lines up.
"""
import argparse
import os.path as osp
import sys
from multiprocessing import Pool

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from generate_bicubic_lr import (by_stem, check_output_dir, check_scale, list_images, positive_int, read_image,  # noqa: E402
                                 write_image)


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
            write_image(osp.join(out_dir, f'{name}_s{index:03d}.png'), sub, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    return index


def extract_pair(hr_path, lq_path, out_dir, lq_out_dir, scale, crop_size, step, thresh_size=0, compression=3):
    """Write the aligned sub-images of one HR / LR file pair.

    The crop positions are those of :func:`crop_positions` on the HR extent the LR was made from,
    (h * scale, w * scale) for an (h, w) LR; the LR crop of the HR crop at (y, x) is at
    (y / scale, x / scale), ``crop_size / scale`` pixels square. Both get the same name.

    Args:
        hr_path, lq_path (str): HR image, (H, W[, C]) pixels, and its LR, (H // scale, W // scale[, C]).
        out_dir, lq_out_dir (str): existing output folders of the HR and the LR sub-images.
        scale (int): SR scale; ``crop_size``, ``step`` (HR pixels) are multiples of it.
        thresh_size (int): HR pixels, see :func:`crop_positions`.

    Returns:
        int: the number of sub-image pairs written.

    Raises:
        ValueError: unreadable image, an LR whose size is not the HR's divided by ``scale``, or an HR
            smaller than ``crop_size`` (the files are named).
    """
    hr, lq = read_image(hr_path), read_image(lq_path)
    (h, w), (lh, lw) = hr.shape[:2], lq.shape[:2]
    if (lh, lw) != (h // scale, w // scale):
        raise ValueError(f'LR image {lq_path!r} is {lh}x{lw} pixels, not those of its HR {hr_path!r} '
                         f'({h}x{w}) divided by the scale {scale} ({h // scale}x{w // scale}): not its x{scale} LR')
    h, w = lh * scale, lw * scale
    if h < crop_size or w < crop_size:
        raise ValueError(f'image {hr_path!r} is {h}x{w} pixels (mod-cropped), smaller than the crop size {crop_size}')
    name = osp.splitext(osp.basename(hr_path))[0]
    lq_crop, flags = crop_size // scale, [cv2.IMWRITE_PNG_COMPRESSION, compression]
    index = 0
    for y in crop_positions(h, crop_size, step, thresh_size):
        for x in crop_positions(w, crop_size, step, thresh_size):
            index += 1
            ly, lx = y // scale, x // scale  # exact: crop_size, step and h, w are multiples of scale
            write_image(osp.join(out_dir, f'{name}_s{index:03d}.png'),
                        np.ascontiguousarray(hr[y:y + crop_size, x:x + crop_size, ...]), flags)
            write_image(osp.join(lq_out_dir, f'{name}_s{index:03d}.png'),
                        np.ascontiguousarray(lq[ly:ly + lq_crop, lx:lx + lq_crop, ...]), flags)
    return index


def _pair_job(args):
    return extract_pair(*args)


def pair_paths(hr_paths, lq_paths, show=5):
    """``[(hr, lq)]`` matched by base name without extension; ValueError listing names on one side only."""
    hr, lq = by_stem(hr_paths, '{}_sNNN.png'), by_stem(lq_paths, '{}_sNNN.png')
    only_hr, only_lq = sorted(set(hr) - set(lq)), sorted(set(lq) - set(hr))
    if only_hr or only_lq:
        raise ValueError(f'the HR and LR folders hold different images: {len(only_hr)} without an LR '
                         f'(e.g. {only_hr[:show]}), {len(only_lq)} without an HR (e.g. {only_lq[:show]})')
    return [(hr[n], lq[n]) for n in sorted(hr)]


def extract_pairs(pairs, out_dir, lq_out_dir, scale, crop_size, step, thresh_size=0, workers=1, compression=3,
                  overwrite=False):
    """Write the aligned HR / LR sub-images of every ``(hr, lq)`` file pair (see :func:`extract_pair`).

    Returns:
        int: the number of sub-image pairs written.

    Raises:
        ValueError: bad sizes (``crop_size`` and ``step`` must be multiples of ``scale``), an output
            folder that holds images or is an input folder, or a bad image pair (named). Sizes and
            folders are checked before anything is written.
    """
    scale = check_scale(scale)
    _check_sizes(crop_size, step, thresh_size, compression)
    for arg, value in (('crop_size', crop_size), ('step', step)):
        if value % scale:
            raise ValueError(f'{arg} must be a multiple of the scale {scale} (the LR crop is {arg} / scale), '
                             f'got {value!r}')
    if osp.abspath(out_dir) == osp.abspath(lq_out_dir):
        raise ValueError(f'--output and --lq-output are the same folder {out_dir!r}')
    inputs = {osp.dirname(p) for pair in pairs for p in pair}
    for folder in (out_dir, lq_out_dir):
        check_output_dir(folder, inputs, overwrite)
    jobs = [(hr, lq, out_dir, lq_out_dir, scale, crop_size, step, thresh_size, compression) for hr, lq in pairs]
    return _run(_pair_job, jobs, workers, f'sub-image pairs {crop_size}px')


def _check_sizes(crop_size, step, thresh_size, compression):
    for arg, value in (('crop_size', crop_size), ('step', step)):
        if int(value) != value or value < 1:
            raise ValueError(f'{arg} must be an integer >= 1, got {value!r}')
    if thresh_size < 0:
        raise ValueError(f'thresh_size must be >= 0, got {thresh_size!r}')
    if not 0 <= compression <= 9:
        raise ValueError(f'PNG compression must be in 0..9, got {compression!r}')


def _run(job, jobs, workers, desc):
    """Run ``job`` over ``jobs`` (in ``workers`` processes); progress bar only on a terminal. Sum of results."""
    if workers > 1:
        with Pool(workers) as pool:
            return sum(tqdm(pool.imap_unordered(job, jobs), total=len(jobs), unit='img', desc=desc, disable=None))
    return sum(job(j) for j in tqdm(jobs, unit='img', desc=desc, disable=None))


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
    _check_sizes(crop_size, step, thresh_size, compression)
    by_stem(paths, '{}_sNNN.png')
    check_output_dir(out_dir, {osp.dirname(p) for p in paths}, overwrite)
    jobs = [(p, out_dir, crop_size, step, thresh_size, compression) for p in paths]
    return _run(_extract_job, jobs, workers, f'sub-images {crop_size}px')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', required=True, help='folder of images (the HR of pairs)')
    parser.add_argument('--output', required=True, help='folder for the sub-images (<name>_s001.png, ...)')
    parser.add_argument('--lq-input',
                        help='folder of the LR images of --input (same names): cut both together, aligned')
    parser.add_argument('--lq-output', help='folder for the LR sub-images (with --lq-input)')
    parser.add_argument('--scale', type=int, help='SR scale of the pairs (with --lq-input)')
    parser.add_argument('--crop-size', required=True, type=positive_int, help='sub-image side, (HR) pixels')
    parser.add_argument('--step', required=True, type=positive_int, help='stride between sub-images, (HR) pixels')
    parser.add_argument('--thresh-size', type=int, default=0,
                        help='add a last, border-aligned crop when the remainder exceeds this (pixels, default 0)')
    parser.add_argument('--workers', type=positive_int, default=1, help='processes (default 1)')
    parser.add_argument('--compression', type=int, default=3, help='PNG compression level 0..9 (default 3)')
    parser.add_argument('--overwrite', action='store_true', help='write into an output folder that holds images')
    args = parser.parse_args(argv)
    paired = (args.lq_input, args.lq_output, args.scale)
    if any(v is not None for v in paired):
        if any(v is None for v in paired):
            parser.error('--lq-input, --lq-output and --scale go together (cutting HR / LR pairs)')
        pairs = pair_paths(list_images(args.input), list_images(args.lq_input))
        total = extract_pairs(pairs, args.output, args.lq_output, args.scale, args.crop_size, args.step,
                              args.thresh_size, args.workers, args.compression, args.overwrite)
        print(f'Wrote {total} aligned sub-image pairs (x{args.scale}) to {args.output} and {args.lq_output}')
        return total
    total = extract_subimages(list_images(args.input), args.output, args.crop_size, args.step, args.thresh_size,
                              args.workers, args.compression, args.overwrite)
    print(f'Wrote {total} sub-images to {args.output}')
    return total


if __name__ == '__main__':
    from fmpsr.cli import run_cli  # one line on stderr, exit status 2 for bad input (FMPSR_TRACEBACK=1: traceback)
    run_cli(main, prog='extract_subimages.py')
