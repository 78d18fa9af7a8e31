"""ASSL (fmpsr/models/assl_model.py, fmpsr/losses/assl_loss.py): weight-normalised scales as importance,
the alignment term, the constrained mask fixed at the end of the alignment period by summed |g|, the
scales merged into plain weights at finalize, option files, a real run recounted and scored."""
import glob
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

TINY = 'options/tiny/assl/assl_edsr_x2.yml'


def test_alignment_term_is_smallest_for_aligned_profiles():
    loss = build_loss({'type': 'SparsityAlignmentLoss', 'loss_weight': 1.0, 'reduction': 'mean'})
    g = torch.rand(16) + 0.1
    aligned = loss([g, 3 * g, 0.5 * g])                        # same ranking, any scale
    assert float(aligned) == pytest.approx(-1.0, abs=1e-6)
    disjoint = torch.zeros(16)
    disjoint[:8] = 1
    other = 1 - disjoint
    assert float(loss([disjoint, other])) == pytest.approx(-0.5)  # mean of [[1, 0], [0, 1]]
    a = torch.rand(16, requires_grad=True)
    b = torch.rand(16)
    loss([a, b]).backward()
    stepped = a.detach() - 0.5 * a.grad                        # one gradient step raises the alignment
    assert float(loss([stepped, b])) < float(loss([a.detach(), b]))
    assert float(loss([g])) == 0
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        build_loss({'type': 'SparsityAlignmentLoss', 'reduction': 'none'})


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
@pytest.mark.parametrize('path', sorted(glob.glob(osp.join(ROOT, 'options/assl/*.yml'))))
def test_full_file_and_its_tiny_form(path):
    full = train_opt(path)
    tiny = train_opt(osp.join(ROOT, 'options/tiny/assl', osp.basename(path)))
    same_method_keys(full, tiny)
    model = MODEL_REGISTRY.get('ASSLModel')
    assert model.check_options(full).max_prune_iter == 17_000 + 100_000
    assert model.check_options(tiny).max_prune_iter == 8 + 20
    with pytest.raises(ValueError, match="pruning.constrained: unknown value 'random'"):
        model.check_options(train_opt(path, **{'pruning.constrained': 'random'}))


@pytest.fixture(scope='module')
def assl_run(data_at, names, tmp_path_factory):
    folder = tmp_path_factory.mktemp('assl')
    data = data_at(2)
    opt = load_yaml(TINY)
    state = save_pretrained(opt['network_g'], folder / 'pretrained.pth')
    name = names('pytest_assl')
    extra = {'path.pretrain_network_g': str(folder / 'pretrained.pth'), 'logger.save_checkpoint_freq': 4}
    opt = tiny_options(TINY, name, data, folder / 'assl.yml', extra)
    # recorded by tests/hooked_run.py: the per-iteration reference of the resume test
    run(hooked(folder / 'record', 'fmpsr/train.py', '-opt', folder / 'assl.yml'))
    return {'name': name, 'opt': opt, 'state': state, 'data': data, 'extra': extra, 'record': folder / 'record'}


@pytest.mark.slow
def test_scales_choose_and_the_run_removes_them(assl_run, tmp_path, names):
    name, opt, state = assl_run['name'], assl_run['opt'], assl_run['state']
    info = pruning_info(name)
    assert info['switch_iter'] == 8 + 20 and info['method'] == 'ASSLModel'
    pruned = info['selection']['pruned_channels']

    def smallest(score, n=8):
        return sorted(torch.topk(score, n, largest=False).indices.tolist())
    # free groups: at the start g = ||w|| (weight normalisation of the pretrained filters): smallest L2 norms
    for i in range(2):
        assert sorted(pruned[f'body_{i}_conv1']) == smallest(state[f'body.{i}.conv1.weight'].flatten(1).norm(dim=1))
    # constrained group: fixed at iteration 8 by |g| summed over its 4 writers (the checkpoint of iteration 8)
    at_8 = torch.load(experiment(name, 'models', 'net_g_8.pth'), weights_only=True)
    scales = at_8['fmp_prune']['tensors']['weight_norm']
    assert bool(at_8['fmp_prune']['tensors']['constrained_fixed'])
    writers = ('conv_first', 'body.0.conv2', 'body.1.conv2', 'conv_after_body')
    summed = sum(scales[c]['g'].abs().flatten() for c in writers)
    assert sorted(pruned['conv_first']) == smallest(summed)
    # the checkpoint's plain weights are the merged g * v / ||v||
    v = scales['body.0.conv1']['v']
    merged = scales['body.0.conv1']['g'] * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(at_8['params']['body.0.conv1.weight'], merged, atol=1e-6)
    compact, _ = recount_export(name, opt['network_g'])
    assert not any('parametrizations' in k for k in compact.state_dict())   # plain convs after the merge
    assert osp.getsize(experiment(name, 'figures', 'assl_filter_norms.png')) > 1000
    run_test_py(name, 2, assl_run['data'], tmp_path, names)     # PSNR checked against a recount inside


@pytest.mark.slow
def test_resume_after_sigkill_in_the_alignment_period(assl_run, names, tmp_path):
    """Killed during the alignment period (weight-norm g and v, the unfixed constrained mask, Adam's
    state on g and v must all come back) and resumed: the same result bit for bit."""
    name = names('pytest_assl_kill')
    tiny_options(TINY, name, assl_run['data'], tmp_path / 'kill.yml', assl_run['extra'])
    # held inside the write of 8.state (the end of the alignment period): the run resumes from 4
    kill_and_resume(tmp_path / 'kill.yml', name, tmp_path, [(8, 'before', 4, 'prune')],
                    recorded_iters(assl_run['record']), 40, assl_run['name'])
    saved = torch.load(experiment(name, 'models', 'net_g_4.pth'), weights_only=True)
    assert not bool(saved['fmp_prune']['tensors']['constrained_fixed'])   # killed inside the alignment period


@pytest.mark.slow
@pytest.mark.parametrize('path', ['options/tiny/assl/assl_edsr_x4.yml'])   # x3 differs only in the scale
def test_other_tiny_forms_run_end_to_end(path, data_at, names, tmp_path):
    compact, info, _ = run_tiny(path, data_at, names, tmp_path)
    assert info['switch_iter'] == 28
    assert compact.get_submodule('conv_first').out_channels == compact.get_submodule('body.0.conv1').out_channels == 8
