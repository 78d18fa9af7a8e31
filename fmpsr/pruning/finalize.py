"""Finalize: turn a pruned hypernetwork into a compact plain network (FMP Sec. 3.4; DHP finalize).

Each conv's weight is generated once from the hypernetwork, sliced by the kept channel indices of
its input and output sides, and loaded into a network of the same arch with narrower layers: the
grouping's ``compact_options`` gives its ``network_g`` options where the arch exposes its widths
(LSRB); otherwise the network is ``CompactArch`` (the arch's own options plus each conv's kept
``[in, out]`` widths, :mod:`fmpsr.archs.compact_arch`). Pruned weights inside kept
channels are exactly zero and are returned as masks. The compact network computes the same function
as the masked hypernetwork (to float32 rounding): dropped channels were exactly zero there.
"""
import torch


@torch.no_grad()
def finalize(hyper, build_network, network_opt=None):
    """Slice a :class:`~fmpsr.pruning.hypernet.HyperNetwork` into a compact plain network.

    Args:
        hyper (HyperNetwork): the pruned network (not a DDP wrapper).
        build_network (callable): dict of ``network_g`` options -> nn.Module (BasicSR's
            ``basicsr.archs.build_network``; passed in so the core does not import the trainer).
        network_opt (dict | None): ``network_g`` options of the dense arch; needed when the grouping
            has no ``compact_options`` (the generic ``CompactArch`` form).

    Returns:
        tuple: (compact network on ``hyper``'s device and dtype, its ``network_g`` options (dict),
        weight masks (dict conv name -> bool tensor (c_out_kept, c_in_kept, kh, kw))).

    Raises:
        RuntimeError: the compact network's parameters do not match the sliced weights (a grouping
            whose ``compact_options`` disagree with its groups).
        ValueError: the generic form is needed and ``network_opt`` is None.
    """
    grouping = hyper.grouping
    kept_in, kept_out = hyper.kept_conv_channels()
    conv_channels = {name: [kept_in[name], kept_out[name]] for name in kept_in}
    if grouping.compact_options is not None:
        compact_opt = grouping.compact_options(hyper.kept_channels(), conv_channels)
    elif network_opt is None:
        raise ValueError('finalize: this grouping has no compact_options; pass the dense network_opt')
    else:
        compact_opt = {'type': 'CompactArch', 'arch': dict(network_opt), 'conv_channels': conv_channels}
    state, masks = {}, {}
    for name, conv in hyper.hyper_convs():
        rows = conv.out_vector.channel_mask().nonzero().flatten()
        cols = conv.in_vector.channel_mask().nonzero().flatten()
        state[f'{name}.weight'] = conv.generate_weight()[rows][:, cols].clone()
        if conv.bias is not None:
            state[f'{name}.bias'] = conv.generate_bias()[rows].clone()
        masks[name] = conv.keep_mask()[rows][:, cols].clone()
    like = next(hyper.parameters())
    compact = build_network(dict(compact_opt)).to(device=like.device, dtype=like.dtype)
    dense = hyper.net.state_dict()
    for key, value in compact.state_dict().items():  # parameters and buffers outside the convs
        if key not in state:
            if key not in dense or dense[key].shape != value.shape:
                raise RuntimeError(f'finalize: {key!r} of the compact network has no counterpart of shape '
                                   f'{tuple(value.shape)} in the hypernetwork (a non-conv layer whose size '
                                   'depends on pruned channels is not supported)')
            state[key] = dense[key].clone()
    compact.load_state_dict(state, strict=True)
    return compact, compact_opt, masks
