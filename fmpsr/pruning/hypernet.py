"""Turn a plain conv network into its FMP hypernetwork form (FMP Sec. 3.3, Fig. 3).

:class:`HyperNetwork` takes a plain network and its :class:`~fmpsr.pruning.grouping.ChannelGrouping`,
replaces every ``nn.Conv2d`` of ``grouping.convs`` (all but the ``plain_convs`` that
``pruning.exclude`` leaves dense) by a :class:`~fmpsr.pruning.hyperconv.HyperConv2d` under the same
module name, and owns one :class:`~fmpsr.pruning.hyperconv.ChannelVector` per group. Everything
else of the network (activations, PixelShuffle, ESA's pooling) is untouched, so the hypernetwork
computes the plain network's function with generated weights. Modules with per-channel parameters
that do not map a zero channel to zero (BatchNorm, InstanceNorm) have their output multiplied by the
channel mask (:class:`ChannelOutputMask`), so pruned channels stay exactly zero (issue 14).
"""
import torch
from torch import nn

from .hyperconv import ChannelMap, ChannelVector, HyperBank, HyperConv2d


class HyperNetwork(nn.Module):
    """A plain network with hypernetwork convs and shared channel vectors.

    Args:
        net (nn.Module): the plain network; modified in place (its convs are replaced).
        grouping (ChannelGrouping): channel groups of ``net`` (validated here).
        embed_dim (int): hypernetwork embedding size m (DHP default 8).

    Attributes:
        net (nn.Module): the converted network; ``forward`` calls it.
        channel_vectors (nn.ModuleDict): group name -> ChannelVector.

    Shapes: as ``net``.

    Raises:
        ValueError: the grouping does not match ``net`` (see ``ChannelGrouping.validate``).
    """

    def __init__(self, net, grouping, embed_dim=8):
        super().__init__()
        grouping.validate(net)
        self.grouping = grouping
        self.channel_vectors = nn.ModuleDict(
            {name: ChannelVector(g.size, g.prunable) for name, g in grouping.groups.items()})
        shapes = {}
        for name in grouping.convs:
            conv = net.get_submodule(name)
            shapes.setdefault((conv.out_channels, conv.in_channels, *conv.kernel_size), []).append(name)
        self.banks = nn.ModuleList([HyperBank(len(names), *shape[:2], shape[2:], embed_dim)
                                    for shape, names in shapes.items()])
        self._bank_members = []
        for bank, names in zip(self.banks, shapes.values()):
            members = []
            for index, name in enumerate(names):
                g_in, g_out = grouping.convs[name]
                conv = net.get_submodule(name)
                hyper = HyperConv2d(self._side(g_in), self._side(g_out), conv.kernel_size,
                                    conv.stride, conv.padding, conv.dilation, conv.bias is not None, embed_dim,
                                    bank=bank, index=index)
                parent_name, _, child = name.rpartition('.')
                setattr(net.get_submodule(parent_name) if parent_name else net, child, hyper)
                members.append(hyper)
            self._bank_members.append(members)
        self.net = net
        self._mask_channel_outputs(grouping)

    def _mask_channel_outputs(self, grouping):
        """Per-channel modules that do not map a zero channel to zero (BatchNorm, InstanceNorm: see
        ``ChannelGrouping.masked_output_modules``) get a forward hook multiplying their output by the
        channel mask, so a pruned channel is exactly zero after them, as it is absent from the compact
        network (issue 14). Their parameters themselves are left whole until finalize slices them."""
        for name, side in grouping.masked_output_modules(self.net).items():
            self.net.get_submodule(name).register_forward_hook(ChannelOutputMask(self._side(side)))

    def _side(self, side):
        """A conv side (group name or segments, see ChannelGrouping) as a ChannelVector or ChannelMap."""
        if isinstance(side, str):
            return self.channel_vectors[side]
        return ChannelMap([(self.channel_vectors[g], p) for g, p in self.grouping.segments(side)])

    def forward(self, *args, **kwargs):
        """Generate every conv weight, one batched chain per bank (conv shape), then run the network."""
        masked = {id(v): v.z * v.mask for v in self.channel_vectors.values()}
        members_of = self._bank_members
        try:
            for bank, members in self.bank_members():
                z_out = torch.stack([c.out_vector.masked_z(masked) for c in members])
                z_in = torch.stack([c.in_vector.masked_z(masked) for c in members])
                keep = torch.stack([c.keep_mask() for c in members])
                weights = bank.generate(z_out, z_in, keep)
                for index, conv in enumerate(members):
                    conv.batched_weight = weights[index]
            return self.net(*args, **kwargs)
        finally:
            for members in members_of:
                for conv in members:
                    conv.batched_weight = None

    def bank_members(self):
        """Yield ``(HyperBank, [HyperConv2d, ...])``: each bank with its convs in bank order."""
        return zip(self.banks, self._bank_members)

    def hyper_convs(self):
        """Yield ``(name, HyperConv2d)`` in ``grouping.convs`` order (names as in the plain network)."""
        for name in self.grouping.convs:
            yield name, self.net.get_submodule(name)

    @torch.no_grad()
    def convert_optimizer_state(self, optimizer):
        """Permute ``optimizer``'s per-parameter state tensors (Adam's moments) of the banks whose
        checkpoint was loaded in the layout before issue 11 (``HyperBank.old_layout_loaded``) to the
        stored layout; everything else is left alone. Call after ``optimizer.load_state_dict``.

        Raises:
            ValueError: such a state tensor does not have the old layout's shape.
        """
        owners = {id(getattr(bank, name)): (bank, name) for bank in self.banks if bank.old_layout_loaded
                  for name in bank.OLD_LAYOUT}
        for group in optimizer.param_groups:
            for param in group['params']:
                if id(param) not in owners or param not in optimizer.state:
                    continue
                bank, name = owners[id(param)]
                state = optimizer.state[param]
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        state[key] = bank.from_old_layout(name, value)

    def prunable_vectors(self):
        """The ChannelVectors that may be pruned (list)."""
        return [v for v in self.channel_vectors.values() if v.prunable]

    def parameter_groups(self):
        """Split the parameters for the optimiser (FMP Sec. 3.4).

        Returns:
            dict: ``hyper`` (the banks' W1, W2, B0..B2 and conv biases: SGD/Adam with weight decay,
            Eq. 8), ``channel`` (channel vectors: proximal gradient, Eqs. 9-10), ``weight`` (the banks'
            weight indicators: SGD/Adam with lambda_W R(Z_W), Sec. 3.4).
        """
        channel = [v.z for v in self.channel_vectors.values()]
        weight = [bank.weight_indicator for bank in self.banks]
        taken = {id(p) for p in channel + weight}
        hyper = [p for p in self.parameters() if id(p) not in taken]
        return {'hyper': hyper, 'channel': channel, 'weight': weight}

    def kept_channels(self):
        """Dict group name -> number of kept channels (int)."""
        return {name: v.kept() for name, v in self.channel_vectors.items()}

    @torch.no_grad()
    def kept_conv_channels(self):
        """Two dicts conv name -> kept input channels, kept output channels (ints)."""
        kept_in, kept_out = {}, {}
        for name, conv in self.hyper_convs():
            kept_in[name] = int(conv.in_vector.channel_mask().sum())
            kept_out[name] = int(conv.out_vector.channel_mask().sum())
        return kept_in, kept_out

    @torch.no_grad()
    def kept_weights(self):
        """Dict conv name -> number of kept weights inside kept channels (int)."""
        return {name: int(conv.keep_mask().sum()) for name, conv in self.hyper_convs()}


class ChannelOutputMask:
    """Forward hook multiplying a module's output (B, C, ...) by a keep mask of its C channels.

    Args:
        source (ChannelVector | ChannelMap | Tensor): anything with ``channel_mask()`` (read at every
            call, so masks updated during pruning apply at once) or a fixed bool tensor (C,).
    """

    def __init__(self, source):
        self.source = source

    def __call__(self, module, inputs, output):
        mask = self.source if isinstance(self.source, torch.Tensor) else self.source.channel_mask()
        return output * mask.to(device=output.device, dtype=output.dtype).view(1, -1, *([1] * (output.dim() - 2)))
