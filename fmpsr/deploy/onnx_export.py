"""Export a compact network to ONNX, for onnxruntime, chaiNNer, NCNN and other deployment tools.

``python scripts/export_onnx.py <export folder> -o model.onnx`` (console script ``fmpsr-export-onnx``).

The graph has one input ``input`` (B, C, H, W) float32 in [0, 1] and one output ``output``
(B, C, s*H, s*W), with batch, height and width dynamic; opset 18 by default (>= 17 is required,
so that the whole graph uses one current opset). By default the ``torch.export``-based exporter
(``dynamo=True``, PyTorch's default since 2.9; it needs ``onnxscript``) is used; PixelShuffle becomes
ONNX ``DepthToSpace`` (mode CRD) or an equivalent reshape / transpose. ``--exporter torchscript``
selects the older TorchScript tracer (``dynamo=False``; deprecated by PyTorch, kept as a fallback).
Both were checked against PyTorch with onnxruntime on LSRB, CompactArch EDSR, RLFN and IMDN
(``tests/test_onnx.py``). The network's ``network_g`` options and scale go to the ONNX metadata.
"""
import argparse
import json
import os
import sys
import warnings

import torch

from fmpsr.archs.limits import min_lr_size
from fmpsr.pruning.export import atomic_write, load_compact

EXPORTERS = ('dynamo', 'torchscript')
MIN_OPSET = 17
DEFAULT_OPSET = 18


def export_onnx(model, out_path, opset=DEFAULT_OPSET, size=64, exporter='dynamo', check=True):
    """Export the compact network at ``model`` to ONNX with dynamic batch, height and width.

    Args:
        model (str | tuple): export folder or its ``net_g.safetensors``; or ``(net, network_g)``.
        out_path (str): the ``.onnx`` file to write (atomically).
        opset (int): ONNX opset, >= 17.
        size (int): LR height = width (pixels) of the example input used to trace; any size works
            afterwards (at least 15 for the ESA archs LSRB / RLFN).
        exporter (str): ``dynamo`` (``torch.onnx.export(dynamo=True)``) or ``torchscript``.
        check (bool): run ``onnx.checker.check_model`` on the result.

    Returns:
        dict: ``path``, ``opset``, ``exporter``, ``scale``, ``min_size`` (LR pixels).

    Raises:
        ValueError: opset < 17, an unknown exporter, or ``size`` below the arch's minimum input.
        ImportError: ``onnx`` (or, for dynamo, ``onnxscript``) is not installed; install the extra
            ``pip install fmpsr[onnx]``.
    """
    if opset < MIN_OPSET:
        raise ValueError(f'opset {opset} is too old; use {MIN_OPSET} or newer')
    if exporter not in EXPORTERS:
        raise ValueError(f'exporter must be one of {EXPORTERS}, got {exporter!r}')
    import onnx  # noqa: F401  (fail early with ImportError when the extra is missing)
    if isinstance(model, tuple):
        net, network_opt = model
    else:
        net, network_opt, _ = load_compact(model, 'cpu')
    net = net.float().eval()
    min_size = min_lr_size(network_opt)
    if size < min_size:
        raise ValueError(f'size {size} is below the minimum LR input of this network ({min_size} pixels)')
    in_channels = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    example = torch.rand(1, in_channels, size, size)
    with torch.no_grad():
        scale = net(example).shape[-1] // size

    def write(tmp):
        kwargs = dict(input_names=['input'], output_names=['output'], opset_version=opset)
        if exporter == 'dynamo':
            low = max(min_size, 2)  # torch.export specialises sizes 0 and 1
            dims = {0: torch.export.Dim('batch', min=1), 2: torch.export.Dim('height', min=low),
                    3: torch.export.Dim('width', min=low)}
            program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=(dims,), verbose=False,
                                        **kwargs)
            program.save(tmp)
        else:
            axes = {0: 'batch', 2: 'height', 3: 'width'}
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)
                torch.onnx.export(net, (example,), tmp, dynamo=False, dynamic_axes={'input': axes, 'output': axes},
                                  **kwargs)
        _add_metadata(tmp, network_opt, scale, min_size, check)

    atomic_write(out_path, write)
    return {'path': out_path, 'opset': opset, 'exporter': exporter, 'scale': scale, 'min_size': min_size}


def _add_metadata(path, network_opt, scale, min_size, check):
    import onnx
    proto = onnx.load(path)
    for key, value in (('network_g', json.dumps(network_opt)), ('scale', str(scale)),
                       ('min_input_size', str(min_size)), ('producer', 'fmpsr')):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if check:
        onnx.checker.check_model(proto)
    onnx.save(proto, path)


def main(argv=None):
    """Command line entry point (``fmpsr-export-onnx``). Prints a JSON line with what was written.

    Raises:
        ValueError, OSError: a bad value or an unreadable / refused model file (``cli`` prints them in
            one line and exits with status 2).
    """
    parser = argparse.ArgumentParser(prog='fmpsr-export-onnx', description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='export folder or its net_g.safetensors')
    parser.add_argument('-o', '--output', required=True, help='ONNX file to write')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset (>= {MIN_OPSET}, default {DEFAULT_OPSET})')
    parser.add_argument('--size', type=int, default=64, help='LR size of the example input used to trace (default 64)')
    parser.add_argument('--exporter', choices=EXPORTERS, default='dynamo',
                        help='torch.onnx exporter: dynamo (default) or the older torchscript tracer')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f'{args.output!r} exists; use --overwrite to replace it')
    try:
        info = export_onnx(args.model, args.output, args.opset, args.size, args.exporter)
    except ImportError as err:
        parser.exit(2, f'{parser.prog}: error: {err}\n')
    print(json.dumps(info))
    return 0


if __name__ == '__main__':
    sys.exit(main())


def cli():
    """Console-script entry point (``fmpsr-export-onnx``): :func:`main` with one-line errors for bad input
    (:func:`fmpsr.cli.run_cli`)."""
    from fmpsr.cli import run_cli
    run_cli(main, prog='fmpsr-export-onnx', use_return_code=True)
