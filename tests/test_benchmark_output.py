"""What the benchmark scripts (scripts/benchmark) and scripts/scratch_baseline.py tell and write: a
smoke-run speed is flagged as not representative, ``OMP_NUM_THREADS`` is respected, speed_table passes
its timing options on, outputs go under results/ or a given path, and an existing option file is not
replaced without --force. Tiny sizes only; no timing is asserted."""
import argparse
import importlib.util
import json
import os.path as osp

import pytest

from deploy_helpers import LSRB_COMPACT, LSRB_DENSE, make_export

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))


def _load(name, folder=('scripts', 'benchmark')):
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, *folder, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def compact_speed():
    return _load('compact_speed')


# ---------------------------------------------------------------- compact_speed.py
def test_quick_run_is_flagged_not_representative(compact_speed, capsys, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    result = compact_speed.main(['--widths', '8,12', '--quick', '--num-block', '1', '--scale', '2'])
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(result))  # JSON still the last line
    assert result['representative'] is False
    reasons = ' '.join(result['not_representative_because'])
    assert '--quick' in reasons and 'output 48x64 pixels' in reasons and '3 timed rounds' in reasons
    # the human-readable summary on stderr: a row per width and the warning
    lines = err.strip().splitlines()
    assert any(line.split()[:1] == ['8'] for line in lines) and any(line.split()[:1] == ['12'] for line in lines)
    assert 'NOT REPRESENTATIVE' in lines[-1] and '--quick' in lines[-1]


def test_representativeness_rule(compact_speed):
    full = argparse.Namespace(quick=False, repeats=20)
    assert compact_speed.representativeness(full, (180, 320), 4) == (True, [])  # 1280 x 720 out
    assert compact_speed.representativeness(full, (90, 160), 4) == (True, [])   # a quarter of it
    ok, reasons = compact_speed.representativeness(full, (89, 160), 4)
    assert not ok and reasons == ['output 356x640 pixels is under a quarter of 1280x720: fixed per-call costs '
                                  'weigh more than at a real image size']
    ok, reasons = compact_speed.representativeness(argparse.Namespace(quick=False, repeats=5), (180, 320), 4)
    assert not ok and reasons[0].startswith('5 timed rounds')


def test_threads_follow_omp_num_threads(compact_speed, monkeypatch, capsys):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    args = compact_speed.parse_args(['--widths', '8'])
    assert (args.threads, args.threads_from) == (1, 'OMP_NUM_THREADS')
    assert compact_speed.parse_args(['--widths', '8', '--threads', '3']).threads == 3  # explicit wins
    result = compact_speed.main(['--widths', '8,12', '--quick', '--num-block', '1', '--scale', '2'])
    assert result['threads'] == 1 and result['threads_from'] == 'OMP_NUM_THREADS'   # what torch ran with
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert compact_speed.parse_args(['--widths', '8']).threads == 2
    for bad in ('0', 'two'):
        monkeypatch.setenv('OMP_NUM_THREADS', bad)
        with pytest.raises(SystemExit):
            compact_speed.parse_args(['--widths', '8'])
        assert 'OMP_NUM_THREADS' in capsys.readouterr().err


@pytest.mark.slow  # times two tiny networks
def test_speed_table_passes_quick_repeats_threads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    table_script = _load('speed_table')
    _, export = make_export(tmp_path / 'run' / 'export', LSRB_COMPACT, zero_fraction=0.4, dense_opt=LSRB_DENSE)
    out = tmp_path / 'runs.jsonl'
    table = table_script.main([export, '--json', str(out), '--quick', '--repeats', '2', '--threads', '1',
                               '--', '--no-onnx', '--no-memory'])
    result = json.loads(out.read_text())
    assert result['config']['quick'] is True and result['config']['repeats'] == 2
    assert result['networks']['dense']['eager_ms']['n'] == 2
    assert result['threads'] == 1 and result['threads_from'] == '--threads'
    assert result['representative'] is False
    lines = table.splitlines()
    assert lines[2].startswith('| run * |')
    assert lines[-1].startswith('* run: not representative: --quick')
    assert capsys.readouterr().out.strip() == table


# ---------------------------------------------------------------- where outputs go
def test_indicator_dynamics_and_registry_support_write_under_results():
    dynamics = _load('indicator_dynamics')
    assert dynamics.parse_args([]).out == osp.join(ROOT, 'results', 'indicator_dynamics.json')
    assert dynamics.parse_args(['--out', 'x/y.json']).out == 'x/y.json'
    registry = _load('registry_support')
    assert registry.parse_args([]).out_dir == osp.join(ROOT, 'results', 'registry_support')


def test_latency_table_summary_lines():
    latency_table = _load('latency_table')
    result = {'output': 't.json', 'device': 'cpu', 'device_name': None, 'threads': 2, 'input_size': [64, 64],
              'step': 4, 'repeats': 15, 'network_s': 0.010, 'conv_sum_s': 0.008, 'narrow_network_s': 0.005,
              'narrow_conv_sum_s': 0.003, 'line': {'scale': 1.0, 'offset_s': 0.002},
              'check': {'dense_ms': 10.0, 'widths': [{'num_feat': 16, 'measured_fraction': 0.4,
                                                      'predicted_fraction': 0.42, 'relative_error': 0.05}]}}
    lines = latency_table.report(result).splitlines()
    assert lines[2].split() == ['dense', '10.00', '8.00'] and lines[3].split() == ['half', '5.00', '3.00']
    assert lines[-1].split() == ['16', '0.400', '0.420', '+5.0%']


# ---------------------------------------------------------------- scratch_baseline.py
def test_scratch_baseline_refuses_to_overwrite(tmp_path, capsys):
    from test_scratch_baseline import ARCHS
    from test_scratch_baseline import make_export as make_pruned_export
    script = _load('scratch_baseline', folder=('scripts',))
    export, _, _ = make_pruned_export(tmp_path, ARCHS['EDSR'])
    out = tmp_path / 'opts'
    argv = ['--export', str(export), '--out', str(out), '--kind', 'exact', 'params']
    written = script.main(argv)
    assert [osp.basename(p) for p in written] == ['run_scratch_exact.yml', 'run_scratch_params.yml']
    (out / 'run_scratch_params.yml').write_text('# edited by hand\n')
    before = {p: open(p).read() for p in written}
    with pytest.raises(ValueError, match=r"run_scratch_exact\.yml' already exists \(2 of 2\).*--force"):
        script.main(argv)
    assert {p: open(p).read() for p in written} == before  # nothing replaced, not even the other kind
    capsys.readouterr()
    script.main(argv + ['--force'])
    assert open(out / 'run_scratch_params.yml').read() != '# edited by hand\n'
