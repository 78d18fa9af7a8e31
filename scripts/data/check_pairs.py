"""Check that every HR / LR training pair shows the same part of the scene (no shifted pairs).

For each pair of same-named images in ``--gt`` and ``--lq`` (e.g. the sub-image folders of
``extract_subimages.py``) the HR must be exactly ``--scale`` times the LR in size, and the bicubic
downscale of the HR must line up with the LR. The HR is downscaled with the kernel of BasicSR's
MATLAB-like ``imresize`` (bicubic, antialiased, the one ``generate_bicubic_lr.py`` uses; exact away
from the borders), evaluated as strided sums with the HR shifted by every offset from ``-scale`` to
``+scale`` HR pixels in each direction (see :func:`pair_offset`), over the LR
interior (the kernel's reach plus the largest offset left out). The error of an offset is the mean
absolute difference to the LR in grey levels (0-255, channels averaged); a pair made by
``generate_bicubic_lr.py`` and cut aligned has about 0.15 (rounding) at offset 0. A pair is
*misaligned* when an offset other than 0 lowers the error by more than ``--tolerance`` grey levels
(default 0.1): the HR sub-image then starts ``dy`` HR pixels below and ``dx`` right of where its LR
sub-image does (e.g. +1..+3 at x4 when an HR that is not a multiple of 4 and its LR are cut in
separate runs). Offsets are found to the HR pixel, so they need not be whole LR pixels. Pairs whose
LR is not a bicubic downscale (JPEG, real cameras) still show the offset of smallest error; flat
content favours no offset and is not reported.

Each misaligned pair is printed on stdout with its offset; the script then fails (exit status 2)
with a one-line summary. Pairs too small to check (an LR side under about 11 pixels) are counted
and skipped.

Example::

    python scripts/data/check_pairs.py --gt datasets/DF2K/HR_sub --lq datasets/DF2K/LR_bicubic_sub/X4 --scale 4
"""
import argparse
import math
import os.path as osp
import sys
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from extract_subimages import pair_paths  # noqa: E402
from generate_bicubic_lr import check_scale, list_images, positive_int, read_image, to_bgr  # noqa: E402


def cubic(x):
    """MATLAB's bicubic kernel (a = -0.5), as in BasicSR's ``matlab_functions.cubic``."""
    ax = np.abs(x)
    return ((1.5 * ax ** 3 - 2.5 * ax ** 2 + 1) * (ax <= 1)
            + (-0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def downscale_taps(scale):
    """Taps of MATLAB's antialiased bicubic downscale by 1 / ``scale`` away from the borders.

    LR pixel i (0-based) is centred on HR coordinate ``scale * i + (scale - 1) / 2``; its value is
    ``sum(w[k] * hr[scale * i + offsets[k]])``.

    Returns:
        tuple: (offsets (int ndarray, HR pixels relative to ``scale * i``), weights (float64, sum 1)).
    """
    centre = (scale - 1) / 2
    offsets = np.arange(math.ceil(centre - 2 * scale), math.floor(centre + 2 * scale) + 1)
    weights = cubic((centre - offsets) / scale)
    keep = weights != 0
    offsets, weights = offsets[keep], weights[keep]
    return offsets, weights / weights.sum()


def _strided(img, axis, scale, shift, count, first, taps):
    """Downscale ``img`` (2-D) along ``axis`` (0: rows, 1: columns) for an HR that starts ``shift`` HR
    pixels later than the LR grid: LR indices ``first .. first + count - 1`` are
    ``sum_k w[k] * img[scale * i - shift + offsets[k]]``."""
    out = None
    for offset, weight in zip(*taps):
        start = scale * first - shift + offset
        index = [slice(None)] * img.ndim
        index[axis] = slice(start, start + scale * (count - 1) + 1, scale)
        term = weight * img[tuple(index)]
        out = term if out is None else out + term
    return out


def pair_offset(gt, lq, scale, max_shift=None, tolerance=0.1):
    """Offset between an HR image and its LR, in HR pixels (see the module docstring).

    Vertical offsets are tried with the horizontal one at 0 and the other way round; when neither
    scan finds an offset that lowers the error of (0, 0) by more than ``tolerance`` the pair is
    aligned, otherwise every (dy, dx) in ``[-max_shift, max_shift]^2`` is tried and the one of least
    error is returned.

    Args:
        gt (ndarray): HR, uint8, (H, W[, C]).
        lq (ndarray): LR, uint8, (H / scale, W / scale[, C]).
        scale (int): SR scale.
        max_shift (int | None): largest offset tried, HR pixels (default ``scale``).
        tolerance (float): grey levels (0-255).

    Returns:
        dict | None: ``dy``, ``dx`` (HR pixels; positive: the HR starts lower / further right than
        its LR), ``error_aligned`` and ``error_best`` (mean absolute difference, grey levels, at
        (0, 0) and at (dy, dx)), or None when the LR is too small to check.

    Raises:
        ValueError: the sizes are not those of an HR and its x``scale`` LR.
    """
    def gray(a):
        return to_bgr(a).astype(np.float32).mean(axis=2)
    g, q = gray(gt), gray(lq)
    (h, w), (lh, lw) = g.shape, q.shape
    if (h, w) != (lh * scale, lw * scale):
        raise ValueError(f'HR is {h}x{w} pixels, LR {lh}x{lw}: not x{scale}')
    max_shift = scale if max_shift is None else max_shift
    taps = downscale_taps(scale)
    taps = (taps[0], taps[1].astype(np.float32))
    reach = max(-taps[0].min(), taps[0].max()) + max_shift
    margin = math.ceil(reach / scale) + 1  # LR pixels left out at each border
    rows, cols = lh - 2 * margin, lw - 2 * margin
    if min(rows, cols) < 1:
        return None
    shifts = range(-max_shift, max_shift + 1)
    target = q[margin:margin + rows, margin:margin + cols]

    def error(down):
        return float(np.abs(down - target).mean())
    by_cols = _strided(g, 1, scale, 0, cols, margin, taps)  # (H, cols), horizontal offset 0
    by_rows = _strided(g, 0, scale, 0, rows, margin, taps)  # (rows, W), vertical offset 0
    errors = {(d, 0): error(_strided(by_cols, 0, scale, d, rows, margin, taps)) for d in shifts}
    errors.update({(0, d): error(_strided(by_rows, 1, scale, d, cols, margin, taps)) for d in shifts})
    if errors[0, 0] - min(errors.values()) > tolerance:  # not aligned: search every (dy, dx)
        for dx in shifts:
            by_cols = _strided(g, 1, scale, dx, cols, margin, taps)
            for dy in shifts:
                errors[dy, dx] = error(_strided(by_cols, 0, scale, dy, rows, margin, taps))
    best = min(errors, key=lambda k: (errors[k], abs(k[0]) + abs(k[1])))
    if errors[0, 0] - errors[best] <= tolerance:
        best = (0, 0)
    return {'dy': best[0], 'dx': best[1], 'error_aligned': errors[0, 0], 'error_best': errors[best]}


def check_pair(args):
    """Pool job: ``(name, gt path, lq path, scale, tolerance)`` -> ``(name, result or None, problem)``."""
    name, gt_path, lq_path, scale, tolerance = args
    gt, lq = read_image(gt_path), read_image(lq_path)
    try:
        return name, pair_offset(gt, lq, scale, tolerance=tolerance), None
    except ValueError as error:
        return name, None, f'{error} ({gt_path!r}, {lq_path!r})'



def check_pairs(gt_dir, lq_dir, scale, tolerance=0.1, workers=1, out=None):
    """Check every pair of ``gt_dir`` / ``lq_dir``; print each misaligned pair on ``out`` (default stdout).

    Returns:
        dict: ``pairs`` (checked), ``skipped`` (too small), ``misaligned`` ({name: result}).

    Raises:
        ValueError: the folders hold different names, or a pair's sizes are not x``scale`` (named).
    """
    scale = check_scale(scale)
    pairs = pair_paths(list_images(gt_dir), list_images(lq_dir))
    jobs = [(osp.splitext(osp.basename(g))[0], g, q, scale, tolerance) for g, q in pairs]
    bar = dict(total=len(jobs), unit='pair', desc=f'check pairs x{scale}', disable=None)
    if workers > 1:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap(check_pair, jobs, chunksize=8), **bar))
    else:
        results = [check_pair(job) for job in tqdm(jobs, **bar)]
    out = sys.stdout if out is None else out
    misaligned, skipped = {}, 0
    for name, result, problem in results:
        if problem:
            raise ValueError(f'pair {name!r}: {problem}')
        if result is None:
            skipped += 1
        elif result['dy'] or result['dx']:
            misaligned[name] = result
            print(f'{name}: misaligned: the HR starts {result["dy"]:+d} rows / {result["dx"]:+d} columns (HR pixels) '
                  f'from its LR (mean error {result["error_best"]:.2f} grey levels there, '
                  f'{result["error_aligned"]:.2f} as stored)', file=out)
    return {'pairs': len(jobs) - skipped, 'skipped': skipped, 'misaligned': misaligned}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--gt', required=True, help='folder of HR images (e.g. sub-images)')
    parser.add_argument('--lq', required=True, help='folder of their LR images, same names')
    parser.add_argument('--scale', required=True, type=int, help='SR scale')
    parser.add_argument('--tolerance', type=float, default=0.1,
                        help='grey levels (0-255) an offset must gain over offset 0 to count (default 0.1)')
    parser.add_argument('--workers', type=positive_int, default=1, help='processes (default 1)')
    args = parser.parse_args(argv)
    report = check_pairs(args.gt, args.lq, args.scale, args.tolerance, args.workers)
    skipped = f', {report["skipped"]} too small to check' if report['skipped'] else ''
    bad = report['misaligned']
    if bad:
        first = next(iter(bad))
        raise ValueError(f'{len(bad)} of {report["pairs"]} pairs in {args.gt!r} / {args.lq!r} are misaligned '
                         f'(listed above; e.g. {first!r} by {bad[first]["dy"]:+d} / {bad[first]["dx"]:+d} HR pixels)'
                         f'{skipped}: cut them again with extract_subimages.py --lq-input ... --scale {args.scale}')
    print(f'All {report["pairs"]} pairs aligned (x{args.scale}){skipped}')
    return report


if __name__ == '__main__':
    from fmpsr.cli import run_cli  # one line on stderr, exit status 2 for bad input (FMPSR_TRACEBACK=1: traceback)
    run_cli(main, prog='check_pairs.py')
