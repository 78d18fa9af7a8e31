"""ASSL: aligned structured sparsity learning (Zhang et al., NeurIPS 2021) for BasicSR.

1. Every conv that writes a pruned channel group gets weight normalisation,
   ``w = g * v / ||v||`` (``torch.nn.utils.parametrizations.weight_norm``, dim 0); ``|g|`` is the
   importance of a filter. Starting from ``path.pretrain_network_g`` (or the random init), ``g`` is
   the filter's L2 norm.
2. Free groups (one writer) choose their ``ceil(r*C)`` unimportant filters at once (smallest ``|g|``).
   For the first ``pruning.ssa_iter`` iterations the constrained groups (writers meeting at residual
   adds) are not penalised; the sparsity structure alignment term ``train.alignment_opt``
   (:class:`~fmpsr.losses.assl_loss.SparsityAlignmentLoss`: ``-mean(S S^T)`` over the soft masks
   ``S = |g| / ||g||`` of each group's writers) aligns their importance profiles. At iteration
   ``ssa_iter`` the constrained mask is fixed: the ``ceil(r*C)`` channels of smallest summed ``|g|``
   over the writers, one index set per group.
3. The growing L2 penalty of SRP (``train.sparsity_opt``,
   :class:`~fmpsr.losses.srp_loss.GrowingL2Loss`) acts on the scales ``g`` and the biases of the
   unimportant filters: free ones from iteration 0, constrained ones from ``ssa_iter``, each until
   alpha reaches tau; then ``pruning.stabilize_iter`` iterations (default 0).
4. The scales are merged into the weights (weight normalisation removed, the computed weight kept),
   the filters are removed (:func:`fmpsr.pruning.finalize_plain`), and the compact plain network is
   fine-tuned.

Choices where the papers are silent (REFERENCE.md sec. 5): the soft-mask formula, the penalty on the
biases of the removed filters (they would otherwise leave a constant behind), free masks fixed at the
start rather than re-ranked, and a separate schedule start for the constrained filters.
"""
import dataclasses

import torch
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.pruning.options import check_number
from fmpsr.pruning.selection import (classify_groups, group_scores, group_writers, prune_count, pruned_rows,
                                     select_channels, smallest_mask)

from .srp_model import SRPConfig, SRPModel

ALIGNMENT_DEFAULT = {'type': 'SparsityAlignmentLoss', 'loss_weight': 1.0, 'reduction': 'mean'}


@dataclasses.dataclass(frozen=True)
class ASSLConfig(SRPConfig):
    """``pruning`` keys of :class:`ASSLModel`: :class:`~fmpsr.models.srp_model.SRPConfig`'s, with
    ``constrained`` fixed to 'scale' (summed |g| after the alignment period) and

    Attributes:
        ssa_iter (int): iterations of the alignment term; the constrained mask is fixed at its end
            (about 17,000 in ASSL's schedule, REFERENCE.md sec. 5).
        stabilize_iter (int): default 0 for ASSL.
    """
    constrained: str = 'scale'
    ssa_iter: int = 17000
    stabilize_iter: int = 0

    constrained_rules = ('scale',)

    def validate(self):
        super().validate()
        check_number('ssa_iter', self.ssa_iter, 0, integer=True)


def scale_of(conv):
    """The weight-normalisation scale ``g`` (c_out, 1, 1, 1) of a conv."""
    return conv.parametrizations.weight.original0


@MODEL_REGISTRY.register()
class ASSLModel(SRPModel):
    """ASSL for BasicSR's ``train.py`` (see the module docstring).

    Option keys: ``pruning.{ratio, ssa_iter, stabilize_iter, round_to, skip_groups, plot_layers,
    check_freq, max_prune_iter, metric, grouping, tie_outputs, macs_input_size}``;
    ``train.sparsity_opt`` (GrowingL2Loss on the scales) and ``train.alignment_opt``
    (SparsityAlignmentLoss). The prune stage lasts ``ssa_iter + iters_to_tau + stabilize_iter``.

    Raises:
        ValueError: see :class:`SRPModel`; a bad ``train.alignment_opt``.
    """

    config_class = ASSLConfig
    figure_name = 'assl_filter_norms'

    @classmethod
    def schedule_end(cls, config, loss):
        return config.ssa_iter + loss.iters_to_tau + config.stabilize_iter

    @classmethod
    def build_alignment(cls, opt):
        """The alignment term from ``train.alignment_opt`` (defaults: loss_weight 1, mean)."""
        loss_opt = dict(ALIGNMENT_DEFAULT, **((opt.get('train') or {}).get('alignment_opt') or {}))
        return build_loss(loss_opt)

    @classmethod
    def check_options(cls, opt):
        config = super().check_options(opt)
        if opt.get('is_train'):
            cls.build_alignment(opt)
        return config

    # ---- setup ----
    def prepare_network(self, net, tensors):
        """Weight-normalise every conv writing a pruned group (before DDP wraps the network); a
        prune-stage checkpoint's ``g`` and ``v`` are restored exactly (the plain weights alone would give
        ``v = w``, another point on the same weight, and Adam's state would not match)."""
        self.constrained, self.free = classify_groups(self.grouping, self.config.skip_groups)
        writers = group_writers(self.grouping)
        self.wn_convs = list(dict.fromkeys(c for g in self.constrained + self.free for c in writers[g]))
        for name in self.wn_convs:
            weight_norm(net.get_submodule(name), name='weight', dim=0)
        if tensors:
            with torch.no_grad():
                for name, saved in tensors['weight_norm'].items():
                    conv = net.get_submodule(name)
                    scale_of(conv).copy_(saved['g'])
                    conv.parametrizations.weight.original1.copy_(saved['v'])
        self.constrained_fixed = bool(tensors['constrained_fixed']) if tensors else False

    def setup_method(self, net, tensors):
        self.alignment = self.build_alignment(self.opt).to(self.device)
        super().setup_method(net, tensors)
        if not tensors and self.config.ssa_iter == 0:
            self.fix_constrained()

    def scales(self, net=None):
        """Dict conv -> |g| (c_out,) of the weight-normalised convs (CPU)."""
        net = net or self.network
        return {c: scale_of(net.get_submodule(c)).detach().abs().flatten().cpu() for c in self.wn_convs}

    def select(self, net):
        """Free groups: the smallest |g|; constrained groups wait for :meth:`fix_constrained`."""
        masks = select_channels(self.grouping, self.config.ratio, self.scales(net), 'score', None,
                                self.config.round_to, self.config.skip_groups)
        self.group_masks = {g: (m if g in self.free else torch.ones_like(m)) for g, m in masks.items()}
        get_root_logger().info(f'ASSL: free groups chosen by |g| at ratio {self.config.ratio}; constrained groups '
                               f'are aligned for {self.config.ssa_iter} iterations first')

    def fix_constrained(self):
        """End of the alignment period: one index set per constrained group by summed |g|."""
        scores = group_scores(self.grouping, self.scales(), self.constrained)
        for g in self.constrained:
            n = prune_count(self.grouping.groups[g].size, self.config.ratio, self.config.round_to)
            self.group_masks[g] = smallest_mask(scores[g], n)
        self.constrained_fixed = True
        self.refresh_rows()
        get_root_logger().info(f'ASSL: constrained groups fixed; kept widths {self.kept_widths()}')

    def refresh_rows(self):
        masks = {g: m for g, m in self.group_masks.items()}
        self.free_rows = {c: r.to(self.device) for c, r in pruned_rows(self.grouping, masks, self.free).items()}
        self.constrained_rows = {c: r.to(self.device) for c, r in
                                 pruned_rows(self.grouping, masks, self.constrained).items()}
        self.rows = {c: r.to(self.device) for c, r in pruned_rows(self.grouping, masks).items()}

    # ---- losses ----
    def penalty_sets(self):
        return [(self.free_rows, 0), (self.constrained_rows, self.config.ssa_iter)]

    def penalised(self, rows):
        """Scales ``g`` and biases of the selected filters."""
        net = self.network
        for conv, index in rows.items():
            module = net.get_submodule(conv)
            yield scale_of(module)[index]
            if module.bias is not None:
                yield module.bias[index]

    def regularization(self, current_iter):
        terms = super().regularization(current_iter)
        if not self.constrained_fixed and self.constrained:
            writers = group_writers(self.grouping)
            net = self.network
            total = 0
            for g in self.constrained:
                profiles = []
                for conv, (out_index, channel) in writers[g].items():
                    order = out_index[channel.argsort()].to(self.device)
                    profiles.append(scale_of(net.get_submodule(conv)).flatten()[order])
                total = total + self.alignment(profiles)
            terms['l_align'] = total
        return terms

    def penalty_alpha(self, current_iter):
        return self.sparsity.alpha(current_iter)

    # ---- stage ----
    def prune_check_due(self, current_iter):
        return super().prune_check_due(current_iter) or (not self.constrained_fixed
                                                         and current_iter >= self.config.ssa_iter)

    def update_masks(self, current_iter):
        if not self.constrained_fixed and current_iter >= self.config.ssa_iter:
            self.fix_constrained()
        return super().update_masks(current_iter)

    def finalize_network(self):
        """Merge the scales into the weights (remove weight normalisation, keep the computed weight),
        then remove the filters."""
        net = self.network
        for name in self.wn_convs:
            module = net.get_submodule(name)
            if parametrize.is_parametrized(module, 'weight'):
                parametrize.remove_parametrizations(module, 'weight', leave_parametrized=True)
        return super().finalize_network()

    # ---- state ----
    def method_tensors(self):
        net = self.network
        return {'selected': torch.tensor(True), 'constrained_fixed': torch.tensor(self.constrained_fixed),
                'weight_norm': {c: {'g': scale_of(net.get_submodule(c)).detach().cpu().clone(),
                                    'v': net.get_submodule(c).parametrizations.weight.original1.detach().cpu().clone()}
                                for c in self.wn_convs}}
