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
component is prunable when it is written by at least one conv, read by at least one conv and
touches no excluded module; otherwise it is an image input or output channel (or a dead end, or
excluded) and stays fixed.

Each conv side is then either a whole vector (the group name) or, where channels come from several
vectors (concatenation) or repeat (PixelShuffle), a tuple of ``(group, positions)`` segments; see
:class:`~fmpsr.pruning.grouping.ChannelGrouping`.

The PixelShuffle mapping uses torch-pruning's index-mapping objects (``_FlattenIndexMapping`` and
``Dependency.index_mapping``), which are not public API; setup.py pins torch-pruning to 1.6.x for that.

Per-channel parameters (issue 14). Modules torch-pruning prunes with a channel (PReLU with one
slope per channel, BatchNorm, InstanceNorm with affine weights or running stats) and bare
parameters with one channel dimension (a ``(1, C, 1, 1)`` scale) get atoms ``(name, 'ch', channel)``
too, tied like conv channels; their tensors are listed in ``ChannelGrouping.channel_params`` and
sliced by finalize. BatchNorm and InstanceNorm do not map a zero channel to zero, so the
hypernetwork multiplies their output by the channel mask (a forward hook; folding BN into the conv
before pruning would change the function a user trains and lose BN's training behaviour).

Frozen parameters (``requires_grad=False``, e.g. a fixed colour-normalisation 1x1 conv) are left
exactly as they are: the module holding one is treated as excluded (below), so its channels and every
channel coupled to them are fixed and a frozen conv stays a plain conv. torch-pruning follows autograd,
which records nothing for a frozen layer on the image input, so the trace runs with them thawed.

``nn.ConvTranspose2d`` (a transposed-conv upsampler, weight ``(c_in, c_out, kh, kw)``) is a conv of
the grouping (``ChannelGrouping.transposed``): its input channels are pruned like any reader's, its
output channels are fixed.

What cannot be coupled is refused with a ValueError naming the module and suggesting
``pruning.exclude``: grouped / depthwise convs (transposed too), convs never called as modules (their
weight is computed in forward: re-parameterised blocks), layers fmpsr does not prune (Linear,
LayerNorm, GroupNorm, ...) and ops outside :data:`SAFE_OPS` (``F.conv2d`` with a computed weight,
matmul, permute, softmax, channel means, PixelUnshuffle, ...) that sit between learned layers.
``exclude`` (module names or globs, a module excludes its submodules) leaves modules out: excluded
convs stay plain dense convs (``ChannelGrouping.plain_convs``) and every channel coupled to an
excluded module is fixed. The graph is cut at ops outside :data:`SAFE_OPS` (nothing is tied through
them); a channel that reaches one between learned layers must be fixed that way, or the arch is
refused. The trace runs on a batch of one image (torch-pruning would otherwise unpack the batch
and trace an unbatched input), and concatenations get their true input widths from one backward
pass (torch-pruning infers them as if every op kept the channel count).

Assumption (checked by the equality tests of every covered arch, and numerically for the user's
arch by :func:`check_prunable`): a pruned channel is exactly zero in the hypernetwork (every op
between convs maps zero to zero: ReLU, LeakyReLU, PReLU, pooling, interpolation, adds, ESA's and
RCAN's gates multiplied by a tied zero; BatchNorm is masked), and every reader of a channel is a conv
whose input column for a pruned channel is masked, so the compact network computes the same.
"""
import copy
import fnmatch
import json
import re
from collections import OrderedDict

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .grouping import ChannelGroup, ChannelGrouping, channel_dim, channel_weight_mask, frozen_names, is_conv

IN, OUT, CH = 'in', 'out', 'ch'

# autograd ops (grad_fn names without "Backward<N>") that act on each channel alone, so a channel's
# atoms may be tied through them; any other op between learned layers needs ``pruning.exclude``
SAFE_OPS = frozenset((
    'Add', 'Sub', 'Mul', 'Div', 'Neg', 'Relu', 'LeakyRelu', 'Threshold', 'Sigmoid', 'Tanh', 'Gelu', 'Silu',
    'Hardswish', 'Hardsigmoid', 'Hardtanh', 'Elu', 'Mish', 'Softplus', 'Clamp', 'ClampMin', 'ClampMax', 'Abs',
    'Pow', 'Sqrt', 'Rsqrt', 'Exp', 'Log', 'Reciprocal', 'MaxPool2DWithIndices', 'AvgPool2D', 'AdaptiveAvgPool2D',
    'AdaptiveMaxPool2D', 'UpsampleNearest2D', 'UpsampleNearestExact2D', 'UpsampleBilinear2D', 'UpsampleBicubic2D',
    'ConstantPadNd', 'ReflectionPad2D', 'ReplicationPad2D', 'PixelShuffle', 'Clone', 'ToCopy', 'Alias',
    'NativeDropout', 'Prelu', 'PreluKernel', 'Unknown',
    # batch norm over dim 1 (InstanceNorm runs it on a (1, B*C, H, W) view): per channel
    'NativeBatchNorm', 'NativeBatchNormLegit', 'NativeBatchNormLegitNoTraining', 'CudnnBatchNorm'))


# reductions and normalisations that are per-channel when their dims leave the channel dim (1) alone
REDUCTION_OPS = frozenset(('Mean', 'Sum', 'Amax', 'Amin', 'Max', 'Min', 'Std', 'Var', 'Softmax', 'LogSoftmax',
                           'LinalgVectorNorm', 'Norm', 'Logsumexp', 'Cumsum', 'Prod'))


def _safe_reduction(grad_fn):
    """True when an autograd reduction node reduces (or normalises) over dims other than the channel
    dim 1 of a tensor of at least 3 dims (spatial means of channel attention, spatial softmax)."""
    dims = getattr(grad_fn, '_saved_dim', None)
    shape = getattr(grad_fn, '_saved_self_sym_sizes', None)
    for attr in ('_saved_self', '_saved_result'):
        if shape is None and isinstance(getattr(grad_fn, attr, None), torch.Tensor):
            shape = tuple(getattr(grad_fn, attr).shape)
    if dims is None or shape is None or len(shape) not in (3, 4):
        return False
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return all((d - 2 ** 64 if d >= 2 ** 63 else d) % len(shape) != 1 for d in dims)


def _op_name(node):
    """Name of a torch-pruning node's autograd op without the ``Backward<N>`` suffix (e.g. 'Add')."""
    return re.sub(r'Backward\d*$', '', type(node.grad_fn).__name__) if node.grad_fn is not None else 'Unknown'


def _pixel_shuffle_factor(node):
    """Upscale factor r if the torch-pruning node is a PixelShuffle (module or functional), else None."""
    if isinstance(node.module, nn.PixelShuffle):
        return node.module.upscale_factor
    if node.grad_fn is not None and type(node.grad_fn).__name__.startswith('PixelShuffleBackward'):
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
            raise ValueError(_grouped_message(name, conv))
    return convs


def _grouped_message(name, conv):
    kind = 'depthwise' if conv.groups == conv.in_channels == conv.out_channels else 'grouped'
    return (f'conv {name!r} has groups={conv.groups}; only groups=1 is supported (the hypernetwork generates '
            f'dense kernels, a {kind} conv has none). Leave it and its channels unpruned with '
            f'pruning.exclude: [{name!r}]')


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


def excluded_names(net, patterns):
    """Names of the modules and parameters of ``net`` that ``pruning.exclude`` leaves out.

    A pattern (``fnmatch`` glob) excludes every module or parameter whose name, or the name of one of
    whose parent modules, it matches (so ``body.3`` excludes the whole block).

    Raises:
        ValueError: a pattern that matches no module or parameter name (the pattern is named).
    """
    names = [n for n, _ in net.named_modules() if n] + [n for n, _ in net.named_parameters()]
    excluded = set()
    for pattern in patterns or ():
        if not isinstance(pattern, str):
            raise ValueError(f'pruning.exclude: {pattern!r} is not a module name or glob')
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f'pruning.exclude: pattern {pattern!r} matches no module of the network')
        excluded.update(hits)
    return {n for n in names if any(n == e or n.startswith(e + '.') for e in excluded)}


def per_channel_tensors(module):
    """Names of the per-channel parameters / buffers of ``module`` that finalize slices (list), or
    None when fmpsr does not prune through modules of its type. PReLU: ``weight`` when it has one
    slope per channel; BatchNorm, InstanceNorm: ``weight``, ``bias`` (affine) and ``running_mean``,
    ``running_var`` (tracked statistics)."""
    if isinstance(module, nn.PReLU):
        return ['weight'] if module.num_parameters > 1 else []
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        names = ['weight', 'bias'] if module.affine else []
        return names + (['running_mean', 'running_var'] if module.track_running_stats else [])
    return None


def _layer_nodes(graph, start, forward):
    """Whether a learned layer (conv or linear module) lies downstream (``forward``) or upstream of the
    torch-pruning node ``start``."""
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        for nxt in (node.outputs if forward else node.inputs):
            if nxt in seen:
                continue
            if isinstance(nxt.module, (nn.modules.conv._ConvNd, nn.Linear)):
                return True
            seen.add(nxt)
            stack.append(nxt)
    return False


def _set_concat_sizes(graph, output, net):
    """Give torch-pruning's concatenation nodes their true input widths, recorded in one backward pass.

    torch-pruning infers a concatenation's input widths by walking back to the nearest layer and
    treats every op on the way as width-preserving, which is wrong after an op that changes the
    channel count (a channel mean with keepdim, CBAM's ``cat([mean, max])``); the real widths come
    from the gradient each node receives."""
    widths, handles = {}, []
    cats = [n for n in graph.module2node.values() if n.type == type(n.type).CONCAT]
    wanted = {i for n in cats for i in n.inputs if i.grad_fn is not None}
    for node in wanted:
        def record(grads, node=node):  # several used outputs (a split's chunks): torch-pruning sizes them
            used = [g for g in grads if g is not None]
            if len(used) == 1 and used[0].dim() >= 2:
                widths[node] = int(used[0].shape[1])
        try:
            handles.append(node.grad_fn.register_prehook(record))
        except (AttributeError, RuntimeError):
            pass
    roots = [t for t in _tensors(output) if t.requires_grad]
    params = [p for p in net.parameters() if p.requires_grad]
    try:
        if handles and roots and params:
            torch.autograd.grad(sum(t.sum() for t in roots), params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    from torch_pruning.dependency.shape_infer import infer_channels_between

    for node in cats:
        sizes = [widths.get(i) or infer_channels_between(graph, i, node) for i in node.inputs]
        if all(isinstance(w, int) for w in sizes):
            node.module.concat_sizes = sizes


def auto_grouping(net, example_input, ties=(), exclude=()):
    """Find the channel groups of ``net`` with torch-pruning's DependencyGraph (see module docstring).

    Args:
        net (nn.Module): a plain conv network (not modified; it runs one forward pass on
            ``example_input`` with autograd recording).
        example_input (Tensor): (1, C_in, H, W) input; H, W in LR pixels, large enough for the arch.
        ties (sequence): extra couplings, each a list of conv names or globs whose outputs must share
            one channel vector (e.g. LSRB's single stream width: ``[conv_first, 'body.*.conv1x1']``).
        exclude (sequence): ``pruning.exclude``: module names or globs left out of pruning (see the
            module docstring); excluded convs are listed in ``plain_convs``.

    Returns:
        ChannelGrouping: groups named after the first conv writing them (``conv_first``,
        ``body_0_conv1``, ...); fixed groups are named ``<conv>_in`` / ``<conv>`` for image channels.
        It has no ``compact_options``: finalize builds the generic ``CompactArch``.

    Raises:
        ValueError: grouped convs, convs not called as modules, layers or ops fmpsr cannot prune
            across (named, with the ``pruning.exclude`` entry that allows the rest to be pruned), an
            exclude or tie pattern that matches nothing, tied convs of different widths, or a mapping
            that lands outside a conv's channels (an op torch-pruning mistakes for element-wise).
    """
    import torch_pruning as tp

    frozen = frozen_names(net)
    excluded = excluded_names(net, exclude) | frozen
    all_convs = OrderedDict((n, m) for n, m in net.named_modules() if is_conv(m))
    convs = OrderedDict((n, m) for n, m in all_convs.items() if n not in excluded)
    for name, conv in convs.items():
        if conv.groups != 1:
            raise ValueError(_grouped_message(name, conv))
    transposed = tuple(n for n, m in convs.items() if isinstance(m, nn.ConvTranspose2d))
    conv_names = {conv: name for name, conv in all_convs.items()}
    module_names = {m: n for n, m in net.named_modules()}
    param_names = {id(p): n for n, p in net.named_parameters()}
    was_training = net.training
    net.eval()
    outputs = []

    def forward(model, inputs):
        outputs.append(model(*inputs))
        return outputs[-1]

    # torch-pruning follows autograd: a frozen parameter records no graph (a frozen conv on the image
    # would look uncalled and its ties to the rest would be lost), so it is traced as trainable
    thawed = [p for p in net.parameters() if not p.requires_grad]
    try:
        for p in thawed:
            p.requires_grad_(True)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=(example_input,), forward_fn=forward,
                                                          verbose=False)
            _set_concat_sizes(graph, outputs[0], net)
    finally:
        for p in thawed:
            p.requires_grad_(False)
        net.train(was_training)
    outputs.clear()  # drop the traced graph
    _map_pixel_shuffle(graph)
    nodes = graph.module2node
    uncalled = [n for n, m in convs.items() if m not in nodes]
    if uncalled:
        raise ValueError(f'conv(s) {uncalled} are never called as modules in the forward pass: the arch computes '
                         'their weights in forward (a re-parameterised block) or does not use them, so their '
                         f'channels cannot be traced. Leave them unpruned with pruning.exclude: {uncalled}')

    # ops outside SAFE_OPS: cut the graph there (nothing is tied through them)
    opaque = {}
    for node in nodes.values():
        if isinstance(node.module, tp.ops._ElementWiseOp) and _pixel_shuffle_factor(node) is None:
            op = _op_name(node)
            if op not in SAFE_OPS and not (op in REDUCTION_OPS and _safe_reduction(node.grad_fn)):
                hint = {'PixelUnshuffle': ' (PixelUnshuffle turns each channel into r*r channels)',
                        'Convolution': ' (a convolution whose weight is not a conv module\'s: computed in forward, '
                                       'e.g. a re-parameterised block)'}.get(op, '')
                opaque[node] = f'the op {op}{hint}'
                node.dependencies = []

    # channel atoms: conv sides, per-channel modules and per-channel bare parameters
    channel_modules = OrderedDict()  # name -> (width, tensor names or None for a bare parameter)
    for name, module in net.named_modules():
        tensors = per_channel_tensors(module)
        if tensors and module in nodes:
            channel_modules[name] = (getattr(module, tensors[0]).shape[0], tensors)
    bad_params = {}
    for node in nodes.values():
        if node.type == tp.ops.OPTYPE.PARAMETER:
            pname = param_names.get(id(node.module), str(tuple(node.module.shape)))
            dim = channel_dim(node.module.shape)
            if dim is None:
                bad_params[node] = pname
            else:
                channel_modules[pname] = (node.module.shape[dim], None)
    atoms = {}  # (name, side, channel) -> node index of the tie graph
    for name, conv in all_convs.items():
        for side, width in ((IN, conv.in_channels), (OUT, conv.out_channels)):
            for ch in range(width):
                atoms[(name, side, ch)] = len(atoms)
    for name, (width, _) in channel_modules.items():
        for ch in range(width):
            atoms[(name, CH, ch)] = len(atoms)
    fixed_atoms = {a for a in atoms if a[0] in excluded}
    # a transposed conv's outputs stay (its input channels are pruned like any reader's)
    fixed_atoms.update(a for a in atoms if a[0] in transposed and a[1] == OUT)
    needs_exclude = OrderedDict()  # atom -> (what it touches, the exclude entry suggested)
    between_layers = {}  # opaque node -> whether learned layers lie both before and after it
    ties_a, ties_b = [], []

    def tie(a, b):
        ties_a.append(atoms[a])
        ties_b.append(atoms[b])

    for name, conv in all_convs.items():
        if conv not in nodes:
            continue
        # rooted at the outputs and at the inputs: torch-pruning keeps one root per target channel, so a
        # many-to-one map (r*r conv outputs -> one PixelShuffle channel) is complete only from the input side
        for root_side, fn, width in ((OUT, tp.prune_conv_out_channels, conv.out_channels),
                                     (IN, tp.prune_conv_in_channels, conv.in_channels)):
            group = graph.get_pruning_group(conv, fn, idxs=list(range(width)))
            for item in group.items:
                target_node = item.dep.target
                module = target_node.module
                roots = [(name, root_side, int(r)) for r in item.root_idxs]
                if module in conv_names or id(module) in param_names or module in module_names:
                    target = conv_names.get(module) or param_names.get(id(module)) or module_names.get(module)
                else:
                    target = None
                if module in conv_names:
                    side = OUT if graph.is_out_channel_pruning_fn(item.dep.handler) else IN
                    limit = getattr(module, 'out_channels' if side == OUT else 'in_channels')
                elif target in channel_modules:
                    side, limit = CH, channel_modules[target][0]
                elif target_node in opaque:  # it matters only between learned layers (not on the image, a weight)
                    if target_node not in between_layers:
                        between_layers[target_node] = (_layer_nodes(graph, target_node, forward=True)
                                                       and _layer_nodes(graph, target_node, forward=False))
                    if between_layers[target_node]:
                        for a in roots:
                            needs_exclude.setdefault(a, (opaque[target_node], None))
                    continue
                elif target is not None and target in excluded:
                    fixed_atoms.update(roots)
                    continue
                elif target_node in bad_params or (isinstance(module, nn.Module) and target is not None
                                                   and per_channel_tensors(module) is None
                                                   and any(True for _ in module.parameters(recurse=False))):
                    what = (f'the parameter {target!r} of shape {tuple(module.shape)}' if target_node in bad_params
                            else f'{type(module).__name__} {target!r}, a layer fmpsr does not prune')
                    for a in roots:
                        needs_exclude.setdefault(a, (what, target))
                    continue
                else:
                    continue
                for idx, root in zip(item.idxs, item.root_idxs):
                    if not 0 <= int(idx) < limit:
                        raise ValueError(f'automatic channel coupling mapped {name!r} {root_side}put channel '
                                         f'{int(root)} to {target!r} {side} channel {int(idx)} of {limit}: an op '
                                         'between them changes the channel layout in a way torch-pruning does not '
                                         f'model. Leave them unpruned with pruning.exclude: [{name!r}]')
                    tie((name, root_side, int(root)), (target, side, int(idx)))
    for tied in expand_ties(ties, list(all_convs)):
        widths = {n: all_convs[n].out_channels for n in tied}
        if len(set(widths.values())) > 1:
            raise ValueError(f'pruning.tie_outputs: tied convs have different output widths {widths}')
        for other in tied[1:]:
            for ch in range(widths[other]):
                tie((tied[0], OUT, ch), (other, OUT, ch))

    tie_graph = coo_matrix((np.ones(len(ties_a)), (ties_a, ties_b)), shape=(len(atoms), len(atoms)))
    _, labels = connected_components(tie_graph, directed=False)
    component = {atom: int(labels[i]) for atom, i in atoms.items()}
    sides, fixed_comps = {}, {component[a] for a in fixed_atoms}
    for atom, comp in component.items():
        sides.setdefault(comp, set()).add(atom[1])
    problems = OrderedDict()
    for atom, (what, suggest) in needs_exclude.items():
        if component[atom] not in fixed_comps:
            problems.setdefault(what, (suggest, []))
            if atom[0] not in problems[what][1]:
                problems[what][1].append(atom[0])
    if problems:
        def listed(names, limit=12):
            return str(names) if len(names) <= limit else f'{str(names[:limit])[:-1]}, ... ({len(names) - limit} more)]'

        lines = [f'{what} reads or writes channels of {listed(names)} (they cannot be pruned across it); leave them '
                 f'unpruned with pruning.exclude: {[suggest] if suggest else listed(names)}'
                 for what, (suggest, names) in problems.items()]
        raise ValueError('; '.join(lines))

    def prunable(comp):
        return IN in sides[comp] and OUT in sides[comp] and comp not in fixed_comps

    position, groups = {}, OrderedDict()

    def assign(comps, group_name):
        fresh = [c for c in dict.fromkeys(comps) if c not in position]
        if not fresh:
            return
        flags = {prunable(c) for c in fresh}
        for flag in sorted(flags, reverse=True):  # a conv side rarely mixes both kinds (an excluded slice)
            part = [c for c in fresh if prunable(c) == flag]
            name = group_name if flag or len(flags) == 1 else group_name + '_fixed'
            for i, c in enumerate(part):
                position[c] = (name, i)
            groups[name] = ChannelGroup(len(part), prunable=flag)

    for name, conv in all_convs.items():
        assign([component[(name, OUT, ch)] for ch in range(conv.out_channels)], name.replace('.', '_'))
    for name, conv in all_convs.items():  # channels no conv writes: the image input
        assign([component[(name, IN, ch)] for ch in range(conv.in_channels)], name.replace('.', '_') + '_in')
    for name, (width, _) in channel_modules.items():  # channels no conv touches
        assign([component[(name, CH, ch)] for ch in range(width)], name.replace('.', '_') + '_ch')

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
    channel_params = OrderedDict()
    for name, (width, tensors) in channel_modules.items():
        side = side_of(name, CH, width)
        for tensor in (tensors if tensors is not None else [None]):
            channel_params[name if tensor is None else f'{name}.{tensor}'] = side
    used = set()
    for side in list(channel_params.values()) + [s for pair in conv_sides.values() for s in pair]:
        used.update([side] if isinstance(side, str) else [g for g, _ in side])
    groups = OrderedDict((g, v) for g, v in groups.items() if g in used)
    plain = tuple(n for n in all_convs if n not in convs)
    return ChannelGrouping(dict(groups), conv_sides, None, dict(channel_params), plain, transposed)


# ---- the option check: refuse what cannot be coupled, before any experiment folder exists ----
def input_channels(net, network_opt):
    """Image channels the arch reads: ``num_in_ch`` (or ``in_channels``, ``in_chans``, ``in_nc``) of
    its options, else the first conv's input channels, else 3."""
    for key in ('num_in_ch', 'in_channels', 'in_chans', 'in_nc'):
        if isinstance(network_opt.get(key), int):
            return network_opt[key]
    first = next((m for m in net.modules() if is_conv(m)), None)
    return first.in_channels if first is not None else 3


def check_prunable(network_opt, macs_input_size=(64, 64), ties=(), exclude=(), mode=None, build_network=None,
                   numeric=True, seed=0):
    """Check that fmpsr can prune ``network_g`` as configured; raise a clear error if not (issue 14).

    For an automatic grouping (``pruning.grouping: auto``, the default for archs without a
    hand-written one) this builds the arch and its grouping (:func:`auto_grouping`, which refuses
    grouped convs, convs computed in forward, layers and ops it cannot prune across), checks that
    training and evaluation mode call the same convs, and, with ``numeric``, that the compact network
    computes what the masked network computes: in float64, with random weights and random channel
    masks, the network with pruned channels zeroed (and BatchNorm outputs masked, as the
    hypernetwork does) is finalized (:func:`~fmpsr.pruning.finalize.finalize_plain`) and both are
    run on a random input of ``macs_input_size`` (cut to 32x32 pixels where the arch runs on that).
    An op that mixes channels in a way the dependency graph does not describe, or a parameter or
    buffer sized by pruned channels that is not coupled to them, shows up there; it is located at the
    first conv whose input differs (or the last conv that ran). A hand-written grouping is only built.

    Args:
        network_opt (dict): ``network_g`` options (with ``type``).
        macs_input_size (sequence[int]): LR (H, W) in pixels of the traced input (``pruning.macs_input_size``).
        ties (sequence): ``pruning.tie_outputs``.
        exclude (sequence): ``pruning.exclude``.
        mode (str | None): ``pruning.grouping`` ('hand', 'auto' or None: 'hand' where the arch has one).
        build_network (callable | None): options -> nn.Module; default BasicSR's ``build_network``.
        numeric (bool): run the float64 comparison (two forward passes of the network).
        seed (int): seed of the check's own random generator (the global RNG is not touched).

    Returns:
        ChannelGrouping: the grouping of the arch as built from ``network_opt``. A passed check is
        remembered for the process (same options, default ``build_network``): several option files
        of one network are checked once. Do not modify the returned grouping.

    Raises:
        ValueError: ``pruning: network_g.type '<arch>' cannot be pruned as configured: <reason>``,
            where the reason names the module and suggests ``pruning.exclude`` / ``tie_outputs``.
        KeyError: ``mode`` 'hand' for an arch without a hand-written grouping.
    """
    from .grouping import GROUPINGS, build_grouping

    key = None
    if build_network is None:
        from basicsr.archs import build_network
        key = json.dumps([network_opt, list(macs_input_size), ties, exclude, mode, numeric, seed], sort_keys=True,
                         default=str)
        if key in _PASSED:
            return _PASSED[key]
    arch = network_opt.get('type')
    net = build_network(copy.deepcopy(dict(network_opt)))
    mode = mode or ('hand' if arch in GROUPINGS else 'auto')
    example = torch.zeros(1, input_channels(net, network_opt), *macs_input_size)
    try:
        grouping = build_grouping(net, network_opt, mode, example, ties, exclude=exclude)
        if mode == 'auto':
            example = _small_example(net, example)
            _check_train_and_eval_call_the_same_convs(net, grouping, example)
            if numeric:
                _check_compact_equals_masked(net, grouping, network_opt, build_network, example, seed)
    except ValueError as error:
        raise ValueError(f'pruning: network_g.type {arch!r} cannot be pruned as configured: {error}') from error
    except (RuntimeError, TypeError, AssertionError) as error:  # the arch's own forward failed
        raise ValueError(f'pruning: network_g.type {arch!r} cannot be pruned as configured: its forward pass on a '
                         f'{tuple(example.shape)} input (pruning.macs_input_size) failed: {error}') from error
    if key is not None:
        _PASSED[key] = grouping
    return grouping


_PASSED = {}  # check_prunable's passed checks: options (JSON) -> grouping


def _small_example(net, example, limit=32):
    """``example`` cut to at most ``limit`` pixels a side when the arch runs on that (the float64 checks
    then take a fraction of the time at a 64x64 ``macs_input_size``), else ``example`` itself."""
    small = example[..., :limit, :limit]
    if small.shape == example.shape:
        return example
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(small)
        return small
    except Exception:  # noqa: BLE001 (any failure: the arch needs the full size)
        return example
    finally:
        net.train(was_training)


def _called_convs(net, x, training):
    called = []
    hooks = [m.register_forward_pre_hook(lambda _m, _i, name=name: called.append(name))
             for name, m in net.named_modules() if is_conv(m)]
    was_training = net.training
    try:
        net.train(training)
        with torch.no_grad():
            net(x)
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return set(called)


def _check_train_and_eval_call_the_same_convs(net, grouping, example):
    """The grouping is traced in eval mode and the hypernetwork trains in training mode: both must run
    the same convs (re-parameterised blocks often switch branches with ``self.training``)."""
    net = copy.deepcopy(net)  # training mode updates BatchNorm statistics
    differ = sorted((_called_convs(net, example, True) ^ _called_convs(net, example, False)) & set(grouping.convs))
    if differ:
        raise ValueError(f'conv(s) {differ} run in only one of training and evaluation mode: the forward pass '
                         'differs between the two (a re-parameterised block?), so the traced channel groups would not '
                         f'hold while training. Leave them unpruned with pruning.exclude: {differ}')


@torch.no_grad()
def _randomize_(net, generator):
    """Random float64 weights (U(+-sqrt(3 / fan_in))), 1-D parameters U(-1, 1) and BatchNorm statistics
    (mean U(-0.5, 0.5), var U(0.5, 1.5)), drawn from ``generator``: a zero-initialised layer could
    otherwise hide a difference."""
    for p in net.parameters():
        r = torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1
        p.copy_(r * (3.0 / max(p[0].numel(), 1)) ** 0.5 if p.dim() > 1 else r)
    for m in net.modules():
        if isinstance(m, (_BatchNorm, _InstanceNorm)) and m.track_running_stats and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator, dtype=torch.float64) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator, dtype=torch.float64) + 0.5)


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return []


def _check_compact_equals_masked(net, grouping, network_opt, build_network, example, seed, tolerance=1e-9):
    """See :func:`check_prunable`: finalize a randomly masked float64 copy and compare outputs."""
    from .finalize import conv_channel_masks, finalize_plain, side_mask
    from .hypernet import ChannelOutputMask

    generator = torch.Generator().manual_seed(seed)
    dense = copy.deepcopy(net).to(torch.float64).eval()
    _randomize_(dense, generator)
    masks = {}
    for name, group in grouping.groups.items():
        keep = torch.ones(group.size, dtype=torch.bool)
        if group.prunable and group.size > 1:
            keep = torch.rand(group.size, generator=generator) < 0.5
            keep[int(torch.randint(group.size, (1,), generator=generator))] = True
            keep[int(torch.randint(group.size, (1,), generator=generator))] = False if keep.sum() > 1 else True
        masks[name] = keep
    sides = conv_channel_masks(grouping, masks)
    with torch.no_grad():
        for name, (m_in, m_out) in sides.items():
            conv = dense.get_submodule(name)
            conv.weight.mul_(channel_weight_mask(m_in, m_out, name in grouping.transposed).to(conv.weight.dtype))
            if conv.bias is not None:
                conv.bias.mul_(m_out.to(conv.bias.dtype))
    for name, side in grouping.masked_output_modules(dense).items():
        dense.get_submodule(name).register_forward_hook(ChannelOutputMask(side_mask(grouping, side, masks)))
    try:
        compact = finalize_plain(dense, grouping, masks, build_network, network_opt)[0].eval()
    except (RuntimeError, ValueError) as error:
        raise ValueError(f'the compact network cannot be built: {error}') from error
    inputs = {'dense': OrderedDict(), 'compact': {}}
    hooks = []
    for key, model in (('dense', dense), ('compact', compact)):
        for name, m in model.named_modules():
            if is_conv(m):
                hooks.append(m.register_forward_pre_hook(
                    lambda _m, args, name=name, key=key: (inputs[key].setdefault(name, args[0].detach()), None)[1]))
    last = ['none']
    hooks += [m.register_forward_hook(lambda *_, name=name: last.__setitem__(0, repr(name)))
              for name, m in compact.named_modules() if is_conv(m)]
    x = torch.rand(example.shape, generator=generator, dtype=torch.float64)
    try:
        with torch.no_grad():
            expected = _tensors(dense(x))
            try:
                got = _tensors(compact(x))
            except RuntimeError as error:
                raise ValueError(f'the compact network does not run ({error}; the last conv that ran is {last[0]}): '
                                 'a parameter, buffer or size written in the forward code (e.g. torch.split sizes) '
                                 'depends on pruned channels; leave the convs around it unpruned with '
                                 'pruning.exclude') from error
    finally:
        for h in hooks:
            h.remove()

    def differs(a, b):
        return a.shape != b.shape or float((a - b).abs().max()) > tolerance * max(float(a.abs().max()), 1e-30)

    if len(expected) == len(got) and not any(differs(a, b) for a, b in zip(expected, got)):
        return
    where = 'after the last conv (between the convs and the output)'
    for name, dense_in in inputs['dense'].items():
        if name in sides:
            dense_in = dense_in[:, sides[name][0]]
        if name in inputs['compact'] and differs(dense_in, inputs['compact'][name]):
            where = (f'first at the input of conv {name!r}; leave it unpruned with pruning.exclude: [{name!r}] (or '
                     'exclude the module holding the op before it)')
            break
    raise ValueError('with random weights and channel masks the compact network does not compute what the masked '
                     'network computes: an op does not map a pruned (zero) channel to zero, or mixes channels in a '
                     f'way the dependency graph does not describe. It differs {where}')
