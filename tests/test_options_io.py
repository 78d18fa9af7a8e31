"""Option files and ``--force_yml`` never run code (fmpsr/options_io.py), and an unsafe torch stops
the import (fmpsr/requirements.py)."""
import glob
import os
import os.path as osp
import subprocess
import sys
from collections import OrderedDict

import pytest
import yaml
from conftest import ROOT, write_options

import fmpsr  # noqa: F401
from fmpsr.options_io import apply_force_yml, load_option_file
from fmpsr.requirements import torch_is_safe


def _payload(marker):
    """A YAML value whose full-loader construction creates ``marker`` (runs ``os.system``)."""
    return f"!!python/object/apply:os.system ['touch {marker}']"


def test_every_option_file_reads_as_with_basicsrs_loader():
    """The safe loader gives the same dicts (keys in the same order) as BasicSR's full loader on every
    option file of the repository, so the switch changes no run."""
    try:
        from yaml import CLoader as FullLoader
    except ImportError:  # pragma: no cover
        from yaml import Loader as FullLoader

    class Ordered(FullLoader):
        pass
    Ordered.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                            lambda loader, node: OrderedDict(loader.construct_pairs(node)))
    files = sorted(glob.glob(osp.join(ROOT, 'options', '**', '*.yml'), recursive=True))
    assert len(files) > 40
    for path in files:
        with open(path) as f:
            expected = yaml.load(f, Loader=Ordered)  # noqa: S506 - our own files, for comparison
        got = load_option_file(path)
        assert got == expected and list(got) == list(expected), path
        assert isinstance(got, OrderedDict)


def test_a_python_tag_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.yml'
    path.write_text(f'name: x\nmodel_type: {_payload(marker)}\n')
    with pytest.raises(ValueError, match=r"evil\.yml' line 2: not plain YAML"):
        load_option_file(str(path))
    assert not marker.exists()


@pytest.mark.parametrize('text, message', [
    ('', 'is empty'), ('# only a comment\n', 'is empty'), ('- a\n- b\n', 'not a list'), ('42\n', 'not a int')])
def test_empty_or_non_mapping_files_are_named(tmp_path, text, message):
    path = tmp_path / 'o.yml'
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_option_file(str(path))
    assert str(path) in str(error.value)


def test_force_yml_sets_plain_values_and_walks_existing_keys():
    opt = OrderedDict(train={'ema_decay': 0.9, 'optim_g': {'lr': 1}}, name='a')
    apply_force_yml(opt, ['train:ema_decay=0.999', 'train:optim_g:betas=[0.9, 0.99]', 'name = b c',
                          'train:new_key=~', 'train:flag=true', 'train:lr=!!float 1e-4'])
    assert opt == {'train': {'ema_decay': 0.999, 'optim_g': {'lr': 1, 'betas': [0.9, 0.99]}, 'new_key': None,
                             'flag': True, 'lr': 1e-4}, 'name': 'b c'}


@pytest.mark.parametrize('entry, message', [
    ('train', 'expected keys=value'),
    ('nowhere:x=1', "option 'nowhere' does not exist"),
    ('name:x=1', "option 'name' does not exist or is not a mapping"),
    ('train::x=1', 'empty key'),
    ('train:a b=1', "not 'a b'"),
])
def test_force_yml_mistakes_are_named(entry, message):
    opt = {'train': {}, 'name': 'a'}
    with pytest.raises(ValueError, match=message):
        apply_force_yml(opt, [entry])


def test_force_yml_runs_no_code(tmp_path):
    """BasicSR exec'd ``opt["<keys>"]=value`` and eval'd values starting with ``[``."""
    marker = tmp_path / 'ran'
    opt = {'train': {}}
    injected_key = f'train"]=__import__("os").system("touch {marker}");opt["x'
    with pytest.raises(ValueError, match='option keys are letters'):
        apply_force_yml(opt, [f'{injected_key}=1'])
    apply_force_yml(opt, [f'train:v=[__import__("os").system("touch {marker}")]'])
    assert opt['train']['v'] == ['__import__("os").system("touch ' + str(marker) + '")']
    with pytest.raises(ValueError, match='not plain YAML'):
        apply_force_yml(opt, [f'train:v={_payload(marker)}'])
    assert not marker.exists()


def _run(args, env=None):
    full = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1', **(env or {}))
    full.pop('FMPSR_TRACEBACK', None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)


def _one_line_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('fmpsr: error: '), result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_train_and_test_refuse_code_in_the_option_file_before_any_folder(tmp_path, data, names):
    """Through the real scripts: the tag (a name that would be used for the folder) runs nothing,
    no experiments / results folder is made, one line, status 2; a --force_yml injection likewise."""
    marker = tmp_path / 'ran'
    name = names('pytest_evil_yaml')
    path = tmp_path / 'evil.yml'
    write_options(path, name, data)
    text = path.read_text().replace(f'name: {name}', f'name: {name}\ntag: {_payload(marker)}')
    path.write_text(text)
    for script in ('fmpsr/train.py', 'fmpsr/test.py'):
        _one_line_error(_run([script, '-opt', str(path)]), str(path), 'not plain YAML')
    assert not marker.exists()
    assert not osp.exists(osp.join(ROOT, 'experiments', name)) and not osp.exists(osp.join(ROOT, 'results', name))

    write_options(path, name, data)
    key = f'train"]=__import__("os").system("touch {marker}");opt["x'
    _one_line_error(_run(['fmpsr/train.py', '-opt', str(path), '--force_yml', f'{key}=1']), '--force_yml')
    assert not marker.exists() and not osp.exists(osp.join(ROOT, 'experiments', name))


def test_torch_floor():
    assert torch_is_safe('2.15.0+cu132') and torch_is_safe('2.10.0') and torch_is_safe('2.10.0rc1')
    assert not torch_is_safe('2.9.1') and not torch_is_safe('2.5.1+cpu') and not torch_is_safe('1.13.1')


def test_an_unsafe_torch_stops_the_import_with_one_line():
    code = ("import torch; from torch.torch_version import TorchVersion; "
            "torch.__version__ = TorchVersion('2.5.1+cpu'); import fmpsr")
    result = _run(['-c', code])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'fmpsr: error: torch 2.5.1+cpu is older than 2.10: its torch.load(weights_only=True) can run code from a '
        'checkpoint (CVE-2025-32434, CVE-2026-24747); install torch>=2.10']
