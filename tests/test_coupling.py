"""Automatic channel coupling (torch-pruning's DependencyGraph) and plug-and-play FMP on BasicSR's
EDSR, MSRResNet and RCAN and fmpsr's RLFN and LSRB (FMP Sec. 4.6).

For each network the automatic groups are checked against what its structure implies; then a few
FMP iterations prune channels and weights of its hypernetwork, which is finalized; in float64 the
compact network (the same arch class with narrower convs) must compute the hypernetwork's output to
1e-12, and its conv widths must equal the kept channels counted from the masks.
"""
import re

import pytest
import torch
from torch import nn

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from fmpsr.archs.rlfn_arch import RLFN
from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, finalize, load_compact, save_compact, trace_conv_specs
from fmpsr.pruning.coupling import auto_grouping
from fmpsr.pruning.criteria import ConvergenceCriterion
from fmpsr.pruning.grouping import GROUPINGS, build_grouping

F64 = torch.float64


def example(size=20):
    return torch.zeros(1, 3, size, size)


def group_of(grouping, conv, role):
    """The single group a conv side belongs to (its name), or the side's segments."""
    return grouping.convs[conv][0 if role == 'in' else 1]


# ---- structure of the automatic groups ----
def test_lsrb_auto_groups_equal_the_hand_groups_once_the_stream_is_tied():
    opt = dict(type='LSRB', num_feat=16, num_block=3, upscale=2)
    net = build_network(dict(opt))
    hand = GROUPINGS['LSRB'](net, opt)
    ties = [['conv_first', 'body.*.conv1x1']]
    assert auto_grouping(net, example(), ties).partition() == hand.partition()
    chosen = build_grouping(net, opt, 'auto', example(), ties)
    assert chosen.groups == hand.groups and chosen.convs == hand.convs and chosen.compact_options is not None


def test_lsrb_auto_groups_without_ties_split_the_stream_per_block():
    """A block's output is conv1x1(r) * ESA mask: it never meets the block input at an add, so the
    dependency graph gives one stream vector per block boundary (REFERENCE.md shares one)."""
    opt = dict(type='LSRB', num_feat=16, num_block=3, upscale=2)
    grouping = auto_grouping(build_network(dict(opt)), example())
    writers = {}
    for name, (_, out) in grouping.convs.items():
        writers.setdefault(out, set()).add(name)
    assert {'conv_first', 'body.0.conv2', 'conv_after_body'} in writers.values()
    for i in range(3):
        expected = {f'body.{i}.conv1x1', f'body.{i}.esa.conv4'} | ({f'body.{i + 1}.conv2'} if i < 2 else set())
        assert expected in writers.values()
        assert {f'body.{i}.esa.conv_f', f'body.{i}.esa.conv3'} in writers.values()
    assert sum(len(w) > 1 for w in writers.values()) == 1 + 3 + 3


def test_edsr_stream_and_pixel_shuffle_upsampler():
    opt = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=4)
    net = build_network(dict(opt))
    g = auto_grouping(net, example())
    stream = group_of(g, 'conv_first', 'out')
    for name in ('body.0.conv2', 'body.1.conv2', 'conv_after_body'):
        assert group_of(g, name, 'out') == stream
    for name in ('body.0.conv1', 'body.1.conv1', 'conv_after_body', 'upsample.0'):
        assert group_of(g, name, 'in') == stream
    assert group_of(g, 'body.0.conv1', 'out') != group_of(g, 'body.1.conv1', 'out') != stream
    # PixelShuffle(2): conv output channel c*4 + k is feature channel c of the next conv's input
    for conv, reader in (('upsample.0', 'upsample.2'), ('upsample.2', 'conv_last')):
        (group, positions), = g.convs[conv][1]
        assert positions == tuple(c // 4 for c in range(32))
        assert group_of(g, reader, 'in') == group and g.groups[group].size == 8 and g.groups[group].prunable
    assert not g.groups[group_of(g, 'conv_first', 'in')].prunable
    assert not g.groups[group_of(g, 'conv_last', 'out')].prunable


@pytest.mark.slow
def test_msrresnet_x3_pixel_shuffle_ties_nine_outputs():
    opt = dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=3)
    g = auto_grouping(build_network(dict(opt)), example())
    (group, positions), = g.convs['upconv1'][1]
    assert positions == tuple(c // 9 for c in range(72))
    assert group_of(g, 'conv_hr', 'in') == group


def test_functional_pixel_shuffle_is_mapped_too():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.up, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.b(nn.functional.pixel_shuffle(self.up(self.a(x)), 2))

    g = auto_grouping(Net(), example())
    assert g.convs['up'][1] == (('up', tuple(c // 4 for c in range(32))),) and g.convs['b'][0] == 'up'


def test_rcan_channel_attention_expand_conv_joins_the_stream():
    opt = dict(type='RCAN', num_in_ch=3, num_out_ch=3, num_feat=16, num_group=2, num_block=2, squeeze_factor=4,
               upscale=2)
    g = auto_grouping(build_network(dict(opt)), example())
    stream = group_of(g, 'conv_first', 'out')
    for i in range(2):
        for j in range(2):
            p = f'body.{i}.residual_group.{j}'
            assert group_of(g, f'{p}.rcab.2', 'out') == stream            # the block's second conv
            assert group_of(g, f'{p}.rcab.3.attention.3', 'out') == stream  # CA expand conv
            squeeze = group_of(g, f'{p}.rcab.3.attention.1', 'out')         # CA squeeze conv: its own group
            assert squeeze != stream and g.groups[squeeze].size == 4
            assert group_of(g, f'{p}.rcab.3.attention.3', 'in') == squeeze
        assert group_of(g, f'body.{i}.conv', 'out') == stream


class ConcatSplitNet(nn.Module):
    """IMDN-style: split a conv's output, concatenate distilled parts, fuse with a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fuse = nn.Conv2d(2 + 4, 8, 1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        f = self.head(x)
        distilled, remaining = torch.split(torch.relu(self.c1(f)), (2, 6), dim=1)
        out = self.fuse(torch.cat([distilled, torch.relu(self.c2(remaining))], dim=1)) + f
        return self.tail(out)


def test_concatenation_and_split_map_to_slices():
    g = auto_grouping(ConcatSplitNet(), example())
    c1, c2 = group_of(g, 'c1', 'out'), group_of(g, 'c2', 'out')
    assert g.convs['c2'][0] == ((c1, (2, 3, 4, 5, 6, 7)),)        # the split's second part
    assert g.convs['fuse'][0] == ((c1, (0, 1)), (c2, (0, 1, 2, 3)))  # concat: each input's slice
    assert group_of(g, 'fuse', 'out') == group_of(g, 'head', 'out')  # meets f at the add


def test_imdn_splits_concatenations_and_attention():
    g = auto_grouping(build_network(dict(type='IMDN', num_feat=16, num_block=2, upscale=2)), example())
    stream = group_of(g, 'fea_conv', 'out')
    for b in ('IMDB1', 'IMDB2'):
        c1, c2, c3, c4 = (group_of(g, f'{b}.{c}', 'out') for c in ('c1', 'c2', 'c3', 'c4'))
        assert group_of(g, f'{b}.c5', 'out') == stream                        # meets the block input at the add
        assert g.convs[f'{b}.c2'][0] == ((c1, tuple(range(4, 16))),)         # remaining 12 of 16
        distilled = ((c1, (0, 1, 2, 3)), (c2, (0, 1, 2, 3)), (c3, (0, 1, 2, 3)), (c4, (0, 1, 2, 3)))
        assert g.convs[f'{b}.cca.conv_du.0'][0] == distilled                  # the concatenation
        assert g.convs[f'{b}.cca.conv_du.2'][1] == distilled                  # CCA's gate multiplies it
        assert g.convs[f'{b}.c5'][0] == distilled
    assert g.convs['c'][0] == ((stream, tuple(range(16)) * 2),)  # cat of the two block outputs (both on the stream)


def test_imdn_params_match_the_fmp_supplement():
    """FMP supplement Tab. 2 lists IMDN at 694 K / 703 K / 715 K params for x2 / x3 / x4."""
    counts = [sum(p.numel() for p in build_network(dict(type='IMDN', upscale=s)).parameters()) for s in (2, 3, 4)]
    assert [round(c / 1000) for c in counts] == [694, 703, 715]


# ---- prune, finalize, compare ----
def prune_with_fmp(hyper, specs, x, steps=4):
    """A few real FMP iterations (FMP Eqs. 4, 9-10) with strong regularisers, then a mask update:
    the pruner, not the test, decides which channels and weights go."""
    config = FMPConfig(metric='params', criterion='weight', gamma_c=0.0, gamma_w=0.3, lambda_c=60.0, lambda_w=1.0,
                       weight_threshold=0.97, min_channels=2, check_freq=1)
    pruner = FMPPruner(hyper, specs, config)
    lr = 1e-2
    optimizer = torch.optim.Adam(hyper.parameters(), lr=lr)
    target = torch.nn.functional.interpolate(x, size=hyper(x).shape[-2:], mode='bicubic')
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (hyper(x) - target).abs().mean() + pruner.regularization()
        loss.backward()
        optimizer.step()
        pruner.proximal_step(lr)
    pruner.check()
    assert any(v.kept() < v.size for v in hyper.prunable_vectors())          # channels were pruned
    assert any(not bool(c.weight_mask.all()) for _, c in hyper.hyper_convs())  # and single weights


def kept_width(grouping, hyper, side):
    """Kept channels of a conv side, counted from the group masks and the side's positions."""
    total = 0
    for group, positions in grouping.segments(side):
        mask = hyper.channel_vectors[group].mask.tolist()
        total += sum(mask) if positions is None else sum(mask[p] for p in positions)
    return total


NETWORKS = {
    'EDSR-8-128-x4': dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=128, num_block=8, upscale=4, res_scale=1),
    'MSRResNet-x4': dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=3, upscale=4),
    'MSRResNet-x3': dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=3),
    'RCAN-x2': dict(type='RCAN', num_in_ch=3, num_out_ch=3, num_feat=16, num_group=2, num_block=2, squeeze_factor=4,
                    upscale=2),
    'RLFN-x4': dict(type='RLFN', num_feat=16, num_block=3, upscale=4),
    'LSRB-x3-auto': dict(type='LSRB', num_feat=16, num_block=2, upscale=3, esa_channels=8),
    'IMDN-x4': dict(type='IMDN', num_feat=16, num_block=2, upscale=4),
}


@pytest.mark.parametrize('key', [pytest.param(k, marks=pytest.mark.slow) if k == 'EDSR-8-128-x4' else k for k in NETWORKS])
def test_finalized_compact_network_equals_the_hypernetwork(key, tmp_path):
    opt = NETWORKS[key]
    torch.manual_seed(0)
    net = build_network(dict(opt)).to(F64)
    arch = type(net)
    dense_params = sum(p.numel() for p in net.parameters())
    grouping = build_grouping(net, opt, 'auto', example(20).to(F64))
    specs = trace_conv_specs(net, (20, 20))
    hyper = HyperNetwork(net, grouping, embed_dim=4).to(F64)
    x = torch.rand(2, 3, 20, 20, dtype=F64)
    prune_with_fmp(hyper, specs, x)
    with torch.no_grad():
        expected = hyper(x)
        compact, compact_opt, masks = finalize(hyper, build_network, opt)
        got = compact(x)
    assert type(compact) is arch                                   # the same arch class, narrower convs
    assert compact_opt['type'] == ('LSRB' if grouping.compact_options else 'CompactArch')
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-12
    for name, conv in compact.named_modules():
        if isinstance(conv, nn.Conv2d):
            side_in, side_out = grouping.convs[name]
            assert (conv.in_channels, conv.out_channels) == (kept_width(grouping, hyper, side_in),
                                                             kept_width(grouping, hyper, side_out))
            assert torch.equal(conv.weight == 0, ~masks[name] | (conv.weight == 0))  # masked weights are zero
    assert sum(p.numel() for p in compact.parameters()) < dense_params
    # export and rebuild from safetensors + the width description, no pickled modules
    save_compact(str(tmp_path), compact, compact_opt, masks)
    rebuilt, rebuilt_opt, _ = load_compact(str(tmp_path))
    assert rebuilt_opt == compact_opt and type(rebuilt) is arch
    saved = rebuilt.state_dict()
    assert saved.keys() == compact.state_dict().keys()
    for key, value in compact.state_dict().items():  # the file holds what was saved (loaded as float32)
        assert torch.equal(saved[key].to(F64), value.to(saved[key].dtype).to(F64)), key


def test_edsr_8_128_x4_has_3696_6k_params():
    """FMP Tables 4-6 backbone with BasicSR's EDSR (two-stage x4 upsampler), counted in closed form."""
    c, n = 128, 8
    head = 3 * c * 9 + c
    body = n * 2 * (c * c * 9 + c) + (c * c * 9 + c)
    upsampler = 2 * (c * 4 * c * 9 + 4 * c)
    tail = c * 3 * 9 + 3
    net = build_network(dict(NETWORKS['EDSR-8-128-x4']))
    assert head + body + upsampler + tail == sum(p.numel() for p in net.parameters()) == 3_696_643


def test_rlfn_params_closed_form():
    """RLFN-52 x4, 6 blocks (the authors' default): 543,740 params (their paper: 0.543 M)."""
    c, f = 52, 16
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    esa = conv(c, f, 1) + conv(f, f, 1) + conv(f, f, 3) + conv(f, f, 3) + conv(f, c, 1)
    block = 3 * conv(c, c, 3) + conv(c, c, 1) + esa
    total = conv(3, c, 3) + 6 * block + conv(c, c, 3) + conv(c, 3 * 16, 3)
    assert sum(p.numel() for p in RLFN().parameters()) == total == 543_740


# ---- bad input ----
def test_unsupported_and_bad_ties_are_named():
    class Unshuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(16, 3, 3, padding=1)

        def forward(self, x):
            return self.b(nn.functional.pixel_unshuffle(self.a(x), 2))

    with pytest.raises(ValueError, match='PixelUnshuffle'):
        auto_grouping(Unshuffle(), example())
    net = build_network(dict(type='LSRB', num_feat=16, num_block=2, upscale=2, esa_channels=8))
    with pytest.raises(ValueError, match=re.escape("'body.*.nope'")):
        auto_grouping(net, example(), [['conv_first', 'body.*.nope']])
    with pytest.raises(ValueError, match='different output widths'):
        auto_grouping(net, example(), [['conv_first', 'body.0.esa.conv1']])
    grouped = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="'1' has groups=2"):
        auto_grouping(grouped, example())
    with pytest.raises(ValueError, match="not a conv of EDSR"):
        ARCH_REGISTRY.get('CompactArch')(dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1),
                                        {'body.0': [8, 8]})


def test_dhp_keep_ratio_criterion():
    rule = ConvergenceCriterion('flops', 'keep_ratio', 0.5, 0.2, keep_ratio=0.4)
    assert not rule.status(0.57, 0.0).converged      # kept 0.43 > 0.4 + 0.02
    assert rule.status(0.585, 0.0).converged         # kept 0.415 <= 0.42
    assert rule.weight_budget(0.5, 0.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match='keep_ratio'):
        ConvergenceCriterion('flops', 'keep_ratio', 0.5, 0.2, keep_ratio=None)
