"""ISS-P, IHT and ISS-R: unstructured pruning from random initialisation by iterative shrinkage
(Wang et al., ICCV 2023, and its supplement; the rule is :mod:`fmpsr.pruning.unstructured`).

``model_type: ISSPModel``, ``pruning.method: iss_p | iht | iss_r``. The run:

1. ``prune`` (``pruning.max_prune_iter`` iterations, the paper's 1e5): ``network_g`` trains from
   random initialisation; after every optimiser step each chosen conv's set (the ``pr`` smallest |w|,
   or a random set for ISS-R, or an N:M pattern with ``pruning.nm``) is multiplied by alpha (0 for
   IHT). The set is chosen again every iteration; shrunk weights keep their gradients.
2. The switch: the last set becomes the fixed weight mask (dense arch, masked weights; no channel is
   removed), held at zero through fine-tuning; exported like every method (``export/``).

Logged (supplement Figs. 1-2), every ``pruning.check_freq`` iterations: per chosen conv the flips
(weights that moved between the shrunk and the kept set since the previous iteration) and the L2
norm of the weight gradient, to tensorboard (``issp/flips/<conv>``, ``issp/grad_norm/<conv>``) and,
for the plotted convs, to ``<experiments_root>/figures/issp_dynamics.png`` at the end of the stage.

``pruning.json`` adds ``sparsity``: zero conv weights counted in the exported tensors, and nonzero
params / MACs beside the dense ones. Zeros do not make a dense conv faster (README).
"""
import copy
import fnmatch
import os

import torch

from basicsr.archs import build_network
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.pruning import plain_state_dict, trace_conv_specs
from fmpsr.pruning.export import atomic_write
from fmpsr.pruning.unstructured import ISSPOptions, IterativeShrinkage, select_layers

from .mask_pruning_model import MaskPruningModel

FIGURE = 'issp_dynamics.png'
SPEED_NOTE = ('Unstructured zeros make files smaller when stored sparsely; a dense conv (CPU or GPU) runs at '
              'the dense speed: use the dense_* counts for speed and memory at run time.')


def chosen_convs(config, conv_names):
    """The convs ``config`` prunes, in call order (see :func:`~fmpsr.pruning.unstructured.select_layers`)."""
    return select_layers(conv_names, config.exclude, config.skip_first_last)


def nm_partial_convs(config, specs):
    """Pruned convs whose input channels are not a multiple of M (their last group stays dense)."""
    if not config.nm:
        return []
    return [n for n in chosen_convs(config, specs) if specs[n].in_channels % config.nm[1]]


def default_plot_layers(layers, count=4):
    """``count`` evenly spaced names of ``layers`` (first and last included)."""
    if len(layers) <= count:
        return list(layers)
    return [layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)]


@MODEL_REGISTRY.register()
class ISSPModel(MaskPruningModel):
    """ISS-P / IHT / ISS-R (see the module docstring); options: :class:`~fmpsr.pruning.unstructured.ISSPOptions`.

    Raises (option checks, before any folder is made):
        ValueError: a bad ``pruning`` key or value; an ``exclude`` pattern that matches no conv; a
            ``plot_layers`` name that is not a pruned conv; nothing left to prune; and the checks of
            :class:`~fmpsr.models.pruning_model.PruningModel`.
    """

    config_class = ISSPOptions
    structured = False

    @classmethod
    def check_options(cls, opt):
        config = super().check_options(opt)
        network_opt = dict(opt['network_g'])
        with torch.device('meta'):
            net = build_network(copy.deepcopy(network_opt))
        names = list(trace_conv_specs(net, config.macs_input_size, network_opt.get('num_in_ch', 3)))
        for pattern in config.exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f'pruning.exclude: {pattern!r} matches no conv of {network_opt["type"]} '
                                 f'(convs: {names[:6]}{" ..." if len(names) > 6 else ""})')
        layers = chosen_convs(config, names)
        if not layers:
            raise ValueError('pruning.exclude / skip_first_last leave no conv to prune')
        missing = [n for n in config.plot_layers if n not in layers]
        if missing:
            raise ValueError(f'pruning.plot_layers: {missing} are not pruned convs (pruned: {layers[:6]}'
                             f'{" ..." if len(layers) > 6 else ""})')
        return config

    # ---- set-up and resume ----
    def setup_method(self, net, tensors):
        self.layers = chosen_convs(self.config, self.specs)
        weights = {name: net.get_submodule(name).weight for name in self.layers}
        self.shrinkage = IterativeShrinkage(weights, self.config.method, self.config.prune_ratio_ramp(),
                                            self.config.alpha_ramp(), self.config.nm, self.opt.get('manual_seed') or 0)
        if self.weight_masks:   # a prune-stage checkpoint: the set of its last iteration
            device = next(iter(weights.values())).device
            self.shrinkage.kept = {k: v.to(device) for k, v in self.weight_masks.items()}
            self.weight_masks = dict(self.shrinkage.kept)
        self.plot_layers = list(self.config.plot_layers) or default_plot_layers(self.layers)
        self.history = {'iter': [], 'flips': {n: [] for n in self.plot_layers},
                        'grad_norm': {n: [] for n in self.plot_layers}}
        self.grad_norms = {}
        partial = nm_partial_convs(self.config, self.specs)
        if partial:
            get_root_logger().warning(f'pruning.nm {list(self.config.nm)}: the input channels of {partial} are not '
                                      f'a multiple of {self.config.nm[1]}; their last partial group is kept whole')

    def method_state(self):
        return {'history': copy.deepcopy(self.history)}

    def load_method_state(self, state):
        if state.get('history'):
            self.history = copy.deepcopy(state['history'])

    _ratios = _ratios_key = None

    def current_ratios(self):
        """The base's mask counts, cached while pr is unchanged (each set's size depends only on pr,
        or on N:M, so the counts do too; this avoids recounting every conv mask every iteration)."""
        if not self.weight_masks:
            return super().current_ratios()
        if self._ratios is None:
            self._ratios = super().current_ratios()
        return self._ratios

    # ---- the rule ----
    def record_due(self, current_iter):
        return current_iter % self.config.check_freq == 0 or current_iter >= self.config.max_prune_iter

    def before_step(self, current_iter):
        """Gradient L2 norm of each chosen conv (supplement Fig. 1), at record iterations."""
        if self.record_due(current_iter):
            self.grad_norms = {n: float(w.grad.norm()) if w.grad is not None else 0.0
                               for n, w in self.shrinkage.weights.items()}

    def after_step(self, current_iter):
        """Shrink this iteration's sets; they are the weight masks the switch will fix."""
        flips = self.shrinkage.step(current_iter)
        self.weight_masks = dict(self.shrinkage.kept)
        if self._ratios_key != self.shrinkage.prune_ratio(current_iter):
            self._ratios, self._ratios_key = None, self.shrinkage.prune_ratio(current_iter)
        if self.record_due(current_iter) and flips:
            self.record(current_iter, flips)

    @master_only
    def record(self, current_iter, flips):
        self.history['iter'].append(current_iter)
        for name in self.plot_layers:
            self.history['flips'][name].append(flips.get(name, 0))
            self.history['grad_norm'][name].append(self.grad_norms.get(name, 0.0))
        writer = self.tensorboard()
        if writer is not None:
            for name in self.layers:
                writer.add_scalar(f'issp/flips/{name}', flips.get(name, 0), current_iter)
                writer.add_scalar(f'issp/grad_norm/{name}', self.grad_norms.get(name, 0.0), current_iter)
            writer.add_scalar('issp/prune_ratio', self.shrinkage.prune_ratio(current_iter), current_iter)
            writer.add_scalar('issp/alpha', self.shrinkage.shrink_factor(current_iter), current_iter)
        total = sum(flips.values())
        get_root_logger().info(f'[issp iter {current_iter}] {self.config.method}: pr '
                               f'{self.shrinkage.prune_ratio(current_iter):.4f}, alpha '
                               f'{self.shrinkage.shrink_factor(current_iter):.4f}, flips {total} over '
                               f'{len(flips)} convs')

    def update_masks(self, current_iter):
        """The stage lasts ``max_prune_iter`` iterations; at its end the figure is written."""
        done = current_iter >= self.config.max_prune_iter
        if done:
            self.plot_dynamics()
        return done

    def target_message(self):
        return f'the end of the {self.config.method} stage'

    def release_prune_state(self):
        self.shrinkage = None

    # ---- reports ----
    @master_only
    def plot_dynamics(self):
        """Flips and gradient L2 norm of the plotted convs over the pruning stage (supplement Figs. 1-2)."""
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:  # the run goes on; the numbers are in tensorboard and the training state
            get_root_logger().warning(f'matplotlib is not installed: {FIGURE} not written (pip install matplotlib)')
            return

        fig, (ax_flips, ax_grad) = plt.subplots(1, 2, figsize=(11, 4))
        iters = self.history['iter']
        for name in self.plot_layers:
            ax_flips.plot(iters, self.history['flips'][name], label=name)
            ax_grad.plot(iters, self.history['grad_norm'][name], label=name)
        ax_flips.set(xlabel='iteration', ylabel='flips since the previous iteration',
                     title=f'{self.config.method}: sparse-structure flips')
        ax_grad.set(xlabel='iteration', ylabel='weight gradient L2 norm', title='gradient L2 norm')
        if iters and all(v > 0 for n in self.plot_layers for v in self.history['grad_norm'][n]):
            ax_grad.set_yscale('log')
        ax_flips.legend(fontsize=7)
        fig.tight_layout()
        atomic_write(self.figure_path(FIGURE), lambda p: fig.savefig(p, format='png', dpi=100))
        plt.close(fig)

    def export_info(self):
        """``sparsity``: counted in the exported (compact) tensors, with dense and nonzero params / MACs."""
        figure = os.path.join(self.opt['path']['experiments_root'], 'figures', FIGURE)
        net = self.get_bare_model(self.net_g)
        specs = trace_conv_specs(net, self.config.macs_input_size, self.opt['network_g'].get('num_in_ch', 3))
        state = plain_state_dict(net)
        per_conv, weights = {}, {}
        dense_params = dense_macs = nonzero_params = nonzero_macs = 0
        for name, spec in specs.items():
            weight = state[f'{name}.weight']
            nonzero = int(torch.count_nonzero(weight))
            bias = spec.out_channels if spec.bias else 0
            dense_params += weight.numel() + bias
            nonzero_params += nonzero + bias
            dense_macs += weight.numel() * spec.out_pixels
            nonzero_macs += nonzero * spec.out_pixels
            weights[name] = (weight.numel(), weight.numel() - nonzero)
            per_conv[name] = (weight.numel() - nonzero) / weight.numel()
        total = sum(n for n, _ in weights.values())
        zeros = sum(z for _, z in weights.values())
        chosen = chosen_convs(self.config, specs)
        pruned_total = sum(weights[n][0] for n in chosen)
        pruned_zeros = sum(weights[n][1] for n in chosen)
        return {'sparsity': {
            'method': self.config.method, 'nm': list(self.config.nm),
            'conv_weights': total, 'zero_conv_weights': zeros, 'weight_sparsity': zeros / total,
            'pruned_convs_weight_sparsity': pruned_zeros / pruned_total if pruned_total else 0.0,
            'dense_params': dense_params, 'nonzero_params': nonzero_params,
            'dense_macs': dense_macs, 'nonzero_macs': nonzero_macs,
            'macs_input_size': list(self.config.macs_input_size),
            'pruned_convs': chosen, 'dense_convs': [n for n in specs if n not in chosen],
            'nm_partial_convs': nm_partial_convs(self.config, specs),
            'per_conv': per_conv, 'note': SPEED_NOTE},
            'figure': figure if os.path.exists(figure) else None}
