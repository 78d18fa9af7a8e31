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
  narrower layers; None means the generic form (``CompactArch``: the arch plus per-conv widths);
* ``channel_params``: state-dict key of a per-channel parameter or buffer that sits between convs
  (PReLU's weight, BatchNorm's weight / bias / running stats, InstanceNorm's affine / stats, a bare
  ``(1, C, 1, 1)`` scale) -> the side (same format as a conv side) its channel dimension follows,
  so that finalize slices it with the channels it belongs to (:func:`channel_dim` says which
  dimension; issue 14);
* ``plain_convs``: convs left out of pruning (``pruning.exclude``, and every conv with a frozen
  parameter, ``requires_grad=False``): they stay plain dense layers with all their channels and
  their weights untouched, have no entry in ``convs`` and every channel coupled to them is fixed;
* ``transposed``: names of the ``nn.ConvTranspose2d`` layers of ``convs``. Their weight is
  ``(c_in, c_out, kh, kw)`` (input channels first, :func:`weight_dims`); their input channels are
  pruned like any reader's, their output channels are fixed (what they write is fixed).

Hand-written groupings live in :data:`GROUPINGS`, keyed by arch class name;
:func:`fmpsr.pruning.coupling.auto_grouping` finds the groups of any conv network with
torch-pruning's dependency graph. :meth:`ChannelGrouping.partition` compares two groupings.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

INPUT = 'input'
OUTPUT = 'output'

# the conv layers a grouping covers: a ConvTranspose2d's weight is (c_in, c_out / groups, kh, kw)
CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)


def is_conv(module):
    """True for the layers a channel grouping covers: ``nn.Conv2d`` and ``nn.ConvTranspose2d``."""
    return isinstance(module, CONV_TYPES)


def weight_dims(transposed):
    """``(output-channel dim, input-channel dim)`` of a conv weight: ``(0, 1)`` for ``nn.Conv2d``
    (weight ``(c_out, c_in, kh, kw)``), ``(1, 0)`` for ``nn.ConvTranspose2d`` (``(c_in, c_out, kh, kw)``)."""
    return (1, 0) if transposed else (0, 1)


def channel_weight_mask(m_in, m_out, transposed=False):
    """Bool ``(c_out, c_in, 1, 1)`` mask of the weights between kept channels, or ``(c_in, c_out, 1, 1)``
    for a transposed conv (the layout of its weight, broadcast over the kernel)."""
    rows, cols = (m_in, m_out) if transposed else (m_out, m_in)
    return (rows[:, None] & cols[None, :])[..., None, None]


def slice_weight(weight, m_in, m_out, transposed=False):
    """The weight of the kept channels: ``weight[m_out][:, m_in]`` (``[m_in][:, m_out]`` transposed)."""
    rows, cols = (m_in, m_out) if transposed else (m_out, m_in)
    return weight[rows.nonzero().flatten()][:, cols.nonzero().flatten()]


def frozen_names(net):
    """Names of the modules of ``net`` holding a frozen parameter (``requires_grad=False``) of their
    own, and of every frozen parameter (set of str). fmpsr leaves them exactly as they are: not
    pruned, not masked, their channels fixed (a fixed colour-normalisation conv, a frozen pretrained
    layer)."""
    names = set()
    for name, module in net.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                names.update((name, f'{name}.{pname}' if name else pname))
    names.discard('')
    return names


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels.

    Attributes:
        size (int): number of channels.
        prunable (bool): False for image input / output channels (never pruned).
    """
    size: int
    prunable: bool = True


# modules whose output is not zero where their input is (BN(0) = bias - mean * weight / std): the
# hypernetwork forward multiplies their output by the channel mask (see :func:`masked_output_modules`)
MASKED_OUTPUT_TYPES = (_BatchNorm, _InstanceNorm)


def channel_dim(shape):
    """The channel dimension of a per-channel tensor of ``shape``: 0 for a 1-D tensor, else its only
    dimension longer than 1 (e.g. 1 for a ``(1, C, 1, 1)`` scale); None when there is no such single
    dimension (the tensor is not per-channel)."""
    shape = tuple(shape)
    if len(shape) == 1:
        return 0
    long = [i for i, n in enumerate(shape) if n > 1]
    return long[0] if len(long) == 1 else None


@dataclass
class ChannelGrouping:
    """Groups of coupled channels of one network; see the module docstring."""
    groups: Dict[str, ChannelGroup]
    convs: Dict[str, Tuple[object, object]]
    compact_options: Callable[[Dict[str, int], Dict[str, Tuple[int, int]]], dict] = field(repr=False, default=None)
    channel_params: Dict[str, object] = field(default_factory=dict)
    plain_convs: Tuple[str, ...] = ()
    transposed: Tuple[str, ...] = ()

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
            ValueError: a conv of ``net`` has no entry (and is not in ``plain_convs``), an entry names
                no conv of ``net`` or an unknown group, a group's size differs from the conv's
                channels, a conv has ``groups != 1`` (grouped convs are not supported by the
                hypernetwork), ``transposed`` does not list exactly the ``nn.ConvTranspose2d`` of
                ``convs``, a conv with a frozen parameter is pruned (in ``convs``), or a
                ``channel_params`` key is not a per-channel tensor of ``net`` of its side's width.
        """
        convs = {name: m for name, m in net.named_modules() if is_conv(m)}
        missing = sorted(set(convs) - set(self.convs) - set(self.plain_convs))
        extra = sorted((set(self.convs) | set(self.plain_convs)) - set(convs))
        both = sorted(set(self.convs) & set(self.plain_convs))
        if both:
            raise ValueError(f'channel grouping: convs {both} are both pruned and left plain (plain_convs)')
        if missing or extra:
            raise ValueError(f'channel grouping does not match the network: convs without a group {missing}, '
                             f'grouped names that are not convs {extra}')
        transposed = sorted(n for n in self.convs if isinstance(convs[n], nn.ConvTranspose2d))
        if transposed != sorted(self.transposed):
            raise ValueError(f'channel grouping: transposed lists {sorted(self.transposed)}, the transposed convs '
                             f'of the network are {transposed}')
        frozen = sorted(set(self.convs) & frozen_names(net))
        if frozen:
            raise ValueError(f'channel grouping: convs {frozen} have frozen parameters (requires_grad=False) and '
                             'must be left plain (plain_convs), not pruned')
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
        state = net.state_dict()
        for key, side in self.channel_params.items():
            if key not in state:
                raise ValueError(f'channel grouping: channel_params names {key!r}, which is not a parameter or '
                                 'buffer of the network')
            dim = channel_dim(state[key].shape)
            for group, _ in self.segments(side):
                if group not in self.groups:
                    raise ValueError(f'channel_params {key!r}: unknown group {group!r}')
            if dim is None or state[key].shape[dim] != self.side_width(side):
                raise ValueError(f'channel_params {key!r}: shape {tuple(state[key].shape)} is not per-channel with '
                                 f'the {self.side_width(side)} channels of {side!r}')

    def refuse_transposed(self, method):
        """Refuse the transposed convs of the grouping for a method that cannot prune them.

        Args:
            method (str): the method, for the message (e.g. 'FMP / DHP (the hypernetwork generates
                nn.Conv2d weights only)').

        Raises:
            ValueError: one line naming the ``nn.ConvTranspose2d`` layers and the ``pruning.exclude``
                entry that leaves them plain dense layers (their input channels are then fixed).
        """
        if self.transposed:
            names = list(self.transposed)
            raise ValueError(f'{method} cannot prune the nn.ConvTranspose2d layer(s) {names}; leave them unpruned '
                             f'with pruning.exclude: {names}')

    def masked_output_modules(self, net):
        """Dict module name -> side of the modules holding ``channel_params`` whose output must be
        multiplied by the channel mask (:data:`MASKED_OUTPUT_TYPES`: BatchNorm, InstanceNorm map a
        zero channel to a constant, not to zero)."""
        out = {}
        for key, side in self.channel_params.items():
            module_name = key.rpartition('.')[0]
            if module_name not in out and isinstance(net.get_submodule(module_name), MASKED_OUTPUT_TYPES):
                out[module_name] = side
        return out


def lsrb_grouping(net, network_opt, per_boundary=False):
    """Hand-written channel groups of :class:`fmpsr.archs.lsrb_arch.LSRB` (REFERENCE.md sec. 3).

    LSRB's stream is cut into ``N + 1`` block boundaries (see the arch): boundary 0 is written by
    the head conv, block 0's ``conv2`` and the after-body conv (they meet at block 0's residual add
    and at the global skip); boundary i >= 1 is written by block i-1's ``conv1x1`` and ESA ``conv4``
    (they meet at the ESA multiply) and by block i's ``conv2`` (it meets the block input at the
    residual add). A block's output ``conv1x1(r) * ESA mask`` meets nothing of the block before, so
    no add or multiply joins two boundaries.

    * ``per_boundary=False`` (``pruning.grouping: hand``): one ``stream`` group for all boundaries.
      This is a tie chosen by the user (as in DHP's and FMP's single stream vector), not a necessity
      of the arch: every boundary keeps the same width and the same channel indices. The compact
      network is an LSRB with ``num_feat`` = the kept stream width.
    * ``per_boundary=True`` (:func:`lsrb_boundary_grouping`; what ``pruning.grouping: auto`` finds
      on LSRB): one group per boundary, ``stream_0`` ... ``stream_N``. Its partition equals that of
      :func:`fmpsr.pruning.coupling.auto_grouping` exactly; the compact network is an LSRB with
      ``stream_feats`` = the kept boundary widths (``num_feat`` only when they are all equal).

    Either way each block i adds four free groups: ``body_i_mid`` (first 3x3 conv), ``body_i_esa1``
    (ESA conv1, read by conv2 and conv_f), ``body_i_esa2`` (ESA conv2), ``body_i_esa3`` (ESA conv3
    and conv_f, which meet at an add). The RGB input and the upsampler output (``out*s*s`` channels
    before PixelShuffle) are fixed.

    Args:
        net (LSRB): the network (its current widths give the group sizes).
        network_opt (dict): its ``network_g`` options; kept keys are copied into the compact options.
        per_boundary (bool): one group per block boundary instead of one tied stream group.

    Returns:
        ChannelGrouping

    Raises:
        ValueError: ``per_boundary=False`` on a network whose block boundaries have different widths
            (``network_g.stream_feats``): they cannot share one vector.
    """
    num_block = len(net.body)
    widths = [net.conv_first.out_channels] + [block.conv1x1.out_channels for block in net.body]
    if per_boundary:
        stream = [f'stream_{i}' for i in range(num_block + 1)]
    else:
        if len(set(widths)) > 1:
            raise ValueError(f'pruning.grouping: hand ties every LSRB block boundary to one stream vector, but the '
                             f'network_g.stream_feats widths differ ({widths}); use pruning.grouping: auto '
                             '(one vector per boundary)')
        stream = ['stream'] * (num_block + 1)
    groups = {
        INPUT: ChannelGroup(net.conv_first.in_channels, prunable=False),
        OUTPUT: ChannelGroup(net.upsampler.out_channels, prunable=False),
    }
    for name, width in zip(stream, widths):
        groups[name] = ChannelGroup(width)
    convs = {'conv_first': (INPUT, stream[0]), 'conv_after_body': (stream[-1], stream[0]),
             'upsampler': (stream[0], OUTPUT)}
    for i, block in enumerate(net.body):
        p, g, s_in, s_out = f'body.{i}', f'body_{i}_', stream[i], stream[i + 1]
        groups[g + 'mid'] = ChannelGroup(block.conv1.out_channels)
        for j, conv in ((1, block.esa.conv1), (2, block.esa.conv2), (3, block.esa.conv3)):
            groups[f'{g}esa{j}'] = ChannelGroup(conv.out_channels)
        convs.update({
            f'{p}.conv1': (s_in, g + 'mid'),
            f'{p}.conv2': (g + 'mid', s_in),
            f'{p}.conv1x1': (s_in, s_out),
            f'{p}.esa.conv1': (s_out, g + 'esa1'),
            f'{p}.esa.conv_f': (g + 'esa1', g + 'esa3'),
            f'{p}.esa.conv2': (g + 'esa1', g + 'esa2'),
            f'{p}.esa.conv3': (g + 'esa2', g + 'esa3'),
            f'{p}.esa.conv4': (g + 'esa3', s_out),
        })

    def compact_options(kept, _conv_channels=None):
        opt = {k: v for k, v in network_opt.items() if k not in ('mid_feats', 'esa_feats', 'stream_feats')}
        stream_feats = [kept[name] for name in stream]
        opt.update(
            num_feat=stream_feats[0],
            num_block=num_block,
            mid_feats=[kept[f'body_{i}_mid'] for i in range(num_block)],
            esa_feats=[[kept[f'body_{i}_esa{j}'] for j in (1, 2, 3)] for i in range(num_block)])
        if len(set(stream_feats)) > 1:
            opt['stream_feats'] = stream_feats
        return opt

    return ChannelGrouping(groups, convs, compact_options)


def lsrb_boundary_grouping(net, network_opt):
    """:func:`lsrb_grouping` with one channel vector per LSRB block boundary (``per_boundary=True``)."""
    return lsrb_grouping(net, network_opt, per_boundary=True)


GROUPINGS = {'LSRB': lsrb_grouping}

# hand-written groupings that an automatic grouping (``pruning.grouping: auto``) is returned as when
# their partitions are equal (so the compact network is the arch itself, not ``CompactArch``); the
# arch's GROUPINGS entry is always tried first. LSRB: the tied stream (``auto`` with ``tie_outputs``)
# and one vector per block boundary (``auto`` alone).
AUTO_MATCHES = {'LSRB': (lsrb_boundary_grouping,)}


GROUPING_MODES = ('hand', 'auto')


def build_grouping(net, network_opt, mode=None, example_input=None, ties=(), exclude=()):
    """Return the :class:`ChannelGrouping` of ``net`` (built from ``network_opt``).

    Args:
        net (nn.Module): the plain network.
        network_opt (dict): its ``network_g`` options (``type`` selects a hand-written grouping).
        mode (str | None): 'hand' (the arch's entry in :data:`GROUPINGS`), 'auto' (torch-pruning's
            dependency graph, :func:`fmpsr.pruning.coupling.auto_grouping`), or None: 'hand' when the
            arch has one, else 'auto'. An automatic grouping whose partition equals the arch's hand
            grouping or one of its :data:`AUTO_MATCHES` is returned as that grouping (same groups, and
            the compact network is the arch with narrower widths instead of the generic
            ``CompactArch``); a candidate that does not apply to ``net`` (raises ValueError, e.g. the
            tied LSRB stream on unequal boundary widths) is skipped.
        example_input (Tensor | None): (1, C_in, H, W) input for 'auto'.
        ties (sequence): ``pruning.tie_outputs`` for 'auto' (see ``auto_grouping``).
        exclude (sequence): ``pruning.exclude`` for 'auto': module names or globs left out of pruning
            (see ``auto_grouping``).

    A network with a frozen conv (``requires_grad=False``) gets the automatic grouping by default:
    the frozen conv stays plain and its channels fixed.

    Raises:
        KeyError: mode 'hand' for an arch with no hand-written grouping.
        ValueError: an unknown mode; ties or exclude with mode 'hand'; mode 'hand' on a network with a
            frozen conv; see ``auto_grouping`` and
            ``validate``.
    """
    arch = network_opt['type']
    frozen_convs = sorted(n for n, m in net.named_modules() if is_conv(m) and n in frozen_names(net))
    mode = mode or ('hand' if arch in GROUPINGS and not frozen_convs else 'auto')
    if mode not in GROUPING_MODES:
        raise ValueError(f'pruning.grouping: unknown mode {mode!r} (choose from {list(GROUPING_MODES)})')
    if mode == 'hand':
        hand = GROUPINGS[arch](net, network_opt) if arch in GROUPINGS else None
        if hand is None:
            raise KeyError(f"network_g.type {arch!r}: no hand-written channel grouping is known for it "
                           f"(known: {sorted(GROUPINGS)}); use pruning.grouping: auto")
        if ties:
            raise ValueError('pruning.tie_outputs applies to pruning.grouping: auto only')
        if exclude:
            raise ValueError('pruning.exclude applies to pruning.grouping: auto only')
        if frozen_convs:
            raise ValueError(f'pruning.grouping: hand prunes every conv of {arch}, but {frozen_convs} have frozen '
                             'parameters (requires_grad=False), which stay as they are; use pruning.grouping: auto')
        grouping = hand
    else:
        from .coupling import auto_grouping
        grouping = auto_grouping(net, example_input, ties, exclude=exclude)
        candidates = ((GROUPINGS[arch],) if arch in GROUPINGS else ()) + tuple(AUTO_MATCHES.get(arch, ()))
        if candidates and not grouping.channel_params and not grouping.plain_convs:
            partition = grouping.partition()
            for build in candidates:
                try:
                    hand = build(net, network_opt)
                except ValueError:
                    continue
                if hand.partition() == partition:
                    grouping = hand
                    break
    grouping.validate(net)
    return grouping
