"""Per-channel parameters, pruning.exclude and the prunability check (issue 14).

Real-ESRGAN's SRVGGNetCompact (one PReLU slope per channel between convs) and a small BatchNorm SR
network are pruned by real FMP iterations, finalized, and in float64 the compact network must compute
the hypernetwork's output (relative 1e-10) with its PReLU / BatchNorm narrowed to the kept channels.
``pruning.exclude`` keeps the named convs plain and whole; archs fmpsr cannot couple are refused by
:func:`fmpsr.pruning.coupling.check_prunable` with the module named, and by ``fmpsr/train.py``
before any experiment folder exists.
"""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_one_line_error, write_options
from torch import nn
from torch.nn import functional as F

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from fmpsr.pruning import (FMPConfig, FMPPruner, HyperNetwork, finalize, hypernetwork_ratios, load_compact,
                           save_compact, trace_conv_specs)
from fmpsr.pruning.coupling import check_prunable
from fmpsr.pruning.grouping import build_grouping

F64 = torch.float64
SRVGG = dict(type='SRVGGNetCompact_basicsr', num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=3, upscale=2,
             act_type='prelu')


class TinyBNSR(nn.Module):
    """conv -> BN -> ReLU, two residual blocks conv-BN-ReLU-conv-BN (+ skip), conv + PixelShuffle x2;
    ``norm='in'`` uses InstanceNorm with affine weights and running statistics instead."""

    def __init__(self, num_feat=16, num_block=2, upscale=2, norm='bn'):
        super().__init__()

        def make_norm():
            return nn.BatchNorm2d(num_feat) if norm == 'bn' else nn.InstanceNorm2d(num_feat, affine=True,
                                                                                  track_running_stats=True)
        self.conv_first = nn.Conv2d(3, num_feat, 3, padding=1)
        self.bn_first = make_norm()
        self.body = nn.ModuleList(nn.Sequential(
            nn.Conv2d(num_feat, num_feat, 3, padding=1), make_norm(), nn.ReLU(),
            nn.Conv2d(num_feat, num_feat, 3, padding=1), make_norm()) for _ in range(num_block))
        self.upsample = nn.Conv2d(num_feat, 3 * upscale * upscale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, x):
        feat = torch.relu(self.bn_first(self.conv_first(x)))
        for block in self.body:
            feat = feat + block(feat)
        return self.shuffle(self.upsample(feat))


class RepConvSR(nn.Module):
    """A re-parameterised block: the forward computes its conv weight (3x3 + padded 1x1)."""

    def __init__(self, num_feat=8):
        super().__init__()
        self.head = nn.Conv2d(3, num_feat, 3, padding=1)
        self.rep3, self.rep1 = nn.Conv2d(num_feat, num_feat, 3, padding=1), nn.Conv2d(num_feat, num_feat, 1)
        self.tail = nn.Conv2d(num_feat, 3, 3, padding=1)

    def forward(self, x):
        feat = torch.relu(self.head(x))
        weight = self.rep3.weight + F.pad(self.rep1.weight, (1, 1, 1, 1))
        feat = torch.relu(F.conv2d(feat, weight, self.rep3.bias + self.rep1.bias, padding=1)) + feat
        return self.tail(feat)


class ChannelMeanSR(nn.Module):
    """Appends the mean over channels as one more channel: a zero (pruned) channel changes the mean."""

    def __init__(self, num_feat=8):
        super().__init__()
        self.head, self.tail = nn.Conv2d(3, num_feat, 3, padding=1), nn.Conv2d(num_feat + 1, 3, 3, padding=1)

    def forward(self, x):
        feat = self.head(x)
        return self.tail(torch.cat([feat, feat.mean(dim=1, keepdim=True)], dim=1))


class SpatialGateSR(nn.Module):
    """CBAM-style spatial attention: a one-channel gate broadcast over every channel."""

    def __init__(self, num_feat=8):
        super().__init__()
        self.head, self.gate = nn.Conv2d(3, num_feat, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
        self.tail = nn.Conv2d(num_feat, 3, 3, padding=1)

    def forward(self, x):
        feat = self.head(x)
        return self.tail(feat * torch.sigmoid(self.gate(feat.amax(dim=1, keepdim=True))))


class BufferShiftSR(nn.Module):
    """Subtracts a per-channel buffer between convs: the dependency graph does not see buffers."""

    def __init__(self, num_feat=8):
        super().__init__()
        self.head = nn.Conv2d(3, num_feat, 3, padding=1)
        self.mid = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.tail = nn.Conv2d(num_feat, 3, 3, padding=1)
        self.register_buffer('shift', torch.rand(1, num_feat, 1, 1))

    def forward(self, x):
        return self.tail(self.mid(self.head(x) - self.shift))


class HalfSwapSR(nn.Module):
    """Swaps the two halves of the channels (two slices concatenated in the other order): torch-pruning
    1.6 maps them as if in order, so only the numerical check sees that the coupling is wrong."""

    def __init__(self, num_feat=8):
        super().__init__()
        self.head = nn.Conv2d(3, num_feat, 3, padding=1)
        self.mid = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.tail = nn.Conv2d(num_feat, 3, 3, padding=1)

    def forward(self, x):
        feat = self.head(x)
        half = feat.shape[1] // 2
        return self.tail(self.mid(torch.cat([feat[:, half:], feat[:, :half]], dim=1)))


class ScaleParamSR(nn.Module):
    """A bare per-channel parameter (1, C, 1, 1) between convs, as LayerScale-style blocks have."""

    def __init__(self, num_feat=16):
        super().__init__()
        self.head = nn.Conv2d(3, num_feat, 3, padding=1)
        self.mid = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.tail = nn.Conv2d(num_feat, 3 * 4, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, num_feat, 1, 1) + 0.5)

    def forward(self, x):
        return F.pixel_shuffle(self.tail(self.mid(torch.relu(self.head(x)) * self.scale)), 2)


class DepthwiseSR(nn.Module):
    def __init__(self, num_feat=8):
        super().__init__()
        self.head = nn.Conv2d(3, num_feat, 3, padding=1)
        self.mid = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.dw = nn.Conv2d(num_feat, num_feat, 3, padding=1, groups=num_feat)
        self.tail = nn.Conv2d(num_feat, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(self.dw(torch.relu(self.mid(torch.relu(self.head(x))))))


for _cls in (TinyBNSR, RepConvSR, ChannelMeanSR, SpatialGateSR, BufferShiftSR, HalfSwapSR, ScaleParamSR,
             DepthwiseSR):
    if _cls.__name__ not in ARCH_REGISTRY:
        ARCH_REGISTRY.register(_cls)


def prune_with_fmp(hyper, specs, x, steps=4):
    """A few real FMP iterations with strong regularisers, then a mask update (the pruner decides)."""
    config = FMPConfig(metric='params', criterion='weight', gamma_c=0.0, gamma_w=0.3, lambda_c=60.0, lambda_w=1.0,
                       weight_threshold=0.97, min_channels=2, check_freq=1)
    pruner = FMPPruner(hyper, specs, config)
    lr = 1e-2
    optimizer = torch.optim.Adam(hyper.parameters(), lr=lr)
    target = F.interpolate(x, size=hyper(x).shape[-2:], mode='bicubic')
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (hyper(x) - target).abs().mean() + pruner.regularization()
        loss.backward()
        optimizer.step()
        pruner.proximal_step(lr)
    pruner.check()
    assert any(v.kept() < v.size for v in hyper.prunable_vectors())  # channels were pruned
    return pruner


def pruned_pair(opt, exclude=(), size=16):
    torch.manual_seed(0)
    net = build_network(dict(opt)).to(F64)
    grouping = build_grouping(net, opt, 'auto', torch.zeros(1, 3, size, size, dtype=F64), exclude=exclude)
    specs = trace_conv_specs(net, (size, size))
    hyper = HyperNetwork(net, grouping, embed_dim=4).to(F64)
    x = torch.rand(2, 3, size, size, dtype=F64)
    prune_with_fmp(hyper, specs, x)
    with torch.no_grad():
        compact, compact_opt, masks = finalize(hyper, build_network, opt)
    return hyper, grouping, specs, compact, compact_opt, x


def relative_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


def kept_indices(hyper, side):
    from fmpsr.pruning.finalize import side_mask
    masks = {g: v.mask for g, v in hyper.channel_vectors.items()}
    return side_mask(hyper.grouping, side, masks).nonzero().flatten()


# ---- PReLU: Real-ESRGAN's SRVGGNetCompact ----
def test_srvgg_prelu_slopes_follow_their_channels(tmp_path):
    hyper, grouping, _, compact, compact_opt, x = pruned_pair(SRVGG)
    prelus = [n for n, m in hyper.net.named_modules() if isinstance(m, nn.PReLU)]
    assert [f'{n}.weight' for n in prelus] == list(grouping.channel_params)
    for name in prelus:  # each PReLU follows the conv before it (body.2k+1 after body.2k)
        conv = f'body.{int(name.split(".")[1]) - 1}'
        assert grouping.channel_params[f'{name}.weight'] == grouping.convs[conv][1]
    narrowed = 0
    for name in prelus:
        keep = kept_indices(hyper, grouping.channel_params[f'{name}.weight'])
        dense, small = hyper.net.get_submodule(name), compact.get_submodule(name)
        assert small.num_parameters == small.weight.numel() == keep.numel()
        assert torch.equal(small.weight, dense.weight[keep])
        narrowed += keep.numel() < dense.num_parameters
    assert narrowed >= 1                                                  # FMP pruned PReLU channels
    assert compact_opt['type'] == 'CompactArch' and set(compact_opt['channel_params']) == set(grouping.channel_params)
    with torch.no_grad():
        expected, got = hyper(x), compact(x)
    assert relative_error(got, expected) < 1e-10
    save_compact(str(tmp_path), compact, compact_opt, {})                 # the export loads without pickled code
    rebuilt, rebuilt_opt, _ = load_compact(str(tmp_path))
    assert rebuilt_opt == compact_opt and rebuilt.state_dict().keys() == compact.state_dict().keys()
    with torch.no_grad():
        assert relative_error(rebuilt.to(F64)(x), expected) < 1e-5       # the file stores float32


def test_compact_arch_without_channel_params_still_loads():
    """Exports written before ``channel_params`` existed have only ``conv_channels``."""
    net = ARCH_REGISTRY.get('CompactArch')(dict(SRVGG), {'body.0': [3, 16]})
    assert net.body[1].num_parameters == 16
    with pytest.raises(ValueError, match="'body.9.weight'"):
        ARCH_REGISTRY.get('CompactArch')(dict(SRVGG), {}, {'body.9.weight': 4})
    with pytest.raises(ValueError, match=r'must be in \[1, 16\]'):
        ARCH_REGISTRY.get('CompactArch')(dict(SRVGG), {}, {'body.1.weight': 17})


def test_a_bare_per_channel_parameter_follows_its_channels():
    hyper, grouping, _, compact, compact_opt, x = pruned_pair(dict(type='ScaleParamSR'))
    assert grouping.channel_params == {'scale': grouping.convs['head'][1]}
    keep = kept_indices(hyper, grouping.channel_params['scale'])
    assert keep.numel() < 16 and compact_opt['channel_params'] == {'scale': keep.numel()}
    assert torch.equal(compact.scale, hyper.net.scale[:, keep])
    with torch.no_grad():
        assert relative_error(compact(x), hyper(x)) < 1e-10


# ---- BatchNorm ----
@pytest.mark.parametrize('norm', ['bn', 'in'])
def test_batchnorm_is_sliced_and_masked_so_compact_equals_hypernetwork(norm):
    opt = dict(type='TinyBNSR', num_feat=16, num_block=2, upscale=2, norm=norm)
    hyper, grouping, _, compact, compact_opt, x = pruned_pair(opt)
    kind = nn.BatchNorm2d if norm == 'bn' else nn.InstanceNorm2d
    bns = [n for n, m in hyper.net.named_modules() if isinstance(m, kind)]
    assert len(bns) == 5
    assert set(grouping.masked_output_modules(hyper.net)) == set(bns)
    for name in bns:
        keys = [f'{name}.{t}' for t in ('weight', 'bias', 'running_mean', 'running_var')]
        assert all(k in grouping.channel_params for k in keys)
        keep = kept_indices(hyper, grouping.channel_params[keys[0]])
        small, dense = compact.get_submodule(name), hyper.net.get_submodule(name)
        assert small.num_features == keep.numel() < dense.num_features or not hyper.channel_vectors[
            grouping.channel_params[keys[0]]].prunable
        for key in keys:
            attr = key.rpartition('.')[2]
            assert torch.equal(getattr(small, attr), getattr(dense, attr)[keep])
    # pruned channels are zero after BN in the hypernetwork (BN(0) = bias - mean * weight / std is not)
    stream = grouping.channel_params['bn_first.weight']
    pruned = ~hyper.channel_vectors[stream].mask
    assert pruned.any()
    outputs = {}
    hyper.net.bn_first.register_forward_hook(lambda m, i, o: outputs.__setitem__('bn', o))
    with torch.no_grad():
        hyper.eval(), compact.eval()
        expected, got = hyper(x), compact(x)
        assert relative_error(got, expected) < 1e-10                     # running statistics
        assert outputs['bn'][:, pruned].abs().max() == 0
        hyper.train(), compact.train()
        assert relative_error(compact(x), hyper(x)) < 1e-10              # batch statistics


# ---- pruning.exclude ----
def test_excluded_convs_stay_plain_and_keep_all_their_channels():
    opt = dict(SRVGG)
    assert FMPConfig.from_options({'exclude': ['body.2']}).exclude == ('body.2',)
    hyper, grouping, specs, compact, compact_opt, x = pruned_pair(opt, exclude=['body.2'])
    assert grouping.plain_convs == ('body.2',) and 'body.2' not in grouping.convs
    assert type(hyper.net.body[2]) is nn.Conv2d                         # not a hypernetwork conv
    assert not grouping.groups[grouping.convs['body.0'][1]].prunable    # what it reads is fixed
    assert not grouping.groups[grouping.convs['body.4'][0]].prunable    # and what it writes
    assert compact.body[2].weight.shape == (16, 16, 3, 3) and 'body.2' not in compact_opt['conv_channels']
    assert torch.equal(compact.body[2].weight, hyper.net.body[2].weight)
    assert any(v.kept() < v.size for v in hyper.prunable_vectors())     # the rest was pruned
    with torch.no_grad():
        assert relative_error(compact(x), hyper(x)) < 1e-10
    ratios = hypernetwork_ratios(hyper, specs)                           # the plain conv counts as dense
    dense = build_network(dict(opt))
    assert ratios.original.params == sum(p.numel() for m in dense.modules() if isinstance(m, nn.Conv2d)
                                         for p in m.parameters())
    assert ratios.channel.params < ratios.original.params
    with pytest.raises(ValueError, match="pruning.exclude: pattern 'body.99'"):
        build_grouping(build_network(dict(opt)), opt, 'auto', torch.zeros(1, 3, 16, 16), exclude=['body.99'])
    with pytest.raises(ValueError, match='pruning.exclude must be a list'):
        FMPConfig.from_options({'exclude': 'body.2'})


def test_an_excluded_depthwise_conv_lets_the_rest_be_pruned():
    opt = dict(type='DepthwiseSR')
    with pytest.raises(ValueError, match=r"'DepthwiseSR'.*conv 'dw' has groups=8.*pruning.exclude: \['dw'\]"):
        check_prunable(opt, (16, 16))
    grouping = check_prunable(opt, (16, 16), exclude=['dw'])
    assert grouping.plain_convs == ('dw',)
    assert grouping.groups[grouping.convs['head'][1]].prunable           # head -> mid is still prunable
    assert not grouping.groups[grouping.convs['mid'][1]].prunable        # mid feeds the depthwise conv


# ---- refused archs ----
@pytest.mark.parametrize('arch, message', [
    ('RepConvSR', r"'RepConvSR'.*\['rep3', 'rep1'\] are never called as modules.*pruning.exclude"),
    ('ChannelMeanSR', r"'ChannelMeanSR'.*the op Mean reads or writes channels of \['head', 'tail'\].*pruning.exclude"),
    ('SpatialGateSR', r"'SpatialGateSR'.*'head' output channel 1 to 'gate'.*pruning.exclude: \['head'\]"),
    ('BufferShiftSR', r"'BufferShiftSR'.*compact network does not run.*the last conv that ran is 'head'"),
    ('HalfSwapSR', r"'HalfSwapSR'.*does not compute what the masked network computes.*input of conv 'mid'.*"
                   r"pruning.exclude: \['mid'\]"),
])
def test_uncouplable_archs_are_refused_with_the_module_named(arch, message):
    with pytest.raises(ValueError, match=message):
        check_prunable({'type': arch}, (16, 16))


def test_ecbsr_is_refused_and_srvgg_passes_the_check():
    ecbsr = dict(type='ECBSR', num_in_ch=3, num_out_ch=3, num_block=1, num_channel=8, with_idt=False,
                 act_type='prelu', scale=2)
    with pytest.raises(ValueError, match=r"'ECBSR'.*'backbone.0.conv3x3'.*never called as modules"):
        check_prunable(ecbsr, (16, 16))
    assert check_prunable(SRVGG, (16, 16)).channel_params


@pytest.mark.slow
def test_uncouplable_arch_stops_train_py_before_any_experiment_folder(tmp_path, data, names):
    """Needs ``check_prunable`` in ``FMPModel.check_options`` (see notes/issue14.md)."""
    name = names('pytest_uncouplable')
    yml = tmp_path / 'ecbsr.yml'
    write_options(yml, name, data, extra={'network_g': dict(
        type='ECBSR', num_in_ch=3, num_out_ch=3, num_block=1, num_channel=8, with_idt=False, act_type='prelu',
        scale=2), 'pruning.grouping': 'auto'})
    env = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, 'fmpsr/train.py', '-opt', str(yml)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    line = assert_one_line_error(result)    # status 2, one line, no traceback
    assert "network_g.type 'ECBSR' cannot be pruned" in line and 'pruning.exclude' in line
    assert not osp.exists(osp.join(ROOT, 'experiments', name))
    assert not osp.exists(osp.join(ROOT, 'tb_logger', name))
