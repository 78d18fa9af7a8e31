"""Automatic channel coupling: the :class:`~fmpsr.pruning.grouping.ChannelGrouping` of any conv network,
found with torch-pruning's ``DependencyGraph`` (FMP Sec. 4.6, "plug-and-play pruning").

torch-pruning traces the network once and, for every conv's output channel, lists every conv input
and output channel that must be pruned with it: outputs that meet at an add or a multiply (residual
adds, attention multiplies) are tied, concatenations and splits map each channel to its slice.
fmpsr adds what torch-pruning 1.6 does not know: ``nn.PixelShuffle(r)`` maps input channel
``c*r*r + k`` to output channel ``c``, so the ``r*r`` conv outputs of one feature channel are tied
(pruned together) and the next conv sees one channel.

From these pairwise ties fmpsr forms *channel atoms* ``(conv name, 'in' | 'out', channel)`` and
joins them with scipy's ``connected_components``; each component is one channel of some vector.
Vectors are then formed conv by conv in module order: the components of a conv's output that are
not yet in a vector become a new vector named after that conv (dots replaced by ``_``). A
component is prunable when it is written by at least one conv and read by at least one conv;
otherwise it is an image input or output channel (or a dead end) and stays fixed.

Each conv side is then either a whole vector (the group name) or, where channels come from several
vectors (concatenation) or repeat (PixelShuffle), a tuple of ``(group, positions)`` segments; see
:class:`~fmpsr.pruning.grouping.ChannelGrouping`.

The PixelShuffle mapping uses torch-pruning's index-mapping objects (``_FlattenIndexMapping`` and
``Dependency.index_mapping``), which are not public API; setup.py pins torch-pruning to 1.6.x for that.

Assumption (checked by the equality tests of every covered arch): a pruned channel is exactly zero
in the hypernetwork, so every op between convs must map zero to zero (ReLU, LeakyReLU, pooling,
interpolation, adds) unless the channel is multiplied by a tied zero (ESA's and RCAN's sigmoid gates).
"""
import fnmatch
from collections import OrderedDict

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from .grouping import ChannelGroup, ChannelGrouping

IN, OUT = 'in', 'out'


def _pixel_shuffle_factor(node):
    """Upscale factor r if the torch-pruning node is a PixelShuffle (module or functional), else None."""
    if isinstance(node.module, nn.PixelShuffle):
        return node.module.upscale_factor
    if isinstance(node.module, nn.PixelUnshuffle) or 'PixelUnshuffle' in type(node.grad_fn).__name__:
        raise ValueError(f'automatic channel coupling does not support PixelUnshuffle (node {node.name})')
    if node.grad_fn is not None and 'PixelShuffle' in type(node.grad_fn).__name__:
        return int(node.grad_fn._saved_upscale_factor)
    return None


def _map_pixel_shuffle(graph):
    """Give every PixelShuffle node of a torch-pruning graph the index mapping of its channels:
    producer channel ``i`` -> feature channel ``i // r**2``; feature channel ``c`` -> producer
    channels ``c*r**2 .. c*r**2 + r**2 - 1`` (torch-pruning's flatten mapping has exactly this form)."""
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    for node in list(graph.module2node.values()):
        factor = _pixel_shuffle_factor(node)
        if factor is None:
            continue
        stride = factor * factor
        for source in node.inputs:
            for dep in source.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _FlattenIndexMapping(stride=stride, reverse=True)
            for dep in node.dependencies:
                if dep.target is source:
                    dep.index_mapping[0] = _FlattenIndexMapping(stride=stride, reverse=False)


def conv_modules(net):
    """OrderedDict conv name -> ``nn.Conv2d`` of ``net``, in module order.

    Raises:
        ValueError: a conv with ``groups != 1`` (the hypernetwork generates dense kernels only).
    """
    convs = OrderedDict((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    for name, conv in convs.items():
        if conv.groups != 1:
            raise ValueError(f'conv {name!r} has groups={conv.groups}; only groups=1 is supported')
    return convs


def expand_ties(ties, names):
    """Resolve ``pruning.tie_outputs`` patterns (``fnmatch`` globs on conv names) to name lists.

    Raises:
        ValueError: a pattern that matches no conv (the pattern is named).
    """
    out = []
    for tie in ties or ():
        matched = []
        for pattern in ([tie] if isinstance(tie, str) else tie):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(f'pruning.tie_outputs: pattern {pattern!r} matches no conv of the network')
            matched += [n for n in hits if n not in matched]
        out.append(matched)
    return out


def auto_grouping(net, example_input, ties=()):
    """Find the channel groups of ``net`` with torch-pruning's DependencyGraph (see module docstring).

    Args:
        net (nn.Module): a plain conv network (not modified; it runs one forward pass on
            ``example_input`` with autograd recording).
        example_input (Tensor): (1, C_in, H, W) input; H, W in LR pixels, large enough for the arch.
        ties (sequence): extra couplings, each a list of conv names or globs whose outputs must share
            one channel vector (e.g. LSRB's single stream width: ``[conv_first, 'body.*.conv1x1']``).

    Returns:
        ChannelGrouping: groups named after the first conv writing them (``conv_first``,
        ``body_0_conv1``, ...); fixed groups are named ``<conv>_in`` / ``<conv>`` for image channels.
        It has no ``compact_options``: finalize builds the generic ``CompactArch``.

    Raises:
        ValueError: grouped convs, PixelUnshuffle, tied convs of different widths, or a mapping that
            lands outside a conv's channels (an op torch-pruning mistakes for element-wise).
    """
    import torch_pruning as tp

    convs = conv_modules(net)
    names = {conv: name for name, conv in convs.items()}
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=example_input)
    finally:
        net.train(was_training)
    _map_pixel_shuffle(graph)

    atoms = {}  # (conv, side, channel) -> node index of the tie graph
    for name, conv in convs.items():
        for side, width in ((IN, conv.in_channels), (OUT, conv.out_channels)):
            for ch in range(width):
                atoms[(name, side, ch)] = len(atoms)
    ties_a, ties_b = [], []

    def tie(a, b):
        ties_a.append(atoms[a])
        ties_b.append(atoms[b])

    for name, conv in convs.items():
        # rooted at the outputs and at the inputs: torch-pruning keeps one root per target channel, so a
        # many-to-one map (r*r conv outputs -> one PixelShuffle channel) is complete only from the input side
        for root_side, fn, width in ((OUT, tp.prune_conv_out_channels, conv.out_channels),
                                     (IN, tp.prune_conv_in_channels, conv.in_channels)):
            group = graph.get_pruning_group(conv, fn, idxs=list(range(width)))
            for item in group.items:
                target = names.get(item.dep.target.module)
                if target is None:
                    continue
                side = OUT if graph.is_out_channel_pruning_fn(item.dep.handler) else IN
                limit = getattr(convs[target], 'out_channels' if side == OUT else 'in_channels')
                for idx, root in zip(item.idxs, item.root_idxs):
                    if not 0 <= int(idx) < limit:
                        raise ValueError(f'automatic channel coupling mapped {name!r} {root_side}put channel '
                                         f'{int(root)} to {target!r} {side}put channel {int(idx)} of {limit}: an op '
                                         'between them changes the channel layout in a way torch-pruning does not model')
                    tie((name, root_side, int(root)), (target, side, int(idx)))
    for tied in expand_ties(ties, list(convs)):
        widths = {n: convs[n].out_channels for n in tied}
        if len(set(widths.values())) > 1:
            raise ValueError(f'pruning.tie_outputs: tied convs have different output widths {widths}')
        for other in tied[1:]:
            for ch in range(widths[other]):
                tie((tied[0], OUT, ch), (other, OUT, ch))

    tie_graph = coo_matrix((np.ones(len(ties_a)), (ties_a, ties_b)), shape=(len(atoms), len(atoms)))
    _, labels = connected_components(tie_graph, directed=False)
    component = {atom: int(labels[i]) for atom, i in atoms.items()}
    sides = {}
    for atom, comp in component.items():
        sides.setdefault(comp, set()).add(atom[1])
    position, groups = {}, OrderedDict()

    def assign(comps, group_name):
        fresh = [c for c in dict.fromkeys(comps) if c not in position]
        if not fresh:
            return
        prunable = {sides[c] == {IN, OUT} for c in fresh}
        for flag in sorted(prunable, reverse=True):  # a conv side never mixes both kinds in practice
            part = [c for c in fresh if (sides[c] == {IN, OUT}) == flag]
            name = group_name if flag or len(prunable) == 1 else group_name + '_fixed'
            for i, c in enumerate(part):
                position[c] = (name, i)
            groups[name] = ChannelGroup(len(part), prunable=flag)

    for name, conv in convs.items():
        assign([component[(name, OUT, ch)] for ch in range(conv.out_channels)], name.replace('.', '_'))
    for name, conv in convs.items():  # channels no conv writes: the image input
        assign([component[(name, IN, ch)] for ch in range(conv.in_channels)], name.replace('.', '_') + '_in')

    def side_of(name, side, channels):
        pos = [position[component[(name, side, ch)]] for ch in range(channels)]
        group = pos[0][0]
        if all(g == group for g, _ in pos) and [p for _, p in pos] == list(range(groups[group].size)):
            return group
        segments = []
        for g, p in pos:
            if segments and segments[-1][0] == g:
                segments[-1][1].append(p)
            else:
                segments.append((g, [p]))
        return tuple((g, tuple(p)) for g, p in segments)

    conv_sides = OrderedDict((name, (side_of(name, IN, conv.in_channels), side_of(name, OUT, conv.out_channels)))
                             for name, conv in convs.items())
    return ChannelGrouping(dict(groups), conv_sides)
