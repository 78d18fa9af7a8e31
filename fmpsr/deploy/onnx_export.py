"""Export a compact network to ONNX, for onnxruntime, chaiNNer, NCNN and other deployment tools.

``python scripts/export_onnx.py <export folder> -o model.onnx [--dtype fp16]`` (console script
``fmpsr-export-onnx``).

The graph has one input ``input`` (B, C, H, W) in [0, 1] and one output ``output`` (B, C, s*H, s*W),
with batch, height and width dynamic; opset 18 by default (>= 17 is required, so that the whole graph
uses one current opset). Both tensors, the weights and the arithmetic are in the chosen precision:

- ``fp32`` (default): float32.
- ``fp16``: float16 (input and output float16 too, as the community's fp16 ONNX files are); onnxruntime's
  CPU provider runs it.
- ``bf16`` is refused: ONNX ``Conv`` takes bfloat16 only from opset 22, and onnxruntime's CPU provider
  (1.32) has no bfloat16 ``Conv`` kernel (``NOT_IMPLEMENTED: Conv(22)``), so the file could not be checked.

By default the ``torch.export``-based exporter (``dynamo=True``, PyTorch's default since 2.9; it needs
``onnxscript``) is tried first; PixelShuffle becomes ONNX ``DepthToSpace`` (mode CRD) or an equivalent
reshape / transpose. ``--exporter torchscript`` tries the older TorchScript tracer (``dynamo=False``;
deprecated by PyTorch) first. When the exporter tried first raises or its graph fails the parity check,
a warning names it and its error, and the other one is tried (``--no-fallback`` turns this off); when
both fail, one error names both.

**Parity check** (on by default, ``--no-verify`` skips it): before the file is moved into place,
onnxruntime (CPU provider) runs it at LR sizes (batch, H, W) = (1, 17, 23), (2, 32, 32) and (1, 40, 57)
(each side at least the arch's minimum input) on uniform [0, 1] inputs, and compares with the float32
PyTorch network on the same (float32) inputs:

- fp32: ``|onnx - torch| <= 1e-5 + 1e-3 * |torch|`` elementwise.
- fp16: ``max |onnx - torch| <= 4e-3`` (output on the [0, 1] image scale; the input is rounded to
  float16 too, as a user's would be). Measured with onnxruntime 1.32 / torch 2.15, both exporters: at most
  7.6e-4 (uniform inputs) and 9.3e-4 (96 x 96 crops of the demo images) on five trained LSRB x4 exports
  (``experiments/cmp_*``), 3.7e-4 on the compact LSRB / CompactArch EDSR / RLFN / IMDN test networks,
  7.3e-4 on a small Compact and 2.9e-4 on a small ESRGAN (float16's spacing near 1 is 4.9e-4); the bound
  is about 4 times the largest. A network whose activations are large (a SPAN with ``img_range`` 255
  and random weights: 3.5e-2) fails it and is not written in fp16; export it in fp32.

A file that fails is not written. The network's ``network_g`` options, scale, precision and the
measured difference go to the ONNX metadata. Tested in ``tests/test_onnx.py``.
"""
import argparse
import copy
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
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16}
# precisions asked for by users that are refused, with the reason (one line)
REFUSED_DTYPES = {'bf16': 'onnxruntime\'s CPU provider has no bfloat16 Conv kernel (NOT_IMPLEMENTED for '
                          'Conv(22); ONNX Conv takes bfloat16 only from opset 22), so a bf16 file could not be '
                          'checked against PyTorch; use --dtype fp16 or fp32'}
# (batch, LR height, LR width) of the parity check; odd and non-square on purpose
VERIFY_SHAPES = ((1, 17, 23), (2, 32, 32), (1, 40, 57))
FP32_RTOL, FP32_ATOL = 1e-3, 1e-5
FP16_MAX_ABS_DIFF = 4e-3  # measured at most 9.3e-4 (see the module docstring)


class ParityError(ValueError):
    """onnxruntime's output differs from PyTorch's by more than the stated tolerance."""


def check_dtype(dtype):
    """The torch dtype of the precision name ``dtype`` (``fp32`` or ``fp16``).

    Raises:
        ValueError: ``bf16`` (one line naming why) or an unknown name.
    """
    if dtype in REFUSED_DTYPES:
        raise ValueError(f'--dtype {dtype} is refused: {REFUSED_DTYPES[dtype]}')
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {tuple(DTYPES)}, got {dtype!r}')
    return DTYPES[dtype]


def verify_onnx(net, path, dtype='fp32', min_size=1, shapes=VERIFY_SHAPES, seed=0, name=None):
    """Run the ONNX file ``path`` with onnxruntime (CPU provider) and compare with ``net`` (float32).

    Args:
        net (torch.nn.Module): the float32 PyTorch network, (B, C, H, W) -> (B, C, s*H, s*W).
        path (str): the ONNX file (input ``input``, output ``output``).
        dtype (str): ``fp32`` or ``fp16``, the precision of the file's input and output.
        min_size (int): smallest LR side (pixels) the network accepts; smaller sides in ``shapes``
            are raised to it.
        shapes (tuple): (batch, H, W) LR sizes to check.
        seed (int): seed of the uniform [0, 1] inputs.
        name (str | None): the file named in errors (default ``path``; the export passes the final
            path, not its temporary file).

    Returns:
        dict: ``max_abs_diff`` (float, on the [0, 1] scale, over all shapes) and ``shapes`` (checked).

    Raises:
        ParityError (a ValueError): onnxruntime cannot run a size (e.g. a dimension fixed by the
            exporter), or a shape or a difference beyond the tolerance (one line naming the size, the
            difference and the tolerance).
    """
    import numpy as np
    import onnxruntime as ort
    torch_dtype = check_dtype(dtype)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    in_channels = session.get_inputs()[0].shape[1]
    name = name or path
    generator = torch.Generator().manual_seed(seed)
    worst, checked = 0.0, []
    for batch, height, width in shapes:
        height, width = max(height, min_size), max(width, min_size)
        x = torch.rand(batch, in_channels, height, width, generator=generator)
        with torch.no_grad():
            expected = net(x).float().numpy()
        size = f'{batch}x{in_channels}x{height}x{width}'
        try:
            got = session.run(None, {'input': x.to(torch_dtype).numpy()})[0]
        except Exception as error:  # noqa: BLE001  (onnxruntime's own error types)
            raise ParityError(f'{name}: onnxruntime cannot run input {size} ({_first_line(error)})') from None
        if got.shape != expected.shape:
            raise ParityError(f'{name}: onnxruntime output shape {got.shape} != PyTorch {expected.shape} '
                              f'at input {size}')
        diff = np.abs(got.astype(np.float32) - expected)
        max_diff = float(diff.max())
        if not np.isfinite(max_diff):
            raise ParityError(f'{name}: onnxruntime output is not finite at input {size} ({dtype})')
        if dtype == 'fp32':
            excess = float((diff - FP32_ATOL - FP32_RTOL * np.abs(expected)).max())
            bad, tolerance = excess > 0, f'{FP32_ATOL:g} + {FP32_RTOL:g} * |torch|'
        else:
            bad, tolerance = max_diff > FP16_MAX_ABS_DIFF, f'{FP16_MAX_ABS_DIFF:g}'
        if bad:
            raise ParityError(f'{name}: onnxruntime differs from PyTorch by {max_diff:.3g} at input {size} '
                              f'({dtype}; tolerance {tolerance})')
        worst = max(worst, max_diff)
        checked.append((batch, height, width))
    return {'max_abs_diff': worst, 'shapes': checked}


def _first_line(error, limit=300):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return f'{type(error).__name__}: {text[:limit]}'


def export_onnx(model, out_path, opset=DEFAULT_OPSET, size=64, exporter='dynamo', check=True, dtype='fp32',
                verify=True, fallback=True):
    """Export the compact network at ``model`` to ONNX with dynamic batch, height and width.

    Args:
        model (str | tuple): export folder or its ``net_g.safetensors``; or ``(net, network_g)``
            (``net`` is converted to float32 in place, as before; it is not changed otherwise).
        out_path (str): the ``.onnx`` file to write (atomically; nothing is written when any check fails).
        opset (int): ONNX opset, >= 17.
        size (int): LR height = width (pixels) of the example input used to trace; any size works
            afterwards (at least 15 for the ESA archs LSRB / RLFN).
        exporter (str): the exporter tried first: ``dynamo`` (``torch.onnx.export(dynamo=True)``) or
            ``torchscript``.
        check (bool): run ``onnx.checker.check_model`` on the result.
        dtype (str): ``fp32`` or ``fp16`` (weights, input, output and arithmetic); ``bf16`` is refused.
        verify (bool): run the parity check against PyTorch (:func:`verify_onnx`) before writing.
        fallback (bool): when the first exporter fails (raises, or fails the parity check), warn naming
            it and try the other one.

    Returns:
        dict: ``path``, ``opset``, ``exporter`` (the one that wrote the file), ``failed`` ({exporter:
        one-line error} of an exporter that failed first, else {}), ``dtype``, ``scale``, ``min_size``
        (LR pixels), ``max_abs_diff`` (parity check on the [0, 1] scale; None without ``verify``).

    Raises:
        ValueError: opset < 17, an unknown exporter or dtype, ``bf16``, ``size`` below the arch's
            minimum input, or every exporter tried failed (one line naming each and its error).
        ImportError: ``onnx`` (or, for dynamo, ``onnxscript``; for the check, ``onnxruntime``) is not
            installed; install the extra ``pip install fmpsr[onnx]``.
    """
    if opset < MIN_OPSET:
        raise ValueError(f'opset {opset} is too old; use {MIN_OPSET} or newer')
    if exporter not in EXPORTERS:
        raise ValueError(f'exporter must be one of {EXPORTERS}, got {exporter!r}')
    torch_dtype = check_dtype(dtype)
    import onnx  # noqa: F401  (fail early with ImportError when the extra is missing)
    if verify:
        import onnxruntime  # noqa: F401
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
    export_net = net if torch_dtype == torch.float32 else copy.deepcopy(net).to(torch_dtype)
    example = example.to(torch_dtype)
    order = [exporter] + ([e for e in EXPORTERS if e != exporter] if fallback else [])
    failed, result = {}, {}

    def export_with(name, tmp):
        kwargs = dict(input_names=['input'], output_names=['output'], opset_version=opset)
        if name == 'dynamo':
            low = max(min_size, 2)  # torch.export specialises sizes 0 and 1
            dims = {0: torch.export.Dim('batch', min=1), 2: torch.export.Dim('height', min=low),
                    3: torch.export.Dim('width', min=low)}
            program = torch.onnx.export(export_net, (example,), dynamo=True, dynamic_shapes=(dims,),
                                        verbose=False, **kwargs)
            program.save(tmp)
        else:
            axes = {0: 'batch', 2: 'height', 3: 'width'}
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)
                torch.onnx.export(export_net, (example,), tmp, dynamo=False,
                                  dynamic_axes={'input': axes, 'output': axes}, **kwargs)
        parity = verify_onnx(net, tmp, dtype, min_size, name=out_path) if verify else {'max_abs_diff': None}
        _add_metadata(tmp, network_opt, scale, min_size, check,
                      {'dtype': dtype, 'exporter': name, 'max_abs_diff': str(parity['max_abs_diff'])})
        return parity['max_abs_diff']

    def write(tmp):
        for name in order:
            try:
                result['max_abs_diff'] = export_with(name, tmp)
                result['exporter'] = name
                return
            except Exception as error:  # noqa: BLE001  (any failure, a missing onnxscript too: try the other)
                failed[name] = _first_line(error)
                if name != order[-1]:
                    warnings.warn(f'ONNX exporter {name} failed ({failed[name]}); trying {order[-1]}')
        raise ValueError(f'{out_path}: ONNX export failed: '
                         + '; '.join(f'exporter {name}: {message}' for name, message in failed.items()))

    atomic_write(out_path, write)
    return {'path': out_path, 'opset': opset, 'exporter': result['exporter'], 'failed': failed, 'dtype': dtype,
            'scale': scale, 'min_size': min_size, 'max_abs_diff': result['max_abs_diff']}


def _add_metadata(path, network_opt, scale, min_size, check, extra=None):
    import onnx
    proto = onnx.load(path)
    entries = [('network_g', json.dumps(network_opt)), ('scale', str(scale)), ('min_input_size', str(min_size)),
               ('producer', 'fmpsr')] + sorted((extra or {}).items())
    for key, value in entries:
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
                        help='torch.onnx exporter tried first: dynamo (default) or the older torchscript tracer')
    parser.add_argument('--no-fallback', action='store_true',
                        help='do not try the other exporter when the first one fails')
    parser.add_argument('--dtype', choices=tuple(DTYPES) + tuple(REFUSED_DTYPES), default='fp32',
                        help='precision of weights, input and output: fp32 (default) or fp16 (bf16 is refused: '
                             'onnxruntime CPU cannot run it)')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip the parity check against PyTorch with onnxruntime')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f'{args.output!r} exists; use --overwrite to replace it')
    try:
        check_dtype(args.dtype)
        info = export_onnx(args.model, args.output, args.opset, args.size, args.exporter, dtype=args.dtype,
                           verify=not args.no_verify, fallback=not args.no_fallback)
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
