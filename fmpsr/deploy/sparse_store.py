"""Store unstructured zeros compactly: a safetensors file whose size follows the nonzero weights.

Weight pruning (FMP's weight indicators, kernel sparsity) leaves many weights exactly zero inside the
kept channels. Dense CPU / GPU conv kernels run a zero like any other weight, so these zeros give no
speed-up (see README); they do make the file smaller when it stores only the nonzeros. Each
floating-point tensor is written in the smallest of three encodings:

* ``dense``: the tensor as it is (when few of its entries are zero);
* ``bitmask``: a bit per entry (``numpy.packbits`` of "is nonzero", row-major) + the nonzero values
  in order: ``numel / 8 + itemsize * nnz`` bytes;
* ``indices``: int32 flat positions of the nonzeros + their values: ``(4 + itemsize) * nnz`` bytes
  (smallest above ~97 % zeros).

The sign of each zero (``-0.0`` appears wherever a negative weight was multiplied by a zero mask) is
kept in one more bit per zero, only for tensors that have a ``-0.0``; NaN counts as a nonzero value,
so the round trip is bit-exact. Non-float tensors are stored dense. The encodings and shapes are in the
safetensors metadata under ``fmpsr_sparse``; other metadata (``network_g``) is kept.

``python -m fmpsr.deploy.sparse_store <export folder>`` writes ``net_g.sparse.safetensors`` next to
``net_g.safetensors``; :func:`load_sparse_compact` rebuilds the network from it.
"""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from fmpsr.pruning.export import (WEIGHTS_FILE, atomic_write, load_state, load_weights, network_options_from_metadata,
                                  read_metadata)
from fmpsr.pruning.untrusted import MAX_PARAMS

SPARSE_FILE = 'net_g.sparse.safetensors'
META_KEY = 'fmpsr_sparse'
FORMAT = 'fmpsr-sparse-1'


def encode(t):
    """Encode one tensor.

    Args:
        t (Tensor): any tensor (moved to CPU).

    Returns:
        tuple: (encoding name, {suffix: tensor} to store, info dict with ``shape``, ``dtype``).
    """
    t = t.detach().cpu().contiguous()
    info = {'shape': list(t.shape), 'dtype': str(t.dtype).replace('torch.', '')}
    if not t.is_floating_point() or t.numel() == 0:
        return 'dense', {'': t}, info
    flat = t.reshape(-1)
    keep = flat != 0  # NaN counts as nonzero and is stored as a value
    zero_signs = torch.signbit(flat[~keep])  # -0.0 (e.g. a negative weight times a 0 mask) vs +0.0
    nnz, numel, item = int(keep.sum()), flat.numel(), t.element_size()
    sign_bytes = (zero_signs.numel() + 7) // 8 if bool(zero_signs.any()) else 0
    sizes = {'dense': numel * item, 'bitmask': (numel + 7) // 8 + nnz * item + sign_bytes,
             'indices': nnz * (4 + item) + sign_bytes}
    if numel >= 2 ** 31:
        sizes.pop('indices')
    encoding = min(sizes, key=sizes.get)
    if encoding == 'dense':
        return 'dense', {'': t}, info
    parts = {'.__values': flat[keep].clone()}
    if encoding == 'bitmask':
        parts['.__mask'] = torch.from_numpy(np.packbits(keep.numpy()))
    else:
        parts['.__indices'] = keep.nonzero().reshape(-1).to(torch.int32)
    if sign_bytes:
        parts['.__zero_signs'] = torch.from_numpy(np.packbits(zero_signs.numpy()))
    return encoding, parts, info


FLOAT_DTYPES = ('float16', 'bfloat16', 'float32', 'float64')
ENCODINGS = ('dense', 'bitmask', 'indices')


def decode(encoding, parts, info):
    """Inverse of :func:`encode` (bit-exact).

    Raises:
        ValueError: an index entry or parts that do not describe a tensor (unknown encoding or dtype,
            a shape above :data:`fmpsr.pruning.untrusted.MAX_PARAMS` entries, a mask, index or value
            count that does not fit the shape): the file may come from anyone.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f'unknown sparse encoding {encoding!r}')
    if encoding == 'dense':
        if '' not in parts:
            raise ValueError('a dense entry without its tensor')
        return parts['']
    shape, dtype_name = info.get('shape'), info.get('dtype')
    if dtype_name not in FLOAT_DTYPES:
        raise ValueError(f'dtype {dtype_name!r} is not one of {FLOAT_DTYPES}')
    if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f'shape {shape!r} is not a list of sizes')
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if numel > MAX_PARAMS:
        raise ValueError(f'shape {shape} has {numel:,} entries, above the limit of {MAX_PARAMS:,}')
    dtype = getattr(torch, dtype_name)
    values = parts.get('.__values')
    if values is None or values.dtype != dtype or values.dim() != 1:
        raise ValueError(f'no 1-D {dtype_name} values stored')
    if encoding == 'bitmask':
        mask = parts.get('.__mask')
        if mask is None or mask.dtype != torch.uint8 or mask.numel() != (numel + 7) // 8:
            raise ValueError(f'the bit mask does not fit shape {shape}')
        keep = torch.from_numpy(np.unpackbits(mask.numpy(), count=numel).astype(bool))
    else:
        indices = parts.get('.__indices')
        if (indices is None or indices.dtype != torch.int32 or indices.dim() != 1
                or (indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel))):
            raise ValueError(f'the indices do not fit shape {shape}')
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[indices.long()] = True
    if int(keep.sum()) != values.numel():
        raise ValueError(f'{values.numel()} values stored for {int(keep.sum())} nonzero positions')
    out = torch.zeros(numel, dtype=dtype)
    out[keep] = values
    if '.__zero_signs' in parts:
        zeros = (~keep).nonzero().reshape(-1)
        signs = parts['.__zero_signs']
        if signs.dtype != torch.uint8 or signs.numel() != (zeros.numel() + 7) // 8:
            raise ValueError('the zero signs do not fit the zeros')
        negative = torch.from_numpy(np.unpackbits(signs.numpy(), count=zeros.numel()).astype(bool))
        out[zeros[negative]] = -0.0
    return out.reshape(shape)


def save_sparse(path, tensors, metadata=None):
    """Write ``tensors`` to ``path`` (safetensors) with their zeros stored compactly, atomically.

    Args:
        path (str): file to write.
        tensors (dict): name -> Tensor (a ``state_dict``); names must not contain ``.__``.
        metadata (dict | None): extra str -> str metadata (e.g. ``network_g``), kept as is.

    Returns:
        dict: name -> encoding used.

    Raises:
        ValueError: a name containing ``.__``, or ``metadata`` using the key ``fmpsr_sparse``.
    """
    metadata = dict(metadata or {})
    if META_KEY in metadata:
        raise ValueError(f'metadata key {META_KEY!r} is reserved for the sparse store')
    stored, index = {}, {}
    for name, tensor in tensors.items():
        if '.__' in name:
            raise ValueError(f'tensor name {name!r} contains ".__", which the sparse store uses for its parts')
        encoding, parts, info = encode(tensor)
        index[name] = dict(info, encoding=encoding)
        stored.update({name + suffix: part for suffix, part in parts.items()})
    metadata[META_KEY] = json.dumps(index)
    metadata['format'] = FORMAT
    atomic_write(path, lambda tmp: save_file(stored, tmp, metadata=metadata))
    return {name: info['encoding'] for name, info in index.items()}


def load_sparse(path):
    """Read a file written by :func:`save_sparse`.

    Returns:
        tuple: (state dict name -> Tensor, exactly as saved; metadata without ``fmpsr_sparse``).

    Raises:
        FileNotFoundError: no such file.
        fmpsr.compat.CorruptCheckpointError (a ValueError): not a readable safetensors file.
        ValueError: a safetensors file that is not a sparse store, or whose index does not describe its
            tensors (the file and tensor are named).
    """
    metadata = read_metadata(path)
    if META_KEY not in metadata:
        raise ValueError(f'{path!r} is not an fmpsr sparse store (no {META_KEY!r} metadata)')
    try:
        index = json.loads(metadata.pop(META_KEY))
    except ValueError as error:
        raise ValueError(f'{path!r}: its {META_KEY} metadata is not JSON ({error})') from error
    if not isinstance(index, dict) or not all(isinstance(v, dict) for v in index.values()):
        raise ValueError(f'{path!r}: its {META_KEY} metadata is not a mapping of tensor entries')
    stored = load_state(path)
    state = {}
    for name, info in index.items():
        parts = {key[len(name):]: value for key, value in stored.items()
                 if key == name or key.startswith(name + '.__')}
        try:
            state[name] = decode(info.get('encoding'), parts, info)
        except ValueError as error:
            raise ValueError(f'{path!r}: tensor {name!r}: {error}') from error
    return state, metadata


def write_sparse_export(export_dir, out_path=None):
    """Write the sparse form of an export folder's ``net_g.safetensors`` (same metadata).

    Args:
        export_dir (str): an export folder (see :mod:`fmpsr.pruning.export`).
        out_path (str | None): default ``<export_dir>/net_g.sparse.safetensors``.

    Returns:
        str: the path written.
    """
    weights = os.path.join(export_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'no exported weights at {weights!r}')
    metadata = read_metadata(weights)
    out_path = out_path or os.path.join(export_dir, SPARSE_FILE)
    save_sparse(out_path, load_state(weights), metadata)
    return out_path


def load_sparse_compact(path, device='cpu'):
    """Rebuild a compact network from its sparse store (like :func:`fmpsr.pruning.load_compact`).

    Args:
        path (str): an export folder holding ``net_g.sparse.safetensors``, or that file.

    Returns:
        tuple: (network in eval mode, ``network_g`` options).

    Raises:
        ValueError: the file carries no ``network_g`` metadata, or options fmpsr does not build from a
            file (:mod:`fmpsr.pruning.untrusted`), or weights that do not fit them; see also
            :func:`load_sparse`.
    """
    from basicsr.archs import build_network

    path = os.path.join(path, SPARSE_FILE) if os.path.isdir(path) else path
    network_opt = network_options_from_metadata(read_metadata(path), path)  # checked before any tensor is decoded
    if network_opt is None:
        raise ValueError(f'{path!r} has no network_g metadata')
    state, _ = load_sparse(path)
    net = build_network(dict(network_opt))
    load_weights(net, state, path)
    return net.to(device).eval(), network_opt


def main(argv=None):
    """Command line entry point (``python -m fmpsr.deploy.sparse_store <export folder>``); prints a JSON
    line with the path written and both sizes. An existing output is kept unless ``--overwrite``."""
    parser = argparse.ArgumentParser(prog='sparse_store',
                                     description='Write net_g.sparse.safetensors (zeros stored compactly) '
                                     'next to an export folder\'s net_g.safetensors.')
    parser.add_argument('export', help='export folder')
    parser.add_argument('-o', '--output', default=None, help=f'file to write (default <export>/{SPARSE_FILE})')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    args = parser.parse_args(argv)
    out_path = args.output or os.path.join(args.export, SPARSE_FILE)
    if os.path.exists(out_path) and not args.overwrite:
        parser.error(f'{out_path!r} exists; use --overwrite to replace it')
    path = write_sparse_export(args.export, out_path)
    sizes = {'dense_bytes': os.path.getsize(os.path.join(args.export, WEIGHTS_FILE)),
             'sparse_bytes': os.path.getsize(path)}
    print(json.dumps(dict(path=path, **sizes)))
    return 0


if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='sparse_store', use_return_code=True)
