"""Selection rules of the structured baselines (fmpsr.pruning.selection): SRP Table 1's exact counts,
SRPN-Lite's, and the pieces (counts, scores, random sets, kept groups) recomputed independently."""
import math

import pytest
import torch

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from fmpsr.pruning import build_grouping, finalize_plain, mask_ratios, trace_conv_specs
from fmpsr.pruning.selection import (check_per_layer, classify_groups, filter_l1_norms, group_scores, kept_groups,
                                     prune_count, pruned_rows, random_mask, select_channels, selection_generator)

EDSR_X2 = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_block': 16, 'upscale': 2}
# SRP Table 1 (EDSR baseline x2, 16 blocks, 64 channels) less the 24 mean-shift parameters of the original code
SRP_TABLE1 = {0.1: 1_101_745, 0.3: 681_039, 0.5: 381_795, 0.7: 154_139, 0.9: 26_869}
SRPN_LITE = {2: 609_042, 3: 615_132, 4: 623_658}   # paper: 609 K / 615 K / 623 K


def grouped(opt):
    net = build_network(dict(opt))
    return net, build_grouping(net, opt, None, torch.zeros(1, 3, 16, 16))


@pytest.fixture(scope='module')
def edsr():
    torch.manual_seed(0)
    return grouped(EDSR_X2)


def numel(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize('rule', ['random', 'score'])
def test_edsr_x2_gives_srp_table_1_counts(edsr, rule):
    net, grouping = edsr
    specs = trace_conv_specs(net, (16, 16))
    assert numel(net) == 1_369_859                     # 1,369.9 K less the mean shift
    for ratio, expected in SRP_TABLE1.items():
        masks = select_channels(grouping, ratio, filter_l1_norms(net), rule, selection_generator(0))
        assert mask_ratios(specs, grouping, masks).pruned.params == expected
        compact, _, _ = finalize_plain(net, grouping, masks, build_network, EDSR_X2)
        assert numel(compact) == expected


@pytest.mark.slow
@pytest.mark.parametrize('scale', [2, 3, 4])
def test_srpn_lite_256_to_45(scale):
    opt = {'type': 'SRPNLite', 'num_feat': 256, 'num_block': 16, 'upscale': scale}
    net, grouping = grouped(opt)
    ratio = 211 / 256                                   # 256 -> 45 kept
    masks = select_channels(grouping, ratio, filter_l1_norms(net), 'random', selection_generator(0))
    assert {int(m.sum()) for g, m in masks.items() if grouping.groups[g].prunable} == {45}
    assert mask_ratios(trace_conv_specs(net, (16, 16)), grouping, masks).pruned.params == SRPN_LITE[scale]
    compact, _, _ = finalize_plain(net, grouping, masks, build_network, opt)
    assert numel(compact) == SRPN_LITE[scale]
    x = torch.rand(1, 3, 8, 8)
    assert compact(x).shape == (1, 3, 8 * scale, 8 * scale)


def test_prune_count():
    assert [prune_count(64, r) for r in (0.1, 0.3, 0.5, 0.7, 0.9)] == [7, 20, 32, 45, 58]
    assert prune_count(10, 0.3) == 3                    # 0.3 * 10 is 3.0000000000000004 in floats
    assert prune_count(4, 0.99) == 3 and prune_count(1, 0.9) == 0   # never every channel
    assert prune_count(64, 0.3, round_to=8) == 16       # 44 kept -> 48 (up, as FMP's round_to)
    assert prune_count(64, 0.95, round_to=8) == 56      # 3 kept -> 8
    assert prune_count(64, 0.5, round_to=8) == 32       # 32 kept is a multiple already
    assert prune_count(6, 0.5, round_to=8) == 0         # narrower than round_to: the whole group


def test_groups_edsr_x4_upsampler_is_kept():
    net, grouping = grouped(dict(EDSR_X2, num_feat=16, num_block=3, upscale=4))
    kept = kept_groups(grouping)
    assert kept == {'upsample_0': 'pixel_shuffle', 'upsample_2': 'pixel_shuffle', 'conv_last': 'fixed',
                    'conv_first_in': 'fixed'}
    constrained, free = classify_groups(grouping)
    assert constrained == ['conv_first'] and free == [f'body_{i}_conv1' for i in range(3)]
    assert kept_groups(grouping, ['body_1_*'])['body_1_conv1'] == 'skip_groups'
    with pytest.raises(ValueError, match="pattern 'nothing' matches no channel group"):
        kept_groups(grouping, ['nothing'])


def test_scores_and_smallest_l1_recomputed(edsr):
    net, grouping = edsr
    stream = sum(net.get_submodule(c).weight.detach().abs().sum((1, 2, 3))
                 for c in ['conv_first', 'conv_after_body'] + [f'body.{i}.conv2' for i in range(16)])
    scores = group_scores(grouping, filter_l1_norms(net), ['conv_first', 'body_3_conv1'])
    assert torch.allclose(scores['conv_first'], stream, rtol=1e-5)
    masks = select_channels(grouping, 0.3, filter_l1_norms(net), 'score')
    for group, conv in (('body_3_conv1', 'body.3.conv1'), ('conv_first', None)):
        s = net.get_submodule(conv).weight.detach().abs().sum((1, 2, 3)) if conv else stream
        dropped = set(torch.topk(s, 20, largest=False).indices.tolist())
        assert set((~masks[group]).nonzero().flatten().tolist()) == dropped


def test_random_sets_repeat_with_the_seed_and_are_shared(edsr):
    net, grouping = edsr
    a = select_channels(grouping, 0.5, filter_l1_norms(net), 'random', selection_generator(7))
    b = select_channels(grouping, 0.5, filter_l1_norms(net), 'random', selection_generator(7))
    c = select_channels(grouping, 0.5, filter_l1_norms(net), 'random', selection_generator(8))
    assert torch.equal(a['conv_first'], b['conv_first']) and not torch.equal(a['conv_first'], c['conv_first'])
    assert torch.equal(a['conv_first'], random_mask(64, 32, selection_generator(7)))
    # the free groups do not depend on the seed (L1), and every writer of the stream drops the same rows
    assert torch.equal(a['body_0_conv1'], c['body_0_conv1'])
    rows = pruned_rows(grouping, a)
    expected = (~a['conv_first']).nonzero().flatten()
    for conv in ['conv_first', 'conv_after_body'] + [f'body.{i}.conv2' for i in range(16)]:
        assert torch.equal(rows[conv].sort().values, expected)
    assert 'upsample.0' not in rows


def test_per_layer_rule_is_refused_where_it_breaks_an_add(edsr):
    _, grouping = edsr
    with pytest.raises(ValueError, match=r"channel group 'conv_first' is written by 18 convs \(conv_first, "
                                         r"body.0.conv2"):
        check_per_layer(grouping)
    check_per_layer(grouping, skip=['conv_first'])       # Li et al.'s recipe: leave the adds alone


def test_ceil_matches_math(edsr):
    _, grouping = edsr
    for ratio in (0.05, 0.33, 0.66):
        masks = select_channels(grouping, ratio, {c: torch.rand(grouping.side_width(o)) for c, (_, o) in
                                                  grouping.convs.items()}, 'random', selection_generator(0))
        assert int((~masks['conv_first']).sum()) == math.ceil(ratio * 64)
