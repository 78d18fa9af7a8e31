"""Channel vectors and the hypernetwork conv of FMP (FMP Sec. 3.3, Eqs. 1-3; DHP, Li et al. ECCV 2020).

A :class:`ChannelVector` is the latent vector z_C of one channel group: every conv whose output
channels belong to the group gets it as its output vector, every conv that reads the group gets it
as its input vector. A :class:`HyperConv2d` owns no conv weight: it generates one from the two
vectors and its weight indicator Z_W on every forward pass.

Pruning is by mask. Because of the hypernetwork biases B0..B2 a zero entry of z does not give an
exact zero weight, so each vector carries a boolean ``mask`` buffer (False = pruned channel) and each
conv a ``weight_mask`` buffer (False = pruned weight). Masks are applied in the forward pass, so a
pruned channel outputs exactly zero (weight and bias), and they only ever go from True to False,
so the network that :func:`fmpsr.pruning.finalize.finalize` slices out computes the same function.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


class ChannelVector(nn.Module):
    """The channel vector z_C of one channel group (FMP Sec. 3.3), with its keep mask.

    Args:
        size (int): Number of channels in the group.
        prunable (bool): False for the image input and the upsampler output: never shrunk or masked.
        init (str): 'normal' (DHP's code: z ~ N(0, 1)) or 'ones' (every entry 1: equal magnitudes, so
            which channels survive the proximal step is decided by the gradients alone, not by the draw;
            :class:`~fmpsr.pruning.hypernet.HyperNetwork`'s default). Default 'normal'.

    Attributes:
        z (Parameter): shape (size,).
        mask (bool buffer): shape (size,), True where the channel is kept.

    Raises:
        ValueError: an unknown ``init``.
    """

    INITS = ('normal', 'ones')

    def __init__(self, size, prunable=True, init='normal'):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f'ChannelVector: unknown init {init!r} (choose from {list(self.INITS)})')
        self.prunable = prunable
        self.z = nn.Parameter(torch.randn(size) if init == 'normal' else torch.ones(size))
        self.register_buffer('mask', torch.ones(size, dtype=torch.bool))

    def extra_repr(self):
        return f'size={self.z.numel()}, prunable={self.prunable}'

    @property
    def size(self):
        return self.z.numel()

    def kept(self):
        """Number of kept channels (int)."""
        return int(self.mask.sum())

    @torch.no_grad()
    def proximal_step_(self, threshold, prune_threshold=5e-3, min_channels=4):
        """L1 proximal operator on z (FMP Eq. 10; DHP): ``z <- sign(z) * max(|z| - threshold, 0)``.

        As in DHP, a vector whose entries above ``prune_threshold`` are already no more than
        ``min_channels`` is left alone. Pruned entries stay at zero.

        Args:
            threshold (float): lr * lambda_C, the shrinkage of this step.
            prune_threshold (float): |z| below which an entry counts as pruned (DHP: 5e-3).
            min_channels (int): channels a vector always keeps (DHP: 4).
        """
        proximal_step_vectors_([self], threshold, prune_threshold, min_channels)

    @torch.no_grad()
    def update_mask_(self, prune_threshold=5e-3, min_channels=4, round_to=1):
        """Prune (mask) the entries with |z| < ``prune_threshold``; keep at least ``min_channels``
        (the largest |z|). Masks are monotone: a pruned channel never comes back.

        ``round_to`` > 1 (torch-pruning's term) rounds the kept count up to a multiple of ``round_to``
        by also keeping the largest |z| below the threshold, so that compact widths suit the
        hardware's fast conv paths (e.g. 16 on AVX-512 CPUs, 8 for tensor cores). Up, not down as in
        torch-pruning, so no channel above the threshold is ever pruned; while the rounded count
        exceeds the channels still kept (a vector whose size is not a multiple), nothing is pruned.

        Returns:
            int: number of channels newly pruned by this call.
        """
        before = self.kept()
        self.apply_keep_(self.proposed_keep(prune_threshold, min_channels, round_to))
        return before - self.kept()

    @torch.no_grad()
    def proposed_keep(self, prune_threshold=5e-3, min_channels=4, round_to=1):
        """The keep mask :meth:`update_mask_` would set (bool (size,)), without setting it."""
        if not self.prunable:
            return self.mask.clone()
        before = self.kept()
        # pruned entries rank below every kept one, so the floor only ever picks kept channels
        magnitude = self.z.detach().abs().masked_fill(~self.mask, -1.0)
        keep = (magnitude >= prune_threshold) & self.mask
        floor = max(int(keep.sum()), min(min_channels, before))
        if round_to > 1:
            floor = min(-(-floor // round_to) * round_to, before)
        if int(keep.sum()) < floor:
            keep = torch.zeros_like(keep)
            keep[magnitude.topk(floor).indices] = True
        return keep

    @torch.no_grad()
    def drop_units(self, keep, round_to=1):
        """Split the channels that ``keep`` (bool (size,), a subset of the mask) drops into the steps in
        which a budgeted update may take them: smallest |z| first, ``round_to`` channels a step (the
        first step takes ``kept % round_to`` when the kept count is not a multiple), so that after every
        step the kept count is still a multiple of ``round_to`` where it was one.

        Returns:
            list[Tensor]: index tensors (long), in the order they are to be dropped.
        """
        dropped = (self.mask & ~keep).nonzero().flatten()
        if dropped.numel() == 0:
            return []
        dropped = dropped[torch.argsort(self.z.detach().abs()[dropped], stable=True)]
        first = self.kept() % round_to or round_to
        units, start = [], 0
        while start < dropped.numel():
            size = first if start == 0 else round_to
            units.append(dropped[start:start + size])
            start += size
        return units

    @torch.no_grad()
    def apply_keep_(self, keep):
        """Set the mask to ``keep`` (bool (size,)) and zero the pruned entries of z."""
        self.mask.copy_(keep)
        self.z.data.mul_(keep)

    def masked_z(self, masked=None):
        """``z * mask``, shape (size,); ``masked`` (dict id(vector) -> tensor) reuses a computed one."""
        return masked[id(self)] if masked is not None else self.z * self.mask

    def channel_mask(self):
        """The keep mask, bool (size,) (the interface shared with :class:`ChannelMap`)."""
        return self.mask


@torch.no_grad()
def proximal_step_vectors_(vectors, threshold, prune_threshold=5e-3, min_channels=4):
    """:meth:`ChannelVector.proximal_step_` on every prunable vector of ``vectors`` (FMP Eq. 10), in one
    chain of ops over their concatenation instead of about ten ops per vector (issue 11, part 4).

    Per vector: when more than ``min_channels`` entries have |z| >= ``prune_threshold``,
    ``z <- sign(z) * max(|z| - threshold, 0)``; then ``z <- z * mask`` in every case.

    Args:
        vectors (iterable[ChannelVector]): the vectors; those not prunable are skipped.
        threshold (float): lr * lambda_C; prune_threshold (float); min_channels (int): as in
            :meth:`ChannelVector.proximal_step_`.
    """
    vectors = [v for v in vectors if v.prunable]
    if not vectors:
        return
    zs = [v.z.data for v in vectors]
    sizes = [z.numel() for z in zs]
    z = torch.cat(zs)
    owner = torch.repeat_interleave(torch.arange(len(zs), device=z.device),
                                    torch.tensor(sizes, device=z.device))      # vector index of each entry
    magnitude = z.abs()
    active = torch.zeros(len(zs), dtype=torch.long, device=z.device).index_add_(
        0, owner, (magnitude >= prune_threshold).long())
    shrunk = torch.where((active > min_channels)[owner], z.sign() * (magnitude - threshold).clamp_min(0), z)
    shrunk.mul_(torch.cat([v.mask for v in vectors]))
    for z_vector, value in zip(zs, shrunk.split(sizes)):
        z_vector.copy_(value)


class ChannelMap:
    """The channels of one conv side gathered from several channel vectors, or repeated.

    A conv that reads a concatenation sees the channels of each input's vector in turn; the conv
    before a ``PixelShuffle(r)`` writes ``r*r`` channels per feature channel, all of which follow that
    channel's entry of the vector. Channel ``i`` of the side is entry ``positions[i]`` of its segment's
    vector. Offers the :class:`ChannelVector` interface a :class:`HyperConv2d` uses.

    Args:
        segments (list): ``(ChannelVector, positions)`` pairs in channel order; positions is a
            sequence of ints into the vector, or None for the whole vector in order.
    """

    def __init__(self, segments):
        self.segments = [(v, None if p is None else torch.as_tensor(list(p), dtype=torch.long)) for v, p in segments]
        self.size = sum(v.size if p is None else p.numel() for v, p in self.segments)
        self.prunable = any(v.prunable for v, _ in self.segments)
        self._index = {}

    def _on(self, positions, device):
        key = (id(positions), device)
        if key not in self._index:
            self._index[key] = positions.to(device)
        return self._index[key]

    def _gather(self, pieces):
        return torch.cat([t if p is None else t[self._on(p, t.device)] for t, (_, p) in zip(pieces, self.segments)])

    def masked_z(self, masked=None):
        """Gathered ``z * mask`` of the vectors, shape (size,)."""
        return self._gather([v.masked_z(masked) for v, _ in self.segments])

    def channel_mask(self):
        """Gathered keep masks, bool (size,)."""
        return self._gather([v.mask for v, _ in self.segments])


# W2 size (elements) from which _BankChain contracts slice by slice; below it, one broadcast product
_SLICED_MIN_NUMEL = 1 << 20


class _BankChain(torch.autograd.Function):
    """The weight-generation chain of one :class:`HyperBank` (FMP Eqs. 1-2) as one autograd node
    with a hand-written backward (issue 11, part 4).

    Composed from torch ops, autograd saves the (n, m, k, c_out, c_in) product ``W2 * E`` and
    reallocates tensors of that size (the largest of the step, m = 8 times the conv weights) three
    times per step: the product, the gradient of W2 and the product of W2 with the gradient of O.
    Here, for banks of at least ``_SLICED_MIN_NUMEL`` W2 entries, the contractions over m (forward) and
    over k (backward) accumulate slice by slice into tensors m or k times smaller, so a step allocates
    one tensor of W2's size, its gradient, which the optimiser needs anyway. Smaller banks keep the
    broadcast product, where fewer ops matter more than memory traffic. Side by side in one process
    (13 convs 64x64 3x3, 2 threads, forward + backward): 6.9 ms against 9.1 ms for the composed chain.
    The arithmetic is the same; ``tests/test_pruning_core.py`` checks values and gradients against plain
    autograd through a loop over the channel pairs, and with ``torch.autograd.gradcheck``.

    Inputs (``n`` convs of one shape, m the embedding size, k = kh*kw):
        z_out (n, c_out), z_in (n, c_in): masked channel vectors; b0 (n, c_out, c_in);
        w1, b1 (n, m, c_out, c_in); w2 (n, m, k, c_out, c_in); b2 (n, k, c_out, c_in);
        indicator (n, c_out, c_in, kh, kw): Z_W; keep: 0/1 float of the indicator's shape (no gradient).

    Output: (n, c_out, c_in, kh, kw), ``indicator * keep * O`` with O as in :class:`HyperConv2d`.
    Differentiable once (no double backward).
    """

    @staticmethod
    def forward(ctx, z_out, z_in, b0, w1, b1, w2, b2, indicator, keep):
        n, m, k, c_out, c_in = w2.shape
        grid = torch.addcmul(b0, z_out[:, :, None], z_in[:, None, :])              # (n, c_out, c_in)
        embed = torch.addcmul(b1, grid[:, None], w1)                                # (n, m, c_out, c_in)
        if w2.numel() >= _SLICED_MIN_NUMEL:
            out = b2.clone(memory_format=torch.contiguous_format)                   # (n, k, c_out, c_in)
            for j in range(m):
                out.addcmul_(w2[:, j], embed[:, j, None])
        else:  # small banks: two ops instead of m + 1 (per-op overhead dominates there)
            out = torch.sum(w2 * embed[:, :, None], 1).add_(b2)
        # O in the weight's layout, copied once (a view for 1x1): the products with it read contiguously
        out = out.permute(0, 2, 3, 1).reshape(indicator.shape)                        # (n, c_out, c_in, kh, kw)
        scale = indicator * keep
        ctx.save_for_backward(z_out, z_in, w1, w2, grid, embed, out, keep, scale)
        return scale * out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weight):
        z_out, z_in, w1, w2, grid, embed, out, keep, scale = ctx.saved_tensors
        n, m, k, c_out, c_in = w2.shape
        need = ctx.needs_input_grad
        grad_indicator = grad_weight * keep * out if need[7] else None
        grad_out = (grad_weight * scale).view(n, c_out, c_in, k).permute(0, 3, 1, 2).contiguous()  # (n, k, c_out, c_in)
        grad_w2 = torch.mul(embed[:, :, None], grad_out[:, None]) if need[5] else None
        if w2.numel() >= _SLICED_MIN_NUMEL:
            grad_embed = torch.zeros_like(embed)                                      # (n, m, c_out, c_in)
            for j in range(k):
                grad_embed.addcmul_(w2[:, :, j], grad_out[:, None, j])
        else:
            grad_embed = torch.sum(w2 * grad_out[:, None], 2)
        grad_w1 = grad_embed * grid[:, None] if need[3] else None
        grad_grid = (grad_embed * w1).sum(1)                                          # (n, c_out, c_in)
        grad_z_out = torch.bmm(grad_grid, z_in[:, :, None])[..., 0] if need[0] else None
        grad_z_in = torch.bmm(z_out[:, None, :], grad_grid)[:, 0] if need[1] else None
        return (grad_z_out, grad_z_in, grad_grid if need[2] else None, grad_w1,
                grad_embed if need[4] else None, grad_w2, grad_out if need[6] else None, grad_indicator, None)


class HyperBank(nn.Module):
    """Hypernetwork tensors of ``n`` convs of one shape (c_out, c_in, kh, kw), stacked on dim 0.

    Storing the convs of one shape together lets :class:`~fmpsr.pruning.hypernet.HyperNetwork`
    generate all their weights in one chain of batched ops per shape instead of one chain per
    conv (a LSRB-6-64 has 51 convs of 8 shapes), which is what keeps FMP's per-step overhead small.

    Layout (issue 11, part 4). The embedding index m and the kernel position k are stored before the
    channel pair (i, j), so every op of the chain runs over contiguous (c_out, c_in) planes and the
    contraction over m (``O = W2 @ E``, the largest tensor by far: 72 numbers per channel pair for 3x3,
    m = 8) is m broadcast multiply-adds of whole planes instead of (c_out c_in k) dot products of
    length m. Forward plus backward of that contraction is about 3x faster than with (i, j) first.
    The per-conv views :attr:`HyperConv2d.w1` etc. still read as (c_out, c_in, ..., m).

    Parameters (DHP init; :class:`~fmpsr.pruning.hypernet.HyperNetwork` with ``init='plain'`` then
    rescales each conv's slice of w2 so that its generated weight has the plain conv's std):
        w1 (n, m, c_out, c_in) ~ U(+-sqrt(3)); w2 (n, m, k, c_out, c_in) ~ U(+-sqrt(3 / (m c_in k)));
        b0 (n, c_out, c_in), b1 (n, m, c_out, c_in), b2 (n, k, c_out, c_in): zeros;
        weight_indicator (n, c_out, c_in, kh, kw): ones (FMP Eq. 2).

    Checkpoints written before this layout (w1 / b1 (n, c_out, c_in, m), w2 (n, c_out, c_in, k, m),
    b2 (n, c_out, c_in, k); state-dict version 1) are converted when loaded (:meth:`from_old_layout`).
    A state dict keeps its version only in its ``_metadata``, so save ``module.state_dict()`` itself or
    copy the ``_metadata`` along (as ``FMPModel.prune_checkpoint`` does).
    """

    _version = 2  # state-dict version: 2 = the layout above (issue 11); 1 = pair first
    # tensor name -> permutation taking the old (pair-first) layout to the stored one
    OLD_LAYOUT = {'w1': (0, 3, 1, 2), 'b1': (0, 3, 1, 2), 'w2': (0, 4, 3, 1, 2), 'b2': (0, 3, 1, 2)}

    def __init__(self, n, out_channels, in_channels, kernel_size, embed_dim=8):
        super().__init__()
        kh, kw = kernel_size
        k, m = kh * kw, embed_dim
        self.shape = (out_channels, in_channels, kh, kw)
        bound2 = math.sqrt(3.0 / (m * in_channels * k))
        self.w1 = nn.Parameter(torch.empty(n, m, out_channels, in_channels).uniform_(-math.sqrt(3.0), math.sqrt(3.0)))
        self.w2 = nn.Parameter(torch.empty(n, m, k, out_channels, in_channels).uniform_(-bound2, bound2))
        self.b0 = nn.Parameter(torch.zeros(n, out_channels, in_channels))
        self.b1 = nn.Parameter(torch.zeros(n, m, out_channels, in_channels))
        self.b2 = nn.Parameter(torch.zeros(n, k, out_channels, in_channels))
        self.weight_indicator = nn.Parameter(torch.ones(n, out_channels, in_channels, kh, kw))
        self.old_layout_loaded = False

    def extra_repr(self):
        return f'n={self.w1.shape[0]}, shape={self.shape}, embed_dim={self.w1.shape[1]}'

    def from_old_layout(self, name, tensor):
        """``tensor`` (a saved value of bank parameter ``name``, or its optimiser state) converted from
        the pair-first layout of checkpoints written before issue 11 to the stored one.

        Returns:
            Tensor: the permuted contiguous copy; ``tensor`` itself for names whose layout did not change.

        Raises:
            ValueError: ``tensor`` does not have the old layout's shape for this bank.
        """
        if name not in self.OLD_LAYOUT:
            return tensor
        param = getattr(self, name)
        order = self.OLD_LAYOUT[name]
        old_shape = tuple(param.shape[order.index(d)] for d in range(len(order)))
        if tuple(tensor.shape) != old_shape:
            raise ValueError(f'hypernetwork tensor {name!r} of shape {tuple(tensor.shape)} is in neither the bank '
                             f'layout {tuple(param.shape)} nor the layout before issue 11 {old_shape}')
        return tensor.permute(*order).contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Checkpoints of version < 2 (no ``_metadata`` version: written before issue 11 or by hand) whose
        tensors all have the old layout's shapes are converted; ``old_layout_loaded`` records it, so
        that the optimiser state saved with them is converted too (``HyperNetwork.convert_optimizer_state``)."""
        self.old_layout_loaded = False
        present = [name for name in self.OLD_LAYOUT if prefix + name in state_dict]
        if (local_metadata.get('version') or 1) < 2 and present:
            try:
                converted = {name: self.from_old_layout(name, state_dict[prefix + name]) for name in present}
            except ValueError:
                converted = None  # new layout without metadata, or a mismatch that the load below reports
            if converted is not None:
                for name, value in converted.items():
                    state_dict[prefix + name] = value
                self.old_layout_loaded = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def generate(self, z_out, z_in, keep, index=None):
        """Weights from masked channel vectors (FMP Eqs. 1-2), for all convs or one (``index``).

        Args:
            z_out (Tensor): (n, c_out) or, with ``index``, (c_out,): masked output vectors.
            z_in (Tensor): (n, c_in) or (c_in,): masked input vectors.
            keep (Tensor): bool or 0/1 float, (n, c_out, c_in, kh, kw) or (c_out, c_in, kh, kw): kept weights.
            index (int | None): generate only conv ``index`` of the bank.

        Returns:
            Tensor: (n, c_out, c_in, kh, kw), or (c_out, c_in, kh, kw) with ``index``.
        """
        if index is not None:
            pick = slice(index, index + 1)
            return self._generate(z_out[None], z_in[None], keep[None], pick)[0]
        return self._generate(z_out, z_in, keep, slice(None))

    def _generate(self, z_out, z_in, keep, pick):
        keep = keep.to(self.weight_indicator.dtype)
        tensors = (self.b0, self.w1, self.b1, self.w2, self.b2, self.weight_indicator)
        if pick != slice(None):
            # the parameters themselves for the whole bank: the backward of a slice, even a full one,
            # writes a zero-filled gradient of the bank's size and copies into it
            tensors = [tensor[pick] for tensor in tensors]
        b0, w1, b1, w2, b2, indicator = tensors
        return _BankChain.apply(z_out, z_in, b0, w1, b1, w2, b2, indicator, keep)


class HyperConv2d(nn.Module):
    """A conv whose weight a hypernetwork generates from channel vectors and a weight indicator.

    With kernel [c_out, c_in, kh, kw], embedding size m and k = kh*kw (FMP Eqs. 1-2, DHP):

    * ``M = z_out z_in^T + B0``                       (c_out, c_in)
    * ``E = M[..., None] * W1 + B1``                  (c_out, c_in, m)
    * ``O = W2 @ E[..., None] + B2``                  (c_out, c_in, k)
    * ``weight = O.view(c_out, c_in, kh, kw) * Z_W * masks``

    computed for all (i, j) pairs at once. The per-conv views are output-channel first (DHP stores
    them input first); the bank stores m and k before the pair (see :class:`HyperBank`). The function
    is the same either way.
    They live in a :class:`HyperBank` shared with the other convs of the same shape; ``w1``, ``w2``,
    ``b0``, ``b1``, ``b2`` and ``weight_indicator`` are this conv's views of it. The bias is an
    ordinary parameter (c_out,), masked by the output vector's mask. The hypernetwork costs
    ``c_in*c_out*(1 + 2m + k*(m+1))`` training-time parameters (98 per pair for 3x3, m=8); they are
    not part of the pruned model's size.

    Args:
        in_vector (ChannelVector | ChannelMap): channels this conv reads (size c_in).
        out_vector (ChannelVector | ChannelMap): channels this conv writes (size c_out).
        kernel_size, stride, padding, dilation: as in ``nn.Conv2d`` (groups=1 only).
        bias (bool): whether the conv has a bias. Default: True.
        embed_dim (int): m, the hypernetwork embedding size (DHP default 8).
        bank (HyperBank | None), index (int): where this conv's tensors live; None makes a bank of one.

    Shapes:
        x: (B, c_in, H, W) -> (B, c_out, H_out, W_out), as ``nn.Conv2d``.

    The vectors and the bank are referenced, not registered: the module that owns the groups (see
    :class:`fmpsr.pruning.hypernet.HyperNetwork`) registers them once.
    """

    def __init__(self, in_vector, out_vector, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 embed_dim=8, bank=None, index=0):
        super().__init__()
        object.__setattr__(self, 'in_vector', in_vector)
        object.__setattr__(self, 'out_vector', out_vector)
        c_in, c_out = in_vector.size, out_vector.size
        self.in_channels, self.out_channels = c_in, c_out
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.embed_dim = embed_dim
        if bank is None:
            bank, index = HyperBank(1, c_out, c_in, self.kernel_size, embed_dim), 0
            self.own_bank = bank  # registered only when the conv stands alone
        if bank.shape != (c_out, c_in, *self.kernel_size):
            raise ValueError(f'HyperBank of shape {bank.shape} cannot hold a conv of shape '
                             f'{(c_out, c_in, *self.kernel_size)}')
        object.__setattr__(self, 'bank', bank)
        self.index = index
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.register_buffer('weight_mask', torch.ones(c_out, c_in, *self.kernel_size, dtype=torch.bool))
        # set by HyperNetwork.forward for the length of one forward pass
        self.batched_weight = self.batched_bias = None

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, embed_dim={self.embed_dim}, bias={self.bias is not None}')

    # views of this conv's slice of the bank, pair first: w1 / b1 (c_out, c_in, m), w2 (c_out, c_in, k, m),
    # b0 (c_out, c_in), b2 (c_out, c_in, k)
    w1 = property(lambda self: self.bank.w1[self.index].permute(1, 2, 0))
    w2 = property(lambda self: self.bank.w2[self.index].permute(2, 3, 1, 0))
    b0 = property(lambda self: self.bank.b0[self.index])
    b1 = property(lambda self: self.bank.b1[self.index].permute(1, 2, 0))
    b2 = property(lambda self: self.bank.b2[self.index].permute(1, 2, 0))
    weight_indicator = property(lambda self: self.bank.weight_indicator[self.index])

    def hyper_parameters(self):
        """Views of the hypernetwork parameters Theta_H = (W1, W2, B0, B1, B2) (FMP Eq. 3)."""
        return [self.w1, self.w2, self.b0, self.b1, self.b2]

    def keep_mask(self):
        """Boolean (c_out, c_in, kh, kw): weights kept by both channel masks and the weight mask."""
        channel = self.out_vector.channel_mask()[:, None, None, None] & self.in_vector.channel_mask()[None, :, None, None]
        return self.weight_mask & channel

    def generate_weight(self):
        """The conv weight Z = Z_C * Z_W (FMP Eq. 2), masked; shape (c_out, c_in, kh, kw)."""
        return self.bank.generate(self.out_vector.masked_z(), self.in_vector.masked_z(), self.keep_mask(), self.index)

    def generate_bias(self):
        """The masked bias, shape (c_out,), or None."""
        return None if self.bias is None else self.bias * self.out_vector.channel_mask()

    def forward(self, x):
        if self.batched_weight is not None:   # generated by HyperNetwork.forward
            weight, bias = self.batched_weight, self.batched_bias
        else:
            weight, bias = self.generate_weight(), self.generate_bias()
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
