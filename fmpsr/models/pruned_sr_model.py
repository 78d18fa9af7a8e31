"""SR model for a compact (pruned) network whose pruned weights must stay exactly zero."""
import copy
import json
import os
from collections import OrderedDict

import torch

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.compat import safe_torch_load
from fmpsr.pruning import apply_weight_masks, get_weight_masks, plain_state_dict
from fmpsr.pruning.export import MASKS_FILE, atomic_write, load_state, read_network_options, write_json
from fmpsr.pruning.untrusted import check_network_opt


def load_checkpoint(path):
    """Read a network checkpoint written by fmpsr or BasicSR, never executing code from it.

    Args:
        path (str): ``*.safetensors`` (an fmpsr export) or ``*.pth`` (a BasicSR / fmpsr checkpoint).

    Returns:
        dict: ``params`` (state dict), ``params_ema`` (BasicSR's EMA state dict, or None),
        ``network_g`` (options or None), ``weight_masks`` (dict or None), and, for ``.pth`` files,
        ``raw`` (the whole loaded dict).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        fmpsr.compat.UnsafeCheckpointError: the file pickles objects whose loading would run code
            (named, with the refused object); fmpsr.compat.CorruptCheckpointError: truncated file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'network checkpoint not found: {path!r}')
    if path.endswith('.safetensors'):
        mask_path = os.path.join(os.path.dirname(path), MASKS_FILE)
        return {'params': load_state(path), 'params_ema': None, 'network_g': read_network_options(path),
                'weight_masks': load_state(mask_path) if os.path.isfile(mask_path) else None}
    raw = safe_torch_load(path, map_location='cpu', what='network checkpoint')
    compact = raw.get('fmp_compact') or {}
    network_opt = compact.get('network_g')
    if network_opt:  # options from a file: only archs fmpsr exports, plain bounded arguments
        network_opt = check_network_opt(network_opt, path, 'fmp_compact.network_g')
    return {'params': raw.get('params', raw), 'params_ema': raw.get('params_ema'),
            'network_g': network_opt, 'weight_masks': compact.get('weight_masks'), 'raw': raw}


REMAINING = 'remaining'


def resolve_scheduler(scheduler_opt, total_iter, start_iter=0):
    """A copy of BasicSR's ``scheduler`` options with ``periods: remaining`` resolved.

    ``CosineAnnealingRestartLR`` with ``periods: remaining`` anneals once, from the optimiser's lr to
    ``eta_min``, over the scheduler steps left (:func:`scheduler_steps_left`), so that the lr of
    iteration ``total_iter`` is exactly ``eta_min``. The pruning
    methods build their fine-tune scheduler at the switch with ``start_iter`` = the switch iteration
    (:meth:`fmpsr.models.pruning_model.PruningModel.scheduler_start_iter`), so every method's
    fine-tune gets a complete anneal however long its prune stage ran; the periods are stored in the
    scheduler's state, so a resumed run keeps them.

    Args:
        scheduler_opt (dict): ``{type, ...}`` as in ``train.scheduler``.
        total_iter (int): ``train.total_iter``.
        start_iter (int): the iteration at which the scheduler is built (0 at the start of a run).

    Returns:
        dict: the options, ``periods`` a list of ints (the input is not modified).

    Raises:
        ValueError: ``periods: remaining`` with another scheduler type, with ``restart_weights`` of
            more than one entry, or with no iteration left.
    """
    scheduler_opt = copy.deepcopy(dict(scheduler_opt))
    if scheduler_opt.get('periods') != REMAINING:
        return scheduler_opt
    check_remaining(scheduler_opt)
    left = scheduler_steps_left(total_iter, start_iter)
    if left < 1:
        raise ValueError(f'scheduler periods: remaining, but no iteration is left (train.total_iter {total_iter}, '
                         f'scheduler built at iteration {start_iter})')
    scheduler_opt['periods'] = [left]
    return scheduler_opt


def scheduler_steps_left(total_iter, start_iter=0):
    """How often a scheduler built at ``start_iter`` is stepped until ``total_iter`` (int).

    BasicSR's loop calls ``update_learning_rate(i)`` at the start of every iteration i and steps the
    schedulers there for i > 1. A scheduler built before the run (``start_iter`` 0) is stepped at
    iterations 2..total_iter (``total_iter - 1`` times); one built during iteration s >= 1 (the switch of
    a pruning method) at s+1..total_iter (``total_iter - s`` times). Its step count at iteration i is
    then ``i - max(start_iter, 1)``.
    """
    return int(total_iter) - max(int(start_iter or 0), 1)


def check_remaining(scheduler_opt, where='scheduler'):
    """Raise ValueError (naming ``where``) when ``periods: remaining`` is given where it cannot apply:
    a scheduler other than CosineAnnealingRestartLR, or more than one restart weight."""
    if not isinstance(scheduler_opt, dict) or scheduler_opt.get('periods') != REMAINING:
        return
    if scheduler_opt.get('type') != 'CosineAnnealingRestartLR':
        raise ValueError(f"{where}.periods: remaining applies to type CosineAnnealingRestartLR, got "
                         f"{scheduler_opt.get('type')!r}")
    weights = scheduler_opt.get('restart_weights', [1])
    if not isinstance(weights, (list, tuple)) or len(weights) != 1:
        raise ValueError(f'{where}.periods: remaining is one period: restart_weights must have one entry, '
                         f'got {weights!r}')


def check_ema_decay(opt):
    """Raise ValueError unless ``train.ema_decay`` (if given) is a number in [0, 1)."""
    decay = (opt.get('train') or {}).get('ema_decay', 0)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f'train.ema_decay must be a number in [0, 1) (0: no EMA; BasicSR configs use 0.999), '
                         f'got {decay!r}')


def check_scale(opt):
    """Raise ValueError when ``network_g.upscale`` differs from the option file's ``scale``."""
    upscale = (opt.get('network_g') or {}).get('upscale')
    if upscale is not None and opt.get('scale') is not None and int(upscale) != int(opt['scale']):
        raise ValueError(f"network_g.upscale ({upscale}) differs from scale ({opt['scale']}) in the option file")


@MODEL_REGISTRY.register()
class PrunedSRModel(SRModel):
    """BasicSR ``SRModel`` for a compact network with weight masks (fine-tuning and testing).

    * ``path.pretrain_network_g`` may be an fmpsr export (``net_g.safetensors``; its
      ``weight_masks.safetensors`` beside it is used unless ``path.weight_masks`` names another
      file) or a ``.pth`` checkpoint; ``network_g`` may be left out when the checkpoint carries it.
    * Pruned weights are held at zero by a ``torch.nn.utils.parametrize`` mask, so fine-tuning
      never brings them back (:mod:`fmpsr.pruning.masks`).
    * Checkpoints hold plain ``name.weight`` keys (a plain LSRB loads them) plus the network
      options and masks under ``fmp_compact``; every file is written atomically.
    * ``train.ema_decay`` > 0 keeps BasicSR's exponential moving average of the generator
      (``net_g_ema``): a compact copy with the same weight masks (so its pruned weights are exactly
      zero too), used for validation, saved as ``params_ema`` beside ``params`` and restored on
      resume. ``path.param_key_g: params_ema`` tests a checkpoint's EMA weights.

    Raises:
        ValueError: no ``network_g`` in the options nor in the checkpoint; ``network_g.upscale`` is
            not ``scale``; ``train.ema_decay`` not in [0, 1).
        FileNotFoundError: a checkpoint or mask file that does not exist (named).
    """

    @classmethod
    def check_options(cls, opt):
        """Check the option file before anything runs (called by :mod:`fmpsr.pipeline`).

        Raises:
            ValueError: ``network_g.upscale`` != ``scale``; ``train.ema_decay`` not in [0, 1).
        """
        check_scale(opt)
        if opt.get('is_train'):
            check_ema_decay(opt)
            train = opt.get('train') or {}
            check_remaining(train.get('scheduler'), 'train.scheduler')
            check_remaining((train.get('finetune') or {}).get('scheduler'), 'train.finetune.scheduler')

    def __init__(self, opt):
        BaseModel.__init__(self, opt)
        self.check_options(opt)
        load_path = self.opt['path'].get('pretrain_network_g')
        checkpoint = load_checkpoint(load_path) if load_path else None
        network_opt = opt.get('network_g') or (checkpoint or {}).get('network_g')
        if checkpoint and checkpoint.get('network_g'):
            if opt.get('network_g') and opt['network_g'] != checkpoint['network_g']:
                get_root_logger().warning(
                    f'network_g of the option file {opt["network_g"]} differs from the one {load_path!r} '
                    f'was pruned to; using the checkpoint\'s: {checkpoint["network_g"]}')
            network_opt = checkpoint['network_g']  # a pruned checkpoint knows its own widths
        if not network_opt:
            raise ValueError('network_g: not given in the option file and the checkpoint '
                             f'{load_path!r} does not carry it')
        masks = self._masks_for(checkpoint)
        self.build_compact(network_opt, checkpoint, masks)
        if self.is_train:
            self.init_training_settings()

    def _masks_for(self, checkpoint):
        mask_path = self.opt['path'].get('weight_masks')
        if mask_path:
            return load_state(mask_path)
        return (checkpoint or {}).get('weight_masks')

    def build_compact(self, network_opt, checkpoint=None, masks=None):
        """Build ``self.net_g`` from ``network_opt``, load ``checkpoint['params']``, apply ``masks``."""
        self.compact_network_opt = dict(network_opt)
        net = build_network(dict(network_opt))
        self._pretrained_ema = (checkpoint or {}).get('params_ema')
        if checkpoint is not None:
            strict = self.opt['path'].get('strict_load_g', True)
            use_ema = self.opt['path'].get('param_key_g') == 'params_ema' and self._pretrained_ema is not None
            net.load_state_dict(checkpoint['params_ema' if use_ema else 'params'], strict=strict)
            get_root_logger().info(f"Loaded {network_opt['type']} weights from {self.opt['path'].get('pretrain_network_g')}")
        if masks:
            apply_weight_masks(net, masks)
        self.net_g = self.model_to_device(net)
        self.print_network(self.net_g)

    # ---- training ----
    def init_training_settings(self, optim_opt=None, scheduler_opt=None):
        """Losses, optimiser and scheduler; ``optim_opt`` / ``scheduler_opt`` override ``train``'s."""
        self.net_g.train()
        train_opt = self.opt['train']
        self.cri_pix = build_loss(copy.deepcopy(train_opt['pixel_opt'])).to(self.device) \
            if train_opt.get('pixel_opt') else None
        self.cri_perceptual = build_loss(copy.deepcopy(train_opt['perceptual_opt'])).to(self.device) \
            if train_opt.get('perceptual_opt') else None
        if self.cri_pix is None and self.cri_perceptual is None:
            raise ValueError('train: both pixel_opt and perceptual_opt are missing; give at least one loss')
        self.setup_optimizers(optim_opt)
        self.setup_schedulers(scheduler_opt)
        self.setup_ema()

    # ---- EMA (BasicSR's train.ema_decay) ----
    def ema_allowed(self):
        """Whether the current network may have an EMA copy (PruningModel: not in the prune stage)."""
        return True

    def setup_ema(self):
        """Build ``self.net_g_ema`` when ``train.ema_decay`` > 0 (otherwise there is no such attribute:
        BasicSR's ``SRModel`` tests ``hasattr(self, 'net_g_ema')``).

        The copy is the compact network rebuilt from ``compact_network_opt`` with the same weight
        masks as ``net_g`` (``torch.nn.utils.parametrize``: its pruned weights are exactly zero in
        every forward and in every saved state dict). It starts from the checkpoint's ``params_ema``
        when there is one (a resumed run), else from ``net_g``'s weights.
        """
        self.ema_decay = float(self.opt['train'].get('ema_decay', 0) or 0)
        if hasattr(self, 'net_g_ema'):
            del self.net_g_ema
        if self.ema_decay <= 0:
            return
        logger = get_root_logger()
        if not self.ema_allowed():
            logger.info(f'train.ema_decay={self.ema_decay}: no EMA in the {getattr(self, "stage", "current")} stage '
                        '(its network is not the compact one); the EMA starts when fine-tuning starts')
            return
        net = self.get_bare_model(self.net_g)
        restored = getattr(self, '_pretrained_ema', None)
        ema = build_network(dict(self.compact_network_opt))
        ema.load_state_dict(restored if restored is not None else plain_state_dict(net), strict=True)
        masks = get_weight_masks(net)
        if masks:
            apply_weight_masks(ema, masks)
        self.net_g_ema = ema.to(self.device).eval().requires_grad_(False)
        self._pretrained_ema = None
        logger.info(f'Use Exponential Moving Average with decay: {self.ema_decay} (started from '
                    f'{"the checkpoint params_ema" if restored is not None else "net_g"})')

    def model_ema(self, decay=0.999):
        """BasicSR's EMA step, ``ema = decay * ema + (1 - decay) * param``, over the trained parameters
        only: a frozen parameter of ``net_g`` (``requires_grad=False``, e.g. a fixed colour
        normalisation) is copied bit for bit instead (BasicSR averages it too, and the float32
        arithmetic moves it by an ulp now and then).

        Raises:
            KeyError: a parameter of the EMA copy that ``net_g`` does not have (they are built alike).
        """
        params = dict(self.get_bare_model(self.net_g).named_parameters())
        with torch.no_grad():
            for name, ema_param in self.net_g_ema.named_parameters():
                param = params[name]
                if param.requires_grad:
                    ema_param.mul_(decay).add_(param, alpha=1 - decay)
                else:
                    ema_param.copy_(param)

    def export_network(self):
        """The bare network to export and validate: the EMA copy when there is one, else ``net_g``."""
        ema = getattr(self, 'net_g_ema', None)
        return ema if ema is not None else self.get_bare_model(self.net_g)

    def setup_optimizers(self, optim_opt=None):
        """Adam (or what BasicSR's ``get_optimizer`` knows) over the compact network's parameters."""
        optim_opt = copy.deepcopy(optim_opt or self.opt['train']['optim_g'])
        optim_type = optim_opt.pop('type')
        params = [p for p in self.net_g.parameters() if p.requires_grad]
        self.optimizer_g = self.get_optimizer(optim_type, params, **optim_opt)
        self.optimizers = [self.optimizer_g]

    def scheduler_start_iter(self):
        """The iteration at which schedulers built now start counting (0; pruning methods: the switch)."""
        return 0

    def setup_schedulers(self, scheduler_opt=None):
        """BasicSR's schedulers, without consuming the options (they may be needed twice);
        ``periods: remaining`` is resolved here (:func:`resolve_scheduler`)."""
        saved = self.opt['train']['scheduler']
        self.opt['train']['scheduler'] = resolve_scheduler(scheduler_opt or saved, self.opt['train']['total_iter'],
                                                           self.scheduler_start_iter())
        self.schedulers = []
        try:
            super().setup_schedulers()
        finally:
            self.opt['train']['scheduler'] = saved

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad()
        self.output = self.net_g(self.lq)
        loss_dict = OrderedDict()
        l_total = self.reconstruction_loss(loss_dict)
        self.check_finite(l_total, current_iter)
        l_total.backward()
        self.optimizer_g.step()
        if getattr(self, 'net_g_ema', None) is not None:
            self.model_ema(decay=self.ema_decay)
        self.log_dict = self.reduce_loss_dict(loss_dict)

    def reconstruction_loss(self, loss_dict):
        """Pixel (and perceptual) loss of ``self.output`` against ``self.gt``; fills ``loss_dict``."""
        l_total = 0
        if self.cri_pix:
            loss_dict['l_pix'] = self.cri_pix(self.output, self.gt)
            l_total = l_total + loss_dict['l_pix']
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            for key, value in (('l_percep', l_percep), ('l_style', l_style)):
                if value is not None:
                    loss_dict[key] = value
                    l_total = l_total + value
        return l_total

    def check_finite(self, loss, current_iter):
        """Raise FloatingPointError when the loss is NaN or Inf, before it reaches the weights."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f'loss is {loss.item()} at iteration {current_iter} ({type(self).__name__}); training stopped '
                f'before the optimiser step, the last good checkpoint in {self.opt["path"].get("models")} is kept')

    # ---- testing ----
    def test(self):
        """Forward ``self.lq`` without gradients through the bare network (the EMA copy when there is
        one, as BasicSR's ``SRModel`` does).

        Not through the DDP wrapper: BasicSR validates on rank 0 only, and DDP's forward broadcasts
        buffers (the masks) as a collective that the other ranks would never join.
        """
        net = self.export_network()
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = net(self.lq)
        net.train(was_training)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """BasicSR's validation; when testing, the metrics also go to ``<results_root>/metrics.json``."""
        super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        if not self.is_train and getattr(self, 'metric_results', None) is not None:
            path = os.path.join(self.opt['path']['results_root'], 'metrics.json')
            results = {}
            if os.path.isfile(path):
                with open(path) as f:
                    results = json.load(f)
            results[dataloader.dataset.opt['name']] = {k: float(v) for k, v in self.metric_results.items()}
            write_json(path, results)

    # ---- checkpoints ----
    def compact_checkpoint(self):
        """``{'params': plain state dict, 'fmp_compact': {'network_g', 'weight_masks'}}`` of ``net_g``,
        plus ``params_ema`` (BasicSR's key) when an EMA copy is kept."""
        net = self.get_bare_model(self.net_g)
        checkpoint = {'params': plain_state_dict(net),
                      'fmp_compact': {'network_g': self.compact_network_opt, 'weight_masks': get_weight_masks(net)}}
        if getattr(self, 'net_g_ema', None) is not None:
            checkpoint['params_ema'] = plain_state_dict(self.net_g_ema)
        return checkpoint

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """Save ``net_g`` as a compact checkpoint, atomically (``models/net_g_<iter>.pth``)."""
        label = 'latest' if current_iter == -1 else current_iter
        path = os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        checkpoint = self.compact_checkpoint()
        atomic_write(path, lambda p: torch.save(checkpoint, p))

    def training_state(self, epoch, current_iter):
        """The dict ``save_training_state`` writes (subclasses add their own entries)."""
        return {'epoch': epoch, 'iter': current_iter,
                'optimizers': [o.state_dict() for o in self.optimizers],
                'schedulers': [s.state_dict() for s in self.schedulers]}

    @master_only
    def save_training_state(self, epoch, current_iter):
        """Write ``training_states/<iter>.state`` atomically (BasicSR writes it in place)."""
        if current_iter == -1:
            return
        state = self.training_state(epoch, current_iter)
        path = os.path.join(self.opt['path']['training_states'], f'{current_iter}.state')
        atomic_write(path, lambda p: torch.save(state, p))
