"""Turn a plain conv network into its FMP hypernetwork form (FMP Sec. 3.3, Fig. 3).

:class:`HyperNetwork` takes a plain network and its :class:`~fmpsr.pruning.grouping.ChannelGrouping`,
replaces every ``nn.Conv2d`` of ``grouping.convs`` (all but the ``plain_convs`` that
``pruning.exclude`` leaves dense) by a :class:`~fmpsr.pruning.hyperconv.HyperConv2d` under the same
module name, and owns one :class:`~fmpsr.pruning.hyperconv.ChannelVector` per group. Everything
else of the network (activations, PixelShuffle, ESA's pooling) is untouched, so the hypernetwork
computes the plain network's function with generated weights. Modules with per-channel parameters
that do not map a zero channel to zero (BatchNorm, InstanceNorm) have their output multiplied by the
channel mask (:class:`ChannelOutputMask`), so pruned channels stay exactly zero (issue 14).

Initialisation (``init``). The FMP paper gives none. DHP's code draws z ~ N(0, 1), W1 ~ U(+-sqrt(3)),
W2 ~ U(+-sqrt(3 / (m c_in k))): the generated weights then have variance z_i^2 z_j^2 / fan_in, 3x
PyTorch's conv default at |z| = 1, and one vector shared along a residual stream multiplies every
stream-to-stream conv by z_i z_j of the same draw, so the untrained network's output is far from the
plain network's: mean |output| on a random 16x16 input, seeds 0-9, 2.8e3x the plain network's at
worst on LSRB-4-32 (0.17-404 against 0.12-0.18), 1.1e4x on EDSR-8-64 (6.7-4880 against 0.43), 333x on
RCAN (2 groups of 2 blocks, 32 channels), 189x on RRDBNet (2 blocks, 16 channels). fmpsr's default,
``init='plain'``, departs from DHP's code so that the hypernetwork starts as the plain network it
replaces, with its own initialisation: every z = 1 (equal magnitudes, so that the kept set is decided
by the gradients, not by the draw; W1 / W2 still differ per channel pair, so channels are not
symmetric), each conv's generated weight scaled (by scaling its slice of W2) to the standard
deviation of the plain conv's weight as the arch initialised it (EDSR's 0.1-scaled Kaiming, RRDB's,
PyTorch's default where the arch sets none), and the plain conv's bias copied. Residual scaling (EDSR's
``res_scale``) stays in the arch. Measured on the same networks and seeds, the output is then within
0.5-2x of the plain network's (``tests/test_fmp_search.py``). ``init='dhp'`` keeps DHP's draw.
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
        init (str): 'plain' (default): start at the plain network's initialised scale (see the module
            docstring: z = 1, each conv's generated weight std = the plain conv's, its bias copied);
            'dhp': DHP's code (z ~ N(0, 1), W1 / W2 as drawn, biases zero).

    Attributes:
        net (nn.Module): the converted network; ``forward`` calls it.
        channel_vectors (nn.ModuleDict): group name -> ChannelVector.

    Shapes: as ``net``.

    Raises:
        ValueError: the grouping does not match ``net`` (see ``ChannelGrouping.validate``); a prunable
            ``nn.ConvTranspose2d`` (``ChannelGrouping.refuse_transposed``); an unknown ``init``.
    """

    INITS = ('plain', 'dhp')

    def __init__(self, net, grouping, embed_dim=8, init='plain'):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f'pruning.hyper_init: unknown init {init!r} (choose from {list(self.INITS)})')
        grouping.validate(net)
        grouping.refuse_transposed('FMP / DHP (the hypernetwork generates nn.Conv2d weights only)')
        self.grouping = grouping
        vector_init = 'ones' if init == 'plain' else 'normal'
        self.channel_vectors = nn.ModuleDict(
            {name: ChannelVector(g.size, g.prunable, vector_init) for name, g in grouping.groups.items()})
        plain_init = {name: plain_conv_init(net.get_submodule(name)) for name in grouping.convs} \
            if init == 'plain' else None
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
        self._build_gather_indices()
        self._mask_cache = (None, None, None)
        if plain_init is not None:
            self._match_plain_init(plain_init)

    @torch.no_grad()
    def _match_plain_init(self, plain_init):
        """Scale each conv's slice of W2 so that its generated weight (at the current z, B0..B2 = 0,
        Z_W = 1) has the standard deviation of the plain conv's initialised weight, and copy the plain
        conv's bias (``plain_init``: conv name -> (weight std, bias or None), from :func:`plain_conv_init`).
        A conv whose generated weight is constant (std 0) is left as drawn."""
        flat_mask, keeps = self.mask_tensors()
        z = torch.cat([v.z for v in self.channel_vectors.values()]) * flat_mask
        names = {id(conv): name for name, conv in self.hyper_convs()}
        for number, (bank, members) in enumerate(self.bank_members()):
            weights = bank.generate(z[getattr(self, f'gather_out_{number}')],
                                    z[getattr(self, f'gather_in_{number}')], keeps[number])
            for index, conv in enumerate(members):
                std, bias = plain_init[names[id(conv)]]
                generated = float(weights[index].double().std(unbiased=False))
                if generated > 0:
                    bank.w2[index].mul_(std / generated)
                if bias is not None and conv.bias is not None:
                    conv.bias.copy_(bias)

    def _build_gather_indices(self):
        """Per bank, where each conv's output and input channels sit in the flat vector
        ``cat([v.z for v in channel_vectors])``: long buffers (n, c_out) and (n, c_in), not saved
        (the structure is rebuilt from the grouping), moved with the module."""
        offsets, start = {}, 0
        for vector in self.channel_vectors.values():
            offsets[id(vector)] = start
            start += vector.size

        def flat(side):
            if isinstance(side, ChannelVector):
                return torch.arange(side.size) + offsets[id(side)]
            return torch.cat([offsets[id(v)] + (torch.arange(v.size) if p is None else p) for v, p in side.segments])

        for number, members in enumerate(self._bank_members):
            self.register_buffer(f'gather_out_{number}', torch.stack([flat(c.out_vector) for c in members]),
                                 persistent=False)
            self.register_buffer(f'gather_in_{number}', torch.stack([flat(c.in_vector) for c in members]),
                                 persistent=False)

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
        """Generate every conv weight, one batched chain per bank (conv shape), then run the network.

        Per forward: one masked flat channel vector, then per bank two gathers, the chain of
        :meth:`HyperBank.generate` and one product of the stacked conv biases with their output masks;
        the masks themselves come from :meth:`mask_tensors` (cached)."""
        flat_mask, keeps = self.mask_tensors()
        z = torch.cat([v.z for v in self.channel_vectors.values()]) * flat_mask
        members_of = self._bank_members
        try:
            for number, (bank, members) in enumerate(self.bank_members()):
                gather_out = getattr(self, f'gather_out_{number}')
                weights = bank.generate(z[gather_out], z[getattr(self, f'gather_in_{number}')], keeps[number])
                biases = [conv.bias for conv in members]
                if all(bias is not None for bias in biases):   # = generate_bias() of each conv
                    biases = (torch.stack(biases) * flat_mask[gather_out]).unbind(0)
                else:
                    biases = [conv.generate_bias() for conv in members]
                # unbind, not weights[i]: its backward stacks the n gradients once, where n selects would
                # each write a zero-filled (n, c_out, c_in, kh, kw) gradient and add them up
                for conv, weight, bias in zip(members, weights.unbind(0), biases):
                    conv.batched_weight, conv.batched_bias = weight, bias
            return self.net(*args, **kwargs)
        finally:
            for members in members_of:
                for conv in members:
                    conv.batched_weight = conv.batched_bias = None

    def mask_tensors(self):
        """The masks as the weight generator uses them, recomputed only when a mask has changed.

        Masks change only at a pruner check, a state-dict load or a hand edit, all in-place tensor
        writes that bump the tensor's version counter (or replace the tensor); the cache is keyed on
        the (id, version) of every channel-vector mask and conv weight mask, and on dtype and device.

        Returns:
            tuple: (flat channel mask, float (sum of vector sizes,), in ``channel_vectors`` order;
            list of keep masks, float (n, c_out, c_in, kh, kw), one per bank: 1 where
            :meth:`HyperConv2d.keep_mask` keeps the weight).
        """
        vectors = list(self.channel_vectors.values())
        masks = [v.mask for v in vectors] + [c.weight_mask for members in self._bank_members for c in members]
        dtype, device = vectors[0].z.dtype, vectors[0].z.device
        try:
            key = (dtype, device, tuple((id(m), m._version) for m in masks))
        except RuntimeError:  # inference tensors have no version counter: no cache
            key = None
        cached_key, flat_mask, keeps = self._mask_cache[:3]
        if key is None or key != cached_key:
            flat_mask = torch.cat([v.mask for v in vectors]).to(dtype)
            keeps = [torch.stack([c.keep_mask() for c in members]).to(bank.weight_indicator.dtype)
                     for bank, members in self.bank_members()]
            # not kept from inference mode: its tensors cannot be used by a later training step.
            # The masks themselves are held too, so that no id in the key can be reused by a new tensor.
            if key is not None and not torch.is_inference_mode_enabled():
                self._mask_cache = (key, flat_mask, keeps, masks)
        return flat_mask, keeps

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


@torch.no_grad()
def plain_conv_init(conv):
    """(standard deviation of ``conv.weight`` (float, over all its entries), a copy of ``conv.bias`` or
    None): what :class:`HyperNetwork` with ``init='plain'`` matches."""
    weight = conv.weight.detach().double()
    bias = None if conv.bias is None else conv.bias.detach().clone()
    return float(weight.std(unbiased=False)), bias
