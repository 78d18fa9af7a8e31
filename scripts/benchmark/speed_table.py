"""The README's dense-vs-compact table: ``compact_speed.py`` on several exports, one Markdown row each.

Every export is timed against the dense network it was pruned from, side by side in its own run (so each
row's speed-up is a ratio measured in one run), with ``compact_speed.py``'s defaults unless ``--quick``,
``--repeats``, ``--warmup`` or ``--threads`` are given (passed on) or other options follow ``--``. Prints the
Markdown table on stdout (each run's short summary goes to stderr) and writes every run's JSON to ``--json``
(one line each). A row measured with settings that cannot stand for a real image size (``--quick``, a small
``--lr-size``, few rounds: ``compact_speed.py``'s ``representative: false``) is marked ``*`` and the
reasons follow the table.

Example (the README's table)::

    python scripts/benchmark/speed_table.py experiments/demo_hand/export experiments/demo_round16/export \\
        experiments/demo_latency/export --json speed_table.jsonl
    python scripts/benchmark/speed_table.py <exports> --repeats 50 --threads 4 -- --lr-size 256 256 --no-onnx
"""
import argparse
import contextlib
import importlib.util
import json
import os
import os.path as osp
import sys

HERE = osp.dirname(osp.abspath(__file__))


def load_compact_speed():
    spec = importlib.util.spec_from_file_location('compact_speed', osp.join(HERE, 'compact_speed.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(name, result):
    """One Markdown row from a compact_speed result."""
    nets, r = result['networks'], result['ratios']
    dense, compact = nets['dense'], nets['compact']
    hd = 'macs_hd_out1280x720'
    onnx = (f"{compact['onnx_ms']['median']:.1f} / {dense['onnx_ms']['median']:.1f} ({r['onnx_speedup']:.2f}x)"
            if 'onnx_ms' in compact else '-')
    return (f"| {name} | {compact['eager_ms']['median']:.1f} / {dense['eager_ms']['median']:.1f} "
            f"({r['eager_speedup']:.2f}x) | {onnx} | {compact[hd]['macs'] / 1e9:.2f} / {dense[hd]['macs'] / 1e9:.2f} G "
            f"({r['macs_reduction']:.2f}x) | {r['eager_speedup_per_macs_reduction']:.2f} | "
            f"{compact['params'] / 1e3:.1f} K ({compact['params_nonzero'] / 1e3:.1f} K nonzero) | "
            f"{compact['file_bytes'] / 1024:.0f} / {dense['file_bytes'] / 1024:.0f} KiB |")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('exports', nargs='+', help='export folders')
    parser.add_argument('--json', help='also write every compact_speed JSON line here')
    parser.add_argument('--quick', action='store_true',
                        help="compact_speed.py's smoke-run settings (not representative)")
    parser.add_argument('--repeats', type=int, help='timed rounds per network (compact_speed.py default 20)')
    parser.add_argument('--warmup', type=int, help='untimed rounds (compact_speed.py default 5)')
    parser.add_argument('--threads', type=int, help='CPU threads (default: OMP_NUM_THREADS when set, else 2)')
    args = parser.parse_args(argv)
    passed = ['--quick'] if args.quick else []
    for key in ('repeats', 'warmup', 'threads'):
        if getattr(args, key) is not None:
            passed += [f'--{key}', str(getattr(args, key))]
    extra = passed + extra
    compact_speed = load_compact_speed()
    lines = ['| export | eager ms compact / dense (speed-up) | onnxruntime ms (speed-up) | MACs at 1280x720 out '
             '(reduction) | speed-up / MACs reduction | params | file size compact / dense |',
             '|---|---|---|---|---|---|---|']
    results, caveats = [], []
    for export in args.exports:
        with contextlib.redirect_stdout(sys.stderr):  # its own JSON line goes to --json, not into the table
            result = compact_speed.main([export] + extra)
        results.append(result)
        name = osp.basename(osp.dirname(osp.abspath(export))) if osp.basename(export.rstrip('/')) == 'export' else export
        if not result.get('representative', True):
            name += ' *'
            caveats.append(f"* {name[:-2]}: not representative: {'; '.join(result['not_representative_because'])}")
        lines.append(row(name, result))
    lines += [''] + caveats if caveats else []
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in results)
    table = '\n'.join(lines)
    print(table)
    return table


if __name__ == '__main__':
    sys.path.insert(0, osp.abspath(osp.join(HERE, osp.pardir, osp.pardir)))
    from fmpsr.cli import run_cli
    run_cli(main, prog='speed_table.py')
