"""The FMP pruning controller (FMP Sec. 3.4, 4.4), independent of any trainer.

:class:`FMPPruner` holds everything the pruning stage decides besides the network parameters:
the sparsity regulariser of the weight indicators, the proximal step on channel vectors, the mask
updates, the convergence bookkeeping and which part is frozen. A trainer calls, per iteration,

1. ``loss = reconstruction + pruner.regularization()`` and ``loss.backward()``; optimiser step;
2. ``pruner.proximal_step(lr_of_channel_vectors)`` (FMP Eqs. 9-10) and
   ``pruner.indicator_proximal_step(lr_of_weight_indicators)`` (a no-op unless
   ``indicator_update: proximal``);
3. every ``check_freq`` iterations, ``status = pruner.check()``; stop when ``status.converged``.

Rules fmpsr defines (the paper leaves them open):

* A channel is pruned when |z| < ``prune_threshold`` (DHP: 5e-3), at a check, keeping at least
  ``min_channels`` per group. The L1 term lambda_C ||z||_1 acts only through the proximal step
  (soft-threshold by lr * lambda_C after each optimiser step, as in DHP's code); it is not also
  back-propagated, which would apply the shrinkage twice.
* The weight-indicator regulariser lambda_W R(Z_W) is a BasicSR loss,
  :class:`fmpsr.losses.weight_indicator_loss.WeightIndicatorLoss` (``train.indicator_opt`` in an
  option file; the older keys ``pruning.lambda_w`` / ``weight_reg`` / ``weight_reg_reduction`` give
  its ``loss_weight`` / ``norm`` / ``reduction``). It sees only kept weights (Z_W * keep mask).
  Three ways to apply it (``pruning.indicator_update`` and ``pruning.indicator_optim``):

  - ``gradient`` without ``indicator_optim``: Z_W is a parameter group of ``train.optim_g`` (Adam),
    lr * ``weight_lr_mult``, and the term is back-propagated. With ``reduction: mean`` (the old
    default) the pull per indicator is lambda_W / N_W, which shrinks with network size; with ``sum``
    Adam moves every indicator by about one lr per step whatever its reconstruction gradient.
  - ``gradient`` with ``indicator_optim: {type: SGD, lr: ...}``: Z_W has its own optimiser on
    L_rec + lambda_W R(Z_W), the literal form of FMP Sec. 3.4 ("standard SGD").
  - ``proximal``: the term is not back-propagated; after each optimiser step Z_W takes the proximal
    step of lr * lambda_W R (for L1: soft-thresholding by lr * lambda_W, the operator of the channel
    vectors, Eq. 10), lr being Z_W's learning rate. The shrinkage per step does not depend on Adam's
    normalisation, nor (with ``reduction: sum``) on N_W. ``scripts/benchmark/indicator_dynamics.py``
    measures the three at LSRB-4-32 and ESRB-6-256 scale.
* A weight is pruned when its indicator |Z_W| < ``weight_threshold`` (default 5e-3, DHP's
  channel threshold), at a check, smallest |Z_W| first and no more than the criterion's remaining
  budget (so a wave of indicators reaching zero together does not overshoot the target). Each conv
  keeps at least ``min_channels * kh * kw`` weights. Since weights are pruned whole and never beyond
  the budget, a weight target counts as met within the cost of one weight
  (:meth:`FMPPruner.weight_granularity`; with ``flops`` a weight costs its conv's output pixels).
* Masks are monotone: nothing pruned comes back. A frozen part (``total_fixed``) stops its
  regulariser, its proximal step and its mask updates; its parameters still train as part of the
  weight generator.

The state (:meth:`state_dict`) is small and plain, for checkpoints.
"""
from dataclasses import asdict, dataclass, fields

import torch

from fmpsr.losses.weight_indicator_loss import NORMS, WeightIndicatorLoss

from .accounting import hypernetwork_ratios
from .criteria import ConvergenceCriterion
from .diagnostics import selection_diagnostics
from .hyperconv import proximal_step_vectors_
from .latency import latency_keys
from .nm import check_nm, nm_mask

WEIGHT_REGULARIZERS = NORMS  # ('l1', 'l2', 'weight_decay'), FMP Eq. 7 / Table 5
INDICATOR_UPDATES = ('gradient', 'proximal')


@dataclass(frozen=True)
class FMPConfig:
    """Options of the ``pruning`` section of an FMP option file (keys as in the YAML).

    Attributes:
        metric (str): 'params', 'flops' (MACs) or 'latency' (measured conv time, :mod:`fmpsr.pruning.latency`;
            channel targets only). Default 'params'.
        criterion (str): 'channel' | 'weight' | 'total_fixed' | 'total' | 'keep_ratio' (DHP). Default 'total'.
        gamma_c (float): channel prune target (fraction). Default 0.5.
        gamma_w (float): weight prune target (fraction). Default 0.2.
        keep_ratio (float | None): kept-fraction target of criterion 'keep_ratio' (DHP's ``ratio``).
        keep_tolerance (float): slack of 'keep_ratio': stop at kept <= keep_ratio + keep_tolerance (DHP: 0.02).
        weight_indicators (bool): False switches Z_W off (fixed at one, not trained, no weight
            pruning): FMP becomes DHP (Li et al. ECCV 2020). Default True.
        grouping (str | None): channel groups: 'hand' (the arch's hand-written grouping), 'auto'
            (torch-pruning's dependency graph, any conv arch), None: 'hand' where the arch has one.
        tie_outputs (list): for 'auto': lists of conv names or globs whose outputs share one vector.
        exclude (list): for 'auto': module names or globs left out of pruning (a module excludes its
            submodules); excluded convs stay plain dense convs and every channel coupled to an
            excluded module is fixed (:func:`fmpsr.pruning.coupling.auto_grouping`).
        lambda_c (float): lambda_C, channel-vector L1 factor (FMP: 0.1). Its meaning under Adam: the
            proximal step shrinks every |z| by lr * lambda_C per iteration (lr of the channel vectors,
            ``channel_lr_mult`` included), while Adam moves z by at most about one lr per iteration
            whatever the size of the gradient. So lambda_C is the ratio of the shrink to the largest data
            step: at lambda_C >= 1 no gradient can hold a channel, every z falls, and the kept set is the
            one whose z started largest or fell slowest (with equal initial magnitudes, ``hyper_init:
            plain``, still an order set by the gradients, but all channels fall within a factor
            (lambda_C + 1) / (lambda_C - 1) of the same time); at lambda_C < 1 a channel whose gradient
            consistently pushes |z| up survives. An unheld channel with |z| = 1 is pruned after about
            1 / (lr * lambda_C) iterations (paper: 1e5 at lr 1e-4, lambda_C 0.1). With ``alpha`` = 0 (no
            hypernetwork weight decay, FMP Eq. 4 / 8) the scale between z and W1 is free: at lambda_C < 1
            every z may shrink together while W1 / W2 grow to make up for it, and no channel reaches the
            threshold; ``alpha`` > 0 makes that growth cost something.
        lambda_w (float): lambda_W, weight-indicator regulariser factor (FMP: 0.02).
        weight_reg (str): R(Z_W): 'l1' (default), 'l2' or 'weight_decay' (FMP Eq. 7, Tab. 5).
        weight_reg_reduction (str): 'mean' (default): the loss term is lambda_W * R(Z_W) / N_W, N_W
            the number of indicators; 'sum': the literal lambda_W * R(Z_W) of Eq. 4. ``lambda_w``,
            ``weight_reg`` and ``weight_reg_reduction`` are the ``loss_weight``, ``norm`` and ``reduction``
            of the :class:`~fmpsr.losses.weight_indicator_loss.WeightIndicatorLoss`; an option file may
            give them as ``train.indicator_opt`` instead (FMPModel maps it onto these fields).
        indicator_update (str): 'gradient' (default): the regulariser is back-propagated; 'proximal':
            it is applied by its proximal operator after each optimiser step (see the module docstring).
        indicator_optim (dict | None): None (default): Z_W is a parameter group of ``train.optim_g``;
            a dict ``{type: SGD, lr: ..., <torch.optim kwargs>}``: Z_W gets its own optimiser (FMP
            Sec. 3.4), scheduled like ``optim_g``. ``type`` is any ``torch.optim`` class.
        embed_dim (int): hypernetwork embedding size m (DHP: 8).
        hyper_init (str): how the hypernetwork starts (:class:`~fmpsr.pruning.hypernet.HyperNetwork`'s
            ``init``): 'plain' (default): at the plain network's initialised scale, every channel vector
            entry 1 (the kept set is then decided by the gradients); 'dhp': DHP's code (z ~ N(0, 1),
            output up to 1e4x the plain network's before training).
        prune_threshold (float): |z| below which a channel is pruned (DHP: 5e-3).
        weight_threshold (float): |Z_W| below which a weight is pruned (5e-3).
        min_channels (int): channels every prunable group keeps (DHP: 4).
        check_freq (int): iterations between mask updates / convergence checks (DHP: 100).
        max_prune_iter (int): cap on pruning iterations; the stage then ends with what it has.
        macs_input_size (list[int]): LR (H, W) in pixels at which MACs are counted (FMP Sec. 4.3: 64x64).
        channel_lr_mult (float): learning-rate multiplier of the channel vectors (paper: 1). The
            proximal threshold uses the resulting lr.
        weight_lr_mult (float): learning-rate multiplier of the weight indicators inside ``optim_g``
            (default 1). With ``indicator_update: proximal`` an indicator that L_rec does not hold falls
            from 1 to 0 in 1 / (lr * weight_lr_mult * lambda_W) iterations: the paper option files use
            10 (50 K iterations at lr 1e-4, lambda_W 0.02; see scripts/benchmark/indicator_dynamics.py).
        nm (tuple): () or [N, M]: N:M weight masks instead of the threshold rule: at every check each
            conv keeps the N largest |Z_W| of every M consecutive kept input channels (see
            :meth:`FMPPruner._update_nm_masks`). Default () (off).
        round_to (int): kept channels of every prunable group are rounded up to a multiple of it at
            each mask update (torch-pruning's ``round_to``; see :meth:`ChannelVector.update_mask_`),
            so masks, counts and the finalized widths are multiples. Default 1 (off).
        max_overshoot (float | None): None (default): a check prunes every channel below the threshold
            at once (DHP), so a wave of channels, or one coarse ``round_to`` step of a wide group, can
            carry the channel ratio well past the target. A fraction (of the original, in the metric,
            e.g. 0.02): a check whose whole wave would pass ``target + max_overshoot`` prunes it step by
            step instead, smallest |z| first, skipping any step that would pass that bound and
            stopping at the target (see :meth:`FMPPruner._update_channel_masks`). Skipped channels are
            tried again at later checks; if no step ever fits, the stage ends at ``max_prune_iter``.
        latency (dict | None): how ``metric: latency`` gets its table (:func:`fmpsr.pruning.latency.latency_keys`:
            ``table``, ``device``, ``threads``, ``step``, ``warmup``, ``repeats``); only with that metric.

    Raises:
        ValueError: in :meth:`from_options`, an unknown key or a bad value (named in the message).
    """
    metric: str = 'params'
    criterion: str = 'total'
    gamma_c: float = 0.5
    gamma_w: float = 0.2
    keep_ratio: float = None
    keep_tolerance: float = 0.02
    weight_indicators: bool = True
    grouping: str = None
    tie_outputs: tuple = ()
    exclude: tuple = ()
    lambda_c: float = 0.1
    lambda_w: float = 0.02
    weight_reg: str = 'l1'
    weight_reg_reduction: str = 'mean'
    indicator_update: str = 'gradient'
    indicator_optim: dict = None
    embed_dim: int = 8
    hyper_init: str = 'plain'
    prune_threshold: float = 5e-3
    weight_threshold: float = 5e-3
    min_channels: int = 4
    check_freq: int = 100
    max_prune_iter: int = 300000
    macs_input_size: tuple = (64, 64)
    channel_lr_mult: float = 1.0
    weight_lr_mult: float = 1.0
    nm: tuple = ()
    round_to: int = 1
    max_overshoot: float = None
    latency: dict = None

    @classmethod
    def from_options(cls, options, defaults=None):
        """Build from the ``pruning`` dict of an option file (``type`` is ignored here); ``defaults``
        (dict) replaces the class defaults for keys the file leaves out."""
        options = {**(defaults or {}), **dict(options or {})}
        options.pop('type', None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f'pruning: unknown key(s) {unknown}; known keys are {sorted(known)}')
        for key in ('macs_input_size', 'tie_outputs', 'exclude'):
            if key in options and isinstance(options[key], list):
                options[key] = tuple(tuple(v) if isinstance(v, list) else v for v in options[key])
        for key in ('indicator_optim', 'latency'):
            if isinstance(options.get(key), dict):
                options[key] = dict(options[key])
        config = cls(**options)
        config.validate()
        return config

    def validate(self):
        self.criterion_rule()  # metric, criterion and targets
        if not isinstance(self.weight_indicators, bool):
            raise ValueError(f'pruning.weight_indicators must be true or false, got {self.weight_indicators!r}')
        if self.grouping not in (None, 'hand', 'auto'):
            raise ValueError(f"pruning.grouping: unknown mode {self.grouping!r} (choose from ['hand', 'auto'])")
        if not isinstance(self.tie_outputs, tuple) or not all(
                isinstance(t, str) or (isinstance(t, tuple) and all(isinstance(n, str) for n in t))
                for t in self.tie_outputs):
            raise ValueError(f'pruning.tie_outputs must be a list of lists of conv names, got {self.tie_outputs!r}')
        if not isinstance(self.exclude, tuple) or not all(isinstance(n, str) for n in self.exclude):
            raise ValueError(f'pruning.exclude must be a list of module names or globs, got {self.exclude!r}')
        if self.weight_reg_reduction not in ('mean', 'sum'):
            raise ValueError(f"pruning.weight_reg_reduction: unknown reduction {self.weight_reg_reduction!r} "
                             "(choose from ['mean', 'sum'])")
        if self.hyper_init not in ('plain', 'dhp'):
            raise ValueError(f"pruning.hyper_init: unknown init {self.hyper_init!r} (choose from ['plain', 'dhp'])")
        self.validate_indicator_update()
        self.validate_nm()
        if self.weight_reg not in WEIGHT_REGULARIZERS:
            raise ValueError(f'pruning.weight_reg: unknown regulariser {self.weight_reg!r} '
                             f'(choose from {list(WEIGHT_REGULARIZERS)})')
        for key in ('lambda_c', 'lambda_w', 'prune_threshold', 'weight_threshold', 'channel_lr_mult',
                    'weight_lr_mult'):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f'pruning.{key} must be a number >= 0, got {value!r}')
        for key in ('embed_dim', 'min_channels', 'check_freq', 'max_prune_iter', 'round_to'):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'pruning.{key} must be an integer >= 1, got {value!r}')
        overshoot = self.max_overshoot
        if overshoot is not None and (isinstance(overshoot, bool) or not isinstance(overshoot, (int, float))
                                      or not 0 <= overshoot < 1):
            raise ValueError(f'pruning.max_overshoot must be null or a fraction in [0, 1), got {overshoot!r}')
        if overshoot is not None and self.criterion == 'weight':
            raise ValueError("pruning.max_overshoot bounds channel pruning at the channel target, but criterion "
                             "'weight' has none; remove max_overshoot or choose another criterion")
        if self.latency is not None and self.metric != 'latency':
            raise ValueError(f'pruning.latency is set but pruning.metric is {self.metric!r}: set metric: latency '
                             'or remove pruning.latency')
        if self.metric == 'latency':
            object.__setattr__(self, 'latency', latency_keys(self.latency))
        size = self.macs_input_size
        if len(size) != 2 or not all(isinstance(v, int) and v >= 15 for v in size):
            raise ValueError(f'pruning.macs_input_size must be [H, W] with H, W >= 15 LR pixels, got {list(size)}')

    def validate_indicator_update(self):
        """Check ``indicator_update`` and ``indicator_optim`` (ValueError naming the key)."""
        if self.indicator_update not in INDICATOR_UPDATES:
            raise ValueError(f'pruning.indicator_update: unknown update {self.indicator_update!r} '
                             f'(choose from {list(INDICATOR_UPDATES)})')
        optim = self.indicator_optim
        if optim is None:
            return
        if not isinstance(optim, dict) or 'type' not in optim or 'lr' not in optim:
            raise ValueError(f'pruning.indicator_optim must be a dict with type and lr (e.g. {{type: SGD, lr: 0.1}}), '
                             f'got {optim!r}')
        cls = getattr(torch.optim, str(optim['type']), None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"pruning.indicator_optim.type: {optim['type']!r} is not a torch.optim optimiser "
                             "(e.g. SGD, Adam)")
        lr = optim['lr']
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            raise ValueError(f'pruning.indicator_optim.lr must be a number > 0, got {lr!r}')
        if self.weight_lr_mult != 1.0:
            raise ValueError('pruning.weight_lr_mult applies to the indicators inside train.optim_g; with '
                             'pruning.indicator_optim set its lr instead (remove weight_lr_mult)')

    def validate_nm(self):
        """Check ``nm`` (ValueError naming ``pruning.nm``): [N, M] with 1 <= N < M, weight indicators on,
        and not criterion 'total_fixed' (which freezes the weight masks while channels still change)."""
        if not self.nm:
            object.__setattr__(self, 'nm', ())
            return
        if not isinstance(self.nm, (list, tuple)) or len(self.nm) != 2:
            raise ValueError(f'pruning.nm must be [N, M], got {self.nm!r}')
        object.__setattr__(self, 'nm', check_nm(*self.nm))
        if not self.weight_indicators:
            raise ValueError('pruning.nm needs weight indicators (pruning.weight_indicators: true)')
        if self.criterion == 'total_fixed':
            raise ValueError("pruning.nm cannot be used with criterion 'total_fixed' (its weight part would freeze the "
                             "N:M masks while channels are still pruned); use 'channel' or 'keep_ratio'")

    def criterion_rule(self):
        return ConvergenceCriterion(self.metric, self.criterion, self.gamma_c, self.gamma_w, self.keep_ratio,
                                    self.keep_tolerance)


class FMPPruner:
    """Drives channel and weight pruning of a :class:`~fmpsr.pruning.hypernet.HyperNetwork`.

    Args:
        hyper (HyperNetwork): the network being pruned (not a DDP wrapper).
        specs (dict): conv name -> ConvSpec at ``config.macs_input_size``.
        config (FMPConfig): options.
        indicator_loss (nn.Module | None): the regulariser lambda_W R(Z_W), called as
            ``indicator_loss(indicators, masks)`` (and ``indicator_loss.proximal_(indicators, lr, masks)``
            for ``indicator_update: proximal``); None builds
            :class:`~fmpsr.losses.weight_indicator_loss.WeightIndicatorLoss` from ``config.lambda_w``,
            ``weight_reg`` and ``weight_reg_reduction``.
    """

    def __init__(self, hyper, specs, config, indicator_loss=None, latency=None):
        if config.metric == 'latency' and latency is None:
            raise ValueError('pruning.metric: latency needs a latency table (FMPPruner(..., latency=LatencyTable))')
        self.hyper, self.specs, self.config, self.latency = hyper, specs, config, latency
        self.indicator_loss = indicator_loss if indicator_loss is not None else WeightIndicatorLoss(
            loss_weight=config.lambda_w, norm=config.weight_reg, reduction=config.weight_reg_reduction)
        self.rule = config.criterion_rule()
        self.channel_frozen = False
        self.weight_frozen = not config.weight_indicators  # DHP: no weight pruning at all
        self.converged = False
        self.deferred_channels = 0  # channels below the threshold that the last check left (max_overshoot)
        self.ratios = hypernetwork_ratios(hyper, specs, latency)
        # selection diagnostic (fmpsr.pruning.diagnostics): |z| at the start of the search, and the
        # first-order Taylor importance sum_t |dL/dz_t * z_t| of every prunable channel, accumulated by
        # accumulate_importance() while channels are searched; flat, in prunable_vectors() order
        self.initial_magnitude = self._flat_z().abs().double().cpu()
        self.importance = None

    # ---- selection diagnostic ----
    def _flat_z(self):
        vectors = self.hyper.prunable_vectors()
        if not vectors:
            return torch.zeros(0)
        return torch.cat([v.z.detach() for v in vectors])

    @torch.no_grad()
    def accumulate_importance(self):
        """Add ``|dL/dz * z|`` of every prunable channel (the first-order Taylor estimate of the loss
        change when the channel is removed) to :attr:`importance`. Call after ``backward`` and before
        the optimiser step; a no-op once the channel part is frozen or the stage has converged, or when
        a vector has no gradient."""
        if self.channel_frozen or self.converged:
            return
        vectors = self.hyper.prunable_vectors()
        grads = [v.z.grad for v in vectors]
        if not vectors or any(g is None for g in grads):
            return
        step = (torch.cat(grads) * torch.cat([v.z.detach() for v in vectors])).abs_()
        if self.importance is None:
            self.importance = torch.zeros_like(step)
        self.importance.add_(step)

    def selection_report(self):
        """:func:`~fmpsr.pruning.diagnostics.selection_diagnostics` of the current masks: per prunable
        group, the AUC of the initial |z| and of the accumulated Taylor importance as predictors of
        "kept" (dict, JSON-friendly)."""
        names = [n for n, v in self.hyper.channel_vectors.items() if v.prunable]
        sizes = [self.hyper.channel_vectors[n].size for n in names]
        importance = None if self.importance is None else self.importance.double().cpu().split(sizes)
        groups = {}
        for number, (name, initial) in enumerate(zip(names, self.initial_magnitude.split(sizes))):
            groups[name] = {'kept': self.hyper.channel_vectors[name].mask.cpu(), 'initial': initial,
                            'importance': None if importance is None else importance[number]}
        report = selection_diagnostics(groups)
        report['importance'] = 'sum over the prune stage of |dL/dz * z| (first-order Taylor)'
        return report

    # ---- regularisers (FMP Eqs. 4, 6, 7) ----
    def weight_regularization_active(self):
        """Whether Z_W is still being sparsified (weight indicators on, weight part not frozen, not converged)."""
        return self.config.weight_indicators and not self.weight_frozen and not self.converged

    def _kept_indicators(self):
        """(indicators, keep masks): one (n, c_out, c_in, kh, kw) pair per bank of same-shape convs; the
        masks are 0/1 floats (:meth:`HyperNetwork.mask_tensors`)."""
        indicators = [bank.weight_indicator for bank in self.hyper.banks]
        return indicators, self.hyper.mask_tensors()[1]

    def regularization(self):
        """lambda_W * R(Z_W) over the kept weights (a differentiable scalar tensor), the term of Eq. 4
        that is back-propagated; 0 when frozen, when lambda_W is 0, or with ``indicator_update:
        proximal`` (the term then acts through :meth:`indicator_proximal_step`).

        R and the reduction are the indicator loss's
        (:class:`~fmpsr.losses.weight_indicator_loss.WeightIndicatorLoss`: 'l1', 'l2' one norm per
        layer, 'weight_decay'; 'sum' or 'mean' over the N_W indicators).
        """
        indicators, masks = self._kept_indicators() if self._regularizer_on('gradient') else (None, None)
        if indicators is None:
            return next(iter(self.hyper.banks)).weight_indicator.sum() * 0.0
        return self.indicator_loss(indicators, masks)

    def _regularizer_on(self, update):
        return (self.weight_regularization_active() and self.config.indicator_update == update
                and getattr(self.indicator_loss, 'loss_weight', 1.0) != 0)

    @torch.no_grad()
    def indicator_proximal_step(self, lr):
        """With ``indicator_update: proximal``: the proximal step of ``lr * lambda_W R`` on the kept
        weight indicators (L1: soft-threshold by lr * lambda_W, as Eq. 10 does for channel vectors);
        pruned indicators are set to zero. No-op otherwise.

        Args:
            lr (float): current learning rate of the weight indicators.
        """
        if not self._regularizer_on('proximal'):
            return
        indicators, masks = self._kept_indicators()
        self.indicator_loss.proximal_(indicators, lr, masks)

    @torch.no_grad()
    def channel_regularization(self):
        """lambda_C * R(z_C) = lambda_C * sum ||z||_1 over prunable vectors (FMP Eq. 6), a float for logs."""
        vectors = self.hyper.prunable_vectors()
        if not vectors:
            return 0.0
        z = torch.cat([v.z for v in vectors]) * torch.cat([v.mask for v in vectors])
        return self.config.lambda_c * float(z.abs().sum())

    @torch.no_grad()
    def proximal_step(self, lr):
        """Soft-threshold every prunable channel vector by ``lr * lambda_C`` (FMP Eq. 10).

        Args:
            lr (float): current learning rate of the channel vectors' parameter group.
        """
        if self.channel_frozen or self.converged:
            return
        proximal_step_vectors_(self.hyper.prunable_vectors(), lr * self.config.lambda_c, self.config.prune_threshold,
                               self.config.min_channels)

    # ---- masks and convergence ----
    @torch.no_grad()
    def check(self):
        """Update the masks, recount, and evaluate the convergence rule.

        Returns:
            CriterionStatus: the rule's outcome on the new ratios.
        """
        metric = self.config.metric
        if not self.channel_frozen:
            self._update_channel_masks()
        if not self.weight_frozen:
            budget = self.rule.weight_budget(self.ratios.channel_ratio(metric), self.ratios.weight_ratio(metric))
            self._update_weight_masks(budget * self.ratios.original.get(metric))
            self.ratios = hypernetwork_ratios(self.hyper, self.specs, self.latency)
        status = self.rule.status(self.ratios.channel_ratio(metric), self.ratios.weight_ratio(metric),
                                  self.weight_granularity())
        self.channel_frozen |= status.channel_done
        if self.config.weight_indicators and self.rule.criterion == 'total_fixed':
            # Channels pruned after the weight part froze take pruned weights with them, so the weight ratio
            # of FMP Sec. 4.4 can fall back below gamma_w: the weight part then goes on again (its masks stay
            # monotone) until it is back at its target.
            self.weight_frozen = status.weight_done
        else:
            self.weight_frozen |= status.weight_done
        self.converged |= status.converged
        return status

    def _count(self):
        self.ratios = hypernetwork_ratios(self.hyper, self.specs, self.latency)
        return self.ratios.channel_ratio(self.config.metric)

    @torch.no_grad()
    def _update_channel_masks(self):
        """Mask every channel with |z| below ``prune_threshold`` (:meth:`ChannelVector.update_mask_`), then
        recount. With ``max_overshoot`` set, a wave that would carry the channel ratio past the rule's
        target (:meth:`ConvergenceCriterion.channel_target`) by more than ``max_overshoot`` is taken step by
        step instead (:meth:`ChannelVector.drop_units`: one channel, or ``round_to`` channels, of one group),
        smallest |z| first: a step that would pass ``target + max_overshoot`` is skipped (with the later
        steps of its group), and the update stops once the target is reached. ``deferred_channels`` counts
        the channels left below the threshold by this check."""
        cfg, metric = self.config, self.config.metric
        vectors = self.hyper.prunable_vectors()
        before = [v.mask.clone() for v in vectors]
        proposals = [v.proposed_keep(cfg.prune_threshold, cfg.min_channels, cfg.round_to) for v in vectors]
        for vector, keep in zip(vectors, proposals):
            vector.mask.copy_(keep)  # z is zeroed at the end, so an undone wave keeps its |z| order
        self.deferred_channels = 0
        target = None if cfg.max_overshoot is None else self.rule.channel_target(self.ratios.weight_ratio(metric))
        if target is None or self._count() <= target + cfg.max_overshoot:
            for vector in vectors:
                vector.z.data.mul_(vector.mask)
            self._count()
            return
        for vector, mask in zip(vectors, before):  # the wave overshoots: undo it, then step by step
            vector.mask.copy_(mask)
        units = []
        for number, (vector, keep) in enumerate(zip(vectors, proposals)):
            magnitude = vector.z.detach().abs()
            units += [(float(magnitude[idx].max()), number, order, idx)
                      for order, idx in enumerate(vector.drop_units(keep, cfg.round_to))]
        units.sort(key=lambda u: (u[0], u[1], u[2]))
        blocked, ratio = set(), self._count()
        for _, number, _, idx in units:
            if ratio >= target:
                break
            if number in blocked:
                continue
            vectors[number].mask[idx] = False
            new_ratio = self._count()
            if new_ratio > target + cfg.max_overshoot:
                vectors[number].mask[idx] = True
                blocked.add(number)
                continue
            ratio = new_ratio
        for vector, keep in zip(vectors, proposals):
            vector.z.data.mul_(vector.mask)
            self.deferred_channels += int((vector.mask & ~keep).sum())
        self._count()

    def weight_granularity(self):
        """The cost of pruning one weight of the costliest conv, as a fraction of the original network
        in the pruning metric (1 / params, or the conv's output pixels / MACs): weights are pruned whole
        and never beyond the budget, so a weight target is met within this much (0 without weight pruning)."""
        if not self.config.weight_indicators:
            return 0.0
        metric = self.config.metric
        if metric == 'latency':  # weight zeros cost no time: the weight ratio stays 0
            return 0.0
        cost = 1 if metric == 'params' else max(spec.out_pixels for spec in self.specs.values())
        return cost / self.ratios.original.get(metric)

    def _update_weight_masks(self, budget):
        """Prune indicators below ``weight_threshold``, smallest first, within ``budget`` metric units."""
        if self.config.nm:
            return self._update_nm_masks()
        if budget <= 0:
            return
        mags, costs, owners = [], [], []
        for name, conv in self.hyper.hyper_convs():
            keep = conv.keep_mask()
            spec = self.specs[name]
            floor = min(self.config.min_channels * spec.kernel_area, int(keep.sum()))
            magnitude = conv.weight_indicator.detach().abs().flatten()
            candidate = keep.flatten() & (magnitude < self.config.weight_threshold)
            if floor > 0:
                # the `floor` largest kept indicators are never pruned (by index, so ties cannot block)
                ranked = magnitude.masked_fill(~keep.flatten(), -1.0)
                candidate[ranked.topk(floor).indices] = False
            idx = candidate.nonzero().flatten()
            if idx.numel() == 0:
                continue
            cost = {'params': 1, 'flops': spec.out_pixels}.get(self.config.metric, 0)  # latency: free
            mags.append(magnitude[idx])
            costs.append(torch.full((idx.numel(),), float(cost), dtype=torch.float64, device=idx.device))
            owners.append((conv, idx))
        if not mags:
            return
        mags, costs = torch.cat(mags), torch.cat(costs)
        order = torch.argsort(mags, stable=True)
        take = torch.zeros_like(mags, dtype=torch.bool)
        take[order[torch.cumsum(costs[order], 0) <= budget]] = True
        offset = 0
        for conv, idx in owners:
            chosen = idx[take[offset:offset + idx.numel()]]
            offset += idx.numel()
            conv.weight_mask.view(-1)[chosen] = False

    @torch.no_grad()
    def _update_nm_masks(self):
        """N:M weight masks (``config.nm`` = (N, M)), replacing the threshold rule at every check.

        For each conv, in every group of M consecutive *kept* input channels at each (output channel,
        kernel position), the N largest |Z_W| are kept (:func:`fmpsr.pruning.nm.nm_mask`); a last group
        of fewer than M kept channels is kept whole. The groups are formed over the kept channels, so
        the finalized (sliced) conv has the N:M pattern along its input axis. Unlike the threshold
        rule, these masks are recomputed at every check (not monotone), so they always match the
        current channel masks, including at the check that ends the stage.
        """
        n, m = self.config.nm
        for _, conv in self.hyper.hyper_convs():
            cols = conv.in_vector.channel_mask().nonzero().flatten()
            keep = torch.ones_like(conv.weight_mask)
            if cols.numel():
                scores = conv.weight_indicator.detach().abs().index_select(1, cols)
                keep[:, cols] = nm_mask(scores, n, m, axis=1, partial='keep')
            conv.weight_mask.copy_(keep)

    # ---- checkpoints ----
    def state_dict(self):
        """Plain-Python state (flags and config) for checkpoints; masks live in the network's buffers."""
        return {'channel_frozen': self.channel_frozen, 'weight_frozen': self.weight_frozen,
                'converged': self.converged, 'config': asdict(self.config),
                'initial_magnitude': self.initial_magnitude.tolist(),
                'importance': None if self.importance is None else self.importance.double().cpu().tolist()}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`'s flags and the selection diagnostic's accumulators (states written
        before the diagnostic existed keep the |z| at load as the initial magnitudes)."""
        self.channel_frozen = bool(state['channel_frozen'])
        self.weight_frozen = bool(state['weight_frozen'])
        self.converged = bool(state['converged'])
        initial, importance = state.get('initial_magnitude'), state.get('importance')
        size = self.initial_magnitude.numel()
        if initial is not None and len(initial) == size:
            self.initial_magnitude = torch.tensor(initial, dtype=torch.float64)
        if importance is not None and len(importance) == size:
            device = self.hyper.prunable_vectors()[0].z.device
            self.importance = torch.tensor(importance, dtype=self.hyper.prunable_vectors()[0].z.dtype, device=device)
        self.ratios = hypernetwork_ratios(self.hyper, self.specs, self.latency)
