"""Tiny exported networks for the deployment tests (inference, ONNX, sparse store, benchmark).

Each export is made the way a user's would be: ``basicsr.archs.build_network`` on compact
``network_g`` options, random weights with some weights set exactly to zero (unstructured pruning),
and :func:`fmpsr.pruning.save_compact` with the weight masks."""
import json
import os

import torch

import fmpsr  # noqa: F401  (registers LSRB, RLFN, IMDN, CompactArch)
from basicsr.archs import build_network
from fmpsr.pruning import save_compact

SCALE = 2

# a non-uniform compact LSRB (per-block inner widths and ESA widths differ), as finalize writes it
LSRB_COMPACT = {'type': 'LSRB', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 10, 'num_block': 2, 'upscale': SCALE,
                'esa_channels': 16, 'mid_feats': [5, 9], 'esa_feats': [[4, 3, 5], [6, 4, 2]]}
LSRB_DENSE = {'type': 'LSRB', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 2, 'upscale': SCALE,
              'esa_channels': 8}
EDSR_DENSE = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 2, 'upscale': SCALE}
# a CompactArch EDSR: the block-inner convs narrowed (the stream width stays, as auto grouping allows)
EDSR_COMPACT = {'type': 'CompactArch', 'arch': EDSR_DENSE,
                'conv_channels': {'body.0.conv1': [16, 7], 'body.0.conv2': [7, 16],
                                  'body.1.conv1': [16, 11], 'body.1.conv2': [11, 16]}}
RLFN_OPT = {'type': 'RLFN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 12, 'num_block': 2, 'mid_feat': 8,
            'esa_channels': 6, 'upscale': SCALE}
IMDN_OPT = {'type': 'IMDN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 2, 'upscale': SCALE}


def make_export(out_dir, network_opt, zero_fraction=0.3, seed=0, dense_opt=None):
    """Build ``network_opt`` with random weights, zero ``zero_fraction`` of every conv weight at
    random, and export it to ``out_dir`` (with its masks). ``dense_opt`` is written to pruning.json
    as ``original_network_g``. Returns (network in eval mode, out_dir)."""
    torch.manual_seed(seed)
    net = build_network(dict(network_opt)).eval()
    masks = {}
    with torch.no_grad():
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                keep = torch.rand_like(module.weight) >= zero_fraction
                module.weight.mul_(keep)
                masks[name] = module.weight != 0
    save_compact(str(out_dir), net, network_opt, masks)
    if dense_opt is not None:
        with open(os.path.join(str(out_dir), 'pruning.json'), 'w') as f:
            json.dump({'network_g': network_opt, 'original_network_g': dense_opt}, f)
    return net, str(out_dir)
