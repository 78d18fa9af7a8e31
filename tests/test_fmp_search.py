"""FMP / DHP search: the hypernetwork's initial scale, the gradient-driven selection diagnostic, and the
fine-tune scheduler whose period is the iterations left after the switch.

* ``HyperNetwork(init='plain')`` (the default) generates, before any training, the plain network's
  per-conv weight standard deviations and biases, and an output of the plain network's size (mean |y|
  and std of y within 2x, seeds 0-9) on LSRB, ESRB-6-256, EDSR, RCAN and RRDBNet; DHP's draw
  (``init='dhp'``) is shown to miss by orders of magnitude, so the check can fail.
* :func:`fmpsr.pruning.selection_diagnostics.kept_auc` on synthetic scores whose AUC is known.
"""
import copy

import pytest
import torch

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from fmpsr.pruning import HyperNetwork
from fmpsr.pruning.grouping import build_grouping

SEEDS = range(10)
ARCHS = {
    'LSRB-4-32': dict(type='LSRB', num_in_ch=3, num_out_ch=3, num_feat=32, num_block=4, upscale=4, esa_channels=16),
    'ESRB-6-256': dict(type='LSRB', num_in_ch=3, num_out_ch=3, num_feat=256, num_block=6, upscale=4,
                       esa_channels=16),
    'EDSR-4-32': dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=32, num_block=4, upscale=2),
    'RCAN-2x2-32': dict(type='RCAN', num_in_ch=3, num_out_ch=3, num_feat=32, num_group=2, num_block=2,
                        squeeze_factor=8, upscale=2),
    'RRDBNet-2-16': dict(type='RRDBNet', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, num_grow_ch=8,
                         scale=4),
}


_GROUPINGS = {}


def grouping_of(opt, net):
    """The channel grouping of ``opt``'s arch (by module names: the same for every seed; traced once)."""
    key = repr(sorted(opt.items()))
    if key not in _GROUPINGS:
        _GROUPINGS[key] = build_grouping(net, opt, None, torch.zeros(1, 3, 64, 64))
    return _GROUPINGS[key]


def build_pair(opt, seed, init='plain'):
    """(plain network, its conv weights' std and biases, output of the plain network, hypernetwork built
    from that plain network, its output) on one random 16x16 input."""
    torch.manual_seed(seed)
    net = build_network(copy.deepcopy(opt))
    convs = {n: (float(m.weight.detach().double().std(unbiased=False)),
                 None if m.bias is None else m.bias.detach().clone())
             for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(100))
    with torch.no_grad():
        y_plain = net(x)
    hyper = HyperNetwork(net, grouping_of(opt, net), 8, init=init)
    with torch.no_grad():
        y_hyper = hyper(x)
    return convs, y_plain, hyper, y_hyper


def within(a, b, factor):
    return 1 / factor <= a / b <= factor


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_plain_init_matches_the_plain_network_for_every_seed(arch):
    seeds = range(3) if arch == 'ESRB-6-256' else SEEDS   # ESRB-6-256: ~2 s a seed on one core
    for seed in seeds:
        convs, y_plain, hyper, y_hyper = build_pair(ARCHS[arch], seed)
        assert torch.isfinite(y_hyper).all()
        # output: mean |y| within 2x; EDSR / RCAN add the data set's RGB mean to y, which alone would
        # pass that, so for them the std of y too (elsewhere the std of a tiny random network's output
        # varies by 3x from seed to seed in the plain network itself)
        assert within(float(y_hyper.abs().mean()), float(y_plain.abs().mean()), 2.0), (arch, seed)
        if ARCHS[arch]['type'] in ('EDSR', 'RCAN'):
            assert within(float(y_hyper.std()), float(y_plain.std()), 2.0), (arch, seed)
        with torch.no_grad():
            for name, conv in hyper.hyper_convs():
                std, bias = convs[name]
                generated = conv.generate_weight().double()
                assert generated.shape == (conv.out_channels, conv.in_channels, *conv.kernel_size)
                assert within(float(generated.std(unbiased=False)), std, 1.01), (arch, seed, name)
                if bias is not None:
                    assert torch.equal(conv.generate_bias(), bias), (arch, seed, name)
        for vector in hyper.channel_vectors.values():
            assert torch.equal(vector.z.detach(), torch.ones(vector.size))


@pytest.mark.parametrize('arch', ['LSRB-4-32', 'EDSR-4-32'])
def test_dhp_init_blows_up_where_plain_init_does_not(arch):
    """DHP's draw: some seed of 0-9 gives an output > 10x the plain network's (the check above can fail)."""
    worst = 0.0
    for seed in SEEDS:
        _, y_plain, _, y_hyper = build_pair(ARCHS[arch], seed, init='dhp')
        worst = max(worst, float(y_hyper.std()) / float(y_plain.std()))
    assert worst > 10


def test_plain_init_channels_are_not_symmetric():
    """All-ones z: the channels of a group still get different weights (W1 / W2 differ per pair) and
    different gradients, so the search can tell them apart."""
    opt = ARCHS['LSRB-4-32']
    _, _, hyper, _ = build_pair(opt, 0)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    hyper(x).square().mean().backward()
    for name, vector in hyper.channel_vectors.items():
        if vector.prunable:
            grad = vector.z.grad
            live = grad[grad != 0]   # a channel a ReLU switches off for this input has gradient 0
            assert live.numel() >= vector.size // 2 and live.unique().numel() == live.numel(), name
    weight = hyper.net.body[0].conv1.generate_weight()
    assert weight.flatten(1).unique(dim=0).shape[0] == weight.shape[0]


def test_hyper_init_option_is_checked():
    from fmpsr.pruning import FMPConfig
    assert FMPConfig.from_options({}).hyper_init == 'plain'
    assert FMPConfig.from_options({'hyper_init': 'dhp'}).hyper_init == 'dhp'
    with pytest.raises(ValueError, match='pruning.hyper_init'):
        FMPConfig.from_options({'hyper_init': 'kaiming'})


# ---------------------------------------------------------------- selection diagnostics


def test_kept_auc_on_scores_whose_auc_is_known():
    from fmpsr.pruning.diagnostics import kept_auc
    kept = torch.tensor([True, True, False, False])
    assert kept_auc(torch.tensor([4., 3., 2., 1.]), kept) == 1.0          # kept all on top
    assert kept_auc(torch.tensor([1., 2., 3., 4.]), kept) == 0.0          # reversed
    assert kept_auc(torch.ones(4), kept) == 0.5                          # equal magnitudes (all-ones z)
    # kept {3, 1}, pruned {2, 0}: pairs (3>2, 3>0, 1<2, 1>0) = 3 of 4
    assert kept_auc(torch.tensor([3., 2., 1., 0.]), torch.tensor([True, False, True, False])) == 0.75
    # a tie between a kept and a pruned channel counts one half: (1 + 0.5) / 2
    assert kept_auc(torch.tensor([2., 1., 1.]), torch.tensor([True, True, False])) == 0.75
    assert kept_auc(torch.tensor([1., 2.]), torch.tensor([True, True])) is None
    with pytest.raises(ValueError, match='shape'):
        kept_auc(torch.ones(3), torch.ones(2, dtype=torch.bool))


def test_kept_auc_equals_the_pairwise_count_on_random_scores():
    from fmpsr.pruning.diagnostics import kept_auc
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=g).double()   # many ties
    kept = torch.rand(40, generator=g) < 0.4
    a, b = scores[kept][:, None], scores[~kept][None, :]
    expected = float(((a > b).double() + 0.5 * (a == b).double()).mean())
    assert abs(kept_auc(scores, kept) - expected) < 1e-12


def test_selection_diagnostics_per_group_and_weighted_mean():
    from fmpsr.pruning.diagnostics import selection_diagnostics
    report = selection_diagnostics({
        'a': {'kept': torch.tensor([True, False, True, False]), 'initial': torch.tensor([4., 3., 2., 1.]),
              'importance': torch.tensor([9., 1., 8., 2.])},
        'b': {'kept': torch.tensor([True, True]), 'initial': torch.ones(2), 'importance': torch.ones(2)},
        'c': {'kept': torch.tensor([False, True]), 'initial': torch.ones(2)}})
    assert report['groups']['a'] == {'size': 4, 'kept': 2, 'auc_initial_magnitude': 0.75, 'auc_importance': 1.0}
    assert report['groups']['b']['auc_importance'] is None                    # nothing pruned: undefined
    assert report['groups']['c'] == {'size': 2, 'kept': 1, 'auc_initial_magnitude': 0.5, 'auc_importance': None}
    assert report['mean'] == {'auc_initial_magnitude': round((0.75 * 4 + 0.5 * 2) / 6, 4), 'auc_importance': 1.0}


# ---------------------------------------------------------------- fine-tune scheduler: periods: remaining

FINETUNE_COSINE = {'optim_g': {'type': 'Adam', 'lr': 1e-3, 'weight_decay': 0, 'betas': [0.9, 0.999]},
                   'scheduler': {'type': 'CosineAnnealingRestartLR', 'periods': 'remaining', 'eta_min': 1e-5}}


def test_resolve_scheduler_periods_remaining():
    from fmpsr.models.pruned_sr_model import resolve_scheduler, scheduler_steps_left
    opt = {'type': 'CosineAnnealingRestartLR', 'periods': 'remaining', 'eta_min': 1e-5}
    assert resolve_scheduler(opt, 800, 300)['periods'] == [500]       # built in the switch iteration 300
    assert resolve_scheduler(opt, 800, 0)['periods'] == [799]         # built before iteration 1 (never stepped at 1)
    assert opt['periods'] == 'remaining'                               # not consumed
    assert scheduler_steps_left(800, 1) == 799
    fixed = {'type': 'CosineAnnealingRestartLR', 'periods': [800]}
    assert resolve_scheduler(fixed, 800, 300) == fixed
    with pytest.raises(ValueError, match='no iteration is left'):
        resolve_scheduler(opt, 300, 300)
    from fmpsr.models.pruned_sr_model import check_remaining
    with pytest.raises(ValueError, match='train.finetune.scheduler.periods: remaining applies to type'):
        check_remaining({'type': 'MultiStepLR', 'periods': 'remaining'}, 'train.finetune.scheduler')
    with pytest.raises(ValueError, match='restart_weights'):
        check_remaining(dict(opt, restart_weights=[1, 1]))


def _loop(model, start, stop, lrs):
    """BasicSR's training loop (``basicsr.train``): update the lr, then one step, per iteration."""
    g = torch.Generator().manual_seed(start)
    for it in range(start, stop + 1):
        model.update_learning_rate(it, warmup_iter=-1)
        lrs[it] = model.get_current_learning_rate()[0]
        model.feed_data({'lq': torch.rand(2, 3, 16, 16, generator=g), 'gt': torch.rand(2, 3, 32, 32, generator=g)})
        model.optimize_parameters(it)


def test_finetune_cosine_over_the_remaining_iterations_ends_at_eta_min_and_resumes_exactly(tmp_path, data):
    from conftest import build_model_in
    from fmpsr.compat import safe_torch_load
    total = 30
    # lambda_c 150 at lr 1e-3: z shrinks 0.15 a step, so unheld channels go from z = 1 in 7 iterations
    extra = {'train.total_iter': total, 'train.finetune': FINETUNE_COSINE, 'pruning.max_prune_iter': 12,
             'pruning.lambda_c': 150.0, 'pruning.check_freq': 2,
             'pruning.hyper_init': 'plain'}
    (tmp_path / 'a').mkdir()
    model = build_model_in(tmp_path / 'a', data, 'sched_a', **extra)
    lrs = {}
    _loop(model, 1, 20, lrs)
    switch = model.switch_iter
    assert switch is not None and switch <= 12 and model.stage == 'finetune'
    model.save(0, 20)                       # net_g_20.pth + training state 20.state
    _loop(model, 21, total, lrs)
    # a cosine over total - switch steps: the first fine-tune iteration near the lr, the last at eta_min
    assert abs(lrs[total] - 1e-5) < 1e-12
    assert lrs[switch + 1] > 0.95e-3 and all(lrs[i] > lrs[i + 1] for i in range(switch + 1, total))
    assert all(lrs[i] > 1e-5 + 1e-9 for i in range(switch + 1, total))   # not cut off before the end
    # resumed at iteration 20: the same lr at every later iteration
    models = tmp_path / 'a' / 'exp' / 'models'
    (tmp_path / 'b').mkdir()
    resumed = build_model_in(tmp_path / 'b', data, 'sched_b', **extra,
                             **{'path.pretrain_network_g': str(models / 'net_g_20.pth')})
    state = safe_torch_load(str(tmp_path / 'a' / 'exp' / 'states' / '20.state'), map_location='cpu',
                            what='training state')
    resumed.resume_training(state)
    assert resumed.switch_iter == switch
    again = {}
    _loop(resumed, 21, total, again)
    assert again == {i: lrs[i] for i in range(21, total + 1)}
    # the selection diagnostic: in pruning.json, and carried by the fine-tune checkpoint into the resumed run
    import json
    with open(tmp_path / 'a' / 'exp' / 'export' / 'pruning.json') as f:
        selection = json.load(f)['search']['selection']
    assert selection == json.loads(json.dumps(resumed.search_info['selection']))
    assert set(selection['groups']) == set(resumed.search_info['selection']['groups'])
    assert set(selection['mean']) == {'auc_initial_magnitude', 'auc_importance'}
    pruned = [row for row in selection['groups'].values() if 0 < row['kept'] < row['size']]
    assert pruned, selection
    for row in pruned:
        assert row['auc_initial_magnitude'] == 0.5      # all-ones z: the draw cannot decide
        assert 0 <= row['auc_importance'] <= 1
