"""ISS-P / IHT / ISS-R (ISSPModel): the per-iteration rule checked against weights captured just before
it ran, the seeded random sets of ISS-R, the option files, tiny end-to-end runs (prune -> fixed mask ->
fine-tune -> export -> fmpsr/test.py) recounted from the exported safetensors. Resume after kill -9
(ISS-R in both stages, ISS-P with N:M): tests/test_resume_methods.py."""
import glob
import math
import os.path as osp

import numpy as np
import pytest
import torch
import yaml
from baseline_helpers import score_export
from conftest import ROOT, SCALE, run_tiny_forms, write_options
from safetensors.torch import load_file

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.registry import MODEL_REGISTRY
from fmpsr.pruning.unstructured import Ramp

FULL = sorted(glob.glob(osp.join(ROOT, 'options', 'issp', '*.yml')))
TINY = sorted(glob.glob(osp.join(ROOT, 'options', 'tiny', 'issp', '*.yml')))
EDSR = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': SCALE,
        'res_scale': 1}


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def parsed_options(tmp_path, pruning, network=None, name='pytest_issp', **extra):
    """The dict BasicSR's parse_options would give for a tiny ISSPModel option file."""
    extra = dict(extra, pruning=dict({'macs_input_size': [16, 16], 'check_freq': 2, 'max_prune_iter': 20}, **pruning),
                 network_g=dict(network or EDSR))
    opt = write_options(tmp_path / 'opt.yml', name, tmp_path / 'nodata', model_type='ISSPModel', extra=extra)
    opt['is_train'] = True
    for phase, dataset in opt['datasets'].items():
        dataset['phase'], dataset['scale'] = phase.split('_')[0], opt['scale']
    return opt


def in_process(tmp_path, pruning, seed=0, init_seed=0, network=None):
    from basicsr.models import build_model
    tmp_path.mkdir(parents=True, exist_ok=True)
    opt = parsed_options(tmp_path, pruning, network)
    exp = tmp_path / 'exp'
    opt.update(dist=False, rank=0, world_size=1, num_gpu=0, root_path=str(tmp_path), auto_resume=False,
               manual_seed=seed)
    opt['path'].update(experiments_root=str(exp), models=str(exp / 'models'),
                       training_states=str(exp / 'training_states'), log=str(exp), visualization=str(exp / 'vis'))
    torch.manual_seed(init_seed)
    return build_model(opt)


def step_capturing(model, iteration, batch_seed=0):
    """One optimize_parameters call; returns the conv weights as they were right after the optimiser
    step, before the method's shrinkage (captured by wrapping the optimiser's step)."""
    captured = {}
    real_step = model.optimizer_g.step

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        for name, module in model.net_g.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                captured[name] = module.weight.detach().clone()
        return out
    model.optimizer_g.step = step
    g = torch.Generator().manual_seed(batch_seed)
    model.feed_data({'lq': torch.rand(2, 3, 16, 16, generator=g), 'gt': torch.rand(2, 3, 32, 32, generator=g)})
    try:
        model.optimize_parameters(iteration)
    finally:
        model.optimizer_g.step = real_step
    return captured


def smallest(weight, ratio):
    """Flat indices of the ceil(ratio * numel) smallest |w| (numpy, stable: earlier index first)."""
    flat = weight.abs().flatten().numpy()
    return np.argsort(flat, kind='stable')[:math.ceil(ratio * flat.size - 1e-9)]


@pytest.mark.parametrize('method, alpha', [('iss_p', 0.95), ('iss_p', 0.5), ('iht', 0.0)])
def test_one_step_shrinks_exactly_the_smallest_fraction(tmp_path, method, alpha):
    ratio = 0.9
    pruning = {'method': method, 'prune_ratio': ratio} if method == 'iht' else \
        {'method': method, 'prune_ratio': ratio, 'alpha': alpha}
    model = in_process(tmp_path, pruning)
    before = step_capturing(model, 1)
    convs = dict((n, m) for n, m in model.net_g.named_modules() if isinstance(m, torch.nn.Conv2d))
    assert len(before) == len(convs) == 8
    for name, w in before.items():
        after = convs[name].weight.detach()
        expected = w.clone().flatten()
        idx = torch.from_numpy(smallest(w, ratio))
        expected[idx] = expected[idx] * torch.tensor(alpha, dtype=w.dtype)
        assert torch.equal(after.flatten(), expected), name
        if method == 'iht':
            assert int((after == 0).sum()) == idx.numel()
        kept = model.weight_masks[name].cpu().flatten()
        assert int((~kept).sum()) == idx.numel() and not kept[idx].any()   # the set becomes the mask


def test_iss_r_shrinks_a_seeded_random_set(tmp_path):
    def shrunk_set(seed, sub):
        model = in_process(tmp_path / sub, {'method': 'iss_r', 'prune_ratio': 0.5, 'alpha': 0.5}, seed=seed)
        before = step_capturing(model, 7)
        conv = model.net_g.body[0].conv1
        changed = conv.weight.detach() != before['body.0.conv1']
        return changed.flatten(), before['body.0.conv1'], model.weight_masks['body.0.conv1'].flatten()
    a, w, kept = shrunk_set(0, 'a')
    assert int(a.sum()) == math.ceil(0.5 * a.numel())
    assert torch.equal(a, ~kept)
    magnitude = torch.zeros_like(a)
    magnitude[torch.from_numpy(smallest(w, 0.5))] = True
    overlap = int((a & magnitude).sum()) / int(a.sum())
    assert overlap < 0.75, 'a random set should not be the magnitude set'
    b, _, _ = shrunk_set(0, 'b')
    assert torch.equal(a, b)                  # the same seed and iteration: the same set
    c, _, _ = shrunk_set(1, 'c')
    assert not torch.equal(a, c)              # another manual_seed: another set


def test_flips_are_recorded_between_consecutive_sets(tmp_path):
    model = in_process(tmp_path, {'method': 'iss_p', 'prune_ratio': 0.5, 'alpha': 0.5,
                                  'plot_layers': ['body.0.conv1']})
    step_capturing(model, 1, batch_seed=1)
    first = model.weight_masks['body.0.conv1'].clone()
    step_capturing(model, 2, batch_seed=2)   # check_freq 2: iteration 2 is recorded
    second = model.weight_masks['body.0.conv1']
    assert model.history['iter'] == [2]
    assert model.history['flips']['body.0.conv1'] == [int((first ^ second).sum())]
    assert model.history['grad_norm']['body.0.conv1'][0] > 0


def test_ramps():
    linear, cubic = Ramp('linear', 0.0, 0.9, 100), Ramp('cubic', 0.0, 0.9, 100)
    assert linear(0) == 0.0 and linear(50) == pytest.approx(0.45) and linear(100) == linear(500) == 0.9
    assert cubic(50) == pytest.approx(0.9 * (1 - 0.5 ** 3)) and cubic(100) == 0.9
    assert Ramp('constant', 0.0, 0.9, 100)(0) == 0.9
    alpha = Ramp('linear', 1.0, 0.9, 10)
    assert alpha(5) == pytest.approx(0.95)


def test_a_linear_ramp_moves_pr_and_alpha_and_the_reported_counts(tmp_path):
    model = in_process(tmp_path, {'method': 'iss_p', 'prune_ratio': 0.8, 'alpha': 0.5, 'ramp': 'linear',
                                  'ramp_iter': 4})
    biases = sum(m.bias.numel() for m in model.net_g.modules() if isinstance(m, torch.nn.Conv2d))
    for it in range(1, 7):
        before = step_capturing(model, it, batch_seed=it)
        pr, alpha = 0.8 * min(it / 4, 1), 1.0 - 0.5 * min(it / 4, 1)
        w, after = before['body.0.conv1'], model.net_g.body[0].conv1.weight.detach()
        idx = torch.from_numpy(smallest(w, pr))
        expected = w.clone().flatten()
        expected[idx] = expected[idx] * torch.tensor(alpha, dtype=w.dtype)
        assert torch.equal(after.flatten(), expected), it
        kept = sum(int(m.sum()) for m in model.weight_masks.values())
        assert model.current_ratios().pruned.params == kept + biases, it


def test_exclusions_leave_convs_dense(tmp_path):
    model = in_process(tmp_path, {'method': 'iht', 'prune_ratio': 0.5, 'skip_first_last': True,
                                  'exclude': ['upsample.*']})
    before = step_capturing(model, 1)
    for name in ('conv_first', 'conv_last', 'upsample.0'):
        assert torch.equal(model.net_g.get_submodule(name).weight.detach(), before[name]), name
        assert name not in model.weight_masks
    assert int((model.net_g.body[0].conv1.weight == 0).sum()) == 288


@pytest.mark.parametrize('pruning, message', [
    ({'method': 'isp'}, "pruning.method: unknown value 'isp'"),
    ({'method': 'iss_p'}, 'pruning.prune_ratio is required'),
    ({'prune_ratio': 1.0}, 'pruning.prune_ratio must be a number in (0, 1)'),
    ({'method': 'iht', 'prune_ratio': 0.9, 'alpha': 0.5}, 'pruning.alpha: IHT sets the chosen weights to zero'),
    ({'prune_ratio': 0.9, 'alpha': 1.5}, 'pruning.alpha must be a number in [0, 1)'),
    ({'prune_ratio': 0.9, 'nm': [2, 4]}, 'pruning.prune_ratio (0.9) and pruning.nm ([2, 4]) are both set'),
    ({'nm': [4, 2]}, 'pruning.nm must be [N, M] with integers 1 <= N < M'),
    ({'prune_ratio': 0.9, 'ramp': 'linear'}, 'pruning.ramp_iter is 0'),
    ({'prune_ratio': 0.9, 'ramp': 'linear', 'ramp_iter': 100}, 'pruning.ramp_iter must be an integer in [0, 20]'),
    ({'prune_ratio': 0.9, 'exclude': ['head.*']}, "pruning.exclude: 'head.*' matches no conv of EDSR"),
    ({'prune_ratio': 0.9, 'plot_layers': ['body.9.conv1']}, "pruning.plot_layers: ['body.9.conv1'] are not pruned"),
    ({'prune_ratio': 0.9, 'prune_every': 2}, "unknown key(s) ['prune_every']"),
])
def test_bad_options_are_named(tmp_path, pruning, message):
    from fmpsr.pipeline import check_options
    opt = parsed_options(tmp_path, pruning)
    with pytest.raises(ValueError) as error:
        check_options(opt)
    assert message in str(error.value)


# ---------------------------------------------------------------- option files


def test_the_issue_asks_for_these_files():
    names = {osp.basename(p) for p in FULL}
    assert names == {'iss_p_edsr_l_x4.yml', 'iht_edsr_l_x4.yml', 'iss_r_edsr_l_x4.yml', 'iss_p_nm24_edsr_x4.yml',
                     'iss_p_lsrb_x2.yml', 'iss_p_lsrb_x3.yml', 'iss_p_lsrb_x4.yml'}
    assert {osp.basename(p) for p in TINY} == names


@pytest.mark.parametrize('path', FULL, ids=osp.basename)
def test_full_file_and_its_tiny_form(path):
    opt = load(path)
    tiny = load(osp.join(ROOT, 'options', 'tiny', 'issp', osp.basename(path)))
    for key in ('model_type', 'scale'):
        assert tiny[key] == opt[key]
    assert tiny['network_g']['type'] == opt['network_g']['type']
    assert tiny['network_g']['upscale'] == opt['network_g']['upscale'] == opt['scale']
    for key in ('method', 'prune_ratio', 'alpha', 'nm', 'ramp', 'exclude', 'skip_first_last'):
        assert tiny['pruning'].get(key) == opt['pruning'].get(key), key
    opt['is_train'] = True
    config = MODEL_REGISTRY.get(opt['model_type']).check_options(opt)
    assert config.max_prune_iter == 100000                       # the reference code's pruning stage
    assert config.nm == (2, 4) or config.prune_ratio == 0.95
    with torch.device('meta'):
        net = build_network(dict(opt['network_g']))
    params = sum(p.numel() for p in net.parameters())
    if opt['network_g']['type'] == 'EDSR':   # EDSR-L: 32 blocks, 256 channels, res_scale 0.1 (43.1 M)
        assert (opt['network_g']['num_block'], opt['network_g']['num_feat'], opt['network_g']['res_scale']) == \
            (32, 256, 0.1)
        assert params == 43_089_923
    else:                                   # ESRB-6-256 as in options/fmp_lsrb_x*.yml
        assert opt['network_g'] == load(osp.join(ROOT, 'options', f'fmp_lsrb_x{opt["scale"]}.yml'))['network_g']


def conv_output_pixels(net, size):
    """conv name -> H_out * W_out at an LR input of size x size (forward hooks, not fmpsr's tracer)."""
    pixels, hooks = {}, []
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: pixels.__setitem__(name, o.shape[-2] * o.shape[-1])))
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return pixels


def nm_violations(weight, n, m):
    """Full groups of m input channels (axis 1) without exactly n nonzeros (independent of fmpsr)."""
    w = weight.permute(0, 2, 3, 1).numpy()            # (c_out, kh, kw, c_in)
    full = w.shape[-1] // m * m
    groups = (w[..., :full] != 0).reshape(*w.shape[:-1], full // m, m).sum(-1)
    return int((groups != n).sum()), groups.size


def test_tiny_forms_cover_every_method():
    assert {load(p)['pruning']['method'] for p in TINY} == {'iss_p', 'iht', 'iss_r'}


@pytest.fixture(scope='module')
def tiny_runs(request, data_at, names, tmp_path_factory):
    """The selected tiny forms, run once for the module (conftest.run_tiny_forms)."""
    return run_tiny_forms(request, 'test_tiny_form_runs_end_to_end', data_at, names, tmp_path_factory.mktemp('tiny'))


@pytest.mark.slow
@pytest.mark.parametrize('path', TINY, ids=osp.basename)
def test_tiny_form_runs_end_to_end(path, tiny_runs, data_at, names, tmp_path):
    opt, status, log = tiny_runs[path]
    assert status == 0, f'fmpsr/train.py on {osp.basename(path)} failed:\n{log[-5000:]}'
    scale, pruning = opt['scale'], opt['pruning']
    data = data_at(scale)

    exp = osp.join(ROOT, 'experiments', opt['name'])
    export = osp.join(exp, 'export')
    weights = load_file(osp.join(export, 'net_g.safetensors'))
    masks = load_file(osp.join(export, 'weight_masks.safetensors'))
    info = load(osp.join(export, 'pruning.json'))
    assert info['method'] == 'ISSPModel' and info['switch_iter'] == pruning['max_prune_iter']
    assert info['exported_at_iter'] == -1 or info['exported_at_iter'] >= opt['train']['total_iter'] - 1
    convs = {k[:-len('.weight')]: v for k, v in weights.items() if k.endswith('.weight') and v.dim() == 4}
    assert set(masks) == set(convs)                                # every conv pruned (no exclusions)
    n_m = pruning.get('nm')
    for name, w in convs.items():
        mask = masks[name]
        assert not w[~mask].any(), f'{name}: a masked weight is not zero after fine-tuning'
        if n_m:
            if w.shape[1] % n_m[1] == 0:
                bad, groups = nm_violations(w, *n_m)
                assert groups > 0 and bad == 0, f'{name}: {bad} of {groups} groups are not {n_m[0]}:{n_m[1]}'
            else:                                                  # a partial group is kept whole
                assert name in info['sparsity']['nm_partial_convs'] and bool(mask.all())
        else:
            assert int((~mask).sum()) == math.ceil(pruning['prune_ratio'] * w.numel() - 1e-9), name
    # the reported sparsity against an independent count of the exported file
    zeros = sum(int((w == 0).sum()) for w in convs.values())
    total = sum(w.numel() for w in convs.values())
    biases = sum(weights[f'{n}.bias'].numel() for n in convs if f'{n}.bias' in weights)
    sparsity = info['sparsity']
    assert sparsity['zero_conv_weights'] == zeros and sparsity['conv_weights'] == total
    assert sparsity['weight_sparsity'] == pytest.approx(zeros / total, abs=1e-12)
    assert sparsity['dense_params'] == total + biases
    assert sparsity['nonzero_params'] == total - zeros + biases
    assert zeros == sum(int((~m).sum()) for m in masks.values())  # no kept weight happens to be zero
    assert info['ratios']['pruned_params'] == sparsity['nonzero_params']   # mask accounting agrees
    expected = 0.5 if n_m else pruning['prune_ratio']
    assert sparsity['pruned_convs_weight_sparsity'] == pytest.approx(expected, abs=0.05 if n_m else 0.01)
    net = build_network(dict(info['network_g'])).eval()
    net.load_state_dict(weights)
    pixels = conv_output_pixels(net, pruning['macs_input_size'][0])
    assert sparsity['dense_macs'] == sum(convs[n].numel() * p for n, p in pixels.items())
    assert sparsity['nonzero_macs'] == sum(int(convs[n].count_nonzero()) * p for n, p in pixels.items())
    with open(osp.join(exp, 'figures', 'issp_dynamics.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    if osp.basename(path) not in ('iss_p_lsrb_x3.yml', 'iss_p_nm24_edsr_x4.yml'):
        return   # fmpsr/test.py reads every ISSPModel export the same way: once per arch is enough (CI time)
    score_export(export, scale, data, tmp_path, names)   # fmpsr/test.py's PSNR against a recount
