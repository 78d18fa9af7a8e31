"""BasicSR's ``train.ema_decay`` in fmpsr: no EMA in the prune stage (the hypernetwork changes shape at
the switch), an EMA of the compact network from the switch on and in PrunedSRModel, with the same
weight masks (pruned weights exactly zero), saved as ``params_ema``, exported, and resumed exactly."""
import copy
import json
import os.path as osp

import pytest
import torch
from conftest import ROOT, run, write_options
from safetensors.torch import load_file
from test_reliability import assert_really_resumed, hooked, in_process_model, run_until_held

import fmpsr  # noqa: F401
from basicsr.models import build_model
from fmpsr.pruning import get_weight_masks, plain_state_dict


def batches(n=12):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 32, 32, generator=g)) for _ in range(n)]


def train(model, iters, data):
    for it in iters:
        lq, gt = data[it % len(data)]
        model.feed_data({'lq': lq, 'gt': gt})
        model.optimize_parameters(it)


def assert_masked_zero(state, masks):
    assert masks, 'the test needs pruned weights'
    for conv, mask in masks.items():
        assert torch.all(state[f'{conv}.weight'][~mask.cpu()] == 0), conv


def test_ema_starts_at_the_switch_stays_masked_and_resumes_exactly(tmp_path, data):
    model, exp = in_process_model(tmp_path, data, **{'train.ema_decay': 0.9, 'pruning.max_prune_iter': 6,
                                                     'pruning.check_freq': 3})
    assert getattr(model, 'net_g_ema', None) is None  # the prune stage keeps no EMA
    conv = model.hypernetwork.net.get_submodule('body.0.conv1')
    with torch.no_grad():
        conv.weight_mask.view(-1)[::5] = False  # pruned weights the compact network must keep at zero
    data_ = batches()
    train(model, range(1, 7), data_)
    assert model.stage == 'finetune' and model.switch_iter == 6
    net = model.get_bare_model(model.net_g)
    masks = get_weight_masks(net)
    assert masks.keys() == get_weight_masks(model.net_g_ema).keys()
    ema_at_switch = plain_state_dict(model.net_g_ema)
    assert all(torch.equal(ema_at_switch[k], v) for k, v in plain_state_dict(net).items())  # starts as net_g
    train(model, range(7, 11), data_)
    ema, params = plain_state_dict(model.net_g_ema), plain_state_dict(net)
    assert any(not torch.equal(ema[k], params[k]) for k in params)  # it averages, it does not copy
    assert_masked_zero(ema, masks)
    assert_masked_zero(params, masks)
    # saved as params_ema, exported (the EMA is what validation scores and what is exported)
    model.save(0, 10)
    checkpoint = torch.load(exp / 'models' / 'net_g_10.pth', weights_only=True)
    assert all(torch.equal(checkpoint['params_ema'][k], ema[k]) for k in ema)
    exported = load_file(str(exp / 'export' / 'net_g.safetensors'))
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    with open(exp / 'export' / 'pruning.json') as f:
        assert json.load(f)['weights'] == 'params_ema'
    # resume (BasicSR's way: the network checkpoint as pretrain_network_g, then the training state)
    opt = copy.deepcopy(model.opt)
    opt['path']['pretrain_network_g'] = str(exp / 'models' / 'net_g_10.pth')
    resumed = build_model(opt)
    resumed.resume_training(torch.load(exp / 'training_states' / '10.state', weights_only=True))
    assert all(torch.equal(plain_state_dict(resumed.net_g_ema)[k], ema[k]) for k in ema)
    train(model, range(11, 13), data_)
    train(resumed, range(11, 13), data_)
    for a, b in ((model.net_g_ema, resumed.net_g_ema), (net, resumed.get_bare_model(resumed.net_g))):
        a, b = plain_state_dict(a), plain_state_dict(b)
        assert all(torch.equal(a[k], b[k]) for k in a)

    # PrunedSRModel fine-tuning the export (no params_ema in it): the EMA starts from net_g
    ft_opt = copy.deepcopy(model.opt)
    ft_opt.pop('pruning')
    ft_opt.update(model_type='PrunedSRModel', network_g=None)
    ft_opt['path']['pretrain_network_g'] = str(exp / 'export' / 'net_g.safetensors')
    finetune = build_model(ft_opt)
    assert finetune.net_g_ema is not None and get_weight_masks(finetune.net_g_ema).keys() == masks.keys()
    train(finetune, range(1, 4), data_)
    assert_masked_zero(plain_state_dict(finetune.net_g_ema), masks)


@pytest.mark.slow
def test_tiny_fmp_run_with_ema_runs_end_to_end_and_resumes(data, names, tmp_path):
    extra = {'train.ema_decay': 0.999, 'train.total_iter': 40, 'pruning.max_prune_iter': 25,
             'logger.save_checkpoint_freq': 10}
    results = {}
    for kind in ('uninterrupted', 'killed'):
        name = names(f'pytest_ema_{kind}')
        yml = tmp_path / f'{kind}.yml'
        write_options(yml, name, data, extra=extra)
        if kind == 'killed':  # killed inside the write of 40.state (fine-tune stage): resumes from 30
            run_until_held(hooked(tmp_path / 'killed', 'fmpsr/train.py', '-opt', yml, '--auto_resume'),
                           tmp_path / 'killed', r'/training_states/40\.state$')
        result = run(hooked(tmp_path / f'{kind}_run', 'fmpsr/train.py', '-opt', yml, '--auto_resume'))
        if kind == 'killed':
            assert_really_resumed(name, result, tmp_path / f'{kind}_run', 30, total_iter=40)
        exp = osp.join(ROOT, 'experiments', name)
        with open(osp.join(exp, 'export', 'pruning.json')) as f:
            info = json.load(f)
        assert info['weights'] == 'params_ema' and info['switch_iter'] <= 25
        latest = torch.load(osp.join(exp, 'models', 'net_g_latest.pth'), weights_only=True)
        exported = load_file(osp.join(exp, 'export', 'net_g.safetensors'))
        masks = load_file(osp.join(exp, 'export', 'weight_masks.safetensors'))
        assert exported.keys() == latest['params_ema'].keys()
        assert all(torch.equal(exported[k], latest['params_ema'][k]) for k in exported)
        assert_masked_zero(exported, {k: v for k, v in masks.items() if (~v).any()} or masks)
        assert_masked_zero(latest['params'], masks)
        results[kind] = latest
    for key in ('params', 'params_ema'):
        a, b = results['uninterrupted'][key], results['killed'][key]
        assert all(torch.equal(a[k], b[k]) for k in a), key
