"""``CompactArch``: any registered arch with narrower convs, the generic form of a pruned network.

An arch that exposes its widths as constructor options (LSRB) is rebuilt from those options after
pruning. Any other arch (BasicSR's EDSR, RCAN, MSRResNet, fmpsr's RLFN) is rebuilt from its own
options plus a width description: the arch is built as usual, then every conv named in
``conv_channels`` is replaced by an ``nn.Conv2d`` with the kept input and output channels and the
same kernel, stride, padding, dilation and bias. The result is an instance of the original arch
class; its ``state_dict`` keys are the original ones, so the weights load from plain safetensors
and no pickled module is ever needed.
"""
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY


@ARCH_REGISTRY.register()
def CompactArch(arch, conv_channels):  # noqa: N802 (registered under the name option files use)
    """Build ``arch`` and narrow its convs.

    Args:
        arch (dict): ``network_g`` options of the dense arch (with ``type``).
        conv_channels (dict): conv module name -> ``[in_channels, out_channels]`` of the compact conv.

    Returns:
        nn.Module: an instance of ``arch['type']``.

    Raises:
        ValueError: a name in ``conv_channels`` that is not an ``nn.Conv2d`` of the arch, or a width
            below 1 (the name and value are given).
    """
    from basicsr.archs import build_network

    net = build_network(dict(arch))
    for name, channels in conv_channels.items():
        try:
            conv = net.get_submodule(name)
        except AttributeError:
            conv = None
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f'CompactArch: conv_channels names {name!r}, which is not a conv of {arch["type"]}')
        c_in, c_out = (int(c) for c in channels)
        if min(c_in, c_out) < 1:
            raise ValueError(f'CompactArch: conv_channels[{name!r}] = {list(channels)}; widths must be >= 1')
        narrow = nn.Conv2d(c_in, c_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                           bias=conv.bias is not None, padding_mode=conv.padding_mode)
        parent, _, child = name.rpartition('.')
        setattr(net.get_submodule(parent) if parent else net, child, narrow)
    return net
