"""SRP (fmpsr/models/srp_model.py, fmpsr/losses/srp_loss.py): the penalty's schedule and gradient, the
selection on a real run (free convs: smallest L1 of the pretrained weights; constrained convs: one
seeded random set), SRP Fig. 3 as the run's output, the exported counts recounted, fmpsr/test.py on
the export, option files, and resume after kill -9 in the prune stage."""
import glob
import json
import math
import os.path as osp

import pytest
import torch
from baseline_helpers import (experiment, load_yaml, pruning_info, recount_export, run_test_py, run_tiny,
                              same_method_keys, save_pretrained, tiny_options)
from conftest import ROOT, run
from resume_helpers import kill_and_resume
from test_reliability import hooked, recorded_iters

import fmpsr  # noqa: F401
from basicsr.losses import build_loss
from basicsr.utils.registry import MODEL_REGISTRY
from fmpsr.losses.srp_loss import GrowingL2Loss

TINY = 'options/tiny/srp/srp_edsr_x2.yml'


# ---------------------------------------------------------------- the penalty


def test_alpha_reaches_tau_at_the_papers_iteration():
    loss = build_loss({'type': 'GrowingL2Loss'})            # the paper's Delta 1e-4, T 20, tau 0.5
    assert loss.iters_to_tau == 100_000
    assert loss.alpha(19) == 0 and loss.alpha(20) == pytest.approx(1e-4) and loss.alpha(39) == pytest.approx(1e-4)
    assert loss.alpha(99_999) == pytest.approx(0.4999) and loss.alpha(99_999) < 0.5
    assert loss.alpha(100_000) == 0.5 and loss.alpha(10 ** 7) == 0.5
    assert loss.alpha(120, start_iter=100) == pytest.approx(1e-4)


def test_gradient_is_alpha_w_on_the_penalised_entries_only():
    conv = torch.nn.Conv2d(4, 6, 3)
    rows = torch.tensor([1, 4])
    loss = GrowingL2Loss()
    value = loss([conv.weight[rows], conv.bias[rows]], current_iter=100_000)
    value.backward()
    expected = torch.zeros_like(conv.weight)
    expected[rows] = 0.5 * conv.weight.detach()[rows]
    assert torch.allclose(conv.weight.grad, expected)
    bias = torch.zeros_like(conv.bias)
    bias[rows] = 0.5 * conv.bias.detach()[rows]
    assert torch.allclose(conv.bias.grad, bias)
    squares = conv.weight.detach()[rows].pow(2).sum() + conv.bias.detach()[rows].pow(2).sum()
    assert float(value.detach()) == pytest.approx(0.25 * float(squares))
    mean = GrowingL2Loss(reduction='mean')([conv.weight[rows]], 100_000)
    assert float(mean.detach()) == pytest.approx(0.25 * float(conv.weight.detach()[rows].pow(2).mean()))


@pytest.mark.parametrize('kwargs, message', [({'reduction': 'none'}, "reduction must be 'sum' or 'mean'"),
                                             ({'interval': 0}, 'interval must be an integer >= 1'),
                                             ({'tau': -1}, 'tau must be a number > 0')])
def test_bad_penalty_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrowingL2Loss(**kwargs)


# ---------------------------------------------------------------- option files


def train_opt(path, **extra):
    opt = load_yaml(path)
    opt['is_train'] = True
    for key, value in extra.items():
        node = opt
        *parents, last = key.split('.')
        for p in parents:
            node = node[p]
        node[last] = value
    return opt


@pytest.mark.slow
@pytest.mark.parametrize('path', sorted(glob.glob(osp.join(ROOT, 'options/srp/*.yml'))))
def test_full_file_and_its_tiny_form(path):
    name = osp.basename(path)
    full, tiny = train_opt(path), train_opt(osp.join(ROOT, 'options/tiny/srp', name))
    same_method_keys(full, tiny)
    config = MODEL_REGISTRY.get('SRPModel').check_options(full)
    assert config.max_prune_iter == 100_000 + 43_150          # the paper's schedule, then fine-tuning
    assert full['train']['sparsity_opt'] == {'type': 'GrowingL2Loss', 'loss_weight': 1.0, 'reduction': 'sum',
                                             'delta': 1e-4, 'interval': 20, 'tau': 0.5}
    assert full['path']['pretrain_network_g']                 # SRP starts from a pretrained network
    if name.startswith('srpn_lite'):
        assert full['network_g']['num_feat'] == 256 and full['pruning']['ratio'] == 211 / 256
    MODEL_REGISTRY.get('SRPModel').check_options(tiny)


@pytest.mark.parametrize('extra, message', [
    ({'pruning.tau': 0.5}, "pruning: ['tau'] belong to the penalty loss now: write them as train.sparsity_opt"),
    ({'pruning.ratio': 1.0}, 'pruning.ratio must be a number in [0, 1)'),
    ({'pruning.constrained': 'first'}, "pruning.constrained: unknown value 'first'"),
    ({'pruning.max_prune_iter': 10}, 'pruning.max_prune_iter (10) ends the prune stage before the penalty schedule'),
    ({'train.total_iter': 24}, 'no fine-tuning is left'),
    ({'train.sparsity_opt': {'type': 'L1Loss'}}, 'is not a growing penalty'),
])
def test_bad_options_are_named(extra, message):
    with pytest.raises(ValueError) as error:
        MODEL_REGISTRY.get('SRPModel').check_options(train_opt(TINY, **extra))
    assert message in str(error.value)


# ---------------------------------------------------------------- a real run


@pytest.fixture(scope='module')
def srp_run(data_at, names, tmp_path_factory):
    """The tiny x2 SRP file from a saved 'pretrained' EDSR, run to the end, scored by fmpsr/test.py."""
    folder = tmp_path_factory.mktemp('srp')
    data = data_at(2)
    opt = load_yaml(TINY)
    state = save_pretrained(opt['network_g'], folder / 'pretrained.pth')
    name = names('pytest_srp')
    extra = {'path.pretrain_network_g': str(folder / 'pretrained.pth'), 'logger.save_checkpoint_freq': 10}
    opt = tiny_options(TINY, name, data, folder / 'srp.yml', extra)
    # recorded by tests/hooked_run.py: the per-iteration reference of the resume test
    run(hooked(folder / 'record', 'fmpsr/train.py', '-opt', folder / 'srp.yml'))
    return {'name': name, 'opt': opt, 'state': state, 'data': data, 'folder': folder, 'extra': extra,
            'record': folder / 'record'}


@pytest.mark.slow
def test_the_run_prunes_what_the_rule_chooses(srp_run, tmp_path, names):
    name, opt, state = srp_run['name'], srp_run['opt'], srp_run['state']
    info = pruning_info(name)
    assert info['switch_iter'] == 20 + 4                      # tau at 5 x 4 iterations, 4 stabilising
    assert info['ratios']['converged'] is True
    pruned = info['selection']['pruned_channels']
    # free convs: the 8 smallest-L1 filters of the pretrained weights
    for i in range(2):
        l1 = state[f'body.{i}.conv1.weight'].abs().sum((1, 2, 3))
        assert sorted(pruned[f'body_{i}_conv1']) == sorted(torch.topk(l1, 8, largest=False).indices.tolist())
    # constrained convs (head, block outputs, after-body): one random set drawn from manual_seed
    drawn = torch.randperm(16, generator=torch.Generator().manual_seed(opt['manual_seed']))[:8]
    assert sorted(pruned['conv_first']) == sorted(drawn.tolist())
    assert info['selection']['kept_groups']['upsample_0'] == 'pixel_shuffle'
    compact, _ = recount_export(name, opt['network_g'])
    widths = {n: (m.in_channels, m.out_channels) for n, m in compact.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert widths['conv_first'] == (3, 8) and widths['body.0.conv1'] == (8, 8) and widths['upsample.0'] == (8, 64)
    assert widths['conv_last'] == (16, 3)                     # the upsampler keeps its output channels
    scores = run_test_py(name, 2, srp_run['data'], tmp_path, names)
    assert 0 < scores['ssim'] <= 1                             # PSNR: checked against a recount inside


@pytest.mark.slow
def test_fig3_pruned_filters_go_down(srp_run):
    name = srp_run['name']
    assert osp.getsize(experiment(name, 'figures', 'srp_filter_norms.png')) > 1000
    with open(experiment(name, 'figures', 'srp_filter_norms.json')) as f:
        history = json.load(f)
    assert set(history) == {'body.1.conv1', 'body.1.conv2'}    # a free and a constrained conv
    for entry in history.values():
        assert entry['iter'] == [4, 8, 12, 16, 20, 24]
        assert entry['pruned'][-1] < 0.75 * entry['pruned'][0]   # driven down by the penalty
        assert entry['kept'][-1] > 0.9 * entry['kept'][0]


@pytest.mark.slow
def test_resume_after_sigkill_in_the_prune_stage(srp_run, names, tmp_path):
    name = names('pytest_srp_kill')
    tiny_options(TINY, name, srp_run['data'], tmp_path / 'kill.yml', srp_run['extra'])
    # held right after 10.state is in place: the prune stage (the switch is at 24)
    kill_and_resume(tmp_path / 'kill.yml', name, tmp_path, [(10, 'after', 10, 'prune')],
                    recorded_iters(srp_run['record']), 40, srp_run['name'])
    with open(experiment(name, 'figures', 'srp_filter_norms.json')) as f:
        resumed = json.load(f)
    with open(experiment(srp_run['name'], 'figures', 'srp_filter_norms.json')) as f:
        assert resumed == json.load(f)                      # Fig. 3's history survives the kill too


def test_unknown_plot_layer_is_named():
    with pytest.raises(ValueError, match=r"pruning.plot_layers: \['body.12.body.0'\] are not convs of network_g"):
        MODEL_REGISTRY.get('SRPModel').check_options(train_opt(TINY, **{'pruning.plot_layers': ['body.12.body.0']}))


@pytest.mark.slow
# x2 runs above; of the rest, one EDSR (two-stage x4 upsampler) and one SRPN-Lite (x3: 27 outputs before
# PixelShuffle): the other files differ from these only in the scale (checked by test_full_file_and_its_tiny_form)
@pytest.mark.parametrize('path', ['options/tiny/srp/srp_edsr_x4.yml', 'options/tiny/srp/srpn_lite_x3.yml'])
def test_other_tiny_forms_run_end_to_end(path, data_at, names, tmp_path):
    compact, info, opt = run_tiny(path, data_at, names, tmp_path)
    assert info['switch_iter'] == 24
    kept = 16 - math.ceil(opt['pruning']['ratio'] * 16)         # 8 (r = 0.5) or 2 (SRPN-Lite's 211/256)
    convs = {n: m for n, m in compact.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs['conv_first'].out_channels == convs['body.1.conv1'].out_channels == kept
    if opt['network_g']['type'] == 'SRPNLite':                 # one conv to 3*s*s before PixelShuffle
        s = opt['scale']
        assert convs['upsampler'].weight.shape == (3 * s * s, kept, 3, 3)
        assert info['ratios']['pruned_params'] == (27 * kept + kept) + 5 * (9 * kept * kept + kept) + \
            (9 * kept * 3 * s * s + 3 * s * s)
