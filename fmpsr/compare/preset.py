"""Comparison presets (``options/compare/<preset>.yml``): reading, checking, and the cells they define.

A preset is one backbone, one data set, one training length, test sets, budgets, seeds and methods::

    name: cpu_demo                  # optional (default: the file name); outputs in results/compare/<name>/
    scale: 4
    num_gpu: auto
    network_g: {type: LSRB, num_feat: 32, num_block: 4, upscale: 4, esa_channels: 16}
    macs_input_size: [64, 64]       # LR pixels at which MACs are counted
    budget: {metric: params, targets: [0.5, 0.3, 0.15], tolerance: 0.01}   # kept fractions
    seeds: [0, 1]
    jobs: 1                         # cells trained at once
    datasets: {train: {...BasicSR training set...}, test: {<name>: {...paired set...}, ...}}
    train: {...}                    # BasicSR ``train`` (total_iter: pruning + fine-tuning), every cell
    metrics: {psnr: {...}, ssim: {...}}                                    # BasicSR val metrics
    logger: {print_freq: 100, save_checkpoint_freq: 500}
    methods:                        # names of fmpsr.compare.methods.METHODS
      FMP: {weight_share: 0.2, pruning: {lambda_c: 0.5, ...}}
      DHP: {pruning: {...}}
      SRP: {pruning: {...}, train: {sparsity_opt: {...}}}   # train keys merged into the cells' train
    pretrain:                       # optional: a dense network per seed that the "pretrained" methods start from
      iterations: 400               # its training iterations, charged to those methods (their cells train
                                    # total_iter - iterations after it)
      methods: [SRP, ASSL, L1-norm] # default: the preset's methods that prune a pretrained network in their papers
      train: {...}                  # overrides of ``train`` (default: ``scratch.train``, else ``train``)
    scratch:                        # baselines trained from scratch (PrunedSRModel, random init)
      reference: [FMP]              # whose result each baseline copies / matches, per budget and seed
      baselines: [same_widths, uniform_params, uniform_macs]
      tolerance: 0.02
      match: nonzero                # the reference's kept (nonzero) counts, or 'dense'
      train: {optim_g: ..., scheduler: ...}   # overrides of ``train`` for the scratch cells

With ``pretrain``, one dense cell per seed (``pretrain-dense-s<seed>``: the dense ``network_g`` trained from
random initialisation like a scratch baseline, for ``pretrain.iterations``) runs first; the named methods'
cells of that seed start from it (``path.pretrain_network_g``: its ``export/net_g_dense.pth``) and train
``train.total_iter - pretrain.iterations`` iterations, so that every cell, its dense start included, has
spent the same ``train.total_iter`` iterations (the charged track; the report says so per cell).

Every cell (method x budget x seed, and each baseline of each reference cell) is an ordinary fmpsr run:
its option file is written to ``results/compare/<name>/options/<cell>.yml``, its experiment is
``experiments/cmp_<name>_<cell>`` and its test ``results/cmp_<name>_<cell>_test``.
"""
import copy
import os
import re
from dataclasses import dataclass, field

import yaml

from .budgets import Backbone, pruning_metric
from .methods import BudgetContext, BudgetUnreachable, method_entry

BASELINES = ('same_widths', 'uniform_params', 'uniform_macs')
REQUIRED = ('scale', 'network_g', 'budget', 'datasets', 'train', 'methods')
KNOWN = REQUIRED + ('name', 'num_gpu', 'macs_input_size', 'seeds', 'jobs', 'metrics', 'logger', 'scratch',
                    'pretrain')
PRETRAIN = 'pretrain-dense'
NAME_RE = re.compile(r'^[A-Za-z0-9_.+-]+$')


def _data_hint(folder, scale):
    """How to make a missing data folder: the demo builder for a ``datasets/demo*`` folder (with that
    folder as its output), else the README's data recipe (DF2K and the benchmark sets cannot be built here)."""
    parts = os.path.normpath(folder).split(os.sep)
    if len(parts) >= 2 and parts[0] == 'datasets' and parts[1].startswith('demo'):
        return (f'build it with: python scripts/data/build_demo_dataset.py --output datasets/{parts[1]} '
                f'--scale {scale}')
    return "prepare it as in the README's 'Prepare the data sets' (e.g. DF2K, the benchmark sets)"


class PresetError(ValueError):
    """A preset key is missing or wrong (the message names it and the file)."""


@dataclass
class Cell:
    """One run of the comparison.

    Attributes:
        name (str): cell name (unique in the preset), e.g. ``FMP-params0.5-s0``.
        method (str): the method's table name, or ``scratch`` for a baseline.
        target (float): the budget's kept fraction.
        seed (int): ``manual_seed``.
        options (dict): the training option file (BasicSR ``train.py``).
        baseline (str | None): for scratch cells, one of :data:`BASELINES`; ``'dense'`` for the dense
            pretraining cells of ``pretrain``.
        reference (str | None): for scratch cells, the cell whose result the baseline copies / matches.
        match (dict): for scratch cells, what was matched (target count, error, within).
    """
    name: str
    method: str
    target: float
    seed: int
    options: dict
    baseline: str = None
    reference: str = None
    match: dict = field(default_factory=dict)

    @property
    def is_scratch(self):
        return self.baseline is not None

    @property
    def is_pretrain(self):
        return self.baseline == 'dense'

    @property
    def label(self):
        """The curve this cell belongs to in the report: the method, or ``scratch <kind> (<ref method>)``."""
        return self.method if not self.is_scratch else f'scratch {self.baseline} ({self.match.get("reference_method")})'


def _fail(path, message):
    raise PresetError(f'{path}: {message}')


def _fraction_label(x):
    return f'{x:g}'


class Preset:
    """A checked preset (see the module docstring).

    Args:
        path (str): the YAML file.
        root (str): the repository root (experiments/ and results/ are made there).

    Raises:
        PresetError: a missing / unknown key or a bad value (named with the file).
        MethodNotAvailable: a method that is not in the table or whose model class is not registered.
        FileNotFoundError: the file does not exist.
    """

    def __init__(self, path, root):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'preset not found: {path!r}')
        with open(path) as f:
            opt = yaml.safe_load(f) or {}
        self.path, self.root, self.opt = path, root, opt
        if not isinstance(opt, dict):
            _fail(path, 'a preset is a YAML mapping')
        unknown = sorted(set(opt) - set(KNOWN))
        if unknown:
            _fail(path, f'unknown key(s) {unknown} (known: {sorted(KNOWN)})')
        missing = [k for k in REQUIRED if k not in opt]
        if missing:
            _fail(path, f'missing key(s) {missing}')
        self.name = str(opt.get('name') or os.path.splitext(os.path.basename(path))[0])
        if not NAME_RE.match(self.name) or 'debug' in self.name:
            _fail(path, f'name {self.name!r}: use letters, digits, _ . + - only (and not "debug", which BasicSR '
                        'treats as a debug run)')
        self._check_budget()
        self.seeds = opt.get('seeds', [0])
        integers = isinstance(self.seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds)
        if not integers or not self.seeds or len(set(self.seeds)) != len(self.seeds):
            _fail(path, f'seeds must be a list of distinct integers, got {self.seeds!r}')
        self.jobs = opt.get('jobs', 1)
        if not isinstance(self.jobs, int) or self.jobs < 1:
            _fail(path, f'jobs must be an integer >= 1, got {self.jobs!r}')
        self.macs_input_size = tuple(opt.get('macs_input_size', [64, 64]))
        if len(self.macs_input_size) != 2 or not all(isinstance(v, int) and v >= 1 for v in self.macs_input_size):
            _fail(path, f'macs_input_size must be [H, W] in LR pixels, got {opt.get("macs_input_size")!r}')
        if not isinstance(opt['train'], dict) or not isinstance(opt['train'].get('total_iter'), int):
            _fail(path, 'train.total_iter must be an integer (the same for every cell: pruning + fine-tuning)')
        self.total_iter = opt['train']['total_iter']
        self._check_datasets()
        self._check_methods()
        self._check_scratch()
        self._check_pretrain()
        self.out_dir = os.path.join(root, 'results', 'compare', self.name)
        self._backbone = None
        self.unreachable = []

    # ---- checks ----
    def _check_budget(self):
        budget = self.opt['budget']
        if not isinstance(budget, dict):
            _fail(self.path, 'budget must be a mapping {metric, targets, tolerance}')
        unknown = sorted(set(budget) - {'metric', 'targets', 'tolerance'})
        if unknown:
            _fail(self.path, f'budget: unknown key(s) {unknown} (known: metric, targets, tolerance)')
        self.metric = budget.get('metric', 'params')
        try:
            pruning_metric(self.metric)
        except ValueError as e:
            _fail(self.path, str(e))
        self.metric = 'params' if self.metric == 'params' else 'macs'
        targets = budget.get('targets')
        if not isinstance(targets, list) or not targets or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1 for t in targets):
            _fail(self.path, f'budget.targets must be a list of kept fractions in (0, 1), got {targets!r}')
        if len(set(targets)) != len(targets):
            _fail(self.path, f'budget.targets has duplicates: {targets}')
        self.targets = [float(t) for t in targets]
        self.tolerance = budget.get('tolerance', 0.01)
        if not isinstance(self.tolerance, (int, float)) or not 0 < self.tolerance < 0.5:
            _fail(self.path, f'budget.tolerance must be a fraction in (0, 0.5), got {self.tolerance!r}')

    def _check_datasets(self):
        datasets = self.opt['datasets']
        if not isinstance(datasets, dict) or not isinstance(datasets.get('train'), dict):
            _fail(self.path, 'datasets.train must be a BasicSR training set (a mapping)')
        tests = datasets.get('test')
        if not isinstance(tests, dict) or not tests or not all(isinstance(v, dict) for v in tests.values()):
            _fail(self.path, 'datasets.test must map test-set names to BasicSR paired data sets')
        unknown = sorted(set(datasets) - {'train', 'test'})
        if unknown:
            _fail(self.path, f'datasets: unknown key(s) {unknown} (known: train, test)')
        self.test_sets = {}
        for name, ds in tests.items():
            self.test_sets[name] = dict(ds, name=name)
        for where, ds in [('datasets.train', datasets['train'])] + [(f'datasets.test.{n}', d) for n, d in tests.items()]:
            for key in ('dataroot_gt', 'dataroot_lq'):
                folder = ds.get(key)
                if folder is None:
                    _fail(self.path, f'{where}.{key} is missing')
                full = folder if os.path.isabs(folder) else os.path.join(self.root, folder)
                if not os.path.exists(full):
                    hint = _data_hint(folder, self.opt['scale'])
                    _fail(self.path, f'{where}.{key}: {folder!r} does not exist ({hint})')

    def _check_methods(self):
        methods = self.opt['methods']
        if not isinstance(methods, dict) or not methods:
            _fail(self.path, 'methods must map method names to their settings (at least one)')
        self.methods = {}
        for name, settings in methods.items():
            settings = dict(settings or {})
            entry = method_entry(name)  # MethodNotAvailable names the method
            unknown = sorted(set(settings) - {'pruning', 'train'} - set(entry.settings))
            if unknown:
                _fail(self.path, f'methods.{name}: unknown key(s) {unknown} (known: pruning, train'
                                 f'{", " + ", ".join(entry.settings) if entry.settings else ""})')
            for key in ('pruning', 'train'):
                if not isinstance(settings.get(key) or {}, dict):
                    _fail(self.path, f'methods.{name}.{key} must be a mapping')
            if 'total_iter' in (settings.get('train') or {}):
                _fail(self.path, f'methods.{name}.train.total_iter: every cell trains train.total_iter iterations; '
                                 'remove it')
            self.methods[name] = (entry, settings)

    def _check_scratch(self):
        scratch = self.opt.get('scratch')
        self.scratch = None
        if not scratch:
            return
        unknown = sorted(set(scratch) - {'reference', 'baselines', 'tolerance', 'match', 'train'})
        if unknown:
            _fail(self.path, f'scratch: unknown key(s) {unknown} (known: reference, baselines, tolerance, match, train)')
        refs = scratch.get('reference', [next(iter(self.methods))])
        refs = [refs] if isinstance(refs, str) else list(refs)
        for ref in refs:
            if ref not in self.methods:
                _fail(self.path, f'scratch.reference: {ref!r} is not one of the preset\'s methods {list(self.methods)}')
        kinds = list(scratch.get('baselines', BASELINES))
        bad = [k for k in kinds if k not in BASELINES]
        if bad:
            _fail(self.path, f'scratch.baselines: unknown baseline(s) {bad} (choose from {list(BASELINES)})')
        tol = scratch.get('tolerance', 0.02)
        if not isinstance(tol, (int, float)) or not 0 < tol < 0.5:
            _fail(self.path, f'scratch.tolerance must be a fraction in (0, 0.5), got {tol!r}')
        match = scratch.get('match', 'nonzero')
        if match not in ('nonzero', 'dense'):
            _fail(self.path, f"scratch.match must be 'nonzero' or 'dense', got {match!r}")
        train = scratch.get('train') or {}
        if not isinstance(train, dict):
            _fail(self.path, 'scratch.train must be a mapping of train keys (optim_g, scheduler, ...)')
        if 'total_iter' in train:
            _fail(self.path, 'scratch.train.total_iter: every cell trains train.total_iter iterations; remove it')
        self.scratch = {'reference': refs, 'baselines': kinds, 'tolerance': float(tol), 'match': match,
                        'train': train}

    def _check_pretrain(self):
        from .methods import PRETRAINED_IN_PAPER
        pretrain = self.opt.get('pretrain')
        self.pretrain = None
        if not pretrain:
            return
        if not isinstance(pretrain, dict):
            _fail(self.path, 'pretrain must be a mapping {iterations, methods, train}')
        unknown = sorted(set(pretrain) - {'iterations', 'methods', 'train'})
        if unknown:
            _fail(self.path, f'pretrain: unknown key(s) {unknown} (known: iterations, methods, train)')
        iters = pretrain.get('iterations')
        if not isinstance(iters, int) or isinstance(iters, bool) or not 0 < iters < self.total_iter:
            _fail(self.path, f'pretrain.iterations must be an integer in [1, train.total_iter = {self.total_iter}), '
                             f'got {iters!r}')
        methods = pretrain.get('methods', [m for m in self.methods if m in PRETRAINED_IN_PAPER])
        methods = [methods] if isinstance(methods, str) else list(methods or [])
        bad = [m for m in methods if m not in self.methods]
        if bad or not methods:
            _fail(self.path, f'pretrain.methods: {bad or methods!r} must name methods of the preset '
                             f'{list(self.methods)}')
        dense_start = [m for m in methods if self.methods[m][0].model_type in ('FMPModel', 'DHPModel')]
        if dense_start:
            _fail(self.path, f'pretrain.methods: {dense_start} search from scratch through a hypernetwork and cannot '
                             'start from a dense network')
        train = pretrain.get('train')
        if train is not None and not isinstance(train, dict):
            _fail(self.path, 'pretrain.train must be a mapping of train keys (optim_g, scheduler, ...)')
        if 'total_iter' in (train or {}):
            _fail(self.path, 'pretrain.train.total_iter: set pretrain.iterations instead')
        self.pretrain = {'iterations': iters, 'methods': methods, 'train': train}

    # ---- cells ----
    @property
    def backbone(self):
        """The dense :class:`~fmpsr.compare.budgets.Backbone` (built once)."""
        if self._backbone is None:
            grouping = None
            for _, settings in self.methods.values():
                grouping = grouping or (settings.get('pruning') or {}).get('grouping')
            self._backbone = Backbone(self.opt['network_g'], self.macs_input_size, grouping)
        return self._backbone

    def experiment_name(self, cell_name):
        """BasicSR ``name`` of a cell's run: ``cmp_<preset>_<cell>`` (folders under experiments/, results/)."""
        return f'cmp_{self.name}_{cell_name}'

    def cell_name(self, method, target, seed, baseline=None, reference=None):
        """``<method>-<metric><target>-s<seed>``, or ``scratch-<baseline>-<reference>-<metric><target>-s<seed>``."""
        budget = f'{self.metric}{_fraction_label(target)}-s{seed}'
        if baseline is None:
            return f'{method}-{budget}'
        return f'scratch-{baseline}-{reference}-{budget}'

    def base_options(self, name, model_type, seed, network_g, train):
        """The option dict every training cell shares (data, seed, network, ``train``, logger; no validation:
        the test step scores the exported network)."""
        logger = dict(self.opt.get('logger') or {})
        logger.setdefault('print_freq', 100)
        logger.setdefault('save_checkpoint_freq', 500)
        logger.setdefault('use_tb_logger', False)
        logger.setdefault('wandb', {'project': None})
        return {
            'name': self.experiment_name(name), 'model_type': model_type, 'scale': self.opt['scale'],
            'num_gpu': self.opt.get('num_gpu', 'auto'), 'manual_seed': seed,
            'datasets': {'train': copy.deepcopy(self.opt['datasets']['train'])},
            'network_g': copy.deepcopy(network_g),
            'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
            'train': copy.deepcopy(train), 'logger': logger,
            'dist_params': {'backend': 'nccl', 'port': 29500},
        }

    def method_cells(self):
        """The method x budget x seed cells (their option files complete). A budget a method cannot reach on
        this backbone (:class:`~fmpsr.compare.methods.BudgetUnreachable`) makes no cell; the reason is
        kept in :attr:`unreachable` (listed in the report)."""
        cells, self.unreachable = [], []
        for method, (entry, settings) in self.methods.items():
            for target in self.targets:
                ctx = BudgetContext(method, self.backbone, self.metric, target, self.tolerance, settings)
                try:
                    budget_keys = entry.budget_keys(ctx)
                except BudgetUnreachable as e:
                    self.unreachable.append(str(e))
                    continue
                except ValueError as e:
                    raise PresetError(f'{self.path}: methods.{method}, budget {target}: {e}') from e
                pruning = dict(settings.get('pruning') or {})
                for key, value in budget_keys.items():
                    if key in pruning and pruning[key] != value:
                        _fail(self.path, f'methods.{method}.pruning.{key} ({pruning[key]!r}) is set by the budget '
                                         f'({value!r} for target {target}); remove it from the preset')
                pruning.setdefault('macs_input_size', list(self.macs_input_size))
                pruning = {'type': entry.pruning_type, **pruning, **budget_keys}
                train = dict(copy.deepcopy(self.opt['train']), **copy.deepcopy(settings.get('train') or {}))
                pretrained = self.pretrain is not None and method in self.pretrain['methods']
                if pretrained:
                    train['total_iter'] = self.total_iter - self.pretrain['iterations']
                for seed in self.seeds:
                    name = self.cell_name(method, target, seed)
                    opt = self.base_options(name, entry.model_type, seed, self.opt['network_g'], train)
                    opt['pruning'] = pruning
                    if pretrained:
                        opt['path']['pretrain_network_g'] = self.dense_start_path(seed)
                    cells.append(Cell(name, method, target, seed, opt))
        return cells

    def pretrain_cells(self):
        """The dense cells of ``pretrain`` (one per seed; none without ``pretrain``): ``PrunedSRModel`` on the
        dense ``network_g`` from random initialisation for ``pretrain.iterations`` iterations, with
        ``pretrain.train`` (default ``scratch.train``) over ``train`` like a scratch baseline."""
        if self.pretrain is None:
            return []
        cells = []
        for seed in self.seeds:
            name = f'{PRETRAIN}-s{seed}'
            train = copy.deepcopy(self.opt['train'])
            train.pop('finetune', None)
            overrides = self.pretrain['train']
            if overrides is None:
                overrides = (self.scratch or {}).get('train')
            train.update(copy.deepcopy(overrides or {}))
            train['total_iter'] = self.pretrain['iterations']
            opt = self.base_options(name, 'PrunedSRModel', seed, self.opt['network_g'], train)
            cells.append(Cell(name, 'dense', 1.0, seed, opt, baseline='dense',
                              match={'pretrain_for': list(self.pretrain['methods'])}))
        return cells

    def dense_start_path(self, seed):
        """The checkpoint the pretrained methods' cells of ``seed`` start from (relative to the repository
        root): the dense cell's weights as a plain BasicSR checkpoint ``{'params': state dict}``, which the
        pruning models read as a network to prune (not as a compact network to fine-tune)."""
        return os.path.join('experiments', self.experiment_name(f'{PRETRAIN}-s{seed}'), 'export', 'net_g_dense.pth')

    def scratch_options(self, name, seed, network_g):
        """Options of a scratch baseline: ``PrunedSRModel`` on ``network_g`` from random initialisation, the
        preset's ``train`` without ``finetune``, updated with ``scratch.train``."""
        train = copy.deepcopy(self.opt['train'])
        train.pop('finetune', None)
        train.update(copy.deepcopy(self.scratch['train']))
        return self.base_options(name, 'PrunedSRModel', seed, network_g, train)

    def test_options(self, cell):
        """The option file of ``fmpsr/test.py`` for a cell's exported network."""
        exp = self.experiment_name(cell.name)
        metrics = self.opt.get('metrics') or {
            'psnr': {'type': 'calculate_psnr', 'crop_border': self.opt['scale'], 'test_y_channel': True},
            'ssim': {'type': 'calculate_ssim', 'crop_border': self.opt['scale'], 'test_y_channel': True}}
        datasets = {}
        for i, (name, ds) in enumerate(self.test_sets.items()):
            datasets[f'test_{i + 1}'] = dict({'type': 'PairedImageDataset', 'io_backend': {'type': 'disk'}},
                                             **copy.deepcopy(ds))
        return {
            'name': f'{exp}_test', 'model_type': 'PrunedSRModel', 'scale': self.opt['scale'],
            'num_gpu': self.opt.get('num_gpu', 'auto'), 'manual_seed': cell.seed, 'datasets': datasets,
            'path': {'pretrain_network_g': os.path.join('experiments', exp, 'export', 'net_g.safetensors'),
                     'strict_load_g': True},
            'val': {'save_img': False, 'suffix': None, 'metrics': copy.deepcopy(metrics)},
        }

    def check_cell_options(self, cells):
        """Run each cell's model ``check_options`` on its option file (named errors before any run)."""
        import fmpsr  # noqa: F401
        from basicsr.utils.registry import MODEL_REGISTRY

        for cell in cells:
            opt = dict(copy.deepcopy(cell.options), is_train=True)
            try:
                MODEL_REGISTRY.get(opt['model_type']).check_options(opt)
            except (ValueError, KeyError) as e:
                raise PresetError(f'{self.path}: cell {cell.name}: {e}') from e
