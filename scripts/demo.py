"""The main job at CPU scale: demo data, FMP pruning, finalize, fine-tune, test, summary.

Run from the repository root (``make demo`` does): ::

    python scripts/demo.py [--opt options/demo/fmp_lsrb_x4_demo.yml]
                           [--test-opt options/demo/test_fmp_lsrb_x4_demo.yml]

Steps, each with BasicSR's own entry points:

1. ``scripts/data/build_demo_dataset.py``: train / validation split of the colour photographs
   bundled with scikit-image, bicubic LR with BasicSR's MATLAB-like ``imresize`` (skipped if built);
2. ``fmpsr/train.py -opt <opt>``: FMP from scratch until the pruning target is met, finalize into a
   compact LSRB, fine-tune in the same run; the compact network is exported as safetensors;
3. ``fmpsr/test.py -opt <test-opt>``: PSNR / SSIM (Y channel, border = scale) of the exported network;
4. bicubic upsampling of the same validation images, scored with the same BasicSR metrics;
5. a table on stdout and ``experiments/<name>/summary.json`` (counts, ratios, PSNR / SSIM, the
   export path and the ``network_g`` options that rebuild the compact network).

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
    import cv2
    import numpy as np
    from basicsr.metrics import calculate_psnr, calculate_ssim
    from basicsr.utils.matlab_functions import imresize

    psnr, ssim = [], []
    for gt_path in sorted(glob.glob(osp.join(ROOT, val_opt['dataroot_gt'], '*.png'))):
        lq_path = osp.join(ROOT, val_opt['dataroot_lq'], osp.basename(gt_path))
        gt, lq = cv2.imread(gt_path), cv2.imread(lq_path)
        sr = np.clip(np.round(imresize(lq.astype(np.float32) / 255., scale) * 255.), 0, 255)
        psnr.append(calculate_psnr(sr, gt, crop_border=scale, test_y_channel=True))
        ssim.append(calculate_ssim(sr, gt, crop_border=scale, test_y_channel=True))
    return float(np.mean(psnr)), float(np.mean(ssim))


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
    val_name, val_opt = next(iter(test_opt['datasets'].items()))
    compact_scores = metrics[val_opt['name']]
    bicubic_psnr, bicubic_ssim = bicubic_scores(val_opt, scale)
    beats = compact_scores['psnr'] > bicubic_psnr
    summary = {
        'name': name, 'scale': scale, 'criterion': pruning['pruning']['criterion'],
        'metric': pruning['pruning']['metric'],
        'targets': {'gamma_c': pruning['pruning']['gamma_c'], 'gamma_w': pruning['pruning']['gamma_w']},
        'pruning_ended_at_iter': pruning['switch_iter'], 'converged': pruning['ratios'].get('converged'),
        'counts': counts, 'ratios': ratios, 'ratios_logged_by_model': pruning['ratios'],
        'validation': {'dataset': val_opt['name'],
                       'compact': {'psnr': compact_scores['psnr'], 'ssim': compact_scores['ssim']},
                       'bicubic': {'psnr': bicubic_psnr, 'ssim': bicubic_ssim},
                       'compact_beats_bicubic': bool(beats)},
        'export': {'weights': osp.relpath(osp.join(export_dir, 'net_g.safetensors'), ROOT),
                   'weight_masks': osp.relpath(osp.join(export_dir, 'weight_masks.safetensors'), ROOT),
                   'network_g': network_opt},
        'timings_s': dict(timings, total_s=time.time() - started),
    }
    path = osp.join(ROOT, 'experiments', name, 'summary.json')
    with open(path, 'w') as f:
        json.dump(summary, f, indent=2)
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
    lines.append(f"{'validation ' + v['dataset']:<20}{'PSNR (Y)':>18}  SSIM (Y)")
    lines.append(f"{'compact network':<20}{v['compact']['psnr']:>18.2f}  {v['compact']['ssim']:.4f}")
    lines.append(f"{'bicubic':<20}{v['bicubic']['psnr']:>18.2f}  {v['bicubic']['ssim']:.4f}")
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    from fmpsr.cli import run_cli  # one line on stderr, exit status 2 for bad input (FMPSR_TRACEBACK=1: traceback)
    run_cli(main, prog='demo.py', use_return_code=True)
