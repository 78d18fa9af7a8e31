"""Frozen parameters and transposed convs in the shared pruning core, and a user's own arch pruned end
to end (examples/my_arch).

* A conv whose parameters have ``requires_grad=False`` (a fixed colour-normalisation 1x1 conv) is left
  exactly as it is: the arch is not refused, the conv is a plain conv of the grouping, its channels and
  everything coupled to them are fixed, its weights are bit-identical after finalize and export, and no
  weight mask may zero it; FMP's hypernetwork keeps it a plain conv.
* ``nn.ConvTranspose2d`` (an FSRCNN-style upsampler, weight ``(c_in, c_out, kh, kw)``) prunes its input
  channels with the conv writing them; its params and MACs (``c_in * c_out * kh * kw * H_in * W_in``)
  are counted as torch's ``FlopCounterMode`` counts them (halved).

The structured methods that go through the shared core (L1-norm, SRP, ASSL) choose group masks from
per-filter scores (:mod:`fmpsr.pruning.selection`) and finalize with
:func:`~fmpsr.pruning.finalize.finalize_plain`; each is checked in float64: the compact network computes
what the dense network with its pruned channels zeroed computes.
"""
import copy
import os.path as osp
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from fmpsr.pruning import (apply_weight_masks, auto_grouping, build_grouping, count, finalize_plain, load_compact,
                           mask_ratios, save_compact, trace_conv_specs)
from fmpsr.pruning.coupling import check_prunable
from fmpsr.pruning.finalize import conv_channel_masks
from fmpsr.pruning.lth import prunable_convs
from fmpsr.pruning.selection import (filter_l1_norms, group_scores, pruned_rows, select_channels, smallest_mask,
                                     prune_count, classify_groups)
from fmpsr.pruning.unstructured import IterativeShrinkage, select_layers

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'examples', 'my_arch'))
import my_fsrcnn_arch  # noqa: E402  (registers MyFSRCNN, the user's arch)

F64 = torch.float64


def frozen(conv):
    return conv.requires_grad_(False)


class FrozenMidNet(nn.Module):
    """A frozen 1x1 conv on the image and one in the middle of the stream: ``y = f(relu(a(x)))`` meets
    ``relu(b(y))`` at an add, so a's outputs, b's outputs and b's inputs are coupled to the frozen conv;
    c's outputs are free; the output conv is frozen too."""

    def __init__(self, c=8):
        super().__init__()
        self.norm = frozen(nn.Conv2d(3, 3, 1))
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.f = frozen(nn.Conv2d(c, c, 1))
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.c = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.PReLU(c)
        self.last = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        y = self.f(torch.relu(self.a(self.norm(x))))
        z = torch.relu(self.b(y)) + y
        return self.last(self.act(self.c(z)))


class DeconvSeq(nn.Sequential):
    """conv -> ReLU -> stride-2 transposed conv -> ReLU -> conv: the transposed conv reads and writes
    feature channels."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1))


for _arch in (FrozenMidNet, DeconvSeq):  # test archs, registered as a user's module would
    if _arch.__name__ not in ARCH_REGISTRY:
        ARCH_REGISTRY.register(_arch)


def example(size=12):
    return torch.zeros(1, 3, size, size)


def side_prunable(grouping, side):
    return any(grouping.groups[g].prunable for g, _ in grouping.segments(side))


# ---- frozen parameters: coupling ----
def test_frozen_conv_on_the_image_is_traced_not_misdiagnosed_as_re_parameterised():
    """Old code: a frozen conv on the image records no autograd graph, so torch-pruning never saw it
    and the arch was refused as 'never called as a module ... re-parameterised'."""
    net = FrozenMidNet()
    grouping = auto_grouping(net, example())
    assert 'norm' in grouping.plain_convs and 'norm' not in grouping.convs
    assert all(not p.requires_grad for p in net.norm.parameters())  # the trace thawed them only for itself
    assert all(p.requires_grad for p in net.a.parameters())


def test_frozen_conv_in_the_stream_fixes_every_channel_coupled_to_it():
    net = FrozenMidNet()
    g = auto_grouping(net, example())
    assert 'f' in g.plain_convs and 'f' not in g.convs  # old code: pruned like any conv
    assert not side_prunable(g, g.convs['a'][1])  # a writes f's input
    assert not side_prunable(g, g.convs['b'][0]) and not side_prunable(g, g.convs['b'][1])  # meets f's output
    assert side_prunable(g, g.convs['c'][1]) and g.convs['last'][0] == g.convs['c'][1]
    assert g.channel_params == {'act.weight': g.convs['c'][1]}


class FrozenScaleNet(nn.Module):
    """A frozen per-channel scale (a bare ``(1, C, 1, 1)`` parameter) and a frozen PReLU between convs:
    ``c(relu(d(prelu(b(a(x) * scale)))))``."""

    def __init__(self, c=6):
        super().__init__()
        self.a, self.b, self.d = (nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1),
                                  nn.Conv2d(c, c, 3, padding=1))
        self.c = nn.Conv2d(c, 3, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5, requires_grad=False)
        self.act = nn.PReLU(c).requires_grad_(False)

    def forward(self, x):
        return self.c(torch.relu(self.d(self.act(self.b(self.a(x) * self.scale)))))


def test_frozen_bare_parameter_and_prelu_fix_their_channels():
    g = auto_grouping(FrozenScaleNet(), example())
    assert not side_prunable(g, g.convs['a'][1])  # scaled by the frozen parameter
    assert not side_prunable(g, g.convs['b'][1])  # read by the frozen PReLU
    assert side_prunable(g, g.convs['d'][1])
    assert set(g.channel_params) == {'scale', 'act.weight'}
    assert all(not side_prunable(g, side) for side in g.channel_params.values())


def test_check_prunable_accepts_the_user_arch_with_frozen_and_transposed_convs():
    grouping = check_prunable(dict(type='MyFSRCNN', d=8, s=4, m=2, upscale=2), (12, 12))  # float64 check inside
    assert set(grouping.plain_convs) == {'sub_mean', 'add_mean'} and grouping.transposed == ('deconv',)
    assert grouping.convs['deconv'][0] == grouping.convs['expand.0'][1] == 'expand_0'
    assert grouping.groups['expand_0'].prunable and not grouping.groups[grouping.convs['deconv'][1]].prunable


def test_hand_grouping_falls_back_to_auto_when_a_conv_is_frozen():
    opt = dict(type='LSRB', num_feat=8, num_block=1, upscale=2, esa_channels=4)
    net = build_network(dict(opt))
    frozen(net.conv_first)
    grouping = build_grouping(net, opt, None, example(16))  # old code: the hand grouping pruned conv_first
    assert 'conv_first' in grouping.plain_convs
    assert not side_prunable(grouping, grouping.convs['conv_after_body'][1])  # the stream meets conv_first
    with pytest.raises(ValueError, match=r"hand.*\['conv_first'\].*frozen"):
        build_grouping(net, opt, 'hand', example(16))


# ---- the structured methods through the shared core ----
def l1_masks(net, grouping, ratio=0.5):
    return select_channels(grouping, ratio, filter_l1_norms(net, grouping.convs), 'score')


def srp_masks(net, grouping, ratio=0.5):
    """SRP selects as L1-norm (by filter norm), then penalises the rows :func:`pruned_rows` gives."""
    masks = select_channels(grouping, ratio, filter_l1_norms(net, grouping.convs), 'score')
    rows = pruned_rows(grouping, masks)
    assert rows and not set(rows) & set(grouping.plain_convs)  # the frozen convs are never penalised
    return masks


def assl_masks(net, grouping, ratio=0.5):
    """ASSL ranks each group by the sum of its writers' learned scales (random here)."""
    gen = torch.Generator().manual_seed(3)
    scales = {name: torch.rand(net.get_submodule(name).out_channels, generator=gen) for name in grouping.convs}
    constrained, free = classify_groups(grouping)
    scores = group_scores(grouping, scales, constrained + free)
    masks = {g: torch.ones(group.size, dtype=torch.bool) for g, group in grouping.groups.items()}
    for name, score in scores.items():
        masks[name] = smallest_mask(score, prune_count(len(score), ratio))
    return masks


def randomized(net, seed=0):
    net = copy.deepcopy(net).to(F64).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.3)
    return net


def masked_copy(net, grouping, masks):
    """The dense network with its pruned channels zeroed (what the compact network must compute)."""
    masked = copy.deepcopy(net)
    full = {g: torch.ones(group.size, dtype=torch.bool) for g, group in grouping.groups.items()}
    full.update(masks)
    with torch.no_grad():
        for name, (m_in, m_out) in conv_channel_masks(grouping, full).items():
            conv = masked.get_submodule(name)
            rows, cols = (m_in, m_out) if isinstance(conv, nn.ConvTranspose2d) else (m_out, m_in)  # weight layout
            conv.weight.mul_((rows[:, None] & cols[None, :]).to(F64)[..., None, None])
            if conv.bias is not None:
                conv.bias.mul_(m_out.to(F64))
    return masked


def conv_params(net):
    return sum(p.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
               for p in m.parameters(recurse=False))


def flop_macs(net, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize('method', [l1_masks, srp_masks, assl_masks], ids=['l1norm', 'srp', 'assl'])
@pytest.mark.parametrize('arch', ['frozen_mid', 'my_fsrcnn'])
def test_structured_methods_prune_around_frozen_and_transposed_convs(method, arch):
    if arch == 'frozen_mid':
        opt, frozen_names = {'type': 'FrozenMidNet'}, ('norm', 'f')
    else:
        opt, frozen_names = dict(type='MyFSRCNN', d=8, s=4, m=2, upscale=2), ('sub_mean', 'add_mean')
    net = randomized(build_network(dict(opt)))
    grouping = auto_grouping(net, example().to(F64))
    masks = method(net, grouping)
    assert any(not m.all() for m in masks.values())
    compact = finalize_plain(net, grouping, masks, build_network, opt)[0].eval()
    x = torch.rand(1, 3, 10, 11, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = masked_copy(net, grouping, masks)(x), compact(x)
    assert expected.shape == got.shape
    assert float((expected - got).abs().max()) <= 1e-12 * float(expected.abs().max())
    for name in frozen_names:  # bit-identical and still frozen
        for key, p in net.get_submodule(name).named_parameters():
            q = getattr(compact.get_submodule(name), key)
            assert torch.equal(p, q) and not q.requires_grad
    specs = trace_conv_specs(net, (10, 11))
    ratios = mask_ratios(specs, grouping, masks)
    assert ratios.channel.params == conv_params(compact) < conv_params(net) == ratios.original.params
    assert ratios.channel.macs == flop_macs(compact, x) < flop_macs(net, x) == ratios.original.macs


def test_fmp_hypernetwork_keeps_frozen_convs_plain_and_bit_identical():
    """The hypernetwork leaves the grouping's plain convs as they are: trained with weight decay, the
    frozen convs get no gradient and are copied bit for bit by finalize."""
    from fmpsr.pruning import HyperNetwork, finalize
    net = build_network({'type': 'FrozenMidNet'})
    before = {k: v.detach().clone() for k, v in net.state_dict().items() if k.startswith(('norm.', 'f.'))}
    hyper = HyperNetwork(net, auto_grouping(net, example()))
    assert isinstance(hyper.net.f, nn.Conv2d) and isinstance(hyper.net.norm, nn.Conv2d)
    groups = hyper.parameter_groups()
    optimizer = torch.optim.Adam([{'params': groups['hyper'], 'weight_decay': 0.1}, {'params': groups['channel']}],
                                 lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        hyper(torch.rand(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()
    compact = finalize(hyper, build_network, {'type': 'FrozenMidNet'})[0]
    after = compact.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not compact.f.weight.requires_grad


# ---- frozen weights are never masked ----
def test_weight_masks_never_zero_a_frozen_weight():
    net = FrozenMidNet()
    before = net.f.weight.detach().clone()
    assert 'f' in trace_conv_specs(net, (6, 6))
    mask = torch.ones_like(net.f.weight, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError, match=r"'f'.*frozen"):
        apply_weight_masks(net, {'f': mask})
    with pytest.raises(ValueError, match=r"'f'.*frozen"):
        finalize_plain(net, None, {}, build_network, {'type': 'FrozenMidNet'}, weight_masks={'f': mask})
    apply_weight_masks(net, {'f': torch.ones_like(mask), 'a': torch.ones_like(net.a.weight, dtype=torch.bool)})
    assert torch.equal(net.f.weight, before)


def test_weight_level_methods_leave_frozen_and_transposed_convs_dense():
    net = build_network(dict(type='MyFSRCNN', d=8, s=4, m=1, upscale=2))
    specs = trace_conv_specs(net, (8, 8))
    assert specs['sub_mean'].frozen and specs['deconv'].transposed and not specs['feature.0'].frozen
    assert prunable_convs(specs, ['feature.0']) == ['shrink.0', 'mapping.0', 'expand.0']
    assert select_layers(specs) == ['feature.0', 'shrink.0', 'mapping.0', 'expand.0']
    assert select_layers(list(specs)) == list(specs)  # names alone carry no flags (as before)
    before = net.sub_mean.weight.detach().clone()
    shrink = IterativeShrinkage({n: net.get_submodule(n).weight for n in ('sub_mean', 'shrink.0')}, 'iht',
                                lambda it: 0.5, lambda it: 0.0)
    shrink.step(0)
    assert list(shrink.kept) == ['shrink.0'] and torch.equal(net.sub_mean.weight, before)
    assert int((net.get_submodule('shrink.0').weight == 0).sum()) == 16  # half of its 32 weights


# ---- transposed convs: accounting and what stays refused ----
def test_transposed_conv_params_and_macs_match_the_flop_counter():
    """Old code counted no ConvTranspose2d at all."""
    net = build_network(dict(type='MyFSRCNN', d=8, s=4, m=1, upscale=3))
    x = torch.zeros(1, 3, 7, 9)
    specs = trace_conv_specs(net, (7, 9))
    dense = count(specs)
    assert dense.params == conv_params(net)
    assert dense.macs == flop_macs(net, x)
    assert specs['deconv'].in_size == (7, 9) and specs['deconv'].out_size == (21, 27)
    assert count({'deconv': specs['deconv']}).macs == 8 * 3 * 81 * 7 * 9


def test_grouped_transposed_conv_is_refused_in_one_line_naming_it():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2),
                        nn.Conv2d(4, 3, 3, padding=1))
    with pytest.raises(ValueError, match=r"^conv '1' has groups=2[^\n]*pruning.exclude: \['1'\]$"):
        auto_grouping(net, example())
    grouping = auto_grouping(net, example(), exclude=['1'])
    assert grouping.plain_convs == ('1',) and not side_prunable(grouping, grouping.convs['0'][1])


def test_transposed_conv_in_the_middle_prunes_its_input_channels_only():
    net = randomized(DeconvSeq())
    g = auto_grouping(net, example().to(F64))
    assert g.transposed == ('2',) and g.convs['2'][0] == g.convs['0'][1] and g.groups[g.convs['0'][1]].prunable
    assert not g.groups[g.convs['2'][1]].prunable  # its output side stays (and so does conv 4's input)
    masks = l1_masks(net, g)
    kept = masks[g.convs['0'][1]]
    assert int(kept.sum()) == 3
    compact = finalize_plain(net, g, masks, build_network, {'type': 'DeconvSeq'})[0]
    deconv = compact.get_submodule('2')
    assert isinstance(deconv, nn.ConvTranspose2d) and (deconv.in_channels, deconv.out_channels) == (3, 5)
    assert torch.equal(deconv.weight, net.get_submodule('2').weight[kept])  # dim 0 are its input channels
    x = torch.rand(1, 3, 7, 6, dtype=F64)
    with torch.no_grad():
        expected, got = masked_copy(net, g, masks)(x), compact(x)
    assert float((expected - got).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_transposed_conv_refusal_for_the_hypernetwork_and_the_exclude_way_out():
    """FMP / DHP's hypernetwork generates nn.Conv2d weights only; HyperNetwork is to call
    ``grouping.refuse_transposed``. Excluded, the transposed conv is a plain layer and FMP runs."""
    from fmpsr.pruning import HyperNetwork
    opt = dict(type='MyFSRCNN', d=8, s=4, m=1, upscale=2)
    net = build_network(dict(opt))
    grouping = build_grouping(net, opt, None, example())
    with pytest.raises(ValueError, match=r"^FMP cannot prune the nn.ConvTranspose2d layer\(s\) \['deconv'\]; "
                                         r"leave them unpruned with pruning.exclude: \['deconv'\]$"):
        grouping.refuse_transposed('FMP')
    grouping = build_grouping(net, opt, None, example(), exclude=['deconv'])
    assert grouping.transposed == () and 'deconv' in grouping.plain_convs
    grouping.refuse_transposed('FMP')
    assert not grouping.groups[grouping.convs['expand.0'][1]].prunable  # the plain deconv reads them
    hyper = HyperNetwork(net, grouping)
    assert hyper(torch.rand(1, 3, 7, 5)).shape == (1, 3, 14, 10)


# ---- the worked example: a user's own arch, pruned end to end by L1-norm ----
def test_user_arch_pruned_end_to_end_by_l1norm_and_exported(tmp_path):
    opt = dict(type='MyFSRCNN', d=12, s=6, m=2, upscale=2)
    grouping = check_prunable(opt, (16, 16))  # the option-time check (float64 compact == masked inside)
    torch.manual_seed(0)
    net = build_network(dict(opt))
    grouping = build_grouping(net, opt, None, torch.zeros(1, 3, 16, 16))
    masks = select_channels(grouping, 0.5, filter_l1_norms(net, grouping.convs), 'score')
    compact, compact_opt, weight_masks = finalize_plain(net, grouping, masks, build_network, opt)
    assert compact_opt['type'] == 'CompactArch' and compact_opt['arch'] == opt
    assert compact.deconv.in_channels == 6 and compact.expand[0].out_channels == 6
    paths = save_compact(str(tmp_path / 'export'), compact, compact_opt, weight_masks)
    loaded, loaded_opt, _ = load_compact(osp.dirname(paths['weights']))
    for name in ('sub_mean', 'add_mean'):
        for key, p in net.get_submodule(name).named_parameters():
            assert torch.equal(getattr(loaded.get_submodule(name), key), p)
            assert not getattr(loaded.get_submodule(name), key).requires_grad
    net64, loaded64 = copy.deepcopy(net).to(F64).eval(), copy.deepcopy(loaded).to(F64).eval()
    x = torch.rand(1, 3, 9, 10, dtype=F64)
    with torch.no_grad():
        expected, got = masked_copy(net64, grouping, masks)(x), loaded64(x)
    assert expected.shape == (1, 3, 18, 20)
    assert float((expected - got).abs().max()) <= 1e-12 * float(expected.abs().max())
    assert count(trace_conv_specs(loaded, (9, 10))).params == conv_params(loaded) < conv_params(net)
