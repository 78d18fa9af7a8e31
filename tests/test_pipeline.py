"""End to end through BasicSR's entry points: fmpsr/train.py (FMP prune -> finalize -> fine-tune),
fmpsr/test.py on the export, fine-tuning an export, --auto_resume, and torchrun with gloo on CPU.

A tiny LSRB on a tiny generated data set, a few dozen iterations; each run is a real subprocess, so
every test here is marked ``slow`` (left out by ``make test-fast``).
"""
import json
import os
import os.path as osp
import re
import socket
import sys

import pytest
import torch
import yaml
from baseline_helpers import score_export
from conftest import ROOT, SCALE, run, write_options
from safetensors.torch import load_file
from torch import nn

import fmpsr  # noqa: F401
from basicsr.archs import build_network

pytestmark = pytest.mark.slow


def free_port():
    """A TCP port nobody listens on now (torchrun's --master_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def fmp_run(data, names, tmp_path_factory):
    name = names('pytest_fmp')
    yml = tmp_path_factory.mktemp('opt') / 'fmp.yml'
    finetune = {'optim_g': {'type': 'Adam', 'lr': 4e-4, 'betas': [0.9, 0.99]},
                'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5}}
    opt = write_options(yml, name, data, extra={'train.finetune': finetune})
    run([sys.executable, 'fmpsr/train.py', '-opt', str(yml)])
    return {'name': name, 'yml': yml, 'opt': opt, 'exp': osp.join(ROOT, 'experiments', name)}


def independent_counts(net, masks, lr_size):
    """Params and MACs of a plain network, counted with hooks; masked weights excluded."""
    pixels, hooks = {}, []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: pixels.__setitem__(name, o.shape[-2:].numel())))
    with torch.no_grad():
        net(torch.zeros(1, 3, *lr_size))
    for h in hooks:
        h.remove()
    dense = sparse = dense_macs = sparse_macs = 0
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            kept = int(masks[name].sum()) if masks is not None else m.weight.numel()
            bias = m.bias.numel() if m.bias is not None else 0
            dense += m.weight.numel() + bias
            sparse += kept + bias
            dense_macs += m.weight.numel() * pixels[name]
            sparse_macs += kept * pixels[name]
    return dense, sparse, dense_macs, sparse_macs


def test_fmp_run_exports_a_plain_compact_network(fmp_run):
    export = osp.join(fmp_run['exp'], 'export')
    with open(osp.join(export, 'network_g.yml')) as f:
        network_opt = yaml.safe_load(f)
    with open(osp.join(export, 'pruning.json')) as f:
        info = json.load(f)
    assert 0 < info['switch_iter'] <= 25
    # a plain torch user: build_network + safetensors state_dict, no fmpsr loader involved
    net = build_network(dict(network_opt))
    net.load_state_dict(load_file(osp.join(export, 'net_g.safetensors')), strict=True)
    masks = load_file(osp.join(export, 'weight_masks.safetensors'))
    assert type(net).__name__ == 'LSRB'
    assert network_opt['num_feat'] < fmp_run['opt']['network_g']['num_feat']  # channels were pruned
    for name, mask in masks.items():
        weight = net.get_submodule(name).weight
        assert torch.all(weight[~mask] == 0), name  # pruned weights exactly zero after fine-tuning
    # ratios the model logged == counts on the exported network (independent of the pruning core)
    original = build_network(dict(fmp_run['opt']['network_g']))
    o_params, _, o_macs, _ = independent_counts(original, None, (16, 16))
    c_params, p_params, c_macs, p_macs = independent_counts(net, masks, (16, 16))
    r = info['ratios']
    assert r['original_params'] == o_params and r['channel_params'] == c_params and r['pruned_params'] == p_params
    assert r['original_macs'] == o_macs and r['channel_macs'] == c_macs and r['pruned_macs'] == p_macs
    assert r['params_channel_ratio'] == pytest.approx((o_params - c_params) / o_params, abs=1e-12)
    assert r['params_weight_ratio'] == pytest.approx((c_params - p_params) / o_params, abs=1e-12)
    assert r['params_channel_ratio'] + r['params_weight_ratio'] >= 0.30 - 1e-9  # the total target was met
    assert r['converged'] is True


def test_fmp_checkpoints_and_state(fmp_run):
    models = os.listdir(osp.join(fmp_run['exp'], 'models'))
    states = os.listdir(osp.join(fmp_run['exp'], 'training_states'))
    assert {'net_g_10.pth', 'net_g_40.pth', 'net_g_latest.pth'} <= set(models)
    assert {'10.state', '40.state'} <= set(states)
    assert not [f for f in models + states if f.endswith('.tmp')]  # atomic writes leave nothing behind
    state = torch.load(osp.join(fmp_run['exp'], 'training_states', '10.state'), weights_only=True)
    assert state['fmp']['stage'] == 'prune' and state['fmp']['pruner'] is not None
    state = torch.load(osp.join(fmp_run['exp'], 'training_states', '40.state'), weights_only=True)
    assert state['fmp']['stage'] == 'finetune'
    # the fine-tune stage runs with train.finetune's optimiser: one group, lr 4e-4, betas (0.9, 0.99)
    groups = state['optimizers'][0]['param_groups']
    assert len(groups) == 1 and groups[0]['lr'] == 4e-4 and tuple(groups[0]['betas']) == (0.9, 0.99)


def test_test_py_scores_the_export(fmp_run, data, names, tmp_path):
    scores = score_export(osp.join(fmp_run['exp'], 'export'), SCALE, data, tmp_path, names)
    assert set(scores) == {'psnr'}                 # its PSNR equals a recount on the export (score_export)


def test_finetune_from_export_keeps_zeros(fmp_run, data, names, tmp_path):
    name = names('pytest_ft')
    yml = tmp_path / 'ft.yml'
    export = osp.join(fmp_run['exp'], 'export')
    write_options(yml, name, data, model_type='PrunedSRModel', total_iter=10,
                  extra={'path.pretrain_network_g': osp.join(export, 'net_g.safetensors')})
    run([sys.executable, 'fmpsr/train.py', '-opt', str(yml)])
    checkpoint = torch.load(osp.join(ROOT, 'experiments', name, 'models', 'net_g_latest.pth'), weights_only=True)
    before = load_file(osp.join(export, 'net_g.safetensors'))
    masks = load_file(osp.join(export, 'weight_masks.safetensors'))
    changed = 0
    for conv, mask in masks.items():
        after = checkpoint['params'][f'{conv}.weight']
        assert torch.all(after[~mask] == 0), conv
        changed += int((after != before[f'{conv}.weight']).sum())
    assert changed > 0  # it did train


def test_auto_resume_continues_the_finetune_stage(fmp_run, tmp_path):
    opt = yaml.safe_load(open(fmp_run['yml']))
    opt['train']['total_iter'] = 50
    yml = tmp_path / 'resume.yml'
    yml.write_text(yaml.safe_dump(opt))
    result = run([sys.executable, 'fmpsr/train.py', '-opt', str(yml), '--auto_resume'])
    log = result.stdout + result.stderr
    assert 'Resuming training from epoch: 0, iter: 40.' in log  # 100 batches per epoch here
    assert 'Resume: skipping the 40 batches of epoch 0' in log  # the sampler continues inside the resumed epoch
    logged = [int(i) for i in re.findall(r'iter:\s+(\d+),', log)]  # print_freq 10
    assert logged == [50], logged  # only iterations 41-50 ran, not a restart from 1
    name = osp.basename(fmp_run['exp'])
    assert not [d for d in os.listdir(osp.join(ROOT, 'experiments')) if d.startswith(f'{name}_archived')]
    assert osp.isfile(osp.join(fmp_run['exp'], 'models', 'net_g_50.pth'))
    state = torch.load(osp.join(fmp_run['exp'], 'training_states', '50.state'), weights_only=True)
    assert state['fmp']['stage'] == 'finetune' and state['iter'] == 50


def test_torchrun_two_processes_with_gloo(data, names, tmp_path):
    name = names('pytest_ddp')
    yml = tmp_path / 'ddp.yml'
    write_options(yml, name, data, total_iter=30, extra={'datasets.train.batch_size_per_gpu': 1})
    run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
         'fmpsr/train.py', '-opt', str(yml), '--launcher', 'pytorch'], timeout=400)
    exp = osp.join(ROOT, 'experiments', name)
    assert osp.isfile(osp.join(exp, 'export', 'net_g.safetensors'))
    assert osp.isfile(osp.join(exp, 'models', 'net_g_latest.pth'))


def test_option_checks_leave_the_global_rng_to_the_run(tmp_path, data):
    """The checks build networks (check_prunable, plot_layers checks); their weight init must not draw
    from the RNG BasicSR seeded for the run, or the run's own init would depend on which checks ran."""
    import torch
    from fmpsr.pipeline import check_options
    opt = write_options(tmp_path / 'o.yml', 'rng_check', data, extra={'pruning.grouping': 'auto'})
    opt['is_train'] = True
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    check_options(opt)
    assert torch.equal(torch.rand(4), expected)
