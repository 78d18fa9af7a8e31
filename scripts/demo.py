"""The main job at CPU scale: demo data, FMP pruning, finalize, fine-tune, test, summary.

Run from the repository root (``make demo`` does): ::

    python scripts/demo.py [--opt options/demo/fmp_lsrb_x4_demo.yml]
                           [--test-opt options/demo/test_fmp_lsrb_x4_demo.yml]

Steps, each with BasicSR's own entry points:

1. ``scripts/data/build_demo_dataset.py``: train / validation split of the colour photographs
   bundled with scikit-image, bicubic LR with BasicSR's MATLAB-like ``imresize`` (skipped if built);
2. ``fmpsr/train.py -opt <opt>``: FMP from scratch until the pruning target is met, finalize into a
   compact LSRB, fine-tune in the same run; the compact network is exported as safetensors;
3. ``fmpsr/test.py -opt <test-opt>``: PSNR / SSIM (Y channel, border = scale) of the exported network on
   the validation photographs and on the held-out set (``datasets/demo/holdout``: 8 photographs no run
   trains on);
4. bicubic upsampling of the same images, scored with the same BasicSR metrics;
5. the measured CPU time of the dense and the compact network at a 1280x720 output (PyTorch eager,
   timed alternately), beside the MACs reduction;
6. a table on stdout and ``experiments/<name>/demo_summary.json`` (counts, ratios, speed, PSNR / SSIM on the
   validation and the held-out photographs with bicubic beside them, the export path and the
   ``network_g`` options that rebuild the compact network).

Params and MACs in the summary are counted on the exported network (conv weights and biases; MACs =
nonzero weights x output pixels), independently of the numbers the model logged while pruning.

Exit status: 0 when every step ran and the compact network beats bicubic in PSNR, 1 otherwise.
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))


def run(cmd):
    """Run a step of the pipeline from the repository root; stop the demo if it fails."""
    print(f'\n$ {" ".join(cmd)}', flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f'demo: step failed with exit status {result.returncode}: {" ".join(cmd)}')
    return time.time() - start


def load_yaml(path):
    import yaml
    with open(osp.join(ROOT, path)) as f:
        return yaml.safe_load(f)


def network_counts(net, masks, lr_size):
    """Params and MACs of ``net``: dense, and with the masked (zero) weights removed.

    Counted with forward hooks on the network itself (not with the pruning core's bookkeeping).
    """
    import torch
    from torch import nn

    out_pixels, hooks = {}, []
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: out_pixels.__setitem__(name, o.shape[-2] * o.shape[-1])))
    with torch.no_grad():
        net(torch.zeros(1, 3, *lr_size))
    for h in hooks:
        h.remove()
    dense = {'params': 0, 'macs': 0}
    sparse = {'params': 0, 'macs': 0}
    for name, module in net.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        weights = module.weight.numel()
        nonzero = int(masks[name].sum()) if masks and name in masks else int((module.weight != 0).sum())
        biases = module.bias.numel() if module.bias is not None else 0
        dense['params'] += weights + biases
        dense['macs'] += weights * out_pixels[name]
        sparse['params'] += nonzero + biases
        sparse['macs'] += nonzero * out_pixels[name]
    return dense, sparse


def bicubic_scores(val_opt, scale):
    """Mean PSNR / SSIM (Y, border = scale) of MATLAB-like bicubic upsampling of the val LR images."""
    from fmpsr.summary import bicubic_psnr_ssim
    return bicubic_psnr_ssim(val_opt, scale, root=ROOT)


def measure_speed(original, compact, lr_size, warmup=2, repeats=10):
    """Measured CPU time of one forward pass of the dense ``original`` and of ``compact`` (PyTorch eager,
    torch's default threads, batch 1, LR ``lr_size`` (H, W) pixels), timed alternately
    (:func:`fmpsr.deploy.profiling.time_interleaved`) so that machine noise hits both alike.

    The dense network has its initial (random) weights: the time of a conv does not depend on its values.

    Returns:
        dict: ``lr_size``, ``threads``, ``repeats``, ``dense_ms`` / ``compact_ms`` (median, milliseconds) and
        ``speedup`` (dense / compact median time; > 1: the compact network is faster).
    """
    import torch
    from fmpsr.deploy.profiling import time_interleaved

    x = torch.rand(1, 3, *lr_size)
    nets = {'dense': original.eval(), 'compact': compact.eval()}

    def forward(net):
        def run():
            with torch.inference_mode():
                net(x)
        return run
    times = time_interleaved({k: forward(n) for k, n in nets.items()}, 'cpu', warmup, repeats)
    median = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    return {'lr_size': list(lr_size), 'threads': torch.get_num_threads(), 'repeats': repeats,
            'dense_ms': round(median['dense'], 2), 'compact_ms': round(median['compact'], 2),
            'speedup': round(median['dense'] / median['compact'], 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--opt', default='options/demo/fmp_lsrb_x4_demo.yml', help='training option file')
    parser.add_argument('--test-opt', default='options/demo/test_fmp_lsrb_x4_demo.yml', help='test option file')
    args = parser.parse_args(argv)
    started = time.time()
    opt, test_opt = load_yaml(args.opt), load_yaml(args.test_opt)
    scale, name = opt['scale'], opt['name']
    python = sys.executable

    timings = {'data_s': run([python, 'scripts/data/build_demo_dataset.py', '--output', 'datasets/demo',
                              '--scale', str(scale)])}
    timings['train_s'] = run([python, 'fmpsr/train.py', '-opt', args.opt])
    timings['test_s'] = run([python, 'fmpsr/test.py', '-opt', args.test_opt])

    sys.path.insert(0, ROOT)
    import fmpsr  # noqa: F401  (basicsr patches, registries)
    from basicsr.archs import build_network
    from fmpsr.pruning import load_compact

    export_dir = osp.join(ROOT, 'experiments', name, 'export')
    compact, network_opt, masks = load_compact(export_dir)
    with open(osp.join(export_dir, 'pruning.json')) as f:
        pruning = json.load(f)
    original = build_network(dict(opt['network_g']))
    sizes = {'lr_64x64': (64, 64), 'hr_1280x720': (720 // scale, 1280 // scale)}
    counts = {}
    for key, size in sizes.items():
        (dense, _), (channel, pruned) = network_counts(original, None, size), network_counts(compact, masks, size)
        counts[key] = {'original': dense, 'channel_pruned': channel, 'pruned': pruned}
    ratios = {}
    for metric, key in (('params', 'params'), ('flops', 'macs')):
        c = counts['lr_64x64']
        o, ch, pr = c['original'][key], c['channel_pruned'][key], c['pruned'][key]
        ratios[metric] = {'channel_ratio': (o - ch) / o, 'weight_ratio': (ch - pr) / o, 'total_ratio': pr / o}

    with open(osp.join(ROOT, 'results', test_opt['name'], 'metrics.json')) as f:
        metrics = json.load(f)
    scores = {}
    for ds in test_opt['datasets'].values():   # validation first, then the held-out photographs
        bicubic_psnr, bicubic_ssim = bicubic_scores(ds, scale)
        scores[ds['name']] = {'compact': {'psnr': metrics[ds['name']]['psnr'], 'ssim': metrics[ds['name']]['ssim']},
                              'bicubic': {'psnr': bicubic_psnr, 'ssim': bicubic_ssim},
                              'images': len(glob.glob(osp.join(ROOT, ds['dataroot_gt'], '*.png')))}
    val_name = next(iter(scores))
    beats = scores[val_name]['compact']['psnr'] > scores[val_name]['bicubic']['psnr']
    speed = measure_speed(original, compact, sizes['hr_1280x720'])
    summary = {
        'name': name, 'scale': scale, 'criterion': pruning['pruning']['criterion'],
        'metric': pruning['pruning']['metric'],
        'targets': {'gamma_c': pruning['pruning']['gamma_c'], 'gamma_w': pruning['pruning']['gamma_w']},
        'pruning_ended_at_iter': pruning['switch_iter'], 'converged': pruning['ratios'].get('converged'),
        'counts': counts, 'ratios': ratios, 'ratios_logged_by_model': pruning['ratios'],
        'validation': dict(scores[val_name], dataset=val_name, compact_beats_bicubic=bool(beats)),
        'test_sets': scores,
        'speed': speed,
        'export': {'weights': osp.relpath(osp.join(export_dir, 'net_g.safetensors'), ROOT),
                   'weight_masks': osp.relpath(osp.join(export_dir, 'weight_masks.safetensors'), ROOT),
                   'network_g': network_opt},
        'timings_s': dict(timings, total_s=time.time() - started),
    }
    from fmpsr.pruning.export import write_json
    path = osp.join(ROOT, 'experiments', name, 'demo_summary.json')
    write_json(path, summary)
    print(format_table(summary))
    print(f'\nsummary: {osp.relpath(path, ROOT)}')
    if not beats:
        print('demo: the compact network does NOT beat bicubic on the validation images', file=sys.stderr)
        return 1
    return 0


def format_table(s):
    c = s['counts']['lr_64x64']
    hd = s['counts']['hr_1280x720']
    v = s['validation']
    rows = [
        ('', 'original', 'compact'),
        ('params', f"{c['original']['params']:,}", f"{c['pruned']['params']:,} (dense {c['channel_pruned']['params']:,})"),
        ('MACs @ LR 64x64', f"{c['original']['macs'] / 1e9:.3f} G", f"{c['pruned']['macs'] / 1e9:.3f} G"),
        ('MACs @ HR 1280x720', f"{hd['original']['macs'] / 1e9:.2f} G", f"{hd['pruned']['macs'] / 1e9:.2f} G"),
    ]
    lines = [f"\nFMP demo ({s['name']}, x{s['scale']}, criterion {s['criterion']}, metric {s['metric']}, "
             f"targets gamma_c={s['targets']['gamma_c']}, gamma_w={s['targets']['gamma_w']}; "
             f"pruning ended at iteration {s['pruning_ended_at_iter']})"]
    lines += [f'{a:<20}{b:>18}  {c_}' for a, b, c_ in rows]
    lines.append(f"{'ratios':<20}{'params':>18}  flops (MACs)")
    for key in ('channel_ratio', 'weight_ratio', 'total_ratio'):
        lines.append(f"{key:<20}{s['ratios']['params'][key]:>18.4f}  {s['ratios']['flops'][key]:.4f}")
    sp = s['speed']
    lines.append(f"{'CPU time @ HR 1280x720':<20}{sp['dense_ms']:>15.1f} ms  {sp['compact_ms']:.1f} ms")
    lines.append(f"{'  speed-up':<20}{sp['speedup']:>17.2f}x  measured (eager, {sp['threads']} threads, median of "
                 f"{sp['repeats']}); MACs {c['original']['macs'] / c['channel_pruned']['macs']:.2f}x fewer dense, "
                 f"{c['original']['macs'] / c['pruned']['macs']:.2f}x fewer nonzero")
    for name, t in s['test_sets'].items():
        lines.append(f"{name + ' (' + str(t['images']) + ' images)':<20}{'PSNR (Y)':>18}  SSIM (Y)")
        lines.append(f"{'  compact network':<20}{t['compact']['psnr']:>18.2f}  {t['compact']['ssim']:.4f}")
        lines.append(f"{'  bicubic':<20}{t['bicubic']['psnr']:>18.2f}  {t['bicubic']['ssim']:.4f}")
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    from fmpsr.cli import run_cli  # one line on stderr, exit status 2 for bad input (FMPSR_TRACEBACK=1: traceback)
    run_cli(main, prog='demo.py', use_return_code=True)
