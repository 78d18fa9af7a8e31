"""Write (and optionally run) the scratch baselines of a pruning run (see fmpsr/baselines.py).

    python scripts/scratch_baseline.py --export experiments/<name>/export [--opt <run option file>]
        [--kind exact params macs] [--out options/scratch] [--tolerance 0.02] [--run] [--force]

Writes ``<out>/<name>_scratch_<kind>.yml`` for each kind; with ``--run`` trains each with
``fmpsr/train.py`` in turn. Prints one JSON line per kind: the file and what was matched. An option
file that already exists is not replaced (nothing is written, and the file is named) unless ``--force``;
every file is checked before the first is written.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), osp.pardir)))

import yaml  # noqa: E402

from fmpsr.baselines import KINDS, scratch_options  # noqa: E402
from fmpsr.pruning.export import atomic_write  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--export', required=True, help='export folder of a pruning run (holds pruning.json)')
    parser.add_argument('--opt', default=None, help="the run's option file (default: the one beside the export)")
    parser.add_argument('--kind', nargs='+', default=list(KINDS), choices=KINDS)
    parser.add_argument('--out', default='options/scratch', help='folder for the option files')
    parser.add_argument('--tolerance', type=float, default=0.02, help='relative tolerance of params / MACs')
    parser.add_argument('--run', action='store_true', help='train each baseline with fmpsr/train.py')
    parser.add_argument('--force', action='store_true', help='replace option files that already exist')
    args = parser.parse_args(argv)
    options = [scratch_options(args.export, args.opt, kind, args.tolerance) for kind in args.kind]
    paths = [osp.join(args.out, f"{opt['name']}.yml") for opt in options]
    existing = [p for p in paths if osp.exists(p)]
    if existing and not args.force:
        raise ValueError(f'option file {existing[0]!r} already exists ({len(existing)} of {len(paths)}); '
                         'nothing was written: remove it, choose another --out, or pass --force to replace it')
    written = []
    for opt, path in zip(options, paths):
        os.makedirs(args.out, exist_ok=True)

        def write(tmp, opt=opt):
            with open(tmp, 'w') as f:
                yaml.safe_dump(opt, f, sort_keys=False)
        atomic_write(path, write)
        print(json.dumps({'option_file': path, **opt['scratch_baseline']}))
        written.append(path)
    if args.run:
        root = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
        for path in written:
            subprocess.run([sys.executable, osp.join(root, 'fmpsr', 'train.py'), '-opt', path], check=True)
    return written


if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='scratch_baseline.py')
