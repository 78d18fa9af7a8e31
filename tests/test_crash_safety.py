"""Crashes, two runs at once, preemption and bad files, through the real commands.

* a corrupt, unsafe or truncated file named under ``path`` (``.pth`` or ``.safetensors``) is refused
  in one line (status 2) by ``fmpsr/train.py`` and ``fmpsr/test.py`` before the earlier run's folder
  is touched;
* a stray file BasicSR would read (``notes.txt``, a truncated PNG) is refused before any folder is
  made; hidden files, which BasicSR skips, are not;
* ``--auto_resume`` falls back past a truncated newest training state and a truncated network
  checkpoint to the newest pair that loads, logs what it skipped, and ends bit for bit where the
  uninterrupted run ended;
* a second run with the name of a live one is refused before it renames or deletes anything;
* SIGTERM during training writes a checkpoint of the last iteration run and exits with 143, and
  ``--auto_resume`` then ends bit for bit where an uninterrupted run ends;
* ``scripts/compare.py`` ends its cells' process groups when it is stopped, and a rerun after the
  runner was SIGKILLed refuses a cell whose training is still alive;
* deterministic mode sets torch's flags after BasicSR turned ``cudnn.benchmark`` on.
"""
import errno
import glob
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys
import time
import uuid

import cv2
import pytest
import torch
import yaml
from conftest import ROOT, SCALE, run, write_options

import fmpsr  # noqa: F401
from fmpsr.data.checks import DataCheckError, check_datasets

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
ENV.pop('FMPSR_TRACEBACK', None)
SHORT = {'pruning.max_prune_iter': 20, 'train.total_iter': 30, 'logger.save_checkpoint_freq': 10,
         'pruning.lambda_c': 8.0}


def experiment(name, *parts):
    return osp.join(ROOT, 'experiments', name, *parts)


def command(script, yml, *extra, check=False, timeout=300):
    """Run an fmpsr script as a subprocess (no check of the status)."""
    return subprocess.run([sys.executable, script, '-opt', str(yml), *extra], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def hooked(record, *args):
    return [sys.executable, osp.join('tests', 'hooked_run.py'), str(record), *[str(a) for a in args]]


def recorded_iters(record):
    path = osp.join(str(record), 'iters.txt')
    if not osp.isfile(path):
        return []
    with open(path) as f:
        return [(int(i), stage, digest) for i, stage, digest in (line.split() for line in f if line.strip())]


def assert_one_line_error(result, *fragments, prog='fmpsr'):
    """Status 2, the last stderr line is ``<prog>: error: ...`` with every fragment, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'{prog}: error: '), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def earlier_run(name):
    """An earlier run's folder with a file in it; returns a function asserting it is untouched."""
    exp = experiment(name)
    os.makedirs(osp.join(exp, 'models'))
    with open(osp.join(exp, 'precious.txt'), 'w') as f:
        f.write('saved earlier')

    def untouched():
        assert sorted(os.listdir(exp)) == ['models', 'precious.txt']
        assert not [d for d in os.listdir(osp.join(ROOT, 'experiments')) if d.startswith(f'{name}_archived')]
    return untouched


def params(path):
    return torch.load(path, weights_only=True)['params']


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- files under path, checked first


def bad_files(tmp_path):
    """A truncated torch file, a torch file that pickles a function (unsafe), a truncated
    safetensors file and one that is no safetensors file at all."""
    from safetensors.torch import save_file
    good = tmp_path / 'good.pth'
    torch.save({'params': {'w': torch.ones(3)}}, good)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:200])
    unsafe = tmp_path / 'unsafe.pth'
    torch.save({'params': {'w': torch.ones(3)}, 'hook': os.getcwd}, unsafe)
    st = tmp_path / 'good.safetensors'
    save_file({'w': torch.ones(64)}, str(st))
    cut = tmp_path / 'cut' / 'net_g.safetensors'
    cut.parent.mkdir()
    cut.write_bytes(st.read_bytes()[:-40])
    garbage = tmp_path / 'garbage' / 'net_g.safetensors'
    garbage.parent.mkdir()
    garbage.write_bytes(b'this is not a safetensors file')
    return {'truncated': (truncated, 'cannot be read'), 'unsafe': (unsafe, 'was refused'),
            'cut': (cut, str(cut)), 'garbage': (garbage, str(garbage))}


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['truncated', 'unsafe', 'cut', 'garbage'])
def test_bad_pretrain_file_is_refused_before_the_earlier_run_is_touched(kind, tmp_path, data, names):
    path, fragment = bad_files(tmp_path)[kind]
    name = names('pytest_badfile')
    untouched = earlier_run(name)
    yml = tmp_path / 'opt.yml'
    write_options(yml, name, data, model_type='PrunedSRModel', total_iter=5,
                  extra={'path.pretrain_network_g': str(path)})
    result = command('fmpsr/train.py', yml)
    assert_one_line_error(result, 'path.pretrain_network_g', str(path), fragment)
    untouched()


@pytest.mark.slow
def test_test_py_refuses_a_corrupt_safetensors_before_touching_results(tmp_path, data, names):
    path, _ = bad_files(tmp_path)['cut']
    name = names('pytest_badtest')
    results = osp.join(ROOT, 'results', name)
    os.makedirs(results)
    open(osp.join(results, 'metrics.json'), 'w').write('{}')
    yml = tmp_path / 'test.yml'
    yml.write_text(yaml.safe_dump({
        'name': name, 'model_type': 'PrunedSRModel', 'scale': SCALE, 'num_gpu': 0,
        'datasets': {'test_1': {'name': 'v', 'type': 'PairedImageDataset', 'dataroot_gt': str(data / 'val/HR'),
                                'dataroot_lq': str(data / 'val/LR'), 'io_backend': {'type': 'disk'}}},
        'path': {'pretrain_network_g': str(path)},
        'val': {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2}}}}))
    result = command('fmpsr/test.py', yml)
    assert_one_line_error(result, 'path.pretrain_network_g', str(path))
    assert os.listdir(results) == ['metrics.json']
    assert not glob.glob(results + '_archived*')


def test_corrupt_weight_masks_are_named(tmp_path, data):
    from fmpsr.data.checks import check_paths
    from fmpsr.compat import CorruptCheckpointError
    files = bad_files(tmp_path)
    with pytest.raises(CorruptCheckpointError, match='path.weight_masks: .*garbage'):
        check_paths({'path': {'weight_masks': str(files['garbage'][0])}})
    # the masks beside an exported net_g.safetensors are checked with it
    export = tmp_path / 'export'
    export.mkdir()
    shutil.copy(tmp_path / 'good.safetensors', export / 'net_g.safetensors')
    shutil.copy(files['garbage'][0], export / 'weight_masks.safetensors')
    with pytest.raises(CorruptCheckpointError, match='weight masks beside path.pretrain_network_g'):
        check_paths({'path': {'pretrain_network_g': str(export / 'net_g.safetensors')}})


# ---------------------------------------------------------------- stray files in data folders


def copy_data(data, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(data, root)
    return root


def data_opt(root):
    return {'scale': SCALE, 'datasets': {'train': {
        'name': 't', 'type': 'PairedImageDataset', 'phase': 'train', 'dataroot_gt': str(root / 'train/HR'),
        'dataroot_lq': str(root / 'train/LR'), 'filename_tmpl': '{}', 'io_backend': {'type': 'disk'}}}}


def test_stray_files_basicsr_would_read_are_refused(tmp_path, data):
    from basicsr.data.data_util import paired_paths_from_folder
    root = copy_data(data, tmp_path)
    (root / 'train/HR/.DS_Store').write_bytes(b'\x00\x01junk')   # hidden: BasicSR skips it
    (root / 'train/LR/.DS_Store').write_bytes(b'\x00\x01junk')
    check_datasets(data_opt(root))
    assert len(paired_paths_from_folder([str(root / 'train/LR'), str(root / 'train/HR')], ['lq', 'gt'], '{}')) == 4
    (root / 'train/LR/notes.txt').write_text('how I made these')
    with pytest.raises(AssertionError):  # what BasicSR itself does with it, after the folder was archived
        paired_paths_from_folder([str(root / 'train/LR'), str(root / 'train/HR')], ['lq', 'gt'], '{}')
    with pytest.raises(DataCheckError, match=r"datasets.train.dataroot_lq: .*train/LR/notes.txt' is not an image"):
        check_datasets(data_opt(root))


def test_truncated_images_are_refused_and_trailing_bytes_are_not(tmp_path, data):
    root = copy_data(data, tmp_path)
    png = root / 'train/HR/img1.png'
    whole = png.read_bytes()
    png.write_bytes(whole + b'\x00' * 7)  # bytes after IEND: libpng / cv2 decode it fine
    assert cv2.imread(str(png)) is not None
    check_datasets(data_opt(root))
    png.write_bytes(whole[:len(whole) * 2 // 3])  # header intact, the end cut off
    with pytest.raises(DataCheckError, match=r"cannot read image .*img1.png'.* truncated"):
        check_datasets(data_opt(root))
    # JPEG: a cut-off file is refused, a whole one passes
    for d in ('HR', 'LR'):
        for png in (root / 'train' / d).glob('*.png'):
            cv2.imwrite(str(png.with_suffix('.jpg')), cv2.imread(str(data / 'train' / d / png.name)))
            png.unlink()
    check_datasets(data_opt(root))
    jpg = root / 'train/LR/img2.jpg'
    jpg.write_bytes(jpg.read_bytes()[:-300])
    with pytest.raises(DataCheckError, match=r"img2.jpg'.* truncated"):
        check_datasets(data_opt(root))


@pytest.mark.slow
def test_train_py_refuses_a_stray_file_before_touching_the_earlier_run(tmp_path, data, names):
    root = copy_data(data, tmp_path)
    (root / 'val/HR/notes.txt').write_text('x')
    name = names('pytest_stray')
    untouched = earlier_run(name)
    yml = tmp_path / 'opt.yml'
    write_options(yml, name, root)
    result = command('fmpsr/train.py', yml)
    assert_one_line_error(result, 'datasets.val.dataroot_gt', 'notes.txt', 'is not an image')
    untouched()


# ---------------------------------------------------------------- --auto_resume falls back


@pytest.mark.slow
def test_auto_resume_falls_back_to_the_newest_pair_that_loads(tmp_path, data, names):
    name = names('pytest_fallback')
    yml = tmp_path / 'opt.yml'
    write_options(yml, name, data, extra=SHORT)
    run(hooked(tmp_path / 'full', 'fmpsr/train.py', '-opt', yml))
    full = recorded_iters(tmp_path / 'full')
    final = params(experiment(name, 'models', 'net_g_latest.pth'))
    states = experiment(name, 'training_states')
    assert sorted(os.listdir(states)) == ['10.state', '20.state', '30.state']
    # the newest state is cut off; the one before it is whole but its network checkpoint is cut off
    for path in (osp.join(states, '30.state'), experiment(name, 'models', 'net_g_20.pth')):
        with open(path, 'rb') as f:
            head = f.read()[:300]
        with open(path, 'wb') as f:
            f.write(head)
    result = run(hooked(tmp_path / 'resumed', 'fmpsr/train.py', '-opt', yml, '--auto_resume'))
    log = result.stdout + result.stderr
    assert f"--auto_resume skipped {osp.join(states, '30.state')}: " in log and 'cannot be read' in log, log[-3000:]
    assert "net_g_20.pth" in log
    assert 'Resuming training from epoch: 0, iter: 10.' in log
    resumed = recorded_iters(tmp_path / 'resumed')
    assert [i for i, _, _ in resumed] == list(range(11, 31))
    assert resumed == full[10:]                          # the same network after every iteration
    assert_same_params(params(experiment(name, 'models', 'net_g_latest.pth')), final)
    assert not glob.glob(experiment(name) + '_archived*')


def test_auto_resume_with_no_loadable_state_is_refused_in_one_line(tmp_path, data, names, capsys, monkeypatch):
    from fmpsr.cli import run_cli
    from fmpsr.compat import load_resume_state
    name = names('pytest_nostate')
    states = experiment(name, 'training_states')
    os.makedirs(states)
    for i in (5, 10):
        with open(osp.join(states, f'{i}.state'), 'wb') as f:
            f.write(b'PK\x03\x04 cut')
    opt = {'name': name, 'auto_resume': True, 'network_g': {'type': 'LSRB'},
           'path': {'experiments_root': experiment(name), 'models': experiment(name, 'models')}}
    monkeypatch.delenv('FMPSR_TRACEBACK', raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: load_resume_state(opt), argv=[])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count('\n') == 1
    assert 'none of the 2 training state(s)' in err and '10.state' in err and '5.state' in err
    assert sorted(os.listdir(states)) == ['10.state', '5.state']


# ---------------------------------------------------------------- one run per name


def test_run_lock_is_exclusive_and_survives_sigkill_of_its_holder(tmp_path):
    from fmpsr import run_lock
    folder = tmp_path / 'experiments' / 'x'
    holder = subprocess.Popen([sys.executable, '-c', (
        'import sys, time; from fmpsr import run_lock; '
        f'run_lock.acquire({str(folder)!r}); print("held", flush=True); time.sleep(600)')],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        assert run_lock.is_locked(str(folder))
        with pytest.raises(run_lock.RunLockedError, match=f'pid {holder.pid} '):
            run_lock.acquire(str(folder))
    finally:
        holder.kill()
        holder.wait()
    assert osp.isfile(run_lock.lock_path(str(folder)))   # left by the killed holder, but not held
    assert not run_lock.is_locked(str(folder))
    path = run_lock.acquire(str(folder))
    assert run_lock.is_locked(str(folder))  # flock is per open file: held against this process's other opens too
    run_lock.release(path)
    assert not osp.exists(path)



def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path):
    """flock belongs to the open file, which a fork shares: a child (a DataLoader worker) that outlives
    its SIGKILLed parent must not keep the run locked."""
    from fmpsr import run_lock
    folder = tmp_path / 'experiments' / 'x'
    holder = subprocess.Popen([sys.executable, '-c', (
        'import os, sys, time; from fmpsr import run_lock; '
        f'run_lock.acquire({str(folder)!r}); pid = os.fork()\n'
        'if pid == 0:\n    time.sleep(600)\n'
        'print(pid, flush=True); time.sleep(600)')],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(holder.stdout.readline())
        assert run_lock.is_locked(str(folder))
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child still lives
        assert not run_lock.is_locked(str(folder))
    finally:
        holder.kill()
        if child:
            os.kill(child, signal.SIGKILL)

@pytest.mark.slow
def test_a_second_run_with_the_same_name_is_refused(tmp_path, data, names):
    from fmpsr import run_lock
    name = names('pytest_locked')
    untouched = earlier_run(name)
    stale = experiment(name, 'models', '.net_g_10.pth.abc.tmp')  # --auto_resume would delete it
    open(stale, 'w').close()
    yml = tmp_path / 'opt.yml'
    write_options(yml, name, data)
    path = run_lock.acquire(experiment(name))  # this test process is the live run
    try:
        for extra in ([], ['--auto_resume']):
            result = command('fmpsr/train.py', yml, *extra)
            assert_one_line_error(result, f"experiment '{name}' is in use by another run", f'pid {os.getpid()} ')
            assert osp.isfile(stale)
            os.remove(stale)
            untouched()
            open(stale, 'w').close()
    finally:
        run_lock.release(path)
        os.remove(stale)


# ---------------------------------------------------------------- SIGTERM


def start_and_signal(args, record, after_iter, signum=signal.SIGTERM, timeout=300):
    """Start ``args`` (a hooked run), send ``signum`` once it recorded iteration ``after_iter``, wait."""
    log_path = osp.join(str(record), 'run.log')
    os.makedirs(str(record), exist_ok=True)
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not any(i >= after_iter for i, _, _ in recorded_iters(record)):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f'the run ended before iteration {after_iter}:\n' + open(log_path).read()[-3000:])
            time.sleep(0.05)
        proc.send_signal(signum)
        status = proc.wait(timeout=timeout)
    return status, open(log_path).read()


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_auto_resume_ends_where_an_uninterrupted_run_ends(tmp_path, data, names):
    extra = dict(SHORT, **{'logger.save_checkpoint_freq': 1000, 'train.total_iter': 40,
                           'datasets.train.num_worker_per_gpu': 1})
    ref_name, name = names('pytest_term_ref'), names('pytest_term')
    write_options(tmp_path / 'ref.yml', ref_name, data, extra=extra)
    run(hooked(tmp_path / 'ref', 'fmpsr/train.py', '-opt', tmp_path / 'ref.yml'))
    reference = recorded_iters(tmp_path / 'ref')
    yml = tmp_path / 'term.yml'
    write_options(yml, name, data, extra=extra)
    status, log = start_and_signal(hooked(tmp_path / 'term', 'fmpsr/train.py', '-opt', yml), tmp_path / 'term', 3)
    assert status == 143, log[-3000:]
    done = recorded_iters(tmp_path / 'term')
    last = done[-1][0]
    assert [i for i, _, _ in done] == list(range(1, last + 1)) and last < 40
    assert done == reference[:last]
    # the checkpoint of the last iteration run, written by the model's own save (nothing else)
    assert os.listdir(experiment(name, 'training_states')) == [f'{last}.state']
    assert sorted(os.listdir(experiment(name, 'models'))) == [f'net_g_{last}.pth']
    assert torch.load(experiment(name, 'training_states', f'{last}.state'), weights_only=True)['iter'] == last
    assert f'saving models and training states at iteration {last}' in log
    assert f'fmpsr: stopped by signal SIGTERM after iteration {last}' in log
    result = run(hooked(tmp_path / 'resumed', 'fmpsr/train.py', '-opt', yml, '--auto_resume'))
    assert f'Resuming training from epoch: 0, iter: {last}.' in result.stdout + result.stderr
    resumed = recorded_iters(tmp_path / 'resumed')
    assert [i for i, _, _ in resumed] == list(range(last + 1, 41))
    assert resumed == reference[last:]                  # the same network as the uninterrupted run, bit for bit
    assert_same_params(params(experiment(name, 'models', 'net_g_latest.pth')),
                       params(experiment(ref_name, 'models', 'net_g_latest.pth')))


# ---------------------------------------------------------------- deterministic mode


def test_deterministic_mode_sets_the_flags_after_basicsr(monkeypatch, tmp_path, data, names):
    import basicsr.train

    from fmpsr import pipeline, run_control
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', True)
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', False)
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        # the option on the command line reaches the options (BasicSR's parser does not know it)
        yml = tmp_path / 'opt.yml'
        write_options(yml, names('pytest_det'), data)
        monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(yml), '--deterministic'])
        opt, _ = basicsr.train.parse_options(ROOT, is_train=True)
        assert opt['deterministic'] is True and '--deterministic' in sys.argv
        torch.backends.cudnn.benchmark = True  # what BasicSR's train_pipeline does after parsing
        built = pipeline._build_model(lambda o: 'model')({'deterministic': True, 'is_train': False})
        assert built == 'model'
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
        run_control.apply_deterministic({'deterministic': 'warn'})
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        with pytest.raises(ValueError, match="deterministic: must be true, false or 'warn'"):
            run_control.check_deterministic({'deterministic': 'yes please'})
        torch.backends.cudnn.benchmark = True
        assert not run_control.apply_deterministic({})  # off by default: BasicSR's benchmark stays on
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_is_one_line(capsys, monkeypatch):
    from fmpsr.cli import run_cli
    monkeypatch.delenv('FMPSR_TRACEBACK', raising=False)

    def main():
        raise OSError(errno.ENOSPC, 'No space left on device', 'experiments/x/models/net_g_10.pth')
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv=[])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count('\n') == 1
    assert err.startswith('fmpsr: error: ') and 'No space left on device' in err and 'net_g_10.pth' in err


# ---------------------------------------------------------------- the compare runner and its cells


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def long_preset(tmp_path, data, name):
    """options/compare/tiny.yml with one FMP cell that trains far longer than the test waits."""
    preset = yaml.safe_load(open(osp.join(ROOT, 'options', 'compare', 'tiny.yml')))
    preset.update(name=name, jobs=1, scratch=None)
    preset['budget']['targets'] = [0.7]
    preset['methods'] = {'FMP': preset['methods']['FMP']}
    preset['train']['total_iter'] = 5000
    preset['logger'] = {'print_freq': 2, 'save_checkpoint_freq': 1000}
    preset['datasets']['train'].update(dataroot_gt=str(data / 'train/HR'), dataroot_lq=str(data / 'train/LR'))
    preset['datasets']['test'] = {'v': {'dataroot_gt': str(data / 'val/HR'), 'dataroot_lq': str(data / 'val/LR')}}
    path = tmp_path / f'{name}.yml'
    path.write_text(yaml.safe_dump(preset))
    return str(path)


def start_compare(preset, train_log, timeout=300):
    """Start scripts/compare.py and wait until its cell's train.py has logged a training iteration."""
    proc = subprocess.Popen([sys.executable, 'scripts/compare.py', '-opt', preset, '--grace', '120'], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    start = osp.getsize(train_log) if osp.isfile(train_log) else 0  # an earlier run's lines do not count
    deadline = time.monotonic() + timeout
    while not (osp.isfile(train_log) and ', iter:' in open(train_log).read()[start:]):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f'no training iteration logged:\n{out[-2000:]}\n{err[-2000:]}\n'
                        + (open(train_log).read()[-3000:] if osp.isfile(train_log) else ''))
        time.sleep(0.1)
    return proc


@pytest.mark.slow
def test_compare_ends_its_cells_and_a_rerun_refuses_a_cell_still_running(tmp_path, data):
    from fmpsr import run_lock
    name = f'crash_{uuid.uuid4().hex[:6]}'
    preset = long_preset(tmp_path, data, name)
    exp = experiment(f'cmp_{name}_FMP-params0.7-s0')
    train_log = osp.join(ROOT, 'results', 'compare', name, 'logs', 'FMP-params0.7-s0.train.log')
    child = None
    try:
        # SIGKILL of the runner: its cell keeps running (nothing could end it) ...
        runner = start_compare(preset, train_log)
        child = int(run_lock.owner(run_lock.lock_path(exp)).split()[1])
        assert child != runner.pid and os.getpgid(child) == child  # the cell leads its own process group
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        assert alive(child)
        # ... and a rerun refuses to train it a second time, in one line, leaving it running
        rerun = subprocess.run([sys.executable, 'scripts/compare.py', '-opt', preset], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=180)
        assert_one_line_error(rerun, 'FMP-params0.7-s0: its training is still running in another process',
                              f'pid {child} ', prog='compare')
        assert alive(child) and not glob.glob(exp + '_archived*')
        os.killpg(child, signal.SIGTERM)  # what the killed runner would have done
        for _ in range(1200):
            if not alive(child):
                break
            time.sleep(0.1)
        assert not alive(child)
        child = None
        # SIGTERM to the runner: it ends its running cell's process group, which saves a checkpoint
        runner = start_compare(preset, train_log)
        child = int(run_lock.owner(run_lock.lock_path(exp)).split()[1])
        runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=180)
        assert runner.returncode == 143, err[-3000:]
        assert err.strip().splitlines()[-1].startswith('compare: stopped by SIGTERM: ended 1 running cell(s)')
        assert not alive(child)
        child = None
        stopped = [line for line in open(train_log) if line.startswith('fmpsr: stopped by signal SIGTERM after iteration')]
        assert len(stopped) == 2, open(train_log).read()[-3000:]  # both cells' train.py stopped cleanly
        last = int(stopped[-1].split('after iteration ')[1].split(':')[0])
        assert f'{last}.state' in os.listdir(osp.join(exp, 'training_states'))
    finally:
        if child is not None and alive(child):
            os.killpg(child, signal.SIGKILL)
        shutil.rmtree(osp.join(ROOT, 'results', 'compare', name), ignore_errors=True)
        for folder in glob.glob(osp.join(ROOT, 'experiments', f'cmp_{name}_*')):
            shutil.rmtree(folder, ignore_errors=True)
        for path in glob.glob(osp.join(ROOT, '*', f'.cmp_{name}_*.lock')):  # left by a SIGKILLed holder
            os.remove(path)


def test_compare_errors_are_one_line_with_status_2(tmp_path, data):
    preset = yaml.safe_load(open(osp.join(ROOT, 'options', 'compare', 'tiny.yml')))
    preset['methods'] = {'NoSuchMethod': {}}
    preset['datasets']['train'].update(dataroot_gt=str(data / 'train/HR'), dataroot_lq=str(data / 'train/LR'))
    preset['datasets']['test'] = {'v': {'dataroot_gt': str(data / 'val/HR'), 'dataroot_lq': str(data / 'val/LR')}}
    path = tmp_path / 'bad.yml'
    path.write_text(yaml.safe_dump(preset))
    result = subprocess.run([sys.executable, 'scripts/compare.py', '-opt', str(path)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, 'NoSuchMethod', prog='compare')
