"""Input-size limits of the archs, shared by training checks and deployment (inference, tiling).

ESA (enhanced spatial attention, in LSRB and RLFN) runs a 3x3 conv with stride 2 and no padding,
then a 7x7 max-pool with stride 3: its input needs at least 15 x 15 LR pixels.
"""
ESA_MIN_LR_SIZE = 15
ESA_ARCHS = ('LSRB', 'RLFN')


def arch_type(network_opt):
    """The arch class name of ``network_opt``, looking through ``CompactArch`` to the arch it narrows."""
    network_opt = network_opt or {}
    if network_opt.get('type') == 'CompactArch':
        return arch_type(network_opt.get('arch'))
    return network_opt.get('type')


def min_lr_size(network_opt):
    """Smallest LR input height / width (pixels) the network of ``network_opt`` accepts: 15 for the
    archs with ESA (LSRB, RLFN, also inside ``CompactArch``), 1 otherwise."""
    return ESA_MIN_LR_SIZE if arch_type(network_opt) in ESA_ARCHS else 1
