"""Shared base of the methods that prune a plain network by masks (SRP, L1-norm, ASSL, ISS-P / IHT /
ISS-R, lottery tickets, kernel-level masks).

Unlike FMP, these methods train the network's own conv weights. What they decide is held in two
kinds of mask, which are all the shared machinery needs:

* ``group_masks``: channel group name -> bool (size,) keep mask, for structured (filter) pruning; the
  groups are fmpsr's channel groups (hand-written or torch-pruning's dependency graph,
  :func:`fmpsr.pruning.build_grouping`), so coupled channels are always removed together;
* ``weight_masks``: conv name -> bool (c_out, c_in, kh, kw), for unstructured / kernel pruning.

At the switch :func:`fmpsr.pruning.finalize_plain` slices the network by ``group_masks`` and keeps
``weight_masks`` as the fixed masks of the fine-tune stage; ratios are counted from the masks
(:func:`fmpsr.pruning.mask_ratios`); export, checkpoints and resume are
:class:`~fmpsr.models.pruning_model.PruningModel`'s.

A method subclass sets ``config_class`` (a :class:`~fmpsr.pruning.options.PruningOptions`
subclass), ``structured`` (False: no channel groups are built; the compact network is the dense arch
with masked weights), and implements some of the hooks:

* ``prepare_network(net, state)``: after the network is built and loaded, before DDP wraps it (a
  method that re-parametrizes weights, e.g. ASSL's weight normalisation, does it here);
* ``setup_method(net, state)``: after the network is built and loaded (``state``: the method's
  tensors from a prune-stage checkpoint, or None);
* ``regularization(current_iter)`` -> dict name -> scalar tensor added to the loss (SRP's penalty as a
  loss, ASSL's alignment term);
* ``before_step(current_iter)``: after ``backward``, before the optimiser step (gradient edits);
* ``after_step(current_iter)``: after the optimiser step (ISS-P's shrinkage);
* ``update_masks(current_iter)`` -> bool: at every check; True ends the pruning stage;
* ``method_tensors()`` / ``method_state()`` / ``load_method_state(state)``: what a checkpoint must
  carry beyond the network and the masks (tensors go in the network checkpoint, plain values in the
  training state).

Weight masks set with :meth:`MaskPruningModel.set_weight_masks` are enforced during the prune stage
too (``torch.nn.utils.parametrize``: a masked weight is zero in every forward and gets no gradient);
methods that only choose the mask at the end (ISS-P) assign ``self.weight_masks`` without enforcing.
"""
import copy
from collections import OrderedDict

import torch

from basicsr.archs import build_network
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only

from fmpsr.pruning import (build_grouping, finalize_plain, mask_ratios, plain_state_dict, trace_conv_specs,
                           update_weight_masks)

from fmpsr.pruning.coupling import check_prunable

from .pruning_model import PruningModel

PRUNE_STATE_KEY = 'fmp_prune'


class MaskPruningModel(PruningModel):
    """Base class of the mask-based pruning methods (see the module docstring); not registered."""

    config_class = None
    structured = True

    @classmethod
    def pruning_config(cls, options):
        """Parse the ``pruning`` section with ``cls.config_class``."""
        return cls.config_class.from_options(options)

    @classmethod
    def check_options(cls, opt):
        """The stage machine's checks; structured methods also check that the arch's channels can be
        coupled (:func:`fmpsr.pruning.coupling.check_prunable`), before any folder is made."""
        config = super().check_options(opt)
        if cls.structured:
            check_prunable(opt['network_g'], config.macs_input_size, config.tie_outputs, config.exclude,
                           config.grouping)
        return config

    # ---- networks ----
    def build_prune_network(self, checkpoint=None):
        """Build ``network_g``, load ``checkpoint`` (a pretrained network or a prune-stage checkpoint
        with masks), build its channel groups (structured methods) and re-apply saved masks."""
        network_opt = self.prune_network_options()
        net = build_network(copy.deepcopy(network_opt))
        in_ch = network_opt.get('num_in_ch', 3)
        self.specs = trace_conv_specs(net, self.config.macs_input_size, in_ch)
        self.grouping = None
        if self.structured:
            example = torch.zeros(1, in_ch, *self.config.macs_input_size)
            self.grouping = build_grouping(net, network_opt, self.config.grouping, example, self.config.tie_outputs,
                                           exclude=self.config.exclude)
        saved = {}
        if checkpoint is not None:
            saved = (checkpoint.get('raw') or {}).get(PRUNE_STATE_KEY) or {}
            strict = self.opt['path'].get('strict_load_g', True)
            net.load_state_dict(checkpoint['params'], strict=strict)
            get_root_logger().info(f"Loaded {network_opt['type']} weights from {self.opt['path'].get('pretrain_network_g')}")
        self.group_masks = {g: torch.ones(group.size, dtype=torch.bool)
                            for g, group in (self.grouping.groups.items() if self.grouping else ())}
        self.group_masks.update({g: m.bool() for g, m in (saved.get('group_masks') or {}).items()})
        self.weight_masks = {k: m.bool() for k, m in (saved.get('weight_masks') or {}).items()}
        if saved.get('weight_masks_enforced'):
            update_weight_masks(net, self.weight_masks)
        self.weight_masks_enforced = bool(saved.get('weight_masks_enforced'))
        self.prepare_network(net, saved.get('tensors'))
        self.net_g = self.model_to_device(net)
        self.setup_method(self.get_bare_model(self.net_g), saved.get('tensors'))
        self.print_network(self.net_g)

    def prune_network_options(self):
        """``network_g`` options of the prune-stage network (default: the option file's; a method that
        changes the arch, e.g. the kernel-sparsity recipe widening ``num_feat``, overrides this)."""
        return dict(self.opt['network_g'])

    @property
    def network(self):
        """The bare network of the prune stage (not a DDP wrapper)."""
        return self.get_bare_model(self.net_g)

    def set_weight_masks(self, masks, enforce=True):
        """Replace ``self.weight_masks`` (conv name -> bool (c_out, c_in, kh, kw)); with ``enforce``
        the masks are held in the forward pass from now on (the parameters stay the same objects, so
        the optimiser is still valid; masked weights are set to zero)."""
        self.weight_masks = {k: v.detach().bool().cpu() for k, v in masks.items()}
        if enforce:
            update_weight_masks(self.network, {k: v.to(self.device) for k, v in self.weight_masks.items()})
            self.weight_masks_enforced = True

    # ---- hooks (defaults: nothing) ----
    def prepare_network(self, net, tensors):
        """Called once the prune-stage network is built and loaded, before it is moved to the device and
        wrapped for DDP: the place to change its parameters (ASSL's weight normalisation); ``tensors`` as
        for :meth:`setup_method`."""

    def setup_method(self, net, tensors):
        """Called once the prune-stage network is built; ``tensors``: :meth:`method_tensors` of a
        prune-stage checkpoint, or None."""

    def regularization(self, current_iter):
        """Loss terms of the method (dict name -> scalar tensor); default none."""
        return {}

    def before_step(self, current_iter):
        """After ``backward``, before the optimiser step."""

    def after_step(self, current_iter):
        """After the optimiser step."""

    def update_masks(self, current_iter):
        """At every check; return True when the pruning stage is done (default: never, the stage
        ends at ``pruning.max_prune_iter``)."""
        return False

    def method_tensors(self):
        """Tensors a prune-stage network checkpoint must carry (dict of tensors / nested dicts)."""
        return {}

    def method_state(self):
        """Plain-Python state for the training state (dict)."""
        return {}

    def load_method_state(self, state):
        """Restore :meth:`method_state`."""

    # ---- the stage machine's hooks ----
    def prune_step(self, current_iter):
        """One iteration: reconstruction loss + :meth:`regularization`, backward, :meth:`before_step`,
        optimiser step, :meth:`after_step`."""
        self.optimizer_g.zero_grad()
        self.output = self.net_g(self.lq)
        loss_dict = OrderedDict()
        l_total = self.reconstruction_loss(loss_dict)
        for key, term in self.regularization(current_iter).items():
            loss_dict[key] = term
            l_total = l_total + term
        self.check_finite(l_total, current_iter)
        l_total.backward()
        self.before_step(current_iter)
        self.optimizer_g.step()
        self.after_step(current_iter)
        self.log_dict = self.reduce_loss_dict(loss_dict)

    def prune_check(self, current_iter):
        done = bool(self.update_masks(current_iter))
        self.log_pruning(current_iter)
        return done

    def current_ratios(self):
        """Ratios counted from the masks (:func:`fmpsr.pruning.mask_ratios`)."""
        return mask_ratios(self.specs, self.grouping, self.group_masks, self.weight_masks or None)

    def finalize_network(self):
        """Slice the network by the group masks; weight masks become the fine-tune stage's masks."""
        masks = {k: v.to(self.device) for k, v in self.weight_masks.items()} or None
        return finalize_plain(self.network, self.grouping, self.group_masks, build_network,
                              self.prune_network_options(), masks)

    def prune_checkpoint(self):
        """Network (plain keys), masks and the method's tensors."""
        return {'params': plain_state_dict(self.network),
                PRUNE_STATE_KEY: {'group_masks': {k: v.cpu() for k, v in self.group_masks.items()},
                                  'weight_masks': {k: v.cpu() for k, v in self.weight_masks.items()},
                                  'weight_masks_enforced': self.weight_masks_enforced,
                                  'tensors': self.method_tensors()}}

    def prune_state(self):
        return {'method': self.method_state()}

    def load_prune_state(self, state):
        self.load_method_state(state.get('method') or {})

    # ---- logging ----
    def kept_widths(self):
        """Dict prunable group -> kept channels (int)."""
        if self.grouping is None:
            return {}
        return {g: int(m.sum()) for g, m in self.group_masks.items() if self.grouping.groups[g].prunable}

    @master_only
    def log_pruning(self, current_iter):
        """Ratios and per-group widths to the log and to tensorboard (``tb_logger/<name>/pruning``)."""
        ratios = self.current_ratios()
        metric = self.config.metric
        widths = ', '.join(f'{g}={k}/{self.grouping.groups[g].size}' for g, k in self.kept_widths().items())
        get_root_logger().info(
            f'[prune iter {current_iter}] {metric}: channel ratio {ratios.channel_ratio(metric):.4f}, '
            f'weight ratio {ratios.weight_ratio(metric):.4f}, kept {ratios.total_ratio(metric):.4f}'
            + (f'; widths: {widths}' if widths else ''))
        writer = self.tensorboard()
        if writer is not None:
            for key, value in ratios.as_dict().items():
                writer.add_scalar(f'pruning/{key}', value, current_iter)
            for group, value in self.kept_widths().items():
                writer.add_scalar(f'widths/{group}', value, current_iter)
