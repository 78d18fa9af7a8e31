"""Save and load compact (pruned) networks without pickled code (safetensors + YAML).

An export folder holds

* ``net_g.safetensors``: the plain ``state_dict`` (pruned weights exactly zero); its metadata carries
  the ``network_g`` options as JSON;
* ``weight_masks.safetensors``: conv name -> bool mask (True = kept weight);
* ``network_g.yml``: the ``network_g`` options that rebuild the network with BasicSR's
  ``build_network`` once ``fmpsr`` is imported.

Every file is written to a temporary name and renamed into place, so a crash never leaves a
truncated file where a good one was.
"""
import json
import os
import tempfile

import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .masks import plain_state_dict

WEIGHTS_FILE = 'net_g.safetensors'
MASKS_FILE = 'weight_masks.safetensors'
OPTIONS_FILE = 'network_g.yml'


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path`` (same folder, atomic on POSIX).

    Raises:
        whatever ``write`` raises; the temporary file is removed and ``path`` is left untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_write`)."""
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def save_compact(out_dir, net, network_opt, masks=None):
    """Export a compact network (see the module docstring).

    Args:
        out_dir (str): folder to write (created if needed).
        net (nn.Module): the compact network (weight masks may be registered as parametrizations).
        network_opt (dict): its ``network_g`` options (``type`` and widths).
        masks (dict | None): conv name -> bool mask; None writes no mask file.

    Returns:
        dict: ``weights``, ``masks`` (or None) and ``options`` paths.
    """
    state = {k: v.contiguous() for k, v in plain_state_dict(net).items()}
    metadata = {'network_g': json.dumps(network_opt), 'format': 'fmpsr-compact-1'}
    paths = {'weights': os.path.join(out_dir, WEIGHTS_FILE), 'options': os.path.join(out_dir, OPTIONS_FILE),
             'masks': os.path.join(out_dir, MASKS_FILE) if masks is not None else None}
    atomic_write(paths['weights'], lambda p: save_file(state, p, metadata=metadata))
    if masks is not None:
        cpu_masks = {k: v.detach().bool().cpu().contiguous() for k, v in masks.items()}
        atomic_write(paths['masks'], lambda p: save_file(cpu_masks, p))

    def write_options(p):
        with open(p, 'w') as f:
            yaml.safe_dump(network_opt, f, sort_keys=False)
    atomic_write(paths['options'], write_options)
    return paths


def read_network_options(weights_path):
    """The ``network_g`` options stored in a ``net_g.safetensors`` file's metadata, or None."""
    with safe_open(weights_path, framework='pt') as f:
        metadata = f.metadata() or {}
    return json.loads(metadata['network_g']) if 'network_g' in metadata else None


def load_state(path):
    """Load a safetensors state dict (CPU tensors); never executes code from the file.

    Raises:
        FileNotFoundError: ``path`` does not exist (named in the message).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no such file: {path!r}')
    return load_file(path)


def load_compact(path, device='cpu'):
    """Rebuild an exported compact network.

    Args:
        path (str): an export folder or its ``net_g.safetensors``.
        device (str | torch.device): where to put the network.

    Returns:
        tuple: (network (eval mode, masks not registered), network_g options (dict),
        masks (dict | None)).

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: the weights file carries no ``network_g`` metadata.
    """
    from basicsr.archs import build_network

    weights = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'no exported weights at {weights!r}')
    network_opt = read_network_options(weights)
    if network_opt is None:
        raise ValueError(f'{weights!r} has no network_g metadata: it was not written by fmpsr export')
    net = build_network(dict(network_opt))
    net.load_state_dict(load_state(weights), strict=True)
    mask_path = os.path.join(os.path.dirname(weights), MASKS_FILE)
    masks = load_state(mask_path) if os.path.isfile(mask_path) else None
    return net.to(device).eval(), network_opt, masks
