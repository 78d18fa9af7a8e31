"""ASSL's sparsity structure alignment term (Zhang et al., NeurIPS 2021), as a BasicSR loss."""
import torch
from torch import nn

from basicsr.utils.registry import LOSS_REGISTRY


@LOSS_REGISTRY.register()
class SparsityAlignmentLoss(nn.Module):
    """``-loss_weight * mean(S S^T)``: aligns the sparsity structure of the constrained layers of one
    channel group (ASSL's SSA term; ISS-P supplement Sec. 2: "maximizing the inner-product of the
    index vectors").

    ``S`` (L, C) stacks one soft mask per constrained layer (conv writing the group): the absolute
    weight-normalisation scales ``|g_l|`` divided by their L2 norm, so ``S S^T`` holds the cosine
    similarities of the layers' importance profiles and the term is smallest when every layer ranks
    the channels alike (the same filters become small in every layer). The soft-mask form is fmpsr's
    choice where the papers give no formula; ``'sum'`` replaces the mean over the L x L entries by
    their sum.

    Args:
        loss_weight (float): multiplies the term. Default: 1.0.
        reduction (str): 'mean' or 'sum'. Default: 'mean'.
        eps (float): added to the norms. Default: 1e-12.

    Raises:
        ValueError: a bad reduction or loss_weight (named).
    """

    def __init__(self, loss_weight=1.0, reduction='mean', eps=1e-12):
        super().__init__()
        if reduction not in ('sum', 'mean'):
            raise ValueError(f"SparsityAlignmentLoss: reduction must be 'sum' or 'mean', got {reduction!r}")
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) or loss_weight < 0:
            raise ValueError(f'SparsityAlignmentLoss: loss_weight must be a number >= 0, got {loss_weight!r}')
        self.loss_weight, self.reduction, self.eps = float(loss_weight), reduction, float(eps)

    @staticmethod
    def soft_masks(scales, eps=1e-12):
        """(L, C) soft masks from a list of L scale vectors (C,): ``|g| / ||g||_2``."""
        s = torch.stack([g.reshape(-1).abs() for g in scales])
        return s / (s.norm(dim=1, keepdim=True) + eps)

    def forward(self, scales):
        """Alignment term of one group.

        Args:
            scales (list of Tensor): one (C,) (or (C, 1, 1, 1)) scale vector per constrained layer.

        Returns:
            Tensor: scalar (0 when fewer than two layers).
        """
        if len(scales) < 2:
            return torch.zeros((), device=scales[0].device if scales else None)
        s = self.soft_masks(scales, self.eps)
        gram = s @ s.t()
        return -self.loss_weight * (gram.mean() if self.reduction == 'mean' else gram.sum())
