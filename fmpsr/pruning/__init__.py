"""The pruning core: channel groups, hypernetwork convs, params / MACs accounting, convergence
criteria, finalize and export. It knows nothing of BasicSR's trainer; model classes in
``fmpsr.models`` drive it."""
from .accounting import ConvSpec, Counts, PruneRatios, count, hypernetwork_ratios, trace_conv_specs
from .coupling import auto_grouping
from .criteria import ConvergenceCriterion
from .export import load_compact, save_compact
from .finalize import finalize
from .fmp import FMPConfig, FMPPruner
from .grouping import ChannelGroup, ChannelGrouping, build_grouping
from .hyperconv import ChannelVector, HyperConv2d
from .hypernet import HyperNetwork
from .masks import apply_weight_masks, get_weight_masks, plain_state_dict

__all__ = [
    'ChannelGroup', 'ChannelGrouping', 'ChannelVector', 'ConvSpec', 'ConvergenceCriterion', 'Counts',
    'FMPConfig', 'FMPPruner', 'HyperConv2d', 'HyperNetwork', 'PruneRatios', 'apply_weight_masks', 'auto_grouping',
    'build_grouping', 'count', 'finalize', 'get_weight_masks', 'hypernetwork_ratios', 'load_compact',
    'plain_state_dict', 'save_compact', 'trace_conv_specs'
]
