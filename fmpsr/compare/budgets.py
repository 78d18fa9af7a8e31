"""Budgets: how many params or MACs a cell keeps, and the networks / ratios that reach them (no training).

A budget is a kept fraction of the dense backbone in one metric: ``params`` (conv weights and biases)
or ``macs`` (conv multiply-accumulates at an LR input of ``macs_input_size`` pixels; the pruning
core calls this metric ``flops``). Everything here is counted with the pruning core's accounting
(:func:`fmpsr.pruning.mask_ratios` on the backbone's channel groups), so it needs no training:

* :func:`ratio_for_budget`: the prune ratio r of a method that removes ``ceil(r * size)`` channels
  from every selected channel group (SRP, L1-norm, ASSL) such that the kept count is as close as the
  group sizes allow to the target (within the tolerance when the granularity permits).

The other methods' budget searches are in :mod:`fmpsr.compare.methods`; the uniform-width scratch
baselines come from :func:`fmpsr.baselines.uniform_network`.
"""
import copy
from dataclasses import dataclass

import torch

METRIC_NAMES = {'params': 'params', 'macs': 'flops', 'flops': 'flops'}


def pruning_metric(metric):
    """The pruning core's name of a budget metric: 'params' -> 'params', 'macs' / 'flops' -> 'flops'.

    Raises:
        ValueError: an unknown metric (named).
    """
    if metric not in METRIC_NAMES:
        raise ValueError(f'budget.metric: unknown metric {metric!r} (choose from params, macs)')
    return METRIC_NAMES[metric]


def counts_get(counts, metric):
    """``counts.params`` or ``counts.macs`` for a budget metric ('params' | 'macs' | 'flops')."""
    return counts.params if pruning_metric(metric) == 'params' else counts.macs


class Backbone:
    """The dense backbone of a comparison: network, conv specs, channel groups, dense counts.

    Args:
        network_g (dict): BasicSR ``network_g`` options (any arch fmpsr can group).
        macs_input_size (tuple[int, int]): LR (H, W) in pixels at which MACs are counted.
        grouping (str | None): 'hand', 'auto' or None (the arch's default), as ``pruning.grouping``.
    """

    def __init__(self, network_g, macs_input_size=(64, 64), grouping=None):
        from basicsr.archs import build_network
        from fmpsr.pruning import build_grouping, count, trace_conv_specs

        self.network_g = dict(network_g)
        self.macs_input_size = tuple(macs_input_size)
        self.net = build_network(copy.deepcopy(self.network_g))
        in_ch = self.network_g.get('num_in_ch', 3)
        self.specs = trace_conv_specs(self.net, self.macs_input_size, in_ch)
        example = torch.zeros(1, in_ch, *self.macs_input_size)
        self.grouping = build_grouping(self.net, self.network_g, grouping, example)
        self.original = count(self.specs)

    def masks_for(self, widths):
        """Group keep masks that keep the first ``widths[g]`` channels of each group (others: all)."""
        masks = {}
        for g, group in self.grouping.groups.items():
            m = torch.zeros(group.size, dtype=torch.bool)
            m[:widths.get(g, group.size)] = True
            masks[g] = m
        return masks

    def counts(self, widths):
        """:class:`~fmpsr.pruning.Counts` (params, MACs) of the backbone with these group widths."""
        from fmpsr.pruning import mask_ratios
        return mask_ratios(self.specs, self.grouping, self.masks_for(widths)).channel


@dataclass(frozen=True)
class BudgetMatch:
    """A network or ratio found for a target count.

    Attributes:
        value: the ratio (float) or the ``network_g`` (dict) found.
        widths (dict): group -> kept channels.
        params (int), macs (int): its counts (dense: every weight of the kept channels).
        target (float): the count aimed at, in ``metric``.
        metric (str): 'params' or 'macs'.
        error (float): signed deviation (count - target) / dense count (kept-fraction points).
        within (bool): abs(error) <= the tolerance asked for.
    """
    value: object
    widths: dict
    params: int
    macs: int
    target: float
    metric: str
    error: float
    within: bool


def _match(value, widths, counts, target, metric, tolerance, unit=None):
    reached = counts_get(counts, metric)
    error = (reached - target) / (unit or target)
    return BudgetMatch(value, dict(widths), counts.params, counts.macs, float(target), metric, error,
                       abs(error) <= tolerance)


def ratio_widths(backbone, ratio, skip=(), round_to=None):
    """Group widths at prune ratio ``ratio`` with the selection methods' own rules
    (:func:`fmpsr.pruning.selection.classify_groups`: fixed and PixelShuffle groups and ``skip`` globs
    keep every channel; :func:`fmpsr.pruning.selection.prune_count`: ``ceil(r * size)`` removed)."""
    from fmpsr.pruning.selection import classify_groups, prune_count

    constrained, free = classify_groups(backbone.grouping, skip)
    return {g: backbone.grouping.groups[g].size - prune_count(backbone.grouping.groups[g].size, ratio, round_to)
            for g in constrained + free}


def ratio_for_budget(backbone, metric, kept_fraction, tolerance=0.01, skip=(), round_to=None):
    """The prune ratio r (SRP, ASSL, L1-norm: ``pruning.ratio``) whose kept count is closest to
    ``kept_fraction`` of the dense count.

    The kept count only changes where ``ceil(r * size)`` steps for some group, so every candidate
    ``r = k / size`` (k = 0 .. size - 1, for each pruned group size) is evaluated and the closest one
    returned (the smallest such r on ties). The granularity is the group sizes': on narrow networks
    no r may land within the tolerance (``within`` is then false and the report says so).

    Args:
        backbone (Backbone): the dense network.
        metric (str): 'params' or 'macs'.
        kept_fraction (float): target kept fraction in (0, 1].
        tolerance (float): ``within`` is true when the kept fraction is within this of ``kept_fraction``
            (fraction of the dense count, e.g. 0.01 for +-1 % of the original).
        skip (tuple): ``pruning.skip_groups`` globs; round_to (int | None): ``pruning.round_to``.

    Returns:
        BudgetMatch: ``value`` is the ratio r in [0, 1).
    """
    from fmpsr.pruning.selection import classify_groups

    dense = counts_get(backbone.original, metric)
    target = kept_fraction * dense
    constrained, free = classify_groups(backbone.grouping, skip)
    sizes = sorted({backbone.grouping.groups[g].size for g in constrained + free})
    candidates = sorted({k / s for s in sizes for k in range(s)})
    best = None
    for r in candidates:
        widths = ratio_widths(backbone, r, skip, round_to)
        match = _match(r, widths, backbone.counts(widths), target, metric, tolerance, unit=dense)
        if best is None or abs(match.error) < abs(best.error) - 1e-12:
            best = match
    return best
