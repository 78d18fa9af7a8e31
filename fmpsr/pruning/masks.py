"""Weight masks that keep pruned weights at exactly zero while a compact network trains.

The masks are held by one mechanism, ``torch.nn.utils.parametrize``: ``conv.weight`` becomes
``original * mask``, so a pruned weight is zero in every forward pass and gets no gradient.
:func:`plain_state_dict` gives the ordinary ``name.weight`` keys back for saving.

Frozen weights (``requires_grad=False``) are never masked: a mask that would zero one of their
entries is refused (:func:`check_not_frozen`); an all-True mask leaves them as they are.
"""
import torch
from torch import nn
from torch.nn.utils import parametrize


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` (mask: bool, same shape as the weight)."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer('mask', mask.bool())

    def forward(self, weight):
        return weight * self.mask


def check_not_frozen(module, name, mask):
    """Refuse a weight mask that would change a frozen weight.

    Args:
        module (nn.Module): the conv holding ``weight`` (parametrized or not).
        name (str): its name, for the message.
        mask (Tensor): bool, the weight's shape.

    Raises:
        ValueError: the weight has ``requires_grad=False`` and ``mask`` has a False entry.
    """
    weight = (module.parametrizations['weight'].original if parametrize.is_parametrized(module, 'weight')
              else getattr(module, 'weight', None))
    if isinstance(weight, torch.Tensor) and not weight.requires_grad and not bool(mask.bool().all()):
        raise ValueError(f'weight mask for {name!r}: its weight is frozen (requires_grad=False) and is left '
                         'as it is; leave it out of the masked layers (pruning.exclude)')


def apply_weight_masks(net, masks):
    """Register a :class:`WeightMask` on ``weight`` of each named conv.

    Args:
        net (nn.Module): the compact network.
        masks (dict): conv module name -> bool tensor of the conv weight's shape (c_out, c_in, kh, kw).

    Raises:
        KeyError: a name that is not a module of ``net``.
        ValueError: a mask whose shape differs from the weight's (both shapes in the message), or one
            that zeroes a frozen weight (:func:`check_not_frozen`).
    """
    for name, mask in masks.items():
        try:
            module = net.get_submodule(name)
        except AttributeError as error:
            raise KeyError(f'weight mask for {name!r}: the network has no such module') from error
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f'weight mask for {name!r} has shape {tuple(mask.shape)}, '
                             f'the weight has {tuple(module.weight.shape)}')
        check_not_frozen(module, name, mask)
        if parametrize.is_parametrized(module, 'weight'):
            parametrize.remove_parametrizations(module, 'weight', leave_parametrized=True)
        with torch.no_grad():
            module.weight.mul_(mask.to(module.weight.device))
        parametrize.register_parametrization(module, 'weight', WeightMask(mask.to(module.weight.device)))


def get_weight_masks(net):
    """Dict conv name -> bool mask of every conv carrying a :class:`WeightMask`."""
    masks = {}
    for name, module in net.named_modules():
        if parametrize.is_parametrized(module, 'weight'):
            for p in module.parametrizations['weight']:
                if isinstance(p, WeightMask):
                    masks[name] = p.mask.detach().clone()
    return masks


def update_weight_masks(net, masks):
    """Set the weight masks of ``net`` in place, keeping its parameters (an optimiser built over
    them stays valid): a conv that already carries a :class:`WeightMask` gets its mask copied in, any
    other conv gets one registered (``register_parametrization`` keeps the same Parameter object as
    ``original``). The masked-out weights are set to zero in the stored parameter too.

    Args:
        net (nn.Module): the network (not a DDP wrapper).
        masks (dict): conv module name -> bool tensor of the weight's shape (c_out, c_in, kh, kw).

    Raises:
        KeyError, ValueError: as :func:`apply_weight_masks`.
    """
    for name, mask in masks.items():
        try:
            module = net.get_submodule(name)
        except AttributeError as error:
            raise KeyError(f'weight mask for {name!r}: the network has no such module') from error
        existing = [p for p in (module.parametrizations['weight'] if parametrize.is_parametrized(module, 'weight')
                                else []) if isinstance(p, WeightMask)]
        if not existing:
            apply_weight_masks(net, {name: mask})
            continue
        holder = existing[0]
        if tuple(mask.shape) != tuple(holder.mask.shape):
            raise ValueError(f'weight mask for {name!r} has shape {tuple(mask.shape)}, '
                             f'the weight has {tuple(holder.mask.shape)}')
        check_not_frozen(module, name, mask)
        with torch.no_grad():
            holder.mask.copy_(mask.to(holder.mask.device).bool())
            module.parametrizations['weight'].original.mul_(holder.mask)


def plain_state_dict(net):
    """``net.state_dict()`` with parametrized weights (weight masks, weight normalisation) under
    plain ``name.weight`` keys holding the computed weight (CPU tensors)."""
    state = {}
    for key, value in net.state_dict().items():
        if '.parametrizations.' in key:
            prefix, _, rest = key.partition('.parametrizations.')
            tensor_name = rest.split('.')[0]
            if f'{prefix}.{tensor_name}' not in state:
                computed = getattr(net.get_submodule(prefix), tensor_name)
                state[f'{prefix}.{tensor_name}'] = computed.detach().cpu().clone()
            continue
        state[key] = value.detach().cpu().clone()
    return state
