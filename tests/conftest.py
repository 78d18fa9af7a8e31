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

import fmpsr  # noqa: F401
from basicsr.utils.matlab_functions import imresize

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
SCALE = 2


def run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f'{" ".join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}'
    return result


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
                    'macs_input_size': [16, 16], 'weight_lr_mult': 30.0, 'min_channels': 2},
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


def build_model_in(tmp_path, data, name, **extra):
    """An FMP model built in-process from ``write_options(..., extra=extra)`` with its experiment folder
    at ``tmp_path / 'exp'`` (made), as ``basicsr.train`` would build it; seeded with 0."""
    import torch
    from basicsr.models import build_model
    path = tmp_path / 'opt.yml'
    write_options(path, name, data, extra=extra)
    with open(path) as f:
        opt = yaml.safe_load(f)
    exp = tmp_path / 'exp'
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0, root_path=str(tmp_path), auto_resume=False)
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
