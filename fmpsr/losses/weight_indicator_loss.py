"""The sparsity regulariser of FMP's weight indicators, lambda_W R(Z_W) (FMP Eqs. 4 and 7), as a BasicSR loss.

Configured like any BasicSR loss, in the ``train`` section of an FMP option file::

    train:
      indicator_opt:
        type: WeightIndicatorLoss
        loss_weight: 0.02      # lambda_W (FMP Sec. 3.4)
        norm: l1               # R: l1 | l2 | weight_decay (FMP Eq. 7, Table 5)
        reduction: sum         # sum: the literal lambda_W R(Z_W); mean: divided by N_W

The same object also gives the proximal operator of its term (:meth:`WeightIndicatorLoss.proximal_`),
for ``pruning.indicator_update: proximal``: the term is then not back-propagated but applied after each
optimiser step, like the L1 term of the channel vectors (FMP Eq. 10).
"""
import torch
from torch import nn

from basicsr.utils.registry import LOSS_REGISTRY

NORMS = ('l1', 'l2', 'weight_decay')
REDUCTIONS = ('mean', 'sum')
EPS = 1e-12  # inside the square root of the l2 norm, so its gradient at zero is finite


def _as_list(tensors):
    return [tensors] if torch.is_tensor(tensors) else list(tensors)


@LOSS_REGISTRY.register()
class WeightIndicatorLoss(nn.Module):
    """lambda_W * R(Z_W) over the weight indicators of a hypernetwork (FMP Eqs. 4, 7).

    The indicators come as one tensor or a list of tensors whose dim 0 indexes layers (a
    :class:`~fmpsr.pruning.hyperconv.HyperBank` holds the Z_W of its ``n`` same-shape convs as
    ``(n, c_out, c_in, kh, kw)``). With L layers in all:

    * ``l1``: R = sum_l ||Z_W^l||_1;
    * ``l2``: R = sum_l ||Z_W^l||_2 (one Euclidean norm per layer, i.e. per dim-0 slice; a group
      lasso over layers), computed as sqrt(sum z^2 + 1e-12);
    * ``weight_decay``: R = 0.5 * sum_l ||Z_W^l||_2^2.

    ``reduction: sum`` returns ``loss_weight * R``, the literal term of Eq. 4; ``mean`` returns
    ``loss_weight * R / N_W`` with N_W the number of indicators (all entries of the given tensors,
    masked or not), so the pull on each indicator shrinks as the network grows.

    Args:
        loss_weight (float): lambda_W, >= 0. Default 0.02 (FMP Sec. 3.4).
        norm (str): 'l1' | 'l2' | 'weight_decay'. Default 'l1'.
        reduction (str): 'sum' | 'mean'. Default 'sum'.

    Raises:
        ValueError: unknown ``norm`` or ``reduction``, or a negative / non-numeric ``loss_weight``
            (the message names ``train.indicator_opt.<key>``).
    """

    def __init__(self, loss_weight=0.02, norm='l1', reduction='sum'):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f'train.indicator_opt.norm: unknown norm {norm!r} (choose from {list(NORMS)})')
        if reduction not in REDUCTIONS:
            raise ValueError(f'train.indicator_opt.reduction: unknown reduction {reduction!r} '
                             f'(choose from {list(REDUCTIONS)})')
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) or loss_weight < 0:
            raise ValueError(f'train.indicator_opt.loss_weight (lambda_W) must be a number >= 0, got {loss_weight!r}')
        self.loss_weight, self.norm, self.reduction = float(loss_weight), norm, reduction

    def extra_repr(self):
        return f'loss_weight={self.loss_weight}, norm={self.norm!r}, reduction={self.reduction!r}'

    def scale(self, indicators):
        """The factor in front of R: ``loss_weight`` ('sum') or ``loss_weight / N_W`` ('mean')."""
        if self.reduction == 'sum':
            return self.loss_weight
        return self.loss_weight / sum(z.numel() for z in _as_list(indicators))

    def forward(self, indicators, masks=None):
        """The regulariser value.

        Args:
            indicators (Tensor | list[Tensor]): Z_W, each (L_i, ...) with dim 0 = layers.
            masks (Tensor | list[Tensor] | None): bool or 0/1 tensors of the same shapes; the
                regulariser sees ``Z_W * mask`` (pruned weights contribute nothing).

        Returns:
            Tensor: a differentiable scalar.
        """
        indicators = _as_list(indicators)
        kept = indicators if masks is None else [z * m for z, m in zip(indicators, _as_list(masks))]
        if self.norm == 'l1':
            total = sum(z.abs().sum() for z in kept)
        elif self.norm == 'l2':
            total = sum(z.pow(2).flatten(1).sum(1).add(EPS).sqrt().sum() for z in kept)
        else:
            total = 0.5 * sum(z.pow(2).sum() for z in kept)
        return self.scale(indicators) * total

    @torch.no_grad()
    def proximal_(self, indicators, lr, masks=None):
        """Apply in place the proximal operator of ``lr * (this term)`` (FMP Eq. 10's operator, for Z_W).

        With t = lr * loss_weight (divided by N_W for 'mean'):

        * ``l1``: z <- sign(z) * max(|z| - t, 0) (soft-thresholding, as on the channel vectors);
        * ``l2``: per layer, z^l <- z^l * max(1 - t / ||z^l||_2, 0) (block soft-thresholding);
        * ``weight_decay``: z <- z / (1 + t).

        Masked (pruned) entries are set to zero. The shrinkage per step is t whatever the optimiser
        (Adam normalises gradients, not this step).

        Args:
            indicators (Tensor | list[Tensor]): the Z_W parameters, modified in place.
            lr (float): step size (the indicators' current learning rate).
            masks (Tensor | list[Tensor] | None): keep masks of the same shapes.
        """
        indicators = _as_list(indicators)
        masks = [None] * len(indicators) if masks is None else _as_list(masks)
        t = lr * self.scale(indicators)
        for z, mask in zip(indicators, masks):
            z = z.data
            if self.norm == 'l1':
                z.copy_(torch.sign(z) * torch.clamp(z.abs() - t, min=0))
            elif self.norm == 'l2':
                kept = z if mask is None else z * mask
                norms = kept.pow(2).flatten(1).sum(1).sqrt()
                factor = torch.clamp(1 - t / norms.clamp_min(EPS), min=0)
                z.mul_(factor.view(-1, *([1] * (z.dim() - 1))))
            else:
                z.div_(1 + t)
            if mask is not None:
                z.mul_(mask)
