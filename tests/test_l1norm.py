"""L1-norm pruning (fmpsr/models/l1norm_model.py): one shot from the pretrained weights, aligned over
coupled groups; the naive per-layer mode refused where it would break an add; option files; a real
run recounted and scored by fmpsr/test.py."""
import os.path as osp
import sys

import pytest
import torch
from baseline_helpers import load_yaml, pruning_info, recount_export, run_test_py, same_method_keys, save_pretrained, \
    tiny_options
from conftest import ROOT, run

import fmpsr  # noqa: F401
from basicsr.utils.registry import MODEL_REGISTRY

TINY = 'options/tiny/l1norm/l1norm_edsr_x4.yml'
FULL = 'options/l1norm/l1norm_edsr_x4.yml'


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


def test_full_file_and_its_tiny_form():
    full, tiny = train_opt(FULL), train_opt(TINY)
    same_method_keys(full, tiny)
    model = MODEL_REGISTRY.get('L1NormModel')
    assert model.check_options(full).max_prune_iter == 1 and model.check_options(tiny).mode == 'aligned'
    assert full['path']['pretrain_network_g']


def test_naive_mode_names_the_group_that_breaks_an_add():
    model = MODEL_REGISTRY.get('L1NormModel')
    with pytest.raises(ValueError) as error:
        model.check_options(train_opt(TINY, **{'pruning.mode': 'naive'}))
    message = str(error.value)
    assert "channel group 'conv_first' is written by 4 convs (conv_first, body.0.conv2, body.1.conv2, " \
           "conv_after_body)" in message and 'pruning.mode: aligned' in message
    # Li et al.'s recipe for residual networks: leave the layers at the adds unpruned
    model.check_options(train_opt(TINY, **{'pruning.mode': 'naive', 'pruning.skip_groups': ['conv_first']}))
    with pytest.raises(ValueError, match="pruning.mode: unknown value 'per_layer'"):
        model.check_options(train_opt(TINY, **{'pruning.mode': 'per_layer'}))
    with pytest.raises(ValueError, match='pruning.max_prune_iter must be 1'):
        model.check_options(train_opt(TINY, **{'pruning.max_prune_iter': 10}))


def test_naive_mode_stops_train_py_before_any_folder(data_at, names, tmp_path, monkeypatch, capsys):
    """What fmpsr/train.py runs before BasicSR makes the experiment folder (its option parsing, with
    fmpsr's checks), in this process under fmpsr.cli.run_cli: one line, status 2, no folder. (Bad input
    through the real script, as a subprocess: tests/test_reliability.py, tests/test_errors.py.)"""
    import basicsr.train

    from fmpsr.cli import run_cli
    name = names('pytest_l1_naive')
    tiny_options(TINY, name, data_at(4), tmp_path / 'naive.yml', {'pruning.mode': 'naive'})
    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(tmp_path / 'naive.yml')])
    monkeypatch.delenv('FMPSR_TRACEBACK', raising=False)
    from fmpsr.run_lock import lock_path, release
    try:
        with pytest.raises(SystemExit) as done, torch.random.fork_rng():
            run_cli(lambda: basicsr.train.parse_options(ROOT, is_train=True), argv=[])
    finally:
        release(lock_path(osp.join(ROOT, 'experiments', name)))  # the run lock this process took, if any
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith('fmpsr: error: ') and "channel group 'conv_first'" in err
    assert not osp.exists(osp.join(ROOT, 'experiments', name))


@pytest.mark.slow
def test_one_shot_from_the_pretrained_weights(data_at, names, tmp_path):
    data = data_at(4)
    opt = load_yaml(TINY)
    state = save_pretrained(opt['network_g'], tmp_path / 'pretrained.pth')
    name = names('pytest_l1')
    opt = tiny_options(TINY, name, data, tmp_path / 'l1.yml',
                       {'path.pretrain_network_g': str(tmp_path / 'pretrained.pth')})
    run([sys.executable, 'fmpsr/train.py', '-opt', str(tmp_path / 'l1.yml')])
    info = pruning_info(name)
    assert info['switch_iter'] == 1 and info['method'] == 'L1NormModel'
    pruned = info['selection']['pruned_channels']

    def smallest(score, n=8):
        return sorted(torch.topk(score, n, largest=False).indices.tolist())
    for i in range(2):     # free convs: their own smallest-L1 filters
        assert sorted(pruned[f'body_{i}_conv1']) == smallest(state[f'body.{i}.conv1.weight'].abs().sum((1, 2, 3)))
    # the residual stream: one index set by the L1 norm summed over the 4 convs writing it
    stream = sum(state[f'{c}.weight'].abs().sum((1, 2, 3))
                 for c in ('conv_first', 'body.0.conv2', 'body.1.conv2', 'conv_after_body'))
    assert sorted(pruned['conv_first']) == smallest(stream)
    assert set(info['selection']['kept_groups']) == {'upsample_0', 'upsample_2', 'conv_last', 'conv_first_in'}
    compact, _ = recount_export(name, opt['network_g'])
    assert compact.get_submodule('upsample.0').weight.shape == (64, 8, 3, 3)
    assert compact.get_submodule('upsample.2').weight.shape == (64, 16, 3, 3)
    run_test_py(name, 4, data, tmp_path, names)                 # PSNR checked against a recount inside
