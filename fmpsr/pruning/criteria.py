"""Convergence criteria of FMP (FMP Sec. 4.4, supplement Sec. 2.2).

Targets gamma_C and gamma_W are prune fractions of the original network, in the chosen metric
(``params``, ``flops`` = MACs, or ``latency``: the measured conv time of :mod:`fmpsr.pruning.latency`,
where weight zeros count for nothing, so only channel targets are allowed with it):

* ``channel``: converged when channel ratio >= gamma_C;
* ``weight``: converged when weight ratio >= gamma_W;
* ``total_fixed``: both, each on its own; the part that reaches its target is frozen while the
  other goes on (a frozen weight part goes on again when later channel pruning, which removes pruned
  weights with their channels, lowers its ratio below gamma_W: see ``FMPPruner.check``);
* ``total``: converged when channel ratio + weight ratio >= gamma_C + gamma_W (the split between
  the two is left to the optimisation);
* ``keep_ratio`` (DHP, Li et al. ECCV 2020, its ``ratio`` setting): converged when the kept fraction
  ``1 - channel ratio - weight ratio`` is at most ``keep_ratio + keep_tolerance`` (DHP: 0.02).
"""
from dataclasses import dataclass

from .accounting import METRICS

CRITERIA = ('channel', 'weight', 'total_fixed', 'total', 'keep_ratio')
CRITERION_METRICS = METRICS + ('latency',)


@dataclass(frozen=True)
class CriterionStatus:
    """Outcome of one check: ``converged`` ends the pruning stage; ``channel_done`` /
    ``weight_done`` freeze that part (``total_fixed`` only)."""
    converged: bool
    channel_done: bool
    weight_done: bool


@dataclass(frozen=True)
class ConvergenceCriterion:
    """A convergence rule (see the module docstring).

    Args:
        metric (str): 'params', 'flops' (MACs) or 'latency'.
        criterion (str): one of 'channel', 'weight', 'total_fixed', 'total', 'keep_ratio'.
        gamma_c (float): channel prune target, fraction in [0, 1).
        gamma_w (float): weight prune target, fraction in [0, 1).
        keep_ratio (float | None): kept-fraction target of 'keep_ratio', in (0, 1).
        keep_tolerance (float): slack of 'keep_ratio' (DHP: 0.02).

    Raises:
        ValueError: unknown metric or criterion, a target outside [0, 1), gamma_c + gamma_w >= 1,
            a zero target for the part the criterion converges on, or 'keep_ratio' without a
            ``keep_ratio`` in (0, 1); with 'latency', criterion 'weight' or 'total_fixed', or 'total' with a
            gamma_w above 0 (weight zeros do not make a dense kernel faster).
    """
    metric: str
    criterion: str
    gamma_c: float
    gamma_w: float
    keep_ratio: float = None
    keep_tolerance: float = 0.02

    def __post_init__(self):
        if self.metric not in CRITERION_METRICS:
            raise ValueError(f'pruning.metric: unknown metric {self.metric!r} (choose from {list(CRITERION_METRICS)})')
        if self.criterion not in CRITERIA:
            raise ValueError(f'pruning.criterion: unknown criterion {self.criterion!r} (choose from {list(CRITERIA)})')
        for key in ('gamma_c', 'gamma_w'):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f'pruning.{key} must be a fraction in [0, 1), got {value!r}')
        if self.gamma_c + self.gamma_w >= 1:
            raise ValueError(f'pruning.gamma_c + pruning.gamma_w must be < 1 (nothing would be left), '
                             f'got {self.gamma_c} + {self.gamma_w}')
        needs = {'channel': ('gamma_c',), 'weight': ('gamma_w',)}.get(self.criterion, ())
        for key in needs:
            if getattr(self, key) == 0:
                raise ValueError(f'pruning.{key} is 0 but criterion {self.criterion!r} converges on it')
        if self.criterion == 'total' and self.gamma_c + self.gamma_w == 0:
            raise ValueError("pruning.gamma_c + pruning.gamma_w is 0: criterion 'total' needs a target")
        if self.metric == 'latency' and (self.criterion in ('weight', 'total_fixed') or
                                         (self.criterion == 'total' and self.gamma_w > 0)):
            raise ValueError(f"pruning.metric: latency counts kept channels only (weight zeros do not make a dense "
                             f"kernel faster), so it takes criterion 'channel', 'keep_ratio', or 'total' with "
                             f"pruning.gamma_w: 0; got criterion {self.criterion!r}, gamma_w {self.gamma_w}")
        if self.criterion == 'keep_ratio':
            ratio = self.keep_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
                raise ValueError(f"pruning.keep_ratio must be a fraction in (0, 1) for criterion 'keep_ratio', got {ratio!r}")
            tol = self.keep_tolerance
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
                raise ValueError(f'pruning.keep_tolerance must be a fraction in [0, 1), got {tol!r}')

    def status(self, channel_ratio, weight_ratio, weight_slack=0.0):
        """Evaluate the rule on the current ratios (fractions of the original, in this metric).

        Args:
            channel_ratio, weight_ratio (float): fractions of the original network.
            weight_slack (float): a weight target counts as met within this fraction below it: the cost
                of one weight (:meth:`fmpsr.pruning.fmp.FMPPruner.weight_granularity`). Weights are pruned
                whole and never beyond :meth:`weight_budget`, so with ``flops`` (a weight costs its conv's
                output pixels) the last fraction of a weight can never be filled. Default 0.

        Returns:
            CriterionStatus
        """
        c_ok, w_ok = channel_ratio >= self.gamma_c, weight_ratio >= self.gamma_w - weight_slack
        if self.criterion == 'channel':
            return CriterionStatus(c_ok, False, False)
        if self.criterion == 'weight':
            return CriterionStatus(w_ok, False, False)
        if self.criterion == 'total_fixed':
            return CriterionStatus(c_ok and w_ok, c_ok, w_ok)
        if self.criterion == 'keep_ratio':
            kept = 1.0 - channel_ratio - weight_ratio
            return CriterionStatus(kept <= self.keep_ratio + self.keep_tolerance, False, False)
        return CriterionStatus(channel_ratio + weight_ratio >= self.gamma_c + self.gamma_w - weight_slack, False, False)

    def channel_target(self, weight_ratio):
        """The channel ratio at which the rule is met given ``weight_ratio`` (FMP Sec. 4.4 ratios: fractions
        of the original network in this metric, not percent), or None where channel pruning alone does not
        meet it (criterion 'weight'). 'total': gamma_C + gamma_W - weight_ratio; 'keep_ratio':
        1 - keep_ratio - keep_tolerance - weight_ratio; 'channel' and 'total_fixed': gamma_C.

        Used by the budgeted channel-mask update (``pruning.max_overshoot``,
        :meth:`fmpsr.pruning.fmp.FMPPruner._update_channel_masks`) to stop at the target.
        """
        if self.criterion == 'weight':
            return None
        if self.criterion == 'total':
            return self.gamma_c + self.gamma_w - weight_ratio
        if self.criterion == 'keep_ratio':
            return 1.0 - self.keep_ratio - self.keep_tolerance - weight_ratio
        return self.gamma_c

    def weight_budget(self, channel_ratio, weight_ratio):
        """How much more weight pruning the rule allows, as a fraction of the original (may be inf).

        Weight masks are updated smallest-indicator-first within this budget so that a wave of
        indicators crossing the threshold together does not overshoot the target.
        """
        if self.criterion == 'channel':
            return float('inf')
        if self.criterion == 'total':
            return max(self.gamma_c + self.gamma_w - channel_ratio - weight_ratio, 0.0)
        if self.criterion == 'keep_ratio':
            return max(1.0 - channel_ratio - weight_ratio - self.keep_ratio, 0.0)
        return max(self.gamma_w - weight_ratio, 0.0)
