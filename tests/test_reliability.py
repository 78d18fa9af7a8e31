"""Pruning that survives crashes, many processes and bad input.

Real subprocesses of fmpsr/train.py on a tiny LSRB: a run killed with SIGKILL and resumed with
--auto_resume must end exactly where an uninterrupted run with the same seed ends; two gloo ranks
must agree bit for bit and match one process with the same global batch. Bad options and data
fail before anything is written, with the key / folder / file in the message.
"""
import os
import os.path as osp
import pickle
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, SCALE, run, write_options
from safetensors.torch import load_file

import fmpsr  # noqa: F401
from fmpsr.data.checks import DataCheckError, check_datasets
from fmpsr.pipeline import check_options
from fmpsr.pruning.export import atomic_write

RESUME_EXTRA = {'pruning.lambda_c': 8.0, 'pruning.max_prune_iter': 30, 'train.total_iter': 45,
                'logger.save_checkpoint_freq': 10, 'datasets.train.num_worker_per_gpu': 1}


def final_state(name):
    """(network_g, masks, params of net_g_latest) of a finished run."""
    exp = osp.join(ROOT, 'experiments', name)
    with open(osp.join(exp, 'export', 'network_g.yml')) as f:
        network_opt = yaml.safe_load(f)
    masks = load_file(osp.join(exp, 'export', 'weight_masks.safetensors'))
    params = torch.load(osp.join(exp, 'models', 'net_g_latest.pth'), weights_only=True)['params']
    return network_opt, masks, params


def assert_same_result(a, b, max_abs=0.0, most_within=0.0):
    """Identical widths and masks; every parameter within ``max_abs`` and 99.9 % within
    ``most_within`` (both 0: bit-identical)."""
    (opt_a, masks_a, params_a), (opt_b, masks_b, params_b) = a, b
    assert opt_a == opt_b                                   # identical widths
    assert masks_a.keys() == masks_b.keys()
    for key in masks_a:
        assert torch.equal(masks_a[key], masks_b[key]), key  # identical masks
    assert params_a.keys() == params_b.keys()
    diff = torch.cat([(params_a[k] - params_b[k]).abs().flatten() for k in params_a])
    assert float(diff.max()) <= max_abs, f'max |difference| {float(diff.max()):.3e} > {max_abs}'
    assert float((diff > most_within).float().mean()) <= (1e-3 if most_within else 0.0)


@pytest.fixture(scope='module')
def reference(data, names, tmp_path_factory):
    """An uninterrupted run (the result a resumed run must reproduce)."""
    name = names('pytest_ref')
    yml = tmp_path_factory.mktemp('ref') / 'ref.yml'
    write_options(yml, name, data, extra=RESUME_EXTRA)
    run([sys.executable, 'fmpsr/train.py', '-opt', str(yml)])
    with open(osp.join(ROOT, 'experiments', name, 'export', 'pruning.json')) as f:
        switch_iter = yaml.safe_load(f)['switch_iter']
    return {'name': name, 'switch_iter': switch_iter, 'result': final_state(name)}


def kill_when(args, exists, timeout=240):
    """Start ``args``; SIGKILL it as soon as the file ``exists`` appears. Returns True if it was killed."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if osp.exists(exists):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.kill()
    return False


def last_state(name):
    folder = osp.join(ROOT, 'experiments', name, 'training_states')
    latest = max(int(f.split('.')[0]) for f in os.listdir(folder) if f.endswith('.state'))
    return torch.load(osp.join(folder, f'{latest}.state'), weights_only=True)


def kill_then_resume(name, data, tmp_path, watched):
    """Run, SIGKILL as soon as ``watched`` (relative to the experiment folder) exists, check the
    state it left, resume with --auto_resume to the end. Returns the last state before the resume."""
    yml = tmp_path / 'kill.yml'
    write_options(yml, name, data, extra=RESUME_EXTRA)
    args = [sys.executable, 'fmpsr/train.py', '-opt', str(yml), '--auto_resume']
    assert kill_when(args, osp.join(ROOT, 'experiments', name, watched)), 'the run ended before the kill'
    state = last_state(name)
    run(args)
    return state


def test_resume_after_sigkill_in_the_pruning_stage(reference, data, names, tmp_path):
    assert reference['switch_iter'] > 10, 'the tiny run must still be pruning at iteration 10'
    name = names('pytest_kill_prune')
    state = kill_then_resume(name, data, tmp_path, osp.join('training_states', '10.state'))
    assert state['fmp']['stage'] == 'prune' and state['iter'] < reference['switch_iter']
    assert_same_result(final_state(name), reference['result'])


def test_resume_after_sigkill_just_after_the_stage_switch(reference, data, names, tmp_path):
    name = names('pytest_kill_switch')
    state = kill_then_resume(name, data, tmp_path, osp.join('export', 'pruning.json'))
    assert state['fmp']['stage'] == 'finetune' and state['iter'] == reference['switch_iter']
    assert_same_result(final_state(name), reference['result'])


def test_two_gloo_ranks_agree_and_match_one_process(data, names, tmp_path):
    extra = {'pruning.max_prune_iter': 20, 'train.total_iter': 30, 'datasets.train.num_worker_per_gpu': 0}
    single, ddp = names('pytest_single'), names('pytest_ddp2')
    write_options(tmp_path / 'single.yml', single, data, extra=dict(extra, **{'datasets.train.batch_size_per_gpu': 2}))
    write_options(tmp_path / 'ddp.yml', ddp, data, extra=dict(extra, **{'datasets.train.batch_size_per_gpu': 1}))
    run([sys.executable, 'fmpsr/train.py', '-opt', str(tmp_path / 'single.yml')])
    result = run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29541',
                  'fmpsr/train.py', '-opt', str(tmp_path / 'ddp.yml'), '--launcher', 'pytorch'], timeout=400)
    log = open(next(osp.join(ROOT, 'experiments', ddp, f) for f in os.listdir(osp.join(ROOT, 'experiments', ddp))
                    if f.startswith('train_') and f.endswith('.log'))).read()
    assert 'all 2 ranks agree bit for bit' in log, result.stdout[-2000:]
    # Same global batch (2 x 1 vs 1 x 2) and the same samples: identical masks and widths. Parameters
    # differ only by the order of floating-point sums, which Adam's per-parameter normalisation can
    # turn into an lr-sized step where a gradient is near zero. Tolerance: every parameter within one
    # learning rate (1e-3), 99.9 % within 1e-4 (measured: max 3e-4, median 1e-7 after 30 iterations).
    assert_same_result(final_state(ddp), final_state(single), max_abs=1e-3, most_within=1e-4)


# ---------------------------------------------------------------- checkpoints


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'net_g_10.pth'
    torch.save({'params': {'w': torch.ones(3)}}, path)

    def crash(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'half a checkpoint')
        raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'):
        atomic_write(str(path), crash)
    assert torch.equal(torch.load(path, weights_only=True)['params']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['net_g_10.pth']  # no temporary file left behind


class Exploit:
    def __reduce__(self):
        return (os.system, (f'touch {Exploit.marker}',))


def test_checkpoints_never_execute_code(tmp_path):
    from fmpsr.compat import load_resume_state
    from fmpsr.models.pruned_sr_model import load_checkpoint
    Exploit.marker = str(tmp_path / 'pwned')
    evil = tmp_path / 'net_g_5.pth'
    with open(evil, 'wb') as f:
        pickle.dump({'params': Exploit()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(str(evil))
    with pytest.raises(pickle.UnpicklingError):
        load_resume_state({'auto_resume': False, 'path': {'resume_state': str(evil)}})
    assert not osp.exists(Exploit.marker)


# ---------------------------------------------------------------- bad options


def parsed(tmp_path, data, **extra):
    """The dict BasicSR's parse_options would give for a tiny FMP option file."""
    opt = write_options(tmp_path / 'opt.yml', 'pytest_bad', data, extra=extra)
    opt['is_train'] = True
    for phase, dataset in opt['datasets'].items():
        dataset['phase'], dataset['scale'] = phase.split('_')[0], opt['scale']
    return opt


@pytest.mark.parametrize('extra, message', [
    ({'pruning.gama_c': 0.3}, "unknown key(s) ['gama_c']"),
    ({'pruning.metric': 'latency'}, "unknown metric 'latency'"),
    ({'pruning.criterion': 'totall'}, "unknown criterion 'totall'"),
    ({'pruning.weight_reg': 'l0'}, "unknown regulariser 'l0'"),
    ({'pruning.gamma_c': 1.2}, 'pruning.gamma_c must be a fraction in [0, 1)'),
    ({'pruning.gamma_w': -0.1}, 'pruning.gamma_w must be a fraction in [0, 1)'),
    ({'pruning.gamma_c': 0.7, 'pruning.gamma_w': 0.3}, 'gamma_c + pruning.gamma_w must be < 1'),
    ({'network_g.upscale': 3}, 'network_g.upscale (3) differs from scale (2)'),
    ({'datasets.train.gt_size': 28}, 'ESA needs at least 15'),
    ({'pruning.max_prune_iter': 40}, 'must be below train.total_iter'),
    ({'train.finetune': {'optim': {}}}, "train.finetune: unknown key(s) ['optim']"),
])
def test_bad_options_are_named(tmp_path, data, extra, message):
    opt = parsed(tmp_path, data, **extra)
    with pytest.raises(ValueError) as error:
        check_options(opt)
    assert message in str(error.value)


def test_bad_option_stops_train_py_before_touching_the_experiment_folder(tmp_path, data, names):
    name = names('pytest_badopt')
    yml = tmp_path / 'bad.yml'
    write_options(yml, name, data, extra={'pruning.lamda_c': 0.1})
    exp = osp.join(ROOT, 'experiments', name)
    os.makedirs(exp)
    with open(osp.join(exp, 'precious.txt'), 'w') as f:
        f.write('saved earlier')
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    result = subprocess.run([sys.executable, 'fmpsr/train.py', '-opt', str(yml)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown key(s) ['lamda_c']" in result.stderr
    assert os.listdir(exp) == ['precious.txt']  # not renamed to *_archived_*, nothing written
    assert not [d for d in os.listdir(osp.join(ROOT, 'experiments')) if d.startswith(f'{name}_archived')]


# ---------------------------------------------------------------- bad data


def copy_data(data, tmp_path):
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(data, root)
    return root


def data_opt(root, **extra):
    opt = {'scale': SCALE, 'datasets': {'train': {
        'name': 't', 'type': 'PairedImageDataset', 'phase': 'train', 'dataroot_gt': str(root / 'train/HR'),
        'dataroot_lq': str(root / 'train/LR'), 'filename_tmpl': '{}', 'io_backend': {'type': 'disk'}}}}
    opt['datasets']['train'].update(extra)
    return opt


def test_missing_and_empty_folders_are_named(tmp_path, data):
    root = copy_data(data, tmp_path)
    with pytest.raises(DataCheckError, match="datasets.train.dataroot_gt: folder .*nowhere.* does not exist"):
        check_datasets(data_opt(root, dataroot_gt=str(root / 'nowhere')))
    (root / 'empty').mkdir()
    with pytest.raises(DataCheckError, match="datasets.train.dataroot_lq: folder .*empty.* holds no images"):
        check_datasets(data_opt(root, dataroot_lq=str(root / 'empty')))


def test_unpaired_names_and_wrong_sizes_are_named(tmp_path, data):
    root = copy_data(data, tmp_path)
    os.rename(root / 'train/LR/img3.png', root / 'train/LR/img9.png')
    with pytest.raises(DataCheckError, match=r"img3\.png.*img9\.png"):
        check_datasets(data_opt(root))
    os.rename(root / 'train/LR/img9.png', root / 'train/LR/img3.png')
    cv2.imwrite(str(root / 'train/LR/img1.png'), np.zeros((30, 48, 3), np.uint8))  # should be 48x48 at x2
    with pytest.raises(DataCheckError, match=r"img1\.png.*is 96x96.*48x30.*must be 96x60"):
        check_datasets(data_opt(root))


def test_validation_gt_may_be_larger_than_scale_times_lq(tmp_path, data):
    root = copy_data(data, tmp_path)
    hr = cv2.imread(str(root / 'val/HR/img0.png'))
    cv2.imwrite(str(root / 'val/HR/img0.png'), np.pad(hr, ((0, 1), (0, 1), (0, 0))))  # 65x65 over a 32x32 LQ
    val = {'name': 'v', 'type': 'PairedImageDataset', 'phase': 'val', 'dataroot_gt': str(root / 'val/HR'),
           'dataroot_lq': str(root / 'val/LR'), 'io_backend': {'type': 'disk'}}
    check_datasets({'scale': SCALE, 'datasets': {'val': val}})
    with pytest.raises(DataCheckError, match='img0.png'):
        check_datasets({'scale': SCALE, 'datasets': {'train': dict(val, phase='train')}})


def test_lmdb_with_different_keys_is_named(tmp_path, data):
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    root = copy_data(data, tmp_path)
    for d, names in (('HR', ['img0', 'img1', 'img2']), ('LR', ['img0', 'img1', 'img3'])):
        make_lmdb_from_imgs(str(root / 'train' / d), str(root / f'{d}.lmdb'), [f'{n}.png' for n in names], names)
    opt = data_opt(root, dataroot_gt=str(root / 'HR.lmdb'), dataroot_lq=str(root / 'LR.lmdb'),
                   io_backend={'type': 'lmdb'})
    with pytest.raises(DataCheckError, match=r"LMDB keys differ.*\['img2'\].*\['img3'\]"):
        check_datasets(opt)


def test_unreadable_images_are_named(tmp_path, data):
    from basicsr.data import build_dataset

    from fmpsr.data.sampling import SampleKey, SeededDataset
    root = copy_data(data, tmp_path)
    (root / 'train/HR/img2.png').write_bytes(b'not an image at all')
    with pytest.raises(DataCheckError, match=r"cannot read image .*img2\.png"):
        check_datasets(data_opt(root))
    # a file whose header is intact but whose data is cut off is found when it is loaded
    good = (root / 'train/LR/img2.png').read_bytes()
    cv2.imwrite(str(root / 'train/HR/img2.png'), cv2.imread(str(data / 'train/HR/img2.png')))
    (root / 'train/LR/img2.png').write_bytes(good[:len(good) // 3])
    dataset_opt = dict(data_opt(root)['datasets']['train'], gt_size=32, use_hflip=False, use_rot=False, scale=SCALE)
    dataset = SeededDataset(build_dataset(dataset_opt), seed=0)
    index = next(i for i, p in enumerate(dataset.paths) if p['lq_path'].endswith('img2.png'))
    with pytest.raises(RuntimeError, match=r"cannot load training pair .*img2\.png"):
        dataset[SampleKey(0, index)]


def test_grayscale_and_rgba_images_are_converted(tmp_path, data):
    from basicsr.data import build_dataset
    root = copy_data(data, tmp_path)
    gray = cv2.cvtColor(cv2.imread(str(root / 'train/HR/img0.png')), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(root / 'train/HR/img0.png'), gray)
    rgba = cv2.cvtColor(cv2.imread(str(root / 'train/LR/img0.png')), cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(root / 'train/LR/img0.png'), rgba)
    check_datasets(data_opt(root))
    dataset_opt = dict(data_opt(root)['datasets']['train'], gt_size=32, use_hflip=False, use_rot=False, scale=SCALE)
    dataset = build_dataset(dataset_opt)
    index = next(i for i, p in enumerate(dataset.paths) if p['gt_path'].endswith('img0.png'))
    item = dataset[index]
    assert item['gt'].shape == (3, 32, 32) and item['lq'].shape == (3, 16, 16)


# ---------------------------------------------------------------- NaN loss, unreachable target


def in_process_model(tmp_path, data, **extra):
    from basicsr.models import build_model
    opt = parsed(tmp_path, data, **extra)
    exp = tmp_path / 'exp'
    opt.update(dist=False, rank=0, world_size=1, num_gpu=0, root_path=str(tmp_path), auto_resume=False)
    opt['path'].update(experiments_root=str(exp), models=str(exp / 'models'),
                       training_states=str(exp / 'training_states'), log=str(exp), visualization=str(exp / 'vis'))
    opt['logger']['use_tb_logger'] = False
    torch.manual_seed(0)
    return build_model(opt), exp


def test_nan_loss_stops_before_the_weights_change(tmp_path, data):
    model, _ = in_process_model(tmp_path, data)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    lq = torch.rand(2, 3, 16, 16)
    lq[0, 0, 3, 3] = float('nan')
    model.feed_data({'lq': lq, 'gt': torch.rand(2, 3, 32, 32)})
    with pytest.raises(FloatingPointError, match='loss is nan at iteration 7'):
        model.optimize_parameters(7)
    after = model.net_g.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unreachable_target_ends_at_the_cap_and_keeps_what_it_has(tmp_path, data):
    model, exp = in_process_model(tmp_path, data, **{'pruning.lambda_c': 0.0, 'pruning.lambda_w': 0.0,
                                                     'pruning.max_prune_iter': 6, 'pruning.check_freq': 3})
    for it in range(1, 7):
        model.feed_data({'lq': torch.rand(2, 3, 16, 16), 'gt': torch.rand(2, 3, 32, 32)})
        model.optimize_parameters(it)
    assert model.stage == 'finetune' and model.switch_iter == 6
    assert model.final_ratios['converged'] is False
    with open(exp / 'export' / 'pruning.json') as f:
        info = yaml.safe_load(f)
    assert info['ratios']['converged'] is False and info['network_g']['num_feat'] == 12


def test_finetune_model_resumes_exactly_after_sigkill(reference, data, names, tmp_path):
    """PrunedSRModel (fine-tuning an export) resumes to the same result as an uninterrupted run."""
    export = osp.join(ROOT, 'experiments', reference['name'], 'export', 'net_g.safetensors')
    extra = {'path.pretrain_network_g': export, 'train.total_iter': 30, 'logger.save_checkpoint_freq': 10,
             'datasets.train.num_worker_per_gpu': 1}
    results = {}
    for kind in ('uninterrupted', 'killed'):
        name = names(f'pytest_ft_{kind}')
        yml = tmp_path / f'{kind}.yml'
        write_options(yml, name, data, model_type='PrunedSRModel', extra=extra)
        args = [sys.executable, 'fmpsr/train.py', '-opt', str(yml), '--auto_resume']
        if kind == 'killed':
            assert kill_when(args, osp.join(ROOT, 'experiments', name, 'training_states', '10.state'))
        run(args)
        checkpoint = torch.load(osp.join(ROOT, 'experiments', name, 'models', 'net_g_latest.pth'), weights_only=True)
        results[kind] = checkpoint
    a, b = results['uninterrupted'], results['killed']
    assert a['fmp_compact']['network_g'] == b['fmp_compact']['network_g']
    for key in a['params']:
        assert torch.equal(a['params'][key], b['params'][key]), key


def test_slurm_launcher_initialises_without_cuda(tmp_path):
    """--launcher slurm's set-up (fmpsr.compat.init_dist) on a CPU machine: gloo, one task."""
    script = ("import fmpsr, torch.distributed as dist\n"
              "from fmpsr.compat import init_dist\n"
              "init_dist('slurm', backend='nccl', port=29561)\n"
              "print('backend', dist.get_backend(), 'rank', dist.get_rank(), 'world', dist.get_world_size())\n")
    env = dict(os.environ, SLURM_PROCID='0', SLURM_NTASKS='1', SLURM_NODELIST='localhost',
               MASTER_ADDR='127.0.0.1', PYTHONWARNINGS='ignore', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'backend gloo rank 0 world 1' in result.stdout
