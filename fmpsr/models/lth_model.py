"""Lottery tickets for SR networks: LTH, LMC-LTH and LTH-PWC (sparsity_of_sr_networks.txt Sec. 2,
appendix A.2.1, Table 2).

``model_type: LTHModel``. The prune stage is ``pruning.rounds`` rounds of ``pruning.round_iter``
iterations. At the end of each round the network (trained at the current sparsity) is scored on the
validation set (PSNR, if ``datasets.val`` exists), then ``pruning.prune_fraction`` (p = 0.2) of the
remaining prunable weights are removed by global magnitude
(:func:`fmpsr.pruning.lth.global_magnitude_masks`; the convs reading the image and writing the
output are excluded, :func:`fmpsr.pruning.lth.end_convs`), and the network is reset per
``pruning.reset``:

* ``init`` (LTH): every parameter back to its value at iteration 0 (the network as built or loaded
  from ``path.pretrain_network_g``), masked;
* ``rewind`` (LMC-LTH): back to its value after iteration ``pruning.rewind_iter`` (t) of round 1;
* ``continue`` (LTH-PWC): no reset, training continues from the pruned weights.

Optimiser and scheduler at a reset: both are built anew from ``train.optim_g`` / ``train.scheduler``
(Adam moments cleared, the schedule starts again: every round is a training run of its own, as in the
paper, which keeps its training settings for every round; for ``rewind`` the schedule is not moved to
iteration t). After the last round's pruning and reset the prune stage ends; the fine-tune stage
(``train.total_iter - rounds * round_iter`` iterations, ``train.finetune`` overrides) trains the final
ticket with its masks held at zero, so the last sparsity's PSNR is BasicSR's validation of that stage.

Every round's record (iteration, kept fraction while trained, validation PSNR, weights removed, kept
fraction and sparsity after pruning) is logged and written to ``pruning.json`` under ``lth.rounds``.
The snapshot a reset returns to is part of the prune-stage network checkpoint, so a run resumes
inside any round.
"""
import copy

import torch

from basicsr.data import build_dataset
from basicsr.metrics import calculate_metric
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.pruning.lth import LTHOptions, end_convs, global_magnitude_masks, load_plain_state, prunable_convs, snapshot

from .mask_pruning_model import MaskPruningModel


def val_dataset_options(opt):
    """The first validation data set's options of ``opt`` (``datasets`` keys starting with 'val'), or None."""
    for key, dataset_opt in (opt.get('datasets') or {}).items():
        if key.split('_')[0] == 'val' or (dataset_opt or {}).get('phase') == 'val':
            return dict(dataset_opt, phase='val', scale=opt['scale'])
    return None


@MODEL_REGISTRY.register()
class LTHModel(MaskPruningModel):
    """Iterative magnitude pruning with resets (see the module docstring).

    Raises (option checks, before any folder is made):
        ValueError: a bad ``pruning`` key (:class:`~fmpsr.pruning.lth.LTHOptions`), and the checks of
            :class:`~fmpsr.models.pruning_model.PruningModel`.
    """

    config_class = LTHOptions
    structured = False

    # ---- set-up and resume ----
    def setup_method(self, net, tensors):
        network_opt = dict(self.opt['network_g'])
        example = torch.zeros(1, network_opt.get('num_in_ch', 3), *self.config.macs_input_size)
        self.first_convs, self.last_convs = end_convs(net, network_opt, self.specs, self.config.grouping, example,
                                                      self.config.tie_outputs)
        self.prunable = prunable_convs(self.specs, self.first_convs + self.last_convs)
        self.round_records = []
        self._val_set = None
        saved = (tensors or {}).get('snapshot')
        if saved:
            self.reset_state = {k: v.cpu() for k, v in saved.items()}
        elif self.config.reset == 'init':
            self.reset_state = snapshot(net)          # iteration 0 (as built or loaded)
        else:
            self.reset_state = None                   # rewind: taken after iteration t; continue: never
        get_root_logger().info(f'LTH ({self.config.reset}): {len(self.prunable)} prunable convs; never pruned: '
                               f'{self.first_convs} (read the image), {self.last_convs} (write the output)')

    def method_tensors(self):
        return {'snapshot': self.reset_state} if self.reset_state is not None else {}

    def training_state(self, epoch, current_iter):
        """Adds ``lth`` (the round records and end convs), kept in both stages so that ``pruning.json``
        still lists the rounds after a resume in the fine-tune stage."""
        state = super().training_state(epoch, current_iter)
        state['lth'] = self.lth_info()
        return state

    def resume_training(self, resume_state):
        info = resume_state.get('lth')
        if info:
            self.round_records = copy.deepcopy(list(info.get('rounds') or []))
            self.first_convs, self.last_convs = info['first_convs'], info['last_convs']
            self.prunable = info['prunable_convs']
        super().resume_training(resume_state)

    def release_prune_state(self):
        self.reset_state = None

    # ---- the rounds ----
    def prune_check_due(self, current_iter):
        """The end of every round."""
        return current_iter % self.config.round_iter == 0

    def after_step(self, current_iter):
        if self.config.reset == 'rewind' and current_iter == self.config.rewind_iter and self.reset_state is None:
            self.reset_state = snapshot(self.network)

    def prunable_weights(self):
        """Conv name -> current (masked) weight of every prunable conv."""
        return {name: self.network.get_submodule(name).weight.detach() for name in self.prunable}

    def kept_fraction(self, masks=None):
        """Kept fraction of the prunable weights under ``masks`` (default: the current masks)."""
        masks = self.weight_masks if masks is None else masks
        weights = self.prunable_weights()
        total = sum(w.numel() for w in weights.values())
        kept = sum(int(masks[n].sum()) if n in masks else w.numel() for n, w in weights.items())
        return kept, total

    def update_masks(self, current_iter):
        """End of a round: score, prune ``prune_fraction`` of the remaining weights, reset; True after
        the last round."""
        config = self.config
        round_index = current_iter // config.round_iter
        kept_before, total = self.kept_fraction()
        psnr = self.validation_psnr()
        masks = global_magnitude_masks(self.prunable_weights(), self.weight_masks, config.prune_fraction)
        if config.reset != 'continue':
            if self.reset_state is None:
                raise RuntimeError(f'LTH reset {config.reset!r}: no snapshot to return to at iteration {current_iter}')
            load_plain_state(self.network, self.reset_state)
        self.set_weight_masks(masks)
        kept_after, _ = self.kept_fraction()
        record = {'round': round_index, 'iter': current_iter, 'trained_kept': kept_before / total, 'val_psnr': psnr,
                  'removed': kept_before - kept_after, 'kept_after': kept_after / total,
                  'sparsity_after': 1 - kept_after / total,
                  'params_total_ratio': self.current_ratios().total_ratio('params')}
        self.round_records.append(record)
        psnr_text = 'no val set' if psnr is None else f'val PSNR {psnr:.4f} dB'
        get_root_logger().info(
            f'[LTH round {round_index}/{config.rounds}, iter {current_iter}] trained at kept '
            f'{kept_before / total:.4f}: '
            f'{psnr_text}; removed {kept_before - kept_after} of {kept_before} remaining weights -> kept '
            f'{kept_after / total:.4f} (sparsity {1 - kept_after / total:.4f}); reset: {config.reset}')
        writer = self.tensorboard() if get_dist_info()[0] == 0 else None
        if writer is not None:
            writer.add_scalar('lth/sparsity_after', record['sparsity_after'], current_iter)
            if psnr is not None:
                writer.add_scalar('lth/val_psnr', psnr, current_iter)
        done = round_index >= config.rounds
        if not done:   # a new training run per round (see the module docstring)
            self.setup_optimizers()
            self.setup_schedulers()
        return done

    # ---- validation PSNR of a round ----
    @torch.no_grad()
    def validation_psnr(self):
        """Mean PSNR (dB) of the current network on the validation set, with ``val.metrics.psnr``'s
        options (default: Y channel, crop border = scale); None without a validation set."""
        if self._val_set is None:
            dataset_opt = val_dataset_options(self.opt)
            if dataset_opt is None:
                return None
            self._val_set = build_dataset(dataset_opt)
        scale = self.opt['scale']
        metric_opt = ((self.opt.get('val') or {}).get('metrics') or {}).get('psnr') or \
            {'type': 'calculate_psnr', 'crop_border': scale, 'test_y_channel': True}
        net = self.network
        was_training = net.training
        net.eval()
        total = 0.0
        for index in range(len(self._val_set)):
            item = self._val_set[index]
            output = net(item['lq'].unsqueeze(0).to(self.device))
            data = {'img': tensor2img([output.detach().cpu()]), 'img2': tensor2img([item['gt'].unsqueeze(0)])}
            total += float(calculate_metric(data, metric_opt))
        net.train(was_training)
        return total / len(self._val_set)

    # ---- export ----
    def lth_info(self):
        """Method, end convs and round records (plain Python)."""
        return {'reset': self.config.reset, 'prune_fraction': self.config.prune_fraction,
                'first_convs': getattr(self, 'first_convs', None), 'last_convs': getattr(self, 'last_convs', None),
                'prunable_convs': getattr(self, 'prunable', None),
                'rounds': copy.deepcopy(getattr(self, 'round_records', []))}

    def export_info(self):
        return {'lth': self.lth_info()}
