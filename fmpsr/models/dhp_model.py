"""DHP: differentiable meta pruning via hypernetworks (Li et al., ECCV 2020), the channel-only
method FMP is compared with (FMP Sec. 4.3, Table 4).

DHP is FMP with the weight indicators switched off: every conv weight is generated from channel
vectors only, the vectors are pruned by the proximal step (L1 soft-thresholding, FMP Eqs. 9-10), and
the search stops once the kept fraction of MACs, counted from the masks
(``k*k*c_in_kept*c_out_kept*H_out*W_out`` per conv), is at most ``keep_ratio + 0.02``, checked every
100 iterations (DHP's ``ratio`` and ``stop_limit``). Finalize and fine-tuning are FMP's.

One stopping rule for both sides of FMP Table 4. The FMP files of Table 4
(``options/edsr/fmp_edsr_x4_keep{60,40,20}.yml``) use the same criterion, ``keep_ratio`` with the same
``keep_ratio`` and ``keep_tolerance: 0.02``: FMP stops when channels and weights together leave at
most keep_ratio + 0.02 of the MACs (weights are pruned up to exactly keep_ratio, see
:meth:`fmpsr.pruning.criteria.ConvergenceCriterion.weight_budget`), DHP when channels alone do. With
FMP on ``criterion: total`` (gamma_c + gamma_w = 1 - keep_ratio, exact) DHP would stop 2 points of
MACs earlier, a head start in PSNR.

Where fmpsr's DHP differs from DHP's code (github.com/ofsoundof/dhp, ``restoration/``, its EDSR
script ``scripts/dhp/dhp_edsr.sh``):

* Masks during the search. DHP's search forward feeds the latent vectors to the hypernetwork
  unmasked: an entry soft-thresholded to zero still yields non-zero weights through the biases
  B0..B2, and the masks (|z| >= 5e-3) are used only to count FLOPs and at finalize, so the searched
  network and the finalized one compute different functions. fmpsr applies the masks in the forward
  pass (a pruned channel outputs exactly zero), so the network being searched is the one finalized.
* Upsampler grouping. DHP (``--prune_upsampler``) feeds the stream vector to both x2 upsampler convs
  and masks their outputs with the stream mask repeated r*r times (``dhp_srresnet.Upsampler``): the
  upsampler width is tied to the stream width. fmpsr's automatic coupling (``grouping: auto``,
  :mod:`fmpsr.pruning.coupling`) gives each upsampler conv its own output vector, the r*r conv outputs
  of one PixelShuffle channel pruned together, independent of the stream.
* Schedule. DHP searches with Adam at lr 1e-4 decayed by 0.1 every 40 epochs and stops the search at
  60 epochs at most (about 120 K iterations of batch 16 on its 32,208 DIV2K sub-images), then
  fine-tunes to 300 epochs; LR patches 48, FLOPs at a 64x64 input. fmpsr runs both sides of Table 4
  with the FMP files' schedule (lr 1e-4 halved every 200 K iterations, search capped at 300 K
  iterations, FMP Sec. 4.3; LR patch 64; DIV2K + Flickr2K), so that FMP and DHP differ only by the
  weight indicators.
* alpha (the hypernetwork weight decay of FMP Eq. 4, ``train.optim_g.weight_decay``) is 0, as in
  DHP's restoration code (``--weight_decay`` default 0, not set by its EDSR script) and as the FMP
  paper gives no value; fmpsr applies it to the hypernetwork parameters only, never to the channel
  vectors (whose L1 term is the proximal step) or the weight indicators, where DHP's optimiser
  would decay every parameter.
* Initialisation. DHP's code draws z ~ N(0, 1) (and W2 giving 3x PyTorch's conv variance); with one
  vector along the residual stream the untrained network's output is up to 1e4x the plain network's,
  and at a strong ``lambda_c`` the kept set is the initial |z| ranking. fmpsr's default
  (``pruning.hyper_init: plain``, :class:`fmpsr.pruning.hypernet.HyperNetwork`) starts at the plain
  network's initialised scale with every z = 1; ``hyper_init: dhp`` is DHP's draw.
* Known faults of the release not repeated: its EDSR search forward does not chain the residual
  blocks (each block reads the head output), masks are created on CUDA only, there is no export to a
  plain network and no DDP.
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
