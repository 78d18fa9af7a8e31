"""Frozen parameters (``requires_grad=False``) under BasicSR's EMA (``train.ema_decay`` > 0).

BasicSR's ``model_ema`` averages every parameter, ``ema = decay * ema + (1 - decay) * param``; for a
frozen parameter both are the same number, yet the float32 arithmetic moves it by an ulp now and then,
so the frozen colour-normalisation convs of a user's arch (examples/my_arch, ``MyFSRCNN``) drifted in
the EMA copy, which is what is validated, saved as ``params_ema`` and exported. fmpsr's ``model_ema``
copies frozen parameters instead: they stay bit-identical through pruning, fine-tuning and export.
"""
import os.path as osp
import sys

import torch
from conftest import build_model_in
from safetensors.torch import load_file

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from fmpsr.pruning import plain_state_dict

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'examples', 'my_arch'))
import my_fsrcnn_arch  # noqa: E402,F401  (registers MyFSRCNN, the user's arch with frozen convs)

ARCH = dict(type='MyFSRCNN', d=12, s=6, m=2, upscale=2)
L1_PRUNING = {'ratio': 0.5, 'mode': 'aligned', 'metric': 'params', 'macs_input_size': [16, 16]}
FROZEN = ('sub_mean.weight', 'sub_mean.bias', 'add_mean.weight', 'add_mean.bias')


def pretrained(path):
    """MyFSRCNN with every parameter, the frozen ones too, drawn at random (frozen values that are not
    round numbers, as a trained normalisation's are), saved as a BasicSR checkpoint."""
    torch.manual_seed(3)
    net = build_network(dict(ARCH))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand_like(p) * 0.2 - 0.1)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({'params': state}, path)
    return state


def l1norm_model(tmp_path, data, checkpoint):
    """L1-norm on MyFSRCNN from ``checkpoint`` with an EMA (decay 0.999), built in-process."""
    model = build_model_in(tmp_path, data, 'pytest_frozen_ema', model_type='L1NormModel', pruning=L1_PRUNING,
                           **{'network_g': dict(ARCH), 'train.ema_decay': 0.999,
                              'path.pretrain_network_g': str(checkpoint)})
    return model, tmp_path / 'exp'


def test_ema_leaves_frozen_parameters_bit_identical_through_pruning_finetuning_and_export(tmp_path, data):
    original = pretrained(tmp_path / 'pretrained.pth')
    model, exp = l1norm_model(tmp_path, data, tmp_path / 'pretrained.pth')
    g = torch.Generator().manual_seed(0)
    for it in range(1, 31):  # L1-norm selects at iteration 1; fine-tuning (with the EMA) follows
        model.feed_data({'lq': torch.rand(2, 3, 16, 16, generator=g), 'gt': torch.rand(2, 3, 32, 32, generator=g)})
        model.optimize_parameters(it)
    assert model.stage == 'finetune' and model.net_g_ema is not None
    net = model.get_bare_model(model.net_g)
    assert net.get_submodule('shrink.0').out_channels < ARCH['s']  # pruned
    ema, params = plain_state_dict(model.net_g_ema), plain_state_dict(net)
    trained = [k for k in params if k.endswith('mapping.0.weight')]
    assert trained and not torch.equal(ema[trained[0]], params[trained[0]])  # the EMA does average
    for key in FROZEN:
        assert torch.equal(params[key], original[key]), key  # net_g: never trained
        assert torch.equal(ema[key], original[key]), key  # the EMA copy: old code drifted here
        assert not net.get_submodule(key.rsplit('.', 1)[0]).weight.requires_grad
    model.save(0, 30)
    checkpoint = torch.load(exp / 'models' / 'net_g_30.pth', weights_only=True)
    exported = load_file(str(exp / 'export' / 'net_g.safetensors'))
    for key in FROZEN:
        assert torch.equal(checkpoint['params_ema'][key], original[key]), key
        assert torch.equal(checkpoint['params'][key], original[key]), key
        assert torch.equal(exported[key], original[key]), key
