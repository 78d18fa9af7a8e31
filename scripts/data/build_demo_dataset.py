"""Build the small demo SR data set from the colour photographs bundled with scikit-image.

No download: the images are the files of the installed ``skimage.data`` package folder.
Train: astronaut, hubble_deep_field, ihc, motorcycle_left, retina, rocket. Validation: chelsea,
coffee. (motorcycle_right is a near-duplicate of motorcycle_left and is not used, so no scene is in
both splits.) Layout, for scale S::

    OUT/train/HR/<name>.png                      full HR, mod-cropped to multiples of S pixels
    OUT/train/LR_bicubic/XS/<name>.png           bicubic LR (MATLAB-like imresize), HR / S
    OUT/train/HR_sub/<name>_sNNN.png             HR sub-images, crop-size px every step px
    OUT/train/LR_bicubic_sub/XS/<name>_sNNN.png  aligned LR sub-images, crop-size / S every step / S
    OUT/val/HR/<name>.png, OUT/val/LR_bicubic/XS/<name>.png   full mod-cropped HR and its LR
    OUT/holdout/HR/<name>.png, OUT/holdout/LR_bicubic/XS/<name>.png   held-out evaluation set: the two
                                                 validation photographs and six grey photographs of
                                                 skimage.data (brick, camera, coins, grass, gravel, moon)
    OUT/README.txt                               what is where, which image is in which split

The LR images are made from the full HR (``generate_bicubic_lr.py``) and both are then cut into
sub-images in one run (``extract_subimages.py``'s paired mode: each LR crop is the HR crop divided by
S), the usual DIV2K practice. The build goes into a hidden
temporary folder next to OUT that is renamed to OUT when complete; ``OUT/.complete_xS`` (written
last) marks a finished build, and running again with the same settings is a quick no-op.

Example::

    python scripts/data/build_demo_dataset.py --output datasets/demo --scale 4
"""
import argparse
import os
import os.path as osp
import shutil
import sys

TRAIN_IMAGES = {  # output name -> file in the skimage.data folder
    'astronaut': 'astronaut.png',
    'hubble_deep_field': 'hubble_deep_field.jpg',
    'ihc': 'ihc.png',
    'motorcycle_left': 'motorcycle_left.png',
    'retina': 'retina.jpg',
    'rocket': 'rocket.jpg',
}
VAL_IMAGES = {'chelsea': 'chelsea.png', 'coffee': 'coffee.png'}
# Held-out evaluation (``OUT/holdout``): the validation photographs and the grey photographs of skimage.data
# (read as 3-channel images, scored on Y like the others). No run trains on them, none is chosen on them.
HOLDOUT_IMAGES = dict(VAL_IMAGES, brick='brick.png', camera='camera.png', coins='coins.png', grass='grass.png',
                      gravel='gravel.png', moon='moon.png')


def _settings(scale, crop_size, step):
    return f'scale={scale} crop_size={crop_size} step={step} holdout={len(HOLDOUT_IMAGES)}\n'


def is_complete(output, scale, crop_size=192, step=96):
    """True if ``output`` holds a finished build with these settings (its marker file says so)."""
    marker = osp.join(output, f'.complete_x{scale}')
    if not osp.isfile(marker):
        return False
    with open(marker) as f:
        return f.read() == _settings(scale, crop_size, step)


def _older_build(output, scale):
    """True if ``output`` is a complete build of an earlier version of this script (its marker file has no
    ``holdout=``): generated data that a rebuild replaces, nothing of the user's."""
    marker = osp.join(output, f'.complete_x{scale}')
    if not osp.isfile(marker):
        return False
    with open(marker) as f:
        text = f.read()
    return text.startswith('scale=') and 'holdout=' not in text


def _remove_stale_tmp(parent, prefix):
    """Delete ``<prefix><pid>`` folders left by builds whose process no longer exists."""
    for entry in os.listdir(parent):
        pid = entry[len(prefix):]
        if not (entry.startswith(prefix) and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(osp.join(parent, entry), ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _source_paths(names):
    import skimage.data
    folder = osp.dirname(skimage.data.__file__)
    paths = [osp.join(folder, names[n]) for n in sorted(names)]
    for path in paths:
        if not osp.isfile(path):
            raise FileNotFoundError(f'scikit-image data file {path!r} is missing (this install of '
                                    'scikit-image lacks its bundled images)')
    return paths


def _readme(scale, crop_size, step, n_sub):
    import skimage
    rows = [
        ('train/HR/<name>.png', f'full HR images, mod-cropped to multiples of {scale} pixels'),
        (f'train/LR_bicubic/X{scale}/<name>.png', f'bicubic LR (BasicSR MATLAB-like imresize), HR / {scale}'),
        ('train/HR_sub/<name>_sNNN.png', f'{n_sub} HR sub-images, {crop_size}x{crop_size} px, step {step} px'),
        (f'train/LR_bicubic_sub/X{scale}/<name>_sNNN.png',
         f'the aligned LR sub-images, {crop_size // scale}x{crop_size // scale} px, step {step // scale} px'),
        ('val/HR/<name>.png', 'full HR images, mod-cropped'),
        (f'val/LR_bicubic/X{scale}/<name>.png', 'their bicubic LR'),
        ('holdout/HR/<name>.png', 'held-out evaluation: full HR images, mod-cropped'),
        (f'holdout/LR_bicubic/X{scale}/<name>.png', 'their bicubic LR'),
    ]
    width = max(len(path) for path, _ in rows) + 2
    lines = [
        'fmpsr demo SR data set, built by scripts/data/build_demo_dataset.py (do not edit by hand).',
        f'Scale x{scale}. Source: the photographs bundled with scikit-image {skimage.__version__} '
        "(folder skimage/data; the docstrings of skimage.data's functions give each image's origin and licence).",
        '',
        *(path.ljust(width) + text for path, text in rows),
        '',
        'train: ' + ', '.join(f'{n} ({f})' for n, f in sorted(TRAIN_IMAGES.items())),
        'val:   ' + ', '.join(f'{n} ({f})' for n, f in sorted(VAL_IMAGES.items())),
        'holdout: ' + ', '.join(f'{n} ({f})' for n, f in sorted(HOLDOUT_IMAGES.items())),
        'motorcycle_right is not used: it is a near-duplicate of motorcycle_left (train).',
    ]
    return '\n'.join(lines) + '\n'


def _build(root, scale, crop_size, step, workers):
    """Write the whole data set under ``root``; returns the number of sub-image pairs."""
    here = osp.dirname(osp.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from extract_subimages import extract_pairs, pair_paths
    from generate_bicubic_lr import generate_bicubic_lr, list_images

    lr = f'LR_bicubic/X{scale}'
    for split, names in (('train', TRAIN_IMAGES), ('val', VAL_IMAGES), ('holdout', HOLDOUT_IMAGES)):
        generate_bicubic_lr(_source_paths(names), osp.join(root, split, lr), scale,
                            gt_dir=osp.join(root, split, 'HR'), workers=workers)
    train = osp.join(root, 'train')
    pairs = pair_paths(list_images(osp.join(train, 'HR')), list_images(osp.join(train, lr)))
    n_sub = extract_pairs(pairs, osp.join(train, 'HR_sub'), osp.join(train, f'LR_bicubic_sub/X{scale}'), scale,
                          crop_size, step, workers=workers)
    hr_sub, lr_sub = (sorted(os.listdir(osp.join(train, d))) for d in ('HR_sub', f'LR_bicubic_sub/X{scale}'))
    assert len(hr_sub) == n_sub and hr_sub == lr_sub, 'HR and LR sub-images do not pair up'
    stems = {split: {osp.splitext(n)[0] for n in os.listdir(osp.join(root, split, 'HR'))} for split in ('train', 'val')}
    assert stems['train'].isdisjoint(stems['val']), f'image in both splits: {stems["train"] & stems["val"]}'
    holdout = {osp.splitext(n)[0] for n in os.listdir(osp.join(root, 'holdout', 'HR'))}
    assert stems['train'].isdisjoint(holdout), f'training image held out: {stems["train"] & holdout}'
    with open(osp.join(root, 'README.txt'), 'w') as f:
        f.write(_readme(scale, crop_size, step, n_sub))
    return n_sub


def build_demo_dataset(output, scale=4, crop_size=192, step=96, workers=1, force=False):
    """Build the demo data set into ``output`` unless a complete build with these settings is there.

    Args:
        output (str): destination folder.
        scale (int): SR scale >= 2; ``crop_size`` and ``step`` (HR pixels) must be multiples of it.
        workers (int): processes for resizing / cropping.
        force (bool): replace an existing ``output`` that is not a complete build with these settings.

    Returns:
        bool: True if it built, False if a complete build was already there.

    Raises:
        ValueError: bad sizes, or ``output`` exists (not empty, not this build) without ``force``.
        FileNotFoundError: a bundled scikit-image file is missing.
    """
    if int(scale) != scale or scale < 2:
        raise ValueError(f'scale must be an integer >= 2, got {scale!r}')
    for arg, value in (('crop_size', crop_size), ('step', step)):
        if value < scale or value % scale:
            raise ValueError(f'{arg} must be a positive multiple of the scale {scale}, got {value!r}')
    for other in (VAL_IMAGES, HOLDOUT_IMAGES):
        assert set(TRAIN_IMAGES).isdisjoint(other) and set(TRAIN_IMAGES.values()).isdisjoint(other.values())
    output = osp.abspath(output)
    if is_complete(output, scale, crop_size, step):
        print(f'{output} already holds the complete demo data set ({_settings(scale, crop_size, step).strip()}); '
              'nothing to do')
        return False
    if _older_build(output, scale) and not force:
        print(f'{output} holds an earlier demo build (no held-out set): building it again')
        force = True
    if osp.exists(output) and os.listdir(output) and not force:
        raise ValueError(f'{output!r} exists but is not a complete demo build with '
                         f'{_settings(scale, crop_size, step).strip()}; remove it or pass --force')
    parent, name = osp.split(output)
    os.makedirs(parent, exist_ok=True)
    for prefix in (f'.{name}.tmp-', f'.{name}.old-'):
        _remove_stale_tmp(parent, prefix)
    tmp = osp.join(parent, f'.{name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        n_sub = _build(tmp, scale, crop_size, step, workers)
        with open(osp.join(tmp, f'.complete_x{scale}'), 'w') as f:  # last file written
            f.write(_settings(scale, crop_size, step))
        old = None
        if osp.exists(output):
            old = osp.join(parent, f'.{name}.old-{os.getpid()}')
            os.rename(output, old)
        try:
            os.rename(tmp, output)
        except OSError:
            if not is_complete(output, scale, crop_size, step):  # not another build finishing first
                raise
            print(f'{output} was completed by another process meanwhile')
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f'Built the demo data set (x{scale}, {n_sub} train sub-image pairs) in {output}')
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('--output', default='datasets/demo', help='destination folder (default datasets/demo)')
    parser.add_argument('--scale', type=int, default=4, help='SR scale, integer >= 2 (default 4)')
    parser.add_argument('--crop-size', type=int, default=192, help='HR sub-image side, pixels (default 192)')
    parser.add_argument('--step', type=int, default=96, help='HR sub-image stride, pixels (default 96)')
    parser.add_argument('--workers', type=int, default=1, help='processes (default 1)')
    parser.add_argument('--force', action='store_true', help='replace an existing output folder')
    args = parser.parse_args(argv)
    return build_demo_dataset(args.output, args.scale, args.crop_size, args.step, max(args.workers, 1), args.force)


if __name__ == '__main__':
    from fmpsr.cli import run_cli  # one line on stderr, exit status 2 for bad input (FMPSR_TRACEBACK=1: traceback)
    run_cli(main, prog='build_demo_dataset.py')
