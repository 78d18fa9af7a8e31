"""Lottery tickets (LTHModel: LTH / LMC-LTH / LTH-PWC, sparsity_of_sr_networks.txt Sec. 2, A.2.1).

The rule is checked against counts taken here: every round removes round(0.2 * remaining) of the
prunable weights, the smallest |w| among those kept, and never a weight of the convs reading the image
or writing the output; after a reset the surviving weights equal the weights recorded here at
iteration 0 (LTH) or t (LMC-LTH). The tiny option files run end to end (prune -> mask -> fine-tune ->
fmpsr/test.py) and their exports are recounted from the safetensors files. A run killed with SIGKILL
inside the second round and resumed with --auto_resume: tests/test_resume_methods.py.
"""
import glob
import os.path as osp

import pytest
import torch
import yaml
from baseline_helpers import score_export
from conftest import ROOT, run_tiny_forms
from safetensors.torch import load_file

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.registry import MODEL_REGISTRY
from fmpsr.pruning import plain_state_dict, trace_conv_specs
from fmpsr.pruning.lth import end_convs, global_magnitude_masks, num_removed

TINY = sorted(glob.glob(osp.join(ROOT, 'options', 'tiny', 'lth', '*.yml')))
FULL = sorted(glob.glob(osp.join(ROOT, 'options', 'lth', '*.yml')))
TINY_EDSR = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': 4}


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def tiny_options(path, data, name, **changes):
    """A tiny option file pointed at the test data (``changes``: dotted keys)."""
    opt = load(path)
    opt['name'] = name
    for split in ('train', 'val'):
        opt['datasets'][split]['dataroot_gt'] = str(data / split / 'HR')
        opt['datasets'][split]['dataroot_lq'] = str(data / split / 'LR')
    opt['datasets']['train']['dataset_enlarge_ratio'] = 50
    for key, value in changes.items():
        node = opt
        *parents, last = key.split('.')
        for p in parents:
            node = node[p]
        node[last] = value
    return opt


# ---------------------------------------------------------------- the rule


def test_each_round_removes_twenty_percent_of_the_remaining_weights_by_global_magnitude():
    torch.manual_seed(0)
    weights = {'a': torch.randn(8, 8, 3, 3), 'b': torch.randn(16, 8, 3, 3) * 0.1, 'c': torch.randn(4, 16, 1, 1) * 3}
    masks = {}
    remaining = sum(w.numel() for w in weights.values())
    for _ in range(6):
        new = global_magnitude_masks(weights, masks, 0.2)
        kept = sum(int(m.sum()) for m in new.values())
        assert remaining - kept == int(0.2 * remaining + 0.5)       # exactly 20 % of what remained
        for name, m in new.items():                                 # pruned weights stay pruned
            if name in masks:
                assert not (m & ~masks[name]).any()
        removed = torch.cat([weights[n].abs()[masks[n] & ~new[n] if n in masks else ~new[n]] for n in weights])
        survivors = torch.cat([weights[n].abs()[new[n]] for n in weights])
        assert removed.max() <= survivors.min()                     # global: the smallest |w| across layers
        masks, remaining = new, kept
    # global, not per layer: the small-magnitude layer 'b' loses far more than 'a'
    assert masks['b'].float().mean() < 0.5 * masks['a'].float().mean()
    assert num_removed(10, 0.25) == 3 and num_removed(10, 0.2) == 2


@pytest.mark.parametrize('network_opt, first, last', [
    (TINY_EDSR, ['conv_first'], ['conv_last']),
    ({'type': 'LSRB', 'num_feat': 12, 'num_block': 2, 'upscale': 2, 'esa_channels': 6}, ['conv_first'], ['upsampler']),
])
def test_first_and_last_convs_read_the_image_and_write_the_output(network_opt, first, last):
    net = build_network(dict(network_opt))
    specs = trace_conv_specs(net, (16, 16))
    assert end_convs(net, network_opt, specs, None, torch.zeros(1, 3, 16, 16)) == (first, last)


@pytest.mark.parametrize('change, message', [
    ({'reset': 'rewind'}, 'pruning.rewind_iter is required'),
    ({'reset': 'rewind', 'rewind_iter': 10}, 'pruning.rewind_iter must be an integer in [1, 10)'),
    ({'rewind_iter': 3}, 'rewind_iter applies to pruning.reset: rewind only'),
    ({'reset': 'restart'}, "pruning.reset: unknown value 'restart'"),
    ({'prune_fraction': 1.0}, 'pruning.prune_fraction must be a number in (0, 1)'),
    ({'max_prune_iter': 20}, 'must equal pruning.rounds * pruning.round_iter'),
    ({'round': 3}, "unknown key(s) ['round']"),
])
def test_bad_lth_options_are_named(change, message):
    opt = load(TINY[0])
    pruning = {k: v for k, v in opt['pruning'].items() if k not in ('rewind_iter', 'reset')}
    opt = dict(opt, is_train=True, pruning={**pruning, 'reset': 'init', **change})
    with pytest.raises(ValueError) as error:
        MODEL_REGISTRY.get('LTHModel').check_options(opt)
    assert message in str(error.value)


def test_full_option_files_pass_the_checks_and_match_their_tiny_forms():
    assert {osp.basename(p) for p in FULL} == {osp.basename(p) for p in TINY} == \
        {f'{m}_edsr_x4.yml' for m in ('lth', 'lmc_lth', 'lth_pwc')}
    for path in FULL:
        opt = load(path)
        tiny = load(osp.join(ROOT, 'options', 'tiny', 'lth', osp.basename(path)))
        assert (opt['model_type'], opt['scale'], opt['network_g']['type']) == \
            (tiny['model_type'], tiny['scale'], tiny['network_g']['type']) == ('LTHModel', 4, 'EDSR')
        assert opt['pruning']['reset'] == tiny['pruning']['reset']
        assert opt['pruning']['prune_fraction'] == tiny['pruning']['prune_fraction'] == 0.2
        MODEL_REGISTRY.get('LTHModel').check_options(dict(opt, is_train=True))
        net = build_network(dict(opt['network_g']))              # EDSR-baseline x4: Table 3's "1500 K"
        assert sum(p.numel() for p in net.parameters()) == 1_517_571


# ---------------------------------------------------------------- resets, in process


def in_process(tmp_path, data, path, **changes):
    """An LTHModel built in this process from a tiny option file, and a batch maker."""
    from basicsr.models import build_model
    opt = tiny_options(path, data, 'pytest_lth_inproc', **changes)
    exp = tmp_path / 'exp'
    opt.update(is_train=True, dist=False, rank=0, world_size=1, root_path=str(tmp_path), auto_resume=False)
    for phase, dataset in opt['datasets'].items():
        dataset['phase'], dataset['scale'] = phase, opt['scale']
    opt['path'].update(experiments_root=str(exp), models=str(exp / 'models'), training_states=str(exp / 'states'),
                       log=str(exp), visualization=str(exp / 'vis'))
    torch.manual_seed(0)
    model = build_model(opt)
    generator = torch.Generator().manual_seed(1)

    def step(it):
        model.feed_data({'lq': torch.rand(2, 3, 16, 16, generator=generator),
                         'gt': torch.rand(2, 3, 64, 64, generator=generator)})
        model.optimize_parameters(it)
    return model, step


@pytest.mark.parametrize('reset', ['init', 'rewind', 'continue'])
def test_a_reset_returns_the_surviving_weights_to_the_recorded_iteration(reset, tmp_path, data_at):
    name = {'init': 'lth', 'rewind': 'lmc_lth', 'continue': 'lth_pwc'}[reset]
    path = osp.join(ROOT, 'options', 'tiny', 'lth', f'{name}_edsr_x4.yml')
    model, step = in_process(tmp_path, data_at(4), path, **{'pruning.rounds': 2, 'pruning.round_iter': 6})
    t = model.config.rewind_iter
    init = plain_state_dict(model.network)
    recorded = init if reset == 'init' else None
    for it in range(1, 13):
        step(it)
        if it == t:
            recorded = plain_state_dict(model.network)
        if it in (6, 12):
            after = plain_state_dict(model.network)
            masks = model.weight_masks
            assert set(masks) == set(model.prunable) and 'conv_first' not in masks and 'conv_last' not in masks
            for conv, mask in masks.items():
                assert not after[f'{conv}.weight'][~mask].any()
            if reset == 'continue':                       # LTH-PWC: nothing is reset
                assert not torch.equal(after['conv_first.weight'], init['conv_first.weight'])
                continue
            for key, value in after.items():
                mask = masks.get(key[:-len('.weight')]) if key.endswith('.weight') else None
                expected = recorded[key] if mask is None else recorded[key] * mask
                assert torch.equal(value, expected), key  # surviving weights == iteration 0 / t
    assert model.stage == 'finetune' and model.switch_iter == 12
    records = model.round_records
    assert [r['round'] for r in records] == [1, 2]
    assert [round(r['kept_after'], 3) for r in records] == [0.8, 0.64]


# ---------------------------------------------------------------- end to end


def exported(name):
    export = osp.join(ROOT, 'experiments', name, 'export')
    return (load_file(osp.join(export, 'net_g.safetensors')), load_file(osp.join(export, 'weight_masks.safetensors')),
            load(osp.join(export, 'pruning.json')))


@pytest.fixture(scope='module')
def tiny_runs(request, data_at, names, tmp_path_factory):
    """The selected tiny forms, run once for the module (conftest.run_tiny_forms)."""
    return run_tiny_forms(request, 'test_tiny_lth_runs_end_to_end', data_at, names, tmp_path_factory.mktemp('tiny'))


@pytest.mark.slow
@pytest.mark.parametrize('path', TINY, ids=osp.basename)
def test_tiny_lth_runs_end_to_end(path, tiny_runs, data_at, names, tmp_path):
    opt, status, log = tiny_runs[path]
    assert status == 0, f'fmpsr/train.py on {osp.basename(path)} failed:\n{log[-5000:]}'
    data, name = data_at(4), opt['name']
    weights, masks, info = exported(name)
    rounds = info['lth']['rounds']
    config = opt['pruning']
    assert len(rounds) == config['rounds'] and info['switch_iter'] == config['rounds'] * config['round_iter']
    # counts taken here from the exported masks
    prunable = info['lth']['prunable_convs']
    assert sorted(masks) == sorted(prunable)
    assert info['lth']['first_convs'] == ['conv_first'] and info['lth']['last_convs'] == ['conv_last']
    total = sum(masks[n].numel() for n in prunable)
    remaining = total
    for record in rounds:
        assert record['removed'] == int(0.2 * remaining + 0.5)
        remaining -= record['removed']
        assert record['val_psnr'] is not None and 5 < record['val_psnr'] < 60
    assert remaining == sum(int(masks[n].sum()) for n in prunable)
    # pruned weights exactly zero after fine-tuning; the first and last conv untouched by pruning
    for conv, mask in masks.items():
        assert not weights[f'{conv}.weight'][~mask].any(), conv
    assert weights['conv_first.weight'].count_nonzero() == weights['conv_first.weight'].numel()
    assert weights['conv_last.weight'].count_nonzero() == weights['conv_last.weight'].numel()
    numel = sum(v.numel() for k, v in weights.items() if k.endswith(('.weight', '.bias')) and 'mean' not in k)
    zeros = sum(int((v == 0).sum()) for k, v in weights.items() if k.endswith(('.weight', '.bias')))
    ratios = info['ratios']
    assert ratios['original_params'] == numel
    assert ratios['pruned_params'] == numel - zeros                 # the reported sparsity, recounted
    assert abs(rounds[-1]['kept_after'] - 0.8 ** config['rounds']) < 1e-3
    if osp.basename(path) == 'lth_edsr_x4.yml':    # the export: fmpsr/test.py's PSNR against a recount
        score_export(osp.join(ROOT, 'experiments', name, 'export'), 4, data, tmp_path, names)
