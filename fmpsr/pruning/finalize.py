"""Finalize: turn a pruned hypernetwork into a compact plain network (FMP Sec. 3.4; DHP finalize).

Each conv's weight is generated once from the hypernetwork, sliced by the kept channel indices of
its input and output groups, and loaded into a network of the same arch with narrower layers
(the grouping's ``compact_options`` gives its ``network_g`` options). Pruned weights inside kept
channels are exactly zero and are returned as masks. The compact network computes the same function
as the masked hypernetwork (to float32 rounding): dropped channels were exactly zero there.
"""
import torch


@torch.no_grad()
def finalize(hyper, build_network):
    """Slice a :class:`~fmpsr.pruning.hypernet.HyperNetwork` into a compact plain network.

    Args:
        hyper (HyperNetwork): the pruned network (not a DDP wrapper).
        build_network (callable): dict of ``network_g`` options -> nn.Module (BasicSR's
            ``basicsr.archs.build_network``; passed in so the core does not import the trainer).

    Returns:
        tuple: (compact network on ``hyper``'s device, its ``network_g`` options (dict),
        weight masks (dict conv name -> bool tensor (c_out_kept, c_in_kept, kh, kw))).

    Raises:
        RuntimeError: the compact network's parameters do not match the sliced weights (a grouping
            whose ``compact_options`` disagree with its groups).
    """
    grouping = hyper.grouping
    kept_idx = {name: v.mask.nonzero().flatten() for name, v in hyper.channel_vectors.items()}
    network_opt = grouping.compact_options(hyper.kept_channels())
    state, masks = {}, {}
    for name, conv in hyper.hyper_convs():
        g_in, g_out = grouping.convs[name]
        rows, cols = kept_idx[g_out], kept_idx[g_in]
        state[f'{name}.weight'] = conv.generate_weight()[rows][:, cols].clone()
        if conv.bias is not None:
            state[f'{name}.bias'] = conv.generate_bias()[rows].clone()
        masks[name] = conv.keep_mask()[rows][:, cols].clone()
    device = next(hyper.parameters()).device
    compact = build_network(dict(network_opt)).to(device)
    compact.load_state_dict(state, strict=True)
    return compact, network_opt, masks
