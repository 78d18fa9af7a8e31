"""FMP: prune from scratch with a hypernetwork, finalize, fine-tune, all in one BasicSR run.

The run has two stages (FMP Sec. 3.4, 4.4; DHP's search-then-finetune):

1. ``prune``: ``network_g`` (any registered conv arch: LSRB, EDSR, RCAN, ...) is turned into its
   hypernetwork form, with channel groups from the arch's hand-written grouping or from the
   dependency graph (``pruning.grouping``, :mod:`fmpsr.pruning.coupling`); each
   iteration minimises ``L_rec + alpha D(Theta_H) + lambda_W R(Z_W)`` (FMP Eq. 4; alpha is
   ``train.optim_g.weight_decay``, applied to the hypernetwork parameters only), then applies the
   proximal step to the channel vectors (Eqs. 9-10). Every ``pruning.check_freq`` iterations the
   masks are updated and the convergence rule evaluated (:mod:`fmpsr.pruning.fmp`).
2. ``finetune``: at convergence (or at ``pruning.max_prune_iter``) the hypernetwork is finalized into
   a compact plain network whose pruned weights stay at zero; the optimiser and scheduler are built
   anew (``train.finetune`` may override ``optim_g`` / ``scheduler``) and training goes on until
   ``train.total_iter``. The compact network is exported to ``<experiments_root>/export`` at the
   switch and again at every checkpoint of the fine-tune stage (so it always holds the latest one).
"""
import copy
from collections import OrderedDict

import torch

from basicsr.archs import build_network
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, build_grouping, finalize, trace_conv_specs
from fmpsr.pruning.grouping import GROUPINGS

from .pruning_model import ESA_ARCHS, ESA_MIN_LR_SIZE, PRUNE, PruningModel, check_patch_size  # noqa: F401


@MODEL_REGISTRY.register()
class FMPModel(PruningModel):
    """Flexible Meta Pruning model (FMP Sec. 3.3-3.4, 4.4) for BasicSR's ``train.py``.

    Options: ``network_g`` (any registered arch built from ``nn.Conv2d``), ``pruning`` (see
    :class:`fmpsr.pruning.FMPConfig`), ``train`` as for ``SRModel`` plus optional
    ``train.finetune: {optim_g, scheduler}``. The stage machine (switch, export, checkpoints,
    resume) is :class:`~fmpsr.models.pruning_model.PruningModel`'s.

    Raises:
        ValueError: bad ``pruning`` options (unknown key, metric, criterion, regulariser, targets),
            ``network_g.upscale`` != ``scale``, LR patch too small for ESA, EMA asked for,
            ``max_prune_iter`` >= ``train.total_iter``.
        KeyError: ``pruning.grouping: hand`` for an arch without a hand-written grouping.
    """

    @classmethod
    def check_options(cls, opt):
        """Check the option file before anything runs (called by :mod:`fmpsr.pipeline`).

        Returns:
            FMPConfig: the parsed ``pruning`` section.

        Raises:
            ValueError, KeyError: see the class docstring; the message names the key and value.
        """
        config = super().check_options(opt)
        arch = (opt.get('network_g') or {}).get('type')
        if config.grouping == 'hand' and arch not in GROUPINGS:
            raise KeyError(f'pruning.grouping: hand, but network_g.type {arch!r} has no hand-written channel '
                           f'grouping (known: {sorted(GROUPINGS)}); use pruning.grouping: auto')
        if config.tie_outputs and (config.grouping or ('hand' if arch in GROUPINGS else 'auto')) != 'auto':
            raise ValueError('pruning.tie_outputs applies to pruning.grouping: auto only (set pruning.grouping: auto)')
        return config

    @classmethod
    def pruning_config(cls, options):
        """Parse the ``pruning`` section (FMP keys and defaults, :class:`fmpsr.pruning.FMPConfig`)."""
        return FMPConfig.from_options(options)

    # ---- networks ----
    def build_prune_network(self, checkpoint=None):
        """Build the plain ``network_g``, trace its conv shapes, convert it to a HyperNetwork."""
        network_opt = dict(self.opt['network_g'])
        plain = build_network(copy.deepcopy(network_opt))
        in_ch = network_opt.get('num_in_ch', 3)
        self.specs = trace_conv_specs(plain, self.config.macs_input_size, in_ch)
        example = torch.zeros(1, in_ch, *self.config.macs_input_size)  # zeros: draws nothing from the RNG
        grouping = build_grouping(plain, network_opt, self.config.grouping, example, self.config.tie_outputs)
        hyper = HyperNetwork(plain, grouping, self.config.embed_dim)
        if not self.config.weight_indicators:  # DHP: Z_W fixed at one
            for bank in hyper.banks:
                bank.weight_indicator.requires_grad_(False)
        if checkpoint is not None:
            hyper.load_state_dict(checkpoint['params'], strict=True)
        self.pruner = FMPPruner(hyper, self.specs, self.config)
        self.net_g = self.model_to_device(hyper)
        self.print_network(self.net_g)

    build_hypernetwork = build_prune_network

    @property
    def hypernetwork(self):
        return self.get_bare_model(self.net_g)

    # ---- optimisation ----
    def setup_optimizers(self, optim_opt=None):
        """Prune stage: one optimiser, three parameter groups (hypernetwork with weight decay alpha;
        channel vectors and weight indicators without); Adam is fused unless ``optim_g`` says
        ``fused`` or ``foreach``. Fine-tune stage: as PrunedSRModel."""
        if self.stage != PRUNE:
            return super().setup_optimizers(optim_opt)
        optim_opt = copy.deepcopy(optim_opt or self.opt['train']['optim_g'])
        optim_type = optim_opt.pop('type')
        weight_decay = optim_opt.pop('weight_decay', 0)
        lr = optim_opt.pop('lr')
        groups = self.hypernetwork.parameter_groups()
        param_groups = [
            {'params': groups['hyper'], 'lr': lr, 'weight_decay': weight_decay, 'name': 'hyper'},
            {'params': groups['channel'], 'lr': lr * self.config.channel_lr_mult, 'weight_decay': 0, 'name': 'channel'},
            {'params': groups['weight'], 'lr': lr * self.config.weight_lr_mult, 'weight_decay': 0, 'name': 'weight'}]
        if not self.config.weight_indicators:
            param_groups.pop()
        if optim_type == 'Adam' and not {'fused', 'foreach'} & set(optim_opt):
            # the hypernetwork has ~13x the plain network's parameters: Adam's per-tensor loop costs
            # more than the weight generation (scripts/benchmark/fmp_step_overhead.py)
            optim_opt['fused'] = True
        self.optimizer_g = self.get_optimizer(optim_type, param_groups, lr, **optim_opt)
        self.optimizers = [self.optimizer_g]

    def channel_lr(self):
        """Current learning rate of the channel-vector group (the proximal step size, FMP Eq. 10)."""
        return next(g['lr'] for g in self.optimizer_g.param_groups if g.get('name') == 'channel')

    def prune_step(self, current_iter):
        """One FMP iteration: ``L_rec + lambda_W R(Z_W)`` (Eq. 4), optimiser step, proximal step (Eq. 10)."""
        self.optimizer_g.zero_grad()
        self.output = self.net_g(self.lq)
        loss_dict = OrderedDict()
        l_total = self.reconstruction_loss(loss_dict)
        loss_dict['l_reg_w'] = self.pruner.regularization()
        l_total = l_total + loss_dict['l_reg_w']
        self.check_finite(l_total, current_iter)
        l_total.backward()
        self.optimizer_g.step()
        self.pruner.proximal_step(self.channel_lr())
        self.log_dict = self.reduce_loss_dict(loss_dict)
        self.log_dict['l_reg_c'] = self.pruner.channel_regularization()

    def prune_check(self, current_iter):
        """Mask update and convergence rule (:meth:`FMPPruner.check`), rank agreement, logs."""
        self.pruner.check()
        self.check_ranks_agree(current_iter)
        self.log_pruning(current_iter)
        return self.pruner.converged

    def current_ratios(self):
        return self.pruner.ratios

    def target_message(self):
        c = self.config
        return f'the {c.criterion} target (gamma_c={c.gamma_c}, gamma_w={c.gamma_w}, metric {c.metric})'

    def finalize_network(self):
        """The compact network sliced from the hypernetwork (:func:`fmpsr.pruning.finalize`)."""
        return finalize(self.hypernetwork, build_network, self.opt['network_g'])

    def release_prune_state(self):
        del self.pruner

    @torch.no_grad()
    def check_ranks_agree(self, current_iter):
        """With several processes, verify that every rank holds bit-identical channel vectors, weight
        indicators and masks, and the same convergence state (all-gather of integer checksums).

        Raises:
            RuntimeError: the ranks disagree (names the iteration and the checksums).
        """
        if not self.opt['dist']:
            return
        import torch.distributed as dist
        hyper = self.hypernetwork
        tensors = [v.z for v in hyper.channel_vectors.values()] + [v.mask for v in hyper.channel_vectors.values()]
        for _, conv in hyper.hyper_convs():
            tensors += [conv.weight_indicator, conv.weight_mask]
        checksum = torch.zeros(len(tensors) + 3, dtype=torch.int64, device=self.device)
        for i, t in enumerate(tensors):
            bits = t.detach().view(torch.int32) if t.dtype == torch.float32 else t.detach().to(torch.int32)
            weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
            checksum[i] = (bits.flatten().to(torch.int64) * weights).sum()
        checksum[-3:] = torch.tensor([self.pruner.converged, self.pruner.channel_frozen, self.pruner.weight_frozen],
                                     dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(checksum) for _ in range(self.opt['world_size'])]
        dist.all_gather(gathered, checksum)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f'ranks disagree on channel vectors / indicators / masks at iteration {current_iter}: '
                               f'checksums {[g.sum().item() for g in gathered]}')
        if self.opt['rank'] == 0:
            get_root_logger().info(f'[prune iter {current_iter}] all {self.opt["world_size"]} ranks agree '
                                   'bit for bit on channel vectors, weight indicators and masks')

    # ---- logging ----
    @master_only
    def log_pruning(self, current_iter):
        """Ratios and per-group widths to the log and to tensorboard (``tb_logger/<name>/pruning``)."""
        ratios = self.pruner.ratios
        kept = self.hypernetwork.kept_channels()
        metric = self.config.metric
        widths = ', '.join(f'{g}={k}/{self.hypernetwork.channel_vectors[g].size}' for g, k in kept.items()
                           if self.hypernetwork.channel_vectors[g].prunable)
        get_root_logger().info(
            f'[prune iter {current_iter}] {metric}: channel ratio {ratios.channel_ratio(metric):.4f}, '
            f'weight ratio {ratios.weight_ratio(metric):.4f}, kept {ratios.total_ratio(metric):.4f} '
            f'(frozen: channel={self.pruner.channel_frozen}, weight={self.pruner.weight_frozen}); widths: {widths}')
        writer = self.tensorboard()
        if writer is not None:
            for key, value in ratios.as_dict().items():
                writer.add_scalar(f'pruning/{key}', value, current_iter)
            for group, value in kept.items():
                writer.add_scalar(f'widths/{group}', value, current_iter)

    # ---- checkpoints ----
    def prune_checkpoint(self):
        """The hypernetwork state (vectors, indicators, masks, hypernetwork tensors)."""
        return {'params': {k: v.cpu() for k, v in self.hypernetwork.state_dict().items()}}

    def prune_state(self):
        return self.pruner.state_dict()

    def load_prune_state(self, state):
        self.pruner.load_state_dict(state)
