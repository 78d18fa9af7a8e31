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
import os
from collections import OrderedDict

import torch

from basicsr.archs import build_network
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.pruning import (FMPConfig, FMPPruner, HyperNetwork, apply_weight_masks, build_grouping, finalize,
                           save_compact, trace_conv_specs)
from fmpsr.pruning.export import atomic_write, write_json
from fmpsr.pruning.grouping import GROUPINGS
from fmpsr.pipeline import current_epoch

from .pruned_sr_model import PrunedSRModel, load_checkpoint

PRUNE, FINETUNE = 'prune', 'finetune'
ESA_MIN_LR_SIZE = 15
ESA_ARCHS = ('LSRB', 'RLFN')


def check_patch_size(opt):
    """Raise ValueError when the training LR patch (``gt_size / scale``) of an arch with ESA (LSRB,
    RLFN) is below ESA's 15 pixels."""
    train_set = (opt.get('datasets') or {}).get('train') or {}
    gt_size, scale = train_set.get('gt_size'), opt.get('scale')
    if (opt.get('network_g') or {}).get('type') not in ESA_ARCHS:
        return
    if gt_size and scale and gt_size // scale < ESA_MIN_LR_SIZE:
        raise ValueError(f'datasets.train.gt_size={gt_size} gives LR patches of {gt_size // scale} pixels at '
                         f'scale {scale}; ESA needs at least {ESA_MIN_LR_SIZE} (gt_size >= {ESA_MIN_LR_SIZE * scale})')


@MODEL_REGISTRY.register()
class FMPModel(PrunedSRModel):
    """Flexible Meta Pruning model (FMP Sec. 3.3-3.4, 4.4) for BasicSR's ``train.py``.

    Options: ``network_g`` (any registered arch built from ``nn.Conv2d``), ``pruning`` (see
    :class:`fmpsr.pruning.FMPConfig`), ``train`` as for ``SRModel`` plus optional
    ``train.finetune: {optim_g, scheduler}``.

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
            ValueError: see the class docstring; the message names the key and value.
        """
        super().check_options(opt)
        config = cls.pruning_config(opt.get('pruning'))
        arch = (opt.get('network_g') or {}).get('type')
        if config.grouping == 'hand' and arch not in GROUPINGS:
            raise KeyError(f'pruning.grouping: hand, but network_g.type {arch!r} has no hand-written channel '
                           f'grouping (known: {sorted(GROUPINGS)}); use pruning.grouping: auto')
        if config.tie_outputs and (config.grouping or ('hand' if arch in GROUPINGS else 'auto')) != 'auto':
            raise ValueError('pruning.tie_outputs applies to pruning.grouping: auto only (set pruning.grouping: auto)')
        if opt.get('is_train'):
            check_patch_size(opt)
            total_iter = int(opt['train']['total_iter'])
            if config.max_prune_iter >= total_iter:
                raise ValueError(f'pruning.max_prune_iter ({config.max_prune_iter}) must be below '
                                 f'train.total_iter ({total_iter}) to leave iterations for fine-tuning')
            unknown = sorted(set(opt['train'].get('finetune') or {}) - {'optim_g', 'scheduler'})
            if unknown:
                raise ValueError(f'train.finetune: unknown key(s) {unknown} (known: optim_g, scheduler)')
        return config

    @classmethod
    def pruning_config(cls, options):
        """Parse the ``pruning`` section (FMP keys and defaults, :class:`fmpsr.pruning.FMPConfig`)."""
        return FMPConfig.from_options(options)

    def __init__(self, opt):
        BaseModel.__init__(self, opt)
        self.config = self.check_options(opt)
        self.switch_iter = None
        self.final_ratios = None
        self._tb = None
        load_path = self.opt['path'].get('pretrain_network_g')
        checkpoint = load_checkpoint(load_path) if load_path else None
        if checkpoint is not None and checkpoint.get('network_g'):   # a checkpoint of the fine-tune stage
            self.stage = FINETUNE
            extra = checkpoint.get('raw', {}).get('fmp', {})
            self.switch_iter, self.final_ratios = extra.get('switch_iter'), extra.get('ratios')
            self.build_compact(checkpoint['network_g'], checkpoint, checkpoint['weight_masks'])
        else:
            self.stage = PRUNE
            self.build_hypernetwork(checkpoint)
        if self.is_train:
            self.init_training_settings()

    # ---- networks ----
    def build_hypernetwork(self, checkpoint=None):
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

    @property
    def hypernetwork(self):
        return self.get_bare_model(self.net_g)

    # ---- optimisation ----
    def init_training_settings(self):
        if self.stage == PRUNE:
            super().init_training_settings()
        else:
            self.stage_training_settings()

    def stage_training_settings(self):
        """Optimiser and scheduler of the fine-tune stage (``train.finetune`` overrides)."""
        finetune = self.opt['train'].get('finetune') or {}
        PrunedSRModel.init_training_settings(self, finetune.get('optim_g'), finetune.get('scheduler'))

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

    def optimize_parameters(self, current_iter):
        if self.stage != PRUNE:
            return super().optimize_parameters(current_iter)
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
        cap = current_iter >= self.config.max_prune_iter
        if current_iter % self.config.check_freq == 0 or cap:
            self.pruner.check()
            self.check_ranks_agree(current_iter)
            self.log_pruning(current_iter)
            if self.pruner.converged or cap:
                self.switch_to_finetune(current_iter, converged=self.pruner.converged)
        self.log_dict.update(self.ratio_log())

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

    def ratio_log(self):
        """Channel / weight / total ratios in the pruning metric, for the message logger."""
        if self.stage == PRUNE:
            ratios = self.pruner.ratios.as_dict()
        else:
            ratios = self.final_ratios or {}
        metric = self.config.metric
        return {f'prune/{k}': ratios[f'{metric}_{k}'] for k in ('channel_ratio', 'weight_ratio', 'total_ratio')
                if f'{metric}_{k}' in ratios}

    # ---- stage switch ----
    def switch_to_finetune(self, current_iter, converged=True):
        """Finalize the hypernetwork into the compact network and start fine-tuning (all ranks)."""
        logger = get_root_logger()
        if not converged:
            metric = self.config.metric
            r = self.pruner.ratios
            logger.warning(
                f'pruning.max_prune_iter={self.config.max_prune_iter} reached before the {self.config.criterion} '
                f'target (gamma_c={self.config.gamma_c}, gamma_w={self.config.gamma_w}, metric {metric}) was met: '
                f'channel ratio {r.channel_ratio(metric):.4f}, weight ratio {r.weight_ratio(metric):.4f}. '
                'Finalizing with what was pruned so far.')
        self.final_ratios = dict(self.pruner.ratios.as_dict(), converged=bool(converged))
        compact, network_opt, masks = finalize(self.hypernetwork, build_network, self.opt['network_g'])
        del self.pruner
        self.net_g = None
        apply_weight_masks(compact, masks)
        self.compact_network_opt = network_opt
        self.net_g = self.model_to_device(compact)
        self.stage, self.switch_iter = FINETUNE, current_iter
        self.stage_training_settings()
        logger.info(f'Pruning stage ended at iteration {current_iter} '
                    f'({"converged" if converged else "iteration cap"}); compact network_g: {network_opt}')
        epoch = current_epoch()
        if epoch is not None and self.is_train:  # a checkpoint at the switch, so a crash never repeats it
            self.save(epoch, current_iter)       # (it exports too)
        else:
            self.export(current_iter)

    @master_only
    def export(self, current_iter):
        """Write the compact network to ``<experiments_root>/export`` and ``pruning.json`` beside it
        (``current_iter`` -1 means the end of training)."""
        out_dir = os.path.join(self.opt['path']['experiments_root'], 'export')
        checkpoint = self.compact_checkpoint()
        paths = save_compact(out_dir, self.get_bare_model(self.net_g), checkpoint['fmp_compact']['network_g'],
                             checkpoint['fmp_compact']['weight_masks'])
        info = {'switch_iter': self.switch_iter, 'exported_at_iter': current_iter, 'network_g': self.compact_network_opt, 'ratios': self.final_ratios,
                'pruning': {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.config).items()},
                'files': paths}
        write_json(os.path.join(out_dir, 'pruning.json'), info)
        get_root_logger().info(f'Exported the compact network to {out_dir}')

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

    def tensorboard(self):
        if self._tb is None and self.opt['logger'].get('use_tb_logger') and 'debug' not in self.opt['name']:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.opt['root_path'], 'tb_logger', self.opt['name'], 'pruning'))
        return self._tb

    # ---- checkpoints ----
    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """Prune stage: the hypernetwork state (vectors, indicators, masks); fine-tune: compact."""
        label = 'latest' if current_iter == -1 else current_iter
        path = os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        if self.stage == PRUNE:
            checkpoint = {'params': {k: v.cpu() for k, v in self.hypernetwork.state_dict().items()}}
        else:
            checkpoint = self.compact_checkpoint()
            checkpoint['fmp'] = {'switch_iter': self.switch_iter, 'ratios': self.final_ratios}
        atomic_write(path, lambda p: torch.save(checkpoint, p))

    def save(self, epoch, current_iter):
        """Network checkpoint, training state, then (fine-tune stage) the export: the export is written
        last, so an export on disk always has its resumable state beside it."""
        super().save(epoch, current_iter)
        if self.stage == FINETUNE:
            self.export(current_iter)

    def training_state(self, epoch, current_iter):
        state = super().training_state(epoch, current_iter)
        state['fmp'] = {'stage': self.stage, 'switch_iter': self.switch_iter, 'ratios': self.final_ratios,
                        'pruner': self.pruner.state_dict() if self.stage == PRUNE else None}
        return state

    def resume_training(self, resume_state):
        fmp = resume_state.get('fmp') or {}
        if fmp.get('stage', PRUNE) != self.stage:
            raise RuntimeError(f"resume state is in stage {fmp.get('stage')!r} but the network checkpoint "
                               f'{self.opt["path"].get("pretrain_network_g")!r} is in stage {self.stage!r}')
        if self.stage == PRUNE and fmp.get('pruner'):
            self.pruner.load_state_dict(fmp['pruner'])
        super().resume_training(resume_state)
