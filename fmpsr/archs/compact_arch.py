"""``CompactArch``: any registered arch with narrower convs, the generic form of a pruned network.

An arch that exposes its widths as constructor options (LSRB) is rebuilt from those options after
pruning. Any other arch (BasicSR's EDSR, RCAN, MSRResNet, fmpsr's RLFN) is rebuilt from its own
options plus a width description: the arch is built as usual, then every conv named in
``conv_channels`` is replaced by an ``nn.Conv2d`` with the kept input and output channels and the
same kernel, stride, padding, dilation and bias (an ``nn.ConvTranspose2d`` by one of the same class with
the same ``output_padding`` too). The result is an instance of the original arch
class; its ``state_dict`` keys are the original ones, so the weights load from plain safetensors
and no pickled module is ever needed.

Per-channel parameters between convs (PReLU slopes, BatchNorm / InstanceNorm weight, bias and
running stats, a bare ``(1, C, 1, 1)`` scale) follow their channels: the optional ``channel_params``
(state-dict key -> kept channels) narrows each such tensor along its channel dimension and sets the
module's width attribute (``num_parameters``, ``num_features``). Exports written before it existed
have no ``channel_params`` and load as before.

Grouped convs: the optional ``conv_groups`` (conv name -> G) rebuilds each named conv (after its
``conv_channels`` narrowing, if any) as ``nn.Conv2d(..., groups=G)``, whose weight is
(c_out, c_in / G, kh, kw). A block-diagonal kernel mask is exported this way
(:func:`fmpsr.pruning.kernel_masks.block_diagonal_to_grouped`); exports without ``conv_groups`` load
as before.
"""
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from basicsr.utils.registry import ARCH_REGISTRY


@ARCH_REGISTRY.register()
def CompactArch(arch, conv_channels, channel_params=None,  # noqa: N802 (registered under the name option files use)
                conv_groups=None):
    """Build ``arch`` and narrow its convs (and the per-channel parameters between them).

    Args:
        arch (dict): ``network_g`` options of the dense arch (with ``type``).
        conv_channels (dict): conv module name -> ``[in_channels, out_channels]`` of the compact conv.
        channel_params (dict | None): state-dict key of a per-channel parameter or buffer -> kept
            channels (int), see :func:`narrow_channel_param`.
        conv_groups (dict | None): conv module name -> groups G of a grouped conv, see :func:`group_conv`.

    Returns:
        nn.Module: an instance of ``arch['type']``.

    Raises:
        ValueError: a name in ``conv_channels`` that is not an ``nn.Conv2d`` (or a ``groups=1``
            ``nn.ConvTranspose2d``) of the arch, a key in
            ``channel_params`` that is not a per-channel tensor of it, or a width below 1 or above
            the dense width (the name and value are given).
    """
    from basicsr.archs import build_network

    net = build_network(dict(arch))
    for name, channels in conv_channels.items():
        try:
            conv = net.get_submodule(name)
        except AttributeError:
            conv = None
        transposed = isinstance(conv, nn.ConvTranspose2d) and conv.groups == 1
        if not isinstance(conv, nn.Conv2d) and not transposed:
            raise ValueError(f'CompactArch: conv_channels names {name!r}, which is not a conv of {arch["type"]}')
        c_in, c_out = (int(c) for c in channels)
        if min(c_in, c_out) < 1:
            raise ValueError(f'CompactArch: conv_channels[{name!r}] = {list(channels)}; widths must be >= 1')
        if transposed:
            narrow = nn.ConvTranspose2d(c_in, c_out, conv.kernel_size, conv.stride, conv.padding, conv.output_padding,
                                        bias=conv.bias is not None, dilation=conv.dilation,
                                        padding_mode=conv.padding_mode)
        else:
            narrow = nn.Conv2d(c_in, c_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                               bias=conv.bias is not None, padding_mode=conv.padding_mode)
        parent, _, child = name.rpartition('.')
        setattr(net.get_submodule(parent) if parent else net, child, narrow)
    for key, width in (channel_params or {}).items():
        narrow_channel_param(net, key, width, arch['type'])
    for name, groups in (conv_groups or {}).items():
        group_conv(net, name, groups, arch['type'])
    return net


def group_conv(net, name, groups, arch_name='the arch'):
    """Replace the conv ``name`` of ``net`` by a conv with the same widths, kernel, stride, padding,
    dilation and bias and ``groups`` groups, in place.

    Raises:
        ValueError: ``name`` is not an ``nn.Conv2d`` of ``net``, or ``groups`` is not a positive integer
            dividing its input and output channels.
    """
    try:
        conv = net.get_submodule(name)
    except AttributeError:
        conv = None
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f'CompactArch: conv_groups names {name!r}, which is not a conv of {arch_name}')
    g = int(groups)
    if g < 1 or conv.in_channels % g or conv.out_channels % g:
        raise ValueError(f'CompactArch: conv_groups[{name!r}] = {groups} must divide c_in={conv.in_channels} '
                         f'and c_out={conv.out_channels}')
    grouped = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, groups=g, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    parent, _, child = name.rpartition('.')
    setattr(net.get_submodule(parent) if parent else net, child, grouped)


def narrow_channel_param(net, key, width, arch_name='the arch'):
    """Narrow the per-channel parameter or buffer ``key`` of ``net`` to ``width`` channels, in place.

    The tensor keeps its first ``width`` entries along its channel dimension (0 for 1-D tensors, else
    its only dimension longer than 1); finalize loads the kept values afterwards. PReLU's
    ``num_parameters`` and BatchNorm's / InstanceNorm's ``num_features`` are set to ``width``.

    Raises:
        ValueError: ``key`` is not a tensor of ``net``, is not per-channel, or ``width`` is outside
            [1, dense width].
    """
    from fmpsr.pruning.grouping import channel_dim

    module_name, _, attr = key.rpartition('.')
    try:
        module = net.get_submodule(module_name) if module_name else net
    except AttributeError:
        module = None
    tensor = getattr(module, attr, None) if module is not None else None
    dim = channel_dim(tensor.shape) if isinstance(tensor, torch.Tensor) else None
    if dim is None:
        raise ValueError(f'CompactArch: channel_params names {key!r}, which is not a per-channel parameter or '
                         f'buffer of {arch_name}')
    width = int(width)
    if not 1 <= width <= tensor.shape[dim]:
        raise ValueError(f'CompactArch: channel_params[{key!r}] = {width}; it must be in [1, {tensor.shape[dim]}]')
    narrow = tensor.detach().narrow(dim, 0, width).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, attr, nn.Parameter(narrow, requires_grad=tensor.requires_grad))
    else:
        setattr(module, attr, narrow)  # a registered buffer stays registered
    if isinstance(module, nn.PReLU):
        module.num_parameters = width
    elif isinstance(module, (_BatchNorm, _InstanceNorm)):
        module.num_features = width
