"""Measure the latency table of ``pruning.metric: latency`` on this machine, for an option file's network.

Run it on the device the pruned network will be deployed on, then prune anywhere with
``pruning.latency.table: <the JSON>`` (the run copies it into its experiment folder). Without a table the
training run measures one itself on its own device (``pruning.latency.device``), which is what you want
when training and deployment share a machine.

The table holds, for every conv of ``network_g`` at ``pruning.macs_input_size``, the median time at a
grid of kept widths (see :mod:`fmpsr.pruning.latency`). The script also prints, as ONE JSON line on
stdout, how the table was measured, the dense and half-width networks' measured times and conv sums (the
two points of the table's time line, see :mod:`fmpsr.pruning.latency`) and, with ``--check W1,W2,...``, the measured time of
uniform-width variants of the network against the time the table predicts for them (``network_g`` must
have ``num_feat``), to show how far the table's kept fraction is from the measured one. A short
human-readable summary of the same goes to stderr. The script writes only the ``-o`` file.

Examples::

    python scripts/benchmark/latency_table.py -opt options/demo/fmp_lsrb_x4_demo.yml -o latency_cpu.json
    python scripts/benchmark/latency_table.py -opt options/demo/fmp_lsrb_x4_demo.yml -o t.json --step 16 \\
        --threads 2 --check 16,24,32
"""
import argparse
import copy
import json
import os.path as osp
import statistics
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir, osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import yaml  # noqa: E402

import fmpsr  # noqa: E402,F401  (registers the archs)
from basicsr.archs import build_network  # noqa: E402
from fmpsr.deploy.profiling import time_interleaved  # noqa: E402
from fmpsr.pruning import build_grouping, trace_conv_specs  # noqa: E402
from fmpsr.pruning.latency import half_width_network, measure_table, resolve_device  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-opt', required=True, help='option file (network_g, pruning.macs_input_size)')
    parser.add_argument('-o', '--output', required=True, help='where to write the table (JSON)')
    parser.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N (default cpu)')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch\'s current number)')
    parser.add_argument('--step', type=int, default=None,
                        help='grid step in channels (default: pruning.round_to when above 1, else 4)')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--check', default=None, help='comma-separated uniform widths to time against the table')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with open(args.opt) as f:
        opt = yaml.safe_load(f)
    if not isinstance(opt, dict) or not isinstance(opt.get('network_g'), dict):
        raise ValueError(f'{args.opt}: no network_g section')
    pruning = opt.get('pruning') or {}
    size = tuple(pruning.get('macs_input_size', (64, 64)))
    round_to = pruning.get('round_to', 1)
    step = args.step or (round_to if round_to > 1 else 4)
    device = resolve_device(args.device)
    network_opt = dict(opt['network_g'])
    in_ch = network_opt.get('num_in_ch', 3)
    net = build_network(copy.deepcopy(network_opt))
    specs = trace_conv_specs(net, size, in_ch)
    grouping = build_grouping(net, network_opt, pruning.get('grouping'), torch.zeros(1, in_ch, *size),
                              tuple(tuple(t) if isinstance(t, list) else t for t in pruning.get('tie_outputs', ())),
                              exclude=tuple(pruning.get('exclude', ())))
    narrow = half_width_network(net, grouping, step, build_network, network_opt)
    table = measure_table(net, specs, size, in_ch, device, args.threads, step, args.warmup, args.repeats, narrow=narrow)
    table.save(args.output)
    scale, offset = table.line
    result = {'output': args.output, 'option_file': args.opt, 'network_g': network_opt, **table.meta,
              'line': {'scale': scale, 'offset_s': offset}}
    result.pop('narrow_widths', None)
    if args.check:
        result['check'] = check_uniform(network_opt, specs, table, size, in_ch, device, args)
    print(report(result), file=sys.stderr, flush=True)
    print(json.dumps(result))
    return result


def _ms(seconds):
    return '-' if seconds is None else f'{seconds * 1e3:.2f}'


def report(result):
    """A few human-readable lines: where it was measured, the two networks of the time line, the check."""
    lines = [f"latency table -> {result['output']}: {result.get('device')} {result.get('device_name') or ''}, "
             f"{result.get('threads')} threads, input {result.get('input_size')}, step {result.get('step')}, "
             f"{result.get('repeats')} repeats",
             f"{'network':10}{'measured ms':>13}{'conv sum ms':>13}",
             f"{'dense':10}{_ms(result.get('network_s')):>13}{_ms(result.get('conv_sum_s')):>13}",
             f"{'half':10}{_ms(result.get('narrow_network_s')):>13}{_ms(result.get('narrow_conv_sum_s')):>13}",
             f"time = {result['line']['scale']:.3f} x conv sum + {result['line']['offset_s'] * 1e3:.2f} ms"]
    if 'check' in result:
        lines.append(f"{'num_feat':>8}{'measured':>10}{'predicted':>11}{'error':>8}  (fraction of dense "
                     f"{result['check']['dense_ms']:.2f} ms)")
        lines += [f"{w['num_feat']:>8}{w['measured_fraction']:>10.3f}{w['predicted_fraction']:>11.3f}"
                  f"{w['relative_error']:>+8.1%}" for w in result['check']['widths']]
    return '\n'.join(lines)


def check_uniform(network_opt, specs, table, size, in_ch, device, args):
    """Measured vs predicted time of uniform-width variants (``num_feat`` = W, every other width as built).

    The prediction is the table's kept fraction (:meth:`LatencyTable.total` over the dense total).
    """
    if 'num_feat' not in network_opt:
        raise ValueError('--check needs network_g.num_feat (a uniform-width arch)')
    dense_c = network_opt['num_feat']
    nets = {'dense': build_network(copy.deepcopy(network_opt))}
    kept = {}
    for w in [int(v) for v in args.check.split(',')]:
        opt_w = dict(network_opt, num_feat=w)
        nets[w] = build_network(copy.deepcopy(opt_w))
        small = trace_conv_specs(nets[w], size, in_ch)
        if set(small) != set(specs):
            raise ValueError(f'--check {w}: the network at num_feat {w} has other convs than at {dense_c}')
        kept[w] = ({n: s.in_channels for n, s in small.items()}, {n: s.out_channels for n, s in small.items()})
    old = torch.get_num_threads()
    if args.threads and torch.device(device).type == 'cpu':
        torch.set_num_threads(args.threads)
    try:
        x = torch.rand(1, in_ch, *size, device=device)
        fns = {}
        for key, net in nets.items():
            net = net.to(device).eval()
            fns[key] = (lambda net=net: net(x))
        with torch.no_grad():
            times = time_interleaved(fns, device, args.warmup, args.repeats)
    finally:
        torch.set_num_threads(old)
    dense_s = statistics.median(times['dense'])
    out = []
    for w, (k_in, k_out) in kept.items():
        predicted = table.total(specs, k_in, k_out) / table.total(specs)
        measured = statistics.median(times[w]) / dense_s
        out.append({'num_feat': w, 'measured_ms': statistics.median(times[w]) * 1e3, 'measured_fraction': measured,
                    'predicted_fraction': predicted, 'relative_error': predicted / measured - 1})
    return {'dense_ms': dense_s * 1e3, 'widths': out}


if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='latency_table.py')
