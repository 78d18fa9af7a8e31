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

import pytest
import torch
import yaml
from baseline_helpers import score_export
from conftest import ROOT, run_tiny_forms
from torch.utils.flop_counter import FlopCounterMode

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.registry import MODEL_REGISTRY
from fmpsr.pruning import load_compact

FULL = sorted(glob.glob(osp.join(ROOT, 'options', 'fmp_*.yml')) + glob.glob(osp.join(ROOT, 'options', 'edsr', '*.yml')))
TINY = sorted(glob.glob(osp.join(ROOT, 'options', 'tiny', '*.yml')))
METHOD_KEYS = ('metric', 'criterion', 'weight_reg', 'keep_ratio', 'keep_tolerance', 'weight_indicators', 'grouping',
               'gamma_c', 'gamma_w', 'tie_outputs', 'indicator_update')
INDICATOR_KEYS = ('type', 'norm', 'reduction')  # of train.indicator_opt, the same in a tiny form (not loss_weight)


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


@pytest.mark.slow
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
    for key in INDICATOR_KEYS:
        assert (tiny['train'].get('indicator_opt') or {}).get(key) == (opt['train'].get('indicator_opt') or {}).get(key), key
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


def independent_ratios(dense, compact, masks, size=16):
    """{metric: (channel ratio, weight ratio)} recounted here: params by numel and mask counts, MACs by
    FlopCounterMode and forward hooks (pruned weights x output pixels of their conv)."""
    pixels, hooks = {}, []
    for name, module in compact.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: pixels.__setitem__(name, o.shape[-2:].numel())))
    with torch.no_grad():
        compact(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    o_params = sum(p.numel() for p in dense.parameters())
    c_params = sum(p.numel() for p in compact.parameters())
    pruned = sum(int((~m).sum()) for m in masks.values())
    with torch.no_grad():
        o_macs, c_macs = macs(dense, size), macs(compact, size)
    pruned_macs = sum(int((~m).sum()) * pixels[name] for name, m in masks.items())
    return {'params': ((o_params - c_params) / o_params, pruned / o_params),
            'flops': ((o_macs - c_macs) / o_macs, pruned_macs / o_macs)}


# DHP stops at the first check (every check_freq iterations) where kept <= keep_ratio + keep_tolerance;
# between two checks the proximal step may remove more than the tolerance. Tiny runs (check_freq 5,
# a strong lambda_c) must still end within this much below keep_ratio (measured: see notes/issue13.md).
KEEP_RATIO_BELOW = 0.1


def one_weight(dense, metric, size=16):
    """What pruning one weight of the costliest conv removes, as a fraction of the dense network (1 param,
    or its conv's output pixels in MACs): weights are pruned whole and never beyond the target, so a
    weight target is met within this much (issue 11)."""
    if metric == 'params':
        return 1 / sum(p.numel() for p in dense.parameters())
    pixels = []
    hooks = [m.register_forward_hook(lambda m, i, o: pixels.append(o.shape[-2:].numel()))
             for m in dense.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        dense(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return max(pixels) / macs(dense, size)


def assert_criterion_met(pruning, channel, weight, slack=0.0):
    """The option file's convergence criterion holds on independently counted ratios (a weight target
    within ``slack``, the cost of one weight: :func:`one_weight`)."""
    c, g_c, g_w = pruning['criterion'], pruning.get('gamma_c'), pruning.get('gamma_w')
    eps = 1e-12 + slack
    if c == 'channel':
        assert channel >= g_c - 1e-12, (channel, g_c)
    elif c == 'weight':
        assert weight >= g_w - eps, (weight, g_w)
    elif c == 'total_fixed':
        assert channel >= g_c - eps and weight >= g_w - eps, (channel, weight, g_c, g_w)
    elif c == 'total':
        assert channel + weight >= g_c + g_w - eps, (channel, weight, g_c, g_w)
    else:
        kept = 1 - channel - weight
        low, high = pruning['keep_ratio'] - KEEP_RATIO_BELOW, pruning['keep_ratio'] + pruning['keep_tolerance']
        assert low <= kept <= high + eps, (kept, low, high)


@pytest.fixture(scope='module')
def tiny_runs(request, data_at, names, tmp_path_factory):
    """The selected tiny forms, run once for the module (conftest.run_tiny_forms)."""
    return run_tiny_forms(request, 'test_tiny_form_runs_end_to_end', data_at, names, tmp_path_factory.mktemp('tiny'))


@pytest.mark.slow
@pytest.mark.parametrize('path', TINY, ids=lambda p: osp.basename(p))
def test_tiny_form_runs_end_to_end(path, tiny_runs, data_at, names, tmp_path):
    opt, status, log = tiny_runs[path]
    assert status == 0, f'fmpsr/train.py on {osp.basename(path)} failed:\n{log[-5000:]}'
    scale = opt['scale']
    data = data_at(scale)

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
    if osp.basename(path) == 'fmp_edsr_x4_flops_total.yml':   # a CompactArch export: test.py's PSNR recounted
        score_export(export, scale, data, tmp_path, names)
    if opt['model_type'] == 'DHPModel':                          # channels only; stops at keep ratio + 0.02
        assert pruned == 0
        assert ratios['channel_macs'] / ratios['original_macs'] <= opt['pruning']['keep_ratio'] + 0.02
    # every tiny run converges (not stopped by max_prune_iter) and meets its criterion's target,
    # checked on ratios counted here, in the file's metric
    channel, weight = independent_ratios(dense, compact, masks)[info['pruning']['metric']]
    print(f"{osp.basename(path)}: converged={ratios['converged']} switch_iter={info['switch_iter']} "
          f"channel={channel:.4f} weight={weight:.4f}")
    assert ratios['converged'] is True, f'stopped at max_prune_iter at iteration {info["switch_iter"]}'
    assert_criterion_met(info['pruning'], channel, weight, one_weight(dense, info['pruning']['metric']))



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
