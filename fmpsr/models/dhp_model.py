"""DHP: differentiable meta pruning via hypernetworks (Li et al., ECCV 2020), the channel-only
method FMP is compared with (FMP Sec. 4.3, Table 4).

DHP is FMP with the weight indicators switched off: every conv weight is generated from channel
vectors only, the vectors are pruned by the proximal step (L1 soft-thresholding, FMP Eqs. 9-10), and
the search stops once the kept fraction of MACs, counted from the masks
(``k*k*c_in_kept*c_out_kept*H_out*W_out`` per conv), is at most ``keep_ratio + 0.02``, checked every
100 iterations (DHP's ``ratio`` and its tolerance). Finalize and fine-tuning are FMP's.
"""
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.pruning import FMPConfig

from .fmp_model import FMPModel

DHP_DEFAULTS = {'weight_indicators': False, 'criterion': 'keep_ratio', 'metric': 'flops', 'check_freq': 100,
                'keep_tolerance': 0.02}


@MODEL_REGISTRY.register()
class DHPModel(FMPModel):
    """DHP for BasicSR's ``train.py``: :class:`FMPModel` with the defaults of :data:`DHP_DEFAULTS`.

    ``pruning.keep_ratio`` is DHP's ``ratio`` (kept fraction of MACs, e.g. 0.6 / 0.4 / 0.2 in FMP
    Table 4); every other FMP key (``lambda_c``, ``grouping``, ``check_freq``, ...) works as for FMP.

    Raises:
        ValueError: ``pruning.weight_indicators: true`` or a criterion that prunes weights
            ('weight', 'total_fixed', 'total'): that is FMP, use ``FMPModel``.
    """

    @classmethod
    def pruning_config(cls, options):
        config = FMPConfig.from_options(options, defaults=DHP_DEFAULTS)
        if config.weight_indicators:
            raise ValueError('DHPModel: pruning.weight_indicators must be false (DHP prunes channels only); '
                             'use model_type: FMPModel for channels and weights')
        if config.criterion not in ('keep_ratio', 'channel'):
            raise ValueError(f"DHPModel: pruning.criterion {config.criterion!r} prunes weights; choose 'keep_ratio' "
                             "(DHP) or 'channel'")
        return config
