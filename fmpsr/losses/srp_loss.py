"""SRP's growing L2 penalty on the filters chosen for removal (Zhang et al., ICLR 2022, Eqs. 4-5),
as a BasicSR loss (also ASSL's penalty on its unimportant weight-normalisation scales)."""
import math

import torch
from torch import nn

from basicsr.utils.registry import LOSS_REGISTRY


@LOSS_REGISTRY.register()
class GrowingL2Loss(nn.Module):
    """``loss_weight * 0.5 * alpha(t) * sum ||w||^2`` over the penalised tensors (SRP Eq. 4).

    The penalty coefficient grows by ``delta`` every ``interval`` iterations, from 0, up to ``tau``
    (SRP Eq. 5 and Sec. 3.2 (3): Delta = 1e-4, T = 20, tau = 0.5): after iteration ``t`` (counted from
    ``start_iter``), ``alpha = min(tau, delta * floor(t / interval))``. ``alpha`` is a pure function of
    the iteration, so a resumed run continues the schedule exactly. The gradient of the default
    ``reduction='sum'`` form with ``loss_weight`` 1 is ``alpha * w``, the paper's ``grad += alpha * w``;
    ``'mean'`` divides by the number of penalised entries (a weaker pull on big networks).

    Differs from torch-pruning's ``GrowingRegPruner`` (Wang et al. ICLR 2021, which SRP builds on):
    that one grows every channel's coefficient by ``delta`` times its standardised importance at each
    call and edits the gradients of all channels; SRP grows one coefficient uniformly on the chosen
    filters only, on a fixed iteration schedule with a ceiling.

    Args:
        loss_weight (float): multiplies the penalty. Default: 1.0.
        reduction (str): 'sum' (SRP) or 'mean'. Default: 'sum'.
        delta (float): increment of alpha. Default: 1e-4.
        interval (int): iterations between increments (SRP's T). Default: 20.
        tau (float): ceiling of alpha. Default: 0.5.

    Raises:
        ValueError: a bad value (named).
    """

    def __init__(self, loss_weight=1.0, reduction='sum', delta=1e-4, interval=20, tau=0.5):
        super().__init__()
        if reduction not in ('sum', 'mean'):
            raise ValueError(f"GrowingL2Loss: reduction must be 'sum' or 'mean', got {reduction!r}")
        for key, value in (('loss_weight', loss_weight), ('delta', delta), ('tau', tau)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f'GrowingL2Loss: {key} must be a number > 0, got {value!r}')
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'GrowingL2Loss: interval must be an integer >= 1, got {interval!r}')
        self.loss_weight, self.reduction = float(loss_weight), reduction
        self.delta, self.interval, self.tau = float(delta), int(interval), float(tau)

    @property
    def steps_to_tau(self):
        """Increments needed to reach ``tau`` (int)."""
        return int(math.ceil(round(self.tau / self.delta, 9)))

    @property
    def iters_to_tau(self):
        """Iterations from the start of the schedule until alpha first equals tau (100,000 for SRP)."""
        return self.steps_to_tau * self.interval

    def alpha(self, current_iter, start_iter=0):
        """Penalty coefficient at iteration ``current_iter`` of a schedule started at ``start_iter``."""
        steps = max(0, int(current_iter) - int(start_iter)) // self.interval
        return self.tau if steps >= self.steps_to_tau else steps * self.delta

    def forward(self, tensors, current_iter, start_iter=0):
        """Penalty of ``tensors`` at ``current_iter``.

        Args:
            tensors (iterable of Tensor): the penalised entries (e.g. the rows of the pruned filters
                and their biases), any shapes.
            current_iter (int): the training iteration (1-based, as BasicSR counts).
            start_iter (int): iteration at which this schedule started.

        Returns:
            Tensor: scalar.
        """
        tensors = list(tensors)
        if not tensors:
            return torch.zeros(())
        squares = sum(t.pow(2).sum() for t in tensors)
        if self.reduction == 'mean':
            squares = squares / sum(t.numel() for t in tensors)
        return self.loss_weight * 0.5 * self.alpha(current_iter, start_iter) * squares
