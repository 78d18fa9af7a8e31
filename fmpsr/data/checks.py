"""Check paired GT / LQ data sets before training starts, with errors that name the folder or file.

BasicSR finds most of these problems late (an assertion inside ``paired_paths_from_folder``, a
``ZeroDivisionError`` for an empty folder, an ``AttributeError`` deep in a worker for an unreadable
image). :func:`check_paired_dataset` runs on the options alone, before any experiment folder is
made. It lists each folder the way BasicSR's ``paired_paths_from_folder`` does (every regular file
that is not hidden) and refuses a file that is not an image (``notes.txt``, ``Thumbs.db``); it reads
image headers (PIL) and each PNG's / JPEG's last bytes, so it is cheap even for DF2K sub-images, and
decodes fully only an image whose end marker is missing (a truncated file) or whose format has none.
:func:`check_paths` opens and validates the checkpoint and mask files named under ``path`` (loaded
as fmpsr will load them: ``weights_only`` torch files, safetensors).

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
        DataCheckError: missing or empty folder / LMDB; a file BasicSR would read that is not an
            image; GT and LQ names that differ; a GT image whose size is not ``scale`` x its LQ's
            (exactly for training; validation GT may be up to scale - 1 pixels larger, BasicSR crops
            it); an image that cannot be read or is truncated.
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
        # with a meta_info_file BasicSR reads the files it lists; otherwise every file of the folders
        _check_folder_pair(roots['dataroot_gt'], roots['dataroot_lq'], dataset_opt.get('filename_tmpl', '{}'),
                           scale, where, exact, listed=not dataset_opt.get('meta_info_file'))


def _sizes_match(gt, lq, scale, exact):
    """GT (W, H) against LQ (W, H): equal to scale x LQ (training) or within one LQ pixel of it."""
    if exact:
        return gt == (lq[0] * scale, lq[1] * scale)
    return all(lq_side * scale <= gt_side < (lq_side + 1) * scale for gt_side, lq_side in zip(gt, lq))


def listed_files(folder):
    """The names BasicSR's ``scandir(folder)`` yields (``paired_paths_from_folder`` reads each of them):
    entries not starting with '.' that are regular files (or links to one), sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith('.') and e.is_file())


def _image_files(folder, where, key, listed=True):
    """The image names of ``folder``; with ``listed`` (BasicSR lists the folder) any other file is refused."""
    names = listed_files(folder)
    others = [f for f in names if not f.lower().endswith(IMAGE_EXTENSIONS)]
    if others and listed:
        raise DataCheckError(
            f'{where}.{key}: {osp.join(folder, others[0])!r} is not an image ({len(others)} such file(s): '
            f'{others[:3]}); BasicSR reads every file of the folder except hidden ones, so move it out '
            f'(images: {", ".join(IMAGE_EXTENSIONS)})')
    names = [f for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise DataCheckError(f'{where}.{key}: folder {folder!r} holds no images')
    return names


def _check_folder_pair(gt_root, lq_root, filename_tmpl, scale, where, exact, listed=True):
    gt_names = _image_files(gt_root, where, 'dataroot_gt', listed)
    lq_names = set(_image_files(lq_root, where, 'dataroot_lq', listed))
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


# the last bytes of a complete file: PNG's IEND chunk, JPEG's end-of-image marker
_END_MARKERS = {'PNG': (b'\x00\x00\x00\x00IEND\xaeB`\x82', 12), 'JPEG': (b'\xff\xd9', 64)}


def _header_size(path):
    """(W, H) of the image ``path``; raises DataCheckError when it cannot be read or is truncated.

    PNG / JPEG: the header and the file's last bytes are read (IEND chunk / EOI marker); only a file
    without them is decoded, to tell a truncated file from one with trailing bytes. Other formats
    are decoded fully."""
    try:
        with Image.open(path) as image:
            size, marker = image.size, _END_MARKERS.get(image.format)
            if marker is None or not _ends_with(path, *marker):
                image.load()  # raises OSError 'image file is truncated' for a cut-off file
            return size
    except Exception as error:
        raise DataCheckError(f'cannot read image {path!r}: it is damaged, truncated or not an image '
                             f'({type(error).__name__}: {error})') from error


def _ends_with(path, marker, window):
    """True when ``marker`` is among the last ``window`` bytes of ``path``."""
    with open(path, 'rb') as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - window))
        return marker in f.read()


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


CHECKPOINT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.state')


def validate_checkpoint(path, what):
    """Open ``path`` the way fmpsr will load it, so a bad file is refused before anything is written.

    ``.safetensors``: :func:`fmpsr.pruning.export.load_state` and its ``network_g`` metadata; anything
    else: :func:`fmpsr.compat.safe_torch_load` (``weights_only=True``, on the CPU).

    Args:
        path (str): the file.
        what (str): the option key, for messages (e.g. ``'path.pretrain_network_g'``).

    Raises:
        FileNotFoundError: no such file.
        fmpsr.compat.UnsafeCheckpointError: a torch file whose loading would run code.
        fmpsr.compat.CorruptCheckpointError (a ValueError): truncated, damaged or not a checkpoint;
            the message names the key and the file.
    """
    from fmpsr.compat import CorruptCheckpointError, safe_torch_load
    if not osp.isfile(path):
        raise FileNotFoundError(f'{what}: no such file {path!r}')
    if not path.endswith('.safetensors'):
        safe_torch_load(path, map_location='cpu', what=what)
        return
    from safetensors import SafetensorError

    from fmpsr.pruning.export import load_state, read_network_options
    try:
        load_state(path)
        read_network_options(path)
    except (SafetensorError, ValueError) as error:  # ValueError: bad JSON metadata, or a checked loader's error
        message = str(error)
        if path not in message:
            message = f'{path!r} cannot be read: it is truncated or not a safetensors file ({message})'
        raise CorruptCheckpointError(f'{what}: {message}') from error


def check_paths(opt):
    """Open and validate the files the option file names, before any experiment folder is made or
    renamed (a typo or a damaged download must not move an earlier run to ``*_archived_*``).

    Checked (:func:`validate_checkpoint`): every ``path.pretrain_network_*`` (unless the run resumes,
    which replaces it) and the ``weight_masks.safetensors`` beside a ``.safetensors`` one,
    ``path.weight_masks``, and any other ``path`` value naming an existing ``.safetensors`` / ``.pth``
    / ``.pt`` file. ``path.resume_state`` must exist; it and the network checkpoint it needs are
    loaded by :func:`fmpsr.compat.load_resume_state`, also before any folder is made. Data set folders
    and LMDBs are checked by :func:`check_datasets`.

    Raises:
        FileNotFoundError: the key and the missing path are named.
        fmpsr.compat.UnsafeCheckpointError, fmpsr.compat.CorruptCheckpointError: see
            :func:`validate_checkpoint`.
    """
    from fmpsr.pruning.export import MASKS_FILE
    path = opt.get('path') or {}
    resume = path.get('resume_state')
    if resume and not opt.get('auto_resume') and not osp.isfile(resume):
        raise FileNotFoundError(f'path.resume_state: no such file {resume!r}')
    resuming = _will_resume(opt)
    checked = set()
    for key, value in path.items():
        if key.startswith('pretrain_network') and value and not resuming:
            if not osp.isfile(value):
                hint = ''
                if osp.isdir(value):
                    hint = ' (it is a folder: name the file, e.g. its net_g.safetensors)'
                raise FileNotFoundError(f'path.{key}: no such file {value!r}{hint}')
            validate_checkpoint(value, f'path.{key}')
            checked.add(value)
            beside = osp.join(osp.dirname(value), MASKS_FILE)
            if value.endswith('.safetensors') and not path.get('weight_masks') and osp.isfile(beside):
                validate_checkpoint(beside, f'the weight masks beside path.{key}')
    masks = path.get('weight_masks')
    if masks:
        if not osp.isfile(masks):
            raise FileNotFoundError(f'path.weight_masks: no such file {masks!r}')
        validate_checkpoint(masks, 'path.weight_masks')
        checked.add(masks)
    for key, value in path.items():
        if (key != 'resume_state' and not key.startswith('pretrain_network') and isinstance(value, str)
                and value.endswith(CHECKPOINT_SUFFIXES[:3]) and value not in checked and osp.isfile(value)):
            validate_checkpoint(value, f'path.{key}')
