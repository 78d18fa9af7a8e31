"""FMP: prune from scratch with a hypernetwork, finalize, fine-tune, all in one BasicSR run.

The run has two stages (FMP Sec. 3.4, 4.4; DHP's search-then-finetune):

1. ``prune``: ``network_g`` (any registered conv arch: LSRB, EDSR, RCAN, ...) is turned into its
   hypernetwork form, with channel groups from the arch's hand-written grouping or from the
   dependency graph (``pruning.grouping``, :mod:`fmpsr.pruning.coupling`); each
   iteration minimises ``L_rec + alpha D(Theta_H) + lambda_W R(Z_W)`` (FMP Eq. 4; alpha is
   ``train.optim_g.weight_decay``, applied to the hypernetwork parameters only; lambda_W R(Z_W) is the
   loss ``train.indicator_opt``, :class:`fmpsr.losses.weight_indicator_loss.WeightIndicatorLoss`),
   then applies the proximal step to the channel vectors (Eqs. 9-10) and, with
   ``pruning.indicator_update: proximal``, to the weight indicators. The weight indicators are a
   parameter group of ``optim_g`` or, with ``pruning.indicator_optim``, have their own optimiser (SGD
   in FMP Sec. 3.4), which goes into ``self.optimizers`` so BasicSR's schedulers, checkpoints and
   resume cover it. Every ``pruning.check_freq`` iterations the masks are updated and the
   convergence rule evaluated (:mod:`fmpsr.pruning.fmp`).
2. ``finetune``: at convergence (or at ``pruning.max_prune_iter``) the hypernetwork is finalized into
   a compact plain network whose pruned weights stay at zero; the optimiser and scheduler are built
   anew (``train.finetune`` may override ``optim_g`` / ``scheduler``) and training goes on until
   ``train.total_iter``. The compact network is exported to ``<experiments_root>/export`` at the
   switch and again at every checkpoint of the fine-tune stage (so it always holds the latest one).
"""
import copy
import dataclasses
import os
from collections import OrderedDict

import torch

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.losses.weight_indicator_loss import WeightIndicatorLoss
from fmpsr.pruning import FMPConfig, FMPPruner, HyperNetwork, build_grouping, finalize, trace_conv_specs
from fmpsr.pruning.coupling import check_prunable
from fmpsr.pruning.grouping import GROUPINGS
from fmpsr.pruning.latency import LatencyTable, grid_step, half_width_network, measure_table, resolve_device

from .pruning_model import ESA_ARCHS, ESA_MIN_LR_SIZE, PRUNE, PruningModel, check_patch_size  # noqa: F401


# the older keys of the pruning section and the WeightIndicatorLoss argument each stands for
LEGACY_LOSS_KEYS = {'lambda_w': 'loss_weight', 'weight_reg': 'norm', 'weight_reg_reduction': 'reduction'}


def build_indicator_loss(indicator_opt):
    """The weight-indicator regulariser from ``train.indicator_opt`` (BasicSR's ``build_loss``).

    Raises:
        ValueError: not a dict with ``type``, an unregistered type, or arguments the loss rejects.
    """
    if not isinstance(indicator_opt, dict) or 'type' not in indicator_opt:
        raise ValueError(f'train.indicator_opt must be a dict with a type (e.g. {{type: WeightIndicatorLoss, '
                         f'loss_weight: 0.02, norm: l1, reduction: sum}}), got {indicator_opt!r}')
    try:
        return build_loss(dict(indicator_opt))
    except KeyError as err:
        raise ValueError(f"train.indicator_opt.type: no loss named {indicator_opt['type']!r} is registered") from err
    except TypeError as err:
        raise ValueError(f'train.indicator_opt: {err}') from err


def build_indicator_optimizer(optim_opt, params):
    """``torch.optim.<type>(params, **rest)`` from ``pruning.indicator_optim`` (FMP Sec. 3.4: SGD).

    The group is named 'weight' (its lr is the step of the indicators' proximal operator).

    Raises:
        ValueError: arguments the optimiser rejects (named).
    """
    optim_opt = dict(optim_opt)
    optim_type = optim_opt.pop('type')
    try:
        return getattr(torch.optim, optim_type)([{'params': params, 'name': 'weight'}], **optim_opt)
    except (TypeError, ValueError) as err:
        raise ValueError(f'pruning.indicator_optim ({optim_type}): {err}') from err


@MODEL_REGISTRY.register()
class FMPModel(PruningModel):
    """Flexible Meta Pruning model (FMP Sec. 3.3-3.4, 4.4) for BasicSR's ``train.py``.

    Options: ``network_g`` (any registered arch built from ``nn.Conv2d``), ``pruning`` (see
    :class:`fmpsr.pruning.FMPConfig`), ``train`` as for ``SRModel`` plus optional
    ``train.finetune: {optim_g, scheduler}``. The stage machine (switch, export, checkpoints,
    resume) is :class:`~fmpsr.models.pruning_model.PruningModel`'s.

    Raises:
        ValueError: bad ``pruning`` options (unknown key, metric, criterion, regulariser, targets),
            ``network_g.upscale`` != ``scale``, LR patch too small for ESA,
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
        stream = (opt.get('network_g') or {}).get('stream_feats')
        if arch == 'LSRB' and stream and len(set(stream)) > 1 and (config.grouping or 'hand') == 'hand':
            raise ValueError(f'pruning.grouping: hand ties every LSRB block boundary to one width, but '
                             f'network_g.stream_feats = {stream} differ; use pruning.grouping: auto')
        # convs the hypernetwork cannot couple (computed weights, grouped convs, ops that mix channels) are
        # refused here, before any experiment folder exists (fmpsr.pruning.coupling.check_prunable)
        check_prunable(opt['network_g'], config.macs_input_size, config.tie_outputs, config.exclude, config.grouping)
        if config.metric == 'latency':  # a missing table or device is named before any experiment folder exists
            table = config.latency['table']
            if table and not os.path.isfile(table):
                raise FileNotFoundError(f'pruning.latency.table: no such file {table!r}')
            if config.latency['device'] != 'auto':
                resolve_device(config.latency['device'])
        if config.weight_indicators and config.indicator_optim is not None:  # bad arguments named now, not later
            build_indicator_optimizer(config.indicator_optim, [torch.zeros(1, requires_grad=True)])
        return cls.indicator_loss_config(opt, config)

    @classmethod
    def indicator_loss_config(cls, opt, config):
        """Map ``train.indicator_opt`` (the weight-indicator regulariser as a BasicSR loss) onto ``config``.

        ``train.indicator_opt`` and the older keys ``pruning.lambda_w`` / ``weight_reg`` /
        ``weight_reg_reduction`` say the same thing: either may be given, not both.

        Returns:
            FMPConfig: ``config`` with ``lambda_w``, ``weight_reg``, ``weight_reg_reduction`` from the loss.

        Raises:
            ValueError: both forms given; ``train.indicator_opt`` not a dict with a registered ``type``,
                or bad arguments (named).
        """
        indicator_opt = (opt.get('train') or {}).get('indicator_opt')
        if indicator_opt is None:
            return config
        legacy = [k for k in LEGACY_LOSS_KEYS if k in (opt.get('pruning') or {})]
        if legacy:
            old = ', '.join(f'pruning.{k}' for k in legacy)
            new = ', '.join(f'{LEGACY_LOSS_KEYS[k]}: {opt["pruning"][k]}' for k in legacy)
            raise ValueError(f'the weight-indicator regulariser is given twice, in train.indicator_opt and in {old}: '
                             f'remove {old} (in train.indicator_opt it reads {new})')
        loss = build_indicator_loss(indicator_opt)
        if isinstance(loss, WeightIndicatorLoss):
            config = dataclasses.replace(config, lambda_w=loss.loss_weight, weight_reg=loss.norm,
                                         weight_reg_reduction=loss.reduction)
        if config.indicator_update == 'proximal' and not hasattr(loss, 'proximal_'):
            raise ValueError(f"pruning.indicator_update: proximal needs a loss with a proximal operator; "
                             f"train.indicator_opt.type {indicator_opt['type']!r} has none (use WeightIndicatorLoss)")
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
        grouping = build_grouping(plain, network_opt, self.config.grouping, example, self.config.tie_outputs,
                                  exclude=self.config.exclude)
        latency = self.latency_table(plain, in_ch, grouping)  # before HyperNetwork converts plain's convs in place
        hyper = HyperNetwork(plain, grouping, self.config.embed_dim, init=self.config.hyper_init)
        if not self.config.weight_indicators:  # DHP: Z_W fixed at one
            for bank in hyper.banks:
                bank.weight_indicator.requires_grad_(False)
        if checkpoint is not None:
            hyper.load_state_dict(checkpoint['params'], strict=True)
        indicator_opt = (self.opt.get('train') or {}).get('indicator_opt')
        loss = build_indicator_loss(indicator_opt) if indicator_opt is not None else None
        self.pruner = FMPPruner(hyper, self.specs, self.config, loss, latency)
        self.net_g = self.model_to_device(hyper)
        self.print_network(self.net_g)

    build_hypernetwork = build_prune_network

    LATENCY_FILE = 'latency_table.json'

    def latency_table(self, plain, in_ch, grouping):
        """The :class:`~fmpsr.pruning.latency.LatencyTable` of ``pruning.metric: latency`` (else None).

        Read from ``pruning.latency.table`` when given, else from ``<experiments_root>/latency_table.json``
        (so a resumed run counts exactly as before), else measured on ``pruning.latency.device`` ('auto':
        the training device) by rank 0 and written there; other ranks wait for it and read it. The second
        point of the table's time line (:attr:`~fmpsr.pruning.latency.LatencyTable.line`) is ``plain`` with
        every prunable group of ``grouping`` cut to half its width (rounded up to the grid step), sliced by
        :func:`~fmpsr.pruning.finalize.finalize_plain`.

        Raises:
            FileNotFoundError: ``pruning.latency.table`` does not exist.
            ValueError: the table does not hold this network's convs (the file is named).
        """
        if self.config.metric != 'latency':
            return None
        keys, logger = self.config.latency, get_root_logger()
        root = (self.opt.get('path') or {}).get('experiments_root')
        cache = os.path.join(root, self.LATENCY_FILE) if root else None
        source = keys['table'] or (cache if cache and os.path.isfile(cache) else None)
        table = None
        if source is None and self.opt.get('rank', 0) == 0:
            device = str(self.device) if keys['device'] == 'auto' else resolve_device(keys['device'])
            step = grid_step(keys, self.config.round_to)
            logger.info(f'Measuring the latency table on {device} (grid step {step} channels, '
                        f'{keys["repeats"]} repeats at LR {list(self.config.macs_input_size)}) ...')
            narrow = half_width_network(plain, grouping, step, build_network, self.opt['network_g'])
            table = measure_table(plain, self.specs, self.config.macs_input_size, in_ch, device, keys['threads'],
                                  step, keys['warmup'], keys['repeats'], narrow=narrow)
            if cache:
                table.save(cache)
            source = cache or 'measured now'
        if self.opt.get('dist', False):
            torch.distributed.barrier()  # rank 0 has written the cache
        if table is None:
            source = source or cache
            table = LatencyTable.load(source)
        table.check_matches(self.specs, source)
        if keys['table'] and cache and not os.path.isfile(cache) and self.opt.get('rank', 0) == 0:
            table.save(cache)  # the experiment folder keeps the table it was pruned with
        meta = table.meta
        scale, offset = table.line
        logger.info(f'Latency table ({source}): {meta.get("device_name")}, {meta.get("threads")} threads, LR '
                    f'{meta.get("input_size")}: dense network {meta.get("network_s", 0) * 1e3:.2f} ms (conv sum '
                    f'{meta.get("conv_sum_s", 0) * 1e3:.2f} ms), half-width network '
                    f'{(meta.get("narrow_network_s") or 0) * 1e3:.2f} ms; time = {scale:.3f} x conv sum + '
                    f'{offset * 1e3:.2f} ms')
        return table

    @property
    def hypernetwork(self):
        return self.get_bare_model(self.net_g)

    # ---- optimisation ----
    def setup_optimizers(self, optim_opt=None):
        """Prune stage: ``optim_g`` over the hypernetwork (weight decay alpha, FMP Eq. 4, 8) and the
        channel vectors (no decay), plus the weight indicators (no decay, lr * ``weight_lr_mult``)
        unless ``pruning.indicator_optim`` gives them their own optimiser (``self.optimizer_w``, second
        in ``self.optimizers``). Adam is fused unless ``optim_g`` says ``fused`` or ``foreach``.
        Fine-tune stage: as PrunedSRModel.

        Raises:
            ValueError: ``pruning.indicator_optim`` with arguments its optimiser rejects (named).
        """
        if self.stage != PRUNE:
            return super().setup_optimizers(optim_opt)
        optim_opt = copy.deepcopy(optim_opt or self.opt['train']['optim_g'])
        optim_type = optim_opt.pop('type')
        weight_decay = optim_opt.pop('weight_decay', 0)
        lr = optim_opt.pop('lr')
        groups = self.hypernetwork.parameter_groups()
        param_groups = [
            {'params': groups['hyper'], 'lr': lr, 'weight_decay': weight_decay, 'name': 'hyper'},
            {'params': groups['channel'], 'lr': lr * self.config.channel_lr_mult, 'weight_decay': 0, 'name': 'channel'}]
        own_optim = self.config.weight_indicators and self.config.indicator_optim is not None
        if self.config.weight_indicators and not own_optim:
            param_groups.append({'params': groups['weight'], 'lr': lr * self.config.weight_lr_mult, 'weight_decay': 0,
                                 'name': 'weight'})
        if optim_type == 'Adam' and not {'fused', 'foreach'} & set(optim_opt):
            # the hypernetwork has ~13x the plain network's parameters: Adam's per-tensor loop costs
            # more than the weight generation (scripts/benchmark/fmp_step_overhead.py)
            optim_opt['fused'] = True
        self.optimizer_g = self.get_optimizer(optim_type, param_groups, lr, **optim_opt)
        self.optimizers = [self.optimizer_g]
        self.optimizer_w = None
        if own_optim:
            self.optimizer_w = build_indicator_optimizer(self.config.indicator_optim, groups['weight'])
            self.optimizers.append(self.optimizer_w)

    def channel_lr(self):
        """Current learning rate of the channel-vector group (the proximal step size, FMP Eq. 10)."""
        return next(g['lr'] for g in self.optimizer_g.param_groups if g.get('name') == 'channel')

    def indicator_lr(self):
        """Current learning rate of the weight indicators (the step of their proximal operator)."""
        optimizer = self.optimizer_w or self.optimizer_g
        return next(g['lr'] for g in optimizer.param_groups if g.get('name') == 'weight')

    def prune_step(self, current_iter):
        """One FMP iteration: ``L_rec + lambda_W R(Z_W)`` (Eq. 4; the regulariser only with
        ``indicator_update: gradient``), optimiser step(s), proximal steps on the channel vectors
        (Eq. 10) and, with ``indicator_update: proximal``, on the weight indicators."""
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        self.output = self.net_g(self.lq)
        loss_dict = OrderedDict()
        l_total = self.reconstruction_loss(loss_dict)
        loss_dict['l_reg_w'] = self.pruner.regularization()
        l_total = l_total + loss_dict['l_reg_w']
        self.check_finite(l_total, current_iter)
        l_total.backward()
        self.pruner.accumulate_importance()  # the selection diagnostic's Taylor importance
        for optimizer in self.optimizers:
            optimizer.step()
        self.pruner.proximal_step(self.channel_lr())
        if self.config.weight_indicators:
            self.pruner.indicator_proximal_step(self.indicator_lr())
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
        """The compact network sliced from the hypernetwork (:func:`fmpsr.pruning.finalize`); first the
        selection diagnostic goes to the log and to ``pruning.json`` (:meth:`log_selection`)."""
        self.log_selection()
        return finalize(self.hypernetwork, build_network, self.opt['network_g'])

    def log_selection(self):
        """At the end of the prune stage: per channel group, how well the initial |z| and the accumulated
        Taylor importance ``sum |dL/dz * z|`` predict the kept channels (AUC, :mod:`fmpsr.pruning.diagnostics`),
        into the log and into ``search_info['selection']`` (written to ``pruning.json``). An initial-|z|
        AUC near 1 means the draw, not the data, chose the channels (e.g. ``lambda_c`` >= 1 under Adam:
        each step moves z by about one lr whatever the gradient, and the shrink lr * lambda_c outweighs it)."""
        report = self.pruner.selection_report()
        self.search_info['selection'] = report

        def text(value):
            return 'n/a' if value is None else f'{value:.3f}'
        rows = '; '.join(f'{name}: {text(row["auc_initial_magnitude"])} / {text(row["auc_importance"])} '
                         f'(kept {row["kept"]}/{row["size"]})' for name, row in report['groups'].items())
        mean = report['mean']
        get_root_logger().info(
            f'Selection diagnostic, AUC of "kept" against initial |z| / accumulated |dL/dz * z| per group '
            f'(1: ranks every kept channel above every pruned one; 0.5: no relation or equal scores): {rows}; '
            f'size-weighted mean {text(mean["auc_initial_magnitude"])} / {text(mean["auc_importance"])}')

    def release_prune_state(self):
        del self.pruner
        self.optimizer_w = None  # holds the weight indicators (and SGD buffers) of the dropped hypernetwork

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
        deferred = self.pruner.deferred_channels
        deferred = f'; {deferred} channels below the threshold deferred (max_overshoot)' if deferred else ''
        get_root_logger().info(
            f'[prune iter {current_iter}] {metric}: channel ratio {ratios.channel_ratio(metric):.4f}, '
            f'weight ratio {ratios.weight_ratio(metric):.4f}, kept {ratios.total_ratio(metric):.4f} '
            f'(frozen: channel={self.pruner.channel_frozen}, weight={self.pruner.weight_frozen}){deferred}; '
            f'widths: {widths}')
        writer = self.tensorboard()
        if writer is not None:
            for key, value in ratios.as_dict().items():
                writer.add_scalar(f'pruning/{key}', value, current_iter)
            for group, value in kept.items():
                writer.add_scalar(f'widths/{group}', value, current_iter)

    # ---- checkpoints ----
    def prune_checkpoint(self):
        """The hypernetwork state (vectors, indicators, masks, hypernetwork tensors)."""
        state = self.hypernetwork.state_dict()
        params = OrderedDict((k, v.cpu()) for k, v in state.items())
        params._metadata = state._metadata  # module versions (HyperBank's layout version) travel along
        return {'params': params}

    def prune_state(self):
        return self.pruner.state_dict()

    def load_prune_state(self, state):
        self.pruner.load_state_dict(state)

    def resume_training(self, resume_state):
        """BasicSR's resume, then the Adam moments of a state saved before the bank layout of issue 11
        are permuted to the stored layout (see ``HyperBank.from_old_layout``)."""
        super().resume_training(resume_state)
        if self.stage == PRUNE:
            for optimizer in self.optimizers:
                self.hypernetwork.convert_optimizer_state(optimizer)
