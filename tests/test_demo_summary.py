"""The summary of ``make demo`` (scripts/demo.py): the measured speed-up next to the MACs reduction, every
test set next to bicubic. Timings are not asserted (tests never time); their arithmetic and reporting are."""
import importlib.util
import os.path as osp

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def demo_module():
    spec = importlib.util.spec_from_file_location('fmpsr_demo_script', osp.join(ROOT, 'scripts', 'demo.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_speed_reports_medians_and_their_ratio():
    demo = demo_module()
    dense = torch.nn.Conv2d(3, 16, 3, padding=1)
    compact = torch.nn.Conv2d(3, 4, 3, padding=1)
    speed = demo.measure_speed(dense, compact, (9, 11), warmup=1, repeats=3)
    assert speed['lr_size'] == [9, 11] and speed['repeats'] == 3 and speed['threads'] == torch.get_num_threads()
    assert speed['dense_ms'] > 0 and speed['compact_ms'] > 0
    # the ratio of the unrounded medians: within what rounding the ms to 0.01 allows (a ratio of means, of
    # minima or compact / dense would fall outside it or be caught by the table test below)
    d, c, half = speed['dense_ms'], speed['compact_ms'], 0.005 + 1e-9
    assert (d - half) / (c + half) - 1e-3 <= speed['speedup'] <= (d + half) / max(c - half, 1e-9) + 1e-3, speed


def summary(speedup):
    counts = {'original': {'params': 126160, 'macs': 447_000_000},
              'channel_pruned': {'params': 80000, 'macs': 300_000_000},
              'pruned': {'params': 63000, 'macs': 200_000_000}}
    ratios = {k: {'channel_ratio': 0.3, 'weight_ratio': 0.2, 'total_ratio': 0.5} for k in ('params', 'flops')}
    sets = {'demo_val': {'compact': {'psnr': 29.5, 'ssim': 0.8}, 'bicubic': {'psnr': 29.38, 'ssim': 0.79}, 'images': 2},
            'demo_holdout': {'compact': {'psnr': 28.3, 'ssim': 0.74}, 'bicubic': {'psnr': 28.05, 'ssim': 0.73},
                             'images': 8}}
    return {'name': 'x', 'scale': 4, 'criterion': 'total_fixed', 'metric': 'params',
            'targets': {'gamma_c': 0.3, 'gamma_w': 0.2}, 'pruning_ended_at_iter': 400,
            'counts': {'lr_64x64': counts, 'hr_1280x720': counts}, 'ratios': ratios, 'test_sets': sets,
            'validation': dict(sets['demo_val'], dataset='demo_val'),
            'speed': {'dense_ms': 100.0, 'compact_ms': 100.0 / speedup, 'speedup': speedup, 'threads': 2,
                      'repeats': 10}}


def test_table_puts_the_measured_speed_up_beside_the_macs_and_every_test_set_beside_bicubic():
    text = demo_module().format_table(summary(1.37))
    speed = next(line for line in text.splitlines() if 'speed-up' in line)
    assert '1.37x' in speed and '1.49x fewer dense' in speed and '2.23x fewer nonzero' in speed, speed
    assert 'demo_holdout (8 images)' in text and 'demo_val (2 images)' in text
    lines = text.splitlines()
    holdout = lines.index(next(line for line in lines if line.startswith('demo_holdout')))
    assert '28.30' in lines[holdout + 1] and '28.05' in lines[holdout + 2]
