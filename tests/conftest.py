"""Shared fixtures: a tiny x2 data set cut from a scikit-image photograph, option files for tiny
LSRB runs, and running fmpsr's entry points as real subprocesses."""
import os
import os.path as osp
import shutil
import subprocess
import sys
import uuid

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import settings

import fmpsr  # noqa: F401
from basicsr.utils.matlab_functions import imresize

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
SCALE = 2

# Hypothesis draws the same examples on every run (seeded from each test's code), so a failure seen
# once is seen again and a pass does not depend on luck; HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile('fmpsr', derandomize=True)
settings.register_profile('explore', derandomize=False)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'fmpsr'))


def run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f'{" ".join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}'
    return result


def run_batch(commands, folder, jobs=2, timeout=600):
    """Run fmpsr entry points (``[script, arg, ...]`` each, relative to the repository root) as
    processes forked from one interpreter that imported torch, BasicSR and fmpsr once
    (tests/batch_run.py), ``jobs`` at a time; ``folder`` receives the logs. Returns
    ``[(exit status, log text)]`` in the order of ``commands``."""
    import json
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    runs = [{'args': [str(a) for a in args], 'log': osp.join(folder, f'run{i}.log')} for i, args in enumerate(commands)]
    spec = osp.join(folder, 'jobs.json')
    with open(spec, 'w') as f:
        json.dump({'jobs': jobs, 'timeout': timeout, 'runs': runs}, f)
    result = run([sys.executable, osp.join('tests', 'batch_run.py'), spec], timeout=timeout * len(runs) + 60)
    status = json.loads(result.stdout.strip().splitlines()[-1])['status']
    logs = []
    for r in runs:
        with open(r['log']) as f:
            logs.append(f.read())
    return list(zip(status, logs))


def run_tiny_forms(request, test_name, data_at, names, folder):
    """Run every tiny option file that this session selected for the test ``test_name`` of the
    requesting module (its ``path`` parameter) with fmpsr/train.py on the test data of its scale
    (``data_at``; name made unique, dataset_enlarge_ratio 50), through :func:`run_batch`: real
    processes forked from one interpreter, two at a time, since a process start per file would cost
    more than most of these runs take. Returns {path: (options, exit status, log)}."""
    selected = [item.callspec.params['path'] for item in request.session.items
                if getattr(item, 'originalname', None) == test_name and item.module is request.module]
    options, commands = [], []
    for i, path in enumerate(selected):
        with open(path) as f:
            opt = yaml.safe_load(f)
        data = data_at(opt['scale'])
        opt['name'] = names(f'pytest_{opt["name"]}')
        for split in ('train', 'val'):
            opt['datasets'][split]['dataroot_gt'] = str(data / split / 'HR')
            opt['datasets'][split]['dataroot_lq'] = str(data / split / 'LR')
        opt['datasets']['train']['dataset_enlarge_ratio'] = 50
        with open(osp.join(str(folder), f'tiny{i}.yml'), 'w') as f:
            yaml.safe_dump(opt, f)
        options.append(opt)
        commands.append(['fmpsr/train.py', '-opt', osp.join(str(folder), f'tiny{i}.yml')])
    results = run_batch(commands, osp.join(str(folder), 'logs'))
    return {path: (opt, status, log) for path, opt, (status, log) in zip(selected, options, results)}


def run_failing(args, timeout=300, **env):
    """Run ``args`` (a command line) from the repository root, expecting it to fail; the result.
    ``env``: extra environment variables (FMPSR_TRACEBACK is removed unless given)."""
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', **env)
    if 'FMPSR_TRACEBACK' not in env:
        full_env.pop('FMPSR_TRACEBACK', None)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def assert_one_line_error(proc, prefix='fmpsr: error: '):
    """Bad input through a console script: exit status 2, exactly one line on stderr, starting with
    ``prefix`` (the ``<prog>: error: `` of :func:`fmpsr.cli.run_cli`), no traceback. Returns the line."""
    err = proc.stderr
    assert proc.returncode == 2, f'status {proc.returncode}:\n{proc.stdout[-2000:]}\n{err[-3000:]}'
    assert 'Traceback' not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, f'{len(lines)} lines on stderr:\n{err[-3000:]}'
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    """4 train and 2 val HR/LR pairs cut from a bundled scikit-image photograph (x2)."""
    import skimage.data
    root = tmp_path_factory.mktemp('data')
    photo = skimage.data.astronaut()[:, :, ::-1]  # BGR like cv2
    crops = {'train': [(0, 0), (0, 128), (128, 0), (128, 128)], 'val': [(256, 256), (320, 128)]}
    for split, corners in crops.items():
        for d in ('HR', 'LR'):
            (root / split / d).mkdir(parents=True)
        for i, (y, x) in enumerate(corners):
            size = 96 if split == 'train' else 64
            hr = photo[y:y + size, x:x + size]
            lr = np.clip(np.round(imresize(hr.astype(np.float32) / 255., 1 / SCALE) * 255), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / split / 'HR' / f'img{i}.png'), hr)
            cv2.imwrite(str(root / split / 'LR' / f'img{i}.png'), lr)
    return root


@pytest.fixture(scope='session')
def data_at(tmp_path_factory):
    """``data_at(scale)``: 2 train (96 px) and 1 val (96 px) HR/LR pairs at any scale, made once per scale."""
    import skimage.data
    made = {}

    def make(scale):
        if scale not in made:
            root = tmp_path_factory.mktemp(f'data_x{scale}')
            photo = skimage.data.coffee()[:, :, ::-1]
            for split, corners in {'train': [(0, 0), (96, 192)], 'val': [(192, 96)]}.items():
                for d in ('HR', 'LR'):
                    (root / split / d).mkdir(parents=True)
                for i, (y, x) in enumerate(corners):
                    hr = photo[y:y + 96, x:x + 96]
                    lr = imresize(hr.astype(np.float32) / 255., 1 / scale)
                    cv2.imwrite(str(root / split / 'HR' / f'img{i}.png'), hr)
                    cv2.imwrite(str(root / split / 'LR' / f'img{i}.png'),
                                np.clip(np.round(lr * 255), 0, 255).astype(np.uint8))
            made[scale] = root
        return made[scale]
    return make


def write_options(path, name, data, model_type='FMPModel', total_iter=40, extra=None):
    opt = {
        'name': name, 'model_type': model_type, 'scale': SCALE, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'tiny', 'type': 'PairedImageDataset', 'dataroot_gt': str(data / 'train/HR'),
                      'dataroot_lq': str(data / 'train/LR'), 'filename_tmpl': '{}', 'io_backend': {'type': 'disk'},
                      'gt_size': 32, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0,
                      'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 50, 'prefetch_mode': None},
            'val': {'name': 'tiny_val', 'type': 'PairedImageDataset', 'dataroot_gt': str(data / 'val/HR'),
                    'dataroot_lq': str(data / 'val/LR'), 'io_backend': {'type': 'disk'}}},
        'network_g': {'type': 'LSRB', 'num_feat': 12, 'num_block': 2, 'upscale': SCALE, 'esa_channels': 6},
        'pruning': {'type': 'fmp', 'metric': 'params', 'criterion': 'total', 'gamma_c': 0.25, 'gamma_w': 0.05,
                    'lambda_c': 20.0, 'lambda_w': 0.02, 'check_freq': 5, 'max_prune_iter': 25,
                    'macs_input_size': [16, 16], 'weight_lr_mult': 30.0, 'min_channels': 2,
                    # these tiny runs test the mechanics in 25 pruning iterations, which DHP's N(0, 1) draw
                    # (small |z| go first) fills; from z = 1 a channel needs 1 / (lr * lambda_c) = 50
                    'hyper_init': 'dhp'},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3, 'weight_decay': 0, 'betas': [0.9, 0.999]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100000], 'gamma': 0.5},
                  'total_iter': total_iter, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}},
        'val': {'val_freq': 1e9, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': SCALE, 'test_y_channel': True}}},
        'logger': {'print_freq': 10, 'save_checkpoint_freq': 10, 'use_tb_logger': False, 'wandb': {'project': None}},
        'dist_params': {'backend': 'gloo', 'port': 29500},
    }
    if model_type != 'FMPModel':
        opt.pop('pruning')
    for key, value in (extra or {}).items():
        node = opt
        *parents, last = key.split('.')
        for p in parents:
            node = node[p]
        node[last] = value
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f)
    return opt


def build_model_in(tmp_path, data, name, model_type='FMPModel', pruning=None, **extra):
    """A model (FMP unless ``model_type``) built in-process from ``write_options(..., extra=extra)``, its
    ``pruning`` section replaced by ``pruning`` when given, with its experiment folder at ``tmp_path / 'exp'``
    (made), as ``basicsr.train`` would build it; seeded with 0."""
    import torch
    from basicsr.models import build_model
    path = tmp_path / 'opt.yml'
    write_options(path, name, data, model_type=model_type, extra=extra)
    with open(path) as f:
        opt = yaml.safe_load(f)
    if pruning is not None:
        opt['pruning'] = pruning
    exp = tmp_path / 'exp'
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0, root_path=str(tmp_path), auto_resume=False)
    for phase, dataset in opt['datasets'].items():
        dataset['phase'], dataset['scale'] = phase, opt['scale']
    opt['path'].update(experiments_root=str(exp), models=str(exp / 'models'), training_states=str(exp / 'states'),
                       log=str(exp), visualization=str(exp / 'vis'))
    exp.mkdir(exist_ok=True)
    torch.manual_seed(0)
    return build_model(opt)


@pytest.fixture(scope='session')
def names():
    created = []

    def new(prefix):
        name = f'{prefix}_{uuid.uuid4().hex[:8]}'
        created.append(name)
        return name
    yield new
    for name in created:
        for folder in ('experiments', 'results', 'tb_logger'):
            shutil.rmtree(osp.join(ROOT, folder, name), ignore_errors=True)
            lock = osp.join(ROOT, folder, f'.{name}.lock')   # left by a run killed with SIGKILL
            if osp.isfile(lock):
                os.remove(lock)
