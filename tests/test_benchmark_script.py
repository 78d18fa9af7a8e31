"""The step-overhead benchmark runs and reports consistent JSON (no timing is asserted here: speed
targets are read off the script's own output on a quiet machine, see scripts/benchmark/README.md)."""
import importlib.util
import json
import os.path as osp

import pytest

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))


@pytest.mark.slow
def test_quick_run_reports_a_consistent_ratio(capsys, monkeypatch):
    # imported by name (not from a file spec): the peak-memory children are spawned processes that
    # import the module again, with this process's sys.path
    monkeypatch.syspath_prepend(osp.join(ROOT, 'scripts', 'benchmark'))
    module = importlib.import_module('fmp_step_overhead')
    module.main(['--quick', '--steps', '2', '--warmup', '1', '--check-reps', '1'])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['benchmark'] == 'fmp_step_overhead' and result['device'] == 'cpu'
    # the medians are printed to 6 decimals, the ratio (from the unrounded medians) to 4
    assert abs(result['ratio'] - result['fmp_step_s_median'] / result['dense_step_s_median']) < 1e-3
    paired = sorted(f / d for f, d in zip(result['fmp_steps_s'], result['dense_steps_s']))
    assert abs(result['ratio_paired_median'] - (paired[0] + paired[1]) / 2) < 1e-3
    assert result['pass'] == (result['ratio_paired_median'] <= result['target'])
    assert result['params']['fmp_trainable'] > result['params']['dense']
    # ops per step (machine-independent): the dense LSRB-6-64 step runs at least a forward and a backward
    # conv for each of its 51 convs; FMP's batched generation (one chain per bank of convs of one shape,
    # masks cached) adds 731 with torch 2.15. The landing before issue 11's work (8fcd0a3: banks, but keep
    # masks rebuilt conv by conv on every forward) added 2126, and generating each conv's weight on its own
    # (no banks) adds about 4500: a bound of 1000 catches either
    ops = result['ops_per_step']
    assert ops['dense'] >= 2 * 51
    assert 0 < ops['fmp'] - ops['dense'] < 1000
    # peak memory: the hypernetwork and its Adam moments are ~13x the dense parameters (4 bytes each, x3
    # with the two moments), so FMP's training peak must exceed the dense one by at least that much
    memory = result['peak_memory_bytes']
    assert result['memory_method'] == 'rss_peak_delta_spawned'
    extra = 3 * 4 * (result['params']['fmp_trainable'] - result['params']['dense'])
    assert memory['fmp']['training'] - memory['dense']['training'] > 0.5 * extra
    assert result['peak_memory_ratio'] == round(memory['fmp']['training'] / memory['dense']['training'], 4)
