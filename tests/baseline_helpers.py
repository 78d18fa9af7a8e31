"""Helpers of the structured-baseline tests (SRP, ASSL, L1-norm): tiny option files pointed at the test
data, a "pretrained" network on disk, and recounts of an export that do not use fmpsr's accounting."""
import copy
import os.path as osp
import sys

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


def run_test_py(name, scale, data, tmp_path, names):
    """Score the export of run ``name`` with fmpsr/test.py on ``data``'s validation pair; returns PSNR."""
    test_name = names('pytest_test_baseline')
    test_opt = {'name': test_name, 'model_type': 'PrunedSRModel', 'scale': scale, 'num_gpu': 0,
                'datasets': {'test_1': {'name': 'tiny_val', 'type': 'PairedImageDataset',
                                        'dataroot_gt': str(data / 'val/HR'), 'dataroot_lq': str(data / 'val/LR'),
                                        'io_backend': {'type': 'disk'}}},
                'path': {'pretrain_network_g': experiment(name, 'export', 'net_g.safetensors')},
                'val': {'save_img': False, 'suffix': None, 'metrics': {
                    'psnr': {'type': 'calculate_psnr', 'crop_border': scale, 'test_y_channel': True},
                    'ssim': {'type': 'calculate_ssim', 'crop_border': scale, 'test_y_channel': True}}}}
    path = tmp_path / f'{test_name}.yml'
    path.write_text(yaml.safe_dump(test_opt))
    run([sys.executable, 'fmpsr/test.py', '-opt', str(path)])
    with open(osp.join(ROOT, 'results', test_name, 'metrics.json')) as f:
        return yaml.safe_load(f)['tiny_val']


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
