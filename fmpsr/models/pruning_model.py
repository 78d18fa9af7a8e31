"""The stage machine every pruning method shares: prune -> finalize -> fine-tune, in one BasicSR run.

A method (FMP, DHP, SRP, L1-norm, ISS-P, LTH, ...) is a thin subclass of :class:`PruningModel` that
says how its pruning stage builds the network, takes one step, checks for the end of the stage and
turns the result into a compact network. Everything else is here, once:

1. ``prune``: ``network_g`` in the method's training form; :meth:`PruningModel.prune_step` each
   iteration; every :meth:`PruningModel.prune_check_due` iteration :meth:`PruningModel.prune_check`
   updates masks and says whether the method's target is met.
2. The switch (at convergence, or at ``pruning.max_prune_iter`` with a warning):
   :meth:`PruningModel.finalize_network` gives the compact plain network, its ``network_g`` options
   and weight masks; the optimiser and scheduler are built anew (``train.finetune`` may override
   ``optim_g`` / ``scheduler``; its scheduler counts from the switch, and ``periods: remaining``
   gives a cosine over the iterations left, :func:`~fmpsr.models.pruned_sr_model.resolve_scheduler`);
   a checkpoint is written at the switch itself, so a crash never repeats it.
3. ``finetune``: the compact network trains with its pruned weights held at zero
   (:class:`~fmpsr.models.pruned_sr_model.PrunedSRModel`) until ``train.total_iter``. It is exported
   to ``<experiments_root>/export`` (safetensors, weight masks, ``network_g.yml``, ``pruning.json``)
   at the switch and at every checkpoint after it.

Checkpoints: network checkpoints hold the method's prune-stage state (:meth:`prune_checkpoint`) or
the compact network; training states add ``fmp: {stage, switch_iter, ratios, pruner}`` (the key name
predates the other methods and is kept so older checkpoints resume). Every file is written atomically.
"""
import copy
import os

import torch

from basicsr.archs import build_network
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only

from fmpsr.archs.limits import ESA_ARCHS, ESA_MIN_LR_SIZE
from fmpsr.pipeline import current_epoch
from fmpsr.pruning import apply_weight_masks, save_compact
from fmpsr.pruning.export import atomic_write, write_json

from .pruned_sr_model import PrunedSRModel, load_checkpoint

PRUNE, FINETUNE = 'prune', 'finetune'
STATE_KEY = 'fmp'


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


def config_dict(config):
    """A method's config dataclass as a JSON-friendly dict (tuples as lists)."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value
    return {k: plain(v) for k, v in vars(config).items()}


class PruningModel(PrunedSRModel):
    """Base class of the pruning methods (see the module docstring); not registered itself.

    Subclasses implement:

    * ``pruning_config(options)`` (classmethod): parse the ``pruning`` section into a config object
      with at least ``metric`` ('params' | 'flops') and ``max_prune_iter`` (int);
    * ``build_prune_network(checkpoint)``: set ``self.net_g`` (and whatever the method needs) for
      the prune stage; ``checkpoint`` is :func:`load_checkpoint`'s dict of a prune-stage or
      pretrained checkpoint, or None;
    * ``prune_step(current_iter)``: one optimisation step of the prune stage; sets ``self.log_dict``;
    * ``prune_check(current_iter)`` -> bool: update masks / counts, log; True when the target is met;
    * ``current_ratios()`` -> :class:`~fmpsr.pruning.accounting.PruneRatios` of the prune stage;
    * ``finalize_network()`` -> (compact nn.Module, its ``network_g`` dict, weight masks dict);
    * ``prune_checkpoint()`` -> dict written as the network checkpoint in the prune stage;
    * ``prune_state()`` / ``load_prune_state(state)``: plain-Python state for the training state.

    Optional: ``prune_check_due(current_iter)`` (default every ``config.check_freq`` iterations),
    ``release_prune_state()`` (drop prune-stage objects at the switch), ``export_info()`` (extra
    entries of ``pruning.json``), ``target_message()`` (the target, for the iteration-cap warning).

    Raises (option checks, before any folder is made):
        ValueError: ``network_g.upscale`` != ``scale``, LR patch too small for ESA,
            ``pruning.max_prune_iter`` >= ``train.total_iter``, unknown ``train.finetune`` keys, and
            whatever the method's ``pruning_config`` raises.
    """

    @classmethod
    def check_options(cls, opt):
        """Check the option file before anything runs (called by :mod:`fmpsr.pipeline`).

        Returns:
            the parsed ``pruning`` config.

        Raises:
            ValueError: see the class docstring; the message names the key and value.
        """
        super().check_options(opt)
        config = cls.pruning_config(opt.get('pruning'))
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
        raise NotImplementedError

    def __init__(self, opt):
        BaseModel.__init__(self, opt)
        self.config = self.check_options(opt)
        self.switch_iter = None
        self.final_ratios = None
        self.search_info = {}   # what the prune stage says about its search (pruning.json 'search')
        self._tb = None
        load_path = self.opt['path'].get('pretrain_network_g')
        checkpoint = load_checkpoint(load_path) if load_path else None
        if checkpoint is not None and checkpoint.get('network_g'):   # a checkpoint of the fine-tune stage
            self.stage = FINETUNE
            extra = checkpoint.get('raw', {}).get(STATE_KEY, {})
            self.switch_iter, self.final_ratios = extra.get('switch_iter'), extra.get('ratios')
            self.search_info = dict(extra.get('search') or {})
            self.build_compact(checkpoint['network_g'], checkpoint, checkpoint['weight_masks'])
        else:
            self.stage = PRUNE
            self.build_prune_network(checkpoint)
        if self.is_train:
            self.init_training_settings()

    # ---- optimisation ----
    def init_training_settings(self):
        if self.stage == PRUNE:
            super().init_training_settings()
        else:
            self.stage_training_settings()

    def scheduler_start_iter(self):
        """0 in the prune stage; the switch iteration in the fine-tune stage, so that a fine-tune
        scheduler with ``periods: remaining`` anneals over ``total_iter - switch_iter`` iterations
        (:func:`~fmpsr.models.pruned_sr_model.resolve_scheduler`)."""
        return (self.switch_iter or 0) if self.stage == FINETUNE else 0

    def stage_training_settings(self):
        """Optimiser and scheduler of the fine-tune stage (``train.finetune`` overrides)."""
        finetune = self.opt['train'].get('finetune') or {}
        PrunedSRModel.init_training_settings(self, finetune.get('optim_g'), finetune.get('scheduler'))

    def prune_check_due(self, current_iter):
        """Whether ``current_iter`` is a check iteration (every ``pruning.check_freq``)."""
        return current_iter % self.config.check_freq == 0

    def optimize_parameters(self, current_iter):
        if self.stage != PRUNE:
            return super().optimize_parameters(current_iter)
        self.prune_step(current_iter)
        cap = current_iter >= self.config.max_prune_iter
        if self.prune_check_due(current_iter) or cap:
            converged = self.prune_check(current_iter)
            if converged or cap:
                self.switch_to_finetune(current_iter, converged=converged)
        self.log_dict.update(self.ratio_log())

    def ratio_log(self):
        """Channel / weight / total ratios in the pruning metric, for the message logger."""
        ratios = self.current_ratios().as_dict() if self.stage == PRUNE else (self.final_ratios or {})
        metric = self.config.metric
        return {f'prune/{k}': ratios[f'{metric}_{k}'] for k in ('channel_ratio', 'weight_ratio', 'total_ratio')
                if f'{metric}_{k}' in ratios}

    def target_message(self):
        """The method's target, for the warning when ``max_prune_iter`` ends the stage first."""
        return f'the {type(self).__name__} target'

    # ---- stage switch ----
    def switch_to_finetune(self, current_iter, converged=True):
        """Finalize into the compact network and start fine-tuning (all ranks)."""
        logger = get_root_logger()
        ratios = self.current_ratios()
        if not converged:
            metric = self.config.metric
            logger.warning(
                f'pruning.max_prune_iter={self.config.max_prune_iter} reached before {self.target_message()} was '
                f'met: {metric} channel ratio {ratios.channel_ratio(metric):.4f}, weight ratio '
                f'{ratios.weight_ratio(metric):.4f}. Finalizing with what was pruned so far.')
        self.final_ratios = dict(ratios.as_dict(), converged=bool(converged))
        compact, network_opt, masks = self.finalize_network()
        self.release_prune_state()
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

    def release_prune_state(self):
        """Drop the prune-stage objects at the switch (default: nothing)."""

    def ema_allowed(self):
        """``train.ema_decay``: no EMA in the prune stage (its network is the method's training form,
        e.g. FMP's hypernetwork, and changes shape at the switch); the EMA of the compact network
        starts at the switch (:meth:`PrunedSRModel.setup_ema`) and is saved and resumed from there."""
        return self.stage != PRUNE

    def export_info(self):
        """Extra entries of ``pruning.json`` (dict; default none)."""
        return {}

    @master_only
    def export(self, current_iter):
        """Write the compact network to ``<experiments_root>/export`` and ``pruning.json`` beside it
        (``current_iter`` -1 means the end of training)."""
        out_dir = os.path.join(self.opt['path']['experiments_root'], 'export')
        checkpoint = self.compact_checkpoint()
        paths = save_compact(out_dir, self.export_network(), checkpoint['fmp_compact']['network_g'],
                             checkpoint['fmp_compact']['weight_masks'])
        info = {'method': type(self).__name__, 'switch_iter': self.switch_iter, 'exported_at_iter': current_iter,
                'network_g': self.compact_network_opt, 'original_network_g': self.opt.get('network_g'),
                'ratios': self.final_ratios, 'pruning': config_dict(self.config), 'files': paths,
                'weights': 'params_ema' if getattr(self, 'net_g_ema', None) is not None else 'params'}
        if self.search_info:
            info['search'] = self.search_info
        info.update(self.export_info())
        write_json(os.path.join(out_dir, 'pruning.json'), info)
        get_root_logger().info(f'Exported the compact network to {out_dir}')

    # ---- logging ----
    def tensorboard(self):
        """A SummaryWriter at ``tb_logger/<name>/pruning`` (None without ``logger.use_tb_logger``)."""
        if self._tb is None and self.opt['logger'].get('use_tb_logger') and 'debug' not in self.opt['name']:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.opt['root_path'], 'tb_logger', self.opt['name'], 'pruning'))
        return self._tb

    def figure_path(self, name):
        """Where a method's plot goes: ``<experiments_root>/figures/<name>``."""
        folder = os.path.join(self.opt['path']['experiments_root'], 'figures')
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, name)

    # ---- checkpoints ----
    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """Prune stage: :meth:`prune_checkpoint`; fine-tune stage: the compact network."""
        label = 'latest' if current_iter == -1 else current_iter
        path = os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        if self.stage == PRUNE:
            checkpoint = self.prune_checkpoint()
        else:
            checkpoint = self.compact_checkpoint()
            checkpoint[STATE_KEY] = {'switch_iter': self.switch_iter, 'ratios': self.final_ratios,
                                     'search': self.search_info}
        atomic_write(path, lambda p: torch.save(checkpoint, p))

    def save(self, epoch, current_iter):
        """Network checkpoint, training state, then (fine-tune stage) the export: the export is written
        last, so an export on disk always has its resumable state beside it."""
        super().save(epoch, current_iter)
        if self.stage == FINETUNE:
            self.export(current_iter)

    def training_state(self, epoch, current_iter):
        state = super().training_state(epoch, current_iter)
        state[STATE_KEY] = {'stage': self.stage, 'switch_iter': self.switch_iter, 'ratios': self.final_ratios,
                            'search': self.search_info,
                            'pruner': self.prune_state() if self.stage == PRUNE else None}
        return state

    def resume_training(self, resume_state):
        saved = resume_state.get(STATE_KEY) or {}
        if saved.get('stage', PRUNE) != self.stage:
            raise RuntimeError(f"resume state is in stage {saved.get('stage')!r} but the network checkpoint "
                               f'{self.opt["path"].get("pretrain_network_g")!r} is in stage {self.stage!r}')
        if self.stage == PRUNE and saved.get('pruner'):
            self.load_prune_state(saved['pruner'])
        super().resume_training(resume_state)


def dense_network(opt):
    """Build the dense ``network_g`` of ``opt`` (a deep copy of the options is consumed)."""
    return build_network(copy.deepcopy(dict(opt['network_g'])))
