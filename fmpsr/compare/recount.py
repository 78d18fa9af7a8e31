"""Params and MACs recounted from exported files, independently of what the pruning code reported.

Params: ``numel`` of every conv weight and bias in ``net_g.safetensors`` (dense) and, for the kept
count, ``count_nonzero`` of the weights plus every bias (a pruned weight is exactly zero in the
export; biases are never pruned one by one). MACs: ``torch.utils.flop_counter.FlopCounterMode`` on the
rebuilt network at the LR input size (2 FLOPs per multiply-add, halved), per conv; the kept MACs of a
conv are its MACs times its nonzero fraction of weights (each weight is used at every output pixel).
"""
import torch
from torch import nn


def _conv_macs(net, input_size, in_channels):
    """Conv name -> MACs of one forward pass at ``input_size`` (FlopCounterMode, per module)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, in_channels, *input_size))
    flops = counter.get_flop_counts()
    root = type(net).__name__
    macs = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            ops = flops.get(f'{root}.{name}', {})
            macs[name] = sum(v for op, v in ops.items() if 'convolution' in str(op)) // 2
    return macs


def recount_network(net, state, input_size, in_channels=3):
    """Counts of ``net`` whose tensors are ``state`` (a state dict, e.g. loaded from safetensors).

    Args:
        net (nn.Module): the network (built from its ``network_g``); its convs name the tensors.
        state (dict): name -> tensor; ``<conv>.weight`` (c_out, c_in, kh, kw) and ``<conv>.bias``.
        input_size (tuple[int, int]): LR (H, W) in pixels.
        in_channels (int): image channels.

    Returns:
        dict: ``params_dense``, ``params_nonzero``, ``macs_dense``, ``macs_nonzero`` (ints) and
        ``widths`` (conv name -> [in, out] channels, in module order).
    """
    macs = _conv_macs(net, input_size, in_channels)
    out = {'params_dense': 0, 'params_nonzero': 0, 'macs_dense': 0, 'macs_nonzero': 0, 'widths': {}}
    for name, module in net.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        weight = state[f'{name}.weight']
        bias = state.get(f'{name}.bias')
        biases = bias.numel() if bias is not None else 0
        nonzero = int(torch.count_nonzero(weight))
        per_weight = macs[name] // weight.numel()
        out['params_dense'] += weight.numel() + biases
        out['params_nonzero'] += nonzero + biases
        out['macs_dense'] += macs[name]
        out['macs_nonzero'] += nonzero * per_weight
        out['widths'][name] = [module.in_channels, module.out_channels]
    return out


def in_channels_of(network_g):
    """Image channels of a ``network_g`` (``CompactArch`` keeps them in its ``arch``)."""
    return network_g.get('num_in_ch', (network_g.get('arch') or {}).get('num_in_ch', 3))


def recount_export(export_dir, input_size):
    """:func:`recount_network` of an fmpsr export folder (``net_g.safetensors`` and its metadata).

    Raises:
        FileNotFoundError: no ``net_g.safetensors`` in ``export_dir``.
    """
    import os

    from basicsr.archs import build_network
    from fmpsr.pruning.export import WEIGHTS_FILE, load_state, read_network_options

    path = os.path.join(export_dir, WEIGHTS_FILE)
    state = load_state(path)
    network_g = read_network_options(path)
    net = build_network(dict(network_g))
    net.load_state_dict(state, strict=True)
    return recount_network(net, state, input_size, in_channels_of(network_g))


def recount_dense(network_g, input_size):
    """Dense counts of the network ``network_g`` describes (weights as built; only ``*_dense`` matter)."""
    from basicsr.archs import build_network

    net = build_network(dict(network_g))
    return recount_network(net, net.state_dict(), input_size, in_channels_of(network_g))
