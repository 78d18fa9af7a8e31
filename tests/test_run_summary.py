"""The run summary of fmpsr/train.py and fmpsr/test.py (fmpsr/summary.py): params before / after, PSNR
next to bicubic (same LR, same metric settings), the export, a warning below bicubic; summary.json."""
import glob
import json
import os.path as osp
import sys

import cv2
import numpy as np
import pytest
import yaml
from conftest import ROOT, SCALE, run, write_options

import fmpsr  # noqa: F401
from fmpsr.summary import bicubic_psnr_ssim, bicubic_scores, format_summary, run_summary

METRICS = {'psnr': {'type': 'calculate_psnr', 'crop_border': SCALE, 'test_y_channel': True},
           'ssim': {'type': 'calculate_ssim', 'crop_border': SCALE, 'test_y_channel': True}}


def _by_hand(data, scale):
    """The computation scripts/demo.py used to do itself (cv2, imresize, BasicSR's metrics)."""
    from basicsr.metrics import calculate_psnr, calculate_ssim
    from basicsr.utils.matlab_functions import imresize
    psnr, ssim = [], []
    for gt_path in sorted(glob.glob(str(data / 'val/HR/*.png'))):
        gt, lq = cv2.imread(gt_path), cv2.imread(str(data / 'val/LR' / osp.basename(gt_path)))
        sr = np.clip(np.round(imresize(lq.astype(np.float32) / 255., scale) * 255.), 0, 255)
        psnr.append(calculate_psnr(sr, gt, crop_border=scale, test_y_channel=True))
        ssim.append(calculate_ssim(sr, gt, crop_border=scale, test_y_channel=True))
    return float(np.mean(psnr)), float(np.mean(ssim))


def test_bicubic_scores_are_basicsr_metrics_of_imresize(data):
    dataset = {'name': 'v', 'type': 'PairedImageDataset', 'dataroot_gt': str(data / 'val/HR'),
               'dataroot_lq': str(data / 'val/LR'), 'io_backend': {'type': 'disk'}}
    scores = bicubic_scores(dataset, SCALE, METRICS)
    psnr, ssim = _by_hand(data, SCALE)
    assert scores['psnr'] == pytest.approx(psnr, abs=1e-9) and scores['ssim'] == pytest.approx(ssim, abs=1e-9)
    assert 24 < psnr < 40   # a real photograph at x2: bicubic is good, not perfect
    assert bicubic_psnr_ssim({'dataroot_gt': 'val/HR', 'dataroot_lq': 'val/LR'}, SCALE, root=str(data)) == \
        pytest.approx((psnr, ssim), abs=1e-9)


def test_kept_ratio_from_the_export_and_a_warning_below_bicubic(tmp_path):
    (tmp_path / 'export').mkdir()
    (tmp_path / 'export' / 'pruning.json').write_text(json.dumps({'ratios': {'original_params': 1000,
                                                                            'pruned_params': 250}}))
    opt = {'name': 'n', 'model_type': 'FMPModel', 'is_train': True, 'path': {'experiments_root': str(tmp_path)}}
    summary = run_summary(opt, {'a': {'psnr': 20.0}, 'b': {'psnr': 35.0}}, {'a': {'psnr': 30.5}, 'b': {'psnr': 30.0}})
    assert summary['params'] == {'before': 1000, 'after': 250, 'kept_ratio': 0.25}
    assert [summary['sets'][s]['below_bicubic'] for s in 'ab'] == [True, False]
    assert summary['export'] == str(tmp_path / 'export')
    text = format_summary(summary)
    assert 'params: 1,000 -> 250 (kept 25.0 %)' in text
    assert 'a: PSNR 20.0000 (bicubic 30.5000)' in text
    warnings = [line for line in text.splitlines() if line.startswith('warning:')]
    assert warnings == ['warning: on a the network is 10.50 dB below bicubic in PSNR '
                        '(too few iterations, a wrong lr, or pruned too far?)']


@pytest.mark.slow
def test_train_and_test_end_with_a_summary(tmp_path, data, names):
    name = names('pytest_summary')
    yml = tmp_path / 'train.yml'
    opt = write_options(yml, name, data, total_iter=40,
                        extra={'val.metrics': METRICS})
    result = run([sys.executable, 'fmpsr/train.py', '-opt', str(yml)])
    folder = osp.join(ROOT, 'experiments', name)
    with open(osp.join(folder, 'summary.json')) as f:
        summary = json.load(f)
    with open(osp.join(folder, 'export', 'pruning.json')) as f:
        ratios = json.load(f)['ratios']
    assert summary['params']['before'] == ratios['original_params'] > summary['params']['after'] == ratios['pruned_params']
    psnr, ssim = _by_hand(data, SCALE)
    entry = summary['sets'][opt['datasets']['val']['name']]
    assert entry['bicubic'] == pytest.approx({'psnr': psnr, 'ssim': ssim}, abs=1e-9)
    assert set(entry['network']) == {'psnr', 'ssim'} and summary['export'] == osp.join(folder, 'export')
    assert f'run summary: {name} (FMPModel, train)' in result.stdout
    assert ('warning: on tiny_val the network is' in result.stdout) == (entry['network']['psnr'] < psnr)

    test_opt = {'name': name, 'model_type': 'PrunedSRModel', 'scale': SCALE, 'num_gpu': 0,
                'datasets': {'test_1': dict(opt['datasets']['val'], name='tiny_test')},
                'path': {'pretrain_network_g': osp.join(folder, 'export', 'net_g.safetensors')},
                'val': {'save_img': False, 'metrics': METRICS}}
    (tmp_path / 'test.yml').write_text(yaml.safe_dump(test_opt))
    result = run([sys.executable, 'fmpsr/test.py', '-opt', str(tmp_path / 'test.yml')])
    with open(osp.join(ROOT, 'results', name, 'summary.json')) as f:
        tested = json.load(f)
    assert tested['run'] == 'test' and tested['sets']['tiny_test']['bicubic'] == pytest.approx(entry['bicubic'])
    assert tested['sets']['tiny_test']['network']['psnr'] == pytest.approx(entry['network']['psnr'], abs=1e-6)
    assert tested['params']['network'] == ratios['channel_params']   # the compact network's tensors
    assert 'run summary:' in result.stdout and 'bicubic' in result.stdout
