"""SRP: structure-regularized pruning (Zhang et al., ICLR 2022, Sec. 3) for BasicSR.

1. Selection (once, from ``path.pretrain_network_g`` when given, else from the random init): every
   *free* group (one writer conv) loses its ``ceil(r*C)`` filters of smallest L1 norm; every
   *constrained* group (several writers meeting at residual adds: EDSR's head conv, every block's
   second conv and the after-body conv) loses one random index set drawn from a ``torch.Generator``
   seeded with ``manual_seed``, shared by all its writers (SRP Eq. 3 and the text after it). The
   upsampler's output channels (groups written through PixelShuffle) and the image channels are
   kept (:func:`fmpsr.pruning.selection.kept_groups`).
2. Regularisation: the loss ``train.sparsity_opt`` (a :class:`~fmpsr.losses.srp_loss.GrowingL2Loss`,
   paper defaults Delta = 1e-4, T = 20, tau = 0.5) adds ``0.5 * alpha * ||w||^2`` over the weights and
   biases of the selected filters only (gradient ``alpha * w``, SRP Eq. 4); alpha grows until it
   reaches tau (iteration 100,000 with the defaults), then ``pruning.stabilize_iter`` more iterations
   run at tau (43,150 in the official schedule).
3. The selected filters are removed (:func:`fmpsr.pruning.finalize_plain`) and the compact network is
   fine-tuned in the same run.

SRP Fig. 3 is produced by the run: the mean L1 norm of the pruned and of the kept filters of
``pruning.plot_layers`` (default: the middle free conv and the middle writer of the first
constrained group) every ``pruning.check_freq`` iterations, as tensorboard scalars
``srp/<layer>/pruned|kept`` and as ``<experiments_root>/figures/srp_filter_norms.png`` at the end of
the prune stage (plus the numbers in ``figures/srp_filter_norms.json``).
"""
import copy
import dataclasses

import torch

from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.pruning.export import atomic_write, write_json
from fmpsr.pruning.options import check_choice, check_number
from fmpsr.pruning.selection import (SelectionOptions, classify_groups, filter_l1_norms, group_writers, pruned_rows,
                                     select_channels, selection_generator)

from .l1norm_model import export_selection_info, save_selection
from .mask_pruning_model import MaskPruningModel

SPARSITY_DEFAULT = {'type': 'GrowingL2Loss', 'loss_weight': 1.0, 'reduction': 'sum', 'delta': 1e-4,
                    'interval': 20, 'tau': 0.5}
MOVED_KEYS = {'delta': 'delta', 'delta_reg': 'delta', 'reg_interval': 'interval', 'interval': 'interval',
              'T': 'interval', 'tau': 'tau', 'reg_ceiling': 'tau', 'alpha': 'delta'}


@dataclasses.dataclass(frozen=True)
class SRPConfig(SelectionOptions):
    """``pruning`` keys of :class:`SRPModel` (plus :class:`~fmpsr.pruning.selection.SelectionOptions`).

    Attributes:
        constrained (str): how constrained groups choose their pruned set: 'random' (SRP) or 'l1'
            (the group's summed filter L1 norm, aligned L1-norm).
        stabilize_iter (int): iterations at alpha = tau before the filters are removed.
        plot_layers (tuple of str): conv names for the Fig. 3 plot; empty: chosen automatically.
        check_freq (int): iterations between Fig. 3 samples and log lines (default 1000).
        max_prune_iter (int): cap of the prune stage; 0 (default): the end of the schedule
            (``iters_to_tau + stabilize_iter``); a positive value must leave room for the schedule.
    """
    constrained: str = 'random'
    stabilize_iter: int = 43150
    plot_layers: tuple = ()
    check_freq: int = 1000
    max_prune_iter: int = 0

    constrained_rules = ('random', 'l1')

    def validate(self):
        super().validate()
        check_choice('constrained', self.constrained, self.constrained_rules)
        check_number('stabilize_iter', self.stabilize_iter, 0, integer=True)
        if not all(isinstance(s, str) for s in self.plot_layers):
            raise ValueError(f'pruning.plot_layers must be a list of conv names, got {list(self.plot_layers)}')


def refuse_moved_keys(options, loss_key):
    """Refuse schedule keys written under ``pruning`` with a message saying where they go."""
    moved = sorted(k for k in (options or {}) if k in MOVED_KEYS)
    if moved:
        raise ValueError(f'pruning: {moved} belong to the penalty loss now: write them as '
                         f'train.{loss_key}: {{type: GrowingL2Loss, ' +
                         ', '.join(f'{MOVED_KEYS[k]}: ...' for k in moved) + '}')


@MODEL_REGISTRY.register()
class SRPModel(MaskPruningModel):
    """SRP for BasicSR's ``train.py`` (see the module docstring).

    Option keys: ``pruning.{ratio, constrained, stabilize_iter, round_to, skip_groups, plot_layers,
    check_freq, max_prune_iter, metric, grouping, tie_outputs, macs_input_size}``;
    ``train.sparsity_opt: {type: GrowingL2Loss, loss_weight, reduction, delta, interval, tau}``
    (defaults: the paper's). The prune stage lasts ``sparsity.iters_to_tau + stabilize_iter``
    iterations.

    Raises:
        ValueError: (``check_options``) bad keys; schedule keys under ``pruning`` (the message says to
            move them to ``train.sparsity_opt``); a ``max_prune_iter`` shorter than the schedule, or a
            schedule that leaves no fine-tuning iterations.
    """

    config_class = SRPConfig
    loss_key = 'sparsity_opt'
    figure_name = 'srp_filter_norms'
    default_loss = SPARSITY_DEFAULT

    @classmethod
    def pruning_config(cls, options):
        refuse_moved_keys(options, cls.loss_key)
        return super().pruning_config(options)

    @classmethod
    def build_sparsity(cls, opt):
        """The penalty loss from ``train.sparsity_opt`` (paper defaults for missing keys)."""
        given = dict((opt.get('train') or {}).get(cls.loss_key) or {})
        loss_opt = dict(cls.default_loss, **given) if given.get('type', cls.default_loss['type']) == \
            cls.default_loss['type'] else given
        try:
            loss = build_loss(copy.deepcopy(loss_opt))
        except TypeError as error:
            raise ValueError(f'train.{cls.loss_key}: {error}') from error
        if not (hasattr(loss, 'alpha') and hasattr(loss, 'iters_to_tau')):
            raise ValueError(f'train.{cls.loss_key}.type {loss_opt["type"]!r} is not a growing penalty '
                             '(use GrowingL2Loss)')
        return loss

    @classmethod
    def schedule_end(cls, config, loss):
        """Iteration at which the prune stage ends."""
        return loss.iters_to_tau + config.stabilize_iter

    @classmethod
    def check_options(cls, opt):
        config = super().check_options(opt)
        if opt.get('is_train'):
            end = cls.schedule_end(config, cls.build_sparsity(opt))
            if config.max_prune_iter == 0:
                config = dataclasses.replace(config, max_prune_iter=end)
            elif end > config.max_prune_iter:
                raise ValueError(f'pruning.max_prune_iter ({config.max_prune_iter}) ends the prune stage before '
                                 f'the penalty schedule does (iteration {end}: alpha reaches tau, then '
                                 f'pruning.stabilize_iter); raise it or shorten train.{cls.loss_key}')
            if end >= int(opt['train']['total_iter']):
                raise ValueError(f'the prune stage ends at iteration {end} (penalty schedule + '
                                 f'pruning.stabilize_iter), '
                                 f"not before train.total_iter ({opt['train']['total_iter']}): no fine-tuning is left")
        if config.plot_layers:
            from basicsr.archs import build_network
            from torch import nn
            net = build_network(copy.deepcopy(dict(opt['network_g'])))
            convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
            unknown = [c for c in config.plot_layers if c not in convs]
            if unknown:
                raise ValueError(f'pruning.plot_layers: {unknown} are not convs of network_g '
                                 f'(convs: {sorted(convs)[:8]} ...)')
        return config

    # ---- setup ----
    def setup_method(self, net, tensors):
        self.sparsity = self.build_sparsity(self.opt).to(self.device)
        self.end_iter = self.schedule_end(self.config, self.sparsity)
        self.history = {}
        if not tensors:  # a fresh run: choose the pruned filters now
            self.select(net)
        self.refresh_rows()
        self.plot_layers = list(self.config.plot_layers) or self.default_plot_layers()
        unknown = [c for c in self.plot_layers if c not in self.grouping.convs]
        if unknown:
            raise ValueError(f'pruning.plot_layers: {unknown} are not pruned convs of the network')

    def select(self, net):
        """SRP's selection (module docstring, step 1) into ``self.group_masks``."""
        rule = 'random' if self.config.constrained == 'random' else 'score'
        self.group_masks = select_channels(
            self.grouping, self.config.ratio, filter_l1_norms(net, self.grouping.convs), rule,
            selection_generator(self.opt.get('manual_seed')), self.config.round_to, self.config.skip_groups)
        get_root_logger().info(f'{type(self).__name__}: pruned filters chosen at ratio {self.config.ratio}; '
                               f'kept widths {self.kept_widths()}')

    def refresh_rows(self):
        """Per conv, the output rows of the selected filters (penalised, then removed)."""
        self.rows = {c: r.to(self.device) for c, r in pruned_rows(self.grouping, self.group_masks).items()}

    def default_plot_layers(self):
        """The middle free conv and the middle writer of the first constrained group (SRP Fig. 3 shows
        ``body.12.body.0`` (free) and ``body.12.body.2`` (constrained) of EDSR)."""
        constrained, free = classify_groups(self.grouping, self.config.skip_groups)
        writers = group_writers(self.grouping)
        layers = []
        if free:
            layers.append(next(iter(writers[free[len(free) // 2]])))
        if constrained:
            convs = list(writers[constrained[0]])
            layers.append(convs[len(convs) // 2])
        return layers

    # ---- the penalty ----
    def penalty_sets(self):
        """List of (conv name -> pruned rows, start iteration of the schedule); SRP: one set from 0."""
        return [(self.rows, 0)]

    def penalised(self, rows):
        """The tensors under the penalty: weight rows and bias entries of the selected filters."""
        net = self.network
        for conv, index in rows.items():
            module = net.get_submodule(conv)
            yield module.weight[index]
            if module.bias is not None:
                yield module.bias[index]

    def regularization(self, current_iter):
        total = 0
        for rows, start in self.penalty_sets():
            total = total + self.sparsity(self.penalised(rows), current_iter, start)
        return {'l_sparsity': total}

    def penalty_alpha(self, current_iter):
        """Current alpha (for logs and tests)."""
        return self.sparsity.alpha(current_iter)

    # ---- stage end ----
    def prune_check_due(self, current_iter):
        return super().prune_check_due(current_iter) or current_iter >= self.end_iter

    def update_masks(self, current_iter):
        self.record_norms(current_iter)
        self.log_dict['prune/alpha'] = self.penalty_alpha(current_iter)
        return current_iter >= self.end_iter

    def target_message(self):
        return f'the end of the penalty schedule (iteration {self.end_iter})'

    # ---- SRP Fig. 3 ----
    @torch.no_grad()
    def record_norms(self, current_iter):
        """Mean L1 norm of the pruned and of the kept filters of each plot layer (SRP Fig. 3)."""
        norms = filter_l1_norms(self.network, self.plot_layers)
        for conv in self.plot_layers:
            if conv not in self.rows:  # nothing chosen in this layer yet (ASSL's constrained layers)
                continue
            pruned = torch.zeros(norms[conv].numel(), dtype=torch.bool)
            pruned[self.rows[conv].cpu()] = True
            entry = self.history.setdefault(conv, {'iter': [], 'pruned': [], 'kept': []})
            entry['iter'].append(int(current_iter))
            entry['pruned'].append(float(norms[conv][pruned].mean()))
            entry['kept'].append(float(norms[conv][~pruned].mean()) if (~pruned).any() else 0.0)
        self.write_norm_scalars(current_iter)

    @master_only
    def write_norm_scalars(self, current_iter):
        writer = self.tensorboard()
        if writer is None:
            return
        for conv, entry in self.history.items():
            writer.add_scalar(f'srp/{conv}/pruned', entry['pruned'][-1], current_iter)
            writer.add_scalar(f'srp/{conv}/kept', entry['kept'][-1], current_iter)

    @master_only
    def plot_norms(self):
        """``figures/srp_filter_norms.png`` (and ``.json``): SRP Fig. 3 of this run."""
        if not self.history:
            return
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(self.history), figsize=(4.5 * len(self.history), 3.4), squeeze=False)
        for ax, (conv, entry) in zip(axes[0], self.history.items()):
            ax.plot(entry['iter'], entry['pruned'], ':', label='Pruned filters')
            ax.plot(entry['iter'], entry['kept'], '-', label='Kept filters')
            ax.set_title(conv)
            ax.set_xlabel('Iteration')
            ax.set_ylabel('Mean L1-norm')
            ax.legend()
        fig.tight_layout()
        path = self.figure_path(self.figure_name + '.png')
        atomic_write(path, lambda p: fig.savefig(p, format='png', dpi=120))
        plt.close(fig)
        write_json(self.figure_path(self.figure_name + '.json'), self.history)
        get_root_logger().info(f'SRP Fig. 3 of this run: {path}')

    # ---- state ----
    def method_tensors(self):
        return {'selected': torch.tensor(True)}

    def method_state(self):
        return {'history': self.history}

    def load_method_state(self, state):
        self.history = copy.deepcopy(state.get('history') or {})

    def release_prune_state(self):
        self.plot_norms()
        save_selection(self)

    def export_info(self):
        return export_selection_info(self)
