"""Finalize: turn a pruned network into a compact plain network (FMP Sec. 3.4; DHP finalize; SRP
Sec. 3.2 "physically remove the filters"; the fine-tune step of L1-norm, ASSL, ISS-P, LTH).

Every method ends the same way: each group of coupled channels has a keep mask, each conv a weight
(and optionally a weight mask for single pruned weights). :func:`slice_network` slices each conv's
weight by the kept channel indices of its input and output sides and loads it into a network of the
same arch with narrower layers: the grouping's ``compact_options`` gives its ``network_g`` options
where the arch exposes its widths (LSRB); otherwise the network is ``CompactArch`` (the arch's own
options plus each conv's kept ``[in, out]`` widths, :mod:`fmpsr.archs.compact_arch`). Pruned weights
inside kept channels are exactly zero and are returned as masks. Per-channel parameters between
convs (``ChannelGrouping.channel_params``: PReLU slopes, BatchNorm weight / bias / running stats) are
sliced with the channels they belong to, and ``CompactArch`` narrows their modules (its
``channel_params`` option). The compact network computes the
same function as the masked network it came from (to float rounding): dropped channels were exactly
zero there.

* :func:`finalize` does this for an FMP / DHP :class:`~fmpsr.pruning.hypernet.HyperNetwork`
  (weights generated once from the hypernetwork);
* :func:`finalize_plain` for a plain network pruned by masks (SRP, L1-norm, ASSL, ISS-P, LTH, ...).

Frozen layers (``requires_grad=False``) are plain convs of the grouping and are copied bit for bit;
a weight mask that would zero a frozen weight is refused (:func:`fmpsr.pruning.masks.check_not_frozen`).
"""
import torch

from .grouping import slice_weight


def side_mask(grouping, side, group_masks):
    """Keep mask of one conv side (a group name or ``(group, positions)`` segments).

    Args:
        grouping (ChannelGrouping): the network's channel groups.
        side (str | tuple): a side of ``grouping.convs``.
        group_masks (dict): group name -> bool tensor (group size,), True = kept channel.

    Returns:
        Tensor: bool, (side width,).
    """
    pieces = []
    for group, positions in grouping.segments(side):
        mask = group_masks[group]
        pieces.append(mask if positions is None else mask[torch.as_tensor(positions, device=mask.device)])
    return torch.cat(pieces)


def conv_channel_masks(grouping, group_masks):
    """Dict conv name -> (input keep mask (c_in,), output keep mask (c_out,)), bool tensors."""
    return {name: (side_mask(grouping, g_in, group_masks), side_mask(grouping, g_out, group_masks))
            for name, (g_in, g_out) in grouping.convs.items()}


def compact_network_options(grouping, kept_groups, conv_channels, network_opt=None, param_channels=None):
    """``network_g`` options of the compact network.

    Args:
        grouping (ChannelGrouping): channel groups (its ``compact_options`` is used when set).
        kept_groups (dict): group name -> kept channels (int).
        conv_channels (dict): conv name -> [kept in, kept out] (ints).
        network_opt (dict | None): the dense ``network_g``; needed for the generic ``CompactArch``.
        param_channels (dict | None): ``channel_params`` key -> kept channels (int); added to the
            ``CompactArch`` options as ``channel_params`` when not empty (issue 14).

    Raises:
        ValueError: the generic form is needed and ``network_opt`` is None.
    """
    if grouping.compact_options is not None:
        return grouping.compact_options(kept_groups, conv_channels)
    if network_opt is None:
        raise ValueError('finalize: this grouping has no compact_options; pass the dense network_opt')
    opt = {'type': 'CompactArch', 'arch': dict(network_opt), 'conv_channels': conv_channels}
    if param_channels:
        opt['channel_params'] = dict(param_channels)
    return opt


def slice_channel_params(grouping, group_masks, dense_state):
    """Slice the per-channel parameters and buffers of ``grouping.channel_params`` (PReLU slopes,
    BatchNorm weight / bias / running stats, ...) by the kept channels of their side (issue 14).

    Args:
        grouping (ChannelGrouping): channel groups.
        group_masks (dict): group name -> bool (size,) keep mask.
        dense_state (dict): the dense network's state dict.

    Returns:
        tuple: (dict key -> sliced tensor, along :func:`~fmpsr.pruning.grouping.channel_dim`;
        dict key -> kept channels (int)).
    """
    from .grouping import channel_dim

    state, widths = {}, {}
    for key, side in grouping.channel_params.items():
        value = dense_state[key]
        keep = side_mask(grouping, side, group_masks).to(value.device)
        state[key] = value.index_select(channel_dim(value.shape), keep.nonzero().flatten()).clone()
        widths[key] = int(keep.sum())
    return state, widths


@torch.no_grad()
def slice_network(grouping, group_masks, weights, biases, weight_masks, dense_state, build_network, network_opt=None):
    """Build the compact network from per-conv dense weights and the keep masks.

    Args:
        grouping (ChannelGrouping): channel groups of the dense network.
        group_masks (dict): group name -> bool (size,) keep mask (fixed groups: all True).
        weights (dict): conv name -> dense weight (c_out, c_in, kh, kw), masked or not; (c_in, c_out,
            kh, kw) for the transposed convs of ``grouping.transposed`` (sliced in that layout).
        biases (dict): conv name -> dense bias (c_out,) or None.
        weight_masks (dict | None): conv name -> bool (c_out, c_in, kh, kw) kept single weights; None
            or a missing name = every weight of the kept channels.
        dense_state (dict): the dense network's state dict; parameters and buffers outside the convs
            are copied from it, the per-channel ones of ``grouping.channel_params`` (PReLU, BatchNorm,
            ...) sliced by their side's kept channels (:func:`slice_channel_params`).
        build_network (callable): dict of ``network_g`` options -> nn.Module (BasicSR's
            ``build_network``, passed in so the core does not import the trainer).
        network_opt (dict | None): the dense ``network_g`` (for the generic ``CompactArch`` form).

    Returns:
        tuple: (compact network on the weights' device and dtype, its ``network_g`` options (dict),
        weight masks (dict conv name -> bool (c_out_kept, c_in_kept, kh, kw)); pruned weights are
        exactly zero in the compact network).

    Raises:
        RuntimeError: a compact parameter or buffer has no counterpart of its shape (a non-conv layer
            whose size depends on pruned channels), or the grouping's ``compact_options`` disagree
            with its groups.
        ValueError: see :func:`compact_network_options`.
    """
    sides = conv_channel_masks(grouping, group_masks)
    conv_channels = {name: [int(m_in.sum()), int(m_out.sum())] for name, (m_in, m_out) in sides.items()}
    kept_groups = {g: int(m.sum()) for g, m in group_masks.items()}
    state, param_channels = slice_channel_params(grouping, group_masks, dense_state)
    compact_opt = compact_network_options(grouping, kept_groups, conv_channels, network_opt, param_channels)
    masks = {}
    for name, (m_in, m_out) in sides.items():
        transposed = name in grouping.transposed
        weight = weights[name]
        keep = torch.ones_like(weight, dtype=torch.bool)
        if weight_masks is not None and name in weight_masks:
            keep = weight_masks[name].to(weight.device).bool()
        masks[name] = slice_weight(keep, m_in, m_out, transposed).clone()
        state[f'{name}.weight'] = slice_weight(weight * keep, m_in, m_out, transposed).clone()
        if biases.get(name) is not None:
            state[f'{name}.bias'] = biases[name][m_out.nonzero().flatten()].clone()
    like = next(iter(weights.values()))
    compact = build_network(dict(compact_opt)).to(device=like.device, dtype=like.dtype)
    for key, value in compact.state_dict().items():  # parameters and buffers outside the convs
        if key not in state:
            if key not in dense_state or dense_state[key].shape != value.shape:
                raise RuntimeError(f'finalize: {key!r} of the compact network has no counterpart of shape '
                                   f'{tuple(value.shape)} in the dense network (a non-conv layer whose size '
                                   'depends on pruned channels is not supported)')
            state[key] = dense_state[key].clone()
    compact.load_state_dict(state, strict=True)
    return compact, compact_opt, masks


@torch.no_grad()
def finalize(hyper, build_network, network_opt=None):
    """Slice a :class:`~fmpsr.pruning.hypernet.HyperNetwork` into a compact plain network.

    Each conv's weight is generated once (FMP Eqs. 1-2, masked) and sliced (:func:`slice_network`).

    Args:
        hyper (HyperNetwork): the pruned network (not a DDP wrapper).
        build_network (callable): see :func:`slice_network`.
        network_opt (dict | None): ``network_g`` options of the dense arch; needed when the grouping
            has no ``compact_options`` (the generic ``CompactArch`` form).

    Returns:
        tuple: (compact network, its ``network_g`` options, weight masks), see :func:`slice_network`.

    Raises:
        RuntimeError, ValueError: see :func:`slice_network`.
    """
    group_masks = {name: v.mask for name, v in hyper.channel_vectors.items()}
    weights, biases, keep = {}, {}, {}
    for name, conv in hyper.hyper_convs():
        weights[name] = conv.generate_weight()
        biases[name] = conv.generate_bias()
        keep[name] = conv.keep_mask()
    return slice_network(hyper.grouping, group_masks, weights, biases, keep, hyper.net.state_dict(),
                         build_network, network_opt)


@torch.no_grad()
def finalize_plain(net, grouping, group_masks, build_network, network_opt=None, weight_masks=None):
    """Slice a plain network pruned by masks into a compact plain network.

    Args:
        net (nn.Module): the dense network (plain ``nn.Conv2d`` layers; weight parametrizations such
            as :class:`~fmpsr.pruning.masks.WeightMask` are read through ``conv.weight``).
        grouping (ChannelGrouping | None): its channel groups (:func:`~fmpsr.pruning.grouping.build_grouping`);
            None for a method that prunes single weights only: the compact network is then the
            dense arch with the masked weights (``network_opt``), no channel is removed.
        group_masks (dict): group name -> bool (size,) keep mask; a group left out keeps every channel.
        build_network (callable): see :func:`slice_network`.
        network_opt (dict | None): the dense ``network_g``.
        weight_masks (dict | None): conv name -> bool (c_out, c_in, kh, kw) kept single weights.

    Returns:
        tuple: (compact network, its ``network_g`` options, weight masks), see :func:`slice_network`.

    Raises:
        RuntimeError, ValueError: see :func:`slice_network`; a weight mask that zeroes a frozen weight.
    """
    from .masks import check_not_frozen, plain_state_dict

    like = next(net.parameters())
    if grouping is None:
        if network_opt is None:
            raise ValueError('finalize_plain: without a grouping, pass the dense network_opt')
        for name, mask in (weight_masks or {}).items():
            check_not_frozen(net.get_submodule(name), name, mask)
        state = plain_state_dict(net)
        compact = build_network(dict(network_opt)).to(device=like.device, dtype=like.dtype)
        compact.load_state_dict(state, strict=True)
        masks = {name: m.to(like.device).bool().clone() for name, m in (weight_masks or {}).items()}
        with torch.no_grad():
            for name, mask in masks.items():
                compact.get_submodule(name).weight.mul_(mask)
        return compact, dict(network_opt), masks
    full = {g: torch.ones(group.size, dtype=torch.bool, device=like.device) for g, group in grouping.groups.items()}
    full.update({g: m.to(like.device).bool() for g, m in group_masks.items()})
    state = {k: v.to(like.device) for k, v in plain_state_dict(net).items()}
    weights = {name: state[f'{name}.weight'] for name in grouping.convs}
    biases = {name: state.get(f'{name}.bias') for name in grouping.convs}
    return slice_network(grouping, full, weights, biases, weight_masks, state, build_network, network_opt)
