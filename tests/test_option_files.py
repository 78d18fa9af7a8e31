"""The paper's option files (FMP main table on ESRB-6-256 x2/x3/x4; EDSR-8-128 x4 for FMP Tables 4-6;
DHP on EDSR-8-128 x4 at MACs keep ratios 0.6 / 0.4 / 0.2) and their tiny CPU forms.

Every full file must pass fmpsr's option checks and have a tiny form with the same model, arch,
scale and pruning method. Every tiny form is run end to end through ``fmpsr/train.py`` (prune,
finalize, fine-tune, export); the export is then rebuilt without pickles and recounted
independently of fmpsr's accounting.
"""
import glob
import os.path as osp
import re
import sys

import pytest
import torch
import yaml
from conftest import ROOT, run
from torch.utils.flop_counter import FlopCounterMode

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.registry import MODEL_REGISTRY
from fmpsr.pruning import load_compact

FULL = sorted(glob.glob(osp.join(ROOT, 'options', 'fmp_*.yml')) + glob.glob(osp.join(ROOT, 'options', 'edsr', '*.yml')))
TINY = sorted(glob.glob(osp.join(ROOT, 'options', 'tiny', '*.yml')))
METHOD_KEYS = ('metric', 'criterion', 'weight_reg', 'keep_ratio', 'keep_tolerance', 'weight_indicators', 'grouping',
               'gamma_c', 'gamma_w', 'tie_outputs')


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def test_the_issue_asks_for_these_files():
    names = {osp.relpath(p, osp.join(ROOT, 'options')) for p in FULL}
    expected = {f'fmp_lsrb_x{s}.yml' for s in (2, 3, 4)}
    expected |= {f'edsr/fmp_edsr_x4_{m}_{c}.yml' for m in ('params', 'flops')
                 for c in ('channel', 'weight', 'total_fixed', 'total')}
    expected |= {f'edsr/fmp_edsr_x4_reg_{r}.yml' for r in ('l1', 'l2', 'weight_decay')}
    expected |= {f'edsr/{m}_edsr_x4_keep{k}.yml' for m in ('fmp', 'dhp') for k in (60, 40, 20)}
    assert expected <= names
    assert {osp.basename(p) for p in TINY} == {osp.basename(p) for p in FULL}


@pytest.mark.parametrize('path', FULL, ids=lambda p: osp.basename(p))
def test_full_file_and_its_tiny_form(path):
    opt = load(path)
    tiny = load(osp.join(ROOT, 'options', 'tiny', osp.basename(path)))
    for key in ('model_type', 'scale'):
        assert tiny[key] == opt[key]
    assert tiny['network_g']['type'] == opt['network_g']['type']
    assert tiny['network_g']['upscale'] == opt['network_g']['upscale'] == opt['scale']
    for key in METHOD_KEYS:
        assert tiny['pruning'].get(key) == opt['pruning'].get(key), key
    opt['is_train'] = True
    MODEL_REGISTRY.get(opt['model_type']).check_options(opt)  # raises on a bad key or value (data not needed)
    if opt['network_g']['type'] == 'EDSR':  # the backbone of FMP Tables 4-6: 3,696.6 K params
        net = build_network(dict(opt['network_g']))
        assert sum(p.numel() for p in net.parameters()) == 3_696_643
        assert opt['pruning']['grouping'] == 'auto'


def macs(net, size=16):
    """Multiply-accumulates of a forward pass at a size x size input (FlopCounterMode counts 2 per MAC)."""
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize('path', TINY, ids=lambda p: osp.basename(p))
def test_tiny_form_runs_end_to_end(path, data_at, names, tmp_path):
    opt = load(path)
    scale = opt['scale']
    data = data_at(scale)
    opt['name'] = names(f'pytest_{opt["name"]}')
    for split, folder in (('train', 'train'), ('val', 'val')):
        opt['datasets'][split]['dataroot_gt'] = str(data / folder / 'HR')
        opt['datasets'][split]['dataroot_lq'] = str(data / folder / 'LR')
    opt['datasets']['train']['dataset_enlarge_ratio'] = 50
    opt_path = tmp_path / 'tiny.yml'
    with open(opt_path, 'w') as f:
        yaml.safe_dump(dict(opt), f)
    run([sys.executable, 'fmpsr/train.py', '-opt', str(opt_path)])

    export = osp.join(ROOT, 'experiments', opt['name'], 'export')
    compact, network_opt, masks = load_compact(export)
    with open(osp.join(export, 'pruning.json')) as f:
        info = yaml.safe_load(f)
    arch = opt['network_g']['type']
    assert type(compact).__name__ == arch                       # the same arch class, narrower
    dense = build_network(dict(opt['network_g'])).eval()
    with torch.no_grad():
        out = compact(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 16 * scale, 16 * scale)
    # counts taken here, not by fmpsr's accounting: parameters and FlopCounterMode MACs
    params = sum(p.numel() for p in compact.parameters())
    pruned = sum(int((~m).sum()) for m in masks.values())
    ratios = info['ratios']
    assert ratios['original_params'] == sum(p.numel() for p in dense.parameters())
    assert ratios['channel_params'] == params
    assert ratios['pruned_params'] == params - pruned
    assert params < ratios['original_params']                 # the pruning stage did remove channels
    with torch.no_grad():
        assert ratios['original_macs'] == macs(dense)
        assert ratios['channel_macs'] == macs(compact)
    if osp.basename(path) == 'fmp_edsr_x4_flops_total.yml':      # a CompactArch export scores with test.py
        test_name = names('pytest_test_compact')
        test_opt = {'name': test_name, 'model_type': 'PrunedSRModel', 'scale': scale, 'num_gpu': 0,
                    'datasets': {'test_1': {'name': 'tiny_val', 'type': 'PairedImageDataset',
                                            'dataroot_gt': str(data / 'val/HR'), 'dataroot_lq': str(data / 'val/LR'),
                                            'io_backend': {'type': 'disk'}}},
                    'path': {'pretrain_network_g': osp.join(export, 'net_g.safetensors')},
                    'val': {'save_img': False, 'suffix': None, 'metrics': {
                        'psnr': {'type': 'calculate_psnr', 'crop_border': scale, 'test_y_channel': True}}}}
        (tmp_path / 'test.yml').write_text(yaml.safe_dump(test_opt))
        run([sys.executable, 'fmpsr/test.py', '-opt', str(tmp_path / 'test.yml')])
        with open(osp.join(ROOT, 'results', test_name, 'metrics.json')) as f:
            assert 5 < yaml.safe_load(f)['tiny_val']['psnr'] < 60
    if opt['model_type'] == 'DHPModel':                          # channels only; stops at keep ratio + 0.02
        assert pruned == 0
        assert ratios['converged']
        assert ratios['channel_macs'] / ratios['original_macs'] <= opt['pruning']['keep_ratio'] + 0.02



def test_bad_plug_and_play_options_are_named():
    edsr = load(osp.join(ROOT, 'options', 'edsr', 'fmp_edsr_x4_params_total.yml'))
    lsrb = load(osp.join(ROOT, 'options', 'fmp_lsrb_x4.yml'))
    dhp = load(osp.join(ROOT, 'options', 'edsr', 'dhp_edsr_x4_keep40.yml'))
    cases = [
        (edsr, 'FMPModel', {'grouping': 'hand'}, KeyError, "network_g.type 'EDSR' has no hand-written"),
        (edsr, 'FMPModel', {'grouping': 'graph'}, ValueError, "pruning.grouping: unknown mode 'graph'"),
        (lsrb, 'FMPModel', {'tie_outputs': [['conv_first']]}, ValueError, 'tie_outputs applies to pruning.grouping: auto'),
        (dhp, 'DHPModel', {'weight_indicators': True}, ValueError, 'weight_indicators must be false'),
        (dhp, 'DHPModel', {'criterion': 'total'}, ValueError, "criterion 'total' prunes weights"),
        (dhp, 'DHPModel', {'keep_ratio': 1.5}, ValueError, 'keep_ratio must be a fraction in'),
        (edsr, 'FMPModel', {'criterion': 'keep_ratio'}, ValueError, 'keep_ratio must be a fraction in'),
    ]
    for base, model_type, change, error, message in cases:
        opt = dict(base, is_train=True, pruning=dict(base['pruning'], **change))
        with pytest.raises(error, match=re.escape(message)):
            MODEL_REGISTRY.get(model_type).check_options(opt)
