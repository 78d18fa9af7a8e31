"""Check paired GT / LQ data sets before training starts, with errors that name the folder or file.

BasicSR finds most of these problems late (an assertion inside ``paired_paths_from_folder``, a
``ZeroDivisionError`` for an empty folder, an ``AttributeError`` deep in a worker for an unreadable
image). :func:`check_paired_dataset` runs on the options alone, before any experiment folder is
made. It reads only image headers (PIL), so it is cheap even for DF2K sub-images.
:func:`check_paths` checks the checkpoint and mask files named under ``path``.

Grayscale and RGBA images need no check: BasicSR decodes with ``cv2.IMREAD_COLOR``, which converts
them to 3-channel BGR.
"""
import os
import os.path as osp

from PIL import Image

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
PAIRED_TYPES = ('PairedImageDataset',)


class DataCheckError(ValueError):
    """A data set that cannot be trained or tested on; the message names the key, folder or file."""


def check_paired_dataset(dataset_opt, scale, phase_key):
    """Check one ``datasets.<phase>`` entry of type ``PairedImageDataset``.

    Args:
        dataset_opt (dict): the entry (``dataroot_gt``, ``dataroot_lq``, ``io_backend``, ...).
        scale (int): the option file's ``scale``.
        phase_key (str): its key in ``datasets`` (for messages), e.g. ``'train'``.

    Raises:
        DataCheckError: missing or empty folder / LMDB; GT and LQ names that differ; a GT image
            whose size is not ``scale`` x its LQ's (exactly for training; validation GT may be up to
            scale - 1 pixels larger, BasicSR crops it); an image whose header cannot be read.
    """
    if dataset_opt.get('type') not in PAIRED_TYPES:
        return
    where = f'datasets.{phase_key}'
    backend = (dataset_opt.get('io_backend') or {}).get('type', 'disk')
    roots = {}
    for key in ('dataroot_gt', 'dataroot_lq'):
        root = dataset_opt.get(key)
        if not root:
            raise DataCheckError(f'{where}.{key} is missing')
        if not osp.isdir(root):
            raise DataCheckError(f'{where}.{key}: folder {root!r} does not exist')
        roots[key] = root
    # training crops need GT = scale x LQ exactly; validation crops the GT to scale x LQ itself
    exact = dataset_opt.get('phase', phase_key.split('_')[0]) == 'train'
    if backend == 'lmdb':
        _check_lmdb_pair(roots['dataroot_gt'], roots['dataroot_lq'], scale, where, exact)
    elif backend == 'disk':
        _check_folder_pair(roots['dataroot_gt'], roots['dataroot_lq'], dataset_opt.get('filename_tmpl', '{}'),
                           scale, where, exact)


def _sizes_match(gt, lq, scale, exact):
    """GT (W, H) against LQ (W, H): equal to scale x LQ (training) or within one LQ pixel of it."""
    if exact:
        return gt == (lq[0] * scale, lq[1] * scale)
    return all(lq_side * scale <= gt_side < (lq_side + 1) * scale for gt_side, lq_side in zip(gt, lq))


def _image_files(folder, where, key):
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise DataCheckError(f'{where}.{key}: folder {folder!r} holds no images')
    return names


def _check_folder_pair(gt_root, lq_root, filename_tmpl, scale, where, exact):
    gt_names = _image_files(gt_root, where, 'dataroot_gt')
    lq_names = set(_image_files(lq_root, where, 'dataroot_lq'))
    expected = {}
    for name in gt_names:
        base, ext = osp.splitext(name)
        expected[name] = f'{filename_tmpl.format(base)}{ext}'
    missing = [lq for lq in expected.values() if lq not in lq_names]
    extra = sorted(lq_names - set(expected.values()))
    if missing or extra:
        raise DataCheckError(
            f'{where}: GT {gt_root!r} and LQ {lq_root!r} do not pair up (filename_tmpl {filename_tmpl!r}): '
            f'{len(missing)} GT image(s) without LQ, e.g. {missing[:3]}; {len(extra)} LQ image(s) without GT, '
            f'e.g. {extra[:3]}')
    for gt_name, lq_name in expected.items():
        gt_size = _header_size(osp.join(gt_root, gt_name))
        lq_size = _header_size(osp.join(lq_root, lq_name))
        if not _sizes_match(gt_size, lq_size, scale, exact):
            raise DataCheckError(
                f'{where}: {osp.join(gt_root, gt_name)!r} is {gt_size[0]}x{gt_size[1]} (WxH) but its LQ '
                f'{osp.join(lq_root, lq_name)!r} is {lq_size[0]}x{lq_size[1]}; at scale {scale} the GT must be '
                f'{lq_size[0] * scale}x{lq_size[1] * scale}')


def _header_size(path):
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:
        raise DataCheckError(f'cannot read image {path!r}: {error}') from error


def _lmdb_meta(root, where, key):
    meta = osp.join(root, 'meta_info.txt')
    if not osp.isfile(osp.join(root, 'data.mdb')) or not osp.isfile(meta):
        raise DataCheckError(f'{where}.{key}: {root!r} is not a BasicSR LMDB (needs data.mdb and meta_info.txt)')
    entries = {}
    with open(meta) as f:
        for line_number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                h, w, _ = (int(v) for v in parts[1].strip('()').split(','))
            except (IndexError, ValueError) as error:
                raise DataCheckError(f'{meta}:{line_number}: cannot parse {line.strip()!r}') from error
            entries[osp.splitext(parts[0])[0]] = (w, h)
    if not entries:
        raise DataCheckError(f'{where}.{key}: LMDB {root!r} is empty (meta_info.txt lists nothing)')
    return entries


def _check_lmdb_pair(gt_root, lq_root, scale, where, exact):
    gt, lq = _lmdb_meta(gt_root, where, 'dataroot_gt'), _lmdb_meta(lq_root, where, 'dataroot_lq')
    if set(gt) != set(lq):
        only_gt, only_lq = sorted(set(gt) - set(lq)), sorted(set(lq) - set(gt))
        raise DataCheckError(f'{where}: LMDB keys differ between GT {gt_root!r} and LQ {lq_root!r}: '
                             f'{len(only_gt)} only in GT, e.g. {only_gt[:3]}; {len(only_lq)} only in LQ, e.g. {only_lq[:3]}')
    for key, (w, h) in gt.items():
        lw, lh = lq[key]
        if not _sizes_match((w, h), (lw, lh), scale, exact):
            raise DataCheckError(f'{where}: LMDB key {key!r} is {w}x{h} in GT {gt_root!r} but {lw}x{lh} in LQ '
                                 f'{lq_root!r}; at scale {scale} the GT must be {lw * scale}x{lh * scale}')


def check_datasets(opt):
    """Check every data set of a parsed option file: paired ones fully (:func:`check_paired_dataset`),
    others for the existence of their ``dataroot_*`` folders and ``meta_info_file``."""
    for phase_key, dataset_opt in (opt.get('datasets') or {}).items():
        check_paired_dataset(dataset_opt, opt.get('scale', 1), phase_key)
        if dataset_opt.get('type') not in PAIRED_TYPES:
            _check_roots_exist(dataset_opt, f'datasets.{phase_key}')
        meta = dataset_opt.get('meta_info_file')
        if meta and not osp.isfile(meta):
            raise DataCheckError(f'datasets.{phase_key}.meta_info_file: no such file {meta!r}')


def _check_roots_exist(dataset_opt, where):
    for key, root in dataset_opt.items():
        if key.startswith('dataroot') and isinstance(root, str) and not osp.exists(root):
            raise DataCheckError(f'{where}.{key}: {root!r} does not exist')


def _will_resume(opt):
    """True when BasicSR will resume from a training state (whose checkpoint then replaces
    ``path.pretrain_network_*``)."""
    path = opt.get('path') or {}
    if opt.get('auto_resume'):
        root = path.get('experiments_root') or osp.join('experiments', str(opt.get('name')))
        states = osp.join(root, 'training_states')
        if osp.isdir(states) and any(f.endswith('.state') for f in os.listdir(states)):
            return True
        return False
    return bool(path.get('resume_state'))


def check_paths(opt):
    """Check that the files the option file names exist, before any experiment folder is made or
    renamed (a typo must not move an earlier run to ``*_archived_*``).

    Checked: ``path.resume_state`` (unless ``--auto_resume``), every ``path.pretrain_network_*``
    (unless the run resumes, which replaces it), ``path.weight_masks``. Data set folders and LMDBs are
    checked by :func:`check_datasets`.

    Raises:
        FileNotFoundError: the key and the missing path are named.
    """
    path = opt.get('path') or {}
    resume = path.get('resume_state')
    if resume and not opt.get('auto_resume') and not osp.isfile(resume):
        raise FileNotFoundError(f'path.resume_state: no such file {resume!r}')
    resuming = _will_resume(opt)
    for key, value in path.items():
        if key.startswith('pretrain_network') and value and not resuming and not osp.isfile(value):
            hint = ''
            if osp.isdir(value):
                hint = ' (it is a folder: name the file, e.g. its net_g.safetensors)'
            raise FileNotFoundError(f'path.{key}: no such file {value!r}{hint}')
    masks = path.get('weight_masks')
    if masks and not osp.isfile(masks):
        raise FileNotFoundError(f'path.weight_masks: no such file {masks!r}')
