"""Every key of an option file that a model reads, checked before anything runs.

:func:`check_option_keys` refuses, in one line that names the key and the closest known one
(``difflib``), an unknown key at the top level or under ``train``, ``val``, ``logger``, ``path``,
``dist_params`` and ``datasets.<phase>`` (and ``io_backend``); an ``network_g`` argument its arch's
``__init__`` does not take; an optimiser, scheduler, loss or metric ``type`` that BasicSR would not
build (and arguments their constructors do not take); ``val_freq`` / ``print_freq`` /
``save_checkpoint_freq`` / ``total_iter`` that are not positive numbers; ``use_hflip`` / ``use_rot``
that are not booleans; a ``gt_size`` larger than the smallest training image. :mod:`fmpsr.pipeline`
calls it right after parsing, before the model's own checks and before any experiment folder exists.

The keys a model reads depend on its class: the allow-lists below (:data:`TRAIN_KEYS`,
:data:`TOP_KEYS`) are keyed by class name and joined over the model's MRO. A model class of your own
may add keys with a class attribute ``option_keys = {'train': {...}, 'top': {...}}``. Sections of a
model class that has no entry in its MRO (BasicSR's video / GAN models) are not checked.
"""
import difflib
import inspect
import os.path as osp

__all__ = ['OptionKeyError', 'check_option_keys', 'check_required', 'closest', 'SUPPORTED_OPTIMIZERS']


class OptionKeyError(ValueError):
    """An option file key or value that no model would read as written; the message names it."""


# keys parse_options sets itself (a value in the file is overwritten)
_SET_BY_PARSER = {'is_train', 'dist', 'rank', 'world_size', 'auto_resume', 'root_path'}
_BASIC_TOP = {'name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'path', 'train',
              'val', 'logger', 'dist_params', 'find_unused_parameters', 'deterministic'} | _SET_BY_PARSER
# top-level keys by model class (joined over the MRO)
TOP_KEYS = {
    'SRModel': _BASIC_TOP,
    'SRGANModel': {'network_d'},
    'PrunedSRModel': {'scratch_baseline'},  # scripts/scratch_baseline.py records what it built
    'PruningModel': {'pruning'},
    'FMPModel': {'pruning'},
}
# train keys by model class (joined over the MRO); finetune is read by the pruning methods and
# carried, unused, by the comparison's dense / scratch cells
TRAIN_KEYS = {
    'SRModel': {'optim_g', 'scheduler', 'total_iter', 'warmup_iter', 'pixel_opt', 'perceptual_opt', 'ema_decay'},
    'SRGANModel': {'optim_d', 'gan_opt', 'net_d_iters', 'net_d_init_iters'},
    'PrunedSRModel': {'finetune'},
    'FMPModel': {'indicator_opt'},
    'SRPModel': {'sparsity_opt'},
    'ASSLModel': {'alignment_opt'},
}
VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'metrics', 'pbar'}
LOGGER_KEYS = {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'}
WANDB_KEYS = {'project', 'resume_id'}
# set by parse_options
_SET_IN_PATH = {'experiments_root', 'models', 'training_states', 'log', 'visualization', 'results_root'}
PATH_KEYS = {'pretrain_network_g', 'strict_load_g', 'param_key_g', 'resume_state', 'weight_masks',
             'pretrain_network_d', 'strict_load_d', 'param_key_d'} | _SET_IN_PATH
DIST_KEYS = {'backend', 'port'}
# datasets.<phase>: BasicSR's data loader reads these for every type; each dataset type its own
LOADER_KEYS = {'name', 'type', 'phase', 'scale', 'num_worker_per_gpu', 'batch_size_per_gpu', 'dataset_enlarge_ratio',
               'prefetch_mode', 'num_prefetch_queue', 'pin_memory', 'persistent_workers', 'use_shuffle'}
DATASET_KEYS = {
    'PairedImageDataset': {'dataroot_gt', 'dataroot_lq', 'meta_info_file', 'filename_tmpl', 'io_backend', 'gt_size',
                           'use_hflip', 'use_rot', 'mean', 'std', 'color'},
    'SingleImageDataset': {'dataroot_lq', 'meta_info_file', 'io_backend', 'mean', 'std', 'color'},
}
IO_BACKENDS = {'disk': {'type'}, 'lmdb': {'type', 'db_paths', 'client_keys', 'readonly', 'lock', 'readahead'},
               'memcached': {'type', 'server_list_cfg', 'client_cfg', 'sys_path'}}
# what BasicSR 1.4.2's BaseModel.get_optimizer builds (it raises NotImplementedError for the rest)
SUPPORTED_OPTIMIZERS = ('Adam',)
SCHEDULERS = {'MultiStepLR': 'MultiStepRestartLR', 'MultiStepRestartLR': 'MultiStepRestartLR',
              'CosineAnnealingRestartLR': 'CosineAnnealingRestartLR'}


def closest(word, known):
    """``"; did you mean 'x'?"`` for the known word closest to ``word`` (case-insensitive; a known word
    that contains it counts too, e.g. psnr -> calculate_psnr), or ''."""
    known = sorted(str(k) for k in known)
    lowered = {k.lower(): k for k in known}
    match = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    if not match and len(str(word)) >= 3:
        match = [k for k in lowered if str(word).lower() in k][:1]
    return f'; did you mean {lowered[match[0]]!r}?' if match else ''


def _refuse_unknown(section, where, known, what='', elsewhere=None):
    """Raise OptionKeyError for the first key of ``section`` not in ``known``; ``elsewhere``: {section:
    keys} searched for a close match when ``known`` has none (a key put at the wrong level)."""
    if not isinstance(section, dict):
        raise OptionKeyError(f'{where} must be a mapping of options, got {section!r}')
    unknown = [key for key in section if key not in known]
    if unknown:
        key = unknown[0]
        name = f'{where}.{key}' if where else key
        hint = closest(key, known)
        for other, keys in (elsewhere or {}).items():
            if not hint and closest(key, keys):
                hint = f"; did you mean {other}.{closest(key, keys).split(chr(39))[1]}?"
        shown = sorted(set(known) - _SET_BY_PARSER - _SET_IN_PATH)
        raise OptionKeyError(f'{name}: unknown option{what}{hint} (known: {shown})')


def _for_model(table, model_cls, section):
    """Union of ``table[name]`` over the MRO of ``model_cls`` plus its ``option_keys[section]`` ('top' or
    'train'); None if no class of the MRO is in ``table`` (the section is then not checked)."""
    names = [klass.__name__ for klass in inspect.getmro(model_cls)]
    if not any(name in table for name in names):
        return None
    keys = set((getattr(model_cls, 'option_keys', None) or {}).get(section, ()))
    for name in names:
        keys |= set(table.get(name, ()))
    return keys


def _parameters(func, skip=('self',)):
    """The keyword names ``func`` takes, or None when it takes ``**kwargs`` (anything)."""
    params = inspect.signature(func).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name not in skip and p.kind is not p.VAR_POSITIONAL}


def _check_arguments(options, func, where, what, skip=('self',)):
    accepted = _parameters(func, skip)
    if accepted is not None:
        _refuse_unknown({k: v for k, v in options.items() if k != 'type'}, where, accepted, f' for {what}')


def _check_registered(options, where, registry, kind, skip=('self',)):
    """``options['type']`` is in BasicSR's ``registry`` and its other keys are arguments it takes."""
    if not isinstance(options, dict) or 'type' not in options:
        raise OptionKeyError(f'{where} must be a mapping with a type, got {options!r}')
    name = options['type']
    if name not in registry:
        known = [n for n, _ in registry]
        raise OptionKeyError(f'{where}.type: unknown {kind} {name!r}{closest(name, known)} (known: {sorted(known)})')
    target = registry.get(name)
    _check_arguments(options, target.__init__ if inspect.isclass(target) else target, where, f'{kind} {name}', skip)


def _check_positive(section, key, where, integer=False):
    if key not in section:
        return
    value = section[key]
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float)) and value > 0
    if not ok:
        kind = 'a positive integer' if integer else 'a positive number'
        numeric = isinstance(value, str) and value.lower().lstrip('+').replace('e', '', 1).isdigit()
        extra = ' (YAML reads 1e9 as text: write 1.0e+9)' if numeric else ''
        raise OptionKeyError(f'{where}.{key} must be {kind} of iterations, got {value!r}{extra}')


def _check_optimizer(options, where):
    import torch
    if not isinstance(options, dict) or 'type' not in options:
        raise OptionKeyError(f'{where} must be a mapping with a type (e.g. {{type: Adam, lr: 1e-3}}), got {options!r}')
    name = options['type']
    if name not in SUPPORTED_OPTIMIZERS:
        torch_names = sorted(n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                             and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != 'Optimizer')
        if name in torch_names:
            raise OptionKeyError(f'{where}.type: {name!r} is a torch.optim optimiser, but BasicSR 1.4.2 models '
                                 f'build only {list(SUPPORTED_OPTIMIZERS)}')
        raise OptionKeyError(f'{where}.type: unknown optimiser {name!r}{closest(name, torch_names)} (BasicSR 1.4.2 '
                             f'models build {list(SUPPORTED_OPTIMIZERS)}; torch.optim has {torch_names})')
    _check_arguments(options, getattr(torch.optim, name).__init__, where, f'torch.optim.{name}',
                     skip=('self', 'params'))


def _check_scheduler(options, where):
    from basicsr.models import lr_scheduler
    if not isinstance(options, dict) or 'type' not in options:
        raise OptionKeyError(f'{where} must be a mapping with a type (e.g. {{type: MultiStepLR, ...}}), got {options!r}')
    name = options['type']
    if name not in SCHEDULERS:
        raise OptionKeyError(f'{where}.type: unknown scheduler {name!r}{closest(name, SCHEDULERS)} '
                             f'(known: {sorted(SCHEDULERS)})')
    _check_arguments(options, getattr(lr_scheduler, SCHEDULERS[name]).__init__, where, f'scheduler {name}',
                     skip=('self', 'optimizer', 'last_epoch'))


def _check_train(opt, train, model_cls):
    from basicsr.utils.registry import LOSS_REGISTRY
    keys = _for_model(TRAIN_KEYS, model_cls, 'train')
    if keys is not None:
        _refuse_unknown(train, 'train', keys)
    for key, value in train.items():
        if key in ('optim_g', 'optim_d'):
            _check_optimizer(value, f'train.{key}')
        elif key == 'scheduler':
            _check_scheduler(value, 'train.scheduler')
        elif key.endswith('_opt') and value is not None:
            _check_registered(value, f'train.{key}', LOSS_REGISTRY, 'loss')
    finetune = train.get('finetune')
    if isinstance(finetune, dict):
        if finetune.get('optim_g') is not None:
            _check_optimizer(finetune['optim_g'], 'train.finetune.optim_g')
        if finetune.get('scheduler') is not None:
            _check_scheduler(finetune['scheduler'], 'train.finetune.scheduler')
    if opt.get('is_train') and 'total_iter' not in train:
        raise OptionKeyError('train.total_iter is missing (the number of training iterations)')
    _check_positive(train, 'total_iter', 'train')


def _check_network(opt, key):
    from basicsr.utils.registry import ARCH_REGISTRY
    network = opt.get(key)
    if network is not None:
        _check_registered(network, key, ARCH_REGISTRY, 'arch')


def _check_dataset(name, dataset, scale):
    where = f'datasets.{name}'
    if not isinstance(dataset, dict):
        raise OptionKeyError(f'{where} must be a mapping of options, got {dataset!r}')
    known = DATASET_KEYS.get(dataset.get('type'))
    if known is not None:
        _refuse_unknown(dataset, where, known | LOADER_KEYS)
    backend = dataset.get('io_backend')
    if backend is not None:
        if not isinstance(backend, dict) or backend.get('type') not in IO_BACKENDS:
            kind = backend.get('type') if isinstance(backend, dict) else backend
            raise OptionKeyError(f'{where}.io_backend.type: unknown backend {kind!r}{closest(kind, IO_BACKENDS)} '
                                 f'(known: {sorted(IO_BACKENDS)})')
        _refuse_unknown(backend, f'{where}.io_backend', IO_BACKENDS[backend['type']])
    for key in ('use_hflip', 'use_rot'):
        if key in dataset and not isinstance(dataset[key], bool):
            raise OptionKeyError(f'{where}.{key} must be true or false, got {dataset[key]!r}')
    for key in ('batch_size_per_gpu', 'dataset_enlarge_ratio'):
        _check_positive(dataset, key, where, integer=True)
    if name.split('_')[0] == 'train' and 'gt_size' in dataset:
        _check_gt_size(dataset, where, scale)


def _check_gt_size(dataset, where, scale):
    gt_size = dataset['gt_size']
    if isinstance(gt_size, bool) or not isinstance(gt_size, int) or gt_size <= 0:
        raise OptionKeyError(f'{where}.gt_size must be a positive integer (HR patch size in pixels), got {gt_size!r}')
    if isinstance(scale, int) and scale > 0 and gt_size % scale:
        raise OptionKeyError(f'{where}.gt_size ({gt_size}) must be a multiple of scale ({scale})')
    smallest = _smallest_gt(dataset)
    if smallest is not None and gt_size > smallest[0]:
        raise OptionKeyError(f'{where}.gt_size ({gt_size}) is larger than the smallest training HR image '
                             f'({smallest[1]}, {smallest[0]} pixels on its short side); use at most {smallest[0]}')


def _smallest_gt(dataset):
    """(short side, name) of the smallest GT image of a disk or LMDB paired set, or None (not readable
    here: the data checks name that problem)."""
    root = dataset.get('dataroot_gt')
    backend = (dataset.get('io_backend') or {}).get('type', 'disk')
    if not root or not osp.isdir(root):
        return None
    sizes = []
    if backend == 'lmdb':
        meta = osp.join(root, 'meta_info.txt')
        if not osp.isfile(meta):
            return None
        with open(meta) as f:
            for line in f:
                parts = line.split()
                try:
                    h, w = (int(v) for v in parts[1].strip('()').split(',')[:2])
                except (IndexError, ValueError):
                    return None
                sizes.append((min(h, w), parts[0]))
    elif backend == 'disk':
        from PIL import Image

        from .data.checks import IMAGE_EXTENSIONS, listed_files
        for name in listed_files(root):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    with Image.open(osp.join(root, name)) as image:
                        sizes.append((min(image.size), name))
                except OSError:
                    return None
    return min(sizes) if sizes else None


# what BasicSR's parse_options and pipelines index without a default: {key: what it is}
REQUIRED = {'name': 'the experiment name', 'model_type': 'e.g. FMPModel', 'num_gpu': '0 for CPU, or auto',
            'datasets': 'the data sets', 'path': 'checkpoint paths; may be {}'}
REQUIRED_TRAIN = {'train': 'optimiser, scheduler, total_iter, losses',
                  'logger': 'print_freq and save_checkpoint_freq'}
REQUIRED_NESTED_TRAIN = (('logger', 'print_freq'), ('logger', 'save_checkpoint_freq'))


def _has_like(key, section):
    match = difflib.get_close_matches(key, [str(k) for k in section], n=1, cutoff=0.6)
    return f'; the file has {match[0]!r}, a typo?' if match else ''


def check_required(opt, source, is_train=True):
    """Refuse an option file without a key BasicSR reads unconditionally, before ``parse_options``
    touches it (it would end in a bare ``KeyError: 'num_gpu'``).

    Args:
        opt (dict): the options as read from the file.
        source (str): the option file (named in the message).
        is_train (bool): training also needs ``train`` and ``logger`` (``print_freq``,
            ``save_checkpoint_freq``).

    Raises:
        OptionKeyError: naming the first missing key and the file; a section that is not a mapping.
    """
    required = dict(REQUIRED, **(REQUIRED_TRAIN if is_train else {}))
    for key, what in required.items():
        if key not in opt:
            raise OptionKeyError(f'option file {source!r}: missing option {key!r} ({what}){_has_like(key, opt)}')
    for key in ('datasets', 'path') + (('train', 'logger') if is_train else ()):
        if not isinstance(opt[key], dict):
            raise OptionKeyError(f'option file {source!r}: {key} must be a mapping of options, got {opt[key]!r}')
    for key, name in REQUIRED_NESTED_TRAIN if is_train else ():
        if name not in opt[key]:
            raise OptionKeyError(f'option file {source!r}: missing option {key}.{name} (iterations between '
                                 f'{"log lines" if name == "print_freq" else "checkpoints"})'
                                 f'{_has_like(name, opt[key])}')


def check_option_keys(opt, model_cls):
    """Refuse unknown keys and mistyped values anywhere in an option file (see the module docstring).

    Args:
        opt (dict): the parsed options (after ``parse_options``).
        model_cls (type): the class of ``opt['model_type']``.

    Raises:
        OptionKeyError (a ValueError): the first problem, named with its dotted key and, for an unknown
            key or type, the closest known one.
    """
    from basicsr.utils.registry import METRIC_REGISTRY
    top = _for_model(TOP_KEYS, model_cls, 'top')
    if top is not None:
        sections = {'train': set().union(*TRAIN_KEYS.values()), 'val': VAL_KEYS, 'logger': LOGGER_KEYS,
                    'path': PATH_KEYS - _SET_IN_PATH}
        _refuse_unknown(opt, '', top, elsewhere=sections)
    _check_network(opt, 'network_g')
    _check_network(opt, 'network_d')
    for key, known in (('logger', LOGGER_KEYS), ('path', PATH_KEYS), ('dist_params', DIST_KEYS), ('val', VAL_KEYS)):
        if opt.get(key) is not None:
            _refuse_unknown(opt[key], key, known)
    logger = opt.get('logger') or {}
    for key in ('print_freq', 'save_checkpoint_freq'):
        _check_positive(logger, key, 'logger')
    if isinstance(logger.get('wandb'), dict):
        _refuse_unknown(logger['wandb'], 'logger.wandb', WANDB_KEYS)
    val = opt.get('val') or {}
    _check_positive(val, 'val_freq', 'val')
    for name, metric in (val.get('metrics') or {}).items():
        _check_registered(metric, f'val.metrics.{name}', METRIC_REGISTRY, 'metric', skip=('img', 'img2'))
    if opt.get('train') is not None:
        if not isinstance(opt['train'], dict):
            raise OptionKeyError(f"train must be a mapping of options, got {opt['train']!r}")
        _check_train(opt, opt['train'], model_cls)
    datasets = opt.get('datasets') or {}
    for name, dataset in datasets.items():
        _check_dataset(name, dataset, opt.get('scale'))
