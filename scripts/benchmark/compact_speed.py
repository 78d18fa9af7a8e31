"""Is the compact (pruned) network faster? Dense original vs compact network: latency, memory, size.

For an export folder (``experiments/<name>/export``) the compact network is loaded with
:func:`fmpsr.pruning.load_compact` and the dense network it was pruned from is rebuilt (random
weights: dense kernels do not care about values) from, in this order: ``--dense`` (a YAML / JSON
file or inline JSON with ``network_g`` options), ``original_network_g`` in the export's
``pruning.json``, ``arch`` of a ``CompactArch`` export, the ``network_g`` of the experiment's option
file copied by BasicSR next to ``export/``. Then, on one input (``--lr-size``, default the LR size of
a 1280 x 720 output), both networks are timed in PyTorch eager mode and, when onnxruntime is
installed, as ONNX models: ``--warmup`` untimed rounds, then ``--repeats`` timed rounds alternating
dense / compact, ``--threads`` threads on CPU (default: ``OMP_NUM_THREADS`` when set, else 2), CUDA
events and synchronisation on GPU.
Also reported: peak memory of one forward pass, params and MACs (dense and nonzero) at the NTIRE
convention (256 x 256 LR input) and at a 1280 x 720 output, and file sizes (dense safetensors,
compact safetensors, sparse store of the compact weights, ONNX).

``--widths 16,24,28,32`` instead times uniform LSRB-N-C for each C on the same input (no export
needed) and reports which channel multiple the machine favours (throughput in MACs per second of
the widths that are multiples of 4, 8, 16, 32 against the others).

A speed measured on a small input (output under 640 x 360 pixels, a quarter of 1280 x 720) or with
few rounds (``--quick``, under 10 timed rounds) is dominated by fixed per-call costs and noise and says
little about the speed at a real image size: the JSON then says ``"representative": false`` with the
reasons (``not_representative_because``), and the summary says so beside the speed-up.

Output: ONE JSON line on stdout, and a short human-readable summary on stderr (logs go there too).
Nothing is written to disk. See ``scripts/benchmark/README.md``.

Examples::

    python scripts/benchmark/compact_speed.py experiments/fmp_lsrb_x4_demo/export
    python scripts/benchmark/compact_speed.py experiments/fmp_lsrb_x4_demo/export --device cuda --repeats 100
    python scripts/benchmark/compact_speed.py --widths 16,20,24,28,32,40,48,64 --num-block 4
    python scripts/benchmark/compact_speed.py <export> --quick          # smoke run (seconds)
"""
import argparse
import contextlib
import glob
import json
import os
import os.path as osp
import statistics
import sys
import tempfile

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir, osp.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import fmpsr  # noqa: E402,F401  (registers the archs)
from basicsr.archs import build_network  # noqa: E402
from fmpsr.archs.limits import min_lr_size  # noqa: E402
from fmpsr.deploy.profiling import (NTIRE_LR_SIZE, count_macs, count_params, forward_peak_memory,  # noqa: E402
                                    hd_lr_size, summary, time_interleaved)
from fmpsr.pruning import load_compact  # noqa: E402
from fmpsr.pruning.export import WEIGHTS_FILE  # noqa: E402
from fmpsr.pruning.masks import plain_state_dict  # noqa: E402

DEFAULTS = dict(warmup=5, repeats=20, threads=2)
QUICK = dict(warmup=1, repeats=3, lr_size=(24, 32))
MULTIPLES = (4, 8, 16, 32)
REPRESENTATIVE_OUT_PIXELS = 640 * 360  # a quarter of the 1280 x 720 output speed-ups are quoted at
REPRESENTATIVE_REPEATS = 10


def default_threads(environ=None):
    """CPU threads when ``--threads`` is not given: ``OMP_NUM_THREADS`` (a positive integer) if set,
    else ``DEFAULTS['threads']``. Returns ``(threads, where it came from)``.

    Raises:
        ValueError: ``OMP_NUM_THREADS`` is set to something other than a positive integer.
    """
    value = (os.environ if environ is None else environ).get('OMP_NUM_THREADS', '').strip()
    if not value:
        return DEFAULTS['threads'], 'default'
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f'OMP_NUM_THREADS={value!r} is not a positive integer; set it right or pass --threads')
    return int(value), 'OMP_NUM_THREADS'


def representativeness(args, lr_size, scale):
    """``(representative, reasons)``: whether the timing settings can stand for a real image size."""
    reasons = []
    if args.quick:
        reasons.append('--quick (a smoke run)')
    out_pixels = lr_size[0] * scale * lr_size[1] * scale
    if out_pixels < REPRESENTATIVE_OUT_PIXELS:
        reasons.append(f'output {lr_size[0] * scale}x{lr_size[1] * scale} pixels is under a quarter of 1280x720: '
                       'fixed per-call costs weigh more than at a real image size')
    if args.repeats < REPRESENTATIVE_REPEATS:
        reasons.append(f'{args.repeats} timed rounds (under {REPRESENTATIVE_REPEATS}): the median is noise')
    return not reasons, reasons


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('export', nargs='?', help='export folder (or its net_g.safetensors)')
    parser.add_argument('--dense', help='network_g of the dense original: YAML / JSON file or inline JSON')
    parser.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N (default cpu)')
    parser.add_argument('--threads', type=int, default=None,
                        help=f'CPU threads for torch and onnxruntime (default: OMP_NUM_THREADS when set, '
                        f'else {DEFAULTS["threads"]})')
    parser.add_argument('--warmup', type=int, help=f'untimed rounds (default {DEFAULTS["warmup"]})')
    parser.add_argument('--repeats', type=int, help=f'timed rounds (default {DEFAULTS["repeats"]})')
    parser.add_argument('--lr-size', type=int, nargs=2, metavar=('H', 'W'),
                        help='timed LR input size (default: the LR size of a 1280x720 output)')
    parser.add_argument('--batch', type=int, default=1, help='images per timed forward pass (default 1)')
    parser.add_argument('--no-onnx', action='store_true', help='skip onnxruntime even when it is installed')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--widths', help='comma-separated C: time uniform LSRB-N-C instead of an export')
    parser.add_argument('--num-block', type=int, default=4, help='N of the --widths sweep (default 4)')
    parser.add_argument('--scale', type=int, default=4, help='scale of the --widths sweep (default 4)')
    parser.add_argument('--quick', action='store_true', help=f'smoke-test settings {QUICK} (explicit options win)')
    args = parser.parse_args(argv)
    if (args.export is None) == (args.widths is None):
        parser.error('give an export folder, or --widths for the width sweep (not both)')
    defaults = dict(DEFAULTS, **(QUICK if args.quick else {}))
    for key in ('warmup', 'repeats', 'lr_size'):
        if getattr(args, key) is None:
            setattr(args, key, defaults.get(key))
    if args.threads is None:
        try:
            args.threads, args.threads_from = default_threads()
        except ValueError as error:
            parser.error(str(error))
    else:
        args.threads_from = '--threads'
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        parser.error('--threads, --repeats and --batch must be >= 1, --warmup >= 0')
    if args.widths is not None:
        try:
            args.widths = [int(c) for c in args.widths.split(',')]
        except ValueError:
            parser.error(f'--widths must be comma-separated integers, got {args.widths!r}')
    return args


# ---- the dense original ----
def read_options(text_or_path):
    """network_g options from a YAML / JSON file (a whole option file or just network_g) or inline JSON."""
    data = yaml.safe_load(open(text_or_path)) if osp.isfile(text_or_path) else json.loads(text_or_path)
    return data.get('network_g', data)


def dense_options(export_dir, network_opt, override=None):
    """The dense original's ``network_g`` and where it came from (see the module docstring).

    Raises:
        ValueError: none of the sources has it (the sources tried are named).
    """
    if override:
        return read_options(override), '--dense'
    info_path = osp.join(export_dir, 'pruning.json')
    if osp.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        for key in ('original_network_g', 'dense_network_g'):
            if info.get(key):
                return info[key], f'pruning.json:{key}'
    if network_opt.get('type') == 'CompactArch':
        return network_opt['arch'], 'network_g.arch (CompactArch)'
    for path in sorted(glob.glob(osp.join(osp.dirname(osp.abspath(export_dir)), '*.yml'))):
        with contextlib.suppress(Exception):
            candidate = read_options(path)
            if candidate.get('type') == network_opt.get('type'):
                return candidate, path
    raise ValueError(f'cannot tell which dense network {export_dir!r} was pruned from: no --dense, no '
                     'original_network_g in pruning.json, not a CompactArch, no option file next to the export')


# ---- measurements ----
def describe(net, in_channels, scale):
    """params and MACs (dense and nonzero) at the NTIRE and 1280x720-output sizes."""
    params, params_nonzero = count_params(net)
    out = {'params': params, 'params_nonzero': params_nonzero}
    for label, size in (('ntire_lr256', NTIRE_LR_SIZE), ('hd_out1280x720', hd_lr_size(scale))):
        out[f'macs_{label}'] = count_macs(net, size, in_channels)
    return out


def file_bytes(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return osp.getsize(path)


def onnx_sessions(nets, tmp, threads, device):
    """name -> (onnxruntime session, onnx file bytes), or {} with the reason when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}, 'onnxruntime not installed'
    from fmpsr.deploy.onnx_export import export_onnx
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    providers = ['CUDAExecutionProvider'] if torch.device(device).type == 'cuda' else []
    providers = [p for p in providers if p in ort.get_available_providers()] + ['CPUExecutionProvider']
    sessions = {}
    for name, (net, opt) in nets.items():
        path = osp.join(tmp, f'{name}.onnx')
        export_onnx((net, opt), path, size=max(min_lr_size(opt), 32))
        sessions[name] = (ort.InferenceSession(path, options, providers=providers), osp.getsize(path))
    return sessions, providers[0]


def benchmark_export(args):
    from fmpsr.deploy.sparse_store import save_sparse

    device = torch.device(args.device)
    compact, compact_opt, _ = load_compact(args.export, device)
    export_dir = args.export if osp.isdir(args.export) else osp.dirname(args.export)
    dense_opt, dense_source = dense_options(export_dir, compact_opt, args.dense)
    torch.manual_seed(0)
    dense = build_network(dict(dense_opt)).to(device).eval()
    in_channels = next(m for m in compact.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    min_size = min_lr_size(compact_opt)
    with torch.no_grad():
        scale = compact(torch.zeros(1, in_channels, max(min_size, 16), max(min_size, 16), device=device)).shape[-1] \
            // max(min_size, 16)
    lr_size = tuple(args.lr_size) if args.lr_size else hd_lr_size(scale)
    if min(lr_size) < min_size:
        raise ValueError(f'--lr-size {lr_size} is below the minimum LR input of this network ({min_size} pixels)')
    nets = {'dense': (dense, dense_opt), 'compact': (compact, compact_opt)}
    x = torch.rand(args.batch, in_channels, *lr_size, device=device)
    result = {'benchmark': 'compact_speed', 'export': args.export, 'dense_source': dense_source}
    result.update(environment(args, device))
    result['config'] = {'lr_size': list(lr_size), 'out_size': [lr_size[0] * scale, lr_size[1] * scale],
                        'batch': args.batch, 'scale': scale, 'warmup': args.warmup, 'repeats': args.repeats,
                        'quick': args.quick}
    result['representative'], result['not_representative_because'] = representativeness(args, lr_size, scale)
    stats = {name: dict(network_g=opt, **describe(net, in_channels, scale)) for name, (net, opt) in nets.items()}

    def forward(net):
        def run():
            with torch.inference_mode():
                net(x)
        return run

    weights = args.export if osp.isfile(args.export) else osp.join(export_dir, WEIGHTS_FILE)
    peaks, result['memory_method'] = ([None, None], 'skipped (--no-memory)') if args.no_memory else \
        forward_peak_memory([(dense_opt, None), (compact_opt, weights)], tuple(x.shape), device, args.threads)
    stats['dense']['peak_memory_bytes'], stats['compact']['peak_memory_bytes'] = peaks
    times = time_interleaved({name: forward(net) for name, (net, _) in nets.items()}, device, args.warmup, args.repeats)
    for name in nets:
        stats[name]['eager_ms'] = summary(times[name])
    with tempfile.TemporaryDirectory() as tmp:
        stats['dense']['file_bytes'] = file_bytes(plain_state_dict(dense), osp.join(tmp, 'dense.safetensors'))
        stats['compact']['file_bytes'] = osp.getsize(weights)
        save_sparse(osp.join(tmp, 'sparse.safetensors'), plain_state_dict(compact))
        stats['compact']['sparse_file_bytes'] = osp.getsize(osp.join(tmp, 'sparse.safetensors'))
        sessions, onnx_note = ({}, 'skipped (--no-onnx)') if args.no_onnx else \
            onnx_sessions(nets, tmp, args.threads, args.device)
        result['onnx'] = onnx_note
        if sessions:
            feed = x.cpu().numpy()
            runs = {name: (lambda s=s: s.run(None, {'input': feed})) for name, (s, _) in sessions.items()}
            onnx_times = time_interleaved(runs, 'cpu', args.warmup, args.repeats)  # ort syncs before returning
            for name, (_, size) in sessions.items():
                stats[name]['onnx_ms'] = summary(onnx_times[name])
                stats[name]['onnx_file_bytes'] = size
    result['networks'] = stats
    result['ratios'] = ratios(stats)
    return result


def ratios(stats):
    """dense / compact for latency (speed-up), MACs at 1280x720 output, params, file size."""
    dense, compact = stats['dense'], stats['compact']
    hd = 'macs_hd_out1280x720'
    out = {'eager_speedup': dense['eager_ms']['median'] / compact['eager_ms']['median'],
           'macs_reduction': dense[hd]['macs'] / compact[hd]['macs'],
           'nonzero_macs_reduction': dense[hd]['macs_nonzero'] / compact[hd]['macs_nonzero'],
           'params_reduction': dense['params'] / compact['params'],
           'file_size_reduction': dense['file_bytes'] / compact['file_bytes'],
           'sparse_file_size_reduction': dense['file_bytes'] / compact['sparse_file_bytes']}
    if 'onnx_ms' in compact:
        out['onnx_speedup'] = dense['onnx_ms']['median'] / compact['onnx_ms']['median']
    out['eager_speedup_per_macs_reduction'] = out['eager_speedup'] / out['macs_reduction']
    return {k: round(v, 4) for k, v in out.items()}


def benchmark_widths(args):
    """Uniform LSRB-N-C for each C in ``--widths``: latency and MACs throughput; favoured multiple."""
    device = torch.device(args.device)
    lr_size = tuple(args.lr_size) if args.lr_size else hd_lr_size(args.scale)
    x = torch.rand(args.batch, 3, *lr_size, device=device)
    nets, rows = {}, []
    for c in args.widths:
        opt = {'type': 'LSRB', 'num_feat': c, 'num_block': args.num_block, 'upscale': args.scale}
        nets[c] = build_network(opt).to(device).eval()

    def forward(net):
        def run():
            with torch.inference_mode():
                net(x)
        return run

    times = time_interleaved({c: forward(net) for c, net in nets.items()}, device, args.warmup, args.repeats)
    for c, net in nets.items():
        macs = count_macs(net, lr_size, batch=args.batch)['macs']
        t = summary(times[c])
        rows.append({'num_feat': c, 'macs': macs, 'ms': t, 'gmacs_per_s': round(macs / (t['median'] / 1e3) / 1e9, 3)})
    by_multiple, favoured = favoured_multiple(rows)
    result = {'benchmark': 'compact_speed_widths'}
    result.update(environment(args, device))
    result['config'] = {'arch': f'LSRB-{args.num_block}-C x{args.scale}', 'lr_size': list(lr_size), 'batch': args.batch,
                        'warmup': args.warmup, 'repeats': args.repeats, 'quick': args.quick}
    result['representative'], result['not_representative_because'] = representativeness(args, lr_size, args.scale)
    result.update(rows=rows, throughput_by_multiple={str(k): v for k, v in by_multiple.items()},
                  favoured_multiple=favoured)
    return result


def favoured_multiple(rows):
    """Which channel multiple gives more throughput than its width alone explains.

    Throughput (MACs/s) grows with the width on its own (fixed costs weigh less), so each width's
    throughput is divided by a straight line fitted to throughput against width (least squares;
    no fit below 3 widths). For m in 4, 8, 16, 32: median of these scores over the widths that are
    multiples of m against the others, and their ratio. The favoured multiple is the m with the
    highest ratio, or 1 when no ratio reaches 1.1.

    Returns:
        tuple: ({m: {multiples_score, others_score, ratio}}, favoured m or None).
    """
    widths = [r['num_feat'] for r in rows]
    speed = [r['gmacs_per_s'] for r in rows]
    if len(rows) >= 3:
        slope, intercept = statistics.linear_regression(widths, speed)
        scores = [v / max(slope * c + intercept, 1e-12) for c, v in zip(widths, speed)]
    else:
        scores = speed
    for row, score in zip(rows, scores):
        row['detrended_score'] = round(score, 4)
    by_multiple = {}
    for m in MULTIPLES:
        inside = [sc for c, sc in zip(widths, scores) if c % m == 0]
        outside = [sc for c, sc in zip(widths, scores) if c % m != 0]
        if inside and outside:
            a, b = statistics.median(inside), statistics.median(outside)
            by_multiple[m] = {'multiples_score': round(a, 4), 'others_score': round(b, 4), 'ratio': round(a / b, 3)}
    favoured = max(by_multiple, key=lambda m: by_multiple[m]['ratio']) if by_multiple else None
    if favoured is not None and by_multiple[favoured]['ratio'] < 1.1:
        favoured = 1  # no multiple gives 10 % more than the trend: no preference measured
    return by_multiple, favoured


def environment(args, device):
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {'device': device.type, 'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
            'torch': torch.__version__, 'onnxruntime': ort_version, 'threads': torch.get_num_threads(),
            'threads_from': args.threads_from}


def _ms(stats, key):
    return f"{stats[key]['median']:.2f}" if key in stats else '-'


def report(result):
    """A short human-readable summary of a result (a few lines; the JSON has everything)."""
    config = result['config']
    where = (f"{result['device']}{' ' + result['device_name'] if result['device_name'] else ''}, "
             f"{result['threads']} threads ({result['threads_from']}), LR {config['lr_size'][0]}x{config['lr_size'][1]}"
             f"{' -> ' + 'x'.join(map(str, config['out_size'][::-1])) + ' out' if 'out_size' in config else ''}, "
             f"batch {config['batch']}, {config['warmup']} warm-up + {config['repeats']} timed rounds")
    lines = [f"{result['benchmark']}: {where}"]
    if result['benchmark'] == 'compact_speed':
        nets, r = result['networks'], result['ratios']
        lines.append(f"{'':9}{'eager ms':>10}{'onnx ms':>10}{'params':>11}{'GMACs 720p':>12}{'file KiB':>10}")
        for name in ('dense', 'compact'):
            n = nets[name]
            lines.append(f"{name:9}{_ms(n, 'eager_ms'):>10}{_ms(n, 'onnx_ms'):>10}{n['params']:>11,}"
                         f"{n['macs_hd_out1280x720']['macs'] / 1e9:>12.2f}{n['file_bytes'] / 1024:>10.0f}")
        speed = f"speed-up {r['eager_speedup']:.2f}x eager" + \
            (f", {r['onnx_speedup']:.2f}x onnxruntime" if 'onnx_speedup' in r else '')
        lines.append(f"{speed}; MACs {r['macs_reduction']:.2f}x fewer, params {r['params_reduction']:.2f}x fewer")
    else:
        lines.append(f"{'C':>5}{'ms':>10}{'GMACs/s':>10}{'score':>8}")
        lines += [f"{row['num_feat']:>5}{row['ms']['median']:>10.2f}{row['gmacs_per_s']:>10.2f}"
                  f"{row['detrended_score']:>8.3f}" for row in result['rows']]
        lines.append(f"favoured channel multiple: {result['favoured_multiple']}")
    if not result['representative']:
        lines.append('NOT REPRESENTATIVE of the speed at a real image size: '
                     + '; '.join(result['not_representative_because'])
                     + ' (run without --quick, at the default size, to quote a number)')
    return '\n'.join(lines)


def main(argv=None):
    """Run the benchmark; print a short summary on stderr and one JSON line on stdout; return the dict."""
    args = parse_args(argv)
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'--device {args.device}: CUDA is not available')
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = benchmark_widths(args) if args.widths else benchmark_export(args)
    finally:
        torch.set_num_threads(previous)
    print(report(result), file=sys.stderr, flush=True)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    from fmpsr.cli import run_cli
    run_cli(main, prog='compact_speed.py')
