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

    Attributes:
        z (Parameter): shape (size,), DHP init N(0, 1).
        mask (bool buffer): shape (size,), True where the channel is kept.
    """

    def __init__(self, size, prunable=True):
        super().__init__()
        self.prunable = prunable
        self.z = nn.Parameter(torch.randn(size))
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
        if not self.prunable:
            return
        z = self.z.data
        if int((z.abs() >= prune_threshold).sum()) > min_channels:
            z.copy_(torch.sign(z) * torch.clamp(z.abs() - threshold, min=0))
        z.mul_(self.mask)

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
        if not self.prunable:
            return 0
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
        self.mask.copy_(keep)
        self.z.data.mul_(keep)
        return before - self.kept()

    def masked_z(self, masked=None):
        """``z * mask``, shape (size,); ``masked`` (dict id(vector) -> tensor) reuses a computed one."""
        return masked[id(self)] if masked is not None else self.z * self.mask

    def channel_mask(self):
        """The keep mask, bool (size,) (the interface shared with :class:`ChannelMap`)."""
        return self.mask


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


class HyperBank(nn.Module):
    """Hypernetwork tensors of ``n`` convs of one shape (c_out, c_in, kh, kw), stacked on dim 0.

    Storing the convs of one shape together lets :class:`~fmpsr.pruning.hypernet.HyperNetwork`
    generate all their weights in one chain of batched ops per shape instead of one chain per
    conv (a LSRB-6-64 has 51 convs of 8 shapes), which is what keeps FMP's per-step overhead small.

    Parameters (DHP init; output channel first, see :class:`HyperConv2d`):
        w1 (n, c_out, c_in, m) ~ U(+-sqrt(3)); w2 (n, c_out, c_in, k, m) ~ U(+-sqrt(3 / (m c_in k)));
        b0 (n, c_out, c_in), b1 (n, c_out, c_in, m), b2 (n, c_out, c_in, k): zeros;
        weight_indicator (n, c_out, c_in, kh, kw): ones (FMP Eq. 2).
    """

    def __init__(self, n, out_channels, in_channels, kernel_size, embed_dim=8):
        super().__init__()
        kh, kw = kernel_size
        k, m = kh * kw, embed_dim
        self.shape = (out_channels, in_channels, kh, kw)
        bound2 = math.sqrt(3.0 / (m * in_channels * k))
        self.w1 = nn.Parameter(torch.empty(n, out_channels, in_channels, m).uniform_(-math.sqrt(3.0), math.sqrt(3.0)))
        self.w2 = nn.Parameter(torch.empty(n, out_channels, in_channels, k, m).uniform_(-bound2, bound2))
        self.b0 = nn.Parameter(torch.zeros(n, out_channels, in_channels))
        self.b1 = nn.Parameter(torch.zeros(n, out_channels, in_channels, m))
        self.b2 = nn.Parameter(torch.zeros(n, out_channels, in_channels, k))
        self.weight_indicator = nn.Parameter(torch.ones(n, out_channels, in_channels, kh, kw))

    def extra_repr(self):
        return f'n={self.w1.shape[0]}, shape={self.shape}, embed_dim={self.w1.shape[-1]}'

    def generate(self, z_out, z_in, keep, index=None):
        """Weights from masked channel vectors (FMP Eqs. 1-2), for all convs or one (``index``).

        Args:
            z_out (Tensor): (n, c_out) or, with ``index``, (c_out,): masked output vectors.
            z_in (Tensor): (n, c_in) or (c_in,): masked input vectors.
            keep (Tensor): bool, (n, c_out, c_in, kh, kw) or (c_out, c_in, kh, kw): kept weights.
            index (int | None): generate only conv ``index`` of the bank.

        Returns:
            Tensor: (n, c_out, c_in, kh, kw), or (c_out, c_in, kh, kw) with ``index``.
        """
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        grid = torch.addcmul(pick(self.b0), z_out[..., :, None], z_in[..., None, :])   # (.., c_out, c_in)
        embed = torch.addcmul(pick(self.b1), grid[..., None], pick(self.w1))           # (.., c_out, c_in, m)
        out = (pick(self.w2) * embed[..., None, :]).sum(-1) + pick(self.b2)             # (.., c_out, c_in, k)
        return out.view(*out.shape[:-1], *self.shape[2:]) * (pick(self.weight_indicator) * keep)


class HyperConv2d(nn.Module):
    """A conv whose weight a hypernetwork generates from channel vectors and a weight indicator.

    With kernel [c_out, c_in, kh, kw], embedding size m and k = kh*kw (FMP Eqs. 1-2, DHP):

    * ``M = z_out z_in^T + B0``                       (c_out, c_in)
    * ``E = M[..., None] * W1 + B1``                  (c_out, c_in, m)
    * ``O = W2 @ E[..., None] + B2``                  (c_out, c_in, k)
    * ``weight = O.view(c_out, c_in, kh, kw) * Z_W * masks``

    computed for all (i, j) pairs at once. The tensors are stored output-channel first (DHP stores
    them input first), so the weight is a view of O with no transpose copy; the function is the same.
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
        self.batched_weight = None  # set by HyperNetwork.forward for the length of one forward pass

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, embed_dim={self.embed_dim}, bias={self.bias is not None}')

    w1 = property(lambda self: self.bank.w1[self.index])
    w2 = property(lambda self: self.bank.w2[self.index])
    b0 = property(lambda self: self.bank.b0[self.index])
    b1 = property(lambda self: self.bank.b1[self.index])
    b2 = property(lambda self: self.bank.b2[self.index])
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
        weight = self.batched_weight if self.batched_weight is not None else self.generate_weight()
        return F.conv2d(x, weight, self.generate_bias(), self.stride, self.padding, self.dilation)


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
