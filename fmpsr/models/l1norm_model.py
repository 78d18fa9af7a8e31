"""L1-norm filter pruning (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets") for BasicSR.

One shot: the filters of smallest L1 norm (``sum |w|``) are removed at prune ratio ``r`` from the
pretrained network (``path.pretrain_network_g``; from the random initialisation when none is given),
then the compact network is fine-tuned. This is SRP Table 1's "L1-norm" column.

Stage length: the selection is made when the network is built; the prune stage is iteration 1 only,
which takes no optimiser step (its batch is drawn and unused) and ends with the switch, so the
compact network fine-tunes for ``train.total_iter - 1`` iterations. ``pruning.max_prune_iter`` is
therefore 1 (the default; other values are refused).
"""
import copy
import json
import os
from dataclasses import dataclass

import torch

from basicsr.archs import build_network
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.pruning import build_grouping
from fmpsr.pruning.export import write_json
from fmpsr.pruning.options import check_choice
from fmpsr.pruning.selection import (SelectionOptions, check_per_layer, classify_groups, filter_l1_norms,
                                     kept_groups, select_channels)

from .mask_pruning_model import MaskPruningModel

L1_MODES = ('aligned', 'naive')


@dataclass(frozen=True)
class L1NormConfig(SelectionOptions):
    """``pruning`` keys of :class:`L1NormModel` (plus :class:`~fmpsr.pruning.selection.SelectionOptions`).

    Attributes:
        mode (str): 'aligned' (one index set per coupled group, by the group's summed filter L1 norm)
            or 'naive' (Li et al.'s per-layer rule; refused where a group has more than one writer,
            i.e. where it would break a residual add).
        max_prune_iter (int): must be 1 (one-shot; see the module docstring).
    """
    mode: str = 'aligned'
    max_prune_iter: int = 1
    check_freq: int = 1

    def validate(self):
        super().validate()
        check_choice('mode', self.mode, L1_MODES)
        if self.max_prune_iter != 1:
            raise ValueError(f'pruning.max_prune_iter must be 1 for L1NormModel (one-shot pruning), '
                             f'got {self.max_prune_iter}')


def selection_report(grouping, group_masks, skip=()):
    """JSON-friendly description of a selection: constrained / free / kept groups and the removed
    channel indices of each group (for ``pruning.json``)."""
    constrained, free = classify_groups(grouping, skip)
    return {'constrained_groups': constrained, 'free_groups': free, 'kept_groups': kept_groups(grouping, skip),
            'pruned_channels': {g: (~m).nonzero().flatten().tolist() for g, m in group_masks.items()
                                if not bool(m.all())}}


SELECTION_FILE = 'selection.json'


def _selection_path(model):
    return os.path.join(model.opt['path']['experiments_root'], 'export', SELECTION_FILE)


@master_only
def save_selection(model):
    """Write :func:`selection_report` of ``model`` to ``<experiments_root>/export/selection.json`` at
    the switch (it outlives the prune stage's grouping, so resumed fine-tuning still reports it)."""
    write_json(_selection_path(model), selection_report(model.grouping, model.group_masks, model.config.skip_groups))


def export_selection_info(model):
    """``{'selection': ...}`` for ``pruning.json`` from the file :func:`save_selection` wrote."""
    path = _selection_path(model)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {'selection': json.load(f)}


@MODEL_REGISTRY.register()
class L1NormModel(MaskPruningModel):
    """L1-norm pruning + fine-tuning (see the module docstring).

    ``pruning`` keys: ``ratio``, ``mode`` ('aligned' | 'naive'), ``round_to``, ``skip_groups`` and the
    shared ones (``metric``, ``grouping``, ``tie_outputs``, ``macs_input_size``).

    Raises:
        ValueError: (from ``check_options``, before any folder is made) a bad key; ``mode: naive`` on a
            network with a constrained group (the message names the group and its writers).
    """

    config_class = L1NormConfig

    @classmethod
    def check_options(cls, opt):
        config = super().check_options(opt)
        if config.mode == 'naive':
            network_opt = dict(opt['network_g'])
            net = build_network(copy.deepcopy(network_opt))
            example = torch.zeros(1, network_opt.get('num_in_ch', 3), *config.macs_input_size)
            check_per_layer(build_grouping(net, network_opt, config.grouping, example, config.tie_outputs),
                            config.skip_groups)
        return config

    def setup_method(self, net, tensors):
        """Choose the removed filters once, from the weights just loaded (or initialised)."""
        if tensors:  # a prune-stage checkpoint already carries the masks
            return
        if self.config.mode == 'naive':
            check_per_layer(self.grouping, self.config.skip_groups)
        masks = select_channels(self.grouping, self.config.ratio, filter_l1_norms(net, self.grouping.convs),
                                'score', round_to=self.config.round_to, skip=self.config.skip_groups)
        self.group_masks = masks
        get_root_logger().info(f'L1-norm ({self.config.mode}): removing the smallest-L1 filters at ratio '
                               f'{self.config.ratio}: {self.kept_widths()}')

    def method_tensors(self):
        return {'selected': torch.tensor(True)}

    def prune_step(self, current_iter):
        """No optimiser step: the stage only carries the selection to the switch."""
        self.log_dict = {}

    def prune_check_due(self, current_iter):
        return True

    def update_masks(self, current_iter):
        return True

    def export_info(self):
        return export_selection_info(self)

    def release_prune_state(self):
        save_selection(self)
