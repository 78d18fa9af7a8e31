"""Bad input through the real console scripts (each a subprocess, as a user runs it): exit status 2,
exactly one line on stderr (``<prog>: error: ...`` naming the file at fault), no traceback.

fmpsr/train.py and fmpsr/test.py are covered by tests/test_errors.py and tests/test_reliability.py
(a typo, an unsafe checkpoint, an unknown option key), the data scripts by tests/test_data_scripts.py;
here: a corrupt export through fmpsr/test.py, inference (script and installed ``fmpsr-infer``), the
ONNX export, the scratch baselines and the comparison runner."""
import os.path as osp
import sys

import pytest
import yaml
from conftest import SCALE, assert_one_line_error, run_failing
from deploy_helpers import LSRB_COMPACT, make_export

PY = sys.executable
INFER = osp.join(osp.dirname(sys.executable), 'fmpsr-infer')  # the console script pip installed


@pytest.fixture(scope='module')
def exports(tmp_path_factory, data):
    """A good export, a corrupt one (net_g.safetensors cut short) and a test option file scoring it."""
    root = tmp_path_factory.mktemp('cli_errors')
    _, good = make_export(root / 'good', LSRB_COMPACT)
    _, corrupt = make_export(root / 'corrupt', LSRB_COMPACT)
    weights = osp.join(corrupt, 'net_g.safetensors')
    with open(weights, 'rb') as f:
        head = f.read(200)
    with open(weights, 'wb') as f:
        f.write(head)
    test_opt = {'name': 'pytest_cli_corrupt', 'model_type': 'PrunedSRModel', 'scale': SCALE, 'num_gpu': 0,
                'datasets': {'test_1': {'name': 'tiny_val', 'type': 'PairedImageDataset',
                                        'dataroot_gt': str(data / 'val/HR'), 'dataroot_lq': str(data / 'val/LR'),
                                        'io_backend': {'type': 'disk'}}},
                'path': {'pretrain_network_g': weights},
                'val': {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': SCALE}}}}
    (root / 'test.yml').write_text(yaml.safe_dump(test_opt))
    return {'root': str(root), 'good': good, 'corrupt': corrupt, 'image': str(data / 'val/LR/img0.png'),
            'weights': weights, 'test_yml': str(root / 'test.yml')}


# (command line with {placeholders}, the line's start, a text the line must hold)
CASES = {
    'test.py corrupt export': ([PY, 'fmpsr/test.py', '-opt', '{test_yml}'], 'fmpsr: error: ', '{weights}'),
    'inference.py missing input': ([PY, 'scripts/inference.py', '-i', '{root}/nowhere.png', '-o', '{root}/out',
                                    '--model', '{good}'], 'inference.py: error: ', 'nowhere.png'),
    'fmpsr-infer corrupt export': ([INFER, '-i', '{image}', '-o', '{root}/out', '--model', '{corrupt}'],
                                   'fmpsr-infer: error: ', 'net_g.safetensors'),
    'export_onnx.py corrupt export': ([PY, 'scripts/export_onnx.py', '{corrupt}', '-o', '{root}/m.onnx'],
                                      'export_onnx.py: error: ', 'net_g.safetensors'),
    'scratch_baseline.py missing export': ([PY, 'scripts/scratch_baseline.py', '--export', '{root}/nowhere',
                                            '--out', '{root}/scratch'], 'scratch_baseline.py: error: ', 'nowhere'),
    'compare.py missing preset': ([PY, 'scripts/compare.py', '-opt', '{root}/nowhere.yml', '--dry-run'],
                                  'compare: error: ', 'nowhere.yml'),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_line_and_status_2(case, exports):
    args, start, needle = CASES[case]
    result = run_failing([a.format(**exports) for a in args])
    line = assert_one_line_error(result, start)
    assert needle.format(**exports) in line, line
    assert not osp.exists(osp.join(exports['root'], 'out', 'img0_out.png'))   # nothing written for bad input
