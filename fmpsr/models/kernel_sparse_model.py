"""Kernel-level sparsity and the width-sparsity trade-off (sparsity_of_sr_networks.txt Sec. 3-4,
appendix A.2.2, A.5 Table 3).

``model_type: KernelSparseModel``; ``pruning.mask`` chooses how each masked conv's (c_out, c_in) kernel
mask is made (:mod:`fmpsr.pruning.kernel_masks`):

* ``grouped`` (``groups: G``), ``bernoulli`` (``keep_ratio: q``, ``seed``) and ``ws_flex``
  (``keep_ratio``, ``ws_p``, ``nodes``, ``seed``): the mask is fixed when the network is built
  (iteration 0) and the network trains from scratch with it. The prune stage is one iteration
  (``max_prune_iter`` defaults to 0: the stage switch comes after the first, masked, step); the
  fine-tune stage is the training.
* ``erss_g`` / ``erss_l`` (``keep_ratio``): the network trains dense for ``max_prune_iter``
  iterations, then keeps its ``keep_ratio`` kernels of largest ``sum |w|`` across all masked convs
  (ERSS-G) or in each conv (ERSS-L), and fine-tunes with that mask (one shot; the paper prunes
  iteratively over 6 rounds, one per sparsity level of its Table 1).

The convs that read the image and write the output are never masked (A.2.2: "we do not prune the first
layer and the last layer"; found as in LTH, :func:`fmpsr.pruning.lth.end_convs`).

Width-sparsity recipe (Sec. 4, ``widen: factor``, ``ws_flex`` only): the prune-stage network is the
arch with ``num_feat`` multiplied by ``factor``; every masked conv gets a connected WS-flex mask and
the numbers of kept kernels are chosen (:func:`fmpsr.pruning.kernel_masks.match_kernel_counts`) so that
the widened network's nonzero params (``match: params``) or MACs (``match: flops``) equal ``budget``
times the original network's, within one kernel. ``budget: 1`` is the paper's "P" (performance) mode;
its "E" (efficiency) mode is a smaller budget (Table 3: about 0.8).

``grouped`` with ``grouped_export: true`` (default) finalizes into real grouped convs (``CompactArch``
with ``conv_groups``): the masked kernels are not stored at all and a dense conv library runs 1/G of
the MACs. Every other mask stays a dense conv with zeros (a smaller file when zeros are stored
compactly, no faster).

``pruning.json`` gets ``kernel``: the masked / excluded convs, kept and total kernels, the kernel keep
ratio of every conv, nonzero and dense params / MACs of the network and those of the original
(un-widened) network.
"""
import copy

import torch

from basicsr.archs import build_network
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from fmpsr.pruning import count, plain_state_dict, trace_conv_specs
from fmpsr.pruning.kernel_masks import (ERSS, KernelOptions, bernoulli_kernel_mask, block_diagonal_to_grouped,
                                        erss_global_masks, erss_layer_masks, expand_kernel_mask, grouped_kernel_mask,
                                        kernel_mask_of, match_kernel_counts, widened_options, ws_flex_kernel_mask)
from fmpsr.pruning.lth import end_convs, prunable_convs

from .mask_pruning_model import MaskPruningModel


@MODEL_REGISTRY.register()
class KernelSparseModel(MaskPruningModel):
    """Kernel masks: grouped, Bernoulli, ERSS-G / ERSS-L, WS-flex; widen + sparsify (see the module docstring).

    Raises (option checks, before any folder is made):
        ValueError: a bad ``pruning`` key (:class:`~fmpsr.pruning.kernel_masks.KernelOptions`), ``widen``
            on an arch without ``num_feat``, and the checks of
            :class:`~fmpsr.models.pruning_model.PruningModel`. Shapes that a mask cannot fit (G not
            dividing a conv's channels, a keep ratio too low for a connected graph) raise when the
            network is built, naming the conv.
    """

    config_class = KernelOptions
    structured = False

    @classmethod
    def check_options(cls, opt):
        config = super().check_options(opt)
        widened_options(opt.get('network_g') or {}, config.widen)   # raises without num_feat
        return config

    def prune_network_options(self):
        return widened_options(self.opt['network_g'], self.config.widen)

    # ---- masks ----
    def setup_method(self, net, tensors):
        network_opt = self.prune_network_options()
        example = torch.zeros(1, network_opt.get('num_in_ch', 3), *self.config.macs_input_size)
        first, last = end_convs(net, network_opt, self.specs, self.config.grouping, example, self.config.tie_outputs)
        self.excluded = first + last
        self.masked = prunable_convs(self.specs, self.excluded)
        self.kernel_info = None
        if not self.weight_masks and self.config.mask not in ERSS:
            self.set_weight_masks(self.fixed_masks())
        get_root_logger().info(f'KernelSparseModel ({self.config.mask}): {len(self.masked)} masked convs; never '
                               f'masked: {self.excluded}; network_g of the prune stage: {network_opt}')

    def reference_counts(self):
        """Counts of the original (un-widened, dense) ``network_g`` (Counts)."""
        net = build_network(copy.deepcopy(dict(self.opt['network_g'])))
        return count(trace_conv_specs(net, self.config.macs_input_size, self.opt['network_g'].get('num_in_ch', 3)))

    def target_kernels(self):
        """Conv name -> kept kernels of the fixed masks ('bernoulli' has none: it draws each kernel)."""
        config = self.config
        if config.widen is not None:
            target = int(round(config.budget * self.reference_counts().get(config.match)))
            kept, ratio = match_kernel_counts(self.specs, self.masked, target, config.match)
            get_root_logger().info(f'widen x{config.widen}: num_feat {self.prune_network_options()["num_feat"]}, '
                                   f'kernel keep ratio {ratio:.4f} to match {target} {config.match}')
            return kept
        return {n: int(config.keep_ratio * self.specs[n].in_channels * self.specs[n].out_channels + 0.5)
                for n in self.masked}

    def fixed_masks(self):
        """Weight masks (conv -> bool (c_out, c_in, kh, kw)) of grouped / Bernoulli / WS-flex."""
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        kept = self.target_kernels() if config.mask == 'ws_flex' else None
        masks = {}
        for index, name in enumerate(self.masked):
            s = self.specs[name]
            if config.mask == 'grouped':
                kernel = grouped_kernel_mask(s.out_channels, s.in_channels, config.groups, name)
            elif config.mask == 'bernoulli':
                kernel = bernoulli_kernel_mask(s.out_channels, s.in_channels, config.keep_ratio, generator)
            else:
                kernel = ws_flex_kernel_mask(s.out_channels, s.in_channels, kept[name], config.ws_p,
                                             config.seed + 1000 * index, config.nodes, config.graph_tries)
            masks[name] = expand_kernel_mask(kernel, s.kernel_size)
        return masks

    def prune_check_due(self, current_iter):
        """Only at the end of the prune stage (``max_prune_iter``)."""
        return False

    def update_masks(self, current_iter):
        """ERSS: kernel-magnitude masks from the trained weights; every mask: end the prune stage."""
        if self.config.mask in ERSS:
            weights = {n: self.network.get_submodule(n).weight.detach() for n in self.masked}
            select = erss_global_masks if self.config.mask == 'erss_g' else erss_layer_masks
            kernels = select(weights, self.config.keep_ratio)
            self.set_weight_masks({n: expand_kernel_mask(k, self.specs[n].kernel_size) for n, k in kernels.items()})
        return True

    # ---- finalize and export ----
    def finalize_network(self):
        """The dense arch with the kernel masks; 'grouped' (``grouped_export``) as real grouped convs."""
        self.kernel_info = self.describe()
        compact, network_opt, masks = super().finalize_network()
        if self.config.mask != 'grouped' or not self.config.grouped_export:
            return compact, network_opt, masks
        groups = {name: self.config.groups for name in self.masked}
        return to_grouped(compact, network_opt, masks, groups)

    def describe(self):
        """The ``kernel`` entry of ``pruning.json`` (plain Python)."""
        kept = {n: int(kernel_mask_of(self.weight_masks[n]).sum()) for n in self.masked}
        total = {n: self.specs[n].in_channels * self.specs[n].out_channels for n in self.masked}
        ratios = self.current_ratios()
        reference = self.reference_counts()
        return {'mask': self.config.mask, 'masked_convs': list(self.masked), 'excluded_convs': list(self.excluded),
                'network_g': self.prune_network_options(), 'kept_kernels': sum(kept.values()),
                'total_kernels': sum(total.values()), 'keep_ratio': sum(kept.values()) / sum(total.values()),
                'layer_keep_ratios': {n: kept[n] / total[n] for n in self.masked},
                'nonzero_params': ratios.pruned.params, 'nonzero_macs': ratios.pruned.macs,
                'dense_params': ratios.original.params, 'dense_macs': ratios.original.macs,
                'reference_params': reference.params, 'reference_macs': reference.macs,
                'macs_input_size': list(self.config.macs_input_size),
                'grouped_export': self.config.mask == 'grouped' and self.config.grouped_export}

    def training_state(self, epoch, current_iter):
        """Adds ``kernel`` (the export's description), kept after the switch for ``pruning.json``."""
        state = super().training_state(epoch, current_iter)
        state['kernel'] = copy.deepcopy(self.kernel_info)
        return state

    def resume_training(self, resume_state):
        if resume_state.get('kernel'):
            self.kernel_info = copy.deepcopy(resume_state['kernel'])
        super().resume_training(resume_state)

    def export_info(self):
        return {'kernel': getattr(self, 'kernel_info', None)}


@torch.no_grad()
def to_grouped(compact, network_opt, masks, groups):
    """Turn the block-diagonal convs of ``compact`` into real grouped convs.

    Args:
        compact (nn.Module): the dense arch with block-diagonal (masked) weights.
        network_opt (dict): its ``network_g`` options.
        masks (dict): its weight masks (conv name -> bool (c_out, c_in, kh, kw)).
        groups (dict): conv name -> G of each block-diagonal conv.

    Returns:
        tuple: (``CompactArch`` network with ``conv_groups``, its ``network_g``, the masks of the other convs).

    Raises:
        ValueError: a conv that is not block diagonal with its G groups.
    """
    state = plain_state_dict(compact)
    for name, g in groups.items():
        state[f'{name}.weight'] = block_diagonal_to_grouped(state[f'{name}.weight'], g, name)
    grouped_opt = {'type': 'CompactArch', 'arch': dict(network_opt), 'conv_channels': {}, 'conv_groups': dict(groups)}
    like = next(compact.parameters())
    net = build_network(copy.deepcopy(grouped_opt)).to(device=like.device, dtype=like.dtype)
    net.load_state_dict({k: v.to(like.device) for k, v in state.items()}, strict=True)
    return net, grouped_opt, {k: v for k, v in masks.items() if k not in groups}
