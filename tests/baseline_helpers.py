"""Helpers of the structured-baseline tests (SRP, ASSL, L1-norm): tiny option files pointed at the test
data, a "pretrained" network on disk, and recounts of an export that do not use fmpsr's accounting."""
import copy
import os
import os.path as osp
import sys

import pytest
import torch
import yaml
from conftest import ROOT, run
from torch.utils.flop_counter import FlopCounterMode

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from fmpsr.pruning import load_compact


def load_yaml(path):
    with open(osp.join(ROOT, path) if not osp.isabs(str(path)) else path) as f:
        return yaml.safe_load(f)


def tiny_options(path, name, data, out, extra=None):
    """The tiny option file ``path`` with its data set replaced by ``data`` (train/val HR/LR folders),
    the name ``name`` and dotted-key overrides ``extra``; written to ``out``. Returns the dict."""
    opt = load_yaml(path)
    opt['name'] = name
    for split in ('train', 'val'):
        opt['datasets'][split]['dataroot_gt'] = str(data / split / 'HR')
        opt['datasets'][split]['dataroot_lq'] = str(data / split / 'LR')
    opt['datasets']['train']['dataset_enlarge_ratio'] = 50
    for key, value in (extra or {}).items():
        node = opt
        *parents, last = key.split('.')
        for p in parents:
            node = node[p]
        node[last] = value
    with open(out, 'w') as f:
        yaml.safe_dump(opt, f)
    return opt


def save_pretrained(network_opt, path, seed=1):
    """A dense network with seeded random weights saved as a BasicSR checkpoint (``{'params': ...}``);
    returns its state dict. Stands in for the pretrained network the papers start from."""
    torch.manual_seed(seed)
    net = build_network(copy.deepcopy(network_opt))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({'params': state}, path)
    return state


def experiment(name, *parts):
    return osp.join(ROOT, 'experiments', name, *parts)


def pruning_info(name):
    with open(experiment(name, 'export', 'pruning.json')) as f:
        return yaml.safe_load(f)


def macs(net, size):
    """MACs of one forward pass at an LR input of ``size`` (FlopCounterMode counts 2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, *size))
    return counter.get_total_flops() // 2


def recount_export(name, dense_opt):
    """Check ``pruning.json`` against counts taken here: numel of the exported network and of the
    dense arch, MACs by FlopCounterMode. Returns (compact network, pruning.json)."""
    info = pruning_info(name)
    compact, network_opt, masks = load_compact(experiment(name, 'export'))
    dense = build_network(copy.deepcopy(dense_opt))
    size = tuple(info['pruning']['macs_input_size'])
    ratios = info['ratios']
    params = sum(p.numel() for p in compact.parameters())
    assert ratios['original_params'] == sum(p.numel() for p in dense.parameters())
    assert ratios['channel_params'] == ratios['pruned_params'] == params     # filters only, no single weights
    assert all(bool(m.all()) for m in masks.values())
    assert ratios['original_macs'] == macs(dense, size)
    assert ratios['channel_macs'] == ratios['pruned_macs'] == macs(compact, size)
    assert type(compact).__name__ == dense_opt['type']
    return compact, info


def independent_psnr(export, data, scale, crop_border=None, test_y_channel=True):
    """Mean PSNR (dB) of the exported network on ``data``'s validation pairs, computed here without
    fmpsr/test.py or BasicSR's validation loop: the export rebuilt by ``load_compact``, each LR image
    read with OpenCV, the output rounded to 8 bits, and BasicSR's ``calculate_psnr`` (``crop_border``:
    ``scale`` unless given) on the Y channel when ``test_y_channel``."""
    import cv2
    import numpy as np
    from basicsr.metrics import calculate_psnr
    net, _, _ = load_compact(str(export))
    values = []
    for name in sorted(os.listdir(data / 'val' / 'HR')):
        gt = cv2.imread(str(data / 'val' / 'HR' / name), cv2.IMREAD_COLOR)
        lq = cv2.imread(str(data / 'val' / 'LR' / name), cv2.IMREAD_COLOR)
        gt = gt[:lq.shape[0] * scale, :lq.shape[1] * scale]            # as BasicSR's paired validation data
        x = torch.from_numpy(np.ascontiguousarray(lq[:, :, ::-1].transpose(2, 0, 1))).float().div(255).unsqueeze(0)
        with torch.no_grad():
            y = net(x).squeeze(0).clamp(0, 1).numpy().transpose(1, 2, 0)[:, :, ::-1]
        sr = (y * 255.0).round().astype(np.uint8)
        values.append(calculate_psnr(sr, gt, scale if crop_border is None else crop_border,
                                     test_y_channel=test_y_channel))
    assert values, f'no validation images in {data}'
    return float(np.mean(values))


def score_export(export, scale, data, tmp_path, names, ssim=False):
    """Score the export folder ``export`` with fmpsr/test.py on ``data``'s validation pairs (PSNR on Y,
    crop_border = scale; SSIM too when ``ssim``) and check its PSNR against :func:`independent_psnr`.
    Returns test.py's metrics (dict)."""
    test_name = names('pytest_test_export')
    metrics = {'psnr': {'type': 'calculate_psnr', 'crop_border': scale, 'test_y_channel': True}}
    if ssim:
        metrics['ssim'] = {'type': 'calculate_ssim', 'crop_border': scale, 'test_y_channel': True}
    test_opt = {'name': test_name, 'model_type': 'PrunedSRModel', 'scale': scale, 'num_gpu': 0,
                'datasets': {'test_1': {'name': 'tiny_val', 'type': 'PairedImageDataset',
                                        'dataroot_gt': str(data / 'val/HR'), 'dataroot_lq': str(data / 'val/LR'),
                                        'io_backend': {'type': 'disk'}}},
                'path': {'pretrain_network_g': osp.join(str(export), 'net_g.safetensors')},
                'val': {'save_img': False, 'suffix': None, 'metrics': metrics}}
    path = tmp_path / f'{test_name}.yml'
    path.write_text(yaml.safe_dump(test_opt))
    run([sys.executable, 'fmpsr/test.py', '-opt', str(path)])
    with open(osp.join(ROOT, 'results', test_name, 'metrics.json')) as f:
        scores = yaml.safe_load(f)['tiny_val']
    expected = independent_psnr(export, data, scale)
    assert scores['psnr'] == pytest.approx(expected, rel=1e-6, abs=1e-6), (scores['psnr'], expected)
    return scores


def run_test_py(name, scale, data, tmp_path, names):
    """Score the export of run ``name`` with fmpsr/test.py on ``data``'s validation pairs (PSNR checked
    against :func:`independent_psnr`); returns test.py's metrics (PSNR and SSIM)."""
    return score_export(experiment(name, 'export'), scale, data, tmp_path, names, ssim=True)


def same_method_keys(full, tiny):
    """Assert that a tiny form keeps its full file's model, arch, scale and method keys."""
    assert tiny['model_type'] == full['model_type'] and tiny['scale'] == full['scale']
    assert tiny['network_g']['type'] == full['network_g']['type']
    assert tiny['network_g']['upscale'] == full['network_g']['upscale'] == full['scale']
    assert set(tiny['pruning']) == set(full['pruning'])
    for key in ('sparsity_opt', 'alignment_opt'):
        assert (tiny['train'].get(key) or {}).get('type') == (full['train'].get(key) or {}).get('type')


def run_tiny(path, data_at, names, tmp_path):
    """Run a tiny option file as it is (random init) on the test data of its scale; check the switch
    came at the end of its schedule and recount the export. Returns (compact, pruning.json, options)."""
    opt = load_yaml(path)
    name = names(f"pytest_{opt['name']}")
    opt = tiny_options(path, name, data_at(opt['scale']), tmp_path / 'tiny.yml')
    run([sys.executable, 'fmpsr/train.py', '-opt', str(tmp_path / 'tiny.yml')])
    compact, info = recount_export(name, opt['network_g'])
    assert info['ratios']['converged'] is True
    with torch.no_grad():
        out = compact(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 16 * opt['scale'], 16 * opt['scale'])
    return compact, info, opt
