"""Errors a user can read (fmpsr/cli.py): bad input ends with one line ``fmpsr: error: ...`` and exit
status 2, naming the key / file / value; ``--debug`` or ``FMPSR_TRACEBACK=1`` shows the traceback; a
file named in the option file is checked before any experiment or results folder is made or renamed."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, SCALE, assert_one_line_error, write_options

import fmpsr  # noqa: F401
from fmpsr.cli import error_message, run_cli
from fmpsr.data.checks import DataCheckError
from fmpsr.pipeline import check_options


def parsed(tmp_path, data, model_type='FMPModel', **extra):
    """The dict BasicSR's parse_options would give for a tiny option file."""
    opt = write_options(tmp_path / 'opt.yml', 'pytest_err', data, model_type=model_type, extra=extra)
    opt.update(is_train=True, auto_resume=False)
    for phase, dataset in opt['datasets'].items():
        dataset['phase'], dataset['scale'] = phase.split('_')[0], opt['scale']
    opt['path']['experiments_root'] = str(tmp_path / 'experiments' / 'pytest_err')
    return opt


def cli(main, capsys, argv=(), **kwargs):
    """Run ``main`` under run_cli; (exit status, stderr)."""
    with pytest.raises(SystemExit) as done:
        run_cli(main, argv=list(argv), **kwargs)
    return done.value.code, capsys.readouterr().err


# ---------------------------------------------------------------- run_cli


def test_an_fmpsr_check_ends_with_one_line_and_status_2(tmp_path, data, capsys, monkeypatch):
    monkeypatch.delenv('FMPSR_TRACEBACK', raising=False)
    opt = parsed(tmp_path, data, **{'pruning.gama_c': 0.3})
    status, err = cli(lambda: check_options(opt), capsys)
    assert status == 2
    assert err.count('\n') == 1 and err.startswith("fmpsr: error: pruning: unknown key(s) ['gama_c']")
    assert 'Traceback' not in err and 'known keys are' in err  # what would be valid


def test_errors_raised_outside_fmpsr_say_what_and_where(capsys, monkeypatch):
    monkeypatch.delenv('FMPSR_TRACEBACK', raising=False)
    status, err = cli(lambda: {}['datasets'], capsys)
    assert status == 2 and err.count('\n') == 1
    assert err.startswith("fmpsr: error: missing option or entry 'datasets' (KeyError at ")
    assert 'test_errors.py:' in err and err.rstrip().endswith('; FMPSR_TRACEBACK=1 shows the traceback)')
    assert '--debug' not in err   # the data and deploy scripts have no --debug


def test_ordinary_errors_raised_outside_fmpsr_are_their_message_alone(capsys, monkeypatch):
    """A ValueError / OSError with a sentence of its own (BasicSR's, torch's) is not dressed up as a crash."""
    monkeypatch.delenv('FMPSR_TRACEBACK', raising=False)
    status, err = cli(lambda: int('x7'), capsys)
    assert (status, err) == (2, "fmpsr: error: invalid literal for int() with base 10: 'x7'\n")
    status, err = cli(lambda: open('/nowhere/at/all.png'), capsys)
    assert (status, err) == (2, "fmpsr: error: [Errno 2] No such file or directory: '/nowhere/at/all.png'\n")


@pytest.mark.slow
def test_the_traceback_hint_holds_for_a_data_script(tmp_path):
    """FMPSR_TRACEBACK=1 shows the traceback for scripts that have no --debug (and reject it)."""
    args = ['scripts/data/check_pairs.py', '--gt', str(tmp_path / 'noHR'), '--lq', str(tmp_path / 'noLR'), '--scale', '2']
    plain = run_failing(args)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    shown = run_failing(args, FMPSR_TRACEBACK='1')
    assert shown.returncode == 1 and 'Traceback (most recent call last)' in shown.stderr, shown.stderr


def test_a_dataloader_worker_error_keeps_its_own_message():
    error = RuntimeError('Caught DataLoadError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                         'last):\n  File "x.py", line 1, in f\nfmpsr.data.sampling.DataLoadError: cannot load training '
                         "pair 2: gt: a.png, lq: b.png")
    assert error_message(error) == ('fmpsr.data.sampling.DataLoadError: cannot load training pair 2: gt: a.png, '
                                    'lq: b.png')


def test_bugs_keep_their_traceback(capsys):
    with pytest.raises(TypeError):
        run_cli(lambda: len(3), argv=[])


@pytest.mark.parametrize('argv, env', [(['--debug'], None), ([], '1')])
def test_debug_or_the_environment_variable_shows_the_traceback(argv, env, monkeypatch):
    if env is None:
        monkeypatch.delenv('FMPSR_TRACEBACK', raising=False)
    else:
        monkeypatch.setenv('FMPSR_TRACEBACK', env)
    with pytest.raises(ValueError, match='bad value'):
        run_cli(lambda: (_ for _ in ()).throw(ValueError('bad value')), argv=argv)


def test_exit_status(capsys):
    assert cli(lambda: 1, capsys)[0] == 0                        # a script's return value is not a status
    assert cli(lambda: 1, capsys, use_return_code=True)[0] == 1  # unless asked (scripts/demo.py)
    assert cli(lambda: [1, 2], capsys, use_return_code=True)[0] == 0


def test_bad_yaml_and_missing_option_file_are_one_line(tmp_path, capsys, monkeypatch):
    import basicsr.train
    monkeypatch.delenv('FMPSR_TRACEBACK', raising=False)
    bad = tmp_path / 'bad.yml'
    bad.write_text('name: x\n  model_type: [FMPModel\n')
    for path, expected in ((bad, str(bad)), (tmp_path / 'nowhere.yml', 'nowhere.yml')):
        monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(path)])
        status, err = cli(lambda: basicsr.train.parse_options(ROOT, is_train=True), capsys)
        assert status == 2 and err.count('\n') == 1 and expected in err, err


# ---------------------------------------------------------------- paths checked right after parsing


@pytest.mark.parametrize('key, value, message', [
    ('path.pretrain_network_g', 'experiments/nowhere/net_g.safetensors',
     "path.pretrain_network_g: no such file 'experiments/nowhere/net_g.safetensors'"),
    ('path.resume_state', 'nowhere/10.state', "path.resume_state: no such file 'nowhere/10.state'"),
    ('path.weight_masks', 'nowhere/weight_masks.safetensors', "path.weight_masks: no such file"),
])
def test_missing_files_under_path_are_named(tmp_path, data, key, value, message):
    opt = parsed(tmp_path, data, model_type='PrunedSRModel', **{key: value})
    with pytest.raises(FileNotFoundError) as error:
        check_options(opt)
    assert message in str(error.value)


def test_a_folder_given_as_pretrain_network_gets_a_hint(tmp_path, data):
    opt = parsed(tmp_path, data, model_type='PrunedSRModel', **{'path.pretrain_network_g': str(tmp_path)})
    with pytest.raises(FileNotFoundError, match='it is a folder: name the file'):
        check_options(opt)


def test_pretrain_network_is_not_needed_when_auto_resume_finds_a_state(tmp_path, data):
    opt = parsed(tmp_path, data, model_type='PrunedSRModel', **{'path.pretrain_network_g': 'gone.pth'})
    opt['auto_resume'] = True
    with pytest.raises(FileNotFoundError):
        check_options(opt)  # nothing to resume yet: the file is needed
    states = osp.join(opt['path']['experiments_root'], 'training_states')
    os.makedirs(states)
    open(osp.join(states, '10.state'), 'w').close()
    check_options(opt)  # BasicSR will replace pretrain_network_g by models/net_g_10.pth


def test_other_dataset_types_have_their_folders_and_meta_info_checked(tmp_path, data):
    opt = parsed(tmp_path, data)
    opt['datasets']['val'] = {'name': 'single', 'type': 'SingleImageDataset', 'phase': 'val',
                              'dataroot_lq': str(tmp_path / 'no_lq'), 'io_backend': {'type': 'disk'}}
    with pytest.raises(DataCheckError, match=r"datasets\.val\.dataroot_lq: .*no_lq.* does not exist"):
        check_options(opt)
    opt['datasets']['val']['dataroot_lq'] = str(data / 'val' / 'LR')
    opt['datasets']['val']['meta_info_file'] = str(tmp_path / 'meta_info.txt')
    with pytest.raises(DataCheckError, match=r"datasets\.val\.meta_info_file: no such file"):
        check_options(opt)


def test_a_missing_lmdb_folder_is_named(tmp_path, data):
    opt = parsed(tmp_path, data, **{'datasets.train.io_backend': {'type': 'lmdb'},
                                    'datasets.train.dataroot_gt': str(tmp_path / 'DIV2K_HR_sub.lmdb')})
    message = r"datasets\.train\.dataroot_gt: folder .*DIV2K_HR_sub\.lmdb.* does not exist"
    with pytest.raises(DataCheckError, match=message):
        check_options(opt)


def test_an_unknown_model_type_lists_the_known_ones(tmp_path, data):
    opt = parsed(tmp_path, data, model_type='FMPModell')
    with pytest.raises(KeyError) as error:
        check_options(opt)
    assert "model_type: unknown model 'FMPModell'" in error.value.args[0] and "'FMPModel'" in error.value.args[0]


# ---------------------------------------------------------------- end to end (subprocesses)


def run_failing(args, **env):
    full_env = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1', **env)
    if not env:
        full_env.pop('FMPSR_TRACEBACK', None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def earlier_run(name, root='experiments'):
    folder = osp.join(ROOT, root, name)
    os.makedirs(folder)
    with open(osp.join(folder, 'precious.txt'), 'w') as f:
        f.write('saved earlier')
    return folder


def untouched(name, folder, root='experiments'):
    return os.listdir(folder) == ['precious.txt'] and not [
        d for d in os.listdir(osp.join(ROOT, root)) if d.startswith(f'{name}_archived')]


@pytest.mark.slow
def test_a_typo_in_pretrain_network_g_never_archives_an_earlier_run(tmp_path, data, names):
    name = names('pytest_typo')
    folder = earlier_run(name)
    yml = tmp_path / 'typo.yml'
    write_options(yml, name, data, model_type='PrunedSRModel',
                  extra={'path.pretrain_network_g': 'experiments/fmp_lsrb_x4/export/net_g.safetensor'})
    result = run_failing(['fmpsr/train.py', '-opt', str(yml)])
    assert assert_one_line_error(result) == (
        "fmpsr: error: path.pretrain_network_g: no such file 'experiments/fmp_lsrb_x4/export/net_g.safetensor'")
    assert untouched(name, folder)   # (FMPSR_TRACEBACK=1 only prints more: test_debug_or_the_environment_...)


@pytest.mark.slow
def test_test_py_with_a_typo_keeps_the_earlier_results(tmp_path, data, names):
    name = names('pytest_typo_test')
    folder = earlier_run(name, root='results')
    opt = {'name': name, 'model_type': 'PrunedSRModel', 'scale': SCALE, 'num_gpu': 0,
           'datasets': {'test_1': {'name': 'tiny_val', 'type': 'PairedImageDataset',
                                   'dataroot_gt': str(data / 'val/HR'), 'dataroot_lq': str(data / 'val/LR'),
                                   'io_backend': {'type': 'disk'}}},
           'path': {'pretrain_network_g': str(tmp_path / 'net_g.safetensors')},
           'val': {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': SCALE}}}}
    (tmp_path / 'test.yml').write_text(yaml.safe_dump(opt))
    result = run_failing(['fmpsr/test.py', '-opt', str(tmp_path / 'test.yml')])
    assert_one_line_error(result, 'fmpsr: error: path.pretrain_network_g: no such file')
    assert untouched(name, folder, root='results')


class Exploit:
    def __reduce__(self):
        return (os.system, (f'touch {Exploit.marker}',))


@pytest.mark.slow
def test_an_unsafe_checkpoint_is_refused_by_name(tmp_path, data, names):
    import torch
    Exploit.marker = str(tmp_path / 'pwned')
    evil = tmp_path / 'net_g_5.pth'
    torch.save({'params': Exploit()}, evil)
    name = names('pytest_evil')
    yml = tmp_path / 'evil.yml'
    write_options(yml, name, data, model_type='PrunedSRModel', extra={'path.pretrain_network_g': str(evil)})
    result = run_failing(['fmpsr/train.py', '-opt', str(yml)])
    last = assert_one_line_error(
        result, f"fmpsr: error: path.pretrain_network_g {str(evil)!r} was refused: loading it would run code")
    assert 'posix.system' in last
    assert not osp.exists(Exploit.marker)


def test_the_checks_leave_basicsr_logger_to_the_pipeline(tmp_path, data, names, monkeypatch):
    """A check that builds a network (BasicSR's build_network logs) must not be the first caller of
    get_root_logger: that call fixes the level and the log file, and the run would log nothing."""
    import logging

    import basicsr.train
    from basicsr.utils import get_root_logger
    from basicsr.utils import logger as basicsr_logger
    monkeypatch.setattr(basicsr_logger, 'initialized_logger', {})  # as in a fresh process
    saved = logging.getLogger('basicsr').handlers[:]
    yml = tmp_path / 'opt.yml'
    name = names('pytest_logger')
    write_options(yml, name, data, extra={'pruning.grouping': 'auto'})
    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(yml)])
    try:
        basicsr.train.parse_options(ROOT, is_train=True)  # fmpsr's checks run inside
        assert 'basicsr' not in basicsr_logger.initialized_logger
        log_file = tmp_path / 'train.log'
        get_root_logger(log_file=str(log_file)).info('the pipeline configures the logger')
        assert 'the pipeline configures the logger' in log_file.read_text()
    finally:
        from fmpsr.run_lock import lock_path, release
        release(lock_path(osp.join(ROOT, 'experiments', name)))   # the run's lock, taken in this process
        logger = logging.getLogger('basicsr')
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
            handler.close()
        for handler in saved:
            logger.addHandler(handler)
