"""Lottery tickets: iterative global magnitude pruning with resets (sparsity_of_sr_networks.txt Sec. 2.1,
appendix A.2.1, Table 2; Frankle & Carbin 2019; Frankle et al. 2020 for LMC-LTH; Liu et al. 2021 for
LTH-PWC).

One round of the rule, :func:`global_magnitude_masks`: among the weights still kept in the *prunable*
convs, remove the ``round(p * remaining)`` with the smallest ``|w|``, all layers ranked together
(global pruning); the paper uses ``p = 0.2``. After ``k`` rounds the kept fraction of the prunable
weights is ``0.8 ** k`` (to rounding). The convs that read the image and write the output (the
"first and last layers" of LTH, :func:`end_convs`) are never pruned, and biases are never pruned.

The reset that follows a round (``init``: the weights of iteration 0, LTH; ``rewind``: the weights of
iteration ``t``, LMC-LTH; ``continue``: no reset, LTH-PWC) is :func:`load_plain_state` of a snapshot
taken by :func:`snapshot`, with the new masks then enforced. Nothing here imports BasicSR's trainer;
:class:`fmpsr.models.lth_model.LTHModel` drives the rounds.
"""
from dataclasses import dataclass

import torch

from .grouping import build_grouping
from .options import PruningOptions, check_choice, check_number

RESETS = ('init', 'rewind', 'continue')


def end_convs(net, network_opt, specs, mode=None, example_input=None, ties=()):
    """The convs that read the image input and the convs that write the network's output.

    They are found from fmpsr's channel groups (:func:`~fmpsr.pruning.grouping.build_grouping`): a conv
    whose input side is made only of fixed groups (``prunable=False``: the image channels) reads the
    image, a conv whose output side is made only of fixed groups writes the output (for BasicSR's EDSR:
    ``conv_first`` and ``conv_last``; for LSRB / RLFN: ``conv_first`` and ``upsampler``). If the
    grouping finds none on a side, the first (last) conv in call order (``specs`` order) is used.

    Args:
        net (nn.Module): the plain network.
        network_opt (dict): its ``network_g`` options.
        specs (dict): conv name -> ConvSpec in call order (:func:`~fmpsr.pruning.trace_conv_specs`).
        mode, ties: ``pruning.grouping`` / ``pruning.tie_outputs`` (see ``build_grouping``).
        example_input (Tensor | None): (1, C_in, H, W) input for the automatic grouping.

    Returns:
        tuple: (list of first conv names, list of last conv names).
    """
    grouping = build_grouping(net, network_opt, mode, example_input, ties)

    def fixed(side):
        return all(not grouping.groups[g].prunable for g, _ in grouping.segments(side))
    first = [name for name in specs if name in grouping.convs and fixed(grouping.convs[name][0])]
    last = [name for name in specs if name in grouping.convs and fixed(grouping.convs[name][1])]
    names = list(specs)
    return first or names[:1], last or names[-1:]


def prunable_convs(specs, excluded):
    """Conv names of ``specs`` (call order) that are not in ``excluded``, not frozen (``requires_grad=False``:
    left as they are) and not transposed (``nn.ConvTranspose2d``: pruned by channel only)."""
    excluded = set(excluded)
    return [name for name, spec in specs.items()
            if name not in excluded and not getattr(spec, 'frozen', False) and not getattr(spec, 'transposed', False)]


def num_removed(remaining, fraction):
    """Weights one round removes: ``round(fraction * remaining)`` (half up), an int."""
    return int(fraction * remaining + 0.5)


@torch.no_grad()
def global_magnitude_masks(weights, masks, fraction):
    """One LTH pruning round: remove ``fraction`` of the remaining weights by global magnitude.

    Args:
        weights (dict): conv name -> weight (c_out, c_in, kh, kw) of the prunable convs (trained).
        masks (dict): conv name -> bool keep mask of the same shape; a name left out keeps every weight.
        fraction (float): p in [0, 1): the fraction of the *remaining* (kept) weights to remove.

    Returns:
        dict: conv name -> new bool keep mask (CPU); exactly ``num_removed(remaining, fraction)`` more
        weights are False than in ``masks``, those with the smallest ``|w|`` among the kept ones
        (ties: the earlier in conv order, then in flattened order, are removed first).

    Raises:
        ValueError: ``fraction`` outside [0, 1), or a mask whose shape differs from its weight.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f'pruning.prune_fraction must be in [0, 1), got {fraction!r}')
    names = list(weights)
    keep = {}
    for name in names:
        w = weights[name]
        m = masks.get(name)
        m = torch.ones(w.shape, dtype=torch.bool) if m is None else m.detach().cpu().bool()
        if tuple(m.shape) != tuple(w.shape):
            raise ValueError(f'mask of {name!r} has shape {tuple(m.shape)}, the weight {tuple(w.shape)}')
        keep[name] = m
    scores = torch.cat([weights[n].detach().abs().double().cpu().flatten() for n in names])
    kept = torch.cat([keep[n].flatten() for n in names])
    remaining = int(kept.sum())
    k = num_removed(remaining, fraction)
    candidates = kept.nonzero().flatten()
    order = torch.argsort(scores[candidates], stable=True)
    new = kept.clone()
    new[candidates[order[:k]]] = False
    out, start = {}, 0
    for name in names:
        n = keep[name].numel()
        out[name] = new[start:start + n].view(keep[name].shape).clone()
        start += n
    return out


def snapshot(net):
    """The network's parameters and buffers under plain keys (CPU clones): the state a reset returns to.

    Weight parametrizations (masks) are read through (``name.weight`` holds the computed weight).
    """
    from .masks import plain_state_dict
    return plain_state_dict(net)


@torch.no_grad()
def load_plain_state(net, state):
    """Copy a :func:`snapshot` into ``net`` in place (the Parameter objects stay the same, so an
    optimiser over them stays valid). A parametrized weight gets the value in its ``original``; the
    parametrization's own buffers (masks) are left alone.

    Raises:
        KeyError: a parameter or buffer of ``net`` that ``state`` lacks (named).
    """
    for key, tensor in net.state_dict(keep_vars=True).items():
        if '.parametrizations.' in key:
            prefix, _, rest = key.partition('.parametrizations.')
            tensor_name, _, leaf = rest.partition('.')
            if leaf != 'original':
                continue
            key = f'{prefix}.{tensor_name}'
        if key not in state:
            raise KeyError(f'reset: the snapshot has no {key!r}')
        tensor.copy_(state[key].to(tensor.device, tensor.dtype))


@dataclass(frozen=True)
class LTHOptions(PruningOptions):
    """``pruning`` section of :class:`~fmpsr.models.lth_model.LTHModel` (shared keys: :class:`PruningOptions`).

    Attributes:
        reset (str): after each round, 'init' (weights of iteration 0: LTH), 'rewind' (weights of
            iteration ``rewind_iter``: LMC-LTH) or 'continue' (keep training: LTH-PWC).
        rounds (int): pruning rounds in the prune stage (the paper's sparsity levels), >= 1.
        round_iter (int): training iterations per round (the paper's T).
        prune_fraction (float): p, the fraction of the remaining prunable weights removed per round (0.2).
        rewind_iter (int): t of LMC-LTH (reset 'rewind'): 1 <= t < round_iter.
        max_prune_iter (int): defaults to ``rounds * round_iter``; a smaller value is refused.
    """
    reset: str = 'init'
    rounds: int = 5
    round_iter: int = 1000
    prune_fraction: float = 0.2
    rewind_iter: int = None

    @classmethod
    def from_options(cls, options, defaults=None):
        options = dict(options or {})
        if 'max_prune_iter' not in options:
            rounds = options.get('rounds', cls.rounds)
            round_iter = options.get('round_iter', cls.round_iter)
            if isinstance(rounds, int) and isinstance(round_iter, int):
                options['max_prune_iter'] = rounds * round_iter
        return super().from_options(options, defaults)

    def validate(self):
        super().validate()
        check_choice('reset', self.reset, RESETS)
        check_number('rounds', self.rounds, 1, integer=True)
        check_number('round_iter', self.round_iter, 1, integer=True)
        check_number('prune_fraction', self.prune_fraction, 0, 1, low_open=True, high_open=True)
        if self.reset == 'rewind':
            if self.rewind_iter is None:
                raise ValueError("pruning.rewind_iter is required with pruning.reset: rewind (LMC-LTH's t)")
            check_number('rewind_iter', self.rewind_iter, 1, self.round_iter, integer=True, high_open=True)
        elif self.rewind_iter is not None:
            raise ValueError(f'pruning.rewind_iter applies to pruning.reset: rewind only (reset is {self.reset!r})')
        if self.max_prune_iter != self.rounds * self.round_iter:
            raise ValueError(f'pruning.max_prune_iter ({self.max_prune_iter}) must equal pruning.rounds * '
                             f'pruning.round_iter ({self.rounds} * {self.round_iter} = '
                             f'{self.rounds * self.round_iter}); '
                             'leave it out to have it computed')
