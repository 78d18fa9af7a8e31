"""The pruning core: channel groups, hypernetwork convs, params / MACs accounting, convergence
criteria, finalize and export. It knows nothing of BasicSR's trainer; model classes in
``fmpsr.models`` drive it."""
from .accounting import ConvSpec, Counts, PruneRatios, count, hypernetwork_ratios, mask_ratios, trace_conv_specs
from .coupling import auto_grouping
from .criteria import ConvergenceCriterion
from .export import load_compact, save_compact
from .finalize import finalize, finalize_plain, slice_network
from .fmp import FMPConfig, FMPPruner
from .grouping import ChannelGroup, ChannelGrouping, build_grouping
from .hyperconv import ChannelVector, HyperConv2d
from .hypernet import HyperNetwork
from .masks import apply_weight_masks, get_weight_masks, plain_state_dict, update_weight_masks

__all__ = [
    'ChannelGroup', 'ChannelGrouping', 'ChannelVector', 'ConvSpec', 'ConvergenceCriterion', 'Counts',
    'FMPConfig', 'FMPPruner', 'HyperConv2d', 'HyperNetwork', 'PruneRatios', 'apply_weight_masks', 'auto_grouping',
    'build_grouping', 'count', 'finalize', 'finalize_plain', 'get_weight_masks', 'mask_ratios', 'slice_network', 'hypernetwork_ratios', 'load_compact',
    'plain_state_dict', 'save_compact', 'update_weight_masks', 'trace_conv_specs'
]
