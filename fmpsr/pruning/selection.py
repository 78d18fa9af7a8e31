"""Filter selection rules shared by the structured baselines (L1-norm, SRP, ASSL).

Everything here works on fmpsr's channel groups (:class:`~fmpsr.pruning.grouping.ChannelGrouping`,
hand-written or found by torch-pruning's dependency graph) and returns one bool keep mask per group,
the ``group_masks`` that :func:`~fmpsr.pruning.accounting.mask_ratios` counts and
:func:`~fmpsr.pruning.finalize.finalize_plain` slices by. Nothing here imports BasicSR's trainer.

Terms (SRP Sec. 3.2):

* the *writers* of a group are the convs whose output channels are the group's channels
  (:func:`group_writers`); a conv followed by PixelShuffle writes each feature channel ``r*r`` times;
* a prunable group is *constrained* when more than one conv writes it (their outputs meet at a
  residual add, so their pruned indices must be aligned), *free* when one conv writes it;
* *kept* groups are never pruned (:func:`kept_groups`): fixed groups (image input / output), groups
  written through a PixelShuffle (the upsampler's output channels: SRP's "upsampler and last conv
  keep their output channels; their input follows the pruned set"), and the groups matched by
  ``pruning.skip_groups``. For BasicSR's EDSR this is exactly SRP Table 1's rule (checked by the
  exact parameter counts in ``tests/test_selection.py``).

Counts: a group of ``C`` channels at prune ratio ``r`` loses ``ceil(r*C)`` channels (SRP, Li et al.),
never all of them (at least one channel is kept); with ``round_to`` the kept width is rounded *up*
to a multiple of ``round_to`` (at most ``C``), the rule FMP's ``pruning.round_to`` follows
(:meth:`fmpsr.pruning.hyperconv.ChannelVector.update_mask_`), so every method's widths agree.
torch-pruning's ``BasePruner._round_to`` rounds the kept width down instead (and may keep 0).

Scores: the L1 norm of a filter is ``sum |w|`` over its ``c_in * kh * kw`` weights (Li et al.
2017, Eq. 1; the bias is not part of it); a group's score of channel ``c`` sums the L1 norms of every
filter writing ``c`` (aligned L1-norm pruning). torch-pruning's ``GroupMagnitudeImportance(p=1,
group_reduction='sum', normalizer=None)`` computes a similar group L1 norm, but it also adds the
input-channel slices of the convs that *read* the group and needs torch-pruning's own groups (which
miss the PixelShuffle mapping fmpsr adds); Li et al. and SRP score filters (outputs) only, so the
score is computed here from fmpsr's groups. ``RandomImportance`` draws from the global RNG; SRP's
random index set is drawn here from a ``torch.Generator`` seeded with the run's ``manual_seed`` so a
run is repeatable and a resumed run reuses the saved set.
"""
import fnmatch
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .options import PruningOptions, check_number


def side_channels(grouping, side):
    """The (group, channel) of each channel of one conv side, in order.

    Args:
        grouping (ChannelGrouping): the channel groups.
        side (str | tuple): a side of ``grouping.convs``.

    Returns:
        list of (group name, channel index in the group), length = side width.
    """
    out = []
    for group, positions in grouping.segments(side):
        out += [(group, p) for p in (range(grouping.groups[group].size) if positions is None else positions)]
    return out


def group_writers(grouping):
    """Which conv outputs write each group.

    Returns:
        OrderedDict: group name -> OrderedDict conv name -> (out_index LongTensor (n,), channel
        LongTensor (n,)): output channel ``out_index[k]`` of the conv is channel ``channel[k]`` of the
        group. Groups no conv writes (the image input) are absent.
    """
    writers = OrderedDict()
    for conv, (_, out_side) in grouping.convs.items():
        pairs = {}
        for out_index, (group, channel) in enumerate(side_channels(grouping, out_side)):
            pairs.setdefault(group, []).append((out_index, channel))
        for group, items in pairs.items():
            idx, ch = zip(*items)
            writers.setdefault(group, OrderedDict())[conv] = (torch.tensor(idx), torch.tensor(ch))
    return writers


def is_shuffled(grouping, group):
    """True when some conv writes a channel of ``group`` more than once (a conv followed by
    PixelShuffle: its ``r*r`` outputs form one feature channel)."""
    for conv, (_, out_side) in grouping.convs.items():
        seen = [c for g, c in side_channels(grouping, out_side) if g == group]
        if len(seen) != len(set(seen)):
            return True
    return False


def kept_groups(grouping, skip=()):
    """Groups that are never pruned (see the module docstring), with the reason.

    Args:
        grouping (ChannelGrouping): the channel groups.
        skip (sequence of str): ``pruning.skip_groups``: fnmatch globs on group names.

    Returns:
        dict: group name -> reason ('fixed' | 'pixel_shuffle' | 'skip_groups').

    Raises:
        ValueError: a ``skip_groups`` pattern that matches no group (the pattern is named).
    """
    kept = {}
    for name, group in grouping.groups.items():
        if not group.prunable:
            kept[name] = 'fixed'
        elif is_shuffled(grouping, name):
            kept[name] = 'pixel_shuffle'
    for pattern in skip or ():
        hits = [g for g in grouping.groups if fnmatch.fnmatchcase(g, pattern)]
        if not hits:
            raise ValueError(f'pruning.skip_groups: pattern {pattern!r} matches no channel group '
                             f'(groups: {sorted(grouping.groups)})')
        for g in hits:
            kept.setdefault(g, 'skip_groups')
    return kept


def classify_groups(grouping, skip=()):
    """Split the groups that will be pruned into constrained and free ones (SRP Sec. 3.2).

    Returns:
        tuple: (constrained: list of group names written by >1 conv, free: list written by 1 conv),
        both in grouping order; kept groups (:func:`kept_groups`) are in neither.
    """
    writers = group_writers(grouping)
    kept = kept_groups(grouping, skip)
    constrained, free = [], []
    for name in grouping.groups:
        if name in kept or name not in writers:
            continue
        (constrained if len(writers[name]) > 1 else free).append(name)
    return constrained, free


def prune_count(size, ratio, round_to=None):
    """Number of channels to remove from a group of ``size`` at prune ratio ``ratio``.

    ``ceil(ratio * size)`` (rounded to 9 decimals first, so 0.3 * 10 is 3, not 4), at most
    ``size - 1``; with ``round_to`` > 1 the kept width ``size - n`` is rounded up to a multiple of
    ``round_to``, at most ``size`` (see the module docstring).

    Args:
        size (int): channels in the group.
        ratio (float): prune ratio in [0, 1).
        round_to (int | None): kept widths are multiples of this (or the whole group).

    Returns:
        int: channels to remove, in [0, size - 1].
    """
    n = min(int(math.ceil(round(ratio * size, 9))), size - 1)
    if round_to and round_to > 1:
        kept = min(size, -(-(size - n) // round_to) * round_to)
        n = size - kept
    return max(n, 0)


def filter_l1_norms(net, convs=None):
    """L1 norm of every filter (output channel) of each conv (Li et al. 2017, Eq. 1).

    Args:
        net (nn.Module): the network; weights are read through ``conv.weight`` (so parametrized
            weights, e.g. masks or weight normalisation, give their computed value).
        convs (iterable | None): conv names; None: every ``nn.Conv2d``.

    Returns:
        dict: conv name -> float tensor (c_out,) on the CPU, ``sum |w|`` over (c_in, kh, kw).
    """
    from torch import nn
    names = list(convs) if convs is not None else [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        return {name: net.get_submodule(name).weight.detach().abs().flatten(1).sum(1).float().cpu()
                for name in names}


def group_scores(grouping, conv_scores, groups=None):
    """Sum per-filter scores over the writers of each group (aligned scoring).

    Args:
        grouping (ChannelGrouping): the channel groups.
        conv_scores (dict): conv name -> tensor (c_out,), e.g. :func:`filter_l1_norms` or |g|.
        groups (iterable | None): which groups; None: every group some conv writes.

    Returns:
        dict: group name -> float tensor (group size,).
    """
    writers = group_writers(grouping)
    out = {}
    for name in (groups if groups is not None else writers):
        total = torch.zeros(grouping.groups[name].size)
        for conv, (out_index, channel) in writers[name].items():
            total.index_add_(0, channel, conv_scores[conv].float().cpu()[out_index])
        out[name] = total
    return out


def smallest_mask(scores, n_pruned):
    """Keep mask that removes the ``n_pruned`` smallest scores (ties: the lower index goes first).

    Args:
        scores (Tensor): (C,) importance.
        n_pruned (int): channels to remove.

    Returns:
        Tensor: bool (C,), False at the removed channels.
    """
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    order = torch.sort(scores.detach().float().cpu(), stable=True).indices
    keep[order[:n_pruned]] = False
    return keep


def random_mask(size, n_pruned, generator):
    """Keep mask removing ``n_pruned`` channels chosen uniformly at random with ``generator``.

    Args:
        size (int): channels.
        n_pruned (int): channels to remove.
        generator (torch.Generator): a CPU generator (e.g. :func:`selection_generator`).

    Returns:
        Tensor: bool (size,).
    """
    keep = torch.ones(size, dtype=torch.bool)
    keep[torch.randperm(size, generator=generator)[:n_pruned]] = False
    return keep


def selection_generator(seed):
    """A CPU ``torch.Generator`` seeded with ``seed`` (the run's ``manual_seed``), independent of the
    global RNG so that selecting does not shift the data order or initialisation."""
    generator = torch.Generator()
    generator.manual_seed(int(seed or 0))
    return generator


def select_channels(grouping, ratio, conv_scores=None, constrained_rule='score', generator=None,
                    round_to=None, skip=()):
    """Keep masks of every group at prune ratio ``ratio``.

    Free groups lose their ``prune_count`` lowest-scoring channels (the writer's filter scores); a
    constrained group loses the lowest summed scores (``constrained_rule='score'``: aligned L1-norm
    pruning) or one random index set (``'random'``: SRP) drawn from ``generator``, one set per group
    in grouping order, shared by every writer. Kept groups keep every channel.

    Args:
        grouping (ChannelGrouping): channel groups.
        ratio (float): prune ratio in [0, 1).
        conv_scores (dict | None): conv name -> (c_out,) scores; needed unless every pruned group is
            constrained and random.
        constrained_rule (str): 'score' or 'random'.
        generator (torch.Generator | None): for 'random'.
        round_to (int | None): see :func:`prune_count`.
        skip (sequence): ``pruning.skip_groups`` globs.

    Returns:
        dict: group name -> bool keep mask (size,) for every group of the grouping.

    Raises:
        ValueError: an unknown ``constrained_rule``; 'random' without a generator; see :func:`kept_groups`.
    """
    if constrained_rule not in ('score', 'random'):
        raise ValueError(f"constrained_rule must be 'score' or 'random', got {constrained_rule!r}")
    if constrained_rule == 'random' and generator is None:
        raise ValueError("constrained_rule 'random' needs a torch.Generator")
    constrained, free = classify_groups(grouping, skip)
    masks = {g: torch.ones(group.size, dtype=torch.bool) for g, group in grouping.groups.items()}
    scored = free + (constrained if constrained_rule == 'score' else [])
    scores = group_scores(grouping, conv_scores, scored) if scored else {}
    for name in grouping.groups:
        if name not in scores and not (name in constrained and constrained_rule == 'random'):
            continue
        size = grouping.groups[name].size
        n = prune_count(size, ratio, round_to)
        masks[name] = random_mask(size, n, generator) if name not in scores else smallest_mask(scores[name], n)
    return masks


def check_per_layer(grouping, skip=()):
    """Refuse per-layer (naive) selection where it would break a residual add.

    Raises:
        ValueError: naming the first constrained group, its writers, and the ways out.
    """
    constrained, _ = classify_groups(grouping, skip)
    if constrained:
        writers = group_writers(grouping)
        name = constrained[0]
        convs = list(writers[name])
        shown = ', '.join(convs[:6]) + (f', ... ({len(convs)} convs)' if len(convs) > 6 else '')
        raise ValueError(
            f'pruning.mode naive: channel group {name!r} is written by {len(convs)} convs ({shown}) whose outputs '
            f'meet at a residual add; per-layer index sets would break the add ({len(constrained)} such group(s): '
            f'{constrained}). Use pruning.mode: aligned, or keep these groups with pruning.skip_groups')


def pruned_rows(grouping, group_masks, groups=None):
    """For each conv, the output channels (filters) that write a pruned channel.

    Args:
        grouping (ChannelGrouping): channel groups.
        group_masks (dict): group name -> bool keep mask.
        groups (iterable | None): restrict to these groups.

    Returns:
        OrderedDict: conv name -> LongTensor of output indices (only convs with at least one).
    """
    rows = OrderedDict()
    for name, convs in group_writers(grouping).items():
        if (groups is not None and name not in groups) or name not in group_masks:
            continue
        dropped = ~group_masks[name].cpu().bool()
        for conv, (out_index, channel) in convs.items():
            hit = out_index[dropped[channel]]
            if hit.numel():
                rows[conv] = torch.cat([rows[conv], hit]).unique() if conv in rows else hit
    return rows


# ---- option keys shared by the selection-based methods ----


@dataclass(frozen=True)
class SelectionOptions(PruningOptions):
    """``pruning`` keys of the methods that remove a fixed fraction of every group's channels.

    Attributes:
        ratio (float): prune ratio r in [0, 1): each pruned group loses ``ceil(r*C)`` channels
            (SRP Table 1: 0.1 / 0.3 / 0.5 / 0.7 / 0.9).
        round_to (int | None): kept widths rounded up to a multiple of this (torch-pruning's
            ``round_to``; the direction of FMP's ``round_to``), e.g. 8 for GPU-friendly widths.
        skip_groups (tuple of str): fnmatch globs of channel groups never pruned (beside the fixed and
            PixelShuffle groups, see :func:`kept_groups`).
    """
    ratio: float = 0.5
    round_to: int = None
    skip_groups: tuple = ()

    def validate(self):
        super().validate()
        check_number('ratio', self.ratio, 0, 1, high_open=True)
        if self.round_to is not None:
            check_number('round_to', self.round_to, 1, integer=True)
        if not all(isinstance(s, str) for s in self.skip_groups):
            raise ValueError(f'pruning.skip_groups must be a list of group names / globs, got {list(self.skip_groups)}')
