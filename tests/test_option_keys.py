"""Every key of an option file is checked before anything runs (fmpsr/option_keys.py): a mistyped key
anywhere, an arch argument, an optimiser / loss / scheduler / metric type, a bad frequency, a too-large
gt_size, a bad io_backend or a missing required key ends with one line naming the key and the closest
known one, exit status 2, and no experiment folder made or renamed."""
import glob
import os
import os.path as osp
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from conftest import ROOT, assert_one_line_error, run_failing, write_options

import fmpsr  # noqa: F401
from basicsr.utils.registry import MODEL_REGISTRY
from fmpsr.option_keys import OptionKeyError, check_option_keys, check_required, closest

# case: (write_options extra, keys deleted from the file, text the error line must hold)
CASES = {
    'top-level key': ({'indicator_op': {'type': 'WeightIndicatorLoss'}}, (),
                      "error: indicator_op: unknown option; did you mean train.indicator_opt?"),
    'train key': ({'train.indicator_op': {'type': 'WeightIndicatorLoss', 'loss_weight': 0.02}}, (),
                  "error: train.indicator_op: unknown option; did you mean 'indicator_opt'?"),
    'arch argument': ({'network_g.num_feats': 12}, (),
                      "error: network_g.num_feats: unknown option for arch LSRB; did you mean 'num_feat'?"),
    'optimiser type': ({'train.optim_g.type': 'adam'}, (),
                       "error: train.optim_g.type: unknown optimiser 'adam'; did you mean 'Adam'?"),
    'loss type': ({'train.pixel_opt.type': 'L1Los'}, (),
                  "error: train.pixel_opt.type: unknown loss 'L1Los'; did you mean 'L1Loss'?"),
    'val_freq': ({'val.val_freq': 'often'}, (), "error: val.val_freq must be a positive number of iterations, "
                                                "got 'often'"),
    'print_freq': ({'logger.print_freq': '1e9'}, (), "error: logger.print_freq must be a positive number of "
                                                     "iterations, got '1e9' (YAML reads 1e9 as text"),
    'total_iters': ({'train.total_iters': 40}, ('train.total_iter',),
                    "error: train.total_iters: unknown option; did you mean 'total_iter'?"),
    'gt_size': ({'datasets.train.gt_size': 4000}, (),
                'error: datasets.train.gt_size (4000) is larger than the smallest training HR image'),
    'io_backend': ({'datasets.train.io_backend': {'type': 'dsk'}}, (),
                   "error: datasets.train.io_backend.type: unknown backend 'dsk'; did you mean 'disk'?"),
    'use_flip': ({'datasets.train.use_flip': True}, (),
                 "error: datasets.train.use_flip: unknown option; did you mean 'use_hflip'?"),
    'val key': ({'val.save_image': False}, (), "error: val.save_image: unknown option; did you mean 'save_img'?"),
    'missing num_gpu': ({'num_gpus': 0}, ('num_gpu',),
                        "missing option 'num_gpu' (0 for CPU, or auto); the file has 'num_gpus', a typo?"),
}


def _delete(path, dotted):
    with open(path) as f:
        opt = yaml.safe_load(f)
    node = opt
    *parents, last = dotted.split('.')
    for p in parents:
        node = node[p]
    del node[last]
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data, names):
    """Every case through the real fmpsr/train.py (two at a time), each with an earlier run of its name."""
    root = tmp_path_factory.mktemp('option_keys')
    jobs = {}
    for case, (extra, deleted, _) in CASES.items():
        name = names('pytest_keys')
        folder = osp.join(ROOT, 'experiments', name)
        os.makedirs(folder)
        with open(osp.join(folder, 'precious.txt'), 'w') as f:
            f.write('saved earlier')
        path = root / f'{case.replace(" ", "_")}.yml'
        write_options(path, name, data, extra=extra)
        for dotted in deleted:
            _delete(path, dotted)
        jobs[case] = (name, folder, path)
    with ThreadPoolExecutor(2) as pool:
        done = {case: pool.submit(run_failing, [sys.executable, 'fmpsr/train.py', '-opt', str(path)])
                for case, (_, _, path) in jobs.items()}
    return {case: (jobs[case][0], jobs[case][1], done[case].result()) for case in CASES}


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_option_mistakes_are_one_line_before_any_folder(case, runs):
    name, folder, result = runs[case]
    line = assert_one_line_error(result)
    assert CASES[case][2] in line, line
    assert os.listdir(folder) == ['precious.txt']   # not archived, nothing written into it
    assert not [d for d in os.listdir(osp.join(ROOT, 'experiments')) if d.startswith(f'{name}_archived')]
    assert 'Traceback' not in result.stdout


# ---------------------------------------------------------------- in process (fast)

def _opt(data, tmp_path, **extra):
    path = tmp_path / 'o.yml'
    opt = write_options(path, 'x', data, extra=extra)
    opt['is_train'] = True
    return opt


def test_every_option_file_of_the_repository_passes():
    files = sorted(glob.glob(osp.join(ROOT, 'options', '**', '*.yml'), recursive=True)
                   + glob.glob(osp.join(ROOT, 'examples', '**', '*.yml'), recursive=True))
    checked = 0
    for path in files:
        with open(path) as f:
            opt = yaml.safe_load(f)
        if 'model_type' not in opt:  # comparison presets
            continue
        opt['is_train'] = 'test' not in osp.basename(path)
        check_option_keys(opt, MODEL_REGISTRY.get(opt['model_type']))
        checked += 1
    assert checked > 40


@pytest.mark.parametrize('model_type, key, allowed', [
    ('FMPModel', 'indicator_opt', True), ('SRPModel', 'indicator_opt', False), ('SRPModel', 'sparsity_opt', True),
    ('ASSLModel', 'alignment_opt', True), ('L1NormModel', 'sparsity_opt', False), ('DHPModel', 'indicator_opt', True)])
def test_train_keys_depend_on_the_model_class(model_type, key, allowed, data, tmp_path):
    opt = _opt(data, tmp_path)
    opt['model_type'] = model_type
    opt['train'][key] = None
    if allowed:
        check_option_keys(opt, MODEL_REGISTRY.get(model_type))
    else:
        with pytest.raises(OptionKeyError, match=f'train.{key}: unknown option'):
            check_option_keys(opt, MODEL_REGISTRY.get(model_type))


def test_a_model_class_may_declare_its_own_keys(data, tmp_path):
    base = MODEL_REGISTRY.get('PrunedSRModel')
    mine = type('MyModel', (base,), {'option_keys': {'train': {'my_opt_weight'}, 'top': {'my_section'}}})
    opt = _opt(data, tmp_path)
    opt.pop('pruning')
    opt['train']['my_opt_weight'] = 1
    opt['my_section'] = {}
    check_option_keys(opt, mine)
    with pytest.raises(OptionKeyError, match='my_section'):
        check_option_keys(opt, base)


@pytest.mark.parametrize('extra, message', [
    ({'train.optim_g.type': 'SGD'}, "'SGD' is a torch.optim optimiser, but BasicSR 1.4.2 models build only"),
    ({'train.optim_g.beta': [0.9, 0.99]}, "train.optim_g.beta: unknown option for torch.optim.Adam; did you mean 'betas'"),
    ({'train.scheduler.milestone': [10]}, "train.scheduler.milestone: unknown option for scheduler MultiStepLR; "
                                          "did you mean 'milestones'"),
    ({'train.pixel_opt.weight': 1}, "train.pixel_opt.weight: unknown option for loss L1Loss"),
    ({'val.metrics.psnr.type': 'psnr'}, "unknown metric 'psnr'; did you mean 'calculate_psnr'"),
    ({'datasets.train.use_rot': 'yes'}, "datasets.train.use_rot must be true or false, got 'yes'"),
    ({'datasets.train.gt_size': 33}, r'datasets.train.gt_size \(33\) must be a multiple of scale \(2\)'),
    ({'logger.save_checkpoint_freq': 0}, 'logger.save_checkpoint_freq must be a positive number'),
    ({'path.pretrain_network': None}, "path.pretrain_network: unknown option; did you mean 'pretrain_network_g'"),
    ({'network_g.type': 'LSRb'}, "network_g.type: unknown arch 'LSRb'; did you mean 'LSRB'"),
])
def test_values_and_types_are_named(extra, message, data, tmp_path):
    opt = _opt(data, tmp_path, **extra)
    with pytest.raises(OptionKeyError, match=message):
        check_option_keys(opt, MODEL_REGISTRY.get('FMPModel'))


def test_a_gt_size_that_fits_passes_and_one_pixel_more_does_not(data, tmp_path):
    opt = _opt(data, tmp_path, **{'datasets.train.gt_size': 96})   # the training HR images are 96 x 96
    check_option_keys(opt, MODEL_REGISTRY.get('FMPModel'))
    opt['datasets']['train']['gt_size'] = 98
    with pytest.raises(OptionKeyError, match=r'img\d\.png, 96 pixels on its short side\); use at most 96'):
        check_option_keys(opt, MODEL_REGISTRY.get('FMPModel'))


def test_required_keys_are_named_with_the_file():
    check_required({'name': 'a', 'model_type': 'PrunedSRModel', 'num_gpu': 0, 'datasets': {}, 'path': {}}, 'f.yml',
                   is_train=False)
    with pytest.raises(OptionKeyError, match=r"'f.yml': missing option 'train'"):
        check_required({'name': 'a', 'model_type': 'FMPModel', 'num_gpu': 0, 'datasets': {}, 'path': {}}, 'f.yml')
    with pytest.raises(OptionKeyError, match=r"missing option logger.print_freq .*the file has 'print_frq'"):
        check_required({'name': 'a', 'model_type': 'FMPModel', 'num_gpu': 0, 'datasets': {}, 'path': {},
                        'train': {}, 'logger': {'print_frq': 1, 'save_checkpoint_freq': 1}}, 'f.yml')


def test_closest():
    assert closest('adam', ['Adam', 'SGD']) == "; did you mean 'Adam'?"
    assert closest('zzz', ['Adam', 'SGD']) == ''
