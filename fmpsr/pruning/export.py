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
import re
import stat
import tempfile

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .masks import plain_state_dict
from .untrusted import MAX_OPTIONS_CHARS, NetworkOptionsError, check_network_opt

WEIGHTS_FILE = 'net_g.safetensors'
MASKS_FILE = 'weight_masks.safetensors'
OPTIONS_FILE = 'network_g.yml'


# messages of torch.save / safetensors when the disk is full or a size limit is hit (they are not OSError)
_WRITE_FAILURE = re.compile(r'PytorchStreamWriter|inline_container|unexpected pos|file write failed|I/O error|'
                            r'IoError|os error|No space left|File too large|Disk quota', re.IGNORECASE)


def _fsync_folder(folder):
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_write_failure(error):
    return isinstance(error, OSError) or bool(_WRITE_FAILURE.search(str(error)))


def atomic_write(path, write):
    """Call ``write(tmp_path)``, then move ``tmp_path`` to ``path`` durably.

    The temporary file (``.<name>.<random>.tmp`` in the same folder) is flushed to disk with
    ``fsync``, renamed over ``path`` (atomic on POSIX), and the folder is ``fsync``-ed, so neither a
    crash nor a power loss leaves a truncated or empty file where a good one was. The new file gets
    the permission bits of the file it replaces, or those a plain ``open()`` gives (0666 less the umask).

    Raises:
        OSError: writing failed (disk full, a size limit, an I/O error; also torch's ``RuntimeError``
            and safetensors' errors for these): one line naming ``path``. ``path`` is left as it
            was and the temporary file is removed.
        whatever else ``write`` raises, with the same clean-up.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    os.close(fd)
    try:
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data is on disk before the name points at it
            finally:
                os.close(fd)
            os.chmod(tmp, mode)  # mkstemp makes 0600
            os.replace(tmp, path)
        except Exception as error:  # noqa: BLE001 (only write failures are converted, the rest re-raised)
            if not _is_write_failure(error):
                raise
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise OSError(f'cannot write {path!r} ({reason}); the previous file, if any, is unchanged') from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        _fsync_folder(folder)  # the rename is on disk
    except OSError as error:
        raise OSError(f'wrote {path!r} but could not flush its folder to disk ({error})') from error


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


def _safetensors_error(path, error):
    from fmpsr.compat import CorruptCheckpointError

    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    hint = ''
    try:
        with open(path, 'rb') as f:
            if f.read(2) == b'PK':
                hint = ' It is a PyTorch checkpoint (.pth), not a safetensors file.'
    except OSError:
        pass
    return CorruptCheckpointError(f'{path!r} is not a readable safetensors file: it is truncated or corrupt '
                                  f'({reason}).{hint}')


def read_metadata(path):
    """The metadata (str -> str) of a safetensors file; reads only its header.

    Raises:
        FileNotFoundError: no such file.
        fmpsr.compat.CorruptCheckpointError (a ValueError): not a readable safetensors file (truncated,
            garbage, header too large); one line naming ``path``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no such file: {path!r}')
    try:
        with safe_open(path, framework='pt') as f:
            return dict(f.metadata() or {})
    except SafetensorError as error:
        raise _safetensors_error(path, error) from error


def read_network_options(weights_path):
    """The ``network_g`` options stored in a ``net_g.safetensors`` file's metadata, or None.

    The options are checked (:func:`fmpsr.pruning.untrusted.check_network_opt`): only archs fmpsr
    exports, with plain, bounded arguments.

    Raises:
        FileNotFoundError, fmpsr.compat.CorruptCheckpointError: see :func:`read_metadata`.
        fmpsr.pruning.untrusted.NetworkOptionsError (a ValueError): options fmpsr does not build from a
            file, or metadata that is not JSON; the file and key are named.
    """
    return network_options_from_metadata(read_metadata(weights_path), weights_path)


def network_options_from_metadata(metadata, path, key='network_g'):
    """Parse and check ``metadata[key]`` (JSON text), or None when absent. See :func:`read_network_options`."""
    if key not in metadata:
        return None
    text = metadata[key]
    if len(text) > MAX_OPTIONS_CHARS:
        raise NetworkOptionsError(f'{path!r}: {key} metadata is {len(text):,} characters long, above the limit '
                                  f'of {MAX_OPTIONS_CHARS:,}')
    try:
        options = json.loads(text)
    except ValueError as error:
        raise NetworkOptionsError(f'{path!r}: {key} metadata is not JSON ({error})') from error
    return check_network_opt(options, path, key)


def load_state(path):
    """Load a safetensors state dict (CPU tensors); never executes code from the file.

    Raises:
        FileNotFoundError: ``path`` does not exist (named in the message).
        fmpsr.compat.CorruptCheckpointError (a ValueError): not a readable safetensors file; one line
            naming ``path``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no such file: {path!r}')
    try:
        return load_file(path)
    except SafetensorError as error:
        raise _safetensors_error(path, error) from error


def _load_torch_checkpoint(path):
    """(state dict, network_g, masks) of an fmpsr ``.pth`` network checkpoint (``models/net_g_*.pth``)."""
    from fmpsr.compat import safe_torch_load

    raw = safe_torch_load(path, map_location='cpu', what='network checkpoint')
    compact = raw.get('fmp_compact') if isinstance(raw, dict) else None
    if not isinstance(compact, dict) or not compact.get('network_g'):
        raise ValueError(f'{path!r} is a PyTorch checkpoint without fmpsr\'s network_g (a BasicSR checkpoint holds '
                         'only weights): give an fmpsr export folder or its net_g.safetensors, or the '
                         'net_g_*.pth of an fmpsr run')
    state = raw.get('params')
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{path!r}: params is not a state dict of tensors')
    network_opt = check_network_opt(compact['network_g'], path, 'fmp_compact.network_g')
    masks = compact.get('weight_masks') or None
    return state, network_opt, masks


def load_compact(path, device='cpu'):
    """Rebuild an exported compact network.

    Args:
        path (str): an export folder or its ``net_g.safetensors``; or the ``.pth`` network checkpoint
            of an fmpsr run (``models/net_g_<iter>.pth``, loaded with ``weights_only=True``).
        device (str | torch.device): where to put the network.

    Returns:
        tuple: (network (eval mode, masks not registered), network_g options (dict),
        masks (dict | None)).

    Raises:
        FileNotFoundError: the weights file is missing.
        fmpsr.compat.CorruptCheckpointError (a ValueError): a truncated or corrupt file (named).
        fmpsr.pruning.untrusted.NetworkOptionsError (a ValueError): ``network_g`` options fmpsr does not
            build from a file (see :mod:`fmpsr.pruning.untrusted`).
        ValueError: no ``network_g`` metadata, or weights that do not fit the network.
    """
    from basicsr.archs import build_network

    weights = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'no exported weights at {weights!r}')
    if weights.endswith(('.pth', '.pt')):
        state, network_opt, masks = _load_torch_checkpoint(weights)
    else:
        network_opt = read_network_options(weights)
        if network_opt is None:
            raise ValueError(f'{weights!r} has no network_g metadata: it was not written by fmpsr export')
        state, masks = load_state(weights), None
        mask_path = os.path.join(os.path.dirname(weights), MASKS_FILE)
        if os.path.isfile(mask_path):
            masks = load_state(mask_path)
    net = build_network(dict(network_opt))
    load_weights(net, state, weights)
    return net.to(device).eval(), network_opt, masks


def load_weights(net, state, path):
    """``net.load_state_dict(state, strict=True)`` with a one-line ValueError naming ``path`` when the
    file's tensors do not fit the network (missing, unexpected or mis-shaped keys)."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = ' '.join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else '')
        raise ValueError(f'{path!r}: its weights do not fit its network_g ({detail[:300]})') from error
