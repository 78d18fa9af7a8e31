"""Pack GT and LQ image folders into BasicSR-format LMDBs (``data.mdb`` + ``meta_info.txt``).

The LMDB key of an image is its file name without extension (``0001_s001.png`` -> ``0001_s001``),
the convention of BasicSR's ``make_lmdb_from_imgs`` and ``PairedImageDataset``. Before anything is
written the script checks that the GT and LQ folders hold the same keys and that every key is
ASCII without dots or whitespace (BasicSR reads keys back from ``meta_info.txt`` up to the first
dot and splits its lines at spaces): a file named otherwise is refused in one line that names it.
Each LMDB is built under a temporary name next to its destination and renamed into place when
complete; an existing destination is left alone unless ``--overwrite``. The LMDB holds what BasicSR's
``make_lmdb_from_imgs`` writes (each image re-encoded as PNG with ``compress_level``, and a
``meta_info.txt`` line ``<key>.png (h,w,c) <level>`` per image); the progress bar is shown only on a
terminal, and each LMDB ends with one summary line on stdout.

Examples::

    python scripts/data/create_lmdb.py --gt datasets/DIV2K/DIV2K_train_HR_sub \\
        --lq datasets/DIV2K/DIV2K_train_LR_bicubic/X4_sub \\
        --gt-lmdb datasets/DIV2K/DIV2K_train_HR_sub.lmdb \\
        --lq-lmdb datasets/DIV2K/DIV2K_train_LR_bicubic_X4_sub.lmdb
    python scripts/data/create_lmdb.py --single datasets/Set5/GTmod4 --lmdb datasets/Set5_GT.lmdb
"""
import argparse
import os
import os.path as osp
import shutil
import sys
from multiprocessing import Pool

import lmdb
from tqdm import tqdm

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from generate_bicubic_lr import list_images, positive_int, read_image  # noqa: E402  (also patches basicsr)

import cv2  # noqa: E402

COMMIT_EVERY = 5000  # images per LMDB transaction, BasicSR's default batch


def image_keys(folder):
    """``{key: file name}`` of the images in ``folder``; key = file name without extension.

    Raises:
        FileNotFoundError / ValueError: missing or empty folder (named).
        ValueError: a key with a dot, whitespace or non-ASCII characters, or two files with the same
            key (the files are named).
    """
    keys = {}
    for path in list_images(folder):
        name = osp.basename(path)
        key = osp.splitext(name)[0]
        if '.' in key or any(c.isspace() for c in key) or not key.isascii():
            raise ValueError(f'{path!r}: LMDB key {key!r} must be ASCII without dots or whitespace '
                             '(BasicSR cuts keys at the first dot); rename the file')
        if key in keys:
            raise ValueError(f'{osp.join(folder, keys[key])!r} and {path!r} have the same LMDB key {key!r}')
        keys[key] = name
    return keys


def check_same_keys(gt_keys, lq_keys, gt_dir, lq_dir, show=5):
    """Raise ValueError listing up to ``show`` keys missing on each side unless the key sets match."""
    only_gt, only_lq = sorted(set(gt_keys) - set(lq_keys)), sorted(set(lq_keys) - set(gt_keys))
    if only_gt or only_lq:
        raise ValueError(f'GT folder {gt_dir!r} and LQ folder {lq_dir!r} hold different images: '
                         f'{len(only_gt)} missing from LQ (e.g. {only_gt[:show]}), '
                         f'{len(only_lq)} missing from GT (e.g. {only_lq[:show]})')


def check_lmdb_path(lmdb_path, overwrite):
    """Raise ValueError unless ``lmdb_path`` ends with ``.lmdb`` and does not exist (or ``overwrite``)."""
    if not lmdb_path.endswith('.lmdb'):
        raise ValueError(f'LMDB path {lmdb_path!r} must end with .lmdb (BasicSR requires it)')
    if osp.exists(lmdb_path) and not overwrite:
        raise ValueError(f'LMDB {lmdb_path!r} already exists; remove it or pass --overwrite')


def _read_job(args):
    """Pool job: ``(folder, file name, key, compress_level)`` -> ``(key, PNG bytes, (h, w, c))``, what
    BasicSR's ``lmdb_util.read_img_worker`` returns, but a truncated, undecodable or non-8-bit image
    is refused with its name (ValueError)."""
    folder, name, key, compress_level = args
    img = read_image(osp.join(folder, name))
    h, w, c = img.shape if img.ndim == 3 else (*img.shape, 1)
    ok, data = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise ValueError(f'cannot encode image {osp.join(folder, name)!r} as PNG')
    return key, data, (h, w, c)


def _fill_lmdb(folder, names, keys, lmdb_path, map_size, n_thread, compress_level):
    """Write the images into a new LMDB at ``lmdb_path``, in key order, as BasicSR's
    ``make_lmdb_from_imgs`` does (same values and ``meta_info.txt``), without its per-key output."""
    jobs = [(folder, name, key, compress_level) for name, key in zip(names, keys)]
    env = lmdb.open(lmdb_path, map_size=map_size)
    pool = Pool(n_thread) if n_thread > 1 else None
    try:
        results = pool.imap(_read_job, jobs, chunksize=16) if pool else map(_read_job, jobs)
        txn = env.begin(write=True)
        with open(osp.join(lmdb_path, 'meta_info.txt'), 'w') as meta:
            for index, (key, data, (h, w, c)) in enumerate(tqdm(results, total=len(jobs), unit='img',
                                                                desc=osp.basename(lmdb_path), disable=None)):
                txn.put(key.encode('ascii'), data)
                meta.write(f'{key}.png ({h},{w},{c}) {compress_level}\n')
                if (index + 1) % COMMIT_EVERY == 0:
                    txn.commit()
                    txn = env.begin(write=True)
        txn.commit()
    finally:
        if pool:
            pool.terminate()
        env.close()


def write_lmdb(folder, keys, lmdb_path, n_thread=1, compress_level=1):
    """Build ``lmdb_path`` from the images ``keys`` (``{key: file name}``) of ``folder``.

    Built as ``.<name>.partial.lmdb`` next to ``lmdb_path`` and renamed into place at the end, so an
    interrupted run never leaves a complete-looking LMDB; an existing ``lmdb_path`` is replaced.

    Raises:
        ValueError: an image is unreadable (the file is named).
    """
    lmdb_path = osp.abspath(lmdb_path)
    partial = osp.join(osp.dirname(lmdb_path), f'.{osp.basename(lmdb_path)[:-5]}.partial.lmdb')
    if osp.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(osp.dirname(lmdb_path), exist_ok=True)
    key_list = sorted(keys)
    names = [keys[k] for k in key_list]
    # Generous bound on the re-encoded PNG size (a JPEG can grow ~20x as PNG); the file stays sparse.
    map_size = (1 << 28) + sum(os.path.getsize(osp.join(folder, n)) * (30 if n.lower().endswith(('.jpg', '.jpeg'))
                                                                        else 4) for n in names)
    os.makedirs(partial)
    try:
        _fill_lmdb(folder, names, key_list, partial, map_size, n_thread, compress_level)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if osp.exists(lmdb_path):
        shutil.rmtree(lmdb_path)
    os.rename(partial, lmdb_path)


def create_paired_lmdb(gt_dir, lq_dir, gt_lmdb, lq_lmdb, n_thread=1, overwrite=False):
    """Check GT/LQ keys and output paths, then build both LMDBs. Returns the number of pairs.

    Raises:
        ValueError: different key sets, bad keys, bad or existing output paths (all before writing).
    """
    if osp.abspath(gt_lmdb) == osp.abspath(lq_lmdb):
        raise ValueError(f'--gt-lmdb and --lq-lmdb are the same path {gt_lmdb!r}')
    gt_keys, lq_keys = image_keys(gt_dir), image_keys(lq_dir)
    check_same_keys(gt_keys, lq_keys, gt_dir, lq_dir)
    for path in (gt_lmdb, lq_lmdb):
        check_lmdb_path(path, overwrite)
    write_lmdb(gt_dir, gt_keys, gt_lmdb, n_thread)
    write_lmdb(lq_dir, lq_keys, lq_lmdb, n_thread)
    return len(gt_keys)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--gt', help='folder of GT (HR) images')
    parser.add_argument('--lq', help='folder of LQ (LR) images, same file names as --gt')
    parser.add_argument('--gt-lmdb', help='output GT LMDB folder (must end with .lmdb)')
    parser.add_argument('--lq-lmdb', help='output LQ LMDB folder (must end with .lmdb)')
    parser.add_argument('--single', help='one folder to pack instead of a GT/LQ pair (use with --lmdb)')
    parser.add_argument('--lmdb', help='output LMDB folder for --single')
    parser.add_argument('--n-thread', type=positive_int, default=1, help='processes reading images (default 1)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output LMDBs')
    args = parser.parse_args(argv)
    if args.single or args.lmdb:
        if not (args.single and args.lmdb) or any((args.gt, args.lq, args.gt_lmdb, args.lq_lmdb)):
            parser.error('--single needs --lmdb, and neither goes with --gt/--lq/--gt-lmdb/--lq-lmdb')
        keys = image_keys(args.single)
        check_lmdb_path(args.lmdb, args.overwrite)
        write_lmdb(args.single, keys, args.lmdb, args.n_thread)
        print(f'Wrote {len(keys)} images to {args.lmdb}')
        return len(keys)
    if not all((args.gt, args.lq, args.gt_lmdb, args.lq_lmdb)):
        parser.error('give --gt, --lq, --gt-lmdb and --lq-lmdb (or --single and --lmdb)')
    count = create_paired_lmdb(args.gt, args.lq, args.gt_lmdb, args.lq_lmdb, args.n_thread, args.overwrite)
    print(f'Wrote {count} GT/LQ pairs to {args.gt_lmdb} and {args.lq_lmdb}')
    return count


if __name__ == '__main__':
    from fmpsr.cli import run_cli  # one line on stderr, exit status 2 for bad input (FMPSR_TRACEBACK=1: traceback)
    run_cli(main, prog='create_lmdb.py')
