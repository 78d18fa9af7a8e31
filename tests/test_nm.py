"""N:M sparsity (fmpsr.pruning.nm): the mask rule against an independent sort, its use by ISS-P (the
shrunk set of one step) and by FMP's weight indicators (an exported FMP network has exactly N nonzeros
in every full group of M input channels of every conv)."""
import os.path as osp
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, run, write_options
from safetensors.torch import load_file
from test_issp import in_process, nm_violations, step_capturing

import fmpsr  # noqa: F401
from fmpsr.pruning import FMPConfig
from fmpsr.pruning.nm import NMShapeError, count_nm_violations, nm_mask


def expected_nm(scores, n, m):
    """Keep mask of the n largest of every m along axis 1, by numpy (ties: earlier index kept)."""
    s = scores.permute(0, 2, 3, 1).numpy()                  # (c_out, kh, kw, c_in)
    full = s.shape[-1] // m * m
    keep = np.ones_like(s, dtype=bool)
    groups = s[..., :full].reshape(*s.shape[:-1], full // m, m)
    order = np.argsort(-groups, axis=-1, kind='stable')
    chosen = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(chosen, order[..., :n], True, axis=-1)
    keep[..., :full] = chosen.reshape(*s.shape[:-1], full)
    return torch.from_numpy(keep).permute(0, 3, 1, 2)


@pytest.mark.parametrize('n, m', [(2, 4), (1, 4), (2, 32), (9, 10)])
def test_nm_mask_keeps_the_n_largest_of_every_m(n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    scores = torch.rand(5, 2 * m, 3, 3, generator=g)
    keep = nm_mask(scores, n, m)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert torch.equal(keep, expected_nm(scores, n, m))
    assert torch.equal(keep.view(5, 2, m, 3, 3).sum(2), torch.full((5, 2, 3, 3), n))
    assert count_nm_violations(scores * keep, n, m) == 0 and count_nm_violations(scores, n, m) == 5 * 2 * 9


def test_nm_mask_ties_and_other_axes():
    keep = nm_mask(torch.ones(1, 8, 1, 1), 2, 4)             # ties: the first two of each group
    assert keep.flatten().tolist() == [True, True, False, False] * 2
    scores = torch.rand(8, 3)
    assert torch.equal(nm_mask(scores, 2, 4, axis=0), nm_mask(scores.t(), 2, 4, axis=1).t())


def test_partial_groups_are_refused_or_kept_whole():
    scores = torch.rand(4, 10, 3, 3)
    with pytest.raises(NMShapeError, match='axis 1 has 10 entries, not a multiple of 4'):
        nm_mask(scores, 2, 4)
    keep = nm_mask(scores, 2, 4, partial='keep')
    assert keep[:, 8:].all()
    assert torch.equal(keep[:, :8], nm_mask(scores[:, :8], 2, 4))
    with pytest.raises(ValueError, match=r'nm must be \[N, M\] with integers 1 <= N < M'):
        nm_mask(scores, 4, 4)


@pytest.mark.parametrize('method', ['iss_p', 'iht'])
def test_one_nm_step_shrinks_the_m_minus_n_smallest_of_every_group(tmp_path, method):
    pruning = {'method': method, 'nm': [2, 4]} if method == 'iht' else {'method': method, 'nm': [2, 4], 'alpha': 0.5}
    model = in_process(tmp_path, pruning)
    before = step_capturing(model, 1)
    alpha = 0.0 if method == 'iht' else 0.5
    for name, w in before.items():
        after = model.net_g.get_submodule(name).weight.detach()
        if w.shape[1] % 4:                                    # conv_first: 3 input channels, kept whole
            assert name == 'conv_first' and torch.equal(after, w)
            continue
        keep = expected_nm(w.abs(), 2, 4)
        expected = torch.where(keep, w, w * torch.tensor(alpha))
        assert torch.equal(after, expected), name
        assert torch.equal(model.weight_masks[name].cpu(), keep)


def test_fmp_nm_options_are_checked():
    assert FMPConfig.from_options({'nm': [2, 4], 'criterion': 'channel'}).nm == (2, 4)
    assert FMPConfig.from_options({}).nm == ()
    with pytest.raises(ValueError, match=r"pruning.nm cannot be used with criterion 'total_fixed'"):
        FMPConfig.from_options({'nm': [2, 4], 'criterion': 'total_fixed'})
    with pytest.raises(ValueError, match=r'pruning.nm needs weight indicators'):
        FMPConfig.from_options({'nm': [2, 4], 'weight_indicators': False, 'criterion': 'channel'})
    with pytest.raises(ValueError, match=r'pruning.nm must be \[N, M\]'):
        FMPConfig.from_options({'nm': [2, 4, 8]})


@pytest.mark.slow
def test_fmp_with_nm_exports_n_of_every_m(data, names, tmp_path):
    """FMP on a tiny LSRB with nm [2, 4]: channels are pruned, and every exported conv has exactly two
    nonzeros in every full group of 4 (kept) input channels; a last partial group keeps all."""
    name = names('pytest_fmp_nm')
    extra = {'pruning.nm': [2, 4], 'pruning.criterion': 'channel', 'pruning.gamma_c': 0.25, 'pruning.gamma_w': 0.0,
             'pruning.lambda_c': 8.0, 'pruning.max_prune_iter': 25, 'train.total_iter': 35}
    write_options(tmp_path / 'nm.yml', name, data, extra=extra)
    run([sys.executable, 'fmpsr/train.py', '-opt', str(tmp_path / 'nm.yml')])
    export = osp.join(ROOT, 'experiments', name, 'export')
    weights = load_file(osp.join(export, 'net_g.safetensors'))
    masks = load_file(osp.join(export, 'weight_masks.safetensors'))
    with open(osp.join(export, 'pruning.json')) as f:
        info = yaml.safe_load(f)
    assert info['pruning']['nm'] == [2, 4]
    assert info['ratios']['params_channel_ratio'] > 0          # channels were pruned: groups over kept inputs
    convs = {k[:-len('.weight')]: w for k, w in weights.items() if k.endswith('.weight') and w.dim() == 4}
    checked = 0
    for conv, w in convs.items():
        bad, groups = nm_violations(w, 2, 4)
        assert bad == 0, f'{conv}: {bad} of {groups} groups of 4 do not have exactly 2 nonzeros'
        checked += groups
        rest = w.shape[1] % 4
        if rest:                                             # the partial group: nothing pruned
            assert masks[conv][:, -rest:].all(), conv
    assert checked > 0
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert info['ratios']['pruned_params'] == sum(p.numel() for k, p in weights.items()
                                                  if k.rsplit('.', 1)[0] in convs) - pruned
