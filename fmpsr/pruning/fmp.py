"""The FMP pruning controller (FMP Sec. 3.4, 4.4), independent of any trainer.

:class:`FMPPruner` holds everything the pruning stage decides besides the network parameters:
the sparsity regulariser of the weight indicators, the proximal step on channel vectors, the mask
updates, the convergence bookkeeping and which part is frozen. A trainer calls, per iteration,

1. ``loss = reconstruction + pruner.regularization()`` and ``loss.backward()``; optimiser step;
2. ``pruner.proximal_step(lr_of_channel_vectors)`` (FMP Eqs. 9-10);
3. every ``check_freq`` iterations, ``status = pruner.check()``; stop when ``status.converged``.

Rules fmpsr defines (the paper leaves them open):

* A channel is pruned when |z| < ``prune_threshold`` (DHP: 5e-3), at a check, keeping at least
  ``min_channels`` per group. The L1 term lambda_C ||z||_1 acts only through the proximal step
  (soft-threshold by lr * lambda_C after each optimiser step, as in DHP's code); it is not also
  back-propagated, which would apply the shrinkage twice.
* The weight-indicator regulariser is averaged over the N_W indicators by default
  (``weight_reg_reduction: mean``): lambda_W * R(Z_W) / N_W. With the literal sum of Eq. 4 and
  lambda_W = 0.02, the pull on each indicator (0.02) exceeds its reconstruction gradient by orders of
  magnitude (measured on LSRB-4-32 x4 after 300 Adam steps: median 1.5e-8, 99th percentile 1.5e-4),
  so Adam, which normalises each parameter's step, shrinks every indicator at the same rate and the
  network collapses. Averaged, the pull (1.6e-7 there) separates indicators by their reconstruction
  gradient, which is the importance signal the paper intends. ``sum`` keeps the literal form.
* A weight is pruned when its indicator |Z_W| < ``weight_threshold`` (default 5e-3, DHP's
  channel threshold), at a check, smallest |Z_W| first and no more than the criterion's remaining
  budget (so a wave of indicators reaching zero together does not overshoot the target). Each conv
  keeps at least ``min_channels * kh * kw`` weights.
* Masks are monotone: nothing pruned comes back. A frozen part (``total_fixed``) stops its
  regulariser, its proximal step and its mask updates; its parameters still train as part of the
  weight generator.

The state (:meth:`state_dict`) is small and plain, for checkpoints.
"""
from dataclasses import asdict, dataclass, fields

import torch

from .accounting import hypernetwork_ratios
from .criteria import ConvergenceCriterion

WEIGHT_REGULARIZERS = ('l1', 'l2', 'weight_decay')


@dataclass(frozen=True)
class FMPConfig:
    """Options of the ``pruning`` section of an FMP option file (keys as in the YAML).

    Attributes:
        metric (str): 'params' or 'flops' (MACs). Default 'params'.
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
        lambda_c (float): lambda_C, channel-vector L1 factor (FMP: 0.1).
        lambda_w (float): lambda_W, weight-indicator regulariser factor (FMP: 0.02).
        weight_reg (str): R(Z_W): 'l1' (default), 'l2' or 'weight_decay' (FMP Eq. 7, Tab. 5).
        weight_reg_reduction (str): 'mean' (default): the loss term is lambda_W * R(Z_W) / N_W, N_W
            the number of indicators; 'sum': the literal lambda_W * R(Z_W) of Eq. 4. See the module
            docstring for why 'mean' is the default.
        embed_dim (int): hypernetwork embedding size m (DHP: 8).
        prune_threshold (float): |z| below which a channel is pruned (DHP: 5e-3).
        weight_threshold (float): |Z_W| below which a weight is pruned (5e-3).
        min_channels (int): channels every prunable group keeps (DHP: 4).
        check_freq (int): iterations between mask updates / convergence checks (DHP: 100).
        max_prune_iter (int): cap on pruning iterations; the stage then ends with what it has.
        macs_input_size (list[int]): LR (H, W) in pixels at which MACs are counted (FMP Sec. 4.3: 64x64).
        channel_lr_mult (float): learning-rate multiplier of the channel vectors (paper: 1). The
            proximal threshold uses the resulting lr.
        weight_lr_mult (float): learning-rate multiplier of the weight indicators (paper: 1). Short
            runs raise it: indicators start at 1 and move about one lr per Adam step.

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
    lambda_c: float = 0.1
    lambda_w: float = 0.02
    weight_reg: str = 'l1'
    weight_reg_reduction: str = 'mean'
    embed_dim: int = 8
    prune_threshold: float = 5e-3
    weight_threshold: float = 5e-3
    min_channels: int = 4
    check_freq: int = 100
    max_prune_iter: int = 300000
    macs_input_size: tuple = (64, 64)
    channel_lr_mult: float = 1.0
    weight_lr_mult: float = 1.0

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
        for key in ('macs_input_size', 'tie_outputs'):
            if key in options and isinstance(options[key], list):
                options[key] = tuple(tuple(v) if isinstance(v, list) else v for v in options[key])
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
        if self.weight_reg_reduction not in ('mean', 'sum'):
            raise ValueError(f"pruning.weight_reg_reduction: unknown reduction {self.weight_reg_reduction!r} "
                             "(choose from ['mean', 'sum'])")
        if self.weight_reg not in WEIGHT_REGULARIZERS:
            raise ValueError(f'pruning.weight_reg: unknown regulariser {self.weight_reg!r} '
                             f'(choose from {list(WEIGHT_REGULARIZERS)})')
        for key in ('lambda_c', 'lambda_w', 'prune_threshold', 'weight_threshold', 'channel_lr_mult',
                    'weight_lr_mult'):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f'pruning.{key} must be a number >= 0, got {value!r}')
        for key in ('embed_dim', 'min_channels', 'check_freq', 'max_prune_iter'):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'pruning.{key} must be an integer >= 1, got {value!r}')
        size = self.macs_input_size
        if len(size) != 2 or not all(isinstance(v, int) and v >= 15 for v in size):
            raise ValueError(f'pruning.macs_input_size must be [H, W] with H, W >= 15 LR pixels, got {list(size)}')

    def criterion_rule(self):
        return ConvergenceCriterion(self.metric, self.criterion, self.gamma_c, self.gamma_w, self.keep_ratio,
                                    self.keep_tolerance)


class FMPPruner:
    """Drives channel and weight pruning of a :class:`~fmpsr.pruning.hypernet.HyperNetwork`.

    Args:
        hyper (HyperNetwork): the network being pruned (not a DDP wrapper).
        specs (dict): conv name -> ConvSpec at ``config.macs_input_size``.
        config (FMPConfig): options.
    """

    def __init__(self, hyper, specs, config):
        self.hyper, self.specs, self.config = hyper, specs, config
        self.rule = config.criterion_rule()
        self.channel_frozen = False
        self.weight_frozen = not config.weight_indicators  # DHP: no weight pruning at all
        self.converged = False
        self.ratios = hypernetwork_ratios(hyper, specs)

    # ---- regularisers (FMP Eqs. 4, 6, 7) ----
    def regularization(self):
        """lambda_W * R(Z_W) over the kept weights (a differentiable scalar tensor; 0 if frozen).

        R is sum over layers of ||Z_W^l||_1 ('l1'), ||Z_W^l||_2 ('l2') or 0.5 ||Z_W^l||_2^2
        ('weight_decay') (FMP Eq. 7), divided by the number of indicators N_W when
        ``weight_reg_reduction`` is 'mean'.
        """
        banks = list(self.hyper.bank_members())
        if self.weight_frozen or self.config.lambda_w == 0 or not self.config.weight_indicators:
            return banks[0][0].weight_indicator.sum() * 0.0
        # kept indicators, one (n, c_out, c_in, kh, kw) tensor per bank of same-shape convs
        kept = [bank.weight_indicator * torch.stack([c.keep_mask() for c in members]) for bank, members in banks]
        if self.config.weight_reg == 'l1':
            total = sum(z_w.abs().sum() for z_w in kept)
        elif self.config.weight_reg == 'l2':  # one norm per layer
            total = sum(z_w.pow(2).flatten(1).sum(1).add(1e-12).sqrt().sum() for z_w in kept)
        else:
            total = 0.5 * sum(z_w.pow(2).sum() for z_w in kept)
        if self.config.weight_reg_reduction == 'mean':
            total = total / sum(bank.weight_indicator.numel() for bank, _ in banks)
        return self.config.lambda_w * total

    @torch.no_grad()
    def channel_regularization(self):
        """lambda_C * R(z_C) = lambda_C * sum ||z||_1 over prunable vectors (FMP Eq. 6), a float for logs."""
        return self.config.lambda_c * sum(float((v.z * v.mask).abs().sum()) for v in self.hyper.prunable_vectors())

    @torch.no_grad()
    def proximal_step(self, lr):
        """Soft-threshold every prunable channel vector by ``lr * lambda_C`` (FMP Eq. 10).

        Args:
            lr (float): current learning rate of the channel vectors' parameter group.
        """
        if self.channel_frozen or self.converged:
            return
        for vector in self.hyper.prunable_vectors():
            vector.proximal_step_(lr * self.config.lambda_c, self.config.prune_threshold, self.config.min_channels)

    # ---- masks and convergence ----
    @torch.no_grad()
    def check(self):
        """Update the masks, recount, and evaluate the convergence rule.

        Returns:
            CriterionStatus: the rule's outcome on the new ratios.
        """
        metric = self.config.metric
        if not self.channel_frozen:
            for vector in self.hyper.prunable_vectors():
                vector.update_mask_(self.config.prune_threshold, self.config.min_channels)
            self.ratios = hypernetwork_ratios(self.hyper, self.specs)
        if not self.weight_frozen:
            budget = self.rule.weight_budget(self.ratios.channel_ratio(metric), self.ratios.weight_ratio(metric))
            self._update_weight_masks(budget * self.ratios.original.get(metric))
            self.ratios = hypernetwork_ratios(self.hyper, self.specs)
        status = self.rule.status(self.ratios.channel_ratio(metric), self.ratios.weight_ratio(metric))
        self.channel_frozen |= status.channel_done
        self.weight_frozen |= status.weight_done
        self.converged |= status.converged
        return status

    def _update_weight_masks(self, budget):
        """Prune indicators below ``weight_threshold``, smallest first, within ``budget`` metric units."""
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
            cost = 1 if self.config.metric == 'params' else spec.out_pixels
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

    # ---- checkpoints ----
    def state_dict(self):
        """Plain-Python state (flags and config) for checkpoints; masks live in the network's buffers."""
        return {'channel_frozen': self.channel_frozen, 'weight_frozen': self.weight_frozen,
                'converged': self.converged, 'config': asdict(self.config)}

    def load_state_dict(self, state):
        self.channel_frozen = bool(state['channel_frozen'])
        self.weight_frozen = bool(state['weight_frozen'])
        self.converged = bool(state['converged'])
        self.ratios = hypernetwork_ratios(self.hyper, self.specs)
