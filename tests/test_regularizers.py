"""The weight-indicator regulariser lambda_W R(Z_W) (FMP Eqs. 4, 7; Table 5) and the ways it is applied.

Values and gradients are checked against numbers worked out by hand on a 2-layer tensor, so a form
that computed the wrong norm (e.g. always L1) or the wrong reduction fails; the proximal operators
likewise; then the pruner (masked by keep masks) and the model's optimiser grouping (a separate SGD
for the indicators, FMP Sec. 3.4), and that the second optimiser is saved and resumed.
"""
import copy
import math

import pytest
import torch
import yaml
from conftest import SCALE, build_model_in, write_options

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from basicsr.losses import build_loss
from fmpsr.losses.weight_indicator_loss import WeightIndicatorLoss
from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, build_grouping, trace_conv_specs

# two layers of two indicators: ||(3, -4)||_2 = 5, ||(0.5, 1.5)||_2 = sqrt(2.5)
Z = [[3.0, -4.0], [0.5, 1.5]]
LAM = 0.1
SQ = math.sqrt(2.5)
HAND = {  # norm: (R, dR/dZ) worked out by hand
    'l1': (3 + 4 + 0.5 + 1.5, [[1, -1], [1, 1]]),
    'l2': (5 + SQ, [[3 / 5, -4 / 5], [0.5 / SQ, 1.5 / SQ]]),
    'weight_decay': (0.5 * (9 + 16 + 0.25 + 2.25), Z),
}


@pytest.mark.parametrize('reduction', ['sum', 'mean'])
@pytest.mark.parametrize('norm', ['l1', 'l2', 'weight_decay'])
def test_value_and_gradient_by_hand(norm, reduction):
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    loss = WeightIndicatorLoss(loss_weight=LAM, norm=norm, reduction=reduction)
    value = loss([z])
    value.backward()
    divide = 4 if reduction == 'mean' else 1       # N_W = 4 indicators
    r, grad = HAND[norm]
    assert value.item() == pytest.approx(LAM * r / divide, rel=1e-9)
    assert torch.allclose(z.grad, LAM * torch.tensor(grad, dtype=torch.float64) / divide, rtol=1e-6)


def test_masked_entries_do_not_count_but_n_w_does():
    z = torch.tensor(Z, requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    loss = WeightIndicatorLoss(LAM, 'l2', 'mean')
    value = loss([z], [mask])
    value.backward()
    # layer 0 keeps (3,): norm 3; N_W stays 4
    assert value.item() == pytest.approx(LAM * (3 + SQ) / 4, rel=1e-6)
    assert z.grad[0, 1] == 0 and z.grad[0, 0].item() == pytest.approx(LAM / 4, rel=1e-6)


def test_several_tensors_and_built_from_options():
    loss = build_loss({'type': 'WeightIndicatorLoss', 'loss_weight': 0.02, 'norm': 'l1', 'reduction': 'sum'})
    a, b = torch.full((2, 3), -0.5), torch.ones(1, 4)
    assert loss([a, b]).item() == pytest.approx(0.02 * (3 + 4))
    assert loss.scale([a, b]) == 0.02
    assert WeightIndicatorLoss(0.02, reduction='mean').scale([a, b]) == pytest.approx(0.02 / 10)


@pytest.mark.parametrize('kwargs, message', [
    ({'norm': 'l0'}, "train.indicator_opt.norm: unknown norm 'l0'"),
    ({'reduction': 'avg'}, "train.indicator_opt.reduction: unknown reduction 'avg'"),
    ({'loss_weight': -1}, 'loss_weight (lambda_W) must be a number >= 0'),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        WeightIndicatorLoss(**kwargs)


# ---- proximal operators (t = lr * lambda_W, / N_W for 'mean')

def test_proximal_l1_is_soft_thresholding():
    z = torch.nn.Parameter(torch.tensor([[0.5, -0.03, 0.01, -2.0]]))
    WeightIndicatorLoss(0.02, 'l1', 'sum').proximal_([z], lr=1.0)
    assert torch.allclose(z.data, torch.tensor([[0.48, -0.01, 0.0, -1.98]]))


def test_proximal_l2_shrinks_each_layer_as_a_block():
    z = torch.nn.Parameter(torch.tensor([[3.0, -4.0], [0.3, 0.4]]))  # norms 5 and 0.5
    WeightIndicatorLoss(1.0, 'l2', 'sum').proximal_([z], lr=1.0)        # t = 1
    assert torch.allclose(z.data, torch.tensor([[2.4, -3.2], [0.0, 0.0]]))


def test_proximal_weight_decay_divides_and_mean_scales_by_n_w():
    z = torch.nn.Parameter(torch.tensor([[2.0, -1.0], [4.0, 0.5]]))
    WeightIndicatorLoss(2.0, 'weight_decay', 'mean').proximal_([z], lr=0.5)  # t = 0.5 * 2 / 4 = 0.25
    assert torch.allclose(z.data, torch.tensor([[2.0, -1.0], [4.0, 0.5]]) / 1.25)


def test_proximal_zeroes_masked_entries():
    z = torch.nn.Parameter(torch.tensor([[0.5, 0.7]]))
    WeightIndicatorLoss(0.1, 'l1', 'sum').proximal_([z], 1.0, [torch.tensor([[True, False]])])
    assert torch.allclose(z.data, torch.tensor([[0.4, 0.0]]))


# ---- the pruner: the loss over kept indicators; gradient vs proximal

def tiny_hyper(seed=0):
    opt = {'type': 'LSRB', 'num_feat': 8, 'num_block': 1, 'upscale': 2, 'esa_channels': 4}
    torch.manual_seed(seed)
    plain = build_network(copy.deepcopy(opt))
    specs = trace_conv_specs(plain, (16, 16), 3)
    grouping = build_grouping(plain, opt, None, torch.zeros(1, 3, 16, 16), ())
    return HyperNetwork(plain, grouping, 4), specs


def test_pruner_regularization_uses_the_loss_on_kept_indicators():
    hyper, specs = tiny_hyper()
    conv = dict(hyper.hyper_convs())['body.0.conv1']
    with torch.no_grad():
        for bank in hyper.banks:
            bank.weight_indicator.uniform_(-1, 1)
        conv.weight_mask[0] = False                           # one output channel's weights pruned
    config = FMPConfig.from_options({'weight_reg': 'weight_decay', 'weight_reg_reduction': 'sum', 'lambda_w': 0.3})
    pruner = FMPPruner(hyper, specs, config)
    expected = 0.3 * 0.5 * sum(float((c.weight_indicator.detach() * c.keep_mask()).pow(2).sum())
                               for _, c in hyper.hyper_convs())
    assert pruner.regularization().item() == pytest.approx(expected, rel=1e-5)
    assert float(conv.weight_indicator[0].detach().abs().sum()) > 0   # masked ones exist but do not count
    pruner.weight_frozen = True
    assert pruner.regularization().item() == 0


def test_pruner_proximal_form_shrinks_by_lr_lambda_and_back_propagates_nothing():
    hyper, specs = tiny_hyper()
    config = FMPConfig.from_options({'indicator_update': 'proximal', 'weight_reg_reduction': 'sum', 'lambda_w': 0.02})
    pruner = FMPPruner(hyper, specs, config)
    assert pruner.regularization().item() == 0
    conv = dict(hyper.hyper_convs())['body.0.conv2']
    with torch.no_grad():
        conv.weight_mask[1] = False
    pruner.indicator_proximal_step(0.5)                       # t = 0.01, independent of N_W
    assert torch.allclose(conv.weight_indicator[0], torch.full_like(conv.weight_indicator[0], 0.99))
    assert float(conv.weight_indicator[1].abs().sum()) == 0
    gradient = FMPPruner(hyper, specs, FMPConfig.from_options({}))   # 'gradient': the step is a no-op
    before = conv.weight_indicator.detach().clone()
    gradient.indicator_proximal_step(0.5)
    assert torch.equal(conv.weight_indicator, before)


# ---- the model: a separate optimiser for Z_W (FMP Sec. 3.4), saved and resumed

def build_model(tmp_path, data, **extra):
    return build_model_in(tmp_path, data, 'pytest_regularizers', **extra)


SGD = {'pruning.indicator_optim': {'type': 'SGD', 'lr': 0.05, 'momentum': 0.9}, 'pruning.weight_lr_mult': 1.0}


def test_sgd_form_groups_the_indicators_into_their_own_optimizer(tmp_path, data):
    model = build_model(tmp_path, data, **SGD)
    assert len(model.optimizers) == 2 and model.optimizers[1] is model.optimizer_w
    assert isinstance(model.optimizer_w, torch.optim.SGD) and isinstance(model.optimizer_g, torch.optim.Adam)
    indicators = {id(b.weight_indicator) for b in model.hypernetwork.banks}
    in_w = {id(p) for g in model.optimizer_w.param_groups for p in g['params']}
    in_g = {id(p) for g in model.optimizer_g.param_groups for p in g['params']}
    assert in_w == indicators and not in_g & indicators
    assert in_g | in_w == {id(p) for p in model.hypernetwork.parameters()}
    assert model.optimizer_w.param_groups[0]['lr'] == 0.05 and model.optimizer_w.param_groups[0]['momentum'] == 0.9
    assert len(model.schedulers) == 2 and model.indicator_lr() == 0.05
    # one step moves the indicators by exactly -lr * (dL_rec/dZ_W + dlambda_W R/dZ_W) (plain SGD, first step)
    model.feed_data({'lq': torch.rand(2, 3, 16, 16), 'gt': torch.rand(2, 3, 16 * SCALE, 16 * SCALE)})
    before = [b.weight_indicator.detach().clone() for b in model.hypernetwork.banks]
    model.optimize_parameters(1)
    grads = [b.weight_indicator.grad for b in model.hypernetwork.banks]
    for z0, bank, g in zip(before, model.hypernetwork.banks, grads):
        assert torch.allclose(bank.weight_indicator.detach(), z0 - 0.05 * g, atol=1e-7)


def test_adam_form_keeps_the_indicators_in_optim_g(tmp_path, data):
    model = build_model(tmp_path, data)
    assert len(model.optimizers) == 1
    names = [g['name'] for g in model.optimizer_g.param_groups]
    assert names == ['hyper', 'channel', 'weight'] and model.indicator_lr() == pytest.approx(1e-3 * 30)


def test_second_optimizer_is_saved_and_resumed(tmp_path, data):
    model = build_model(tmp_path, data, **SGD)
    model.feed_data({'lq': torch.rand(2, 3, 16, 16), 'gt': torch.rand(2, 3, 16 * SCALE, 16 * SCALE)})
    model.optimize_parameters(1)
    state = model.training_state(0, 1)
    assert len(state['optimizers']) == 2 and state['optimizers'][1]['state']   # momentum buffers saved
    (tmp_path / 'b').mkdir()
    fresh = build_model(tmp_path / 'b', data, **SGD)
    fresh.resume_training(copy.deepcopy(state))
    saved = state['optimizers'][1]['state']
    for key, value in fresh.optimizer_w.state_dict()['state'].items():
        assert torch.equal(value['momentum_buffer'], saved[key]['momentum_buffer'])


@pytest.mark.parametrize('extra, error, message', [
    ({'train.indicator_opt': {'type': 'WeightIndicatorLoss', 'loss_weight': 0.02}},
     ValueError, 'given twice, in train.indicator_opt and in pruning.lambda_w: remove pruning.lambda_w '
                 '(in train.indicator_opt it reads loss_weight: 0.02)'),
    ({'pruning.indicator_update': 'prox'}, ValueError, "pruning.indicator_update: unknown update 'prox'"),
    ({'pruning.indicator_optim': {'type': 'Foo', 'lr': 1}}, ValueError, "indicator_optim.type: 'Foo' is not"),
    ({'pruning.indicator_optim': {'type': 'SGD', 'lr': 0.1}}, ValueError, 'with pruning.indicator_optim set its lr'),
    ({'pruning.indicator_optim': {'type': 'SGD', 'lr': 0.1, 'momentun': 0.9}, 'pruning.weight_lr_mult': 1.0},
     ValueError, 'pruning.indicator_optim (SGD): '),
])
def test_bad_indicator_options_are_named(tmp_path, data, extra, error, message):
    from fmpsr.models.fmp_model import FMPModel
    path = tmp_path / 'opt.yml'
    opt = write_options(path, 'pytest_regularizers', data, extra=extra)
    opt['is_train'] = True
    with pytest.raises(error, match=message.replace('(', r'\(').replace(')', r'\)')):
        FMPModel.check_options(opt)


def test_indicator_opt_maps_onto_the_config(tmp_path, data):
    from fmpsr.models.fmp_model import FMPModel
    opt = write_options(tmp_path / 'opt.yml', 'pytest_regularizers', data)
    opt['is_train'] = True
    for key in ('lambda_w',):
        opt['pruning'].pop(key)
    opt['train']['indicator_opt'] = {'type': 'WeightIndicatorLoss', 'loss_weight': 0.5, 'norm': 'l2',
                                     'reduction': 'sum'}
    config = FMPModel.check_options(opt)
    assert (config.lambda_w, config.weight_reg, config.weight_reg_reduction) == (0.5, 'l2', 'sum')
    opt['train']['indicator_opt'] = {'type': 'NoSuchLoss'}
    with pytest.raises(ValueError, match="no loss named 'NoSuchLoss'"):
        FMPModel.check_options(opt)


@pytest.mark.slow
def test_indicator_dynamics_benchmark_quick(tmp_path):
    """scripts/benchmark/indicator_dynamics.py --quick on LSRB-4-32: JSON + PNG, and the pulls it reports are
    lambda_W / N_W (averaged term) and lambda_W (summed L1 term) exactly."""
    import importlib.util
    import json
    from conftest import ROOT
    path = f'{ROOT}/scripts/benchmark/indicator_dynamics.py'
    spec = importlib.util.spec_from_file_location('indicator_dynamics', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / 'dyn.json'
    module.main(['--quick', '--archs', 'lsrb', '--out', str(out)])
    data = json.loads(out.read_text())
    assert (tmp_path / 'dyn.png').stat().st_size > 0
    rows = {r['form']: r for r in data['results']}
    assert set(rows) == {'adam_mean', 'proximal_adam'}
    n_w = rows['adam_mean']['n_indicators']
    assert n_w == sum(b.weight_indicator.numel() for b in module.build('lsrb', 0)[0].banks)
    assert rows['adam_mean']['g_reg_abs_mean'] == pytest.approx(0.02 / n_w, rel=1e-3)
    assert rows['proximal_adam']['g_reg_abs_mean'] == pytest.approx(0.02, rel=1e-3)
    assert data['target']['gamma_w'] == 0.1148 and data['target']['budget'] == 300000
    # the projection honours the lr schedule: 250 K full-lr steps from 0 take 200 K + 2 * 50 K iterations
    assert module.iterations_for(250_000, 0, [200_000, 400_000], 0.5) == pytest.approx(300_000)
