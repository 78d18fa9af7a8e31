"""Params and MACs accounting (FMP Sec. 4.4, supplement Tab. 3).

Params are all conv weights and biases; MACs are the multiply-accumulates of every conv
(``kept weights * H_out * W_out``; what SR papers call "FLOPs"), at a stated LR input size. A
transposed conv (``nn.ConvTranspose2d``) multiplies every input pixel by its kernel: its MACs are
``kept weights * H_in * W_in`` (``c_in * c_out / groups * kh * kw * H_in * W_in``, what torch's
``FlopCounterMode`` counts, halved). Frozen convs (``requires_grad=False``) are counted like any other
(they are part of the network) and are never pruned (``ConvSpec.frozen``).
With metric = params or MACs and three counts of one network,

* ``original``: the dense network,
* ``channel``: after channel pruning (kept channels only, every weight of them),
* ``pruned``: after channel and weight pruning (kept weights of kept channels),

the ratios are ``channel_ratio = (original - channel) / original``,
``weight_ratio = (channel - pruned) / original`` and ``total (kept) = 1 - channel_ratio - weight_ratio``
(all fractions, not percent).
"""
import copy
from dataclasses import dataclass

import torch
from torch import nn

from .hyperconv import HyperConv2d

METRICS = ('params', 'flops')


@dataclass(frozen=True)
class ConvSpec:
    """Shape facts of one conv: channels, kernel (kh, kw), bias, and output size (H_out, W_out) in
    pixels at the traced input size; ``stride``, ``padding``, ``dilation`` (pairs), ``groups`` and the
    input size (H_in, W_in) in pixels (None when not traced) rebuild the conv for timing
    (:mod:`fmpsr.pruning.latency`); a grouped conv holds ``in_channels / groups`` inputs per output.
    ``transposed``: an ``nn.ConvTranspose2d`` (weight ``(c_in, c_out / groups, kh, kw)``); ``frozen``:
    its weight has ``requires_grad=False`` (left as it is by every method)."""
    in_channels: int
    out_channels: int
    kernel_size: tuple
    bias: bool
    out_size: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    in_size: tuple = None
    transposed: bool = False
    frozen: bool = False

    @property
    def kernel_area(self):
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def out_pixels(self):
        return self.out_size[0] * self.out_size[1]

    @property
    def mac_pixels(self):
        """Pixels each weight is multiplied at: H_out * W_out, or H_in * W_in for a transposed conv."""
        return self.in_size[0] * self.in_size[1] if self.transposed else self.out_pixels

    def dense_weights(self, c_in=None, c_out=None):
        """Weights of the conv with ``c_in`` / ``c_out`` (default: all) channels: ``c_in / groups *
        c_out * kh * kw`` (``c_in * c_out / groups * kh * kw`` transposed; equal for ``groups=1``)."""
        c_in = self.in_channels if c_in is None else c_in
        c_out = self.out_channels if c_out is None else c_out
        per = c_in * (c_out // self.groups) if self.transposed else c_in // self.groups * c_out
        return per * self.kernel_area


def trace_conv_specs(net, input_size, in_channels=3):
    """Record every conv's :class:`ConvSpec` by running ``net`` once on the ``meta`` device.

    Works on plain networks (``nn.Conv2d``, ``nn.ConvTranspose2d``) and hypernetworks
    (:class:`HyperConv2d`); nothing is
    computed and ``net`` itself is not touched (a deep copy is moved to ``meta``).

    Args:
        net (nn.Module): the network.
        input_size (tuple[int, int]): LR input (H, W) in pixels.
        in_channels (int): image channels of the input. Default: 3.

    Returns:
        dict: conv module name -> ConvSpec, in call order.
    """
    meta = copy.deepcopy(net).to('meta')
    specs, hooks = {}, []
    for name, module in meta.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, HyperConv2d)):
            weight = getattr(module, 'weight', None)
            frozen = isinstance(weight, torch.Tensor) and not weight.requires_grad

            def hook(mod, inputs, output, name=name, frozen=frozen):
                padding = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)  # or 'same' / 'valid'
                specs[name] = ConvSpec(mod.in_channels, mod.out_channels, tuple(mod.kernel_size),
                                       mod.bias is not None, tuple(output.shape[-2:]), tuple(mod.stride), padding,
                                       tuple(mod.dilation), getattr(mod, 'groups', 1), tuple(inputs[0].shape[-2:]),
                                       isinstance(mod, nn.ConvTranspose2d), frozen)
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        dtype = next(meta.parameters()).dtype
        meta(torch.empty(1, in_channels, *input_size, device='meta', dtype=dtype))
    for h in hooks:
        h.remove()
    return specs


@dataclass(frozen=True)
class Counts:
    """Params and MACs of a network (ints), and its conv latency in seconds when a
    :class:`~fmpsr.pruning.latency.LatencyTable` was given (else None)."""
    params: int
    macs: int
    latency: float = None

    def get(self, metric):
        """The count for ``metric`` in {'params', 'flops', 'latency'} ('flops' means MACs).

        Raises:
            ValueError: 'latency' without a latency table.
        """
        if metric == 'latency':
            if self.latency is None:
                raise ValueError("pruning.metric: latency needs a latency table (none was measured or given)")
            return self.latency
        return self.params if metric == 'params' else self.macs


def count(specs, kept_in=None, kept_out=None, kept_weights=None, latency=None):
    """Count params and MACs (and latency) of a (possibly pruned) network.

    Args:
        specs (dict): conv name -> ConvSpec (the dense network, see :func:`trace_conv_specs`).
        kept_in, kept_out (dict | None): conv name -> kept input / output channels; None = dense.
        kept_weights (dict | None): conv name -> kept weights (nonzero kernel entries inside the kept
            channels); None = every weight of the kept channels.
        A conv missing from these dicts (left plain by ``pruning.exclude``) counts as dense.
        latency (LatencyTable | None): per-conv times; the latency counts kept channels only (weight
            zeros do not speed up a dense kernel).

    Returns:
        Counts: params = sum(weights + kept biases), macs = sum(weights * H_out * W_out) (H_in * W_in
        for a transposed conv), latency =
        sum of conv times in seconds (None without a table).
    """
    params = macs = 0
    for name, s in specs.items():
        c_in = s.in_channels if kept_in is None else kept_in.get(name, s.in_channels)
        c_out = s.out_channels if kept_out is None else kept_out.get(name, s.out_channels)
        dense = kept_weights is None or name not in kept_weights
        weights = s.dense_weights(c_in, c_out) if dense else kept_weights[name]
        params += weights + (c_out if s.bias else 0)
        macs += weights * s.mac_pixels
    return Counts(params, macs, None if latency is None else latency.total(specs, kept_in, kept_out))


@dataclass(frozen=True)
class PruneRatios:
    """The three counts of FMP Sec. 4.4 and the ratios derived from them (fractions)."""
    original: Counts
    channel: Counts
    pruned: Counts

    def channel_ratio(self, metric):
        """(original - after channel pruning) / original."""
        return (self.original.get(metric) - self.channel.get(metric)) / self.original.get(metric)

    def weight_ratio(self, metric):
        """(after channel pruning - after channel and weight pruning) / original."""
        return (self.channel.get(metric) - self.pruned.get(metric)) / self.original.get(metric)

    def total_ratio(self, metric):
        """Kept fraction: 1 - channel ratio - weight ratio = pruned / original."""
        return 1.0 - self.channel_ratio(metric) - self.weight_ratio(metric)

    def as_dict(self):
        """Flat dict of counts and ratios for both metrics (for logs and summary.json)."""
        out = {}
        for metric in METRICS + (('latency',) if self.original.latency is not None else ()):
            out[f'{metric}_channel_ratio'] = self.channel_ratio(metric)
            out[f'{metric}_weight_ratio'] = self.weight_ratio(metric)
            out[f'{metric}_total_ratio'] = self.total_ratio(metric)
        for stage in ('original', 'channel', 'pruned'):
            counts = getattr(self, stage)
            out[f'{stage}_params'] = counts.params
            out[f'{stage}_macs'] = counts.macs
            if counts.latency is not None:
                out[f'{stage}_latency_ms'] = counts.latency * 1e3
        return out


def hypernetwork_ratios(hyper, specs, latency=None):
    """:class:`PruneRatios` of a :class:`~fmpsr.pruning.hypernet.HyperNetwork` from its masks.

    Args:
        hyper (HyperNetwork): the network being pruned.
        specs (dict): conv name -> ConvSpec of the same network (dense shapes).
        latency (LatencyTable | None): counts latency too (``pruning.metric: latency``).
    """
    kept_in, kept_out = hyper.kept_conv_channels()
    return PruneRatios(original=count(specs, latency=latency), channel=count(specs, kept_in, kept_out, latency=latency),
                       pruned=count(specs, kept_in, kept_out, hyper.kept_weights(), latency=latency))


def mask_ratios(specs, grouping, group_masks=None, weight_masks=None):
    """:class:`PruneRatios` of a plain network pruned by masks (SRP, L1-norm, ASSL, ISS-P, LTH, ...).

    Args:
        specs (dict): conv name -> ConvSpec of the dense network (:func:`trace_conv_specs`).
        grouping (ChannelGrouping | None): its channel groups; None: no channel is pruned.
        group_masks (dict | None): group name -> bool (size,) keep mask; a group left out (or None)
            keeps every channel.
        weight_masks (dict | None): conv name -> bool kept single weights, in the weight's layout
            ((c_out, c_in, kh, kw); (c_in, c_out, kh, kw) transposed); a conv left out keeps every
            weight of its kept channels.

    Returns:
        PruneRatios: ``channel`` counts kept channels only, ``pruned`` the kept weights inside them.
    """
    from .finalize import conv_channel_masks
    from .grouping import slice_weight

    if grouping is None:
        sides = {name: (torch.ones(s.in_channels, dtype=torch.bool), torch.ones(s.out_channels, dtype=torch.bool))
                 for name, s in specs.items()}
    else:
        full = {g: torch.ones(group.size, dtype=torch.bool) for g, group in grouping.groups.items()}
        full.update({g: m.detach().cpu().bool() for g, m in (group_masks or {}).items()})
        sides = conv_channel_masks(grouping, full)
    kept_in, kept_out, kept_weights = {}, {}, {}
    for name, (m_in, m_out) in sides.items():
        kept_in[name], kept_out[name] = int(m_in.sum()), int(m_out.sum())
        if weight_masks is not None and name in weight_masks:
            w = weight_masks[name].detach().cpu().bool()
            kept_weights[name] = int(slice_weight(w, m_in, m_out, specs[name].transposed).sum())
        else:
            kept_weights[name] = kept_in[name] * kept_out[name] * specs[name].kernel_area
    return PruneRatios(original=count(specs), channel=count(specs, kept_in, kept_out),
                       pruned=count(specs, kept_in, kept_out, kept_weights))
