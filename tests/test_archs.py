"""Tests of the LSRB / ESRB arch (fmpsr/archs/lsrb_arch.py), CPU only.

Sizes are counted here, independently of ``fmpsr.pruning.accounting``: params as the sum of
``p.numel()``, MACs with forward hooks on ``nn.Conv2d`` (weight numel * output pixels), with
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per MAC) and with a closed-form formula.
The wide ESRB-6-256 counts run on the ``meta`` device (shapes only, no arithmetic).
"""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fmpsr  # noqa: F401  (registers LSRB)
from basicsr.archs import build_network
from fmpsr.archs.lsrb_arch import LSRB


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def hook_macs(net, x):
    """MACs of every nn.Conv2d: weight numel (c_out * c_in/groups * kh * kw) * H_out * W_out."""
    total, handles = [0], []

    def hook(module, _inputs, output):
        total[0] += module.weight.numel() * output.shape[-2] * output.shape[-1] * output.shape[0]

    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def flop_counter_macs(net, x):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            net(x)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


def closed_form_macs(h, w, num_feat, num_block, upscale, esa=16, in_ch=3, out_ch=3):
    """Conv MACs of the dense LSRB / ESRB at an LR input of h x w, derived by hand.

    Full-resolution (h*w) convs: conv_first (3x3, in -> C), per block conv1 and conv2 (3x3, C -> C),
    conv1x1 (C -> C), ESA conv1 (C -> f), conv_f (f -> f), conv4 (f -> C), conv_after_body and the
    upsampler (3x3, C -> out*s*s). ESA conv2 is 3x3 stride 2 without padding: output
    ((h-3)//2+1) x ((w-3)//2+1); then a 7x7 / stride-3 max pool: ((h2-7)//3+1) x ((w2-7)//3+1), on
    which conv3 (3x3, pad 1, f -> f) runs.
    """
    c, f = num_feat, esa
    per_pixel = 9 * in_ch * c + 9 * c * c + 9 * c * out_ch * upscale ** 2
    per_pixel += num_block * (9 * c * c * 2 + c * c + c * f + f * f + f * c)
    h2, w2 = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    hp, wp = (h2 - 7) // 3 + 1, (w2 - 7) // 3 + 1
    return per_pixel * h * w + num_block * (9 * f * f * h2 * w2 + 9 * f * f * hp * wp)


def closed_form_params(num_feat, num_block, upscale, esa=16, in_ch=3, out_ch=3):
    c, f = num_feat, esa
    head = 9 * in_ch * c + c
    after = 9 * c * c + c
    up = 9 * c * out_ch * upscale ** 2 + out_ch * upscale ** 2
    block = 2 * (9 * c * c + c) + (c * c + c) + (c * f + f) + (f * f + f) + (9 * f * f + f) * 2 + (f * c + c)
    return head + after + up + num_block * block


# ---------------------------------------------------------------- LSRB-6-48 x4

def test_lsrb_6_48_x4_params_and_macs():
    torch.manual_seed(0)
    net = LSRB(num_feat=48, num_block=6, upscale=4, esa_channels=16).eval()
    params = num_params(net)
    assert params == 345_504
    assert params == closed_form_params(48, 6, 4)
    x = torch.randn(1, 3, 64, 64)
    macs_hooks = hook_macs(net, x)
    macs_fc = flop_counter_macs(net, x)
    assert macs_hooks == macs_fc
    assert macs_hooks == closed_form_macs(64, 64, 48, 6, 4)
    assert round(macs_hooks / 1e9, 3) == 1.309
    assert round(macs_fc / 1e9, 3) == 1.309


# ---------------------------------------------------------------- ESRB-6-256 on meta

@pytest.mark.parametrize('scale, params_k, macs_g', [(2, 8180.9, 1877.8), (3, 8215.5, 836.8), (4, 8263.9, 474.2)])
def test_esrb_6_256_params_and_macs_at_720p_output(scale, params_k, macs_g):
    with torch.device('meta'):
        net = LSRB(num_feat=256, num_block=6, upscale=scale)
    params = num_params(net)
    assert round(params / 1e3, 1) == params_k
    assert params == closed_form_params(256, 6, scale)
    h, w = 720 // scale, 1280 // scale
    x = torch.empty(1, 3, h, w, device='meta')
    macs = hook_macs(net, x)
    assert macs == closed_form_macs(h, w, 256, 6, scale)
    assert round(macs / 1e9, 1) == macs_g
    assert flop_counter_macs(net, x) == macs


def test_closed_form_matches_hooks_at_odd_sizes():
    # small widths and odd LR sizes, real (CPU) forward: the formula's pooling arithmetic is exact
    torch.manual_seed(0)
    for h, w, s in ((15, 15, 2), (17, 23, 3), (31, 16, 4)):
        net = LSRB(num_feat=6, num_block=2, upscale=s, esa_channels=5)
        x = torch.randn(1, 3, h, w)
        assert hook_macs(net, x) == closed_form_macs(h, w, 6, 2, s, esa=5)
        assert flop_counter_macs(net, x) == closed_form_macs(h, w, 6, 2, s, esa=5)


# ---------------------------------------------------------------- per-layer widths

MID = [3, 7]
ESA = [[2, 5, 4], [6, 1, 3]]


def _widths_net(seed=0):
    torch.manual_seed(seed)
    return LSRB(num_feat=10, num_block=2, upscale=3, esa_channels=16, mid_feats=MID, esa_feats=ESA)


def test_per_layer_widths_give_exact_conv_shapes():
    net = _widths_net()
    c, s2 = 10, 3 * 3 * 3
    expected = {
        'conv_first': (c, 3, 3, 3),
        'conv_after_body': (c, c, 3, 3),
        'upsampler': (s2, c, 3, 3),
    }
    for i, (mid, (f1, f2, f3)) in enumerate(zip(MID, ESA)):
        p = f'body.{i}'
        expected.update({
            f'{p}.conv1': (mid, c, 3, 3),
            f'{p}.conv2': (c, mid, 3, 3),
            f'{p}.conv1x1': (c, c, 1, 1),
            f'{p}.esa.conv1': (f1, c, 1, 1),
            f'{p}.esa.conv2': (f2, f1, 3, 3),
            f'{p}.esa.conv3': (f3, f2, 3, 3),
            f'{p}.esa.conv_f': (f3, f1, 1, 1),
            f'{p}.esa.conv4': (c, f3, 1, 1),
        })
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    assert {n: tuple(m.weight.shape) for n, m in convs.items()} == expected
    for name, m in convs.items():
        assert m.bias is not None and m.bias.shape == (expected[name][0],), name
    assert convs['body.0.esa.conv2'].stride == (2, 2) and convs['body.0.esa.conv2'].padding == (0, 0)
    assert convs['body.0.esa.conv3'].padding == (1, 1)


def test_per_layer_widths_state_dict_round_trip():
    net = _widths_net(seed=1).eval()
    fresh = _widths_net(seed=2).eval()
    x = torch.randn(2, 3, 16, 18)
    with torch.no_grad():
        assert not torch.allclose(net(x), fresh(x))
        fresh.load_state_dict(net.state_dict(), strict=True)
        assert torch.equal(net(x), fresh(x))


def test_state_dict_does_not_load_into_other_widths():
    net = _widths_net()
    other = LSRB(num_feat=10, num_block=2, upscale=3, mid_feats=[3, 6], esa_feats=ESA)
    with pytest.raises(RuntimeError):
        other.load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize('mid_feats', [[4], [4, 4, 4]])
def test_wrong_length_mid_feats_raises(mid_feats):
    with pytest.raises(ValueError, match='mid_feats'):
        LSRB(num_feat=8, num_block=2, mid_feats=mid_feats)


def test_wrong_length_esa_feats_raises():
    with pytest.raises(ValueError, match='esa_feats'):
        LSRB(num_feat=8, num_block=2, esa_feats=[[2, 2, 2]])


def test_zero_width_raises():
    with pytest.raises(ValueError):
        LSRB(num_feat=8, num_block=2, mid_feats=[4, 0])


@pytest.mark.parametrize('scale', [2, 3, 4])
@pytest.mark.parametrize('h, w', [(15, 15), (17, 24), (20, 16)])
def test_output_shape(scale, h, w):
    torch.manual_seed(0)
    net = LSRB(num_feat=8, num_block=1, upscale=scale, esa_channels=4).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 3, h, w))
    assert y.shape == (2, 3, scale * h, scale * w)
    assert torch.isfinite(y).all()


def test_forward_matches_reference_definition():
    """The forward pass equals REFERENCE.md sec. 2 written out with functional ops."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    net = _widths_net().eval()
    x = torch.randn(1, 3, 17, 19)

    def conv(name, t):
        m = net.get_submodule(name)
        return F.conv2d(t, m.weight, m.bias, m.stride, m.padding)

    with torch.no_grad():
        f = conv('conv_first', x)
        t = f
        for i in range(2):
            p = f'body.{i}'
            r = conv(f'{p}.conv2', F.relu(conv(f'{p}.conv1', t))) + t
            y = conv(f'{p}.conv1x1', r)
            c1_ = conv(f'{p}.esa.conv1', y)
            c1 = conv(f'{p}.esa.conv2', c1_)
            v = F.max_pool2d(c1, 7, 3)
            c3 = F.interpolate(conv(f'{p}.esa.conv3', v), size=y.shape[-2:], mode='bilinear', align_corners=False)
            m = torch.sigmoid(conv(f'{p}.esa.conv4', c3 + conv(f'{p}.esa.conv_f', c1_)))
            t = y * m
        out = F.pixel_shuffle(conv('upsampler', conv('conv_after_body', t) + f), 3)
        assert torch.allclose(net(x), out, atol=1e-6)


# ---------------------------------------------------------------- registry

def test_build_network_from_registry():
    net = build_network(dict(type='LSRB', num_feat=8, num_block=2, upscale=2, esa_channels=4,
                             mid_feats=[3, 5], esa_feats=[[2, 3, 4], [1, 1, 1]]))
    assert type(net).__name__ == 'LSRB'
    assert net.body[0].conv1.out_channels == 3 and net.body[1].esa.conv3.out_channels == 1
    with torch.no_grad():
        assert net(torch.randn(1, 3, 15, 16)).shape == (1, 3, 30, 32)


# ---------------------------------------------------------------- per-boundary stream widths

STREAM = [10, 4, 7]  # c_0 (head, global skip), c_1 (block 0 output), c_2 (block 1 output)


def test_stream_feats_give_exact_conv_shapes():
    net = LSRB(num_feat=10, num_block=2, upscale=3, esa_channels=16, mid_feats=MID, esa_feats=ESA, stream_feats=STREAM)
    c0, c1, c2 = STREAM
    expected = {'conv_first': (c0, 3, 3, 3), 'conv_after_body': (c0, c2, 3, 3), 'upsampler': (27, c0, 3, 3)}
    for i, (c_in, c_out, mid, (f1, f2, f3)) in enumerate(zip(STREAM, STREAM[1:], MID, ESA)):
        p = f'body.{i}'
        expected.update({
            f'{p}.conv1': (mid, c_in, 3, 3), f'{p}.conv2': (c_in, mid, 3, 3), f'{p}.conv1x1': (c_out, c_in, 1, 1),
            f'{p}.esa.conv1': (f1, c_out, 1, 1), f'{p}.esa.conv2': (f2, f1, 3, 3), f'{p}.esa.conv3': (f3, f2, 3, 3),
            f'{p}.esa.conv_f': (f3, f1, 1, 1), f'{p}.esa.conv4': (c_out, f3, 1, 1)})
    assert {n: tuple(m.weight.shape) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)} == expected
    with torch.no_grad():
        assert net(torch.randn(1, 3, 15, 17)).shape == (1, 3, 45, 51)


def test_uniform_stream_feats_is_the_default_network():
    torch.manual_seed(0)
    default = LSRB(num_feat=48, num_block=6, upscale=4)
    torch.manual_seed(0)
    explicit = LSRB(num_feat=48, num_block=6, upscale=4, stream_feats=[48] * 7)
    assert num_params(explicit) == 345_504
    a, b = default.state_dict(), explicit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('stream_feats, match', [([8, 8], 'num_block \\+ 1 = 3'), ([6, 8, 8], 'must equal num_feat'),
                                                 ([8, 0, 8], 'every width')])
def test_bad_stream_feats_raise(stream_feats, match):
    with pytest.raises(ValueError, match=match):
        LSRB(num_feat=8, num_block=2, stream_feats=stream_feats)
