"""Models from the ecosystem in: archs that spandrel (https://github.com/chaiNNer-org/spandrel, the model
loader of chaiNNer, ComfyUI and others) recognises, as BasicSR archs fmpsr can prune and export.

A model file (``.pth`` / ``.ckpt`` / ``.pt`` / ``.safetensors``) is read safely by
:func:`load_spandrel_model` (never spandrel's own file reader, which opens ``.pt`` files with
``torch.jit.load``): ``.safetensors`` with safetensors, the others with ``torch.load(weights_only=True)``,
so a pickle that needs code to load is refused in one line, as a TorchScript archive is; files over
:data:`MAX_FILE_BYTES` are refused before they are read. spandrel then detects the arch and its
hyperparameters from the state dict alone, and the result is

* ``network_g``: plain options of one of the archs registered here (``SpandrelCompact``,
  ``SpandrelESRGAN``, ``SpandrelSPAN``: spandrel's own classes, registered in BasicSR's
  ``ARCH_REGISTRY`` and allow-listed for files with bounded arguments by
  :func:`fmpsr.pruning.untrusted.register_trusted_arch`), never the file's path; and
* the weights in that arch's own parameter names.

``python -m fmpsr.archs.spandrel_arch model.pth -o pretrained.pth`` writes them as a BasicSR checkpoint
(``{'params': ...}``, atomically) and prints the ``network_g`` to put in the option file beside
``path.pretrain_network_g: pretrained.pth``. The pretrained methods (L1-norm, SRP, ASSL, ...) and
fine-tuning start from these weights; FMP / DHP start from the arch. An export stores only the arch
and its arguments. Without spandrel installed nothing is registered.
"""
import argparse
import json
import os
import sys

import torch

MAX_FILE_BYTES = 2 * 2 ** 30  # a model file larger than this is refused before it is read (2 GiB)
EXTENSIONS = ('.pth', '.ckpt', '.pt', '.safetensors')

try:
    from spandrel import ModelLoader  # noqa: F401
    from spandrel.architectures.Compact import Compact as _Compact
    from spandrel.architectures.ESRGAN import ESRGAN as _ESRGAN
    from spandrel.architectures.SPAN import SPAN as _SPAN
except ImportError:  # pragma: no cover - spandrel is optional
    _Compact = _ESRGAN = _SPAN = None

# spandrel architecture id -> the BasicSR arch name registered here
ARCH_NAMES = {'Compact': 'SpandrelCompact', 'ESRGAN': 'SpandrelESRGAN', 'SPAN': 'SpandrelSPAN'}

if _Compact is not None:
    from basicsr.utils.registry import ARCH_REGISTRY

    from fmpsr.pruning.untrusted import (DEPTH, IMAGE, RANGE, RGB, SCALE, WIDTH, Bool, Choice, Int, Optional,
                                         register_trusted_arch)

    class SpandrelCompact(_Compact):
        """spandrel's ``SRVGGNetCompact`` (Real-ESRGAN Compact): (N, C, H, W) -> (N, C', s*H, s*W)."""

    class SpandrelESRGAN(_ESRGAN):
        """spandrel's ``RRDBNet`` (ESRGAN, Real-ESRGAN, BSRGAN, ... in the old and new key layouts):
        (N, C, H, W) -> (N, C', s*H, s*W)."""

    class SpandrelSPAN(_SPAN):
        """spandrel's ``SPAN`` (NTIRE 2024 efficient-SR winner; its ``Conv3XC`` are re-parameterised):
        (N, C, H, W) -> (N, C', s*H, s*W)."""

    for _cls in (SpandrelCompact, SpandrelESRGAN, SpandrelSPAN):
        if _cls.__name__ not in ARCH_REGISTRY:
            ARCH_REGISTRY.register(_cls)

    register_trusted_arch('SpandrelCompact', dict(num_in_ch=IMAGE, num_out_ch=IMAGE, num_feat=WIDTH, num_conv=DEPTH,
                                                  upscale=SCALE, act_type=Choice('relu', 'prelu', 'leakyrelu')))
    register_trusted_arch('SpandrelESRGAN', dict(
        in_nc=IMAGE, out_nc=IMAGE, num_filters=WIDTH, num_blocks=DEPTH, scale=SCALE, plus=Bool,
        shuffle_factor=Optional(Int(1, 16)), norm=Optional(Choice('batch', 'instance')),
        act=Choice('relu', 'leakyrelu', 'prelu'), upsampler=Choice('upconv', 'pixelshuffle', 'pixel_shuffle'),
        mode=Choice('CNA', 'NAC', 'CNAC')))
    register_trusted_arch('SpandrelSPAN', dict(num_in_ch=IMAGE, num_out_ch=IMAGE, feature_channels=WIDTH,
                                               upscale=SCALE, bias=Bool, norm=Bool, img_range=RANGE, rgb_mean=RGB))


class SpandrelModelError(ValueError):
    """A model file fmpsr cannot take through spandrel; the message names the file and why."""


def _plain(value):
    """JSON-friendly copy of a hyperparameter (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_spandrel_model(path, max_bytes=MAX_FILE_BYTES):
    """Read a model file that spandrel recognises, safely, as fmpsr ``network_g`` options and weights.

    Args:
        path (str): ``.pth`` / ``.ckpt`` / ``.pt`` (a pickle of tensors only) or ``.safetensors``.
        max_bytes (int): larger files are refused before they are read.

    Returns:
        tuple: (``network_g`` dict: ``{'type': 'SpandrelESRGAN', ...}`` with plain bounded arguments and no
        path, checked by :func:`fmpsr.pruning.untrusted.check_network_opt`; state dict of float tensors in
        that arch's parameter names; ``info`` dict with spandrel's ``architecture``, ``scale``,
        ``input_channels``, ``output_channels``).

    Raises:
        ImportError: spandrel is not installed (``pip install spandrel``).
        FileNotFoundError: ``path`` does not exist.
        SpandrelModelError (a ValueError): an unknown extension, a file over ``max_bytes``, a pickle that
            needs code (or a TorchScript archive), a state dict spandrel does not recognise, or an arch
            fmpsr does not register (one line naming ``path``).
        fmpsr.compat.CorruptCheckpointError: a truncated or corrupt file.
    """
    if _Compact is None:
        raise ImportError('spandrel is not installed; pip install spandrel')
    from spandrel import ModelLoader, UnsupportedModelError, canonicalize_state_dict

    from fmpsr.compat import safe_torch_load
    from fmpsr.pruning.export import load_state
    from fmpsr.pruning.untrusted import check_network_opt

    if not os.path.isfile(path):
        raise FileNotFoundError(f'spandrel model file: no such file {path!r}')
    extension = os.path.splitext(path)[1].lower()
    if extension not in EXTENSIONS:
        raise SpandrelModelError(f'{path!r}: unsupported model file extension {extension!r} (use one of '
                                 f'{", ".join(EXTENSIONS)})')
    size = os.path.getsize(path)
    if size > max_bytes:
        raise SpandrelModelError(f'{path!r}: {size:,} bytes, above the limit of {max_bytes:,} for a model file')
    if extension == '.safetensors':
        state = load_state(path)
    else:
        try:
            state = safe_torch_load(path, map_location='cpu', what='spandrel model file')
        except Exception as error:  # noqa: BLE001  (refused pickles, TorchScript archives, corrupt files)
            raise SpandrelModelError(f'{path!r}: not read as a state dict of tensors '
                                     f'({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""})'
                                     ) from None
    if not isinstance(state, dict):
        raise SpandrelModelError(f'{path!r}: holds a {type(state).__name__}, not a state dict')
    state = canonicalize_state_dict(state)
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise SpandrelModelError(f'{path!r}: not a state dict of named tensors')
    try:
        descriptor = ModelLoader('cpu').load_from_state_dict(state)
    except UnsupportedModelError:
        raise SpandrelModelError(f'{path!r}: spandrel does not recognise the arch of this state dict') from None
    except Exception as error:  # noqa: BLE001  (spandrel's detection of a malformed state dict)
        raise SpandrelModelError(f'{path!r}: spandrel could not load it ({type(error).__name__}: '
                                 f'{(str(error).splitlines() or [""])[0][:200]})') from None
    arch_id = descriptor.architecture.id
    if arch_id not in ARCH_NAMES:
        raise SpandrelModelError(f'{path!r}: a {arch_id} model; fmpsr takes {", ".join(sorted(ARCH_NAMES))} '
                                 'from spandrel')
    network_opt = {'type': ARCH_NAMES[arch_id]}
    network_opt.update({k: _plain(v) for k, v in descriptor.model.hyperparameters.items()})
    network_opt = check_network_opt(network_opt, path, 'network_g')
    weights = {k: v.detach().float().clone() for k, v in descriptor.model.state_dict().items()}
    info = {'architecture': arch_id, 'scale': descriptor.scale, 'input_channels': descriptor.input_channels,
            'output_channels': descriptor.output_channels}
    return network_opt, weights, info


def main(argv=None):
    """``python -m fmpsr.archs.spandrel_arch MODEL -o pretrained.pth``: write a BasicSR checkpoint and print
    a JSON line with ``network_g`` (to paste into the option file), ``architecture`` and ``scale``.

    Raises:
        ValueError, OSError: see :func:`load_spandrel_model` (one line through :func:`fmpsr.cli.run_cli`).
    """
    from fmpsr.pruning.export import atomic_write

    parser = argparse.ArgumentParser(prog='spandrel_arch', description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='a model file spandrel recognises (.pth, .ckpt, .pt, .safetensors)')
    parser.add_argument('-o', '--output', required=True, help='BasicSR checkpoint to write ({"params": ...})')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f'{args.output!r} exists; use --overwrite to replace it')
    network_opt, weights, info = load_spandrel_model(args.model)
    atomic_write(args.output, lambda tmp: torch.save({'params': weights}, tmp))
    print(json.dumps({'network_g': network_opt, 'pretrain_network_g': args.output, **info}))
    return 0


if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='spandrel_arch', use_return_code=True)
    sys.exit(0)
