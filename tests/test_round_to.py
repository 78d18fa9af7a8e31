"""pruning.round_to: kept widths of every channel group rounded (up) to a multiple, honoured by the
masks, the counts and finalize (torch-pruning's ``round_to``; issue 10)."""
import pytest
import torch

import fmpsr  # noqa: F401  (registers LSRB)
from basicsr.archs import build_network
from fmpsr.pruning import (ChannelVector, FMPConfig, FMPPruner, HyperNetwork, build_grouping, finalize,
                           trace_conv_specs)


def vector_with(values):
    v = ChannelVector(len(values))
    with torch.no_grad():
        v.z.copy_(torch.tensor(values))
    return v


def test_kept_count_is_rounded_up_with_the_largest_magnitudes():
    # 3 entries above the threshold; round_to 4 keeps them and the largest one below (0.004)
    v = vector_with([0.9, -0.001, 0.5, 0.004, -0.7, 0.0, 0.002, 0.003])
    assert v.update_mask_(prune_threshold=5e-3, min_channels=1, round_to=4) == 4
    assert v.mask.tolist() == [True, False, True, True, True, False, False, False]
    # later, only one entry above the threshold: the floor (min_channels 2) rounds to 4, which is
    # what is kept, so nothing more is pruned; the mask never grows back
    with torch.no_grad():
        v.z.copy_(torch.tensor([0.9, 0.0, 0.001, 0.0, 0.001, 0.0, 0.0, 0.0]))
    assert v.update_mask_(prune_threshold=5e-3, min_channels=2, round_to=4) == 0 and v.kept() == 4


def test_a_size_that_is_no_multiple_is_kept_whole_until_a_multiple_fits():
    v = vector_with([1.0] * 10 + [0.0] * 2)  # 12 channels, 10 above the threshold, round_to 8
    assert v.update_mask_(round_to=8) == 0 and v.kept() == 12  # rounding 10 up to 16 > 12: keep all
    with torch.no_grad():
        v.z[5:] = 0.0
    assert v.update_mask_(round_to=8) == 4 and v.kept() == 8  # 5 alive -> 8


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_round_to_one_is_the_old_rule(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(24, generator=g) * (torch.rand(24, generator=g) < 0.5) * 0.01
    a, b = vector_with(z.tolist()), vector_with(z.tolist())
    assert a.update_mask_(min_channels=4) == b.update_mask_(min_channels=4, round_to=1)
    assert torch.equal(a.mask, b.mask)


def test_config_validates_round_to():
    assert FMPConfig.from_options({'round_to': 8}).round_to == 8
    assert FMPConfig.from_options({}).round_to == 1
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match='pruning.round_to'):
            FMPConfig.from_options({'round_to': bad})


def test_masks_counts_and_finalize_honour_round_to():
    opt = dict(type='LSRB', num_feat=16, num_block=2, esa_channels=12, upscale=2)
    torch.manual_seed(0)
    net = build_network(dict(opt))
    hyper = HyperNetwork(net, build_grouping(net, opt), embed_dim=8)
    specs = trace_conv_specs(build_network(dict(opt)), (32, 32))
    config = FMPConfig.from_options({'round_to': 4, 'criterion': 'channel', 'gamma_c': 0.7, 'gamma_w': 0.1,
                                     'min_channels': 1})
    pruner = FMPPruner(hyper, specs, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for vector in hyper.prunable_vectors():  # a random number of channels falls below the threshold
            vector.z.mul_(torch.rand(vector.size, generator=g) < torch.rand(1, generator=g))
    pruner.check()
    kept = {name: v.kept() for name, v in hyper.channel_vectors.items() if v.prunable}
    assert any(k < hyper.channel_vectors[name].size for name, k in kept.items())
    assert all(k % 4 == 0 for k in kept.values()), kept  # 16 and 12 are multiples: every width is one
    compact, network_opt, _ = finalize(hyper, build_network, opt)
    widths = [network_opt['num_feat'], *network_opt['mid_feats'], *(w for e in network_opt['esa_feats'] for w in e)]
    assert all(w % 4 == 0 for w in widths), network_opt
    params = sum(p.numel() for p in compact.parameters())
    assert pruner.ratios.channel.params == params  # the counts are of the rounded widths
