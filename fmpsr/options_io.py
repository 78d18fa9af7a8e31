"""Read option files without running code from them (replaces BasicSR's ``parse_options``).

BasicSR 1.4.2 reads option files with PyYAML's full ``CLoader``, so a tag such as
``!!python/object/apply:os.system [...]`` in a downloaded option file runs before any check, and its
``--force_yml key=value`` flag builds a Python statement from the key and ``exec``s it (and
``eval``s values that start with ``[``). fmpsr installs :func:`parse_options` in their place
(``import fmpsr`` does it, before :mod:`fmpsr.pipeline` adds its checks):

* the YAML is read with a *safe* loader that keeps key order (:class:`OrderedSafeLoader`): plain
  mappings, lists, strings, numbers, booleans and nulls only; any ``!!python/...`` tag is an error
  that names the file and line;
* ``--force_yml a:b:c=value`` walks ``opt['a']['b']`` (each must exist and be a mapping) and sets
  ``c`` to ``value`` parsed as one YAML scalar or flow list / mapping with the same safe loader;
* an empty option file, or one whose top level is not a mapping, is refused in one line.

Everything else (distributed set-up, seed, dataset phases, experiment / results paths, debug mode)
is what BasicSR's ``parse_options`` does, in the same order, so option files behave as before.
"""
import argparse
import random
import re
from collections import OrderedDict
from os import path as osp

import yaml

_KEY = re.compile(r'[\w.-]+')

__all__ = ['OrderedSafeLoader', 'ordered_yaml', 'load_option_file', 'apply_force_yml', 'parse_options', 'install']


class OrderedSafeLoader(yaml.SafeLoader):
    """PyYAML's ``SafeLoader`` (no Python objects, no code) whose mappings are ``OrderedDict`` s, as
    BasicSR's loader makes them."""


def _construct_ordered(loader, node):
    loader.flatten_mapping(node)
    return OrderedDict(loader.construct_pairs(node))


OrderedSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_ordered)


class OrderedSafeDumper(yaml.SafeDumper):
    """PyYAML's ``SafeDumper`` that writes ``OrderedDict`` s as plain mappings."""


OrderedSafeDumper.add_representer(OrderedDict, lambda dumper, data: dumper.represent_dict(data.items()))


def ordered_yaml():
    """Drop-in for ``basicsr.utils.options.ordered_yaml``: ``(loader, dumper)``, both safe."""
    return OrderedSafeLoader, OrderedSafeDumper


def load_option_file(path):
    """Read an option file safely.

    Args:
        path (str): a YAML option file.

    Returns:
        OrderedDict: the options, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty, its top level is not a mapping, or it is not valid safe YAML
            (a ``!!python/...`` tag, a syntax error); the message names the file (and line).
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'-opt: no such option file {path!r}')
    with open(path, encoding='utf-8') as f:
        try:
            opt = yaml.load(f, Loader=OrderedSafeLoader)  # noqa: S506 - the loader is a SafeLoader
        except yaml.YAMLError as error:
            where = getattr(error, 'problem_mark', None)
            line = f' line {where.line + 1}' if where is not None else ''
            problem = getattr(error, 'problem', None) or str(error).splitlines()[0]
            raise ValueError(f'option file {path!r}{line}: not plain YAML ({problem}); option files may hold '
                             'only mappings, lists, strings, numbers, booleans and nulls') from None
    if opt is None:
        raise ValueError(f'option file {path!r} is empty')
    if not isinstance(opt, dict):
        raise ValueError(f'option file {path!r}: the top level must be a mapping of options, '
                         f'not a {type(opt).__name__}')
    return opt


def apply_force_yml(opt, entries):
    """Apply ``--force_yml`` entries ``'a:b:c=value'`` to ``opt`` in place, without ``exec``/``eval``.

    Args:
        opt (dict): the parsed options.
        entries (list[str]): ``keys=value`` strings; keys are separated by ``:``.

    Raises:
        ValueError: an entry without ``=``, a key with characters other than letters, digits, ``_``,
            ``-`` and ``.``, a path through a key that does not exist or is not a mapping, or a value
            that is not plain YAML; the entry is named.
    """
    for entry in entries or ():
        if '=' not in entry:
            raise ValueError(f'--force_yml {entry!r}: expected keys=value, e.g. train:ema_decay=0.999')
        keys, value = (part.strip() for part in entry.split('=', 1))
        path = [key.strip() for key in keys.split(':')]
        if not all(path):
            raise ValueError(f'--force_yml {entry!r}: empty key in {keys!r}')
        odd = [key for key in path if not _KEY.fullmatch(key)]
        if odd:
            raise ValueError(f'--force_yml {entry!r}: option keys are letters, digits, "_", "-" and "."; '
                             f'not {odd[0]!r}')
        try:
            parsed = yaml.load(value, Loader=OrderedSafeLoader) if value else None  # noqa: S506
        except yaml.YAMLError:
            raise ValueError(f'--force_yml {entry!r}: the value {value!r} is not plain YAML') from None
        node = opt
        for depth, key in enumerate(path[:-1]):
            if not isinstance(node.get(key), dict):
                where = ':'.join(path[:depth + 1])
                raise ValueError(f'--force_yml {entry!r}: option {where!r} does not exist or is not a mapping')
            node = node[key]
        node[path[-1]] = parsed


def _argument_parser():
    parser = argparse.ArgumentParser(
        description='fmpsr: train or test a (pruned) super-resolution network from a BasicSR option file.',
        epilog='Bad input ends with one line "fmpsr: error: ..." and exit status 2; FMPSR_TRACEBACK=1 shows '
               'the traceback.')
    parser.add_argument('-opt', type=str, required=True, help='path to the option YAML file')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher: none (one process), pytorch (torchrun) or slurm (srun)')
    parser.add_argument('--auto_resume', action='store_true',
                        help='resume from the newest checkpoint of experiments/<name>, if there is one')
    parser.add_argument('--debug', action='store_true',
                        help="BasicSR's debug mode (name debug_<name>, validate and save every 8 iterations) "
                             'and full tracebacks')
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic algorithms on GPU (same as "deterministic: true" in the option file)')
    parser.add_argument('--local_rank', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--force_yml', nargs='+', default=None, metavar='KEYS=VALUE',
                        help='override existing options, e.g. train:ema_decay=0.999 (values are plain YAML)')
    return parser


def parse_options(root_path, is_train=True):
    """BasicSR's ``parse_options`` with a safe YAML loader and a safe ``--force_yml``.

    Args:
        root_path (str): the repository root; ``experiments/`` (training) or ``results/`` (testing)
            go below it.
        is_train (bool): training (``experiments/<name>``) or testing (``results/<name>``).

    Returns:
        tuple: ``(opt, args)``: the options (an ``OrderedDict``) and the parsed command line.

    Raises:
        ValueError, FileNotFoundError: see :func:`load_option_file` and :func:`apply_force_yml`.
        fmpsr.option_keys.OptionKeyError (a ValueError): a key BasicSR needs (``name``, ``num_gpu``,
            ``datasets``, ``path``; ``train``, ``logger`` to train) is missing.
    """
    import torch
    from basicsr.utils import set_random_seed
    from basicsr.utils.dist_util import get_dist_info

    from . import compat
    from .option_keys import check_required

    args = _argument_parser().parse_args()
    opt = load_option_file(args.opt)
    check_required(opt, args.opt, is_train)

    if args.launcher == 'none':
        opt['dist'] = False
        print('Disable distributed.', flush=True)
    else:
        opt['dist'] = True
        if args.launcher == 'slurm' and 'dist_params' in opt:
            compat.init_dist(args.launcher, **opt['dist_params'])
        else:
            compat.init_dist(args.launcher)
    opt['rank'], opt['world_size'] = get_dist_info()

    seed = opt.get('manual_seed')
    if seed is None:
        seed = random.randint(1, 10000)
        opt['manual_seed'] = seed
    set_random_seed(seed + opt['rank'])

    apply_force_yml(opt, args.force_yml)

    opt['auto_resume'] = args.auto_resume
    opt['is_train'] = is_train
    if args.deterministic:
        opt['deterministic'] = True

    if args.debug and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']

    if opt['num_gpu'] == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()

    for phase, dataset in opt['datasets'].items():
        phase = phase.split('_')[0]
        dataset['phase'] = phase
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for key in ('dataroot_gt', 'dataroot_lq'):
            if dataset.get(key) is not None:
                dataset[key] = osp.expanduser(dataset[key])

    for key, val in opt['path'].items():
        if (val is not None) and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = osp.expanduser(val)

    if is_train:
        experiments_root = osp.join(root_path, 'experiments', opt['name'])
        opt['path']['experiments_root'] = experiments_root
        opt['path']['models'] = osp.join(experiments_root, 'models')
        opt['path']['training_states'] = osp.join(experiments_root, 'training_states')
        opt['path']['log'] = experiments_root
        opt['path']['visualization'] = osp.join(experiments_root, 'visualization')
        if 'debug' in opt['name']:
            if 'val' in opt:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
        results_root = osp.join(root_path, 'results', opt['name'])
        opt['path']['results_root'] = results_root
        opt['path']['log'] = results_root
        opt['path']['visualization'] = osp.join(results_root, 'visualization')

    return opt, args


def install():
    """Put :func:`parse_options` and :func:`ordered_yaml` in place of BasicSR's (idempotent). Must run
    before :func:`fmpsr.pipeline.install`, which wraps ``basicsr.train.parse_options``."""
    import basicsr.test
    import basicsr.train
    import basicsr.utils.options

    basicsr.utils.options.ordered_yaml = ordered_yaml
    basicsr.utils.options.parse_options = parse_options
    basicsr.train.parse_options = parse_options
    basicsr.test.parse_options = parse_options
