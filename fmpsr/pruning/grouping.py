"""Channel groups: which conv channels must be pruned together (FMP Sec. 3.3; DHP's vector sharing).

Every conv output that meets another at an element-wise add or multiply must carry the same channel
vector, so those outputs form one *group* and are kept or pruned as a whole. A
:class:`ChannelGrouping` is the complete description the pruning core needs:

* ``groups``: group name -> :class:`ChannelGroup` (size, prunable);
* ``convs``: conv module name (as in ``net.named_modules()``) -> ``(in_side, out_side)``. A side is
  a group name when the conv's channels are that group's channels in order, or a tuple of
  ``(group, positions)`` segments when they are gathered from several groups (a concatenation) or
  repeat (the ``r*r`` conv outputs that PixelShuffle turns into one feature channel);
* ``compact_options``: a function ``(kept, conv_channels) -> network_g`` from the kept widths
  ``{group: int}`` and kept conv widths ``{conv: (in, out)}`` to the options of the compact
  network, so that :func:`fmpsr.pruning.finalize.finalize` can rebuild it as the same arch with
  narrower layers; None means the generic form (``CompactArch``: the arch plus per-conv widths).

Hand-written groupings live in :data:`GROUPINGS`, keyed by arch class name;
:func:`fmpsr.pruning.coupling.auto_grouping` finds the groups of any conv network with
torch-pruning's dependency graph. :meth:`ChannelGrouping.partition` compares two groupings.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

from torch import nn

INPUT = 'input'
OUTPUT = 'output'


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels.

    Attributes:
        size (int): number of channels.
        prunable (bool): False for image input / output channels (never pruned).
    """
    size: int
    prunable: bool = True


@dataclass
class ChannelGrouping:
    """Groups of coupled channels of one network; see the module docstring."""
    groups: Dict[str, ChannelGroup]
    convs: Dict[str, Tuple[object, object]]
    compact_options: Callable[[Dict[str, int], Dict[str, Tuple[int, int]]], dict] = field(repr=False, default=None)

    def segments(self, side):
        """A conv side as a list of ``(group, positions)``; positions is None for a whole group."""
        return [(side, None)] if isinstance(side, str) else [(g, tuple(p)) for g, p in side]

    def side_width(self, side):
        """Number of channels of a conv side (int)."""
        return sum(self.groups[g].size if p is None else len(p) for g, p in self.segments(side))

    def partition(self):
        """The grouping as plain sets, to compare groupings that name groups differently.

        Returns:
            tuple: (frozenset of frozensets of ``(conv, 'in' | 'out', channel)`` atoms, one per
            prunable channel; frozenset of the fixed atoms).
        """
        channels, fixed = {}, set()
        for name, sides in self.convs.items():
            for role, side in zip(('in', 'out'), sides):
                channel = 0
                for group, positions in self.segments(side):
                    for p in (range(self.groups[group].size) if positions is None else positions):
                        if self.groups[group].prunable:
                            channels.setdefault((group, p), set()).add((name, role, channel))
                        else:
                            fixed.add((name, role, channel))
                        channel += 1
        return frozenset(frozenset(a) for a in channels.values()), frozenset(fixed)

    def validate(self, net):
        """Check the grouping against ``net``.

        Raises:
            ValueError: a conv of ``net`` has no entry, an entry names no conv of ``net`` or an
                unknown group, a group's size differs from the conv's channels, or a conv has
                ``groups != 1`` (grouped convs are not supported by the hypernetwork).
        """
        convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
        missing = sorted(set(convs) - set(self.convs))
        extra = sorted(set(self.convs) - set(convs))
        if missing or extra:
            raise ValueError(f'channel grouping does not match the network: convs without a group {missing}, '
                             f'grouped names that are not convs {extra}')
        for name, (g_in, g_out) in self.convs.items():
            conv = convs[name]
            if conv.groups != 1:
                raise ValueError(f'conv {name!r} has groups={conv.groups}; only groups=1 is supported')
            for role, side, channels in (('input', g_in, conv.in_channels), ('output', g_out, conv.out_channels)):
                for group, positions in self.segments(side):
                    if group not in self.groups:
                        raise ValueError(f'conv {name!r}: unknown {role} group {group!r}')
                    if positions is not None and not all(0 <= p < self.groups[group].size for p in positions):
                        raise ValueError(f'conv {name!r}: {role} positions outside group {group!r} '
                                         f'of {self.groups[group].size} channels')
                if self.side_width(side) != channels:
                    raise ValueError(f'conv {name!r}: {role} group(s) {side!r} have {self.side_width(side)} '
                                     f'channels, the conv has {channels}')


def lsrb_grouping(net, network_opt):
    """Hand-written channel groups of :class:`fmpsr.archs.lsrb_arch.LSRB` (REFERENCE.md sec. 3).

    One ``stream`` group is shared by the head conv, every block's second 3x3 conv, 1x1 conv and
    ESA conv4, and the after-body conv (they meet at the residual adds and the ESA multiply). Each
    block i adds four free groups: ``body_i_mid`` (first 3x3 conv), ``body_i_esa1`` (ESA conv1,
    read by conv2 and conv_f), ``body_i_esa2`` (ESA conv2), ``body_i_esa3`` (ESA conv3 and conv_f,
    which meet at an add). The RGB input and the upsampler output (``out*s*s`` channels before
    PixelShuffle) are fixed.

    Args:
        net (LSRB): the network (its current widths give the group sizes).
        network_opt (dict): its ``network_g`` options; kept keys are copied into the compact options.

    Returns:
        ChannelGrouping
    """
    groups = {
        INPUT: ChannelGroup(net.conv_first.in_channels, prunable=False),
        OUTPUT: ChannelGroup(net.upsampler.out_channels, prunable=False),
        'stream': ChannelGroup(net.conv_first.out_channels),
    }
    convs = {'conv_first': (INPUT, 'stream'), 'conv_after_body': ('stream', 'stream'), 'upsampler': ('stream', OUTPUT)}
    for i, block in enumerate(net.body):
        p, g = f'body.{i}', f'body_{i}_'
        groups[g + 'mid'] = ChannelGroup(block.conv1.out_channels)
        for j, conv in ((1, block.esa.conv1), (2, block.esa.conv2), (3, block.esa.conv3)):
            groups[f'{g}esa{j}'] = ChannelGroup(conv.out_channels)
        convs.update({
            f'{p}.conv1': ('stream', g + 'mid'),
            f'{p}.conv2': (g + 'mid', 'stream'),
            f'{p}.conv1x1': ('stream', 'stream'),
            f'{p}.esa.conv1': ('stream', g + 'esa1'),
            f'{p}.esa.conv_f': (g + 'esa1', g + 'esa3'),
            f'{p}.esa.conv2': (g + 'esa1', g + 'esa2'),
            f'{p}.esa.conv3': (g + 'esa2', g + 'esa3'),
            f'{p}.esa.conv4': (g + 'esa3', 'stream'),
        })
    num_block = len(net.body)

    def compact_options(kept, _conv_channels=None):
        opt = {k: v for k, v in network_opt.items() if k not in ('mid_feats', 'esa_feats')}
        opt.update(
            num_feat=kept['stream'],
            num_block=num_block,
            mid_feats=[kept[f'body_{i}_mid'] for i in range(num_block)],
            esa_feats=[[kept[f'body_{i}_esa{j}'] for j in (1, 2, 3)] for i in range(num_block)])
        return opt

    return ChannelGrouping(groups, convs, compact_options)


GROUPINGS = {'LSRB': lsrb_grouping}


GROUPING_MODES = ('hand', 'auto')


def build_grouping(net, network_opt, mode=None, example_input=None, ties=()):
    """Return the :class:`ChannelGrouping` of ``net`` (built from ``network_opt``).

    Args:
        net (nn.Module): the plain network.
        network_opt (dict): its ``network_g`` options (``type`` selects a hand-written grouping).
        mode (str | None): 'hand' (the arch's entry in :data:`GROUPINGS`), 'auto' (torch-pruning's
            dependency graph, :func:`fmpsr.pruning.coupling.auto_grouping`), or None: 'hand' when the
            arch has one, else 'auto'. An automatic grouping whose partition equals the arch's hand
            grouping is returned as the hand grouping (same groups, and the compact network is the
            arch with narrower widths instead of the generic ``CompactArch``).
        example_input (Tensor | None): (1, C_in, H, W) input for 'auto'.
        ties (sequence): ``pruning.tie_outputs`` for 'auto' (see ``auto_grouping``).

    Raises:
        KeyError: mode 'hand' for an arch with no hand-written grouping.
        ValueError: an unknown mode; ties with mode 'hand'; see ``auto_grouping`` and ``validate``.
    """
    arch = network_opt['type']
    mode = mode or ('hand' if arch in GROUPINGS else 'auto')
    if mode not in GROUPING_MODES:
        raise ValueError(f'pruning.grouping: unknown mode {mode!r} (choose from {list(GROUPING_MODES)})')
    hand = GROUPINGS[arch](net, network_opt) if arch in GROUPINGS else None
    if mode == 'hand':
        if hand is None:
            raise KeyError(f"network_g.type {arch!r}: no hand-written channel grouping is known for it "
                           f"(known: {sorted(GROUPINGS)}); use pruning.grouping: auto")
        if ties:
            raise ValueError('pruning.tie_outputs applies to pruning.grouping: auto only')
        grouping = hand
    else:
        from .coupling import auto_grouping
        grouping = auto_grouping(net, example_input, ties)
        if hand is not None and hand.partition() == grouping.partition():
            grouping = hand
    grouping.validate(net)
    return grouping
