"""LSRB block-boundary widths (issue 11, part 2).

LSRB's stream is cut into ``num_block + 1`` boundaries that no add or multiply joins (a block's output
``conv1x1(r) * ESA mask`` meets only the next block's residual add). The tests check that

* the hand-written per-boundary grouping has exactly the partition of torch-pruning's dependency
  graph (``auto_grouping``), and the boundary writer sets are the ones the forward pass implies;
* ``pruning.grouping: auto`` on LSRB is returned as that grouping, so a network pruned with
  unequal boundary widths finalizes into a plain ``LSRB`` (``stream_feats``) that computes the
  hypernetwork's output in float64 and round-trips through safetensors;
* the tied grouping (``hand``) still gives one ``stream`` group and refuses unequal widths, and
  exports without ``stream_feats`` (all earlier ones) still load.

Helpers (a few real FMP iterations, kept widths counted from the masks) come from test_coupling.
"""
import pytest
import torch
from torch import nn

import fmpsr  # noqa: F401  (registers LSRB)
from basicsr.archs import build_network
from fmpsr.archs.lsrb_arch import LSRB
from fmpsr.pruning import HyperNetwork, finalize, load_compact, save_compact, trace_conv_specs
from fmpsr.pruning.coupling import auto_grouping
from fmpsr.pruning.grouping import GROUPINGS, build_grouping, lsrb_boundary_grouping, lsrb_grouping
from test_coupling import example, kept_width, prune_with_fmp

F64 = torch.float64
TIE = [['conv_first', 'body.*.conv1x1']]


def writers(grouping):
    """Output group -> set of convs writing it."""
    out = {}
    for name, (_, side) in grouping.convs.items():
        out.setdefault(side, set()).add(name)
    return out


def expected_boundaries(num_block):
    """The N + 1 boundary writer sets, written out from the forward pass (arch docstring)."""
    sets = [{'conv_first', 'body.0.conv2', 'conv_after_body'}]
    for i in range(num_block):
        sets.append({f'body.{i}.conv1x1', f'body.{i}.esa.conv4'} | ({f'body.{i + 1}.conv2'} if i + 1 < num_block
                                                                       else set()))
    return sets


# ---- the grouping ----
@pytest.mark.parametrize('opt', [
    dict(type='LSRB', num_feat=16, num_block=3, upscale=2, esa_channels=8),
    dict(type='LSRB', num_feat=10, num_block=2, upscale=3, esa_channels=8, stream_feats=[10, 4, 7],
         mid_feats=[3, 5], esa_feats=[[2, 3, 4], [5, 1, 2]]),
], ids=['dense', 'unequal-boundaries'])
def test_boundary_grouping_partition_equals_the_dependency_graph(opt):
    net = build_network(dict(opt))
    hand = lsrb_boundary_grouping(net, opt)
    hand.validate(net)
    auto = auto_grouping(net, example())
    assert hand.partition() == auto.partition()
    num_block = opt['num_block']
    boundaries = [f'stream_{i}' for i in range(num_block + 1)]
    assert [writers(hand)[b] for b in boundaries] == expected_boundaries(num_block)
    widths = opt.get('stream_feats', [opt['num_feat']] * (num_block + 1))
    assert [hand.groups[b].size for b in boundaries] == widths
    # readers: boundary i feeds block i (conv1, conv1x1), the last one conv_after_body, boundary 0 the upsampler
    assert hand.convs['upsampler'][0] == 'stream_0' and hand.convs['conv_after_body'][0] == boundaries[-1]
    for i in range(num_block):
        assert hand.convs[f'body.{i}.conv1'][0] == hand.convs[f'body.{i}.conv1x1'][0] == f'stream_{i}'
        assert hand.convs[f'body.{i}.esa.conv1'][0] == f'stream_{i + 1}'
    # 'auto' is returned as the hand-written per-boundary grouping (compact network: a plain LSRB)
    chosen = build_grouping(net, opt, 'auto', example())
    assert chosen.groups == hand.groups and chosen.convs == hand.convs and chosen.compact_options is not None


def test_tied_grouping_is_a_choice_the_boundary_grouping_refines():
    opt = dict(type='LSRB', num_feat=16, num_block=3, upscale=2, esa_channels=8)
    net = build_network(dict(opt))
    tied, boundary = lsrb_grouping(net, opt), lsrb_boundary_grouping(net, opt)
    assert GROUPINGS['LSRB'] is lsrb_grouping                       # grouping: hand stays the tied stream
    assert build_grouping(net, opt, 'hand').groups == tied.groups
    assert [n for n in tied.groups if n.startswith('stream')] == ['stream']
    assert writers(tied)['stream'] == set().union(*expected_boundaries(3))
    assert tied.partition() != boundary.partition()
    # every tied class is a union of boundary classes (a coarser partition of the same atoms)
    tied_classes, tied_fixed = tied.partition()
    boundary_classes, boundary_fixed = boundary.partition()
    assert tied_fixed == boundary_fixed
    assert all(any(b <= t for t in tied_classes) for b in boundary_classes)
    assert len(boundary_classes) - len(tied_classes) == 3 * 16      # N + 1 = 4 vectors of 16 instead of 1
    # with the tie written out, auto is the tied grouping again
    assert build_grouping(net, opt, 'auto', example(), TIE).groups == tied.groups


def test_tied_grouping_refuses_unequal_boundaries():
    opt = dict(type='LSRB', num_feat=8, num_block=2, upscale=2, esa_channels=4, stream_feats=[8, 5, 6])
    net = build_network(dict(opt))
    with pytest.raises(ValueError, match=r'stream_feats widths differ \(\[8, 5, 6\]\).*grouping: auto'):
        build_grouping(net, opt, 'hand')
    assert 'stream_2' in build_grouping(net, opt, 'auto', example()).groups


# ---- prune with unequal boundary widths, finalize, export ----
BOUNDARY_KEEP = [9, 5, 11, 7]  # kept channels of stream_0 .. stream_3 (of 12), all different


def pruned_per_boundary():
    opt = dict(type='LSRB', num_feat=12, num_block=3, upscale=3, esa_channels=8)
    torch.manual_seed(0)
    net = build_network(dict(opt)).to(F64)
    grouping = build_grouping(net, opt, 'auto', example(20).to(F64))
    specs = trace_conv_specs(net, (20, 20))
    hyper = HyperNetwork(net, grouping, embed_dim=4).to(F64)
    x = torch.rand(2, 3, 20, 20, dtype=F64)
    prune_with_fmp(hyper, specs, x)  # real FMP steps: weight masks and channel masks of the free groups
    generator = torch.Generator().manual_seed(1)
    for i, keep in enumerate(BOUNDARY_KEEP):  # boundaries: own widths and own channel indices
        mask = torch.zeros(12, dtype=torch.bool)
        mask[torch.randperm(12, generator=generator)[:keep]] = True
        hyper.channel_vectors[f'stream_{i}'].mask.copy_(mask)
    return opt, grouping, hyper, x


def test_unequal_boundary_widths_finalize_into_a_plain_lsrb(tmp_path):
    opt, grouping, hyper, x = pruned_per_boundary()
    masks = [hyper.channel_vectors[f'stream_{i}'].mask for i in range(4)]
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks}) == 4  # different channel indices too
    hyper.eval()
    with torch.no_grad():
        expected = hyper(x)
        compact, compact_opt, weight_masks = finalize(hyper, build_network, opt)
        got = compact(x)
    assert type(compact) is LSRB and compact_opt['type'] == 'LSRB'
    assert compact_opt['stream_feats'] == BOUNDARY_KEEP and compact_opt['num_feat'] == BOUNDARY_KEEP[0]
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-12
    for name, conv in compact.named_modules():
        if isinstance(conv, nn.Conv2d):
            side_in, side_out = grouping.convs[name]
            assert (conv.in_channels, conv.out_channels) == (kept_width(grouping, hyper, side_in),
                                                             kept_width(grouping, hyper, side_out)), name
    assert compact.conv_first.out_channels == compact.conv_after_body.out_channels == 9
    assert [b.conv1x1.out_channels for b in compact.body] == [5, 11, 7]
    assert [b.conv2.out_channels for b in compact.body] == [9, 5, 11]
    assert compact.conv_after_body.in_channels == 7
    # params recounted from the widths (conv weights + biases), not from the pruning core
    s, (m, e) = BOUNDARY_KEEP, (compact_opt['mid_feats'], compact_opt['esa_feats'])
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    total = conv(3, s[0], 3) + conv(s[3], s[0], 3) + conv(s[0], 27, 3)
    for i in range(3):
        f1, f2, f3 = e[i]
        total += conv(s[i], m[i], 3) + conv(m[i], s[i], 3) + conv(s[i], s[i + 1], 1)
        total += conv(s[i + 1], f1, 1) + conv(f1, f3, 1) + conv(f1, f2, 3) + conv(f2, f3, 3) + conv(f3, s[i + 1], 1)
    assert sum(p.numel() for p in compact.parameters()) == total
    # export: safetensors + network_g metadata, rebuilt as a plain LSRB with the same boundary widths
    save_compact(str(tmp_path), compact, compact_opt, weight_masks)
    rebuilt, rebuilt_opt, rebuilt_masks = load_compact(str(tmp_path))
    assert type(rebuilt) is LSRB and rebuilt_opt == compact_opt and rebuilt_opt['stream_feats'] == BOUNDARY_KEEP
    assert set(rebuilt_masks) == set(weight_masks)
    with torch.no_grad():
        again = rebuilt.to(F64)(x)
    assert torch.allclose(again, got, rtol=0, atol=1e-5 * float(got.abs().max()))  # weights stored as float32


def test_equal_boundary_widths_export_without_stream_feats():
    opt = dict(type='LSRB', num_feat=8, num_block=2, upscale=2, esa_channels=4)
    net = build_network(dict(opt))
    grouping = lsrb_boundary_grouping(net, opt)
    kept = {name: group.size for name, group in grouping.groups.items()}
    kept.update({'stream_0': 6, 'stream_1': 6, 'stream_2': 6})
    assert 'stream_feats' not in grouping.compact_options(kept) and grouping.compact_options(kept)['num_feat'] == 6
    kept['stream_1'] = 3
    assert grouping.compact_options(kept)['stream_feats'] == [6, 3, 6]
    # the tied grouping never writes stream_feats, and drops a uniform one given in the options
    tied_opt = dict(opt, stream_feats=[8, 8, 8])
    tied = lsrb_grouping(build_network(dict(tied_opt)), tied_opt)
    tied_kept = {name: group.size for name, group in tied.groups.items()}
    assert 'stream_feats' not in tied.compact_options(tied_kept)


def test_uniform_exports_still_load(tmp_path):
    """An export written before stream_feats existed: network_g with num_feat / mid_feats / esa_feats only."""
    old_opt = dict(type='LSRB', num_in_ch=3, num_out_ch=3, num_feat=7, num_block=2, upscale=2, esa_channels=16,
                   mid_feats=[3, 5], esa_feats=[[2, 3, 4], [4, 1, 2]])
    torch.manual_seed(0)
    net = build_network(dict(old_opt)).eval()
    save_compact(str(tmp_path), net, old_opt)
    rebuilt, rebuilt_opt, masks = load_compact(str(tmp_path))
    assert rebuilt_opt == old_opt and masks is None and type(rebuilt) is LSRB
    # the same tensors as a network built with the explicit uniform stream_feats
    explicit = LSRB(**{k: v for k, v in old_opt.items() if k != 'type'}, stream_feats=[7, 7, 7])
    assert {k: v.shape for k, v in explicit.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


# ---- through fmpsr/train.py ----
@pytest.mark.slow
def test_train_py_with_grouping_auto_exports_a_plain_lsrb(tmp_path, data, names):
    import os.path as osp
    import sys

    from conftest import ROOT, run, write_options

    name = names('pytest_lsrb_boundaries')
    yml = tmp_path / 'opt.yml'
    write_options(yml, name, data, extra={'pruning.grouping': 'auto'})
    run([sys.executable, 'fmpsr/train.py', '-opt', str(yml)])
    net, network_opt, _ = load_compact(osp.join(ROOT, 'experiments', name, 'export'))
    assert type(net) is LSRB and network_opt['type'] == 'LSRB'
    # the boundary widths the options name are the widths of the exported convs
    widths = [net.conv_first.out_channels] + [block.conv1x1.out_channels for block in net.body]
    assert network_opt.get('stream_feats', [network_opt['num_feat']] * 3) == widths
    assert net.conv_after_body.in_channels == widths[-1] and all(
        block.conv2.out_channels == w for block, w in zip(net.body, widths))
    assert min(widths) < 12  # channels were pruned


def test_hand_grouping_of_unequal_boundaries_is_refused_in_the_option_check():
    from fmpsr.models.fmp_model import FMPModel
    opt = {'scale': 2, 'is_train': False, 'pruning': {'macs_input_size': [16, 16]},
           'network_g': {'type': 'LSRB', 'num_feat': 12, 'num_block': 2, 'upscale': 2, 'stream_feats': [12, 8, 10]}}
    with pytest.raises(ValueError, match='stream_feats'):
        FMPModel.check_options(opt)
    opt['pruning']['grouping'] = 'auto'
    FMPModel.check_options(opt)  # the per-boundary grouping accepts it
