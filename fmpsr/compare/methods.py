"""The methods the comparison knows: one entry of :data:`METHODS` per method.

An entry says which ``model_type`` runs the method and how a budget (a kept fraction of params or MACs)
becomes the method's ``pruning`` keys. Adding a method to the comparison is one entry here; a preset
then names it under ``methods``. An entry whose model class is not registered (its ``*_model.py`` is
not in the tree yet) stays in the table; a preset that asks for it is refused with
:class:`MethodNotAvailable` before anything runs.

Budget functions take a :class:`BudgetContext` and return the ``pruning`` keys that drive the method
to the budget (they override the preset's keys of the same name):

* FMP: ``gamma_c + gamma_w = 1 - budget`` with ``gamma_w = weight_share * (1 - budget)`` (FMP Sec. 4.4).
  The default criterion ``total_fixed`` stops each part at its own target, so the run reaches the
  split that ``weight_share`` asks for (up to the channel step ``max_overshoot`` allows). With the
  setting ``criterion: total`` only the sum is a target and the split is whatever the two pruning
  rates give (a race: weights took 2.7 % of the budget in one run and all of it in another), so
  ``weight_share`` then sets only the starting targets, not the split reached. ``criterion:
  keep_ratio``: DHP's rule at the budget;
* DHP: criterion ``keep_ratio`` with ``keep_ratio = budget`` and ``keep_tolerance`` = the budget
  tolerance (DHP's own 0.02 is wider than the comparison's +-1 %);
* SRP, ASSL, L1-norm (``ratio``: ``ceil(r * C)`` channels removed from every pruned group): r found by
  a search on the channel-group counts (:func:`fmpsr.compare.budgets.ratio_for_budget`, using the
  methods' own group selection and rounding from :mod:`fmpsr.pruning.selection`);
* ISS-P / IHT / ISS-R (``prune_ratio`` of each chosen conv's weights): bisection on the exact kept
  count (``ceil(pr * numel)`` removed per conv);
* LTH (``prune_fraction`` p per round, ``rounds`` from the preset): p such that the kept prunable
  weights after the rounds give the params budget (LTH prunes by global magnitude, so its MACs are
  not known before training: MACs budgets are refused);
* kernel masks (``keep_ratio`` of each masked conv's kernels, ERSS-L): bisection on the kept count.

A preset's method section holds ``pruning`` keys, ``train`` keys merged into that method's cells'
``train`` (e.g. SRP's ``sparsity_opt`` penalty schedule, ``finetune``), and the entry's own settings
(FMP: ``weight_share``).
"""
import math
from dataclasses import dataclass
from typing import Callable

from .budgets import Backbone, counts_get, pruning_metric, ratio_for_budget


class BudgetUnreachable(ValueError):
    """No setting of the method's keys brings it within the tolerance of a budget on this backbone (e.g.
    filter pruning that keeps the upsampler's channels cannot reach a small MACs budget on EDSR x4).
    The preset's other cells still run; the report lists the unreachable ones."""


def _check_reached(ctx, kept_count, value_text):
    dense = counts_get(ctx.backbone.original, ctx.metric)
    kept = kept_count / dense
    if abs(kept - ctx.target) > ctx.tolerance:
        raise BudgetUnreachable(f'{ctx.method} cannot keep {ctx.target:g} of the {ctx.metric} within '
                                f'{ctx.tolerance:g} on this backbone: the closest ({value_text}) keeps {kept:.4f}')


class MethodNotAvailable(KeyError):
    """A preset names a method that is not in :data:`METHODS`, or whose ``model_type`` is not registered."""

    def __str__(self):
        return str(self.args[0])


@dataclass
class BudgetContext:
    """What a budget function may use.

    Attributes:
        method (str): the method's name in the table.
        backbone (Backbone): the dense network (counts, channel groups).
        metric (str): 'params' or 'macs' (the budget's metric).
        target (float): kept fraction in (0, 1) of the dense count in ``metric``.
        tolerance (float): allowed deviation of the kept fraction (fraction of the original, e.g. 0.01).
        settings (dict): the preset's section of this method (``pruning`` keys and method settings).
    """
    method: str
    backbone: Backbone
    metric: str
    target: float
    tolerance: float
    settings: dict

    @property
    def pruning(self):
        return dict(self.settings.get('pruning') or {})


@dataclass(frozen=True)
class MethodEntry:
    """One method of the comparison.

    Attributes:
        model_type (str): the registered BasicSR model class.
        budget_keys (callable): :class:`BudgetContext` -> dict of ``pruning`` keys for the budget.
        pruning_type (str): the ``pruning.type`` tag written into the option file (informative).
        settings (tuple): method settings the preset may give beside ``pruning`` (others are refused).
    """
    model_type: str
    budget_keys: Callable
    pruning_type: str
    settings: tuple = ()


def _round(x):
    return round(float(x), 6)


def fmp_keys(ctx):
    """FMP: gamma_c + gamma_w = 1 - target, gamma_w = ``weight_share`` * (1 - target) (default share 0.2).

    The setting ``criterion`` (default 'total_fixed') decides whether that split is the one reached:
    'total_fixed' stops channel and weight pruning each at its own target, so it is (FMP Sec. 4.4, "Total
    Fixed"); 'total' stops when their sum reaches 1 - target, whichever part gets there first, so the split
    is a race between the two pruning rates and ``weight_share`` does not set it; 'keep_ratio' is DHP's
    stopping rule at the target (as options/edsr/fmp_edsr_x4_keep*.yml).

    Raises:
        ValueError: another criterion, or ``weight_share`` not a fraction in [0, 1).
    """
    criterion = ctx.settings.get('criterion', 'total_fixed')
    if criterion == 'keep_ratio':
        return keep_ratio_keys(ctx)
    if criterion not in ('total', 'total_fixed'):
        raise ValueError(f"methods.{ctx.method}.criterion must be 'total_fixed', 'total' or 'keep_ratio', "
                         f"got {criterion!r}")
    share = ctx.settings.get('weight_share', 0.2)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ValueError(f'methods.{ctx.method}.weight_share must be a fraction in [0, 1), got {share!r}')
    pruned = 1.0 - ctx.target
    gamma_w = _round(pruned * share)
    return {'metric': pruning_metric(ctx.metric), 'criterion': criterion, 'gamma_c': _round(pruned - gamma_w),
            'gamma_w': gamma_w}


def keep_ratio_keys(ctx):
    """DHP: criterion 'keep_ratio' at the target, with the comparison's tolerance as DHP's slack."""
    return {'metric': pruning_metric(ctx.metric), 'criterion': 'keep_ratio', 'keep_ratio': _round(ctx.target),
            'keep_tolerance': ctx.pruning.get('keep_tolerance', ctx.tolerance)}


def selection_ratio_keys(ctx):
    """SRP / ASSL / L1-norm: the ``ratio`` whose kept count is closest to the target (see budgets)."""
    pruning = ctx.pruning
    match = ratio_for_budget(ctx.backbone, ctx.metric, ctx.target, ctx.tolerance,
                             skip=tuple(pruning.get('skip_groups') or ()), round_to=pruning.get('round_to'))
    _check_reached(ctx, match.params if pruning_metric(ctx.metric) == 'params' else match.macs,
                   f'ratio {match.value:.4f}')
    return {'metric': pruning_metric(ctx.metric), 'ratio': _round(match.value)}


def unstructured_ratio_keys(ctx):
    """ISS-P / IHT / ISS-R: ``prune_ratio`` such that the kept params / MACs are the target
    (``min(ceil(pr * numel), numel - 1)`` weights removed from each chosen conv; biases kept)."""
    from fmpsr.pruning.unstructured import select_layers

    pruning = ctx.pruning
    specs = ctx.backbone.specs
    chosen = set(select_layers(list(specs), tuple(pruning.get('exclude') or ()),
                               bool(pruning.get('skip_first_last', False))))
    per_unit = pruning_metric(ctx.metric) == 'flops'
    target = ctx.target * counts_get(ctx.backbone.original, ctx.metric)

    def kept(pr):
        total = 0
        for name, s in specs.items():
            numel = s.in_channels * s.out_channels * s.kernel_area
            removed = min(math.ceil(round(pr * numel, 9)), numel - 1) if name in chosen else 0
            weights = numel - removed
            total += weights * s.out_pixels if per_unit else weights + (s.out_channels if s.bias else 0)
        return total

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) > target else (lo, mid)
    pr = min((lo, hi), key=lambda p: abs(kept(p) - target))
    _check_reached(ctx, kept(pr), f'prune_ratio {pr:.4f}')
    return {'metric': pruning_metric(ctx.metric), 'prune_ratio': _round(pr)}


def lth_keys(ctx):
    """LTH: ``prune_fraction`` p per round such that, after ``rounds`` rounds of removing
    ``round(p * remaining)`` prunable weights, the kept params are the target (params budgets only)."""
    from fmpsr.pruning.lth import end_convs, num_removed
    import torch

    if pruning_metric(ctx.metric) != 'params':
        raise ValueError(f'{ctx.method}: LTH prunes by global weight magnitude, so the MACs it keeps are only known '
                         'after training; use a params budget (budget.metric: params)')
    pruning = ctx.pruning
    rounds = int(pruning.get('rounds', 5))
    b = ctx.backbone
    in_ch = b.network_g.get('num_in_ch', 3)
    first, last = end_convs(b.net, b.network_g, b.specs, pruning.get('grouping'),
                            torch.zeros(1, in_ch, *b.macs_input_size))
    fixed = set(first) | set(last)
    prunable = sum(s.in_channels * s.out_channels * s.kernel_area for n, s in b.specs.items() if n not in fixed)
    other = b.original.params - prunable
    target = ctx.target * b.original.params

    def kept(p):
        remaining = prunable
        for _ in range(rounds):
            remaining -= num_removed(remaining, p)
        return other + remaining

    if target <= other:
        raise BudgetUnreachable(f'{ctx.method}: the budget {ctx.target:g} of the params is below what LTH never '
                                f'prunes (first / last convs and biases: {other} of {b.original.params})')
    lo, hi = 0.0, 0.999999
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) > target else (lo, mid)
    p = min((lo, hi), key=lambda q: abs(kept(q) - target))
    _check_reached(ctx, kept(p), f'prune_fraction {p:.4f}')
    return {'metric': 'params', 'prune_fraction': _round(p), 'rounds': rounds}


def kernel_keys(ctx):
    """Kernel masks (``KernelSparseModel``, ``mask`` erss_l by default, or bernoulli): ``keep_ratio`` q of
    the kernels of every masked conv (the convs reading the image / writing the output stay dense),
    ``round(q * c_out * c_in)`` kernels kept per conv, found by bisection on the kept count. ERSS-L keeps
    exactly that many per conv; Bernoulli keeps it in expectation (the report gives what was reached)."""
    from fmpsr.pruning.lth import end_convs
    import torch

    pruning = ctx.pruning
    mask = pruning.get('mask', 'erss_l')
    if mask not in ('erss_l', 'bernoulli'):
        raise ValueError(f'{ctx.method}: budgets are computed for pruning.mask erss_l or bernoulli (a per-conv '
                         f'keep ratio), got {mask!r}')
    b = ctx.backbone
    in_ch = b.network_g.get('num_in_ch', 3)
    first, last = end_convs(b.net, b.network_g, b.specs, pruning.get('grouping'),
                            torch.zeros(1, in_ch, *b.macs_input_size))
    fixed = set(first) | set(last)
    flops = pruning_metric(ctx.metric) == 'flops'
    target = ctx.target * counts_get(b.original, ctx.metric)

    def kept(q):
        total = 0
        for name, s in b.specs.items():
            kernels = s.in_channels * s.out_channels
            k = kernels if name in fixed else int(q * kernels + 0.5)
            weights = k * s.kernel_area
            total += weights * s.out_pixels if flops else weights + (s.out_channels if s.bias else 0)
        return total

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if kept(mid) > target else (mid, hi)  # kept grows with q
    q = min((lo, hi), key=lambda v: abs(kept(v) - target))
    _check_reached(ctx, kept(q), f'keep_ratio {q:.4f}')
    return {'metric': pruning_metric(ctx.metric), 'mask': mask, 'keep_ratio': _round(q)}


def variant(keys, **fixed):
    """A budget function that adds fixed ``pruning`` keys to ``keys``' (a method variant's entry)."""
    def budget_keys(ctx):
        return dict(keys(ctx), **fixed)
    budget_keys.__doc__ = f'{keys.__name__} with {fixed}'
    return budget_keys


#: methods whose papers prune a pretrained dense network (the comparison starts every cell from random
#: weights, which the report says for these)
PRETRAINED_IN_PAPER = ('SRP', 'ASSL', 'L1-norm')

#: method name -> entry. One line adds a method to the comparison.
METHODS = {
    'FMP': MethodEntry('FMPModel', fmp_keys, 'fmp', ('weight_share', 'criterion')),
    'DHP': MethodEntry('DHPModel', keep_ratio_keys, 'dhp'),
    'SRP': MethodEntry('SRPModel', selection_ratio_keys, 'srp'),
    'ASSL': MethodEntry('ASSLModel', selection_ratio_keys, 'assl'),
    'L1-norm': MethodEntry('L1NormModel', selection_ratio_keys, 'l1norm'),
    'ISS-P': MethodEntry('ISSPModel', variant(unstructured_ratio_keys, method='iss_p'), 'issp'),
    'IHT': MethodEntry('ISSPModel', variant(unstructured_ratio_keys, method='iht'), 'issp'),
    'ISS-R': MethodEntry('ISSPModel', variant(unstructured_ratio_keys, method='iss_r'), 'issp'),
    'LTH': MethodEntry('LTHModel', variant(lth_keys, reset='init'), 'lth'),
    'LMC-LTH': MethodEntry('LTHModel', variant(lth_keys, reset='rewind'), 'lth'),
    'LTH-PWC': MethodEntry('LTHModel', variant(lth_keys, reset='continue'), 'lth'),
    'Kernel-ERSS-L': MethodEntry('KernelSparseModel', kernel_keys, 'kernel'),
}


def method_entry(name):
    """The entry of ``name``, its model class registered.

    Raises:
        MethodNotAvailable: ``name`` is not in :data:`METHODS`, or its ``model_type`` is not registered
            (the method's model file is not in this tree).
    """
    import fmpsr  # noqa: F401  (registers the model classes)
    from basicsr.utils.registry import MODEL_REGISTRY

    if name not in METHODS:
        raise MethodNotAvailable(f'methods: unknown method {name!r} (the comparison knows {sorted(METHODS)}; '
                                 'add an entry to fmpsr.compare.methods.METHODS)')
    entry = METHODS[name]
    if entry.model_type not in MODEL_REGISTRY:
        raise MethodNotAvailable(f'methods: {name!r} needs model_type {entry.model_type!r}, which is not registered '
                                 f'in this fmpsr (no such model class in fmpsr/models/)')
    return entry
