"""The step-overhead benchmark runs and reports consistent JSON (no timing is asserted here: speed
targets are read off the script's own output on a quiet machine, see scripts/benchmark/README.md)."""
import importlib.util
import json
import os.path as osp

import pytest

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))


@pytest.mark.slow
def test_quick_run_reports_a_consistent_ratio(capsys):
    spec = importlib.util.spec_from_file_location(
        'fmp_step_overhead', osp.join(ROOT, 'scripts', 'benchmark', 'fmp_step_overhead.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(['--quick', '--steps', '2', '--warmup', '1', '--check-reps', '1'])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['benchmark'] == 'fmp_step_overhead' and result['device'] == 'cpu'
    # the medians are printed to 6 decimals, the ratio (from the unrounded medians) to 4
    assert abs(result['ratio'] - result['fmp_step_s_median'] / result['dense_step_s_median']) < 1e-3
    assert result['pass'] == (result['ratio'] <= result['target'])
    assert result['params']['fmp_trainable'] > result['params']['dense']
